"""Metrics against scikit-learn, medpy and hand-computed values."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from medpy.metric import binary as medpy_binary
from sklearn import metrics as skm

from dlvae_jax.metrics import (
    SegmentationAccumulator,
    classification_metrics,
    confusion,
    dice,
    dice_from_counts,
    dice_per_volume,
    hd95,
    iou,
    segmentation_report,
)


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


# ----------------------------------------------------------------------------- HD95, per-volume Dice, report


def _blob_masks(rng, n, h, w, p_empty=0.3):
    """Rectangles and speckle, some touching the border, some empty: [n, h, w] bool."""
    out = np.zeros((n, h, w), bool)
    for i in range(n):
        if rng.random() < p_empty:
            continue
        for _ in range(rng.integers(1, 3)):
            y, x = rng.integers(-3, h), rng.integers(-3, w)
            dy, dx = rng.integers(1, h // 2 + 2), rng.integers(1, w // 2 + 2)
            out[i, max(y, 0):max(y + dy, 0), max(x, 0):max(x + dx, 0)] = True
        if rng.random() < 0.3:
            out[i] |= rng.random((h, w)) < 0.05
    return out


def test_hd95_matches_medpy_on_random_masks():
    rng = np.random.default_rng(0)
    pred, truth = _blob_masks(rng, 300, 24, 31), _blob_masks(rng, 300, 24, 31)
    checked = 0
    for a, b in zip(pred, truth):
        if a.any() and b.any():
            assert abs(hd95(a, b) - medpy_binary.hd95(a, b)) <= 1e-6
            checked += 1
    assert checked > 100


@settings(max_examples=60, deadline=None)
@given(a=arrays(np.bool_, (9, 12)), b=arrays(np.bool_, (9, 12)),
       spacing=st.tuples(st.floats(0.25, 4.0), st.floats(0.25, 4.0)))
def test_hd95_matches_medpy_with_spacing(a, b, spacing):
    if a.any() and b.any():
        ref = medpy_binary.hd95(a, b, voxelspacing=spacing)
        assert abs(hd95(a, b, spacing=spacing) - ref) <= 1e-6
        assert abs(hd95(b, a, spacing=spacing) - ref) <= 1e-6


def test_hd95_3d_and_full_frame_match_medpy():
    rng = np.random.default_rng(1)
    vol_a, vol_b = _blob_masks(rng, 5, 20, 20, 0.0), _blob_masks(rng, 5, 20, 20, 0.0)
    assert abs(hd95(vol_a, vol_b, spacing=(3.0, 1.0, 1.0))
               - medpy_binary.hd95(vol_a, vol_b, voxelspacing=(3.0, 1.0, 1.0))) <= 1e-6
    full = np.ones((10, 10), bool)  # the array border is the whole surface
    dot = np.zeros((10, 10), bool)
    dot[4, 4] = True
    assert abs(hd95(full, dot) - medpy_binary.hd95(full, dot)) <= 1e-6


def test_hd95_empty_cases_and_hand_value():
    empty = np.zeros((8, 8), bool)
    some = empty.copy()
    some[2:4, 2:4] = True
    assert hd95(empty, empty) == 0.0
    assert math.isnan(hd95(some, empty)) and math.isnan(hd95(empty, some))
    assert hd95(some, some) == 0.0
    shifted = np.roll(some, 3, axis=1)  # every surface pixel is 3 columns from the other square's
    assert hd95(some, shifted) == pytest.approx(3.0)
    with pytest.raises(ValueError):
        hd95(some, some[:4])


def test_dice_per_volume_hand_values():
    pred = np.zeros((5, 4, 4), bool)
    truth = np.zeros((5, 4, 4), bool)
    ids = ["B", "A", "B", "C", "A"]
    # A: slices 1, 4 -> truth 4 pixels, pred 2 of them + 2 extra: Dice 2*2/(4+4) = 0.5
    truth[1, 0, :] = True
    pred[1, 0, :2] = True
    pred[4, 3, :2] = True
    # B: slices 0, 2 -> perfect 3 pixels spread over two slices
    truth[0, 1, :2] = pred[0, 1, :2] = True
    truth[2, 2, 0] = pred[2, 2, 0] = True
    # C: slice 3 -> no tumor anywhere: 1.0 by convention
    got = dice_per_volume(pred, truth, ids)
    assert list(got) == ["A", "B", "C"]
    assert got == {"A": pytest.approx(0.5), "B": 1.0, "C": 1.0}
    pred[3, 0, 0] = True  # C now has a false positive only
    assert dice_per_volume(pred, truth, ids)["C"] == 0.0
    with pytest.raises(ValueError):
        dice_per_volume(pred, truth, ids[:4])


def _reference_report(pred, truth, ids, pred_labels, true_labels):
    """Everything recomputed with scikit-learn, medpy and plain NumPy loops."""
    flat_t, flat_p = truth.reshape(-1), pred.reshape(-1)
    per_slice_dice, tumor_dice, hds, skipped = [], [], [], 0
    for p, t in zip(pred, truth):
        den = p.sum() + t.sum()
        per_slice_dice.append(1.0 if den == 0 else 2 * (p & t).sum() / den)
        if t.any():
            tumor_dice.append(per_slice_dice[-1])
        if p.any() and t.any():
            hds.append(medpy_binary.hd95(p, t))
        elif p.any() != t.any():
            skipped += 1
    vols = {}
    for pid in sorted(set(ids)):
        sel = np.array([i == pid for i in ids])
        p, t = pred[sel], truth[sel]
        inter, union, total = (p & t).sum(), (p | t).sum(), p.sum() + t.sum()
        vols[pid] = (1.0 if total == 0 else 2 * inter / total, 1.0 if union == 0 else inter / union)
    return {
        "slice_accuracy": skm.accuracy_score(true_labels, pred_labels),
        "slice_precision": skm.precision_score(true_labels, pred_labels, zero_division=0),
        "slice_recall": skm.recall_score(true_labels, pred_labels, zero_division=0),
        "slice_f1": skm.f1_score(true_labels, pred_labels, zero_division=0),
        "pixel_accuracy": skm.accuracy_score(flat_t, flat_p),
        "pixel_precision": skm.precision_score(flat_t, flat_p, zero_division=0),
        "pixel_recall": skm.recall_score(flat_t, flat_p, zero_division=0),
        "pixel_f1": skm.f1_score(flat_t, flat_p, zero_division=0),
        "dice_volume_mean": np.mean([d for d, _ in vols.values()]),
        "dice_volume_median": np.median([d for d, _ in vols.values()]),
        "iou_mean": np.mean([j for _, j in vols.values()]),
        "dice_tumor_slices_mean": np.mean(tumor_dice),
        "dice_slice_mean": np.mean(per_slice_dice),
        "hd95_mean": np.mean(hds),
        "hd95_n": len(hds),
        "hd95_skipped": skipped,
        "n_slices": len(ids),
        "n_patients": len(vols),
        "n_tumor_slices": int(truth.any(axis=(1, 2)).sum()),
    }, vols


@pytest.mark.parametrize("label_source", ["masks", "probabilities"])
def test_segmentation_report_matches_references(label_source, monkeypatch):
    import dlvae_jax.metrics as m

    monkeypatch.setattr(m, "_CHUNK", 7)  # several chunks even on a small array
    rng = np.random.default_rng(3)
    n = 40
    truth = _blob_masks(rng, n, 16, 16)
    pred = truth.copy()
    pred[::3] = _blob_masks(rng, len(pred[::3]), 16, 16)
    pred[1::5] = np.roll(pred[1::5], 2, axis=2)
    ids = [f"P{i % 4}" for i in rng.permutation(n)]
    kwargs = {}
    pred_labels = pred.any(axis=(1, 2))
    if label_source == "probabilities":
        prob = rng.random(n).astype(np.float32)
        kwargs = {"tumor_prob_N": prob, "threshold": 0.4}
        pred_labels = prob >= 0.4
    ours = segmentation_report(pred, truth, ids, **kwargs)
    ref, vols = _reference_report(pred, truth, ids, pred_labels, truth.any(axis=(1, 2)))
    for key, value in ref.items():
        assert ours[key] == pytest.approx(value, abs=1e-9), key
    assert [r["patient"] for r in ours["per_patient"]] == sorted(vols)
    for row in ours["per_patient"]:
        sel = np.array([i == row["patient"] for i in ids])
        assert row["dice"] == pytest.approx(vols[row["patient"]][0])
        assert row["iou"] == pytest.approx(vols[row["patient"]][1])
        assert row["n_slices"] == sel.sum()
        assert row["n_tumor_slices"] == truth[sel].any(axis=(1, 2)).sum()
        both = [medpy_binary.hd95(p, t) for p, t in zip(pred[sel], truth[sel]) if p.any() and t.any()]
        assert row["hd95_n"] == len(both)
        assert (math.isnan(row["hd95"]) and not both) or row["hd95"] == pytest.approx(np.mean(both))
    # Integer masks (the dataset's 0/255) give the same report.
    again = segmentation_report(pred.astype(np.uint8) * 255, truth.astype(np.uint8), ids, **kwargs)
    assert again["dice_volume_mean"] == ours["dice_volume_mean"] and again["hd95_mean"] == ours["hd95_mean"]


def test_segmentation_report_empty_cases():
    n, shape = 6, (6, 8, 8)
    empty = np.zeros(shape, bool)
    ids = ["A"] * 3 + ["B"] * 3
    # Nothing anywhere: every Dice/IoU is 1, no HD95 measured, no positives.
    r = segmentation_report(empty, empty, ids)
    assert r["dice_volume_mean"] == r["dice_volume_median"] == r["iou_mean"] == r["dice_slice_mean"] == 1.0
    assert math.isnan(r["dice_tumor_slices_mean"]) and math.isnan(r["hd95_mean"]) and math.isnan(r["hd95_median"])
    assert r["hd95_n"] == 0 and r["hd95_skipped"] == 0 and r["n_tumor_slices"] == 0
    assert r["slice_accuracy"] == 1.0 and r["slice_precision"] == r["slice_recall"] == r["slice_f1"] == 0.0
    assert r["pixel_accuracy"] == 1.0 and r["pixel_f1"] == 0.0
    assert all(math.isnan(row["hd95"]) and row["dice"] == 1.0 for row in r["per_patient"])
    # Truth everywhere, prediction empty: recall 0, Dice 0, HD95 skipped on every tumor slice.
    truth = empty.copy()
    truth[:, 2:5, 2:5] = True
    r = segmentation_report(empty, truth, ids)
    assert r["slice_recall"] == r["pixel_recall"] == r["dice_volume_mean"] == r["dice_tumor_slices_mean"] == 0.0
    assert r["hd95_skipped"] == n and r["hd95_n"] == 0 and math.isnan(r["hd95_mean"])
    # Prediction everywhere, truth empty: precision 0, HD95 skipped as well.
    r = segmentation_report(truth, empty, ids)
    assert r["slice_precision"] == r["pixel_precision"] == r["dice_volume_mean"] == 0.0 and r["hd95_skipped"] == n
    # Perfect on some slices, empty/empty on the rest: HD95 averages only the measured slices.
    pred = truth.copy()
    pred[3:] = truth[3:] = False
    r = segmentation_report(pred, truth, ids)
    assert r["hd95_mean"] == 0.0 and r["hd95_n"] == 3 and r["hd95_skipped"] == 0
    assert r["dice_volume_mean"] == 1.0 and r["slice_f1"] == 1.0


def test_accumulator_batches_equal_one_call():
    rng = np.random.default_rng(5)
    pred, truth = _blob_masks(rng, 20, 12, 12), _blob_masks(rng, 20, 12, 12)
    ids = [f"P{i // 6}" for i in range(20)]
    acc = SegmentationAccumulator()
    for s in range(0, 20, 3):
        part = acc.add(pred[s:s + 3], truth[s:s + 3], ids[s:s + 3])
        assert part["dice"].shape == (len(ids[s:s + 3]),)
    got, want = acc.report(), segmentation_report(pred, truth, ids)
    assert json.dumps(got, sort_keys=True) == json.dumps(want, sort_keys=True)
    with pytest.raises(ValueError):
        SegmentationAccumulator().report()


def test_penalized_hd95_and_volume_hd95_by_hand_and_against_medpy():
    """One-empty slices score the image diagonal in the penalized mean; the
    per-volume HD95 equals medpy's on the stacked volume (slice gap 1)."""
    rng = np.random.default_rng(8)
    shape = (6, 12, 10)
    truth, pred = _blob_masks(rng, *shape, 0.0), _blob_masks(rng, *shape, 0.0)
    truth[0] = pred[0] = False          # empty / empty: in neither mean
    truth[1], pred[1] = True, False     # truth only: penalized
    truth[2] = False
    pred[2, 0, 0] = True                # prediction only: penalized
    ids = ["A"] * 3 + ["B"] * 3
    acc = SegmentationAccumulator(volumes=True)
    acc.add(pred[:4], truth[:4], ids[:4])
    acc.add(pred[4:], truth[4:], ids[4:])
    r = acc.report()
    diag = math.hypot(12, 10)
    both = [i for i in range(6) if pred[i].any() and truth[i].any()]
    one = [i for i in range(6) if pred[i].any() != truth[i].any()]
    assert {1, 2} <= set(one) and 0 not in one + both
    per_slice = {i: medpy_binary.hd95(pred[i], truth[i]) for i in both}
    assert r["hd95_n"] == len(both) and r["hd95_one_empty_n"] == len(one)
    assert r["hd95_mean"] == pytest.approx(np.mean(list(per_slice.values())))
    assert r["hd95_penalized_n"] == len(both) + len(one)
    assert r["hd95_penalized_mean"] == pytest.approx((sum(per_slice.values()) + len(one) * diag)
                                                     / (len(both) + len(one)))
    for k, p in enumerate("AB"):
        ref = medpy_binary.hd95(pred[3 * k:3 * k + 3], truth[3 * k:3 * k + 3])
        assert r["per_patient"][k]["hd95_volume"] == pytest.approx(ref)
    assert r["hd95_volume_n"] == 2 and r["hd95_volume_mean"] == pytest.approx(
        np.mean([row["hd95_volume"] for row in r["per_patient"]]))
    # A patient with a tumor and an empty prediction: the volume's diagonal.
    acc = SegmentationAccumulator(volumes=True)
    acc.add(np.zeros((2, 4, 3), bool), np.ones((2, 4, 3), bool), ["C", "C"])
    r = acc.report()
    assert r["hd95_volume_n"] == 0 and r["hd95_volume_penalized_mean"] == pytest.approx(math.sqrt(4 + 16 + 9))


