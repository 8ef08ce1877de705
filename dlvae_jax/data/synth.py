"""Synthetic MRI phantoms written in exactly the LGG download layout.

Each patient is a stack of axial slices through an ellipsoidal head: scalp and
skull ring, brain ellipse with smooth tissue texture, two lateral ventricles
(dark on FLAIR, as CSF is suppressed) and, for most patients, a lobulated
ellipsoidal tumor spanning a run of slices. On FLAIR (channel 1) the tumor is
hyperintense and is the brightest structure inside the brain, as LGG are, so a
classical K-means ROI can find it; on pre-contrast it is hypointense and on
post-contrast it shows a faint enhancing rim. The extreme slices fall outside
the head and are all black, as in the real data.

Every fourth patient (index 3, 7, ...) has no tumor at all, so patient-level
stratification by tumor presence has both groups; institutions alternate
between "SY" and "SZ" for the same reason.

Deterministic: the bytes of every file but the `.dlvae-jax` marker depend
only on (n_patients, seed, size, slices_per_patient); each patient draws from its own `numpy` Generator seeded
with (seed, patient index).
"""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path

import numpy as np
import tifffile
from scipy import ndimage

from dlvae_jax.errors import DataError
from dlvae_jax.outdir import output_folder

INSTITUTIONS = ("SY", "SZ")
SCAN_DATE = "20000101"


def patient_folder_name(i: int) -> str:
    """Folder name of synthetic patient i (0-based): TCGA_<inst>_<0001-based id>_<date>."""
    return f"TCGA_{INSTITUTIONS[i % len(INSTITUTIONS)]}_{i + 1:04d}_{SCAN_DATE}"


