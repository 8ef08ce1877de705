"""`dlvae-jax predict`: tumor masks for new slices from a trained workdir.

An input is a slice TIFF named like the dataset's images, ``<stem>_<n>.tif``
((H, W, 3) uint8 with FLAIR in channel 1, or (H, W) uint8 FLAIR), or a folder
of them (a patient folder; ``*_mask.tif`` files in it are ignored); a run
trained on all three channels needs the (H, W, 3) form. Masks are
decided as in `dlvae-jax evaluate` (`dlvae_jax.metrics.decide`): the
class head's ``tumor_prob >= 0.5`` says whether there is a tumor, the pixel
map's ``prob >= 0.5`` where.

For each slice ``DIR/<folder>/<stem>_<n>`` (``<folder>`` is the name of the
input's own folder, so a patient keeps its folder) gets:

* ``..._mask.tif``: the mask in the dataset's convention, uint8 {0, 255};
* ``..._prob.npy``: float32 [H, W] pixel tumor probability, before the
  class-head gate (so it can be thresholded differently);
* ``..._overlay.png``: FLAIR with the predicted outline in red.

With ``--samples N`` (N stochastic predictions: latent samples for
DL-VAE-CNN), also:

* ``..._mean.npy`` / ``..._mean.png``: float32 [H, W] mean probability over
  the samples (PNG: gray, 0..1 -> 0..255); the mean mask is ``mean >= 0.5``,
  not gated by the class head (the samples carry no slice label);
* ``..._entropy.npy`` / ``..._entropy.png``: per-pixel predictive entropy of
  the mean probability in bits, ``-(p log2 p + (1-p) log2 (1-p))`` with
  0 log 0 = 0, float32 in [0, 1] (PNG: magma colormap over [0, 1]).

``DIR/predictions.jsonl`` has one line per slice: input path, output stem,
tumor_prob, tumor, mask_pixels, height, width (and mean_mask_pixels,
entropy_mean_bits with samples). DIR follows `dlvae_jax.outdir.output_folder`:
built beside its final place and renamed into it at the end; an existing
DIR must be empty, or (with --overwrite) an earlier output of dlvae-jax; it
may not be, hold or sit in an input, nor be or hold the workdir. Sampling
is deterministic in (inputs, --seed).
"""

from __future__ import annotations

import io
import json
import os
import re
import sys
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from dlvae_jax.data import shift
from dlvae_jax.errors import DlvaeError, print_warning
from dlvae_jax.outdir import output_folder
from dlvae_jax.eval import inference
from dlvae_jax.eval.uncertainty import predictive_entropy
from dlvae_jax.eval.evaluate import model_channels
from dlvae_jax.metrics import decide
from dlvae_jax.report import overlay_rgb, save_png

BATCH_SIZE = 16
_SLICE_RE = re.compile(r"^(?P<stem>.+)_(?P<n>\d+)\.tiff?$", re.IGNORECASE)
_MASK_RE = re.compile(r"_mask\.tiff?$", re.IGNORECASE)




def collect_inputs(inputs: Sequence[str | os.PathLike]) -> list[Path]:
    """Slice TIFFs named by the inputs, in input order (a folder's by slice number), each once.

    Raises DlvaeError naming the first input that is missing, a mask, not a
    slice TIFF, or a folder without slice TIFFs; or two different slices
    that would write the same output names.
    """
    found: list[Path] = []
    for raw in inputs:
        path = Path(raw)
        if path.is_dir():
            slices = [f for f in path.iterdir()
                      if f.is_file() and _SLICE_RE.match(f.name) and not _MASK_RE.search(f.name)]
            if not slices:
                raise DlvaeError(f"{path}: folder holds no slice TIFFs (<name>_<n>.tif)")
            found.extend(sorted(slices, key=lambda f: (int(_SLICE_RE.match(f.name)["n"]), f.name)))
        elif path.is_file():
            if _MASK_RE.search(path.name):
                raise DlvaeError(f"{path}: is a mask; pass the image slice (<name>_<n>.tif)")
            if not _SLICE_RE.match(path.name):
                raise DlvaeError(f"{path}: not a slice TIFF (expected <name>_<n>.tif)")
            found.append(path)
        elif path.exists():
            raise DlvaeError(f"{path}: not a file or folder")
        else:
            raise DlvaeError(f"{path}: no such file or folder")
    unique: list[Path] = []
    names: dict[str, Path] = {}
    for f in found:
        key = output_stem(f)
        if key in names:
            if names[key].resolve() == f.resolve():
                continue
            raise DlvaeError(f"{f}: writes the same outputs ({key}) as {names[key]}; rename one")
        names[key] = f
        unique.append(f)
    return unique


def output_stem(path: Path) -> str:
    """Relative output prefix of a slice: "<its folder's name>/<file stem>"."""
    return f"{path.resolve().parent.name}/{Path(path.name).stem}"


def read_slice(path: Path, channels: str = "flair") -> tuple[np.ndarray, np.ndarray]:
    """(model input, FLAIR) of a slice TIFF, both uint8: input [H, W] for channels "flair",
    [H, W, 3] for "all" (which needs a three-channel image); FLAIR [H, W]. Raises DlvaeError naming the file."""
    import tifffile

    try:
        image = tifffile.imread(path)
    except Exception as err:  # tifffile raises many types for corrupt files
        raise DlvaeError(f"{path}: unreadable TIFF ({type(err).__name__}: {err})") from None
    if image.dtype != np.uint8:
        raise DlvaeError(f"{path}: dtype is {image.dtype}, expected uint8")
    if image.ndim == 3 and image.shape[2] == 3:
        flair = np.ascontiguousarray(image[:, :, 1])
    elif image.ndim == 2:
        flair = image
    else:
        raise DlvaeError(f"{path}: shape is {image.shape}, expected (H, W, 3) or (H, W)")
    if channels != "all":
        return flair, flair
    if image.ndim != 3:
        raise DlvaeError(f"{path}: has one channel; the model was trained on all three "
                         "(pre-contrast, FLAIR, post-contrast)")
    return image, flair