def test_nnunet_empty_convention_leaves_empty_cases_out():
    empty = np.zeros((4, 6, 6), bool)
    truth = empty.copy()
    truth[2:, 1:4, 1:4] = True           # patient B has tumor, A has none
    pred = truth.copy()
    pred[3] = False                      # B: half found -> Dice 2*9/(9+18) = 2/3
    ids = ["A", "A", "B", "B"]
    one = segmentation_report(pred, truth, ids)
    assert one["empty_convention"] == "one" and one["dice_volume_n"] == 2
    assert one["dice_volume_mean"] == pytest.approx((1.0 + 2 / 3) / 2)
    acc = SegmentationAccumulator(empty="exclude")
    acc.add(pred, truth, ids)
    ex = acc.report()
    assert ex["empty_convention"] == "exclude" and ex["dice_volume_n"] == 1
    assert ex["dice_volume_mean"] == pytest.approx(2 / 3) and ex["iou_mean"] == pytest.approx(9 / 18)
    assert math.isnan(ex["per_patient"][0]["dice"])
    # Per slice: A's two empty/empty slices and none of B's are left out.
    assert ex["dice_slice_n"] == 2 and ex["dice_slice_mean"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="empty"):
        SegmentationAccumulator(empty="zero")


def test_small_components_removed_as_skimage_does():
    """remove_small_components(m, k) == skimage's remove_small_objects with
    8-connectivity and max_size k - 1 (objects of fewer than k pixels go)."""
    from skimage.morphology import remove_small_objects

    from dlvae_jax.metrics import decide, remove_small_components

    rng = np.random.default_rng(4)
    masks = rng.random((6, 20, 20)) < 0.25
    for k in (0, 1, 2, 5, 12):
        got = remove_small_components(masks, k)
        want = masks if k <= 1 else np.stack([remove_small_objects(m, max_size=k - 1, connectivity=2) for m in masks])
        np.testing.assert_array_equal(got, want)
    # decide applies it after the class-head gate; the slice label is kept.
    prob = np.zeros((1, 8, 8), np.float32)
    prob[0, 1:4, 1:4] = 0.9   # 9 pixels
    prob[0, 6, 6] = 0.9       # 1 pixel
    masks, labels = decide({"prob_BxHxW": prob, "tumor_prob_B": np.array([0.8], np.float32)}, 1, (8, 8), 2)
    assert masks.sum() == 9 and labels[0]


