"""K-means against scikit-learn and hand-made blobs."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tifffile
from sklearn.cluster import KMeans

from dlvae_jax.ops import kmeans, kmeans_image, kmeans_plusplus


def _blobs(seed=0, n=150):
    rng = np.random.default_rng(seed)
    centers = np.array([[0.0, 0.0], [12.0, 10.0], [-9.0, 7.0], [5.0, -11.0]], np.float32)
    points = np.concatenate([c + rng.normal(scale=0.8, size=(n, 2)) for c in centers]).astype(np.float32)
    return centers, points


def _match(found, true):
    """Max distance from each true center to its nearest found center."""
    d = np.linalg.norm(found[:, None] - true[None], axis=-1)
    return d.min(axis=0).max()


def test_recovers_blob_centers():
    centers, points = _blobs()
    res = kmeans(points, 4, key=jax.random.key(0))
    assert _match(np.asarray(res.centroids), centers) < 0.2
    assert bool(res.converged) and 1 <= int(res.n_iter) < 300
    # Labels are nearest-centroid assignments and inertia is their cost (NumPy check).
    d2 = ((points[:, None] - np.asarray(res.centroids)[None]) ** 2).sum(-1)
    np.testing.assert_array_equal(np.asarray(res.labels), d2.argmin(1))
    np.testing.assert_allclose(float(res.inertia), d2.min(1).sum(), rtol=1e-4)
    sk = KMeans(4, n_init=10, random_state=0).fit(points)
    assert float(res.inertia) <= sk.inertia_ * 1.001


def test_weights_equal_repeated_points():
    rng = np.random.default_rng(3)
    pts = rng.normal(size=(40, 3)).astype(np.float32)
    counts = rng.integers(1, 5, size=40)
    weighted = kmeans(pts, 3, key=jax.random.key(1), weights=counts.astype(np.float32))
    # Same objective evaluated on the repeated points with the weighted centroids.
    rep = np.repeat(pts, counts, axis=0)
    d2 = ((rep[:, None] - np.asarray(weighted.centroids)[None]) ** 2).sum(-1).min(1).sum()
    np.testing.assert_allclose(float(weighted.inertia), d2, rtol=1e-4)
    sk = KMeans(3, n_init=10, random_state=0).fit(rep)
    assert float(weighted.inertia) <= sk.inertia_ * 1.001


def test_vmap_jit_and_determinism():
    _, points = _blobs(1, n=30)
    batch = np.stack([points, points[::-1] + 3.0])
    keys = jax.random.split(jax.random.key(5), 2)
    run = jax.jit(jax.vmap(lambda p, k: kmeans(p, 4, key=k, n_init=4)))
    res = run(batch, keys)
    assert res.centroids.shape == (2, 4, 2) and res.labels.shape == (2, 120)
    for i in range(2):
        one = kmeans(batch[i], 4, key=keys[i], n_init=4)
        np.testing.assert_allclose(np.asarray(res.centroids[i]), np.asarray(one.centroids), rtol=1e-5, atol=1e-5)
    again = run(batch, keys)
    np.testing.assert_array_equal(np.asarray(res.labels), np.asarray(again.labels))


def test_degenerate_inputs():
    # Fewer distinct points than clusters: no NaN, zero inertia.
    pts = np.zeros((10, 1), np.float32)
    res = kmeans(pts, 3, key=jax.random.key(0))
    assert np.isfinite(np.asarray(res.centroids)).all() and float(res.inertia) == 0.0
    # A constant image clusters without NaN.
    out = kmeans_image(np.zeros((2, 8, 8), np.uint8), 4, key=jax.random.key(0), n_init=2)
    assert np.isfinite(np.asarray(out.centroids)).all()
    assert set(np.unique(np.asarray(out.labels))) <= set(range(4))


def test_kmeans_image_labels_ordered_and_nearest():
    rng = np.random.default_rng(2)
    imgs = rng.choice(np.array([10, 80, 150, 230], np.uint8), size=(3, 16, 16))
    imgs = np.clip(imgs.astype(int) + rng.integers(-5, 6, imgs.shape), 0, 255).astype(np.uint8)
    out = kmeans_image(imgs, 4, key=jax.random.key(0))
    cents = np.asarray(out.centroids)
    assert (np.diff(cents, axis=1) > 0).all(), "centroids must be ordered darkest first"
    nearest = np.abs(imgs[..., None].astype(np.float32) - cents[:, None, None, :]).argmin(-1)
    np.testing.assert_array_equal(np.asarray(out.labels), nearest)
    # The four planted levels are found.
    np.testing.assert_allclose(cents, np.tile([10, 80, 150, 230], (3, 1)), atol=1.5)


def test_kmeans_image_mask():
    rng = np.random.default_rng(4)
    img = rng.integers(0, 256, (1, 12, 12), dtype=np.uint8)
    mask = np.zeros_like(img, bool)
    mask[:, 2:9, 3:10] = True
    out = kmeans_image(img, 3, key=jax.random.key(0), mask=mask)
    labels = np.asarray(out.labels)
    assert (labels[~mask] == -1).all() and (labels[mask] >= 0).all()
    sk = KMeans(3, n_init=10, random_state=0).fit(img[mask].reshape(-1, 1).astype(np.float64))
    assert float(out.inertia[0]) <= sk.inertia_ * 1.001


def _real_slices(lgg_dir, n, channels):
    paths = sorted(p for p in lgg_dir.glob("*/*.tif") if not p.name.endswith("_mask.tif"))
    chosen = []
    for p in paths[:: max(1, len(paths) // (3 * n))]:
        img = tifffile.imread(p)
        img = img[..., 1] if channels == 1 else img
        if len(np.unique(img.reshape(-1, channels), axis=0)) >= 8:  # skip blank end slices
            chosen.append(img)
        if len(chosen) == n:
            break
    return np.stack(chosen)


@pytest.mark.parametrize("k", [3, 4, 5])
def test_inertia_matches_sklearn_on_40_real_slices(lgg_dir, k):
    flair = _real_slices(lgg_dir, 40, 1)
    ours = np.asarray(kmeans_image(flair, k, key=jax.random.key(k)).inertia, np.float64)
    theirs = np.array([
        KMeans(n_clusters=k, n_init=10, random_state=0).fit(im.reshape(-1, 1).astype(np.float64)).inertia_
        for im in flair
    ])
    ratio = ours / theirs
    print(f"k={k}: {len(flair)} slices, inertia ratio ours/sklearn median {np.median(ratio):.6f} max {ratio.max():.6f}")
    assert np.median(ratio) <= 1.001


def test_multichannel_matches_sklearn(lgg_dir):
    slices = _real_slices(lgg_dir, 4, 3)
    out = kmeans_image(slices, 4, key=jax.random.key(0), multichannel=True, n_init=10)
    assert out.labels.shape == slices.shape[:-1] and out.centroids.shape == (4, 4, 3)
    means = np.asarray(out.centroids).mean(-1)
    assert (np.diff(means, axis=1) >= 0).all()
    for i, im in enumerate(slices):
        sk = KMeans(4, n_init=10, random_state=0).fit(im.reshape(-1, 3).astype(np.float64))
        assert float(out.inertia[i]) <= sk.inertia_ * 1.001


@pytest.mark.parametrize("tol", [1e-4, 1e-1])
def test_lloyd_and_convergence_rule_match_sklearn(tol):
    # Same start, so Lloyd's iterations and the stopping rule alone decide the result.
    from dlvae_jax.ops.kmeans import _lloyd

    pts = np.random.default_rng(0).normal(size=(500, 2)).astype(np.float32)
    init = np.asarray(kmeans_plusplus(jnp.asarray(pts), jnp.ones(500), 5, jax.random.key(1)))
    cents, n_iter, done = _lloyd(jnp.asarray(pts), jnp.ones(500), jnp.asarray(init), 300, pts.var(0).mean() * tol)
    sk = KMeans(5, init=init, n_init=1, tol=tol, algorithm="lloyd").fit(pts)
    assert int(n_iter) == sk.n_iter_ and bool(done)
    np.testing.assert_allclose(np.asarray(cents), sk.cluster_centers_, atol=1e-4)


def test_kmeans_plusplus_samples_by_weight():
    # Far outliers are what k-means++ picks first, unless their weight is zero.
    rng = np.random.default_rng(5)
    pts = np.concatenate([rng.normal(size=(60, 2)), [[100.0, 100.0], [-100.0, 80.0]]]).astype(np.float32)
    w = np.ones(62, np.float32)
    w[60:] = 0.0
    for seed in range(5):
        cents = np.asarray(kmeans_plusplus(jnp.asarray(pts), jnp.asarray(w), 4, jax.random.key(seed)))
        assert (np.abs(cents) < 10).all()
        assert all(((pts[:60] - c) ** 2).sum(1).min() == 0 for c in cents), "centroids start on weighted points"
    both = np.asarray(kmeans_plusplus(jnp.asarray(pts), jnp.ones(62), 4, jax.random.key(0)))
    assert (np.abs(both) > 50).any(axis=1).sum() == 2
    # All-zero weights fall back to uniform: finite centroids taken from the points.
    zero = np.asarray(kmeans_plusplus(jnp.asarray(pts), jnp.zeros(62), 3, jax.random.key(0)))
    assert all(((pts - c) ** 2).sum(1).min() == 0 for c in zero)


def test_fewer_levels_than_clusters_keeps_brightest_label():
    # Two grey levels and k=4: k-means++ must repeat centroids; the bright pixels still get label k-1.
    img = np.zeros((6, 8, 8), np.uint8)
    img[:, :, :3] = 200
    out = kmeans_image(img, 4, key=jax.random.key(0), n_init=2)
    labels = np.asarray(out.labels)
    assert (labels[img == 200] == 3).all() and float(np.abs(out.inertia).max()) == 0.0
    np.testing.assert_array_equal(np.asarray(out.centroids)[:, -1], 200.0)


def test_per_slice_keys_make_results_batch_independent():
    imgs = np.random.default_rng(6).integers(0, 256, (4, 16, 16), dtype=np.uint8)
    keys = jax.random.split(jax.random.key(3), 4)
    full = kmeans_image(imgs, 3, key=keys, n_init=2)
    part = kmeans_image(imgs[2:], 3, key=keys[2:], n_init=2)
    np.testing.assert_array_equal(np.asarray(full.labels[2:]), np.asarray(part.labels))
    np.testing.assert_allclose(np.asarray(full.centroids[2:]), np.asarray(part.centroids), rtol=1e-6)


def test_rejects_bad_arguments():
    with pytest.raises(ValueError, match="k >= 1"):
        kmeans(np.zeros((4, 1), np.float32), 0, key=jax.random.key(0))
    with pytest.raises(TypeError, match="uint8"):
        kmeans_image(np.zeros((8, 8), np.float32), 2, key=jax.random.key(0))
