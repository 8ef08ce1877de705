"""Do the uncertainty maps mean something? Scored on the cross-validation runs.

For every fold of `experiments/vae_effect.py` (its --runs folder), on that
fold's test patients:

  dlvae_cnn, latent samples  `evaluate --samples N`: z drawn N times from the
                             label-free posterior the CNN was trained with
  dlvae_cnn, TTA             `evaluate --tta`: the slice and its trained flips
  unet, TTA                  `evaluate --tta`: the reference

Scores (`dlvae_jax.eval.uncertainty`): AUROC of the per-pixel predictive
entropy as a detector of pixel errors, expected calibration error (ECE) and
Brier score of the mean tumor probability. Written to --out/uncertainty.md
and uncertainty.json: per fold, and the mean and spread over folds.

    python experiments/uncertainty.py --runs workdir/vae_effect --samples 8 --out experiments/results
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

import numpy as np

from dlvae_jax.eval.evaluate import json_safe
from dlvae_jax.io import write_json, write_text

def _num(x) -> str:
    return "n/a" if x is None or not np.isfinite(x) else f"{x:.3f}"


METHODS = (("dlvae_cnn", "samples"), ("dlvae_cnn", "tta"), ("unet", "tta"))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Uncertainty maps of the cross-validation runs, scored per fold.")
    p.add_argument("--runs", type=Path, default=Path("workdir/vae_effect"), help="vae_effect.py --runs folder")
    p.add_argument("--samples", type=int, default=8, help="latent draws for DL-VAE-CNN (default 8)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("experiments/results"))
    args = p.parse_args(argv)
    folds = sorted(d for d in args.runs.glob("fold*") if d.is_dir())
    if not folds:
        p.error(f"--runs {args.runs}: no fold* folders (run experiments/vae_effect.py first)")

    from dlvae_jax.eval.evaluate import evaluate

    rows = []
    for fold in folds:
        for arm, method in METHODS:
            wd = fold / arm
            if not (wd / "config.json").exists():
                continue
            report = evaluate(wd, split="test", n_overlays=0, seed=args.seed, write=False,
                              samples=args.samples if method == "samples" else 0, tta=method == "tta")
            u = report["uncertainty"]
            rows.append({"fold": fold.name, "arm": arm, "method": u["method"], "auroc_error": u["auroc_error"],
                         "ece": u["ece"], "brier": u["brier"], "n_pixels": u["n_pixels"], "n_errors": u["n_errors"],
                         "n_patients": report["n_patients"], "dice_volume_mean": report["dice_volume_mean"]})
            print(f"{fold.name} {arm} {u['method']}: AUROC {_num(u['auroc_error'])}, ECE {u['ece']:.4f}", flush=True)
    result = {"command": "python " + " ".join(shlex.quote(a) for a in sys.argv), "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "uncertainty.json", json_safe(result))

    lines = ["# Uncertainty maps: do they point at the errors?", "", "Made by:", "", "```", result["command"], "```",
             "", "Per fold of the cross-validation in `vae_effect.md` (its models, its test patients). AUROC: the "
             "per-pixel predictive entropy (bits) as a detector of wrong pixels (0.5 = chance). ECE: expected "
             "calibration error of the mean tumor probability over all pixels, 15 bins. Brier: mean squared error "
             "of that probability.", "",
             "| model | uncertainty from | folds | AUROC mean (sd) | ECE mean (sd) | Brier mean (sd) |",
             "|---|---|---|---|---|---|"]
    for arm, method in METHODS:
        sel = [r for r in rows if r["arm"] == arm and ((method == "tta") == ("flips" in r["method"]))]
        if not sel:
            continue
        stat = {k: (np.nanmean([r[k] for r in sel]), np.nanstd([r[k] for r in sel], ddof=1) if len(sel) > 1 else 0.0)
                for k in ("auroc_error", "ece", "brier")}
        lines.append(f"| {arm} | {sel[0]['method']} | {len(sel)} | {stat['auroc_error'][0]:.3f} "
                     f"({stat['auroc_error'][1]:.3f}) | {stat['ece'][0]:.4f} ({stat['ece'][1]:.4f}) | "
                     f"{stat['brier'][0]:.4f} ({stat['brier'][1]:.4f}) |")
    lines += ["", "## Per fold", "", "| fold | model | uncertainty from | test patients | pixels | wrong pixels | "
              "AUROC | ECE | Brier |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['fold']} | {r['arm']} | {r['method']} | {r['n_patients']} | {r['n_pixels']} | "
                     f"{r['n_errors']} | {_num(r['auroc_error'])} | {r['ece']:.4f} | {r['brier']:.4f} |")
    write_text(args.out / "uncertainty.md", "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
