"""Tables I-IV of Rao et al. (and a segmentation table) measured over seeds.

Trains DL-VAE-CNN and the baselines (`cnn`, `vgg16`, `dcnn`, `unet`) under one
training budget each, adds the K-means ROI of the classical stages (no
learning), scores everything on the test patients of one patient-level split,
and writes, into --out:

  tables.md              Tables I-IV (slice accuracy, precision, recall, F1:
                         mean +- sd over seeds, each seed, the paper's figure),
                         the segmentation table, patients/slices used, the
                         machine and the wall time
  fig6_accuracy.png ... fig9_f1.png, segmentation.png   bar charts (ours vs the paper)
  metrics/<model>_seed<s>.json   each cell's full test report, training summary
                         and budget (the raw per-seed figures)
  calibration.json       the measured speed of each model and the step count
                         its budget buys
  log.jsonl              one line per finished cell

Budget. `--budget-min M` is the same for every model: each model's train-step
speed (slices/s, compile excluded, on real batches of the train split) is
measured once, and M minutes at that speed, rounded to whole steps, is its
step count for every seed. A fixed step count keeps each cell reproducible
from its seed and independent of what else the machine is doing; the
learning-rate warm-up and the KL warm-up are scaled with it (5% and 20% of the
steps, at most the config's values). The model widths, resolution, augmentation
and loss are those of each model's named config (`cpu` for DL-VAE-CNN,
`cnn`, `vgg16`, `dcnn`, `unet`); `--set` overrides a field for every model
(e.g. `--set data.image_size=256` on accelerators).

Protocol. The split is made once from `--split-seed` (patient level, 70/15/15
stratified); seed s sets each model's initialization, data order, augmentation
and noise, and the K-means restarts. Each model keeps its checkpoint with the
best validation Dice per volume (validation at the middle and the end of
training), and the test split is scored once per cell, with the decision rule
of `dlvae-jax evaluate`. The classifiers `cnn`, `vgg16` and `dcnn` have no
mask output, so they appear only in Tables I-IV; the K-means ROI calls a slice
"tumor" when its ROI is not empty.

Resuming. A cell is finished when its metrics file exists; a rerun with the
same arguments skips finished cells and resumes an unfinished one from its
last checkpoint (training runs live in --runs, default workdir/tables). The
tables and figures are rewritten from whatever cells exist after every cell.

    python experiments/tables.py --data-dir ../shared/data/lgg/kaggle_3m --seeds 3 \\
        --out experiments/results
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

from dlvae_jax.errors import DlvaeError

# name in the tables, config, row order as the paper prints its Tables I-IV, our extra rows after
MODELS = {
    "cnn": ("CNN", "cnn"),
    "vgg16": ("VGG16-CNN", "vgg16"),
    "dcnn": ("DCNN", "dcnn"),
    "dlvae_cnn": ("DL-VAE-CNN", "cpu"),
    "unet": ("U-Net", "unet"),
}
KMEANS = "kmeans"
TITLES = {KMEANS: "K-means ROI (no learning)"}
SEGMENTERS = ("dlvae_cnn", "unet", KMEANS)  # models with a mask output
CLASS_METRICS = (("accuracy", "slice_accuracy", "I", 6), ("precision", "slice_precision", "II", 7),
                 ("recall", "slice_recall", "III", 8), ("f1", "slice_f1", "IV", 9))
SEG_METRICS = (("Dice/volume mean", "dice_volume_mean", 1), ("Dice/volume median", "dice_volume_median", 1),
               ("Dice tumor slices", "dice_tumor_slices_mean", 1), ("IoU", "iou_mean", 1),
               ("HD95 (px)", "hd95_mean", 1), ("pixel F1", "pixel_f1", 1))
CALIBRATION_STEPS = 12
MIN_STEPS = 20


def title(model: str) -> str:
    return MODELS[model][0] if model in MODELS else TITLES[model]


# ----------------------------------------------------------------------------- configuration


TABLE_FRACTIONS = (0.7, 0.15, 0.15)


def cell_config(model: str, seed: int, steps: int, data_dir: Path, split_seed: int, overrides: list[str]):
    """The resolved config of one (model, seed) cell."""
    from dlvae_jax import configs
    from dlvae_jax.train import experiment as ex

    cfg = configs.load(MODELS[model][1], list(overrides))
    named = {o.split("=", 1)[0].strip() for o in overrides}
    if "data.fractions" not in named:
        cfg.data.fractions = TABLE_FRACTIONS  # the table's protocol needs test patients, whatever the config trains on
    if "augment.p_missing_sequence" not in named:
        cfg.augment.p_missing_sequence = 0.0  # as the tables were measured, before the `cpu` config added it
    if "eval.min_volume_share" not in named:
        cfg.eval.min_volume_share = 0.0  # likewise for the 3D component rule
    for key, value in (("max_rotate_deg", 10.0), ("max_scale", 0.1)):
        if f"augment.{key}" not in named:
            cfg.augment[key] = value  # likewise for the wider rotations and scaling
    if "data.image_size" not in named:
        cfg.data.image_size = 128  # the tables were measured at 128x128, before the `cpu` config chose 64x64
    cfg.data.data_dir = str(data_dir)
    cfg.data.split_seed = int(split_seed)
    cfg.train.seed = int(seed)
    cfg.train.steps = int(steps)
    half = max(1, steps // 2)
    cfg.train.eval_every = half
    cfg.train.checkpoint_every = half
    cfg.train.log_every = max(1, min(int(cfg.train.log_every), steps // 20 or 1))
    cfg.optimizer.warmup_steps = min(int(cfg.optimizer.warmup_steps), max(1, steps // 20))
    ex.shorten_schedules(cfg, int(steps))
    cfg.eval.overlays = 4
    return cfg


def measure_speed(model: str, data_dir: Path, split_seed: int, overrides: list[str],
                  n_steps: int = CALIBRATION_STEPS) -> dict:
    """Train-step speed of `model`'s config on real batches: compile apart, then n_steps timed."""
    import jax

    from dlvae_jax.data import lgg
    from dlvae_jax.data.pipeline import ArrayLoader
    from dlvae_jax.data.splits import make_splits, records_for_split
    from dlvae_jax.models import example_inputs
    from dlvae_jax.train import experiment as ex
    from dlvae_jax.train.state import create_state
    from dlvae_jax.train.step import train_step

    cfg = cell_config(model, 0, 1000, data_dir, split_seed, overrides)
    index = lgg.scan(data_dir)
    splits = make_splits(index, int(split_seed), tuple(float(f) for f in cfg.data.fractions))
    batch_size = int(cfg.train.batch_size)
    records = records_for_split(index, splits, "train")
    rng = np.random.default_rng(0)
    pick = rng.choice(len(records), size=min(len(records), batch_size * 4), replace=False)
    images, masks = lgg.load_arrays([records[i] for i in sorted(pick)], cfg.data.channels)
    loader = ArrayLoader(images, masks)
    batches = [loader(np.resize(np.arange(len(images)), batch_size * 4)[i * batch_size:(i + 1) * batch_size])
               for i in range(4)]

    mdl = ex.model_from_config(cfg)
    tx, schedule = ex.optimizer_from_config(cfg)
    step = jax.jit(lambda st, b: train_step(st, b, model=mdl, tx=tx, loss_cfg=ex.loss_from_config(cfg),
                                            prep=ex.prep_from_config(cfg), augment=ex.augment_from_config(cfg),
                                            lr_schedule=schedule), donate_argnums=0)
    c = images.shape[-1] if images.ndim == 4 else 1
    state = create_state(mdl, tx, jax.random.key(0), example_inputs(2, int(cfg.data.image_size), c))
    dev = [jax.device_put(b) for b in batches]
    t0 = time.perf_counter()
    state, m = step(state, dev[0])
    jax.block_until_ready(m)
    compile_s = time.perf_counter() - t0
    state, m = step(state, dev[1])  # one more untimed step: allocations settle
    jax.block_until_ready(m)
    t0 = time.perf_counter()
    for i in range(n_steps):
        state, m = step(state, dev[i % len(dev)])
    jax.block_until_ready(m)
    seconds = time.perf_counter() - t0
    return {"slices_per_s": n_steps * batch_size / seconds, "compile_s": compile_s, "batch_size": batch_size,
            "image_size": int(cfg.data.image_size), "timed_steps": n_steps}


