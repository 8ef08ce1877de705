"""Slice and pixel metrics (Rao et al., Eqs. 13-16) and Dice, in NumPy on the host.

Empty-mask convention (stated because libraries differ: MONAI gives NaN for an
empty ground truth, medpy raises): Dice and IoU of two empty masks are 1 (a
correct "no tumor"); one empty and one not gives 0. Precision, recall and F1
with a zero denominator are 0, as in scikit-learn's `zero_division=0`.
"""

from __future__ import annotations

import numpy as np


def confusion(pred: np.ndarray, truth: np.ndarray) -> dict[str, int]:
    """TP/FP/TN/FN counts of two boolean arrays of the same shape."""
    pred = np.asarray(pred, bool)
    truth = np.asarray(truth, bool)
    if pred.shape != truth.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from truth shape {truth.shape}")
    return {
        "tp": int(np.sum(pred & truth)),
        "fp": int(np.sum(pred & ~truth)),
        "tn": int(np.sum(~pred & ~truth)),
        "fn": int(np.sum(~pred & truth)),
    }


def _ratio(num: float, den: float) -> float:
    return float(num) / float(den) if den else 0.0


def classification_metrics(counts: dict[str, int]) -> dict[str, float]:
    """Accuracy (Eq. 13), precision (Eq. 14), recall (Eq. 15) and F1 (Eq. 16) from counts."""
    tp, fp, tn, fn = counts["tp"], counts["fp"], counts["tn"], counts["fn"]
    precision = _ratio(tp, tp + fp)
    recall = _ratio(tp, tp + fn)
    return {
        "accuracy": _ratio(tp + tn, tp + tn + fp + fn),
        "precision": precision,
        "recall": recall,
        "f1": _ratio(2 * precision * recall, precision + recall),
    }


def dice_from_counts(counts: dict[str, int]) -> float:
    """Dice 2TP / (2TP + FP + FN) from confusion counts; 1.0 when both masks are empty."""
    den = 2 * counts["tp"] + counts["fp"] + counts["fn"]
    return 1.0 if den == 0 else 2 * counts["tp"] / den


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """Dice coefficient 2|A n B| / (|A| + |B|) over the whole arrays; 1.0 when both are empty."""
    return dice_from_counts(confusion(pred, truth))


def iou(pred: np.ndarray, truth: np.ndarray) -> float:
    """Intersection over union; 1.0 when both are empty."""
    c = confusion(pred, truth)
    den = c["tp"] + c["fp"] + c["fn"]
    return 1.0 if den == 0 else c["tp"] / den
