"""Inference settings chosen on validation folds: flip TTA and the minimum tumor component.

For every fold of `experiments/vae_effect.py` (its --runs folder) and every
trained arm, the fold's model predicts its validation patients (the ones
that picked its checkpoint) and its test patients once without and once with
flip test-time augmentation; each candidate minimum component size is then
applied to both (`dlvae_jax.metrics.decide`). The setting chosen for an arm
is the one with the highest mean validation Dice per volume over all folds'
validation patients; only then are the test patients looked at, to report
the chosen setting against the default (no TTA, no removal), paired per
patient, on every patient (each scored once, by the fold that held it out).

    python experiments/postprocess.py --runs workdir/vae_effect --out experiments/results
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import shlex
import sys
from pathlib import Path

import numpy as np

from dlvae_jax.eval.evaluate import json_safe
from dlvae_jax.io import write_json, write_text

MIN_SIZES = (0, 10, 25, 50, 100, 200)


def _vae_effect():
    spec = importlib.util.spec_from_file_location("vae_effect", Path(__file__).with_name("vae_effect.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def predictions(workdir: Path, split: str, batch_size: int = 32) -> dict:
    """Per slice of the split: probabilities without and with TTA, truth, patient."""
    from dlvae_jax.data import lgg
    from dlvae_jax.eval import inference
    from dlvae_jax.eval.evaluate import default_data_dir, model_channels, select_records

    predictor = inference.load_predictor(workdir)
    index = lgg.scan(default_data_dir(predictor.config, workdir))
    records, _ = select_records(index, workdir, split)
    channels = model_channels(predictor.config)
    out = {"single": [], "tta": [], "truth": [], "patients": [r.patient for r in records]}
    for start in range(0, len(records), batch_size):
        images, truth = lgg.load_arrays(records[start:start + batch_size], channels)
        predictor.tta = False
        out["single"].append(predictor(images))
        predictor.tta = True
        out["tta"].append(predictor(images))
        out["truth"].append(truth.astype(bool))
    cat = lambda parts: {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    return {"single": cat(out["single"]), "tta": cat(out["tta"]), "truth": np.concatenate(out["truth"]),
            "patients": out["patients"]}


def dice_per_patient(pred: dict, use_tta: bool, min_size: int) -> dict[str, float]:
    from dlvae_jax.metrics import decide, dice_per_volume

    out = pred["tta" if use_tta else "single"]
    truth = pred["truth"]
    masks, _ = decide(out, len(truth), truth.shape[1:], min_size)
    return dice_per_volume(masks, truth, pred["patients"])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Flip TTA and minimum component size, chosen on validation folds.")
    p.add_argument("--runs", type=Path, default=Path("workdir/vae_effect"), help="vae_effect.py --runs folder")
    p.add_argument("--arms", default="dlvae_cnn,no_vae,unet")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    p.add_argument("--out", type=Path, default=Path("experiments/results"))
    args = p.parse_args(argv)
    if not any(args.runs.glob("fold*/*/config.json")):
        p.error(f"--runs {args.runs}: no fold*/<arm> runs (run experiments/vae_effect.py first)")
    ve = _vae_effect()
    candidates = list(itertools.product((False, True), MIN_SIZES))
    result = {"command": "python " + " ".join(shlex.quote(a) for a in sys.argv), "arms": {}}
    for arm in [a.strip() for a in args.arms.split(",") if a.strip()]:
        folds = sorted(d for d in args.runs.glob(f"fold*/{arm}") if (d / "config.json").exists())
        if not folds:
            continue
        val = {c: {} for c in candidates}
        test = {c: {} for c in candidates}
        for wd in folds:
            pv, pt = predictions(wd, "validation"), predictions(wd, "test")
            fold = wd.parent.name
            for c in candidates:
                # A patient may validate several folds' models: each (fold, patient) counts once.
                val[c].update({(fold, q): d for q, d in dice_per_patient(pv, *c).items()})
                test[c].update(dice_per_patient(pt, *c))
            print(f"{arm} {wd.parent.name}: predicted", flush=True)
        val_mean = {c: float(np.mean(list(val[c].values()))) for c in candidates}
        chosen = max(candidates, key=lambda c: (val_mean[c], -c[1], not c[0]))  # ties: the simpler setting
        default = (False, 0)
        patients = sorted(test[default])
        a = np.array([test[chosen][q] for q in patients])
        b = np.array([test[default][q] for q in patients])
        result["arms"][arm] = {
            "validation_patients": len({q for _, q in val[default]}),
            "validation_fold_patient_pairs": len(val[default]),
            "validation_dice": {f"tta={t} min={m}": val_mean[(t, m)] for t, m in candidates},
            "chosen": {"tta": chosen[0], "min_component": chosen[1]},
            "test_n": len(patients),
            "test_default_mean": float(b.mean()), "test_chosen_mean": float(a.mean()),
            "test_chosen_minus_default": ve.paired_stats(a, b, 10000, args.seed) if chosen != default else None,
        }
        print(f"{arm}: chosen tta={chosen[0]} min_component={chosen[1]} (validation Dice {val_mean[chosen]:.3f} "
              f"vs {val_mean[default]:.3f}); test {a.mean():.3f} vs {b.mean():.3f} over {len(patients)}", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "postprocess.json", json_safe(result))
    lines = ["# Flip TTA and the minimum tumor component, chosen on validation folds", "", "Made by:", "", "```",
             result["command"], "```", "",
             "The models of `vae_effect.md` (one per fold and arm). Each setting is scored on the validation "
             "patients of every fold (those that picked the fold's checkpoint); the best mean validation Dice per "
             "volume is chosen, then applied once to the test patients. Minimum component sizes are pixels at "
             "256x256.", ""]
    for arm, r in result["arms"].items():
        lines += [f"## {arm}", "", f"Validation Dice per volume, mean over {r['validation_fold_patient_pairs']} "
                  f"(fold, patient) pairs ({r['validation_patients']} patients):", "",
                  "| TTA | " + " | ".join(f"min {m}" for m in MIN_SIZES) + " |",
                  "|---|" + "---|" * len(MIN_SIZES)]
        for t in (False, True):
            lines.append(f"| {'flips' if t else 'none'} | "
                         + " | ".join(f"{r['validation_dice'][f'tta={t} min={m}']:.3f}" for m in MIN_SIZES) + " |")
        c = r["chosen"]
        lines += ["", f"Chosen: TTA {'on' if c['tta'] else 'off'}, min_component {c['min_component']}. Test "
                      f"({r['test_n']} patients): {r['test_chosen_mean']:.3f} against {r['test_default_mean']:.3f} "
                      "with the default."]
        s = r["test_chosen_minus_default"]
        if s:
            lines.append(f"Paired, chosen minus default: {s['mean_diff']:+.3f} (95% CI {s['ci95'][0]:+.3f} to "
                         f"{s['ci95'][1]:+.3f}), better on {s['wins']}, worse on {s['losses']}, Wilcoxon p "
                         f"{s['wilcoxon_p']:.2g}.")
        lines.append("")
    write_text(args.out / "postprocess.md", "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