def _smooth_noise(rng: np.random.Generator, size: int, cell: int) -> np.ndarray:
    """Zero-mean, unit-std noise of spatial correlation ~`cell` pixels, float32 [size, size]."""
    coarse = rng.standard_normal((size // cell + 2, size // cell + 2)).astype(np.float32)
    fine = ndimage.zoom(coarse, cell, order=1)[:size, :size]
    return (fine - fine.mean()) / (fine.std() + 1e-6)


def _ellipse(yy, xx, cy, cx, ry, rx, angle=0.0) -> np.ndarray:
    """Normalized ellipse radius (<1 inside), float32 [H, W]; yy/xx in pixels."""
    c, s = np.cos(angle), np.sin(angle)
    dy, dx = yy - cy, xx - cx
    u = (c * dx + s * dy) / rx
    v = (-s * dx + c * dy) / ry
    return np.sqrt(u * u + v * v)


def _patient_volume(rng: np.random.Generator, size: int, n_slices: int, with_tumor: bool):
    """Returns (images_SxHxWx3 uint8, masks_SxHxW uint8 in {0, 255})."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    cy = size * (0.5 + rng.uniform(-0.03, 0.03))
    cx = size * (0.5 + rng.uniform(-0.03, 0.03))
    head_ry, head_rx = size * rng.uniform(0.40, 0.45), size * rng.uniform(0.33, 0.38)
    tilt = rng.uniform(-0.15, 0.15)
    gain = rng.uniform(0.85, 1.15)  # per-scan intensity scale, like scanner variation

    # Tumor: ellipsoid centred off-midline in the brain, spanning a run of slices.
    t_slice = rng.uniform(0.35, 0.65) * (n_slices - 1)
    t_half = max(1.5, rng.uniform(0.15, 0.3) * n_slices)  # half-extent in slices
    t_r = size * rng.uniform(0.06, 0.11)
    t_ang = rng.uniform(0, 2 * np.pi)
    t_off = rng.uniform(0.2, 0.45)
    t_cy = cy + np.sin(t_ang) * t_off * head_ry
    t_cx = cx + np.cos(t_ang) * t_off * head_rx
    t_aspect = rng.uniform(0.7, 1.3)

    images = np.zeros((n_slices, size, size, 3), np.uint8)
    masks = np.zeros((n_slices, size, size), np.uint8)
    for k in range(n_slices):
        # z in (-1, 1); slices near the ends fall outside the head and stay black.
        z = -1.05 + 2.1 * (k + 0.5) / n_slices
        scale = np.sqrt(max(0.0, 1.0 - z * z))
        if scale < 0.15:
            continue
        head = _ellipse(yy, xx, cy, cx, head_ry * scale, head_rx * scale, tilt)
        brain = _ellipse(yy, xx, cy, cx, head_ry * scale * 0.86, head_rx * scale * 0.84, tilt)
        in_head, in_brain = head < 1.0, brain < 1.0
        texture = _smooth_noise(rng, size, max(2, size // 32))
        gyri = _smooth_noise(rng, size, max(2, size // 12))

        flair = np.zeros((size, size), np.float32)
        pre = np.zeros((size, size), np.float32)
        flair[in_head] = 70.0
        pre[in_head] = 150.0  # scalp fat is bright on T1
        white = gyri > 0.3  # white/gray matter contrast
        flair[in_brain] = np.where(white, 95.0, 110.0)[in_brain] + 6.0 * texture[in_brain]
        pre[in_brain] = np.where(white, 120.0, 100.0)[in_brain] + 6.0 * texture[in_brain]

        if abs(z) < 0.55:  # lateral ventricles: dark CSF on FLAIR and T1
            vs = np.sqrt(1 - (z / 0.55) ** 2)
            for side in (-1, 1):
                vent = _ellipse(yy, xx, cy - 0.05 * head_ry, cx + side * 0.12 * head_rx,
                                0.18 * head_ry * vs, 0.06 * head_rx * vs, tilt + side * 0.25)
                flair[vent < 1] = 30.0
                pre[vent < 1] = 45.0

        post = pre.copy()
        mask = np.zeros((size, size), bool)
        dz = (k - t_slice) / t_half
        if with_tumor and abs(dz) < 1.0:
            r = t_r * np.sqrt(1 - dz * dz)
            if r >= 2.0:
                lobes = _smooth_noise(rng, size, max(2, size // 24))
                dist = _ellipse(yy, xx, t_cy, t_cx, r * t_aspect, r / t_aspect, t_ang) + 0.12 * lobes
                mask = (dist < 1.0) & in_brain
                flair[mask] = 205.0 + 8.0 * texture[mask]
                pre[mask] = 75.0 + 5.0 * texture[mask]
                rim = mask & (dist > 0.8)
                post[mask] = pre[mask]
                post[rim] = 160.0
        vol = np.stack([pre, flair, post], axis=-1) * gain
        vol += rng.normal(0.0, 2.0, vol.shape).astype(np.float32) * in_head[..., None]
        images[k] = np.clip(np.rint(vol), 0, 255).astype(np.uint8)
        masks[k] = mask.astype(np.uint8) * 255
    return images, masks


def _tiff_bytes(array: np.ndarray) -> bytes:
    # Deflate + horizontal predictor, like the download; metadata=None keeps the
    # bytes free of tifffile's JSON description so equal arrays give equal files.
    buf = io.BytesIO()
    tifffile.imwrite(buf, array, compression="zlib", predictor=True, metadata=None)
    return buf.getvalue()


def _check(n_patients: int, size: int, slices_per_patient: int, seed: int, where: Path) -> None:
    if n_patients < 1:
        raise DataError(f"{where}: --patients must be at least 1, got {n_patients}")
    if not 32 <= size <= 4096 or slices_per_patient < 3:
        raise DataError(f"{where}: size must be in [32, 4096] and slices_per_patient >= 3")
    if not 0 <= seed < 2**32:
        raise DataError(f"{where}: seed must be in [0, 2**32), got {seed}")


def synthesize(
    out_dir: str | os.PathLike,
    n_patients: int,
    seed: int,
    size: int = 256,
    slices_per_patient: int = 20,
    *,
    overwrite: bool = False,
) -> Path:
    """Writes a synthetic dataset in the LGG layout to `out_dir`; returns its Path.

    Images are (size, size, 3) uint8 (pre-contrast, FLAIR, post-contrast),
    masks (size, size) uint8 in {0, 255}, plus data.csv. Built in a temporary
    folder beside `out_dir` and renamed into place (`dlvae_jax.outdir`), so an
    interrupted run leaves nothing. `out_dir` must not exist or be an empty
    folder (or, with `overwrite`, a folder dlvae-jax made).
    """
    out = Path(out_dir)
    _check(n_patients, size, slices_per_patient, seed, out)
    with output_folder(out, "data synth", overwrite=overwrite) as tmp:
        _write(tmp, n_patients, seed, size, slices_per_patient)
    return out


def synthesize_into(
    folder: str | os.PathLike, n_patients: int, seed: int, size: int = 256, slices_per_patient: int = 20
) -> Path:
    """Like `synthesize`, into a new folder inside an output folder that is already staged."""
    folder = Path(folder)
    _check(n_patients, size, slices_per_patient, seed, folder)
    folder.mkdir()
    _write(folder, n_patients, seed, size, slices_per_patient)
    return folder


def _write(tmp: Path, n_patients: int, seed: int, size: int, slices_per_patient: int) -> None:
    rows = []
    for i in range(n_patients):
        rng = np.random.default_rng([seed, i])
        with_tumor = i % 4 != 3
        images, masks = _patient_volume(rng, size, slices_per_patient, with_tumor)
        name = patient_folder_name(i)
        pdir = tmp / name
        pdir.mkdir()
        for k in range(slices_per_patient):
            (pdir / f"{name}_{k + 1}.tif").write_bytes(_tiff_bytes(images[k]))
            (pdir / f"{name}_{k + 1}_mask.tif").write_bytes(_tiff_bytes(masks[k]))
        rows.append({
            "Patient": name.rsplit("_", 1)[0],
            "tumor_slices": int((masks.reshape(slices_per_patient, -1) > 0).any(1).sum()),
            "age_at_initial_pathologic": int(rng.integers(20, 75)),
            "gender": int(rng.integers(1, 3)),
        })
    with open(tmp / "data.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
