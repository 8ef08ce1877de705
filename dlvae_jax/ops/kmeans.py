"""Vectorized K-means (Rao et al., Eqs. 2-3) in JAX.

Eq. (2) assigns each feature vector h(i, j) to the centroid at the smallest
Euclidean distance; Eq. (3) moves each centroid to the mean of its members.
We run these Lloyd iterations inside `lax.while_loop` from a greedy k-means++
start (Arthur & Vassilvitskii, 2007; the greedy variant with 2 + ln k local
trials is the one scikit-learn uses), and keep the best of `n_init` restarts,
which run side by side under `vmap`.

Convergence follows scikit-learn's rule so results are comparable: stop when no
label changes, or when the summed squared centroid shift is at most
`tol * mean(per-feature variance of the data)`.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from dlvae_jax.ops.histogram import histogram


class KMeansResult(NamedTuple):
    """K-means outcome for one set of points (leading batch dims under vmap).

    centroids: float32 [k, D]; labels: int32 [N]; inertia: float32 [] (weighted
    sum of squared distances to the assigned centroid); n_iter: int32 [] Lloyd
    iterations run; converged: bool [] whether the tolerance was met before max_iter.
    """

    centroids: jax.Array
    labels: jax.Array
    inertia: jax.Array
    n_iter: jax.Array
    converged: jax.Array


class KMeansImageResult(NamedTuple):
    """Per-image clustering of a batch of slices.

    labels: int32 [..., H, W], 0 = darkest cluster ... k-1 = brightest, -1 outside
    the mask; centroids: float32 [..., k] (one channel) or [..., k, C], in the same
    order as the labels; inertia: float32 [...].
    """

    labels: jax.Array
    centroids: jax.Array
    inertia: jax.Array


def _sq_dists(points_NxD: jax.Array, centroids_KxD: jax.Array) -> jax.Array:
    # Direct differences, not |x|^2 - 2x.c + |c|^2: that expansion loses the
    # small distances in float32 when intensities are in the hundreds.
    diff = points_NxD[:, None, :] - centroids_KxD[None, :, :]
    return jnp.sum(diff * diff, axis=-1)


def _sample(key: jax.Array, weights_N: jax.Array, fallback_N: jax.Array, num: int) -> jax.Array:
    """Draws `num` indices with probability proportional to weights (fallback if all 0)."""
    use = jnp.where(weights_N.sum() > 0, weights_N, fallback_N)
    use = jnp.where(use.sum() > 0, use, jnp.ones_like(use))
    logits = jnp.where(use > 0, jnp.log(jnp.where(use > 0, use, 1.0)), -jnp.inf)
    return jax.random.categorical(key, logits, shape=(num,))


def kmeans_plusplus(points_NxD: jax.Array, weights_N: jax.Array, k: int, key: jax.Array) -> jax.Array:
    """Greedy k-means++ seeding: float32 [k, D] initial centroids."""
    n_trials = 2 + int(math.log(k))
    key0, key_rest = jax.random.split(key)
    first = _sample(key0, weights_N, weights_N, 1)[0]
    centroids = jnp.zeros((k, points_NxD.shape[1]), points_NxD.dtype).at[0].set(points_NxD[first])
    closest_N = _sq_dists(points_NxD, points_NxD[first][None])[:, 0]

    def add_one(i, carry):
        centroids, closest_N = carry
        cand_T = _sample(jax.random.fold_in(key_rest, i), weights_N * closest_N, weights_N, n_trials)
        cand_dists_TxN = _sq_dists(points_NxD, points_NxD[cand_T]).T
        new_closest_TxN = jnp.minimum(closest_N[None], cand_dists_TxN)
        potential_T = new_closest_TxN @ weights_N
        best = jnp.argmin(potential_T)
        return centroids.at[i].set(points_NxD[cand_T[best]]), new_closest_TxN[best]

    centroids, _ = jax.lax.fori_loop(1, k, add_one, (centroids, closest_N))
    return centroids


def _assign(points_NxD, weights_N, centroids_KxD):
    d2_NxK = _sq_dists(points_NxD, centroids_KxD)
    labels_N = jnp.argmin(d2_NxK, axis=1).astype(jnp.int32)
    inertia = jnp.sum(weights_N * jnp.min(d2_NxK, axis=1))
    return labels_N, inertia


def _lloyd(points_NxD, weights_N, centroids_KxD, max_iter, tol_abs):
    k = centroids_KxD.shape[0]

    def update(centroids):
        labels_N, _ = _assign(points_NxD, weights_N, centroids)
        member_NxK = (labels_N[:, None] == jnp.arange(k)[None, :]) * weights_N[:, None]
        counts_K = member_NxK.sum(axis=0)
        sums_KxD = member_NxK.T @ points_NxD
        # An empty cluster keeps its centroid (k-means++ seeding makes this rare).
        safe = jnp.where(counts_K > 0, counts_K, 1.0)[:, None]
        new = jnp.where(counts_K[:, None] > 0, sums_KxD / safe, centroids)
        return new, labels_N

    def cond(state):
        i, _, _, done = state
        return (i < max_iter) & ~done

    def body(state):
        i, centroids, labels_prev, _ = state
        new, labels_N = update(centroids)
        shift = jnp.sum((new - centroids) ** 2)
        done = (shift <= tol_abs) | jnp.all(labels_N == labels_prev)
        return i + 1, new, labels_N, done

    init_labels = jnp.full(points_NxD.shape[0], -1, jnp.int32)
    n_iter, centroids, _, done = jax.lax.while_loop(
        cond, body, (jnp.int32(0), centroids_KxD, init_labels, jnp.bool_(False))
    )
    return centroids, n_iter, done


@functools.partial(jax.jit, static_argnames=("k", "n_init", "max_iter"))
def kmeans(
    points: jax.Array,
    k: int,
    *,
    key: jax.Array,
    n_init: int = 10,
    max_iter: int = 300,
    tol: float = 1e-4,
    weights: jax.Array | None = None,
) -> KMeansResult:
    """K-means of `points` (float [N, D]) into `k` clusters; best of `n_init` restarts.

    `weights` (float [N], default all 1) counts each point that many times: K-means
    of the 256 grey levels weighted by a histogram is K-means of the pixels.
    Works under `jax.jit` and `jax.vmap` (batch the points, weights and keys).
    """
    points_NxD = jnp.asarray(points, jnp.float32)
    if points_NxD.ndim != 2:
        raise ValueError(f"kmeans expects points of shape [N, D], got {points_NxD.shape}")
    if k < 1 or n_init < 1 or max_iter < 0:
        raise ValueError(f"kmeans needs k >= 1, n_init >= 1, max_iter >= 0; got {k}, {n_init}, {max_iter}")
    weights_N = jnp.ones(points_NxD.shape[0], jnp.float32) if weights is None else jnp.asarray(weights, jnp.float32)
    total = jnp.maximum(weights_N.sum(), 1e-12)
    mean_D = weights_N @ points_NxD / total
    var_D = weights_N @ (points_NxD - mean_D) ** 2 / total
    tol_abs = jnp.mean(var_D) * tol

    def one_run(run_key):
        init = kmeans_plusplus(points_NxD, weights_N, k, run_key)
        centroids, n_iter, done = _lloyd(points_NxD, weights_N, init, max_iter, tol_abs)
        labels_N, inertia = _assign(points_NxD, weights_N, centroids)
        return KMeansResult(centroids, labels_N, inertia, n_iter, done)

    runs = jax.vmap(one_run)(jax.random.split(key, n_init))
    best = jnp.argmin(runs.inertia)
    return jax.tree.map(lambda x: x[best], runs)


def _order_by_intensity(result: KMeansResult, intensity_K: jax.Array, weights_N: jax.Array):
    """Relabels so 0 is the darkest centroid; returns (old->new label map, sorted centroids).

    With fewer distinct points than k, k-means++ repeats a centroid and the copy
    stays empty (ties go to the lower index). Among equal centroids the empty one
    ranks first, so the brightest label k-1 is never an empty copy of the brightest cluster.
    """
    k = intensity_K.shape[0]
    populated_K = jax.ops.segment_sum(weights_N, result.labels, num_segments=k) > 0
    order_K = jnp.lexsort((populated_K, intensity_K))
    rank_K = jnp.argsort(order_K).astype(jnp.int32)
    return rank_K, result.centroids[order_K]


@functools.partial(jax.jit, static_argnames=("k", "n_init", "max_iter", "multichannel"))
def kmeans_image(
    images: jax.Array,
    k: int,
    *,
    key: jax.Array,
    n_init: int = 10,
    max_iter: int = 300,
    tol: float = 1e-4,
    mask: jax.Array | None = None,
    multichannel: bool = False,
) -> KMeansImageResult:
    """Clusters each uint8 slice of a batch on its own.

    One channel (`images` uint8 [..., H, W]): the 256 grey levels are clustered,
    weighted by the slice's histogram (exactly K-means over its pixels, at a cost
    independent of the slice size). Several channels (`multichannel=True`,
    uint8 [..., H, W, C], e.g. pre-contrast/FLAIR/post-contrast as the feature
    h(i, j) of Eq. 2): the pixel vectors are clustered and clusters are ordered
    by their mean over channels.

    `mask` ([..., H, W], optional) restricts the clustering to pixels inside it;
    pixels outside get label -1. `key` is one key, split into one per slice, or
    an array of keys of the batch shape (one per slice: a slice's result then
    does not depend on which batch it is in).
    """
    images = jnp.asarray(images)
    if images.dtype != jnp.uint8:
        raise TypeError(f"kmeans_image expects uint8 images, got {images.dtype}")
    spatial = images.shape[:-1] if multichannel else images.shape
    if len(spatial) < 2:
        raise ValueError(f"kmeans_image expects [..., H, W{', C' if multichannel else ''}] images, got {images.shape}")
    batch_shape, (h, w) = spatial[:-2], spatial[-2:]
    b = math.prod(batch_shape)
    if not jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.wrap_key_data(key)  # raw uint32 [..., 2] keys
    keys = key.reshape(b) if batch_shape and key.shape == batch_shape else jax.random.split(key, b)
    inside_BxN = None if mask is None else (jnp.asarray(mask) != 0).reshape(b, h * w)

    if not multichannel:
        pixels_BxN = images.reshape(b, h * w)
        weights = None if inside_BxN is None else inside_BxN.astype(jnp.int32)
        hist_Bx256 = histogram(pixels_BxN, weights).astype(jnp.float32)
        levels_256x1 = jnp.arange(256, dtype=jnp.float32)[:, None]

        def one(hist, kk):
            res = kmeans(levels_256x1, k, key=kk, n_init=n_init, max_iter=max_iter, tol=tol, weights=hist)
            rank_K, cents = _order_by_intensity(res, res.centroids[:, 0], hist)
            return rank_K[res.labels], cents[:, 0], res.inertia

        level_labels_Bx256, centroids, inertia = jax.vmap(one)(hist_Bx256, keys)
        labels_BxN = jnp.take_along_axis(level_labels_Bx256, pixels_BxN.astype(jnp.int32), axis=1)
    else:
        c = images.shape[-1]
        points_BxNxC = images.reshape(b, h * w, c).astype(jnp.float32)
        weights_BxN = (
            jnp.ones((b, h * w), jnp.float32) if inside_BxN is None else inside_BxN.astype(jnp.float32)
        )

        def one(points, wts, kk):
            res = kmeans(points, k, key=kk, n_init=n_init, max_iter=max_iter, tol=tol, weights=wts)
            rank_K, cents = _order_by_intensity(res, res.centroids.mean(axis=1), wts)
            return rank_K[res.labels], cents, res.inertia

        labels_BxN, centroids, inertia = jax.vmap(one)(points_BxNxC, weights_BxN, keys)

    if inside_BxN is not None:
        labels_BxN = jnp.where(inside_BxN, labels_BxN, -1)
    return KMeansImageResult(
        labels=labels_BxN.reshape(*batch_shape, h, w),
        centroids=centroids.reshape(*batch_shape, *centroids.shape[1:]),
        inertia=inertia.reshape(batch_shape),
    )
