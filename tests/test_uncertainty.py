"""Uncertainty scores against scikit-learn and hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from dlvae_jax.eval import uncertainty as U


def test_auroc_of_uncertainty_matches_sklearn_on_the_bin_grid():
    rng = np.random.default_rng(0)
    truth = rng.random((4, 16, 16)) < 0.3
    prob = np.clip(truth * 0.7 + rng.normal(0, 0.3, truth.shape), 0, 1)
    # u on the grid of bin centres: the binned AUROC is then exact, ties included
    u = (rng.integers(0, U.U_BINS, truth.shape) + 0.5) / U.U_BINS
    u = np.where(rng.random(truth.shape) < 0.5, u, u[0, 0, 0])  # many ties
    acc = U.CalibrationAccumulator()
    acc.add(prob[:2], u[:2], truth[:2])
    acc.add(prob[2:], u[2:], truth[2:])
    r = acc.report()
    wrong = (prob >= 0.5) != truth
    assert r["n_errors"] == wrong.sum() and r["n_pixels"] == truth.size
    assert r["auroc_error"] == pytest.approx(roc_auc_score(wrong.ravel(), u.ravel()), abs=1e-12)
    assert r["brier"] == pytest.approx(np.mean((prob - truth) ** 2))


def test_ece_by_hand():
    # 10 pixels at p = 0.1 with 3 tumor, 10 at p = 0.95 with 10 tumor:
    # ECE = 0.5 * |0.3 - 0.1| + 0.5 * |1.0 - 0.95| = 0.125
    prob = np.array([0.1] * 10 + [0.95] * 10)
    truth = np.array([1] * 3 + [0] * 7 + [1] * 10)
    acc = U.CalibrationAccumulator()
    acc.add(prob, U.predictive_entropy(prob), truth)
    r = acc.report()
    assert r["ece"] == pytest.approx(0.125)
    rows = {round(row["lo"], 4): row for row in r["reliability"] if row["count"]}
    assert rows[round(1 / 15, 4)]["fraction_tumor"] == pytest.approx(0.3)
    assert sum(row["count"] for row in r["reliability"]) == 20
    # Nothing wrong: no error to rank.
    acc = U.CalibrationAccumulator()
    acc.add(np.array([0.9, 0.1]), np.array([0.2, 0.3]), np.array([1, 0]))
    assert math.isnan(acc.report()["auroc_error"])


def test_predictive_entropy_by_hand():
    np.testing.assert_allclose(U.predictive_entropy(np.array([0.0, 0.5, 1.0, 0.25])),
                               [0.0, 1.0, 0.0, -(0.25 * math.log2(0.25) + 0.75 * math.log2(0.75))], rtol=1e-6)


def test_flips_mean_flips_back_each_prediction():
    """A predictor that marks the left half of what it sees: flipped left-right
    it marks the right half, flipped back that is the right half of the slice,
    so the mean over the 4 flips is 0.5 everywhere; a flip-equivariant
    predictor (thresholding) gives its own answer."""
    images = np.zeros((2, 4, 6), np.uint8)
    images[:, 1:3, 1:2] = 200
    left = lambda x: {"prob_BxHxW": np.broadcast_to((np.arange(x.shape[2]) < x.shape[2] // 2).astype(np.float32),
                                                    x.shape[:3]).copy(),
                      "tumor_prob_B": x[:, 0, 0].astype(np.float32)}
    out = U.flips_mean(left, images)
    np.testing.assert_allclose(out["prob_BxHxW"], 0.5)
    bright = lambda x: {"prob_BxHxW": (x > 100).astype(np.float32), "tumor_prob_B": x[:, 1, 1] / 255.0}
    out = U.flips_mean(bright, images)
    np.testing.assert_allclose(out["prob_BxHxW"], (images > 100).astype(np.float32))
    # The slice probability is the mean over the 4 flipped inputs: pixel (1, 1) of each.
    corners = [images[:, 1, 1], images[:, -2, 1], images[:, 1, -2], images[:, -2, -2]]
    np.testing.assert_allclose(out["tumor_prob_B"], np.mean(corners, axis=0) / 255.0, rtol=1e-6)
    # Only the identity and the left-right flip: pixel (1, 1) and its mirror (1, -2).
    out = U.flips_mean(bright, images, U.trained_flips(p_flip_lr=0.5, p_flip_ud=0.0))
    np.testing.assert_allclose(out["tumor_prob_B"], np.mean(corners[::2], axis=0) / 255.0, rtol=1e-6)
    np.testing.assert_allclose(U.flips_mean(left, images, ((False, False), (True, False)))["prob_BxHxW"],
                               left(images)["prob_BxHxW"])  # up-down flips leave a left half where it is


def test_tta_uses_only_the_flips_training_used():
    assert U.trained_flips(0.5, 0.0) == ((False, False), (False, True))
    assert U.trained_flips(0.0, 0.3) == ((False, False), (True, False))
    assert U.trained_flips(0.5, 0.5) == U.ALL_FLIPS and len(U.ALL_FLIPS) == 4
    assert U.trained_flips(0.0, 0.0) == ((False, False),)
