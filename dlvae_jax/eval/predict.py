"""`dlvae-jax predict`: tumor masks for new slices and volumes from a trained workdir.

Inputs (`dlvae_jax.eval.images`): slice images of any name (TIFF or PNG,
8 or 16 bits, one channel = FLAIR or three = pre-contrast, FLAIR,
post-contrast), folders of them (a patient folder; ``*_mask.*`` files are
ignored), and NIfTI volumes (``.nii``/``.nii.gz``, (X, Y, Z) or
(X, Y, Z, 3); each axial slice ``data[:, :, k]`` predicted). Data that is
not 8-bit is scaled to 0..255, minimum to 0 and 99.5th percentile to 255,
each channel on its own (per slice file; per NIfTI volume). Each NIfTI
file, and the slice images of each folder, is a *case*. Masks are decided as in `dlvae-jax evaluate`
(`dlvae_jax.metrics.decide`, with the run's ``eval.presence``): the pixel
map's ``prob >= 0.5`` says where; whether there is a tumor is said by the
class head's ``tumor_prob >= 0.5`` ("class") or by a non-empty mask ("mask").
With ``eval.min_volume_share`` (or --min-volume-share) > 0, each case's
slices, in order, are one volume, and its 3D tumor components under that share
of its largest are removed.

Per case, in ``DIR/<case>/``:

* ``<case>_mask.nii.gz`` (uint8 {0, 1}), ``<case>_prob.nii.gz`` (float32
  pixel tumor probability before the class-head gate) and
  ``<case>_entropy.nii.gz`` (float32 binary entropy in bits of the
  probability, of the samples' mean with ``--samples``): volumes on the
  input's voxel grid (X, Y, Z) with its affine and header for a NIfTI input;
  for slice files the slices stacked as ``data[row, column, k]`` with an
  identity affine, beside ``<case>_image.nii.gz`` (the model's input, FLAIR or
  (X, Y, Z, 3)), so a viewer shows the mask on its image and predicting that
  volume again gives the same masks. Slices of different sizes in one case get no volume
  (a warning says so);

and per slice ``<stem>`` (a file's own stem; ``<case>_<k>`` from 1 for a volume):

* ``<stem>_mask.tif``: the mask in the dataset's convention, uint8 {0, 255};
* ``<stem>_prob.npy``: float32 [H, W], the pixel probability;
* ``<stem>_overlay.png``: FLAIR with the predicted outline in red.

With ``--samples N`` (N latent draws of the label-free posterior; DL-VAE-CNN
only, other models are refused), also ``<case>_mean.nii.gz`` and, per slice:

* ``<stem>_mean.npy`` / ``<stem>_mean.png``: float32 [H, W] mean probability
  over the samples; the mean mask is ``mean >= 0.5``, not gated by the class
  head (the samples carry no slice label);
* ``<stem>_entropy.npy`` / ``<stem>_entropy.png``: per-pixel predictive entropy
  of the mean probability in bits, ``-(p log2 p + (1-p) log2 (1-p))`` with
  0 log 0 = 0, in [0, 1]. The PNGs carry a colour bar.

``DIR/predictions.jsonl`` has one line per slice: input (a file, or
``<volume>#<k>``), case, output stem, tumor_prob, tumor, mask_pixels,
height, width (and mean_mask_pixels, entropy_mean_bits with samples). DIR
follows `dlvae_jax.outdir.output_folder`: built beside its final place and
renamed into it at the end; an existing DIR must be empty, or (with
--overwrite) an earlier output of dlvae-jax; it may not be, hold or sit in
an input, nor be or hold the workdir. Sampling is deterministic in
(inputs, --seed).
"""

from __future__ import annotations

import io
import json
import os
import sys
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from dlvae_jax.data import shift
from dlvae_jax.errors import DlvaeError, print_warning
from dlvae_jax.outdir import output_folder
from dlvae_jax.eval import images as imageio
from dlvae_jax.eval import inference
from dlvae_jax.eval.uncertainty import predictive_entropy
from dlvae_jax.eval.evaluate import model_channels
from dlvae_jax.metrics import decide
from dlvae_jax.report import overlay_rgb, save_map, save_png

