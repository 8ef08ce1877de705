"""`dlvae-jax classical`: the paper's classical stages end to end on a data folder.

FLAIR slice -> head mask -> histogram equalization inside the head (Eq. 1)
-> K-means clusters (Eqs. 2-3) -> tumor-candidate ROI, scored against the
ground-truth masks (see `dlvae_jax.ops.classical`). Without
`--data-dir` it runs on a synthetic phantom dataset generated into the output
folder, so it works out of the box.

The output folder holds `summary.json` (counts, metrics, timings),
`slices.jsonl` (one line per slice), `log.jsonl` (one line per batch),
`dice_per_patient.png` and `overlays/*.png`. Everything is written into a
temporary folder beside the output and renamed into place at the end.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from dlvae_jax import metrics
from dlvae_jax.errors import DlvaeError
from dlvae_jax.io import atomic_path


def _batches(n: int, size: int):
    for start in range(0, n, size):
        yield start, min(start + size, n)


def _evenly(ids: list[int], m: int) -> list[int]:
    if m <= 0 or not ids:
        return []
    return [ids[i] for i in np.unique(np.linspace(0, len(ids) - 1, min(m, len(ids))).round().astype(int))]


def _overlay_choice(has_tumor: list[bool], n: int) -> set[int]:
    """Up to n slice indices, half with tumor, spread evenly through the dataset."""
    tumor = [i for i, t in enumerate(has_tumor) if t]
    other = [i for i, t in enumerate(has_tumor) if not t]
    chosen = _evenly(tumor, (n + 1) // 2)
    return set(chosen + _evenly(other, n - len(chosen)))


@functools.lru_cache(maxsize=4)  # one compiled function per setting, reused by later runs in the process
def _classical_fn(k: int, n_init: int, min_size: int, margin: int, equalize: str):
    import jax
    import jax.numpy as jnp

    from dlvae_jax.ops import classical_stages

    @jax.jit
    def run(flair_BxHxW, key, first_slice):
        # One key per slice, from its index in the dataset: results do not depend on --batch-size.
        ids_B = first_slice + jnp.arange(flair_BxHxW.shape[0])
        keys_B = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, ids_B)
        res = classical_stages(
            flair_BxHxW, keys_B, k=k, n_init=n_init, margin=margin, min_size=min_size, equalize=equalize
        )
        return res.equalized_BxHxW, res.labels_BxHxW, res.roi_BxHxW

    return run


def _save_overlay(path: Path, title: str, flair, equalized, labels, roi, truth) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(12, 3.3))
    panels = [
        (flair, "FLAIR", "gray"), (equalized, "equalized (Eq. 1)", "gray"), (labels, "K-means clusters", "viridis")
    ]
    for ax, (img, name, cmap) in zip(axes, panels):
        ax.imshow(img, cmap=cmap, interpolation="nearest")
        ax.set_title(name, fontsize=9)
    axes[3].imshow(flair, cmap="gray", interpolation="nearest")
    if truth.any():
        axes[3].contour(truth, levels=[0.5], colors="lime", linewidths=1.0)
    if roi.any():
        axes[3].contour(roi, levels=[0.5], colors="red", linewidths=1.0)
    axes[3].set_title("truth (green) vs K-means ROI (red)", fontsize=9)
    for ax in axes:
        ax.axis("off")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def _save_dice_plot(path: Path, per_patient: dict[str, float]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = sorted(per_patient)
    fig, ax = plt.subplots(figsize=(max(4, 0.35 * len(names) + 1), 3.2))
    ax.bar(range(len(names)), [per_patient[n] for n in names], color="tab:red")
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=90, fontsize=6)
    ax.set_ylim(0, 1)
    ax.set_ylabel("Dice per volume")
    ax.set_title("K-means ROI: Dice per patient volume")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run_classical(
    out_dir: Path,
    data_dir: Path | None,
    *,
    k: int = 4,
    seed: int = 0,
    batch_size: int = 64,
    n_init: int = 10,
    min_size: int = 64,
    margin: int = 8,
    n_overlays: int = 8,
    synth_patients: int = 6,
    equalize: str = "head",
    progress: bool = True,
) -> dict:
    """Runs the classical pipeline into `out_dir` (written atomically); returns the summary."""
    import jax
    from tqdm import tqdm

    from dlvae_jax.data import lgg
    from dlvae_jax.data.synth import synthesize

    out_dir = Path(out_dir)
    with atomic_path(out_dir, replace_dir=True) as tmp:  # --overwrite was checked by the caller
        tmp.mkdir()
        if data_dir is None:
            source = synthesize(tmp / "data", n_patients=synth_patients, seed=seed)
            source_name = f"synthetic phantoms ({synth_patients} patients, seed {seed}) in {out_dir / 'data'}"
        else:
            source, source_name = Path(data_dir), str(data_dir)
        index = lgg.scan(source)
        records = list(index.records)
        batch_size = min(batch_size, len(records))  # no padding beyond the data set
        run = _classical_fn(k, n_init, min_size, margin, equalize)
        key = jax.random.key(seed)

        (tmp / "overlays").mkdir()
        overlay_ids = _overlay_choice([r.has_tumor for r in records], n_overlays)

        slice_rows, pred_slice, true_slice = [], [], []
        volume_counts: dict[str, dict[str, int]] = {}
        compile_s, compute_s = 0.0, 0.0
        bar = tqdm(total=len(records), desc="classical", unit="slice", disable=not progress)
        with open(tmp / "log.jsonl", "w") as log:
            for b, (start, stop) in enumerate(_batches(len(records), batch_size)):
                flair, truth = lgg.load_arrays(records[start:stop], channels="flair")
                n = stop - start
                # Pad the last batch to the compiled shape; the padding is cut off below.
                flair_in = np.pad(flair, ((0, batch_size - n), (0, 0), (0, 0)))
                t0 = time.perf_counter()
                equalized, labels, roi = jax.device_get(run(flair_in, key, start))
                elapsed = time.perf_counter() - t0
                if b == 0:
                    compile_s = elapsed
                else:
                    compute_s += elapsed
                equalized, labels, roi = equalized[:n], labels[:n], roi[:n]
                for j, rec in enumerate(records[start:stop]):
                    t = truth[j] > 0
                    c = metrics.confusion(roi[j], t)
                    vol = volume_counts.setdefault(rec.patient, {"tp": 0, "fp": 0, "tn": 0, "fn": 0})
                    for name in vol:
                        vol[name] += c[name]
                    pred_slice.append(bool(roi[j].any()))
                    true_slice.append(bool(t.any()))
                    slice_rows.append({
                        "patient": rec.patient,
                        "slice": rec.slice_number,
                        "tumor": bool(t.any()),
                        "tumor_pixels": int(t.sum()),
                        "roi_pixels": int(roi[j].sum()),
                        "overlap_pixels": c["tp"],
                        "dice": metrics.dice_from_counts(c),
                    })
                    if start + j in overlay_ids:
                        _save_overlay(
                            tmp / "overlays" / f"{rec.patient}_{rec.slice_number:03d}.png",
                            f"{rec.patient} slice {rec.slice_number}",
                            flair[j], equalized[j], labels[j], roi[j], t,
                        )
                log.write(json.dumps({"batch": b, "slices": n, "seconds": round(elapsed, 4)}) + "\n")
                bar.update(n)
        bar.close()

        with open(tmp / "slices.jsonl", "w") as f:
            for row in slice_rows:
                f.write(json.dumps(row) + "\n")
        dice_volume = {p: metrics.dice_from_counts(c) for p, c in volume_counts.items()}
        _save_dice_plot(tmp / "dice_per_patient.png", dice_volume)
        pixel_counts = {name: sum(c[name] for c in volume_counts.values()) for name in ("tp", "fp", "tn", "fn")}
        tumor_dice = [r["dice"] for r in slice_rows if r["tumor"]]
        steady = len(records) - batch_size
        summary = {
            "data": source_name,
            "n_patients": len(index.patients),
            "n_slices": len(records),
            "n_tumor_slices": int(sum(true_slice)),
            "k": k,
            "equalize": equalize,
            "seed": seed,
            "slice": metrics.classification_metrics(metrics.confusion(np.array(pred_slice), np.array(true_slice))),
            "pixel": metrics.classification_metrics(pixel_counts),
            "dice_volume_mean": float(np.mean(list(dice_volume.values()))),
            "dice_volume_median": float(np.median(list(dice_volume.values()))),
            "dice_tumor_slices_mean": float(np.mean(tumor_dice)) if tumor_dice else None,
            "dice_volume": dice_volume,
            "compile_and_first_batch_s": round(compile_s, 3),
            "steady_slices_per_s": round(steady / compute_s, 1) if compute_s > 0 else None,
            "device": str(jax.devices()[0].platform),
        }
        (tmp / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    return summary


def format_summary(summary: dict) -> str:
    s, p = summary["slice"], summary["pixel"]
    tumor_dice = summary["dice_tumor_slices_mean"]
    tumor_dice = "n/a" if tumor_dice is None else f"{tumor_dice:.4f}"
    lines = [
        f"data: {summary['data']}",
        f"patients {summary['n_patients']}, slices {summary['n_slices']} "
        f"({summary['n_tumor_slices']} with tumor), k = {summary['k']}",
        "",
        f"{'metric':<28}{'value':>8}",
        f"{'slice accuracy (Eq. 13)':<28}{s['accuracy']:>8.4f}",
        f"{'slice precision (Eq. 14)':<28}{s['precision']:>8.4f}",
        f"{'slice recall (Eq. 15)':<28}{s['recall']:>8.4f}",
        f"{'slice F1 (Eq. 16)':<28}{s['f1']:>8.4f}",
        f"{'pixel precision':<28}{p['precision']:>8.4f}",
        f"{'pixel recall':<28}{p['recall']:>8.4f}",
        f"{'pixel F1':<28}{p['f1']:>8.4f}",
        f"{'Dice per volume, mean':<28}{summary['dice_volume_mean']:>8.4f}",
        f"{'Dice per volume, median':<28}{summary['dice_volume_median']:>8.4f}",
        f"{'Dice, tumor slices, mean':<28}{tumor_dice:>8}",
        "",
        f"compile + first batch {summary['compile_and_first_batch_s']} s on {summary['device']}"
        + ("" if summary["steady_slices_per_s"] is None else f"; then {summary['steady_slices_per_s']} slices/s"),
    ]
    return "\n".join(lines)


def _cmd_classical(args) -> int:
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise DlvaeError(f"{out}: exists and is not a folder")
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise DlvaeError(f"{out}: already exists and is not empty (pass --overwrite to replace it)")
    if args.data_dir is not None:
        data = Path(args.data_dir)
        if not data.is_dir():
            raise DlvaeError(f"{data}: no such data folder")
        if out.resolve() == data.resolve() or out.resolve() in data.resolve().parents:
            raise DlvaeError(f"{out}: holds the data folder {data}; choose another --out")
    for name, value, least in [("k", args.k, 2), ("n-init", args.n_init, 1), ("batch-size", args.batch_size, 1),
                               ("patients", args.patients, 1), ("margin", args.margin, 0),
                               ("min-size", args.min_size, 0), ("overlays", args.overlays, 0)]:
        if value < least:
            raise DlvaeError(f"--{name} must be at least {least}, got {value}")
    summary = run_classical(
        out,
        None if args.data_dir is None else Path(args.data_dir),
        k=args.k,
        seed=args.seed,
        batch_size=args.batch_size,
        n_init=args.n_init,
        min_size=args.min_size,
        margin=args.margin,
        n_overlays=args.overlays,
        synth_patients=args.patients,
        equalize=args.equalize,
        progress=not args.quiet and sys.stderr.isatty(),
    )
    print(format_summary(summary))
    print(f"\nwrote {out}{os.sep}: summary.json, slices.jsonl, log.jsonl, dice_per_patient.png, overlays/")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "classical",
        help="equalize, K-means and ROI on a data folder (synthetic by default); write metrics and overlays",
        description=__doc__,
    )
    p.add_argument("--out", required=True, help="output folder (created; must be empty unless --overwrite)")
    p.add_argument("--data-dir", default=None,
                   help="LGG-layout folder; default: synthetic phantoms written to OUT/data")
    p.add_argument("--patients", type=int, default=6, help="synthetic patients when no --data-dir (default 6)")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic data and the K-means keys")
    p.add_argument("--k", type=int, default=4, help="K-means clusters (default 4)")
    p.add_argument("--n-init", type=int, default=10, help="K-means restarts, best kept (default 10)")
    p.add_argument("--min-size", type=int, default=64, help="ROI components smaller than this many pixels are dropped")
    p.add_argument("--margin", type=int, default=8, help="pixels eroded from the head mask to drop the scalp rim")
    p.add_argument("--equalize", choices=("head", "whole"), default="head",
                   help="equalize and cluster inside the head (default) or the whole slice, as the paper does")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--overlays", type=int, default=8, help="overlay PNGs to write (default 8)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_classical)