def calibration_key(args) -> dict:
    """What a cell's step count depends on; cells made under another key are not mixed in."""
    return {"budget_min": args.budget_min, "steps": args.steps, "set": list(args.set or []),
            "split_seed": args.split_seed}


def check_cells(out: Path, calibration: dict, args) -> None:
    """Refuses finished cells made under other settings; rescores cells scored with another checkpoint."""
    from dlvae_jax.io import write_json

    key = calibration_key(args)
    for path in sorted((out / "metrics").glob("*_seed*.json")):
        rec = json.loads(path.read_text())
        model = rec.get("model")
        if model not in MODELS and model != KMEANS:
            raise DlvaeError(f"{path}: not a cell of this script (model {model!r})")
        stale = rec.get("budget_key", key) != key or (
            model in MODELS and model in calibration and int(rec.get("steps", -1)) != int(calibration[model]["steps"]))
        if stale:
            raise DlvaeError(f"{path}: a cell made with other settings (budget, --set or split seed); use another "
                             "--out and --runs, or delete the old cells")
        if model in MODELS and not rec.get("failed") and rec["test"].get("checkpoint") != scored_checkpoint(model):
            print(f"tables: {path.name}: scoring the {scored_checkpoint(model)!r} checkpoint", file=sys.stderr)
            write_json(path, rescore(path, rec, args))


