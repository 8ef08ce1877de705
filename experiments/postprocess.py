"""Inference settings chosen on validation folds: presence rule, flip TTA and the minimum tumor component.

For every fold of `experiments/vae_effect.py` (its --runs folder) and every
trained arm, the fold's model predicts its validation patients (the ones
that picked its checkpoint) and its test patients once without and once with
flip test-time augmentation; each candidate minimum component size is then
applied to both, under each presence rule (`dlvae_jax.metrics.decide`). The
setting chosen for an arm is the one with the highest mean validation Dice
per volume plus slice accuracy over all folds' validation patients; only
then are the test patients looked at, to report the chosen setting against
the default (class head, no TTA, no removal), paired per patient, on every
patient (each scored once, by the fold that held it out).

    python experiments/postprocess.py --runs workdir/cv_recipe --arms dlvae_cnn --out experiments/results/cv_recipe
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
PRESENCE = ("class", "mask")


def _vae_effect():
    spec = importlib.util.spec_from_file_location("vae_effect", Path(__file__).with_name("vae_effect.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def predictions(workdir: Path, split: str, batch_size: int = 32, tta: bool = True) -> dict:
    """Per slice of the split: probabilities without and (with `tta`) with TTA, truth, patient, and the
    run's eval.min_component."""
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
        if tta:
            predictor.tta = True
            out["tta"].append(predictor(images))
        out["truth"].append(truth.astype(bool))
    cat = lambda parts: {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    return {"single": cat(out["single"]), "tta": cat(out["tta"]) if tta else None,
            "truth": np.concatenate(out["truth"]), "patients": out["patients"],
            "min_component": int(predictor.min_component)}


def score(pred: dict, presence: str, use_tta: bool, min_size: int) -> tuple[dict[str, float], np.ndarray]:
    """Dice per patient volume, and per slice whether its tumor / no-tumor call is right."""
    from dlvae_jax.metrics import decide, dice_per_volume

    out = pred["tta" if use_tta else "single"]
    truth = pred["truth"]
    masks, labels = decide(out, len(truth), truth.shape[1:], min_size, presence)
    return dice_per_volume(masks, truth, pred["patients"]), labels == truth.any(axis=(1, 2))


def _table(r: dict, what: str) -> list[str]:
    lines = ["| presence | TTA | " + " | ".join(f"min {m}" for m in MIN_SIZES) + " |",
             "|---|---|" + "---|" * len(MIN_SIZES)]
    for presence in PRESENCE:
        for t in (False, True):
            lines.append(f"| {presence} | {'flips' if t else 'none'} | " + " | ".join(
                f"{r[what][_key(presence, t, m)]:.3f}" for m in MIN_SIZES) + " |")
    return lines


def _key(presence: str, tta: bool, min_size: int) -> str:
    return f"presence={presence} tta={tta} min={min_size}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Presence rule, flip TTA and minimum component size, chosen on "
                                            "validation folds.")
    p.add_argument("--runs", type=Path, default=Path("workdir/vae_effect"), help="vae_effect.py --runs folder")
    p.add_argument("--arms", default="dlvae_cnn,no_vae,unet")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    p.add_argument("--out", type=Path, default=Path("experiments/results"))
    args = p.parse_args(argv)
    if not any(args.runs.glob("fold*/*/config.json")):
        p.error(f"--runs {args.runs}: no fold*/<arm> runs (run experiments/vae_effect.py first)")
    ve = _vae_effect()
    candidates = list(itertools.product(PRESENCE, (False, True), MIN_SIZES))
    default = ("class", False, 0)
    result = {"command": "python " + " ".join(shlex.quote(a) for a in sys.argv), "arms": {}}
    for arm in [a.strip() for a in args.arms.split(",") if a.strip()]:
        folds = sorted(d for d in args.runs.glob(f"fold*/{arm}") if (d / "config.json").exists())
        if not folds:
            continue
        val = {c: ({}, []) for c in candidates}
        test = {c: ({}, []) for c in candidates}
        test_area = []  # tumor pixels of every test slice, in the order of the accuracy arrays
        for wd in folds:
            pv, pt = predictions(wd, "validation"), predictions(wd, "test")
            fold = wd.parent.name
            test_area.append(pt["truth"].sum(axis=(1, 2)))
            for c in candidates:
                # A patient may validate several folds' models: each (fold, patient) counts once.
                d, ok = score(pv, *c)
                val[c][0].update({(fold, q): v for q, v in d.items()})
                val[c][1].append(ok)
                d, ok = score(pt, *c)
                test[c][0].update(d)
                test[c][1].append(ok)
            print(f"{arm} {fold}: predicted", flush=True)
        dice = lambda r, c: float(np.mean(list(r[c][0].values())))
        accuracy = lambda r, c: float(np.mean(np.concatenate(r[c][1])))
        # Both targets count: mean Dice per volume plus slice accuracy; ties go to the simpler setting.
        chosen = max(candidates, key=lambda c: (dice(val, c) + accuracy(val, c), c[0] == "class", -c[2], not c[1]))
        patients = sorted(test[default][0])
        a = np.array([test[chosen][0][q] for q in patients])
        b = np.array([test[default][0][q] for q in patients])
        area, right = np.concatenate(test_area), np.concatenate(test[chosen][1])
        missed, found = area[(area > 0) & ~right], area[(area > 0) & right]
        result["arms"][arm] = {
            "validation_patients": len({q for _, q in val[default][0]}),
            "validation_fold_patient_pairs": len(val[default][0]),
            "validation_slices": int(sum(len(x) for x in val[default][1])),
            "validation_dice": {_key(*c): dice(val, c) for c in candidates},
            "validation_accuracy": {_key(*c): accuracy(val, c) for c in candidates},
            "chosen": {"presence": chosen[0], "tta": chosen[1], "min_component": chosen[2]},
            "test_n": len(patients), "test_slices": int(sum(len(x) for x in test[default][1])),
            "test_default_mean": float(b.mean()), "test_chosen_mean": float(a.mean()),
            "test_default_sd": float(b.std(ddof=min(1, len(b) - 1))),
            "test_chosen_sd": float(a.std(ddof=min(1, len(a) - 1))),
            "test_default_accuracy": accuracy(test, default), "test_chosen_accuracy": accuracy(test, chosen),
            "test_chosen_minus_default": ve.paired_stats(a, b, 10000, args.seed) if chosen != default else None,
            # Where the chosen setting's slice calls go wrong on the test folds, and how large the missed tumors are.
            "test_chosen_errors": {
                "missed_tumor_slices": int(missed.size), "false_tumor_slices": int(np.sum((area == 0) & ~right)),
                "tumor_slices": int(np.sum(area > 0)),
                "missed_area_quartiles": np.percentile(missed, [25, 50, 75]).tolist() if missed.size else None,
                "found_area_median": float(np.median(found)) if found.size else None},
        }
        print(f"{arm}: chosen presence={chosen[0]} tta={chosen[1]} min_component={chosen[2]} (validation Dice "
              f"{dice(val, chosen):.3f} vs {dice(val, default):.3f}, accuracy {accuracy(val, chosen):.3f} vs "
              f"{accuracy(val, default):.3f}); test Dice {a.mean():.3f} vs {b.mean():.3f} over {len(patients)}, "
              f"accuracy {accuracy(test, chosen):.3f} vs {accuracy(test, default):.3f}", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "postprocess.json", json_safe(result))
    lines = ["# Presence rule, flip TTA and the minimum tumor component, chosen on validation folds", "",
             "Made by:", "", "```", result["command"], "```", "",
             "The fold models of the --runs folder (one per fold and arm). Each setting is scored on the validation "
             "patients of every fold (those that picked the fold's checkpoint); the setting with the highest mean "
             "validation Dice per volume plus validation slice accuracy is chosen, then applied once to the test "
             "patients. Presence: `class`, the class head calls a slice tumor (its mask is emptied otherwise); "
             "`mask`, a non-empty mask does. Minimum component sizes are pixels at 256x256. The same validation "
             "patients picked each fold's checkpoint (under the run's own rule), so validation figures are "
             "optimistic for every setting.", ""]
    for arm, r in result["arms"].items():
        c = r["chosen"]
        lines += [f"## {arm}", "", f"Validation Dice per volume, mean over {r['validation_fold_patient_pairs']} "
                  f"(fold, patient) pairs ({r['validation_patients']} patients):", "", *_table(r, "validation_dice"),
                  "", f"Validation slice accuracy ({r['validation_slices']} slices):", "",
                  *_table(r, "validation_accuracy"), "",
                  f"Chosen: presence {c['presence']}, TTA {'on' if c['tta'] else 'off'}, min_component "
                  f"{c['min_component']}. Test ({r['test_n']} patients, {r['test_slices']} slices): Dice per volume "
                  f"{r['test_chosen_mean']:.3f} (sd {r['test_chosen_sd']:.3f}) against {r['test_default_mean']:.3f} "
                  f"(sd {r['test_default_sd']:.3f}) with the default (class, no TTA, no removal); slice accuracy "
                  f"{r['test_chosen_accuracy']:.3f} against {r['test_default_accuracy']:.3f}."]
        s = r["test_chosen_minus_default"]
        if s:
            lines.append(f"Paired Dice, chosen minus default: {s['mean_diff']:+.3f} (95% CI {s['ci95'][0]:+.3f} to "
                         f"{s['ci95'][1]:+.3f}), better on {s['wins']}, worse on {s['losses']}, Wilcoxon p "
                         f"{s['wilcoxon_p']:.2g}.")
        e = r["test_chosen_errors"]
        if e["missed_area_quartiles"] is not None:
            q = e["missed_area_quartiles"]
            lines.append(f"Slice calls of the chosen setting on the test folds: {e['missed_tumor_slices']} of "
                         f"{e['tumor_slices']} tumor slices missed, {e['false_tumor_slices']} slices without tumor "
                         f"called tumor. The missed tumors cover {q[1]:.0f} pixels at the median (quartiles "
                         f"{q[0]:.0f}-{q[2]:.0f}, at the data's size), the found ones {e['found_area_median']:.0f}.")
        lines.append("")
    write_text(args.out / "postprocess.md", "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