def test_decide_presence_rules_by_hand():
    from dlvae_jax.errors import DlvaeError
    from dlvae_jax.metrics import decide

    # Slice 0: a 9-pixel blob, class head says no tumor. Slice 1: one stray pixel,
    # class head says tumor. Slice 2: nothing above 0.5, class head says tumor.
    prob = np.zeros((3, 8, 8), np.float32)
    prob[0, 1:4, 1:4] = 0.9
    prob[1, 6, 6] = 0.7
    prob[2] = 0.4
    out = {"prob_BxHxW": prob, "tumor_prob_B": np.array([0.2, 0.9, 0.6], np.float32)}
    masks, labels = decide(out, 3, (8, 8), 0, "class")
    assert labels.tolist() == [False, True, True] and masks.sum(axis=(1, 2)).tolist() == [0, 1, 0]
    masks, labels = decide(out, 3, (8, 8), 0, "mask")
    assert labels.tolist() == [True, True, False] and masks.sum(axis=(1, 2)).tolist() == [9, 1, 0]
    # Removing components under 2 pixels empties slice 1, which is then "no tumor".
    masks, labels = decide(out, 3, (8, 8), 2, "mask")
    assert labels.tolist() == [True, False, False] and masks.sum(axis=(1, 2)).tolist() == [9, 0, 0]
    with pytest.raises(DlvaeError, match="presence"):
        decide(out, 3, (8, 8), 0, "area")