BATCH_SIZE = 16


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


def _batches(case: imageio.Case, size: int, channels: str
             ) -> Iterator[tuple[list[tuple[str, str]], np.ndarray, np.ndarray]]:
    """Consecutive slices of one case and one H x W, at most `size` at a time:
    ([(input, stem)], model input uint8 [B, H, W] or [B, H, W, 3], FLAIR uint8 [B, H, W])."""
    names: list[tuple[str, str]] = []
    images: list[np.ndarray] = []
    flairs: list[np.ndarray] = []
    for source, stem, image, flair in imageio.iter_case(case, channels):
        if images and (image.shape != images[0].shape or len(images) == size):
            yield names, np.stack(images), np.stack(flairs)
            names, images, flairs = [], [], []
        names.append((source, stem))
        images.append(image)
        flairs.append(flair)
    if images:
        yield names, np.stack(images), np.stack(flairs)


def _decide_case(case: imageio.Case, parts: list, min_component: int, presence: str, share: float
                 ) -> list[tuple[np.ndarray, np.ndarray]]:
    """(masks, labels) for each predicted batch of one case (`metrics.decide`).
    With a volume share the case's slices are decided as one volume, in
    order; a case whose slices differ in size has no volume, so its slices
    are decided one batch at a time without the volume rule (a warning says so)."""
    decided = lambda result, n, shape, s: decide(result, n, shape, min_component, presence, s)
    if share > 0 and len({flair.shape[1:] for _, _, flair, _, _ in parts}) == 1:
        whole = {k: np.concatenate([np.asarray(r[k]) for _, _, _, r, _ in parts])
                 for k in ("prob_BxHxW", "tumor_prob_B")}
        n = sum(len(names) for names, *_ in parts)
        masks, labels = decided(whole, n, parts[0][2].shape[1:], share)
        ends = np.cumsum([len(names) for names, *_ in parts])[:-1]
        return list(zip(np.split(masks, ends), np.split(labels, ends)))
    if share > 0:
        print_warning(f"{case.name}: slices of several sizes are not one volume; --min-volume-share is not "
                      "applied to this case")
    return [decided(result, len(names), flair.shape[1:], 0.0) for names, _, flair, result, _ in parts]


