"""Post-processing of the pixel probabilities beyond the 3D component rule, searched by cross-validation.

On the out-of-fold predictions of `experiments/vae_effect.py` runs (as
`volume_rule.py` makes them: every patient predicted once, by the fold model
that never saw it), each candidate transform of a patient's stacked
probabilities [D, H, W] is combined with every share of the 3D component rule
(`volume_rule.SHARES`) and scored under the mask presence rule:

* ``threshold:T``: a pixel is tumor when its probability is >= T (0.5 is
  what `evaluate` does);
* ``hysteresis:L``: pixels >= 0.5 seed, and every 26-connected region of
  pixels >= L that holds a seed is kept (3D hysteresis: a tumor's faint edge
  slices join it when they touch it);
* ``smooth:A``: each slice's probabilities mixed with its neighbours',
  (1 - 2A) p[z] + A (p[z - 1] + p[z + 1]), edge slices repeated, then 0.5;
* ``fill``: the 0.5 mask with the holes of each slice filled.

The search's question is whether any of them lifts patients the choice never
saw. Its figure is *nested*: for each fold, the candidate and share are picked
(highest mean Dice per volume plus slice accuracy) on the other folds only,
then applied to the held-out fold; it is paired per patient against the same
nested pick over the shares alone (``threshold:0.5``, today's rule).

    python experiments/postprocess_search.py --runs workdir/cv_noval --out experiments/results/cv_noval
"""

from __future__ import annotations

import argparse
import importlib.util
import shlex
import sys
from pathlib import Path

import numpy as np
from scipy import ndimage

from dlvae_jax.eval.evaluate import json_safe
from dlvae_jax.io import write_json, write_text

CANDIDATES = ("threshold:0.5", "threshold:0.3", "threshold:0.4", "threshold:0.6", "hysteresis:0.2",
              "hysteresis:0.3", "hysteresis:0.4", "smooth:0.1", "smooth:0.2", "fill")
BASELINE = "threshold:0.5"


def _module(name: str):
    spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def transform(prob_DxHxW: np.ndarray, candidate: str) -> np.ndarray:
    """A patient's probabilities turned into a map that `metrics.decide` thresholds at 0.5 as the candidate
    says: float32 [D, H, W] (probabilities for "smooth", 0 / 1 otherwise)."""
    kind, _, arg = candidate.partition(":")
    prob = np.asarray(prob_DxHxW, np.float32)
    if kind == "threshold":
        return (prob >= float(arg)).astype(np.float32)
    if kind == "hysteresis":
        labels, n = ndimage.label(prob >= float(arg), np.ones((3, 3, 3), bool))
        keep = np.zeros(n + 1, bool)
        keep[np.unique(labels[prob >= 0.5])] = True
        keep[0] = False
        return keep[labels].astype(np.float32)
    if kind == "smooth":
        a = float(arg)
        before = np.concatenate([prob[:1], prob[:-1]])
        after = np.concatenate([prob[1:], prob[-1:]])
        return (1.0 - 2.0 * a) * prob + a * (before + after)
    if kind == "fill":
        return np.stack([ndimage.binary_fill_holes(s) for s in prob >= 0.5]).astype(np.float32)
    raise ValueError(f"unknown candidate {candidate!r}")


def error_breakdown(masks_DxHxW: np.ndarray, truth_DxHxW: np.ndarray) -> dict:
    """Where one patient's decided masks err: voxel counts of true positives, false positives and false
    negatives, the false negatives on tumor slices where nothing was predicted, the number of such missed
    slices and how many of them lie within one slice of either end of the true tumor's slice range."""
    tumor_slices = np.flatnonzero(truth_DxHxW.any(axis=(1, 2)))
    missed = [z for z in tumor_slices if not masks_DxHxW[z].any()]
    return {
        "tp": int((masks_DxHxW & truth_DxHxW).sum()), "fp": int((masks_DxHxW & ~truth_DxHxW).sum()),
        "fn": int((~masks_DxHxW & truth_DxHxW).sum()),
        "fn_on_missed_slices": int(sum(truth_DxHxW[z].sum() for z in missed)),
        "missed_slices": len(missed),
        "missed_at_ends": int(sum(min(z - tumor_slices[0], tumor_slices[-1] - z) <= 1 for z in missed)),
    }


