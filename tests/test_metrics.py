"""Metrics against scikit-learn and hand-computed values."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from sklearn import metrics as skm

from dlvae_jax.metrics import classification_metrics, confusion, dice, dice_from_counts, iou


@settings(max_examples=50, deadline=None)
@given(pred=arrays(np.bool_, 30), truth=arrays(np.bool_, 30))
def test_classification_metrics_match_sklearn(pred, truth):
    ours = classification_metrics(confusion(pred, truth))
    assert np.isclose(ours["accuracy"], skm.accuracy_score(truth, pred))
    assert np.isclose(ours["precision"], skm.precision_score(truth, pred, zero_division=0))
    assert np.isclose(ours["recall"], skm.recall_score(truth, pred, zero_division=0))
    assert np.isclose(ours["f1"], skm.f1_score(truth, pred, zero_division=0))


def test_dice_iou_hand_values_and_empty_cases():
    a = np.zeros((4, 4), bool)
    b = np.zeros((4, 4), bool)
    assert dice(a, b) == 1.0 and iou(a, b) == 1.0
    b[0, :2] = True
    assert dice(a, b) == 0.0 and iou(a, b) == 0.0
    a[0, 1:4] = True  # overlap 1 pixel, |a| = 3, |b| = 2
    assert np.isclose(dice(a, b), 2 * 1 / 5) and np.isclose(iou(a, b), 1 / 4)
    assert np.isclose(iou(a, b), skm.jaccard_score(b.ravel(), a.ravel()))


@settings(max_examples=50, deadline=None)
@given(pred=arrays(np.bool_, (5, 6)), truth=arrays(np.bool_, (5, 6)))
def test_dice_iou_match_scipy_and_sklearn(pred, truth):
    from scipy.spatial import distance

    if not (pred.any() or truth.any()):
        assert dice(pred, truth) == 1.0 and iou(pred, truth) == 1.0
        return
    assert np.isclose(dice(pred, truth), 1 - distance.dice(pred.ravel(), truth.ravel()))
    assert np.isclose(iou(pred, truth), skm.jaccard_score(truth.ravel(), pred.ravel()))
    assert np.isclose(dice_from_counts(confusion(pred, truth)), dice(pred, truth))
