"""What DL-VAE-CNN's VAE adds: patient-level k-fold cross-validation, paired arms.

Every patient of --data-dir is scored once, as test, by models that never
saw it. The patients are dealt into --folds folds (shuffled with --seed);
for each fold the other patients train, --val-patients of them held out as
the validation set that picks the best checkpoint (settings are never chosen
on the test fold). Arms, trained with the same config, steps, batches and
seed:

  dlvae_cnn  DL-VAE-CNN as configured (the VAE trained as a likelihood)
  no_vae     the same network with the VAE removed: z fixed to zero, the VAE
             terms off (`model.use_vae=False`)
  unet       the `unet` baseline
  kmeans     the classical K-means ROI (no training; `dlvae-jax classical`)

For each arm: Dice per patient volume on the test folds (the 3D Dice of a
patient's stacked slices at the data's resolution) and slice accuracy. For
each pair of arms: the per-patient differences, wins, the Wilcoxon
signed-rank p-value (two-sided, scipy) and a bootstrap 95% interval of the
mean difference (patients resampled, --bootstrap draws, --seed).

Outputs in --out: vae_effect.md (tables and the command), vae_effect.json
(every figure, per patient), vae_effect.png (paired per-patient Dice). Runs
(one training workdir per fold and arm) go under --runs; a run that exists
is resumed or reused, so the script can be stopped and started again.

    python experiments/vae_effect.py --data-dir ../shared/data/lgg/kaggle_3m \\
        --folds 3 --steps 600 --set data.image_size=64 --out experiments/results
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
from pathlib import Path

import numpy as np

from dlvae_jax.eval.evaluate import json_safe
from dlvae_jax.io import atomic_path, write_json, write_text

ARMS = ("dlvae_cnn", "no_vae", "unet", "kmeans")
PAIRS = (("dlvae_cnn", "no_vae"), ("dlvae_cnn", "unet"), ("no_vae", "unet"), ("dlvae_cnn", "kmeans"),
         ("unet", "kmeans"))
# The DL-VAE-CNN arms start from the `cpu` config as it was before its final model moved to every patient and
# gained the missing-sequence augmentation, so the commands recorded with earlier results still reproduce them and
# still resume their runs (the folds' own splits are used either way); --set augment.p_missing_sequence=0.25 adds it.
# The 3D component rule is chosen afterwards on the folds' predictions (experiments/volume_rule.py), so folds
# score without it.
# The `cpu` config trained at 128x128 until its cross-validation chose 64x64; commands recorded without
# --set data.image_size ran at 128x128.
# Likewise the rotations and scaling the `cpu` config widened after its cross-validation (10 degrees and 10%);
# --set augment.max_rotate_deg=20 --set augment.max_scale=0.2 gives today's.
_CPU_AS_CROSS_VALIDATED = ["data.fractions=(0.85,0.15,0.0)", "augment.p_missing_sequence=0.0",
                           "eval.min_volume_share=0.0", "data.image_size=128", "augment.max_rotate_deg=10.0",
                           "augment.max_scale=0.1"]
ARM_CONFIG = {"dlvae_cnn": ("cpu", _CPU_AS_CROSS_VALIDATED),
              "no_vae": ("cpu", ["model.use_vae=False", *_CPU_AS_CROSS_VALIDATED]),
              "unet": ("unet", ["eval.min_volume_share=0.0"])}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Cross-validated, paired comparison: DL-VAE-CNN with and without its "
                                            "VAE, U-Net and the K-means ROI, on every patient.")
    p.add_argument("--data-dir", type=Path, required=True, help="LGG data in the kaggle_3m layout")
    p.add_argument("--folds", type=int, default=3, help="cross-validation folds (default 3)")
    p.add_argument("--val-patients", type=int, default=4,
                   help="training patients of each fold held out to pick the best checkpoint (default 4); 0 "
                        "trains on every non-test patient and keeps the last checkpoint, as the `cpu` recipe does")
    p.add_argument("--steps", type=int, default=600, help="train steps per arm and fold (default 600)")
    p.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated subset of {','.join(ARMS)}")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="config override for every trained arm (repeatable), e.g. data.image_size=64")
    p.add_argument("--seed", type=int, default=0, help="fold assignment, training and bootstrap seed (default 0)")
    p.add_argument("--bootstrap", type=int, default=10000, help="bootstrap draws (default 10000)")
    p.add_argument("--runs", type=Path, default=Path("workdir/vae_effect"), help="training workdirs (default workdir/vae_effect)")
    p.add_argument("--out", type=Path, default=Path("experiments/results"))
    p.add_argument("--render", action="store_true", help="only rewrite the .md and .png from vae_effect.json in --out")
    args = p.parse_args(argv)
    args.arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    if not args.arms or any(a not in ARMS for a in args.arms):
        p.error(f"--arms: a comma-separated subset of {','.join(ARMS)}")
    if args.folds < 2:
        p.error("--folds must be at least 2")
    if args.steps < 1 or args.val_patients < 0 or args.bootstrap < 100:
        p.error("--steps must be >= 1, --val-patients >= 0, --bootstrap >= 100")
    if not args.render and not args.data_dir.is_dir():
        p.error(f"--data-dir {args.data_dir}: no such folder")
    return args


def assign_folds(patients: list[str], k: int, seed: int) -> list[list[str]]:
    """Patients shuffled with `seed` and dealt round-robin into k folds (sizes differ by at most 1)."""
    order = list(np.random.default_rng(seed).permutation(sorted(patients)))
    return [sorted(str(p) for p in order[i::k]) for i in range(k)]


def fold_splits(folds: list[list[str]], i: int, n_val: int, seed: int) -> dict[str, list[str]]:
    rest = sorted(p for j, f in enumerate(folds) if j != i for p in f)
    if n_val == 0:  # every non-test patient trains; the last checkpoint is kept
        return {"train": rest, "validation": [], "test": list(folds[i])}
    val = sorted(str(p) for p in np.random.default_rng(seed + 1000 + i).choice(rest, size=n_val, replace=False))
    return {"train": sorted(set(rest) - set(val)), "validation": val, "test": list(folds[i])}


# ------------------------------------------------------------------ statistics


def paired_stats(a: np.ndarray, b: np.ndarray, draws: int, seed: int) -> dict:
    """a - b per patient: mean, median, wins of a, Wilcoxon p (two-sided) and a
    bootstrap 95% interval of the mean difference (percentile method)."""
    from scipy.stats import wilcoxon

    d = np.asarray(a, np.float64) - np.asarray(b, np.float64)
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, len(d), size=(draws, len(d)))].mean(axis=1)
    nonzero = d[d != 0]
    p = float(wilcoxon(nonzero).pvalue) if len(nonzero) >= 1 else 1.0
    return {
        "n": int(len(d)),
        "mean_diff": float(d.mean()),
        "median_diff": float(np.median(d)),
        "wins": int((d > 0).sum()),
        "losses": int((d < 0).sum()),
        "ties": int((d == 0).sum()),
        "wilcoxon_p": p,
        "ci95": [float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))],
    }


def summary(values: np.ndarray) -> dict:
    v = np.asarray(values, np.float64)
    return {"n": int(len(v)), "mean": float(v.mean()), "sd": float(v.std(ddof=1)) if len(v) > 1 else 0.0,
            "median": float(np.median(v)), "q25": float(np.percentile(v, 25)), "q75": float(np.percentile(v, 75))}


# ------------------------------------------------------------------ arms


def arm_config(arm: str, args, splits_seed: int):
    from dlvae_jax import configs
    from dlvae_jax.train import experiment as ex

    name, extra = ARM_CONFIG[arm]
    cfg = configs.load(name, list(extra) + list(args.set))
    cfg.data.data_dir = str(args.data_dir.resolve())
    cfg.data.split_seed = int(splits_seed)
    cfg.train.seed = int(args.seed)
    cfg.train.steps = int(args.steps)
    cfg.train.eval_every = max(1, args.steps // 3)
    cfg.train.checkpoint_every = cfg.train.eval_every
    cfg.train.log_every = max(1, min(int(cfg.train.log_every), args.steps // 20 or 1))
    cfg.optimizer.warmup_steps = min(int(cfg.optimizer.warmup_steps), max(1, args.steps // 20))
    ex.shorten_schedules(cfg, int(args.steps))
    cfg.eval.overlays = 0
    return cfg


def train_and_score(arm: str, fold: int, splits: dict, args) -> dict:
    """Trains (or resumes) one arm on one fold and scores its test patients."""
    from dlvae_jax.eval.evaluate import evaluate
    from dlvae_jax.train.loop import train

    wd = args.runs / f"fold{fold}" / arm
    cfg = arm_config(arm, args, fold)
    t0 = time.time()
    summary_ = train(cfg, wd, progress="none", splits=splits)
    t_train = time.time() - t0
    if summary_.get("already_finished"):  # trained by an earlier call: its own training time
        t_train = float(summary_.get("seconds", t_train))
    report = evaluate(wd, split="test", n_overlays=0)
    return {
        "train_s": round(t_train, 1),
        "steps": int(cfg.train.steps),
        "slices_per_s": summary_.get("slices_per_s"),
        "checkpoint_step": report["checkpoint_step"],
        "slice_accuracy": report["slice_accuracy"],
        "per_patient": {r["patient"]: {"dice": r["dice"], "n_slices": r["n_slices"],
                                       "n_tumor_slices": r["n_tumor_slices"]} for r in report["per_patient"]},
        "slice_counts": report["slice_counts"],
    }


def kmeans_scores(index, patients: list[str], seed: int) -> dict:
    """Dice per volume of the classical K-means ROI of every patient."""
    import jax

    from dlvae_jax.classical import classical_roi
    from dlvae_jax.data import lgg
    from dlvae_jax.metrics import dice_from_counts

    out = {}
    key = jax.random.key(seed)
    for pid in patients:
        recs = [r for r in index.records if r.patient == pid]
        flair, truth = lgg.load_arrays(recs, "flair")
        roi = np.concatenate([classical_roi(flair[s:s + 32], key, s) for s in range(0, len(recs), 32)])
        truth = truth.astype(bool)
        c = {k: int(v) for k, v in zip(("tp", "fp", "fn"), (np.sum(roi & truth), np.sum(roi & ~truth),
                                                             np.sum(~roi & truth)))}
        c["tn"] = int(roi.size - sum(c.values()))
        pred_label, true_label = roi.any(axis=(1, 2)), truth.any(axis=(1, 2))
        out[pid] = {"dice": dice_from_counts(c), "n_slices": len(recs), "n_tumor_slices": int(true_label.sum()),
                    "slice_correct": int((pred_label == true_label).sum())}
    return out


# ------------------------------------------------------------------ report


def analyse(result: dict, draws: int, seed: int) -> dict:
    arms = [a for a in ARMS if a in result["arms"]]
    patients = sorted(set.intersection(*(set(result["arms"][a]["per_patient"]) for a in arms))) if arms else []
    dice = {a: np.array([result["arms"][a]["per_patient"][p]["dice"] for p in patients]) for a in arms}
    out = {"patients": patients, "arms": {}, "pairs": {}}
    for a in arms:
        arm = result["arms"][a]
        out["arms"][a] = {"dice_volume": summary(dice[a]), "slice_accuracy": arm.get("slice_accuracy")}
    for a, b in PAIRS:
        if a in dice and b in dice and len(patients) >= 2:
            out["pairs"][f"{a} - {b}"] = paired_stats(dice[a], dice[b], draws, seed)
    return out


def _fmt_p(p: float) -> str:
    return f"{p:.2g}" if p >= 1e-4 else f"{p:.1e}"


def latent_rows(runs: Path) -> list[dict]:
    """What the dlvae_cnn arm's latent carries on each test fold, from the
    metrics_test.json `dlvae-jax evaluate` wrote into its run."""
    rows = []
    for path in sorted(runs.glob("fold*/dlvae_cnn/metrics_test.json")):
        m = json.loads(path.read_text())
        if "latent" in m:
            rows.append({"fold": path.parent.parent.name, "kl_nats": m["latent"]["kl_nats"],
                         "active_units": m["latent"]["active_units"], "n_dims": m["latent"]["n_dims"],
                         **{f"{n}_dice_drop": m["probe"][n]["dice_drop"] for n in ("zeros", "shuffle", "prior")},
                         **{f"{n}_accuracy_drop": m["probe"][n]["accuracy_drop"] for n in ("zeros", "shuffle", "prior")}})
    return rows


def _val_phrase(n_val: int) -> str:
    if n_val == 0:
        return "every other patient trains and the last checkpoint is kept"
    return f"{n_val} training patients per fold pick the best checkpoint"


def render(result: dict, analysis: dict, out: Path, runs: Path | None = None) -> None:
    lines = ["# What the VAE adds: cross-validated, paired, on every patient", "",
             "Made by:", "", "```", result["command"], "```", "",
             f"Data: {result['n_patients']} patients, {result['folds']} patient-level folds (each patient scored "
             f"once, as test, by models that never saw it); {_val_phrase(result['val_patients'])}. "
             f"Every trained arm: {result['steps']} steps, config overrides "
             f"`{' '.join(result['overrides']) or 'none'}`, seed {result['seed']}. Ran on {result['machine']} "
             f"in {result['wall_min']:.0f} min.", "",
             "## Dice per patient volume (test folds)", "",
             "| arm | n | mean | sd | median | IQR | slice accuracy |", "|---|---|---|---|---|---|---|"]
    for a, s in analysis["arms"].items():
        d = s["dice_volume"]
        acc = s["slice_accuracy"]
        lines.append(f"| {a} | {d['n']} | {d['mean']:.3f} | {d['sd']:.3f} | {d['median']:.3f} | "
                     f"{d['q25']:.3f}-{d['q75']:.3f} | {'' if acc is None else f'{acc:.3f}'} |")
    lines += ["", "Slice accuracy pools the test slices of all folds (the networks: each run's eval.presence "
              "rule, the class head or a non-empty mask; K-means: 'ROI not empty').", "",
              "## Paired differences (per patient, first arm minus second)", "",
              "| pair | n | mean diff | 95% CI (bootstrap) | median diff | wins / losses / ties | Wilcoxon p |",
              "|---|---|---|---|---|---|---|"]
    for name, s in analysis["pairs"].items():
        lines.append(f"| {name} | {s['n']} | {s['mean_diff']:+.3f} | {s['ci95'][0]:+.3f} to {s['ci95'][1]:+.3f} | "
                     f"{s['median_diff']:+.3f} | {s['wins']} / {s['losses']} / {s['ties']} | "
                     f"{_fmt_p(s['wilcoxon_p'])} |")
    latent = latent_rows(runs) if runs is not None else []
    if latent:
        lines += ["", "## What the dlvae_cnn arm's latent carries (test folds)", "",
                  "KL of the label-free posterior (nats, mean over slices; bounds what z tells about a slice), "
                  "active units (variance of the posterior mean over slices > 0.01), and the latent probe: the "
                  "drop in Dice per volume and in slice accuracy when the CNN's z is replaced. A large drop with "
                  "zeros or a prior draw but a small one with another slice's z means the CNN needs z in the "
                  "range it was trained on but uses little of what tells one slice from another.", "",
                  "| fold | KL (nats) | active units | Dice drop: zeros / shuffled / prior | "
                  "accuracy drop: zeros / shuffled / prior |", "|---|---|---|---|---|"]
        for r in latent:
            lines.append(f"| {r['fold']} | {r['kl_nats']:.1f} | {r['active_units']} of {r['n_dims']} | "
                         f"{r['zeros_dice_drop']:+.3f} / {r['shuffle_dice_drop']:+.3f} / {r['prior_dice_drop']:+.3f} | "
                         f"{r['zeros_accuracy_drop']:+.3f} / {r['shuffle_accuracy_drop']:+.3f} / "
                         f"{r['prior_accuracy_drop']:+.3f} |")
    lines += ["", "## Per fold", "", "| fold | arm | test patients | train s | checkpoint step |",
              "|---|---|---|---|---|"]
    for f in result["fold_runs"]:
        lines.append(f"| {f['fold']} | {f['arm']} | {f['n_test']} | {f['train_s']:.0f} | {f['checkpoint_step']} |")
    lines += ["", "## Per patient (Dice per volume)", "",
              "| patient | fold | " + " | ".join(analysis["arms"]) + " |",
              "|---|---|" + "---|" * len(analysis["arms"])]
    fold_of = {p: i for i, f in enumerate(result["folds_patients"]) for p in f}
    for p in analysis["patients"]:
        cells = " | ".join(f"{result['arms'][a]['per_patient'][p]['dice']:.3f}" for a in analysis["arms"])
        lines.append(f"| {p} | {fold_of.get(p, '')} | {cells} |")
    write_text(out / "vae_effect.md", "\n".join(lines) + "\n")
    _plot(result, analysis, out / "vae_effect.png")


def _plot(result: dict, analysis: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = list(analysis["arms"])
    fig, ax = plt.subplots(figsize=(1.8 * len(arms) + 2, 5), dpi=120)
    for p in analysis["patients"]:
        ax.plot(range(len(arms)), [result["arms"][a]["per_patient"][p]["dice"] for a in arms],
                color="0.6", lw=0.7, alpha=0.7, marker="o", ms=2.5)
    means = [analysis["arms"][a]["dice_volume"]["mean"] for a in arms]
    ax.plot(range(len(arms)), means, color="tab:red", lw=2.5, marker="D", ms=7, label="mean")
    ax.set_xticks(range(len(arms)), arms)
    ax.set_ylabel("Dice per patient volume")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(f"{len(analysis['patients'])} patients, {result['folds']}-fold CV: paired per patient", fontsize=10)
    ax.legend(loc="lower left")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def main(argv=None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "vae_effect.json"
    if args.render:
        result = json.loads(path.read_text())
        render(result, analyse(result, args.bootstrap, args.seed), args.out, args.runs)
        return 0

    import platform

    from dlvae_jax.data import lgg

    t_start = time.time()
    index = lgg.scan(args.data_dir)
    patients = sorted({r.patient for r in index.records})
    if len(patients) < args.folds * 2:
        raise SystemExit(f"vae_effect: {len(patients)} patients are too few for {args.folds} folds")
    folds = assign_folds(patients, args.folds, args.seed)
    result = {
        "command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
        "n_patients": len(patients), "folds": args.folds, "val_patients": args.val_patients,
        "steps": args.steps, "overrides": list(args.set), "seed": args.seed,
        "machine": f"{platform.machine()} CPU, {__import__('os').cpu_count()} cores",
        "folds_patients": folds, "arms": {}, "fold_runs": [],
    }
    for arm in args.arms:
        if arm == "kmeans":
            t0 = time.time()
            scores = kmeans_scores(index, patients, args.seed)
            n = sum(v["n_slices"] for v in scores.values())
            result["arms"]["kmeans"] = {"per_patient": scores,
                                        "slice_accuracy": sum(v["slice_correct"] for v in scores.values()) / n}
            print(f"kmeans: {len(scores)} patients in {time.time() - t0:.0f} s", flush=True)
    for i in range(args.folds):
        splits = fold_splits(folds, i, args.val_patients, args.seed)
        for arm in [a for a in args.arms if a != "kmeans"]:
            t0 = time.time()
            r = train_and_score(arm, i, splits, args)
            merged = result["arms"].setdefault(arm, {"per_patient": {}, "slice_counts": {}})
            merged["per_patient"].update(r["per_patient"])
            for k, v in r["slice_counts"].items():
                merged["slice_counts"][k] = merged["slice_counts"].get(k, 0) + int(v)
            c = merged["slice_counts"]
            merged["slice_accuracy"] = (c.get("tp", 0) + c.get("tn", 0)) / max(1, sum(c.values()))
            result["fold_runs"].append({"fold": i, "arm": arm, "n_test": len(splits["test"]),
                                        "train_s": r["train_s"], "checkpoint_step": r["checkpoint_step"]})
            mean = np.mean([v["dice"] for v in r["per_patient"].values()])
            print(f"fold {i} {arm}: test Dice per volume mean {mean:.3f} over {len(r['per_patient'])} patients, "
                  f"{time.time() - t0:.0f} s", flush=True)
            result["wall_min"] = (time.time() - t_start) / 60
            write_json(path, json_safe(result))
    result["wall_min"] = (time.time() - t_start) / 60
    analysis = analyse(result, args.bootstrap, args.seed)
    result["analysis"] = analysis
    write_json(path, json_safe(result))
    render(result, analysis, args.out, args.runs)
    for name, s in analysis["pairs"].items():
        print(f"{name}: mean diff {s['mean_diff']:+.3f} (95% CI {s['ci95'][0]:+.3f} to {s['ci95'][1]:+.3f}), "
              f"wins {s['wins']}/{s['n']}, Wilcoxon p {_fmt_p(s['wilcoxon_p'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
