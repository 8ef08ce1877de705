"""Tumor-candidate region from K-means clusters: the paper's "K-means segmentation".

The rule (Section IV-C applied to FLAIR, where low-grade gliomas are
hyperintense): the brain is the largest connected component of the non-background
clusters, shrunk by `margin` pixels to drop the bright rim of the skull and scalp;
the candidate is the brightest cluster inside that brain, with connected
components smaller than `min_size` pixels removed. It is a baseline with no
learning; it always returns its brightest region, tumor or not, unless
`min_contrast` asks the brightest centroid to stand out from the brain.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

_NEIGHBORS = {4: ((0, 1), (0, -1), (1, 0), (-1, 0)), 8: tuple((dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if dy or dx)}


def _shift(x_HxW: jax.Array, dy: int, dx: int, fill) -> jax.Array:
    """x shifted so out[i, j] = x[i + dy, j + dx], `fill` where that falls outside."""
    h, w = x_HxW.shape
    padded = jnp.pad(x_HxW, ((1, 1), (1, 1)), constant_values=fill)
    return jax.lax.dynamic_slice(padded, (1 + dy, 1 + dx), (h, w))


def _components_one(mask_HxW: jax.Array, connectivity: int) -> jax.Array:
    h, w = mask_HxW.shape
    ids_HxW = jnp.arange(1, h * w + 1, dtype=jnp.int32).reshape(h, w)
    labels0 = jnp.where(mask_HxW, ids_HxW, 0)

    def step(labels):
        best = labels
        for dy, dx in _NEIGHBORS[connectivity]:
            best = jnp.maximum(best, _shift(labels, dy, dx, 0))
        best = jnp.where(mask_HxW, best, 0)
        # Pointer jumping: a label names a pixel of the same component whose own
        # label is at least as large; adopting it shortens long propagation chains.
        flat = best.ravel()
        jumped = jnp.where(flat > 0, flat[jnp.maximum(flat - 1, 0)], 0).reshape(h, w)
        return jnp.maximum(best, jumped)

    def body(state):
        labels, _ = state
        new = step(labels)
        return new, jnp.any(new != labels)

    labels, _ = jax.lax.while_loop(lambda s: s[1], body, (labels0, jnp.bool_(True)))
    return labels


@functools.partial(jax.jit, static_argnames=("connectivity",))
def connected_components(mask: jax.Array, connectivity: int = 8) -> jax.Array:
    """Labels the connected components of binary masks [..., H, W].

    Returns int32 [..., H, W]: 0 for background; every pixel of a component gets
    the same positive id (1 + the flat index of one of its pixels; ids are not
    consecutive). `connectivity` is 4 or 8.
    """
    if connectivity not in _NEIGHBORS:
        raise ValueError(f"connectivity must be 4 or 8, got {connectivity}")
    mask = jnp.asarray(mask) != 0
    shape = mask.shape
    flat = mask.reshape(-1, *shape[-2:])
    return jax.vmap(lambda m: _components_one(m, connectivity))(flat).reshape(shape)


def _component_sizes(labels_HxW: jax.Array) -> jax.Array:
    """Per-pixel size of the pixel's component (0 on background)."""
    n = labels_HxW.size
    sizes = jax.ops.segment_sum(jnp.ones(n, jnp.int32), labels_HxW.ravel(), num_segments=n + 1)
    return jnp.where(labels_HxW > 0, sizes[labels_HxW], 0)


@functools.partial(jax.jit, static_argnames=("connectivity",))
def remove_small_components(mask: jax.Array, min_size: int, connectivity: int = 8) -> jax.Array:
    """Drops connected components with fewer than `min_size` pixels from masks [..., H, W]."""
    labels = connected_components(mask, connectivity)
    shape = labels.shape
    sizes = jax.vmap(_component_sizes)(labels.reshape(-1, *shape[-2:])).reshape(shape)
    return sizes >= jnp.maximum(min_size, 1)


@functools.partial(jax.jit, static_argnames=("connectivity",))
def largest_component(mask: jax.Array, connectivity: int = 8) -> jax.Array:
    """Keeps only the largest connected component of each mask [..., H, W]."""
    labels = connected_components(mask, connectivity)
    shape = labels.shape
    sizes = jax.vmap(_component_sizes)(labels.reshape(-1, *shape[-2:])).reshape(shape)
    biggest = sizes.reshape(*shape[:-2], -1).max(axis=-1)[..., None, None]
    return (sizes > 0) & (sizes == biggest)


def _erode(mask_BxHxW: jax.Array, radius: int) -> jax.Array:
    if radius <= 0:
        return mask_BxHxW
    size = 2 * radius + 1
    out = jax.lax.reduce_window(
        mask_BxHxW.astype(jnp.int32), 1, jax.lax.min, (1, size, size), (1, 1, 1), "SAME"
    )
    return out > 0


@functools.partial(jax.jit, static_argnames=("n_clusters", "margin", "connectivity"))
def roi_from_clusters(
    labels: jax.Array,
    *,
    n_clusters: int,
    centroids: jax.Array | None = None,
    brain_mask: jax.Array | None = None,
    min_size: int = 64,
    margin: int = 4,
    min_contrast: float = 0.0,
    connectivity: int = 8,
) -> jax.Array:
    """Binary tumor-candidate masks from intensity-ordered cluster maps.

    Args:
      labels: int [..., H, W] from `kmeans_image` (0 = darkest, n_clusters-1 = brightest).
      n_clusters: k used for the clustering.
      centroids: optional float [..., k] (one channel, ordered like the labels);
        needed only for `min_contrast`.
      brain_mask: optional bool [..., H, W]; by default the largest component of
        the non-background clusters, eroded by `margin` pixels.
      min_size: components of the candidate smaller than this are dropped.
      min_contrast: with centroids, the brightest centroid must exceed the
        second brightest by this many grey levels, or the ROI is empty.
    Returns:
      bool [..., H, W].
    """
    labels = jnp.asarray(labels)
    shape = labels.shape
    labels_BxHxW = labels.reshape(-1, *shape[-2:])
    if brain_mask is None:
        brain = largest_component(labels_BxHxW > 0, connectivity)
        brain = _erode(brain, margin)
    else:
        brain = jnp.asarray(brain_mask).reshape(labels_BxHxW.shape) != 0
    candidate = (labels_BxHxW == n_clusters - 1) & brain
    roi = remove_small_components(candidate, min_size, connectivity)
    if centroids is not None and n_clusters >= 2:
        cents = jnp.asarray(centroids).reshape(-1, n_clusters)
        contrast_ok = (cents[:, -1] - cents[:, -2]) >= min_contrast
        roi = roi & contrast_ok[:, None, None]
    return roi.reshape(shape)