def calibrate(models: list[str], args, out: Path) -> dict[str, dict]:
    """{model: speed record with 'steps'}; read from calibration.json when it matches this run."""
    from dlvae_jax.io import write_json

    path = out / "calibration.json"
    known = json.loads(path.read_text()) if path.exists() else {}
    key = calibration_key(args)
    if known.get("key") != key:
        if any((out / "metrics").glob("*_seed*.json")):
            raise DlvaeError(f"{out}: holds cells made with other settings ({known.get('key')}); use another "
                             "--out and --runs, or delete the old cells")
        known = {"key": key, "models": {}}
    for model in models:
        if model in known["models"]:
            continue
        if args.steps:
            rec = {"steps": int(args.steps), "slices_per_s": None}
        else:
            print(f"tables: measuring the train-step speed of {model} ...", file=sys.stderr, flush=True)
            rec = measure_speed(model, args.data_dir, args.split_seed, list(args.set or []))
            rec["steps"] = max(MIN_STEPS, int(round(args.budget_min * 60 * rec["slices_per_s"] / rec["batch_size"])))
            print(f"tables: {model}: {rec['slices_per_s']:.1f} slices/s (compile {rec['compile_s']:.0f} s) "
                  f"-> {rec['steps']} steps in {args.budget_min:g} min", file=sys.stderr, flush=True)
        known["models"][model] = rec
        write_json(path, known)
    return known["models"]


# ----------------------------------------------------------------------------- cells


def scored_checkpoint(model: str) -> str:
    """Which checkpoint of a cell is scored on the test split: a model with a mask
    output keeps its best by validation Dice per volume; a classifier (`cnn`,
    `vgg16`, `dcnn`, always-empty masks) is scored with its final weights."""
    from dlvae_jax.models.registry import MODELS as REGISTRY

    return "best" if REGISTRY[model].outputs_mask else "latest"


def run_cell(model: str, seed: int, steps: int, args) -> dict:
    from dlvae_jax.eval.evaluate import evaluate
    from dlvae_jax.train.loop import train

    cfg = cell_config(model, seed, steps, args.data_dir, args.split_seed, list(args.set or []))
    workdir = args.runs / f"{model}_seed{seed}"
    t0 = time.perf_counter()
    summary = train(cfg, workdir, progress=sys.stderr.isatty() and not args.quiet)
    train_s = time.perf_counter() - t0
    report = evaluate(workdir, split="test", checkpoint=scored_checkpoint(model), n_overlays=4)
    summary = dict(summary, workdir=_shown_path(workdir))  # as given, not this machine's absolute path
    return {"model": model, "seed": seed, "steps": steps, "train": summary, "train_wall_s": round(train_s, 1),
            "resumed_from": int(summary.get("resumed_from", 0)), "test": report,
            "config": json.loads(_config_json(cfg))}


