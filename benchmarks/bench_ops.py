"""Classical-stage throughput: JAX against OpenCV, scikit-image and scikit-learn.

For a batch of 512 FLAIR slices (256x256; the real data at
../shared/data/lgg/kaggle_3m when present, synthetic phantoms otherwise):

  equalize_hist (jitted, whole batch)  vs  cv2.equalizeHist loop, skimage.exposure.equalize_hist loop
  kmeans_image k=4, n_init=10          vs  sklearn KMeans(4, n_init=10) loop over the pixels

Every ratio is measured in this run. Compile time is reported apart; steady
figures are the best of --repeats timed runs. scikit-learn is timed on a subset
(--sklearn-slices, default 24) because one slice takes ~0.15 s; its per-slice
cost does not depend on the batch. Ends with one JSON line of all figures.

    python benchmarks/bench_ops.py [--data-dir DIR] [--slices 512] [--repeats 5]
"""

from __future__ import annotations

import argparse
import warnings
import datetime
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import cv2
import jax
import numpy as np
from skimage import exposure
from sklearn.cluster import KMeans

from dlvae_jax.data import lgg
from dlvae_jax.data.synth import synthesize
from dlvae_jax.ops import equalize_hist, kmeans_image

REPO_ROOT = Path(__file__).resolve().parents[1]
REAL = REPO_ROOT.parent / "shared" / "data" / "lgg" / "kaggle_3m"


def _load(data_dir: Path | None, n: int) -> tuple[np.ndarray, str]:
    if data_dir is None and REAL.is_dir():
        data_dir = Path(os.path.relpath(REAL))
    if data_dir is None:
        tmp = Path(tempfile.mkdtemp(prefix="bench_ops_"))
        data_dir = synthesize(tmp / "synth", n_patients=max(1, n // 20 + 1), seed=0)
    index = lgg.scan(data_dir)
    records = list(index.records)
    records = (records * (n // len(records) + 1))[:n]  # repeat if the folder is small
    flair, _ = lgg.load_arrays(records, channels="flair")
    return flair, str(data_dir)


def _best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def _first_call(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, default=None)
    parser.add_argument("--slices", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--sklearn-slices", type=int, default=24)
    parser.add_argument("--skimage-slices", type=int, default=128)
    args = parser.parse_args()
    # Blank end slices have fewer distinct levels than clusters; sklearn warns on each.
    warnings.filterwarnings("ignore", message="Number of distinct clusters")

    flair, source = _load(args.data_dir, args.slices)
    n = len(flair)
    device = jax.devices()[0]
    print(f"data: {source}: {n} FLAIR slices {flair.shape[1]}x{flair.shape[2]}; device: {device.device_kind} ({device.platform})")
    x = jax.device_put(flair)
    key = jax.random.key(0)

    eq = lambda: jax.block_until_ready(equalize_hist(x))  # noqa: E731
    eq_compile = _first_call(eq)
    eq_s = _best(eq, args.repeats)
    cv_s = _best(lambda: [cv2.equalizeHist(im) for im in flair], args.repeats)
    sub = flair[: args.skimage_slices]
    sk_eq_s = _best(lambda: [exposure.equalize_hist(im) for im in sub], max(1, args.repeats // 2)) * n / len(sub)
    ours = np.asarray(equalize_hist(x))
    differing = int(sum((ours[i] != cv2.equalizeHist(flair[i])).sum() for i in range(n)))

    km = lambda: jax.block_until_ready(kmeans_image(x, 4, key=key, n_init=10))  # noqa: E731
    km_compile = _first_call(km)
    km_s = _best(km, args.repeats)
    sub = flair[: args.sklearn_slices]
    t0 = time.perf_counter()
    sk_inertia = [KMeans(4, n_init=10, random_state=0).fit(im.reshape(-1, 1).astype(np.float64)).inertia_ for im in sub]
    skl_s = (time.perf_counter() - t0) * n / len(sub)
    our_inertia = np.asarray(kmeans_image(x[: len(sub)], 4, key=key, n_init=10).inertia)
    ok = np.array(sk_inertia) > 0
    inertia_ratio = float(np.median(our_inertia[ok] / np.array(sk_inertia)[ok])) if ok.any() else float("nan")

    fig = {
        "equalize_hist_img_s": n / eq_s,
        "cv2_equalizeHist_img_s": n / cv_s,
        "skimage_equalize_hist_img_s": n / sk_eq_s,
        "kmeans_image_img_s": n / km_s,
        "sklearn_kmeans_img_s": n / skl_s,
    }
    rows = [
        ("equalize_hist (jit, batch)", fig["equalize_hist_img_s"], eq_compile),
        ("cv2.equalizeHist loop", fig["cv2_equalizeHist_img_s"], None),
        ("skimage equalize_hist loop", fig["skimage_equalize_hist_img_s"], None),
        ("kmeans_image k=4 (jit, batch)", fig["kmeans_image_img_s"], km_compile),
        ("sklearn KMeans k=4 loop", fig["sklearn_kmeans_img_s"], None),
    ]
    print(f"\n{'operation':<32}{'images/s':>12}{'compile+1st s':>16}")
    for name, rate, comp in rows:
        print(f"{name:<32}{rate:>12.1f}{'' if comp is None else f'{comp:>16.2f}'}")
    ratios = {
        "equalize_vs_cv2": fig["equalize_hist_img_s"] / fig["cv2_equalizeHist_img_s"],
        "equalize_vs_skimage": fig["equalize_hist_img_s"] / fig["skimage_equalize_hist_img_s"],
        "kmeans_vs_sklearn": fig["kmeans_image_img_s"] / fig["sklearn_kmeans_img_s"],
    }
    print(f"\nequalize_hist / cv2 loop:      {ratios['equalize_vs_cv2']:.2f}x  (pixels differing from cv2: {differing})")
    print(f"equalize_hist / skimage loop:  {ratios['equalize_vs_skimage']:.1f}x")
    print(f"kmeans_image / sklearn loop:   {ratios['kmeans_vs_sklearn']:.1f}x  (median inertia ratio ours/sklearn "
          f"{inertia_ratio:.5f} on {len(sub)} slices)")
    record = {
        "bench": "ops",
        "date": datetime.date.today().isoformat(),
        "device": f"{device.platform}:{device.device_kind}",
        "host": platform.machine(),
        "slices": n,
        "source": "real" if Path(source).resolve() == REAL.resolve() else source,
        **{k: round(v, 1) for k, v in fig.items()},
        **{k: round(v, 3) for k, v in ratios.items()},
        "equalize_compile_s": round(eq_compile, 3),
        "kmeans_compile_s": round(km_compile, 3),
        "equalize_differing_pixels": differing,
        "kmeans_median_inertia_ratio": round(inertia_ratio, 6),
    }
    print(json.dumps(record))


if __name__ == "__main__":
    main()
