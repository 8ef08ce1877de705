"""The 3D component rule (`eval.min_volume_share`) chosen by cross-validation over patients.

For every fold of `experiments/vae_effect.py` (its --runs folder) the fold's
model predicts its test patients once: these out-of-fold predictions score
every patient once, by a model that never saw it. Each candidate share S
(a patient's 3D tumor components under S times its largest are removed,
`dlvae_jax.metrics.remove_small_volume_components`; 0 is no removal, 1 the
largest only, nnU-Net's rule) is applied to all of them.

Two figures per share come out, and they answer different questions:

* *chosen on all folds*: the share with the highest mean Dice per volume plus
  slice accuracy over all out-of-fold patients, as nnU-Net picks its
  post-processing; this is the value a final model trained on every patient
  uses, and its own figure is optimistic (it is picked on the patients it
  is scored on);
* *nested*: for each fold, the share is picked on the other folds' patients
  only and applied to the held-out fold, so no patient's figure steered its
  own share. This is the estimate of the rule on patients it never saw, and
  it is paired per patient against no removal.

    python experiments/volume_rule.py --runs workdir/cv_missing --arm dlvae_cnn --out experiments/results/cv_missing

Several --runs folders made with the same folds score an ensemble: each fold's
models (one per folder, none of which saw the fold's test patients) have
their tumor probabilities averaged per pixel and per slice before the rule.
"""

from __future__ import annotations

import argparse
import importlib.util
import shlex
import sys
from pathlib import Path

import numpy as np

from dlvae_jax.eval.evaluate import json_safe
from dlvae_jax.io import write_json, write_text

SHARES = (0.0, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)