def rescore(path: Path, rec: dict, args) -> dict:
    """Scores a finished cell again with the checkpoint `scored_checkpoint` names (no training)."""
    from dlvae_jax.eval.evaluate import evaluate

    workdir = args.runs / f"{rec['model']}_seed{rec['seed']}"
    if not workdir.is_dir():
        raise DlvaeError(f"{path}: scored with the {rec['test'].get('checkpoint')!r} checkpoint, and its run "
                         f"{workdir} is gone; delete the file to train the cell again")
    rec = dict(rec, test=evaluate(workdir, split="test", checkpoint=scored_checkpoint(rec["model"]), n_overlays=4))
    return rec


def _config_json(cfg) -> str:
    from dlvae_jax import configs

    return configs.to_json(cfg)


def run_kmeans(seed: int, args) -> dict:
    """The classical stages' K-means ROI on the test split, scored like the learned models."""
    import jax

    from dlvae_jax import metrics
    from dlvae_jax.classical import classical_roi
    from dlvae_jax.data import lgg
    from dlvae_jax.data.splits import make_splits, records_for_split

    from dlvae_jax import configs

    cfg = configs.load(MODELS["unet"][1], list(args.set or []))  # the split fields every cell shares
    index = lgg.scan(args.data_dir)
    splits = make_splits(index, int(args.split_seed), tuple(float(f) for f in cfg.data.fractions))
    records = records_for_split(index, splits, "test")
    key = jax.random.key(int(seed))
    acc = metrics.SegmentationAccumulator()
    t0 = time.perf_counter()
    batch = 64
    for start in range(0, len(records), batch):
        part = records[start:start + batch]
        flair, truth = lgg.load_arrays(part, "flair")
        n = len(part)
        padded = np.pad(flair, ((0, batch - n), (0, 0), (0, 0)))  # one compiled shape
        roi = classical_roi(padded, key, start)[:n]
        acc.add(roi, truth > 0, [r.patient for r in part])
    from dlvae_jax.eval.evaluate import json_safe

    report = json_safe(acc.report())
    report["split"], report["checkpoint"] = "test", None
    return {"model": KMEANS, "seed": seed, "steps": 0, "train_wall_s": 0.0, "test": report,
            "kmeans_wall_s": round(time.perf_counter() - t0, 1), "settings": {"k": 4, "n_init": 10}}


def _finite(x):
    return None if x is None or (isinstance(x, float) and not math.isfinite(x)) else x


# ----------------------------------------------------------------------------- tables and figures


def load_cells(out: Path) -> dict[str, dict[int, dict]]:
    cells: dict[str, dict[int, dict]] = {}
    for path in sorted((out / "metrics").glob("*_seed*.json")):
        rec = json.loads(path.read_text())
        cells.setdefault(rec["model"], {})[int(rec["seed"])] = rec
    return cells


def _value(rec: dict, key: str) -> float | None:
    v = rec.get("test", {}).get(key)
    return float(v) if v is not None and math.isfinite(float(v)) else None


def _values(cells: dict[int, dict], key: str) -> list[float]:
    """The finite values of `key` over the finished seeds (a failed cell has none)."""
    return [v for v in (_value(cells[s], key) for s in sorted(cells)) if v is not None]


def _per_seed(cells: dict[int, dict], seeds: list[int], key: str, scale: float, digits: int) -> str:
    out = []
    for s in seeds:
        rec = cells.get(s)
        v = None if rec is None else _value(rec, key)
        out.append(f"{s}: " + ("failed" if rec is not None and rec.get("failed") else
                               "n/a" if v is None else f"{v * scale:.{digits}f}"))
    return ", ".join(out)