def _tiff_bytes(mask: np.ndarray) -> bytes:
    import tifffile

    buf = io.BytesIO()
    tifffile.imwrite(buf, mask, compression="zlib", predictor=True, metadata=None)
    return buf.getvalue()


def _check_out(out: Path, workdir: Path) -> None:
    # output_folder may replace a folder dlvae-jax made, and the workdir is
    # one: an --out equal to it or holding it would take the run with it.
    res, wd = out.resolve(), workdir.resolve()
    if res == wd or res in wd.parents:
        raise DlvaeError(f"{out}: holds the training folder {workdir}; choose another --out")


def _batches(paths: list[Path], size: int, channels: str) -> Iterator[tuple[list[Path], np.ndarray, np.ndarray]]:
    """Consecutive slices of one H x W, at most `size` at a time:
    (paths, model input uint8 [B, H, W] or [B, H, W, 3], FLAIR uint8 [B, H, W])."""
    group: list[Path] = []
    images: list[np.ndarray] = []
    flairs: list[np.ndarray] = []
    for p in paths:
        image, flair = read_slice(p, channels)
        if images and (image.shape != images[0].shape or len(images) == size):
            yield group, np.stack(images), np.stack(flairs)
            group, images, flairs = [], [], []
        group.append(p)
        images.append(image)
        flairs.append(flair)
    if images:
        yield group, np.stack(images), np.stack(flairs)


def predict(
    workdir: str | os.PathLike,
    inputs: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    *,
    checkpoint: str = "best",
    samples: int = 0,
    seed: int = 0,
    overwrite: bool = False,
    progress: bool = False,
) -> list[dict]:
    """Writes the files of the module docstring into `out`; returns the predictions.jsonl rows."""
    from tqdm import tqdm

    workdir, out = Path(workdir), Path(out)
    if samples < 0:
        raise DlvaeError(f"--samples must be at least 0, got {samples}")
    paths = collect_inputs(inputs)
    predictor = inference.load_predictor(workdir, checkpoint)
    if samples and not getattr(predictor, "can_sample", True):
        raise DlvaeError(f"--samples: the {predictor.config.model.name} model in {workdir} is deterministic "
                         "(no latent to sample), so every sample would be the same prediction; drop --samples")
    rows: list[dict] = []
    _check_out(out, workdir)
    with output_folder(out, "predict", overwrite=overwrite, inputs=list(inputs)) as tmp:
        bar = tqdm(total=len(paths), desc="predict", unit="slice", disable=not progress, file=sys.stderr)
        done = 0
        head_means, head_shares = [], []
        for group, images, flair in _batches(paths, BATCH_SIZE, model_channels(predictor.config)):
            m, sh = shift.slice_means(flair)
            head_means.append(m)
            head_shares.append(sh)
            result = predictor(images)
            masks, labels = decide(result, len(group), flair.shape[1:], getattr(predictor, "min_component", 0))
            tumor_prob = np.asarray(result["tumor_prob_B"], np.float32).reshape(-1)
            prob = np.asarray(result["prob_BxHxW"], np.float32)
            mean = None
            if samples:
                # The batch's first slice index joins the seed so each batch draws fresh noise.
                mean = np.asarray(predictor.sample_mean(images, samples, seed + done), np.float32)
                if mean.shape != flair.shape:
                    raise DlvaeError(f"predictor.sample_mean returned {mean.shape}, expected {flair.shape}")
            for j, path in enumerate(group):
                stem = output_stem(path)
                (tmp / stem).parent.mkdir(exist_ok=True)
                base = tmp / stem
                (base.parent / f"{base.name}_mask.tif").write_bytes(_tiff_bytes(masks[j].astype(np.uint8) * 255))
                np.save(base.parent / f"{base.name}_prob.npy", prob[j])
                save_png(base.parent / f"{base.name}_overlay.png", overlay_rgb(flair[j], masks[j]))
                row = {
                    "input": str(path),
                    "output": stem,
                    "tumor_prob": float(tumor_prob[j]),
                    "tumor": bool(labels[j]),
                    "mask_pixels": int(masks[j].sum()),
                    "height": int(flair.shape[1]),
                    "width": int(flair.shape[2]),
                }
                if mean is not None:
                    entropy = predictive_entropy(mean[j])
                    np.save(base.parent / f"{base.name}_mean.npy", mean[j])
                    np.save(base.parent / f"{base.name}_entropy.npy", entropy)
                    save_png(base.parent / f"{base.name}_mean.png", mean[j], cmap="gray", vmin=0.0, vmax=1.0)
                    save_png(base.parent / f"{base.name}_entropy.png", entropy, cmap="magma", vmin=0.0, vmax=1.0)
                    row["mean_mask_pixels"] = int((mean[j] >= 0.5).sum())
                    row["entropy_mean_bits"] = float(entropy.mean())
                rows.append(row)
            done += len(group)
            bar.update(len(group))
        bar.close()
        trained = shift.read_profile(workdir)  # files of any origin: only their intensities are compared
        message = shift.compare(trained, shift.profile(np.concatenate(head_means), np.concatenate(head_shares),
                                                       (trained or {}).get("source", "folder")))
        if message:
            print_warning(f"{workdir}: {message}")
        with open(tmp / "predictions.jsonl", "w") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
    return rows
