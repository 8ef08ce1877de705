"""Two trained runs on the same held-out patients, paired per patient.

Both runs' models predict the patients of one split (`--split`, default test), which must be the same
patients in both (e.g. the same fold of two `experiments/vae_effect.py` cross-validations made with the same
--folds and --seed); each slice is called by one presence rule (`--presence`, as `dlvae_jax.metrics.decide`).
The table gives Dice per volume, mean (sd) and median, slice accuracy over the split's slices, and the paired
difference B minus A with its bootstrap 95% interval and Wilcoxon p (`vae_effect.paired_stats`).

    python experiments/compare_runs.py workdir/cv_missing/fold0/dlvae_cnn workdir/cv128/fold0/dlvae_cnn \\
        --presence mask --out experiments/results/cv128 --name fold0_against_64
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shlex
import sys
from pathlib import Path

import numpy as np


def _sibling(name: str):
    spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run_a", type=Path, help="the reference run's workdir")
    p.add_argument("run_b", type=Path, help="the run compared with it")
    p.add_argument("--split", default="test", choices=("train", "validation", "test"))
    p.add_argument("--presence", default="mask", choices=("class", "mask"))
    p.add_argument("--bootstrap", type=int, default=10000)
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    p.add_argument("--out", type=Path, default=Path("experiments/results"))
    p.add_argument("--name", default="compare_runs", help="output names: NAME.md and NAME.json")
    args = p.parse_args(argv)
    for run in (args.run_a, args.run_b):
        if not (run / "config.json").is_file():
            p.error(f"{run}: not a training workdir (no config.json)")
        if not (run / "splits.json").is_file():
            p.error(f"{run}: no splits.json")
    held = [sorted(json.loads((r / "splits.json").read_text())["splits"].get(args.split) or [])
            for r in (args.run_a, args.run_b)]
    if held[0] != held[1]:
        p.error(f"the runs hold out different {args.split} patients; compare the same fold of the same folds")
    if not held[0]:
        p.error(f"no {args.split} patients in {args.run_a}")

    from dlvae_jax.eval.evaluate import json_safe
    from dlvae_jax.io import write_json, write_text

    pp, ve = _sibling("postprocess"), _sibling("vae_effect")
    rows = []
    for run in (args.run_a, args.run_b):
        dice, right = pp.score(pp.predictions(run, args.split), args.presence, False, 0)
        rows.append({"run": str(run), "dice": dice, "slice_accuracy": float(np.mean(right)), "n_slices": int(right.size)})
    patients = sorted(rows[0]["dice"])
    a = np.array([rows[0]["dice"][q] for q in patients])
    b = np.array([rows[1]["dice"][q] for q in patients])
    stats = ve.paired_stats(b, a, args.bootstrap, args.seed)
    command = "python experiments/compare_runs.py " + " ".join(shlex.quote(x) for x in (argv or sys.argv[1:]))
    lines = [f"# {args.run_b} against {args.run_a}, on the same {len(patients)} {args.split} patients", "",
             "Made by:", "", "```", command, "```", "",
             f"Presence rule `{args.presence}`, no TTA, no component removal.", "",
             f"| run | Dice per volume, mean (sd), n = {len(patients)} | median | slice accuracy (n = "
             f"{rows[0]['n_slices']}) |", "|---|---|---|---|"]
    for r, v in zip(rows, (a, b)):
        lines.append(f"| {r['run']} | {v.mean():.3f} ({v.std(ddof=1):.3f}) | {np.median(v):.3f} | "
                     f"{r['slice_accuracy']:.3f} |")
    lines += ["", f"Paired, B minus A: {stats['mean_diff']:+.3f} (bootstrap 95% interval {stats['ci95'][0]:+.3f} to "
              f"{stats['ci95'][1]:+.3f}), Wilcoxon p {ve._fmt_p(stats['wilcoxon_p'])}, better on {stats['wins']} of "
              f"{len(patients)}, worse on {stats['losses']}.", "", "| patient | A | B |", "|---|---|---|"]
    lines += [f"| {q} | {x:.3f} | {y:.3f} |" for q, x, y in zip(patients, a, b)]
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / f"{args.name}.json", json_safe({"command": command, "split": args.split,
                                                          "presence": args.presence, "runs": rows,
                                                          "b_minus_a": stats}))
    write_text(args.out / f"{args.name}.md", "\n".join(lines) + "\n")
    print("\n".join(lines[:14]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
