"""Input pipeline throughput: slices/s to device-ready 256x256 batches of 64.

Two paths, both ending in global jax.Arrays sharded on the batch axis:
  array_record: lgg_mri TFDS source -> grain (shuffle, batch, threads) -> device
  tiff:         tifffile decode of the .tif files (thread pool)       -> device

Then the training loader of a run (`dlvae_jax.data.source.split_loader`) on
the train split of the seed-0 patient split, both sources, host batches as
the training loop takes them (`next(host_iterator(train_dataset(...)))`):
  memory:       TIFFs decoded into arrays once (load time printed apart)
  array_record: the run's cache (build time and reuse check printed apart)

Uses the real data at ../shared/data/lgg/kaggle_3m when present, otherwise a
synthetic dataset (written to a temporary folder, nothing downloaded).

    python benchmarks/bench_data.py [--data-dir DIR] [--epochs 3] [--threads 4] [--loaders-only]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

from dlvae_jax.data import lgg, pipeline, source, tfds_lgg
from dlvae_jax.data.pipeline import Shard
from dlvae_jax.data.splits import make_splits
from dlvae_jax.data.synth import synthesize
from dlvae_jax.train import runners

REPO_ROOT = Path(__file__).resolve().parents[1]
REAL = REPO_ROOT.parent / "shared" / "data" / "lgg" / "kaggle_3m"
BATCH = 64


def _drain(batches, sharding) -> tuple[int, float]:
    it = runners.device_iterator(batches, lambda b: runners.to_global(b, sharding))
    first = next(it)  # warm-up: thread start, first reads
    jax.block_until_ready(first)
    n, t0 = 0, time.perf_counter()
    last = first
    for b in it:
        n += b["image_BxHxWxC"].shape[0]
        last = b
    jax.block_until_ready(last)
    return n, time.perf_counter() - t0


def bench_array_record(tfds_dir, sharding, epochs, threads, prefetch) -> float:
    ds = pipeline.train_dataset(tfds_dir, "train", BATCH, seed=0, num_epochs=epochs + 1, shard=Shard(0, 1))
    n, dt = _drain(pipeline.host_iterator(ds, num_threads=threads, prefetch=prefetch), sharding)
    return n / dt


def bench_tiff(index, sharding, epochs, threads) -> float:
    records = list(index.records)
    rng = np.random.default_rng(0)

    def batches():
        for _ in range(epochs + 1):
            order = rng.permutation(len(records))
            for s in range(0, len(order) - BATCH + 1, BATCH):
                images, masks = lgg.load_arrays([records[i] for i in order[s:s + BATCH]], num_threads=threads)
                yield {"image_BxHxWxC": images[..., None], "mask_BxHxW": masks, "valid_B": np.ones(BATCH, bool)}

    n, dt = _drain(batches(), sharding)
    return n / dt


def _drain_host(it) -> tuple[int, float]:
    next(it)  # warm-up: thread start, first reads
    n, t0 = 0, time.perf_counter()
    for b in it:
        n += b["image_BxHxWxC"].shape[0]
    return n, time.perf_counter() - t0


def bench_loaders(index, cache_dir: Path, epochs: int, threads: int, prefetch: int) -> None:
    """Train loader slices/s of both sources on the same split and seed; set-up times apart."""
    splits = make_splits(index, 0)
    n = len(index.for_patients(splits["train"]))
    batch = min(BATCH, n)
    print(f"train loader (split_loader), seed-0 split: train {n} slices, batch {batch}, flair, "
          f"{threads} threads, {epochs} epochs")
    for kind in ("memory", "array_record"):
        t0 = time.perf_counter()
        loader = source.split_loader(index, splits, "train", "flair", source=kind, cache_dir=cache_dir)
        if kind == "memory":
            loader.load()
            setup = f"TIFF load {time.perf_counter() - t0:.2f} s"
        else:
            build_s = time.perf_counter() - t0
            t1 = time.perf_counter()
            again = source.split_loader(index, splits, "train", "flair", source=kind, cache_dir=cache_dir)
            assert again.built is False
            setup = f"cache build {build_s:.2f} s (all 3 splits), reuse check {time.perf_counter() - t1:.3f} s"
        ds = pipeline.train_dataset(loader, global_batch_size=batch, seed=0, num_epochs=epochs + 1,
                                    shard=Shard(0, 1))
        got, dt = _drain_host(iter(pipeline.host_iterator(ds, num_threads=threads, prefetch=prefetch)))
        print(f"  {kind:12s} {got / dt:8.0f} slices/s   ({setup})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", type=Path, default=None)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=min(4, 2 * (os.cpu_count() or 1)))
    ap.add_argument("--prefetch", type=int, default=8, help="host batches in flight")
    ap.add_argument("--tiff-epochs", type=int, default=1)
    ap.add_argument("--loaders-only", action="store_true", help="only the train loader comparison")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        data_dir = args.data_dir or (REAL if REAL.is_dir() else None)
        if data_dir is None:
            data_dir = synthesize(Path(tmp) / "synth", n_patients=16, seed=0, size=256, slices_per_patient=40)
            label = "synthetic (16 patients x 40 slices)"
        else:
            label = os.path.relpath(data_dir, REPO_ROOT)
        index = lgg.scan(data_dir)
        print(f"data: {label}: {len(index)} slices {index.image_shape}; {os.cpu_count()} CPU cores; "
              f"devices: {jax.device_count()} x {jax.devices()[0].platform}")
        bench_loaders(index, Path(tmp) / "cache", args.epochs, args.threads, args.prefetch)
        if args.loaders_only:
            return
        tfds_dir = Path(tmp) / "tfds"
        t0 = time.perf_counter()
        # All patients in one split: the benchmark reads every slice.
        tfds_lgg.build(data_dir, tfds_dir, fractions=(1.0, 0.0, 0.0), index=index)
        build_s = time.perf_counter() - t0
        sharding = runners.batch_sharding(runners.data_mesh())
        if len(index) < 8 * BATCH:
            print(f"note: only {len(index)} slices; figures below are dominated by warm-up and prefetch")
        print(f"tfds build: {build_s:.1f} s ({len(index) / build_s:.0f} slices/s)")
        ar = bench_array_record(tfds_dir, sharding, args.epochs, args.threads, args.prefetch)
        print(f"array_record -> grain -> device, batch {BATCH}, flair 256x256, {args.threads} threads: "
              f"{ar:.0f} slices/s")
        tf = bench_tiff(index, sharding, args.tiff_epochs, args.threads)
        print(f"tiff (tifffile) -> device, batch {BATCH}, flair 256x256, {args.threads} threads: {tf:.0f} slices/s")
        print(f"target >= 2000 slices/s from array_record: {'met' if ar >= 2000 else 'NOT met'}")


if __name__ == "__main__":
    main()