class _Volumes:
    """A case's per-slice maps, stacked into NIfTI volumes when the case ends."""

    def __init__(self, case: imageio.Case):
        self.case = case
        self.maps: dict[str, list[np.ndarray]] = {}

    def add(self, **maps: np.ndarray) -> None:
        for name, value in maps.items():
            self.maps.setdefault(name, []).append(value)

    def write(self, folder: Path) -> bool:
        """Writes ``<case>_<name>.nii.gz`` for each map; False (nothing written) when sizes differ."""
        shapes = {m.shape for m in self.maps["mask"]}
        if len(shapes) != 1:
            print_warning(f"{self.case.name}: slices of {len(shapes)} sizes ({', '.join(f'{h}x{w}' for h, w in sorted(shapes))}); "
                          "no NIfTI volumes written for this case")
            return False
        like = None
        if self.case.kind == "nifti":
            like = imageio.read_nifti(self.case.paths[0])
        for name, slices in self.maps.items():
            # Slices stack on the third axis; a three-channel image volume keeps its channels last.
            imageio.write_nifti(folder / f"{self.case.name}_{name}.nii.gz", np.stack(slices, axis=2), like)
        return True


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
    tta: bool | None = None,
    min_component: int | None = None,
    presence: str | None = None,
    min_volume_share: float | None = None,
) -> list[dict]:
    """Writes the files of the module docstring into `out`; returns the predictions.jsonl rows.

    tta, min_component, presence, min_volume_share: as `evaluate`'s (None:
    the run's `eval.*`); the volume rule treats each case as one volume."""
    from tqdm import tqdm

    workdir, out = Path(workdir), Path(out)
    if samples < 0:
        raise DlvaeError(f"--samples must be at least 0, got {samples}")
    cases = imageio.collect_cases(inputs)
    predictor = inference.load_predictor(workdir, checkpoint)
    if samples and not getattr(predictor, "can_sample", True):
        raise DlvaeError(f"--samples: the {predictor.config.model.name} model in {workdir} is deterministic "
                         "(no latent to sample), so every sample would be the same prediction; drop --samples")
    rows: list[dict] = []
    _check_out(out, workdir)
    with output_folder(out, "predict", overwrite=overwrite, inputs=list(inputs)) as tmp:
        # After the output folder's checks, so a refused --out is refused before the model is used.
        _, min_component, presence, share = inference.prediction_settings(predictor, workdir, tta, min_component,
                                                                           presence, min_volume_share)
        channels = model_channels(predictor.config)
        bar = tqdm(total=sum(c.n_slices for c in cases), desc="predict",
                   unit="slice", disable=not progress, file=sys.stderr)
        done = 0
        head_means, head_shares = [], []
        for case in cases:
            folder = tmp / case.name
            folder.mkdir(exist_ok=True)
            volumes = _Volumes(case)
            parts = []  # the case's batches, predicted; decided once the whole case is in
            for names, images, flair in _batches(case, BATCH_SIZE, channels):
                m, sh = shift.slice_means(flair)
                head_means.append(m)
                head_shares.append(sh)
                result = predictor(images)
                mean = None
                if samples:
                    # The count of slices before this batch joins the seed so each batch draws fresh noise.
                    mean = np.asarray(predictor.sample_mean(images, samples, seed + done), np.float32)
                    if mean.shape != flair.shape:
                        raise DlvaeError(f"predictor.sample_mean returned {mean.shape}, expected {flair.shape}")
                parts.append((names, images, flair, result, mean))
                done += len(names)
                bar.update(len(names))
            for (names, images, flair, result, mean), (masks, labels) in zip(
                    parts, _decide_case(case, parts, min_component, presence, share)):
                tumor_prob = np.asarray(result["tumor_prob_B"], np.float32).reshape(-1)
                prob = np.asarray(result["prob_BxHxW"], np.float32)
                for j, (source, stem) in enumerate(names):
                    mask = masks[j].astype(np.uint8)
                    (folder / f"{stem}_mask.tif").write_bytes(_tiff_bytes(mask * 255))
                    np.save(folder / f"{stem}_prob.npy", prob[j])
                    save_png(folder / f"{stem}_overlay.png", overlay_rgb(flair[j], masks[j]))
                    row = {
                        "input": source,
                        "case": case.name,
                        "output": f"{case.name}/{stem}",
                        "tumor_prob": float(tumor_prob[j]),
                        "tumor": bool(labels[j]),
                        "mask_pixels": int(masks[j].sum()),
                        "height": int(flair.shape[1]),
                        "width": int(flair.shape[2]),
                    }
                    if mean is not None:
                        entropy = predictive_entropy(mean[j])
                        np.save(folder / f"{stem}_mean.npy", mean[j])
                        np.save(folder / f"{stem}_entropy.npy", entropy)
                        save_map(folder / f"{stem}_mean.png", mean[j], cmap="gray", vmin=0.0, vmax=1.0,
                                 label="mean tumor probability", title=f"{stem}: mean of {samples} samples")
                        save_map(folder / f"{stem}_entropy.png", entropy, cmap="magma", vmin=0.0, vmax=1.0,
                                 label="predictive entropy (bits)", title=f"{stem}: uncertainty, {samples} samples")
                        row["mean_mask_pixels"] = int((mean[j] >= 0.5).sum())
                        row["entropy_mean_bits"] = float(entropy.mean())
                        volumes.add(mean=mean[j])
                    else:
                        entropy = predictive_entropy(prob[j])
                    volumes.add(mask=mask, prob=prob[j], entropy=np.asarray(entropy, np.float32))
                    if case.kind == "slices":  # the model's input, so the volume can be predicted again
                        volumes.add(image=images[j])
                    rows.append(row)
            volumes.write(folder)
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
