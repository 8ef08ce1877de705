"""The chained classical stages against cv2 and scikit-learn references."""

from __future__ import annotations

import cv2
import jax
import numpy as np
import pytest
from sklearn.cluster import KMeans

from dlvae_jax.ops import classical_stages


@pytest.fixture(scope="module")
def flair(synth_dir):
    import tifffile

    paths = sorted(p for p in synth_dir.glob("*/*.tif") if not p.name.endswith("_mask.tif"))[4:12]
    return np.stack([tifffile.imread(p)[..., 1] for p in paths])


@pytest.mark.parametrize("equalize", ["head", "whole"])
def test_stages_match_references(flair, equalize):
    res = jax.device_get(classical_stages(flair, jax.random.key(0), k=4, equalize=equalize))
    head = res.head_BxHxW
    ratios = []
    assert head.any(axis=(1, 2)).all() and (~head).any(axis=(1, 2)).all()
    for i, img in enumerate(flair):
        if equalize == "whole":
            np.testing.assert_array_equal(res.equalized_BxHxW[i], cv2.equalizeHist(img))
            region = np.ones_like(head[i])
        else:  # cv2 on the head's pixels alone; the rest unchanged
            ref = img.copy()
            ref[head[i]] = cv2.equalizeHist(np.ascontiguousarray(img[head[i]]).reshape(1, -1)).ravel()
            np.testing.assert_array_equal(res.equalized_BxHxW[i], ref)
            region = head[i]
            assert (res.labels_BxHxW[i][~region] == -1).all()
        # Clustering of the region's equalized values is as good as scikit-learn's.
        values = res.equalized_BxHxW[i][region].astype(np.float64)
        cents = res.centroids_Bxk[i]
        ours = ((values[:, None] - cents[None]) ** 2).min(1).sum()
        sk = KMeans(4, n_init=10, random_state=0).fit(values.reshape(-1, 1)).inertia_
        ratios.append(ours / sk)
        # The ROI is the brightest cluster and lies inside the head.
        roi = res.roi_BxHxW[i]
        assert (res.labels_BxHxW[i][roi] == 3).all() and not (roi & ~head[i]).any()
    # The criterion for K-means is the median over slices (restarts are random).
    assert np.median(ratios) <= 1.001 and max(ratios) <= 1.01


def test_rejects_unknown_mode(flair):
    with pytest.raises(ValueError, match="equalize"):
        classical_stages(flair, jax.random.key(0), equalize="brain")
