"""What a training resolution costs before any learning: the score of a perfect model at that size.

Training resizes every mask to `data.image_size` (linear with antialiasing, then > 0.5, as
`train.step.prepare_inputs` does), and every metric is computed after the model's probabilities are
resized back to the data's size (linear, then > 0.5, as `eval.inference` does). Passing the true masks
through both resizes gives the Dice per volume and slice accuracy of a model that is exactly right at the
training size: the ceiling that resolution alone puts on the figures. Nothing is trained.

    python experiments/resolution_ceiling.py --data-dir ../shared/data/lgg/kaggle_3m --out experiments/results
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

import numpy as np


def round_trip(masks_NxHxW: np.ndarray, size: int, chunk: int = 256) -> np.ndarray:
    """Masks resized to size x size as training resizes them, and back as inference resizes predictions."""
    import jax.numpy as jnp

    from dlvae_jax.train.step import mask_to_model_size, prob_to_data_size

    n, h, w = masks_NxHxW.shape
    out = []
    for start in range(0, n, chunk):
        small = mask_to_model_size(jnp.asarray(masks_NxHxW[start:start + chunk]), size)
        out.append(np.asarray(prob_to_data_size(small.astype(jnp.float32), h, w) > 0.5))
    return np.concatenate(out)


def _sizes(text: str) -> list[int]:
    try:
        sizes = [int(s) for s in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated integers, e.g. 64,128") from None
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: sizes must be positive")
    return sizes


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", type=Path, required=True, help="LGG data in the kaggle_3m layout")
    p.add_argument("--sizes", type=_sizes, default="64,96,128",
                   help="comma-separated training sizes (default 64,96,128)")
    p.add_argument("--out", type=Path, default=Path("experiments/results"))
    args = p.parse_args(argv)

    from dlvae_jax.data import lgg
    from dlvae_jax.errors import DlvaeError
    from dlvae_jax.eval.evaluate import json_safe
    from dlvae_jax.io import write_json, write_text
    from dlvae_jax.metrics import dice_per_volume

    try:
        index = lgg.scan(args.data_dir)
    except DlvaeError as e:
        p.error(f"--data-dir {e}")
    _, masks = lgg.load_arrays(index.records, "flair")
    patients = [r.patient for r in index.records]
    truth = masks.astype(bool)
    present = truth.any(axis=(1, 2))
    rows = []
    for size in args.sizes:
        pred = round_trip(masks, size)
        dice = np.array(list(dice_per_volume(pred, truth, patients).values()))
        rows.append({"size": size, "n_patients": len(dice), "n_slices": len(truth),
                     "dice_volume_mean": float(dice.mean()), "dice_volume_sd": float(dice.std(ddof=1)),
                     "dice_volume_min": float(dice.min()),
                     "slice_accuracy": float(np.mean(pred.any(axis=(1, 2)) == present)),
                     "tumor_slices_lost": int(np.sum(present & ~pred.any(axis=(1, 2))))})
        print(f"{size}x{size}: Dice per volume {rows[-1]['dice_volume_mean']:.4f} "
              f"(sd {rows[-1]['dice_volume_sd']:.4f}, min {rows[-1]['dice_volume_min']:.4f}, n = {len(dice)}), "
              f"slice accuracy {rows[-1]['slice_accuracy']:.4f}", file=sys.stderr)
    command = "python experiments/resolution_ceiling.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    h, w = truth.shape[1:]
    lines = [
        "# What the training resolution costs a perfect model", "",
        f"The true masks ({h}x{w}) resized to the training size and back, as training and inference resize "
        "them; no model. Made by:", "", "```", command, "```", "",
        f"| training size | Dice per volume, mean (sd), n = {rows[0]['n_patients']} | min | slice accuracy "
        f"(n = {rows[0]['n_slices']}) | tumor slices lost |",
        "|---|---|---|---|---|",
    ]
    lines += [f"| {r['size']}x{r['size']} | {r['dice_volume_mean']:.3f} ({r['dice_volume_sd']:.3f}) | "
              f"{r['dice_volume_min']:.3f} | {r['slice_accuracy']:.3f} | {r['tumor_slices_lost']} |" for r in rows]
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "resolution_ceiling.json", json_safe({"command": command, "rows": rows}))
    write_text(args.out / "resolution_ceiling.md", "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