def _mean_sd(vals: list[float], scale: float = 1.0, digits: int = 2) -> str:
    if not vals:
        return "n/a"
    m = float(np.mean(vals)) * scale
    if len(vals) < 2:
        return f"{m:.{digits}f} (n = 1)"
    sd = float(np.std(vals, ddof=1)) * scale
    return f"{m:.{digits}f} ± {sd:.{digits}f} (n = {len(vals)})"


def render(out: Path, order: list[str], meta: dict) -> str:
    from dlvae_jax.eval.evaluate import PAPER_PERCENT

    cells = load_cells(out)
    seeds = sorted({s for c in cells.values() for s in c})
    lines = ["# Tables I-IV of Rao et al., measured", "",
             f"Produced by `{meta['command']}`.", ""]
    scored = [c[s] for c in cells.values() for s in c if c[s].get("test", {}).get("n_slices")]
    test_sets = {tuple(sorted(p["patient"] for p in rec["test"].get("per_patient", []))) for rec in scored}
    if len(test_sets) > 1:
        lines += ["**Warning: the cells were not all scored on the same test patients.**", ""]
    if scored:
        t = scored[0]["test"]
        lines += [f"- Test split: {t['n_patients']} held-out patients, {t['n_slices']} slices "
                  f"({t['n_tumor_slices']} with tumor), split seed {meta['split_seed']}; "
                  f"data `{meta['data_dir']}` ({meta['n_patients_total']} patients in all)."]
    lines += [f"- Seeds: {', '.join(map(str, seeds)) or 'none yet'}. Figures are mean ± standard deviation "
              "over seeds (sample sd), then each seed's value.",
              f"- Budget: {meta['budget']}.",
              "- Checkpoints: DL-VAE-CNN and U-Net are scored with their best checkpoint by validation Dice per "
              "volume (validation at half and at the end of training); the classifiers CNN, VGG16-CNN and DCNN, "
              "whose masks are empty, with their final weights.",
              f"- Machine: {meta['machine']}; wall time of the cells so far: {meta['wall']}.",
              "- Slice metrics: a slice is 'tumor' by the run's eval.presence rule: the class head's probability "
              ">= 0.5 ('class', the classifiers), or a non-empty mask ('mask', DL-VAE-CNN and U-Net, from the cpu "
              "config); for the K-means ROI, when its ROI is not empty. The paper does not say whether its figures are "
              "per slice, per pixel or per image set, nor on which patients; its column is printed as "
              "published, not as a like-for-like comparison.", ""]
    for metric, key, roman, fig in CLASS_METRICS:
        lines += [f"## Table {roman}: {metric} (%)", "",
                  "| Method | ours, mean ± sd (n seeds) | seed: value | paper |", "|---|---|---|---|"]
        for m in order:
            c = cells.get(m, {})
            vals = _values(c, key)
            per = _per_seed(c, seeds, key, 100, 2)
            paper = PAPER_PERCENT[metric].get(title(m) if m != "dlvae_cnn" else "DL-VAE-CNN")
            paper_s = f"{paper:.2f}" if paper is not None else "not reported"
            lines.append(f"| {title(m)} | {_mean_sd(vals, 100)} | {per} | {paper_s} |")
        lines += ["", f"![Fig. {fig}](fig{fig}_{metric}.png)", ""]
    lines += against_paper(cells, order)
    lines += ["## Segmentation on the test patients", "",
              "Models with a mask output. The paper reports no segmentation figure.", "",
              "| Method | " + " | ".join(name for name, _, _ in SEG_METRICS) + " |",
              "|---|" + "---|" * len(SEG_METRICS)]
    for m in order:
        c = cells.get(m, {})
        if not c or m not in SEGMENTERS:
            continue
        row = [f"{_mean_sd(_values(c, key), 1, 2 if key == 'hd95_mean' else 3)}" for _, key, _ in SEG_METRICS]
        lines.append(f"| {title(m)} | " + " | ".join(row) + " |")
    lines += ["", "![segmentation](segmentation.png)", "", "## Training per cell", ""]
    if any(c[s].get("resumed_from") for c in cells.values() for s in c):
        lines += ["Cells resumed after an interruption count only their resumed part in the wall time.", ""]
    lines += [
              "| Method | steps | batch | train slices/s (measured) | train wall per cell (min, mean) | "
              "scored checkpoint step per seed |", "|---|---|---|---|---|---|"]
    for m in order:
        c = cells.get(m, {})
        if not c or m == KMEANS:
            continue
        first = c[min(c)]
        cal = meta["calibration"].get(m, {})
        rate = cal.get("slices_per_s")
        walls = [c[s].get("train_wall_s", 0.0) / 60 for s in sorted(c)]
        best = ", ".join(str(c[s]["test"].get("checkpoint_step", "failed")) for s in sorted(c))
        lines.append(f"| {title(m)} | {first['steps']} | {first['config']['train']['batch_size']} | "
                     f"{'n/a' if rate is None else f'{rate:.1f}'} | {np.mean(walls):.1f} | {best} |")
    return "\n".join(lines) + "\n"


