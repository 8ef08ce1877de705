"""Recipe choices judged by cross-validation: one setting against another, paired per patient.

Each input is a `vae_effect.json` written by `experiments/vae_effect.py`
(its --out), run with the same --folds and --seed (so the same folds) and
different --set overrides, and an arm in it, written ``FILE:ARM``. The first
input is the reference. For every other input, every patient held out by
the folds (each scored once, by the fold's model that never saw it) gives a
pair of Dice per volume; the table reports mean (sd) and median Dice per
volume, slice accuracy, and the paired difference with its bootstrap 95%
interval and Wilcoxon p (`vae_effect.paired_stats`). Nothing here looks at
data outside the folds, so a setting chosen from this table is chosen by
cross-validation over patients.

An input may also be a `volume_rule.json` written by
`experiments/volume_rule.py` into the same folder as its `vae_effect.json`:
its patients then carry their nested figures with the 3D component rule (the
share picked on the other folds), and the folds, steps and command come from
that `vae_effect.json`. Inputs trained for different step counts are refused
unless `--steps-vary` says the comparison is about the steps. Inputs whose
folds held back different numbers of validation patients (`--val-patients`)
are labelled with that number.

    python experiments/vae_effect.py --data-dir ../shared/data/lgg/kaggle_3m --folds 3 --steps 600 \\
        --set data.image_size=64 --set data.channels=all --arms dlvae_cnn \\
        --runs workdir/channels_all --out experiments/results/channels_all
    python experiments/recipe.py experiments/results/vae_effect.json:dlvae_cnn \\
        experiments/results/channels_all/vae_effect.json:dlvae_cnn --out experiments/results --name channels
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shlex
import sys
from pathlib import Path

import numpy as np

from dlvae_jax.eval.evaluate import json_safe
from dlvae_jax.io import write_json, write_text


def _vae_effect():
    spec = importlib.util.spec_from_file_location("vae_effect", Path(__file__).with_name("vae_effect.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("inputs", nargs="+", metavar="FILE:ARM", help="vae_effect.json and arm; the first is the reference")
    p.add_argument("--out", type=Path, default=Path("experiments/results"))
    p.add_argument("--name", default="recipe", help="output names: NAME.md and NAME.json (default recipe)")
    p.add_argument("--bootstrap", type=int, default=10000, help="bootstrap draws (default 10000)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    p.add_argument("--steps-vary", action="store_true",
                   help="compare inputs trained for different step counts (the steps are the setting compared)")
    return p.parse_args(argv)


def load(spec: str) -> dict:
    """{"label", "file", "arm", "overrides", "folds_patients", "dice" {patient: float}, "slice_accuracy", ...}."""
    file, sep, arm = spec.rpartition(":")
    if not sep or not file:
        raise SystemExit(f"{spec}: expected FILE:ARM, e.g. experiments/results/vae_effect.json:dlvae_cnn")
    path = Path(file)
    if not path.is_file():
        raise SystemExit(f"{path}: no such file")
    result = json.loads(path.read_text())
    rule = None
    if "nested" in result:  # a volume_rule.json: its nested figures, the folds of the vae_effect.json beside it
        if result.get("arm") != arm:
            raise SystemExit(f"{path}: made for arm {result.get('arm')!r}, not {arm!r}")
        rule, cv_path = result, path.with_name("vae_effect.json")
        if not cv_path.is_file():
            raise SystemExit(f"{path}: no vae_effect.json beside it to give its folds and steps")
        result = json.loads(cv_path.read_text())
    if arm not in result.get("arms", {}):
        raise SystemExit(f"{path}: no arm {arm!r}; have {', '.join(sorted(result.get('arms', {})))}")
    data = result["arms"][arm]
    dice = {p: v["dice"] if isinstance(v, dict) else v for p, v in data["per_patient"].items()}
    accuracy = data.get("slice_accuracy")
    overrides = [o for o in result.get("overrides", []) if o]
    label = f"{arm} " + (" ".join(overrides) if overrides else "(defaults)")
    if rule is not None:
        dice, accuracy = rule["nested"]["per_patient"], rule["nested"]["accuracy"]
        label += f", presence {rule['presence']} + 3D rule (nested)"
        if isinstance(rule.get("runs"), list) and len(rule["runs"]) > 1:
            label += ", ensemble of " + " + ".join(rule["runs"])
    commands = [result.get("command", "")] + ([rule["command"]] if rule is not None else [])
    return {"label": label, "file": str(path), "arm": arm, "overrides": overrides,
            "folds_patients": result["folds_patients"], "steps": result.get("steps"),
            "val_patients": result.get("val_patients"), "dice": dice,
            "slice_accuracy": accuracy, "command": "\n".join(c for c in commands if c)}


def main(argv=None) -> int:
    args = parse_args(argv)
    ve = _vae_effect()
    runs = [load(s) for s in args.inputs]
    ref = runs[0]
    for run in runs[1:]:
        if [sorted(f) for f in run["folds_patients"]] != [sorted(f) for f in ref["folds_patients"]]:
            raise SystemExit(f"{run['file']}: its folds differ from {ref['file']}'s; run both with the same "
                             "--folds, --seed and data")
        if run["steps"] != ref["steps"] and not args.steps_vary:
            raise SystemExit(f"{run['file']}: {run['steps']} steps, {ref['file']}: {ref['steps']}; compare like with "
                             "like, or pass --steps-vary when the steps are the setting compared")
    if args.steps_vary:
        for run in runs:
            run["label"] += f", {run['steps']} steps"
    if len({run["val_patients"] for run in runs}) > 1:  # a different training set: the labels say so
        for run in runs:
            n_val = run["val_patients"]
            run["label"] += (", no validation patients (last checkpoint)" if n_val == 0 else
                             f", {n_val} validation patients per fold")
    patients = sorted(ref["dice"])
    rows, comparisons = [], []
    for run in runs:
        missing = [p for p in patients if p not in run["dice"] or run["dice"][p] is None]
        if missing:
            raise SystemExit(f"{run['file']}: no Dice for {len(missing)} patient(s), e.g. {missing[0]}")
        values = np.array([run["dice"][p] for p in patients], np.float64)
        rows.append({"label": run["label"], "file": run["file"], "dice": ve.summary(values),
                     "slice_accuracy": run["slice_accuracy"]})
        if run is not ref:
            base = np.array([ref["dice"][p] for p in patients], np.float64)
            comparisons.append({"label": run["label"], "against": ref["label"],
                                **ve.paired_stats(values, base, args.bootstrap, args.seed)})
    steps = sorted({r["steps"] for r in runs}, key=str)
    result = {"patients": patients, "rows": rows, "comparisons": comparisons,
              "steps": steps[0] if len(steps) == 1 else steps,
              "commands": [r["command"] for r in runs],
              "command": "python experiments/recipe.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))}
    lines = [f"# Recipe choices by {len(ref['folds_patients'])}-fold cross-validation over patients", "",
             f"Every one of the {len(patients)} patients scored once, as test, by the fold's model that never saw "
             f"it; {f'{steps[0]} steps' if len(steps) == 1 else 'the steps in each label'} per fold. Made by:", "", "```", result["command"], "```", "",
             "from these cross-validation runs:", "", "```", *[c for c in result["commands"] if c], "```", "",
             f"| setting | Dice per volume, mean (sd), n = {len(patients)} | median | slice accuracy |",
             "|---|---|---|---|"]
    for row in rows:
        d = row["dice"]
        acc = "n/a" if row["slice_accuracy"] is None else f"{row['slice_accuracy']:.3f}"
        lines.append(f"| {row['label']} | {d['mean']:.3f} ({d['sd']:.3f}) | {d['median']:.3f} | {acc} |")
    lines += ["", "| paired per patient | mean difference | 95% interval (bootstrap) | Wilcoxon p | better / worse |",
              "|---|---|---|---|---|"]
    for c in comparisons:
        lines.append(f"| {c['label']} minus {c['against']} | {c['mean_diff']:+.3f} | {c['ci95'][0]:+.3f} to "
                     f"{c['ci95'][1]:+.3f} | {ve._fmt_p(c['wilcoxon_p'])} | {c['wins']} / {c['losses']} |")
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / f"{args.name}.json", json_safe(result))
    write_text(args.out / f"{args.name}.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