def test_volume_components_by_hand():
    """3D components of a stacked volume, 26-connected: a blob spanning
    slices, a smaller one touching it only at a corner across slices (the
    same component), and two separate ones of known sizes."""
    from dlvae_jax.errors import DlvaeError
    from dlvae_jax.metrics import decide, remove_small_volume_components

    vol = np.zeros((4, 10, 10), bool)
    vol[0:3, 1:4, 1:4] = True     # 27 voxels
    vol[3, 4, 4] = True           # touches (2, 3, 3) at a corner: joins the 27 (28)
    vol[0, 7:9, 7:9] = True       # 4 voxels, alone
    vol[2:4, 7, 1] = True         # 2 voxels, alone
    assert remove_small_volume_components(vol, 0.0).sum() == 34
    kept = remove_small_volume_components(vol, 0.1)  # under 2.8 voxels go: the pair
    assert kept.sum() == 32 and not kept[2:4, 7, 1].any() and kept[3, 4, 4]
    kept = remove_small_volume_components(vol, 1.0)  # the largest only
    assert kept.sum() == 28 and not kept[0, 7:9, 7:9].any()
    assert remove_small_volume_components(np.zeros((2, 3, 3), bool), 1.0).sum() == 0
    # decide: mask presence follows the reduced mask, class presence keeps the head's call.
    prob = np.where(vol, 0.9, 0.1).astype(np.float32)
    out = {"prob_BxHxW": prob, "tumor_prob_B": np.full(4, 0.9, np.float32)}
    masks, labels = decide(out, 4, (10, 10), 0, "mask", 1.0)
    assert masks.sum() == 28 and labels.tolist() == [True, True, True, True]
    prob[3, 4, 4] = 0.1  # now slice 3 holds only the pair's voxel: removed, so no tumor under mask presence
    masks, labels = decide(out, 4, (10, 10), 0, "mask", 0.5)
    assert masks.sum() == 27 and labels.tolist() == [True, True, True, False]
    masks, labels = decide(out, 4, (10, 10), 0, "class", 0.5)
    assert masks.sum() == 27 and labels.tolist() == [True, True, True, True]
    with pytest.raises(DlvaeError, match="min_volume_share"):
        decide(out, 4, (10, 10), 0, "mask", 1.5)
