"""`dlvae-jax classical`: the paper's classical stages end to end on a data folder.

FLAIR slice -> head mask -> histogram equalization inside the head (Eq. 1)
-> K-means clusters (Eqs. 2-3) -> tumor-candidate ROI, scored against the
ground-truth masks (see `dlvae_jax.ops.classical`). Without
`--data-dir` it runs on a synthetic phantom dataset generated into the output
folder, so it works out of the box.

The output folder holds `summary.json` (counts, metrics, timings),
`slices.jsonl` (one line per slice), `log.jsonl` (one line per batch),
`dice_per_patient.png` and `overlays/*.png`. Everything is written into a
temporary folder beside the output and renamed into place at the end (see
`dlvae_jax.outdir`).

A slice with no brain (FLAIR flat or nearly so: fewer than 1% of its pixels
more than 16 grey levels above its darkest) gets an empty ROI: K-means would
otherwise split noise and call the brightest speck a tumor. The summary
counts such slices as `n_blank_slices`.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np

from dlvae_jax import metrics, options, report
from dlvae_jax.errors import DlvaeError, print_warning
from dlvae_jax.outdir import output_folder

BLANK_LEVELS = 16       # grey levels above a slice's darkest that count as signal
BLANK_FRACTION = 0.01   # below this fraction of signal pixels a slice has no brain


def _batches(n: int, size: int):
    for start in range(0, n, size):
        yield start, min(start + size, n)


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


def classical_roi(flair_BxHxW: np.ndarray, key, first_slice: int = 0, *, k: int = 4, n_init: int = 10,
                  min_size: int = 64, margin: int = 8, equalize: str = "head") -> np.ndarray:
    """The K-means tumor-candidate ROI of each slice, bool [B, H, W], blank slices emptied.

    flair_BxHxW: uint8 FLAIR slices; key: a PRNG key, folded with each slice's
    index `first_slice + i`, so the ROI of a slice does not depend on how the
    slices are batched.
    """
    import jax

    run = _classical_fn(k, n_init, min_size, margin, equalize)
    roi = np.array(jax.device_get(run(np.asarray(flair_BxHxW), key, first_slice)[2]), bool)
    roi[blank_slices(flair_BxHxW)] = False
    return roi


def blank_slices(flair_BxHxW: np.ndarray) -> np.ndarray:
    """bool [B]: slices with no brain (flat or near-flat FLAIR), whose ROI is left empty."""
    flair = np.asarray(flair_BxHxW)
    floor = flair.min(axis=(1, 2), keepdims=True).astype(np.int32)
    signal = (flair.astype(np.int32) > floor + BLANK_LEVELS).mean(axis=(1, 2))
    return signal < BLANK_FRACTION


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
    overwrite: bool = False,
    skip_bad: bool = False,
) -> dict:
    """Runs the classical pipeline into `out_dir` (written atomically); returns the summary.

    `out_dir` follows `dlvae_jax.outdir.output_folder`: it must not exist or be
    empty, or carry our marker when `overwrite` is set, and it must not
    overlap `data_dir`.
    """
    import jax
    from tqdm import tqdm

    from dlvae_jax.data import lgg
    from dlvae_jax.data.synth import synthesize_into

    out_dir = Path(out_dir)
    if data_dir is not None and not Path(data_dir).is_dir():
        raise DlvaeError(f"{data_dir}: no such data folder")
    with output_folder(out_dir, "classical", overwrite=overwrite, inputs=[data_dir]) as tmp:
        if data_dir is None:
            source = synthesize_into(tmp / "data", n_patients=synth_patients, seed=seed)
            source_name = f"synthetic phantoms ({synth_patients} patients, seed {seed}) in {out_dir / 'data'}"
        else:
            source, source_name = Path(data_dir), str(data_dir)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", lgg.DataWarning)  # printed below as plain lines
            index = lgg.scan(source, skip_bad=skip_bad)
        for note in index.warnings:
            print_warning(note)
        for _, fault in index.skipped:
            print_warning(f"skipped (--skip-bad): {fault}")
        records = list(index.records)
        batch_size = min(batch_size, len(records))  # no padding beyond the data set
        run = _classical_fn(k, n_init, min_size, margin, equalize)
        key = jax.random.key(seed)

        (tmp / "overlays").mkdir()
        overlay_ids = report.overlay_choice([r.has_tumor for r in records], n_overlays)

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
                equalized, labels, roi = equalized[:n], labels[:n], np.array(roi[:n])
                blank = blank_slices(flair)
                roi[blank] = False
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
                        "blank": bool(blank[j]),
                        "tumor_pixels": int(t.sum()),
                        "roi_pixels": int(roi[j].sum()),
                        "overlap_pixels": c["tp"],
                        "dice": metrics.dice_from_counts(c),
                    })
                    if start + j in overlay_ids:
                        report.save_overlay(
                            tmp / "overlays" / f"{rec.patient}_{rec.slice_number:03d}.png",
                            flair[j], t, roi[j],
                            title=f"{rec.patient} slice {rec.slice_number}",
                            panels=[(flair[j], "FLAIR", "gray"), (equalized[j], "equalized (Eq. 1)", "gray"),
                                    (labels[j], "K-means clusters", "viridis")],
                            overlay_title="truth (green) vs K-means ROI (red)",
                        )
                log.write(json.dumps({"batch": b, "slices": n, "seconds": round(elapsed, 4)}) + "\n")
                bar.update(n)
        bar.close()

        with open(tmp / "slices.jsonl", "w") as f:
            for row in slice_rows:
                f.write(json.dumps(row) + "\n")
        dice_volume = {p: metrics.dice_from_counts(c) for p, c in volume_counts.items()}
        report.save_dice_plot(tmp / "dice_per_patient.png", dice_volume,
                              title="K-means ROI: Dice per patient volume")
        pixel_counts = {name: sum(c[name] for c in volume_counts.values()) for name in ("tp", "fp", "tn", "fn")}
        tumor_dice = [r["dice"] for r in slice_rows if r["tumor"]]
        steady = len(records) - batch_size
        summary = {
            "data": source_name,
            "n_patients": len(index.patients),
            "n_slices": len(records),
            "n_tumor_slices": int(sum(true_slice)),
            "n_blank_slices": int(sum(r["blank"] for r in slice_rows)),
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
    table = report.metrics_table([
        ("slice accuracy (Eq. 13)", s["accuracy"]),
        ("slice precision (Eq. 14)", s["precision"]),
        ("slice recall (Eq. 15)", s["recall"]),
        ("slice F1 (Eq. 16)", s["f1"]),
        ("pixel precision", p["precision"]),
        ("pixel recall", p["recall"]),
        ("pixel F1", p["f1"]),
        ("Dice per volume, mean", summary["dice_volume_mean"]),
        ("Dice per volume, median", summary["dice_volume_median"]),
        ("Dice, tumor slices, mean", summary["dice_tumor_slices_mean"]),
    ], header=("metric", "value"))
    lines = [
        f"data: {summary['data']}",
        f"patients {summary['n_patients']}, slices {summary['n_slices']} "
        f"({summary['n_tumor_slices']} with tumor, {summary.get('n_blank_slices', 0)} without brain: "
        f"empty ROI), k = {summary['k']}",
        "",
        table,
        "",
        f"compile + first batch {summary['compile_and_first_batch_s']} s on {summary['device']}"
        + ("" if summary["steady_slices_per_s"] is None else f"; then {summary['steady_slices_per_s']} slices/s"),
    ]
    return "\n".join(lines)


def _cmd_classical(args) -> int:
    out = Path(args.out)
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
        overwrite=args.overwrite,
        skip_bad=args.skip_bad,
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
    p.add_argument("--out", required=True,
                   help="output folder (created; must not exist or be empty, or be one dlvae-jax made "
                        "when --overwrite is given)")
    p.add_argument("--data-dir", default=None,
                   help="LGG-layout folder; default: synthetic phantoms written to OUT/data")
    p.add_argument("--patients", type=options.BOUNDS["--patients"], default=6,
                   help="synthetic patients when no --data-dir")
    p.add_argument("--seed", type=options.seed, default=0, help="seed of the synthetic data and the K-means keys")
    p.add_argument("--k", type=options.BOUNDS["--k"], default=4, help="K-means clusters, 2..255")
    p.add_argument("--n-init", type=options.BOUNDS["--n-init"], default=10, help="K-means restarts, best kept")
    p.add_argument("--min-size", type=options.BOUNDS["--min-size"], default=64,
                   help="ROI components smaller than this many pixels are dropped")
    p.add_argument("--margin", type=options.BOUNDS["--margin"], default=8,
                   help="pixels eroded from the head mask to drop the scalp rim")
    p.add_argument("--equalize", choices=("head", "whole"), default="head",
                   help="equalize and cluster inside the head, or the whole slice as the paper does")
    p.add_argument("--batch-size", type=options.BOUNDS["--batch-size"], default=64, help="slices per batch")
    p.add_argument("--overlays", type=options.BOUNDS["--overlays"], default=8, help="overlay PNGs to write")
    p.add_argument("--skip-bad", action="store_true", help="skip bad slices and report them instead of failing")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing output folder made by dlvae-jax (never any other folder)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_classical)