def _vae_effect():
    spec = importlib.util.spec_from_file_location("vae_effect", Path(__file__).with_name("vae_effect.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def predict_fold(workdir: Path, split: str = "test") -> tuple[dict, int]:
    """One fold's single-pass predictions of a split (`postprocess.predictions`), grouped by patient
    (slices in order), {patient: (prob float32 [D, H, W], tumor_prob [D], truth bool [D, H, W])}, and the
    run's eval.min_component."""
    spec = importlib.util.spec_from_file_location("postprocess", Path(__file__).with_name("postprocess.py"))
    postprocess = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(postprocess)
    pred = postprocess.predictions(workdir, split, tta=False)
    prob = np.asarray(pred["single"]["prob_BxHxW"], np.float32)
    tumor_prob = np.asarray(pred["single"]["tumor_prob_B"], np.float32).reshape(-1)
    truth, ids = pred["truth"], np.array(pred["patients"])
    return ({q: (prob[ids == q], tumor_prob[ids == q], truth[ids == q]) for q in sorted(set(ids))},
            pred["min_component"])


def average_predictions(members: list[dict]) -> dict:
    """The ensemble of several models' `predict_fold` outputs for the same patients: per-pixel and per-slice
    tumor probabilities averaged; refuses members that disagree on the patients or their truth."""
    first = members[0]
    for m in members[1:]:
        if sorted(m) != sorted(first):
            raise SystemExit("volume_rule: the --runs folders predict different test patients; make them with "
                             "the same --folds and --seed")
        for q in first:
            if not np.array_equal(m[q][2], first[q][2]):
                raise SystemExit(f"volume_rule: patient {q}: the --runs folders disagree on its slices or masks")
    return {q: (np.mean([m[q][0] for m in members], axis=0), np.mean([m[q][1] for m in members], axis=0),
                first[q][2]) for q in first}


def score_patient(pred: tuple, share: float, presence: str, min_component: int = 0,
                  return_masks: bool = False) -> tuple:
    """(Dice of the patient's volume, per slice whether its tumor call is right), and with `return_masks` the
    decided masks bool [D, H, W] as a third item."""
    from dlvae_jax.metrics import decide

    prob, tumor_prob, truth = pred
    masks, labels = decide({"prob_BxHxW": prob, "tumor_prob_B": tumor_prob}, len(prob), prob.shape[1:],
                           min_component, presence, share)
    total = masks.sum() + truth.sum()
    dice = 1.0 if total == 0 else 2.0 * float((masks & truth).sum()) / float(total)
    right = labels == truth.any(axis=(1, 2))
    return (dice, right, masks) if return_masks else (dice, right)


def _pick(scores: dict, folds: list[str]) -> float:
    """The share with the highest mean Dice per volume plus slice accuracy over `folds`; ties: the smaller share."""
    def crit(s):
        dice = np.mean([d for f in folds for d in scores[f][s]["dice"].values()])
        acc = np.mean(np.concatenate([scores[f][s]["right"] for f in folds]))
        return dice + acc
    return max(SHARES, key=lambda s: (round(crit(s), 12), -s))


def fold_runs(parser: argparse.ArgumentParser, runs: list[Path], arm: str) -> list[dict[str, Path]]:
    """Per --runs folder, {fold name: the arm's run folder}; a parser error when a folder has no trained folds
    or the folders hold different folds."""
    members = []
    for folder in runs:
        found = {d.parent.name: d for d in folder.glob(f"fold*/{arm}") if (d / "checkpoints").is_dir()}
        if not found:
            parser.error(f"--runs {folder}: no fold*/{arm} runs with checkpoints (run experiments/vae_effect.py)")
        members.append(found)
    if any(sorted(m) != sorted(members[0]) for m in members):
        parser.error("--runs: the folders hold different folds")
    return members


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="The 3D component rule (eval.min_volume_share), chosen by "
                                            "cross-validation over patients.")
    p.add_argument("--runs", type=Path, nargs="+", required=True,
                   help="vae_effect.py --runs folder; several (same folds) score the ensemble of their models")
    p.add_argument("--arm", default="dlvae_cnn")
    p.add_argument("--presence", choices=("class", "mask"), default="mask",
                   help="the slice rule the shares are applied under (default: mask, the cpu recipe's)")
    p.add_argument("--min-component", type=int, default=None, metavar="N",
                   help="2D components under N pixels removed first (default: each run's own eval.min_component)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    p.add_argument("--out", type=Path, default=Path("experiments/results"))
    p.add_argument("--name", default="volume_rule", help="file stem of the report (<name>.md, <name>.json)")
    args = p.parse_args(argv)
    members = fold_runs(p, args.runs, args.arm)
    folds = [[m[f] for m in members] for f in sorted(members[0])]
    ve = _vae_effect()
    scores: dict[str, dict] = {}
    used_min: set[int] = set()
    for wds in folds:
        fold = wds[0].parent.name
        out = [predict_fold(wd) for wd in wds]
        preds = average_predictions([o[0] for o in out])  # one member: its own predictions
        min_component = out[0][1]
        if args.min_component is not None:
            min_component = args.min_component
        used_min.add(min_component)
        scores[fold] = {}
        for s in SHARES:
            per = {q: score_patient(v, s, args.presence, min_component) for q, v in preds.items()}
            scores[fold][s] = {"dice": {q: d for q, (d, _) in per.items()},
                               "right": np.concatenate([ok for _, ok in per.values()])}
        print(f"{fold}: {len(preds)} test patients predicted", flush=True)
    names = sorted(scores)
    table = {}
    for s in SHARES:
        dice = np.array([d for f in names for d in scores[f][s]["dice"].values()])
        right = np.concatenate([scores[f][s]["right"] for f in names])
        table[s] = {"dice": ve.summary(dice), "accuracy": float(right.mean()), "slices": int(right.size),
                    "folds": {f: {"dice": float(np.mean(list(scores[f][s]["dice"].values()))),
                                  "accuracy": float(scores[f][s]["right"].mean())} for f in names}}
    chosen_all = _pick(scores, names)
    nested, nested_dice, none_dice, nested_right, per_patient = {}, [], [], [], {}
    for f in names:
        s = _pick(scores, [g for g in names if g != f]) if len(names) > 1 else 0.0
        nested[f] = s
        patients = sorted(scores[f][s]["dice"])
        nested_dice += [scores[f][s]["dice"][q] for q in patients]
        none_dice += [scores[f][0.0]["dice"][q] for q in patients]
        nested_right.append(scores[f][s]["right"])
        per_patient.update({q: scores[f][s]["dice"][q] for q in patients})
    nested_dice, none_dice = np.array(nested_dice), np.array(none_dice)
    nested_right = np.concatenate(nested_right)
    result = {
        "command": "python " + " ".join(shlex.quote(a) for a in sys.argv), "runs": [str(r) for r in args.runs],
        "arm": args.arm, "presence": args.presence, "min_component": sorted(used_min), "shares": {str(s): v for s, v in table.items()},
        "chosen_on_all_folds": chosen_all, "nested_choice": nested,
        "nested": {"dice": ve.summary(nested_dice), "accuracy": float(nested_right.mean()),
                   "slices": int(nested_right.size),
                   "minus_no_removal": ve.paired_stats(nested_dice, none_dice, 10000, args.seed),
                   "per_patient": per_patient},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / f"{args.name}.json", json_safe(result))
    n = result["nested"]
    runs_text = (f"`{args.runs[0]}`" if len(args.runs) == 1 else
                 "the ensemble of " + " and ".join(f"`{r}`" for r in args.runs) + " (probabilities averaged)")
    lines = ["# The 3D component rule, chosen by cross-validation over patients", "", "Made by:", "", "```",
             result["command"], "```", "",
             f"Out-of-fold predictions of {runs_text} ({len(names)} folds, arm `{args.arm}`, presence rule "
             f"`{args.presence}`, single passes, 2D components under "
             f"{'/'.join(str(m) for m in sorted(used_min))} pixels removed first): every patient scored once "
             "by the fold model that never saw it. "
             "A share S removes each patient's 3D tumor components (26-connected, slices stacked in order) smaller "
             "than S times its largest.", "",
             f"| share | Dice per volume, mean (sd) | median | slice accuracy | " +
             " | ".join(f"{f} Dice / accuracy" for f in names) + " |",
             "|---|---|---|---|" + "---|" * len(names)]
    for s, r in table.items():
        lines.append(f"| {s:g} | {r['dice']['mean']:.3f} ({r['dice']['sd']:.3f}) | {r['dice']['median']:.3f} | "
                     f"{r['accuracy']:.3f} | " + " | ".join(
                         f"{r['folds'][f]['dice']:.3f} / {r['folds'][f]['accuracy']:.3f}" for f in names) + " |")
    d = n["minus_no_removal"]
    lines += ["", f"n = {table[0.0]['dice']['n']} patients, {table[0.0]['slices']} slices.", "",
              f"Chosen on all folds (the value a model trained on every patient uses; its own row above is "
              f"optimistic): **{chosen_all:g}**.", "",
              "Nested (each fold's share picked on the other folds only: " +
              ", ".join(f"{f} {s:g}" for f, s in nested.items()) +
              f"): **Dice per volume {n['dice']['mean']:.3f} (sd {n['dice']['sd']:.3f}, median "
              f"{n['dice']['median']:.3f}, n = {n['dice']['n']}), slice accuracy {n['accuracy']:.3f} "
              f"({n['slices']} slices)**. Paired against no removal: {d['mean_diff']:+.3f} (bootstrap 95% CI "
              f"{d['ci95'][0]:+.3f} to {d['ci95'][1]:+.3f}), better on {d['wins']}, worse on {d['losses']}, "
              f"Wilcoxon p {d['wilcoxon_p']:.2g}.", ""]
    write_text(args.out / f"{args.name}.md", "\n".join(lines))
    print(f"chosen on all folds {chosen_all:g}; nested: Dice {n['dice']['mean']:.3f} (sd {n['dice']['sd']:.3f}, "
          f"n {n['dice']['n']}), accuracy {n['accuracy']:.3f}; against none {d['mean_diff']:+.3f} "
          f"[{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}] p {d['wilcoxon_p']:.2g}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