def against_paper(cells: dict, order: list[str]) -> list[str]:
    """One line per paper model: where our mean falls below or above its published figure."""
    from dlvae_jax.eval.evaluate import PAPER_PERCENT

    lines = ["## Against the paper", ""]
    for m in order:
        paper_name = "DL-VAE-CNN" if m == "dlvae_cnn" else title(m)
        if paper_name not in PAPER_PERCENT["accuracy"] or m not in cells:
            continue
        below, above = [], []
        for metric, key, _, _ in CLASS_METRICS:
            vals = _values(cells[m], key)
            if not vals:
                continue
            ours, theirs = float(np.mean(vals)) * 100, PAPER_PERCENT[metric][paper_name]
            (below if ours < theirs else above).append(f"{metric} {ours:.2f} vs {theirs:.2f}")
        text = f"- {title(m)}: "
        text += ("below the paper on " + ", ".join(below)) if below else "not below the paper on any metric"
        text += ("; at or above it on " + ", ".join(above)) if above else ""
        lines.append(text + ".")
    return lines + [""]


def figures(out: Path, order: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dlvae_jax.io import atomic_path
    from dlvae_jax.eval.evaluate import PAPER_PERCENT

    cells = load_cells(out)
    present = [m for m in order if m in cells]
    for metric, key, roman, fig in CLASS_METRICS:
        fig_, ax = plt.subplots(figsize=(7.5, 3.6))
        x = np.arange(len(present))
        means = [np.mean(_values(cells[m], key)) * 100 if _values(cells[m], key) else np.nan for m in present]
        sds = [np.std(_values(cells[m], key), ddof=1) * 100 if len(_values(cells[m], key)) > 1 else 0.0
               for m in present]
        paper = [PAPER_PERCENT[metric].get(title(m) if m != "dlvae_cnn" else "DL-VAE-CNN", np.nan) for m in present]
        ax.bar(x - 0.2, means, 0.4, yerr=sds, capsize=3, label="ours (test patients, mean ± sd)", color="#3b75af")
        ax.bar(x + 0.2, paper, 0.4, label="paper (as published)", color="#bbbbbb")
        for xi, v in zip(x, means):
            if np.isfinite(v):
                ax.text(xi - 0.2, v + 1, f"{v:.1f}", ha="center", fontsize=7)
        ax.set_xticks(x, [title(m).replace(" (no learning)", "\n(no learning)") for m in present], fontsize=8)
        ax.set_ylim(0, 110)
        ax.set_ylabel(f"{metric} (%)")
        ax.set_title(f"Fig. {fig}: slice {metric}, ours vs the paper's Table {roman}", fontsize=10)
        ax.legend(fontsize=7, loc="lower right")
        fig_.tight_layout()
        with atomic_path(out / f"fig{fig}_{metric}.png") as tmp:
            fig_.savefig(tmp, dpi=100, format="png")
        plt.close(fig_)
    seg = [m for m in present if m in SEGMENTERS]
    keys = [(n, k) for n, k, _ in SEG_METRICS if k in ("dice_volume_mean", "dice_volume_median",
                                                        "dice_tumor_slices_mean", "iou_mean")]
    fig_, ax = plt.subplots(figsize=(7.5, 3.4))
    width = 0.8 / max(1, len(seg))
    for i, m in enumerate(seg):
        means = [np.mean(_values(cells[m], k)) if _values(cells[m], k) else np.nan for _, k in keys]
        sds = [np.std(_values(cells[m], k), ddof=1) if len(_values(cells[m], k)) > 1 else 0.0 for _, k in keys]
        ax.bar(np.arange(len(keys)) + (i - (len(seg) - 1) / 2) * width, means, width, yerr=sds, capsize=3,
               label=title(m))
    ax.set_xticks(np.arange(len(keys)), [n for n, _ in keys], fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_title("Segmentation on the test patients (mean ± sd over seeds)", fontsize=10)
    if seg:
        ax.legend(fontsize=7)
    fig_.tight_layout()
    with atomic_path(out / "segmentation.png") as tmp:
        fig_.savefig(tmp, dpi=100, format="png")
    plt.close(fig_)


def _machine() -> str:
    import jax

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    dev = jax.devices()[0]
    kind = dev.device_kind if dev.platform != "cpu" else f"CPU ({cpu}, {os.cpu_count()} cores)"
    return f"{jax.device_count()} x {kind}, jax {jax.__version__}"


def _fmt_wall(seconds: float) -> str:
    return f"{int(seconds // 60)} min {int(seconds % 60)} s"


def write_outputs(out: Path, order: list[str], args, calibration: dict, n_patients: int) -> None:
    from dlvae_jax.io import write_text

    cells = load_cells(out)
    wall = sum(c.get("cell_wall_s", 0.0) for m in cells.values() for c in m.values())
    budget = (f"a fixed {args.steps} steps per cell for every model" if args.steps else
              f"{args.budget_min:g} min of training per cell for every model, turned into a step count from each "
              "model's train-step speed measured on this machine at the start (compile, data loading, validation "
              "and checkpoints not counted, so wall times per cell differ somewhat; see the last table)")
    meta = {"command": " ".join(["python", "experiments/tables.py"] + _shown_argv(args)),
            "split_seed": args.split_seed, "data_dir": _shown_path(args.data_dir), "n_patients_total": n_patients,
            "budget": budget, "machine": _machine(), "wall": _fmt_wall(wall), "calibration": calibration}
    write_text(out / "tables.md", render(out, order, meta))
    figures(out, order)


def _shown_path(p: Path) -> str:
    try:
        return os.path.relpath(p)
    except ValueError:
        return str(p)


def _shown_argv(args) -> list[str]:
    argv = ["--data-dir", _shown_path(args.data_dir), "--seeds", str(args.seeds), "--out", _shown_path(args.out)]
    argv += ["--steps", str(args.steps)] if args.steps else ["--budget-min", f"{args.budget_min:g}"]
    if args.split_seed:
        argv += ["--split-seed", str(args.split_seed)]
    if args.runs != Path("workdir/tables"):
        argv += ["--runs", _shown_path(args.runs)]
    if args.models != list(MODELS) + [KMEANS]:
        argv += ["--models", ",".join(args.models)]
    for s in args.set or []:
        argv += ["--set", s]
    return argv


# ----------------------------------------------------------------------------- main


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Tables I-IV of Rao et al. over seeds (see the module docstring).")
    p.add_argument("--data-dir", type=Path, required=True, help="LGG data in the kaggle_3m layout")
    p.add_argument("--seeds", type=int, default=3, help="number of seeds, 0..N-1 (default 3)")
    p.add_argument("--out", type=Path, default=Path("experiments/results"), help="results folder")
    p.add_argument("--runs", type=Path, default=Path("workdir/tables"), help="training workdirs (checkpoints)")
    p.add_argument("--budget-min", type=float, default=4.5, help="training minutes per cell (default 4.5)")
    p.add_argument("--steps", type=int, default=0, help="a fixed step count instead of --budget-min")
    p.add_argument("--models", default=",".join(list(MODELS) + [KMEANS]),
                   help=f"comma-separated subset of {', '.join(list(MODELS) + [KMEANS])}")
    p.add_argument("--split-seed", type=int, default=0)
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="config override for every model")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    bad = [m for m in args.models if m not in MODELS and m != KMEANS]
    if bad:
        p.error(f"--models: unknown {', '.join(bad)} (choose from {', '.join(list(MODELS) + [KMEANS])})")
    if not 1 <= args.seeds <= 100:
        p.error(f"--seeds must be in [1, 100], got {args.seeds}")
    if args.steps < 0 or (not args.steps and not (0 < args.budget_min <= 24 * 60)):
        p.error("--budget-min must be in (0, 1440] minutes, or give --steps > 0")
    if not args.data_dir.is_dir():
        p.error(f"--data-dir {args.data_dir}: no such folder")
    return args


def main(argv=None) -> int:
    from dlvae_jax import outdir, signals
    from dlvae_jax.data import lgg
    from dlvae_jax.io import write_json
    from dlvae_jax.eval.evaluate import json_safe
    from dlvae_jax.train.loop import NonFiniteLoss

    args = parse_args(argv)
    order = [m for m in list(MODELS) + [KMEANS] if m in args.models]
    with signals.handle_signals():
        try:
            with outdir.run_folder(args.out, "tables", accept=("loss_ablation",), inputs=[args.data_dir]) as out:
                (out / "metrics").mkdir(exist_ok=True)
                n_patients = len(lgg.scan(args.data_dir).patients)
                learned = [m for m in order if m != KMEANS]
                calibration = calibrate(learned, args, out)
                check_cells(out, calibration, args)
                for seed in range(args.seeds):
                    for model in order:
                        path = out / "metrics" / f"{model}_seed{seed}.json"
                        if path.exists():
                            continue
                        t0 = time.perf_counter()
                        print(f"tables: {title(model)}, seed {seed}", file=sys.stderr, flush=True)
                        if model == KMEANS:
                            rec = run_kmeans(seed, args)
                        else:
                            try:
                                rec = run_cell(model, seed, int(calibration[model]["steps"]), args)
                            except NonFiniteLoss as err:  # deterministic for the seed: recorded, not retried
                                print(f"tables: {title(model)}, seed {seed} failed: {err}", file=sys.stderr)
                                rec = {"model": model, "seed": seed, "steps": int(calibration[model]["steps"]),
                                       "failed": str(err), "test": {}, "train_wall_s": 0.0}
                        rec["cell_wall_s"] = round(time.perf_counter() - t0, 1)
                        rec["budget_key"] = calibration_key(args)
                        rec["finished"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
                        write_json(path, json_safe(rec))
                        t = rec["test"]
                        line = {"model": model, "seed": seed, "steps": rec["steps"], "wall_s": rec["cell_wall_s"],
                                "failed": bool(rec.get("failed")),
                                **{k: _finite(t.get(k)) for _, k, _, _ in CLASS_METRICS},
                                "dice_volume_mean": _finite(t.get("dice_volume_mean"))}
                        with open(out / "log.jsonl", "a") as log:
                            log.write(json.dumps(line) + "\n")
                        print("tables: " + json.dumps(line), file=sys.stderr, flush=True)
                        write_outputs(out, order, args, calibration, n_patients)
                write_outputs(out, order, args, calibration, n_patients)
            print(f"tables: wrote {args.out / 'tables.md'}")
            return 0
        except DlvaeError as err:
            print(f"tables: error: {err}", file=sys.stderr)
            return 2
        except KeyboardInterrupt as err:
            code = getattr(err, "exit_code", 130)
            print(f"tables: interrupted; finished cells are kept in {args.out / 'metrics'}, rerun to continue",
                  file=sys.stderr)
            if signals.received() is not None:
                signals.exit_now(code)
            return code


if __name__ == "__main__":
    sys.exit(main())