def pick(scores: dict, folds: list[str], keys: list) -> tuple:
    """The (candidate, share) of `keys` with the highest mean Dice per volume plus slice accuracy over `folds`;
    ties go to the earlier key."""
    def crit(k):
        dice = np.mean([d for f in folds for d in scores[f][k]["dice"].values()])
        return round(dice + np.mean(np.concatenate([scores[f][k]["right"] for f in folds])), 12)
    best = max(crit(k) for k in keys)
    return next(k for k in keys if crit(k) == best)


def nested(scores: dict, keys: list) -> tuple[dict, dict, np.ndarray]:
    """({fold: key picked on the other folds}, {patient: Dice}, per-slice rightness) of the nested estimate."""
    names = sorted(scores)
    picks, dice, right = {}, {}, []
    for f in names:
        k = pick(scores, [g for g in names if g != f] or [f], keys)
        picks[f] = k
        dice.update(scores[f][k]["dice"])
        right.append(scores[f][k]["right"])
    return picks, dice, np.concatenate(right)


def rows_dice(scores: dict, folds: list[str], key: tuple) -> dict:
    """{patient: Dice} of one (candidate, share) over `folds`."""
    return {q: d for f in folds for q, d in scores[f][key]["dice"].items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Post-processing candidates (threshold, 3D hysteresis, inter-slice "
                                            "smoothing, hole filling) x the 3D component rule, nested CV.")
    p.add_argument("--runs", type=Path, nargs="+", required=True,
                   help="vae_effect.py --runs folder; several (same folds) score the ensemble of their models")
    p.add_argument("--arm", default="dlvae_cnn")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    p.add_argument("--out", type=Path, default=Path("experiments/results"))
    p.add_argument("--name", default="postprocess_search", help="file stem of the report")
    args = p.parse_args(argv)
    vr, ve = _module("volume_rule"), _module("vae_effect")
    members = vr.fold_runs(p, args.runs, args.arm)
    keys = [(c, s) for c in CANDIDATES for s in vr.SHARES]
    scores: dict[str, dict] = {}
    for fold in sorted(members[0]):
        preds = vr.average_predictions([vr.predict_fold(m[fold])[0] for m in members])
        scores[fold] = {}
        for c in CANDIDATES:
            maps = {q: (transform(prob, c), tp, truth) for q, (prob, tp, truth) in preds.items()}
            for s in vr.SHARES:
                per = {q: vr.score_patient(v, s, "mask", return_masks=True) for q, v in maps.items()}
                scores[fold][(c, s)] = {"dice": {q: r[0] for q, r in per.items()},
                                        "right": np.concatenate([r[1] for r in per.values()])}
                if c == BASELINE:
                    scores[fold][(c, s)]["errors"] = {q: error_breakdown(r[2], maps[q][2]) for q, r in per.items()}
        print(f"{fold}: {len(preds)} test patients scored", flush=True)
    names = sorted(scores)
    rows = {}
    for c in CANDIDATES:
        s = pick(scores, names, [(c, t) for t in vr.SHARES])[1]
        dice = np.array([d for f in names for d in scores[f][(c, s)]["dice"].values()])
        right = np.concatenate([scores[f][(c, s)]["right"] for f in names])
        rows[c] = {"share": s, "dice": ve.summary(dice), "accuracy": float(right.mean())}
    base_share = rows[BASELINE]["share"]
    errors = {q: e for f in names for q, e in scores[f][(BASELINE, base_share)]["errors"].items()}
    pooled = {k: sum(e[k] for e in errors.values()) for k in next(iter(errors.values()))}
    base_picks, base_dice, base_right = nested(scores, [k for k in keys if k[0] == BASELINE])
    all_picks, all_dice, all_right = nested(scores, keys)
    patients = sorted(base_dice)
    a, b = np.array([all_dice[q] for q in patients]), np.array([base_dice[q] for q in patients])
    result = {
        "command": "python " + " ".join(shlex.quote(x) for x in sys.argv), "runs": [str(r) for r in args.runs],
        "arm": args.arm, "presence": "mask", "candidates": rows,
        "nested_shares_only": {"picks": {f: list(k) for f, k in base_picks.items()}, "dice": ve.summary(b),
                               "accuracy": float(base_right.mean()), "per_patient": base_dice},
        "nested_search": {"picks": {f: list(k) for f, k in all_picks.items()}, "dice": ve.summary(a),
                          "accuracy": float(all_right.mean()), "per_patient": all_dice},
        "search_minus_shares_only": ve.paired_stats(a, b, 10000, args.seed),
        "errors": {"rule": [BASELINE, base_share], "pooled": pooled, "per_patient": errors},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / f"{args.name}.json", json_safe(result))
    d = result["search_minus_shares_only"]
    runs_text = " and ".join(f"`{r}`" for r in args.runs) + (" (ensemble)" if len(args.runs) > 1 else "")
    lines = ["# Post-processing beyond the 3D component rule, searched by cross-validation", "", "Made by:", "",
             "```", result["command"], "```", "",
             f"Out-of-fold predictions of {runs_text} ({len(names)} folds, arm `{args.arm}`, mask presence): every "
             "patient scored once by the fold model that never saw it. Each candidate is shown with the share of "
             "the 3D component rule that suits it best on all folds (optimistic: picked on the patients it is "
             "scored on); the nested figures below are the estimate on unseen patients.", "",
             "| candidate | share | Dice per volume, mean (sd) | median | slice accuracy |", "|---|---|---|---|---|"]
    for c, r in rows.items():
        lines.append(f"| `{c}` | {r['share']:g} | {r['dice']['mean']:.3f} ({r['dice']['sd']:.3f}) | "
                     f"{r['dice']['median']:.3f} | {r['accuracy']:.3f} |")
    ns, nall = result["nested_shares_only"], result["nested_search"]
    fmt = lambda picks: ", ".join(f"{f} `{k[0]}` share {k[1]:g}" for f, k in picks.items())  # noqa: E731
    lines += ["", f"n = {rows[BASELINE]['dice']['n']} patients, {base_right.size} slices.", "",
              f"Nested, shares only (today's rule; {fmt(base_picks)}): Dice per volume {ns['dice']['mean']:.3f} "
              f"(sd {ns['dice']['sd']:.3f}), slice accuracy {ns['accuracy']:.3f}.", "",
              f"Nested, every candidate x share ({fmt(all_picks)}): **Dice per volume {nall['dice']['mean']:.3f} "
              f"(sd {nall['dice']['sd']:.3f}), slice accuracy {nall['accuracy']:.3f}**; paired against shares only "
              f"{d['mean_diff']:+.3f} (bootstrap 95% CI {d['ci95'][0]:+.3f} to {d['ci95'][1]:+.3f}), better on "
              f"{d['wins']}, worse on {d['losses']}, Wilcoxon p {d['wilcoxon_p']:.2g}.", ""]
    worst = sorted(errors, key=lambda q: rows_dice(scores, names, (BASELINE, base_share))[q])
    lines += [f"## Where `{BASELINE}` with share {base_share:g} errs", "",
              f"Pooled over the {len(errors)} patients: pixel precision "
              f"{pooled['tp'] / max(pooled['tp'] + pooled['fp'], 1):.3f}, recall "
              f"{pooled['tp'] / max(pooled['tp'] + pooled['fn'], 1):.3f}; {pooled['missed_slices']} tumor slices "
              f"had nothing predicted ({pooled['missed_at_ends']} of them within one slice of an end of their "
              f"tumor), holding {pooled['fn_on_missed_slices'] / max(pooled['fn'], 1):.2f} of the missed tumor "
              "voxels.", "",
              "| patient | Dice | precision | recall | missed slices (at an end) | share of missed voxels on them |",
              "|---|---|---|---|---|---|"]
    dice_base = rows_dice(scores, names, (BASELINE, base_share))
    for q in worst:
        e = errors[q]
        lines.append(f"| {q} | {dice_base[q]:.3f} | {e['tp'] / max(e['tp'] + e['fp'], 1):.3f} | "
                     f"{e['tp'] / max(e['tp'] + e['fn'], 1):.3f} | {e['missed_slices']} ({e['missed_at_ends']}) | "
                     f"{e['fn_on_missed_slices'] / max(e['fn'], 1):.2f} |")
    lines.append("")
    write_text(args.out / f"{args.name}.md", "\n".join(lines))
    print(f"nested shares only {ns['dice']['mean']:.3f} / {ns['accuracy']:.3f}; nested search "
          f"{nall['dice']['mean']:.3f} / {nall['accuracy']:.3f}; difference {d['mean_diff']:+.3f} "
          f"[{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}]", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
