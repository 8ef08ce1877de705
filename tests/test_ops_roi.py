"""Connected components and the cluster ROI against scikit-image and hand-made masks."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage
from skimage import measure

from dlvae_jax.ops import (
    connected_components,
    dilate,
    erode,
    largest_component,
    remove_small_components,
    roi_from_clusters,
)


def _same_partition(ours: np.ndarray, ref: np.ndarray) -> bool:
    """True when both labelings split the foreground into the same components."""
    if not np.array_equal(ours > 0, ref > 0):
        return False
    fg = ref > 0
    pairs = set(zip(ours[fg].tolist(), ref[fg].tolist()))
    return len(pairs) == len(np.unique(ours[fg])) == len(np.unique(ref[fg]))


@pytest.mark.parametrize("method", ["map", "batch"])
@pytest.mark.parametrize("connectivity", [4, 8])
def test_components_match_skimage(connectivity, method):
    rng = np.random.default_rng(connectivity)
    masks = rng.random((6, 40, 40)) < np.linspace(0.3, 0.6, 6)[:, None, None]
    ours = np.asarray(connected_components(masks, connectivity=connectivity, method=method))
    for m, o in zip(masks, ours):
        ref = measure.label(m, connectivity=1 if connectivity == 4 else 2)
        assert _same_partition(o, ref)


def test_long_snake_component():
    # A one-pixel-wide serpentine: the worst case for label propagation.
    m = np.zeros((31, 31), bool)
    m[::2, :] = True
    m[1::4, -1] = True
    m[3::4, 0] = True
    ours = np.asarray(connected_components(m, connectivity=4))
    assert len(np.unique(ours[m])) == 1


@pytest.mark.parametrize("connectivity", [4, 8])
def test_remove_small_and_largest(connectivity):
    rng = np.random.default_rng(7)
    masks = rng.random((4, 32, 32)) < 0.45
    kept = np.asarray(remove_small_components(masks, 5, connectivity))
    largest = np.asarray(largest_component(masks, connectivity))
    for m, k, big in zip(masks, kept, largest):
        ref = measure.label(m, connectivity=1 if connectivity == 4 else 2)
        sizes = np.bincount(ref.ravel())
        sizes[0] = 0
        np.testing.assert_array_equal(k, sizes[ref] >= 5)
        np.testing.assert_array_equal(big, (ref > 0) & (sizes[ref] == sizes.max()))
    assert not np.asarray(largest_component(np.zeros((8, 8), bool))).any()


def test_diagonal_touch_depends_on_connectivity():
    m = np.zeros((5, 5), bool)
    m[0, 0] = m[1, 1] = m[4, 4] = True  # the corner pixels test the border padding too
    assert len(np.unique(np.asarray(connected_components(m, connectivity=8))[m])) == 2
    assert len(np.unique(np.asarray(connected_components(m, connectivity=4))[m])) == 3


@pytest.mark.parametrize("radius", [1, 2])
def test_erode_dilate_match_scipy_at_the_border(radius):
    rng = np.random.default_rng(radius)
    masks = rng.random((3, 20, 23)) < 0.7
    masks[0] = True  # all-true: erosion keeps the border (outside counts as inside)
    square = np.ones((2 * radius + 1, 2 * radius + 1), bool)
    ours_e, ours_d = np.asarray(erode(masks, radius)), np.asarray(dilate(masks, radius))
    for m, e, d in zip(masks, ours_e, ours_d):
        np.testing.assert_array_equal(e, ndimage.binary_erosion(m, square, border_value=1))
        np.testing.assert_array_equal(d, ndimage.binary_dilation(m, square, border_value=0))
    assert ours_e[0].all()
    np.testing.assert_array_equal(np.asarray(erode(masks, 0)), masks)


def _phantom_labels():
    """Hand-made 4-cluster map: background, skull ring, brain, a bright blob and a bright speck."""
    yy, xx = np.mgrid[:64, :64]
    r = np.hypot(yy - 32, xx - 32)
    labels = np.zeros((64, 64), np.int32)
    labels[r < 28] = 3  # bright rim (scalp fat in FLAIR)
    labels[r < 25] = 1  # brain
    labels[(yy - 30) ** 2 + (xx - 36) ** 2 < 36] = 3  # tumor-like blob inside the brain
    labels[20, 20] = 3  # single bright pixel: noise
    labels[(r < 20) & (yy > 45)] = 2
    return labels


def test_roi_picks_bright_blob_inside_brain():
    labels = _phantom_labels()
    roi = np.asarray(roi_from_clusters(labels, n_clusters=4, min_size=10, margin=4))
    yy, xx = np.mgrid[:64, :64]
    blob = (yy - 30) ** 2 + (xx - 36) ** 2 < 36
    np.testing.assert_array_equal(roi, blob)


def test_roi_batch_brain_mask_and_contrast():
    labels = np.stack([_phantom_labels(), np.ones((64, 64), np.int32)])
    roi = np.asarray(roi_from_clusters(labels, n_clusters=4, min_size=10))
    assert roi.shape == (2, 64, 64) and not roi[1].any()
    brain = np.zeros((2, 64, 64), bool)
    brain[:, :, :32] = True  # keep only the left half of the blob
    roi_half = np.asarray(roi_from_clusters(labels, n_clusters=4, brain_mask=brain, min_size=1))
    assert roi_half[0].any() and not roi_half[0][:, 32:].any()
    cents = np.array([[0.0, 60.0, 120.0, 130.0], [0.0, 60.0, 120.0, 200.0]])
    gated = np.asarray(roi_from_clusters(np.stack([labels[0]] * 2), n_clusters=4, centroids=cents, min_contrast=40.0))
    assert not gated[0].any() and gated[1].any()
