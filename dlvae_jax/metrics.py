"""Slice and pixel metrics (Rao et al., Eqs. 13-16), Dice, IoU and HD95, in NumPy on the host.

Empty-mask conventions (stated because libraries differ: MONAI gives NaN for an
empty ground truth, medpy raises):

* Dice and IoU of two empty masks are 1 (a correct "no tumor"); one empty and
  one not gives 0. This holds per slice and per volume (a patient without
  tumor whose prediction is empty scores 1).
* Precision, recall and F1 with a zero denominator are 0, as in
  scikit-learn's ``zero_division=0``.
* HD95 of two empty masks is 0.0; of one empty and one non-empty mask it is
  NaN (there is no surface to measure to). Means of HD95 are taken over the
  slices where both masks are non-empty: NaN slices are skipped and counted
  (``hd95_skipped``), and empty/empty slices are left out too (``hd95_n``
  counts the slices averaged), since their 0.0 would only measure how many
  healthy slices the data holds. A missed or hallucinated tumor therefore
  shows in Dice and recall, not in that HD95.
* So that HD95 also compares models that miss or invent tumors, it is
  reported a second way beside it: ``hd95_penalized_mean`` over every slice
  with at least one non-empty mask, a slice with exactly one empty mask
  scoring the image diagonal (the largest distance possible in the slice),
  with its counts (``hd95_penalized_n``, ``hd95_one_empty_n``).
* Per volume (``SegmentationAccumulator(volumes=True)``, as `dlvae-jax
  evaluate` does): HD95 of each patient's slices stacked into a 3D volume
  (the slice gap counted as one pixel, the kaggle_3m files carry no spacing),
  ``hd95_volume_mean`` over patients with both volumes non-empty and
  ``hd95_volume_penalized_mean`` with the volume's diagonal for a patient
  where exactly one is empty.
* nnU-Net's convention (Isensee et al., 2021: a case whose reference and
  prediction are both empty has no Dice and is left out of the mean) is
  available as ``empty="exclude"``; the default ``empty="one"`` scores it 1.
  The report names the convention used (``empty_convention``).

HD95 follows ``medpy.metric.binary.hd95`` exactly: the surface of a mask is
the mask XOR its binary erosion with the connectivity-1 structure (pixels on
the array border erode away), distances come from
``scipy.ndimage.distance_transform_edt`` and HD95 is the 95th percentile
(linear interpolation) of the distances from each surface to the other, both
directions pooled.

Per-volume (per-patient) figures pool the confusion counts of a patient's
slices before dividing, as Buda et al. report Dice per volume (mean and median
over patients).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy import ndimage

from dlvae_jax.errors import DlvaeError

EMPTY_CONVENTIONS = ("one", "exclude")

# Slices processed at a time: bounds the boolean temporaries to a few tens of MB
# at 256 x 256 whatever N is.
_CHUNK = 256


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


def iou_from_counts(counts: dict[str, int]) -> float:
    """IoU TP / (TP + FP + FN) from confusion counts; 1.0 when both masks are empty."""
    den = counts["tp"] + counts["fp"] + counts["fn"]
    return 1.0 if den == 0 else counts["tp"] / den


def iou(pred: np.ndarray, truth: np.ndarray) -> float:
    """Intersection over union; 1.0 when both are empty."""
    return iou_from_counts(confusion(pred, truth))


# ----------------------------------------------------------------------------- HD95


def _surface(mask: np.ndarray) -> np.ndarray:
    structure = ndimage.generate_binary_structure(mask.ndim, 1)
    return mask ^ ndimage.binary_erosion(mask, structure=structure, iterations=1)


def diagonal(shape: Sequence[int], spacing: float | Sequence[float] = 1.0) -> float:
    """The diagonal of an array of `shape` with pixel size `spacing`: the HD95
    given to a slice (or volume) where exactly one mask is empty."""
    sizes = np.asarray(shape, np.float64) * np.broadcast_to(np.asarray(spacing, np.float64), (len(shape),))
    return float(np.sqrt(np.sum(sizes**2)))


def hd95(pred: np.ndarray, truth: np.ndarray, spacing: float | Sequence[float] = 1.0) -> float:
    """95th percentile of the symmetric surface distances between two masks.

    pred, truth: arrays of one shape (any rank; nonzero = object). spacing:
    size of a pixel along each axis (one number for all); the result is in
    its units, pixels by default. Returns 0.0 when both masks are empty and
    NaN when exactly one is. Equal to ``medpy.metric.binary.hd95(pred, truth,
    voxelspacing=spacing)`` whenever both are non-empty.
    """
    pred = np.asarray(pred) != 0
    truth = np.asarray(truth) != 0
    if pred.shape != truth.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from truth shape {truth.shape}")
    has_pred, has_truth = bool(pred.any()), bool(truth.any())
    if not (has_pred or has_truth):
        return 0.0
    if not (has_pred and has_truth):
        return float("nan")
    # Every surface pixel lies in the union's bounding box, so the distance
    # transforms can run on that box grown by one pixel (the erosion's reach):
    # the crop changes no surface pixel and no nearest-surface distance, and
    # small tumors on a 256 x 256 slice cost a fraction of the full transform.
    # Where the box meets the array border the crop stops there, so the border
    # still erodes the mask as in the full array.
    nz = np.nonzero(pred | truth)
    box = tuple(slice(max(int(ix.min()) - 1, 0), int(ix.max()) + 2) for ix in nz)
    pred_s, truth_s = _surface(pred[box]), _surface(truth[box])
    sampling = np.broadcast_to(np.asarray(spacing, np.float64), (pred.ndim,))
    d_pred = ndimage.distance_transform_edt(~truth_s, sampling=sampling)[pred_s]
    d_truth = ndimage.distance_transform_edt(~pred_s, sampling=sampling)[truth_s]
    return float(np.percentile(np.concatenate([d_pred, d_truth]), 95))


# ----------------------------------------------------------------------------- per-slice, per-volume


def _chunk_bool(x: np.ndarray, start: int, stop: int) -> np.ndarray:
    part = x[start:stop]
    return part if part.dtype == bool else part != 0


def slice_counts(pred_NxHxW: np.ndarray, truth_NxHxW: np.ndarray) -> dict[str, np.ndarray]:
    """Per-slice confusion counts: {"tp", "fp", "tn", "fn"} -> int64 [N].

    Masks are boolean or integer (nonzero = tumor) [N, H, W]; processed a few
    hundred slices at a time, so no full-size temporary is made.
    """
    if pred_NxHxW.shape != truth_NxHxW.shape or pred_NxHxW.ndim != 3:
        raise ValueError(
            f"masks must be two [N, H, W] arrays of one shape, got {pred_NxHxW.shape} and {truth_NxHxW.shape}"
        )
    n, h, w = pred_NxHxW.shape
    tp, n_pred, n_truth = (np.empty(n, np.int64) for _ in range(3))
    for start in range(0, n, _CHUNK):
        stop = min(start + _CHUNK, n)
        p, t = _chunk_bool(pred_NxHxW, start, stop), _chunk_bool(truth_NxHxW, start, stop)
        tp[start:stop] = np.count_nonzero(p & t, axis=(1, 2))
        n_pred[start:stop] = np.count_nonzero(p, axis=(1, 2))
        n_truth[start:stop] = np.count_nonzero(t, axis=(1, 2))
    fp, fn = n_pred - tp, n_truth - tp
    return {"tp": tp, "fp": fp, "fn": fn, "tn": h * w - tp - fp - fn}


def _group(patient_ids: Sequence[str]) -> tuple[list[str], np.ndarray]:
    """Sorted unique patients and, per slice, the index of its patient (int64 [N])."""
    names, inverse = np.unique(np.asarray([str(p) for p in patient_ids]), return_inverse=True)
    return [str(s) for s in names], inverse.reshape(-1)


def dice_per_volume(pred_NxHxW: np.ndarray, truth_NxHxW: np.ndarray, patient_ids_N: Sequence[str]) -> dict[str, float]:
    """Dice of each patient's volume (its slices stacked): {patient: Dice}, sorted by patient.

    Masks boolean or integer [N, H, W]; patient_ids_N one id per slice. A
    patient with no tumor in truth or prediction scores 1.0.
    """
    if len(patient_ids_N) != len(pred_NxHxW):
        raise ValueError(f"{len(patient_ids_N)} patient ids for {len(pred_NxHxW)} slices")
    counts = slice_counts(pred_NxHxW, truth_NxHxW)
    names, idx = _group(patient_ids_N)
    sums = {k: np.bincount(idx, weights=v, minlength=len(names)) for k, v in counts.items()}
    return {p: dice_from_counts({k: sums[k][i] for k in sums}) for i, p in enumerate(names)}


def _nanmean(x: np.ndarray) -> float:
    x = x[~np.isnan(x)]
    return float(x.mean()) if x.size else float("nan")


def slice_stats(
    pred_BxHxW: np.ndarray,
    truth_BxHxW: np.ndarray,
    pred_labels_B: np.ndarray | None = None,
    true_labels_B: np.ndarray | None = None,
    spacing: float | Sequence[float] = 1.0,
) -> dict[str, np.ndarray]:
    """The few numbers per slice that `SegmentationAccumulator` keeps: pixel
    counts tp/fp/tn/fn, "dice", "hd95" (float64 [B]; empty-mask rules in the
    module docstring) and the slice labels "pred_label", "true_label" (bool
    [B]; by default "mask non-empty")."""
    c = slice_counts(pred_BxHxW, truth_BxHxW)
    n_pred, n_truth = c["tp"] + c["fp"], c["tp"] + c["fn"]
    den = 2 * c["tp"] + c["fp"] + c["fn"]
    hd = np.where((n_pred == 0) & (n_truth == 0), 0.0, np.nan)
    for i in np.flatnonzero((n_pred > 0) & (n_truth > 0)):
        hd[i] = hd95(pred_BxHxW[i], truth_BxHxW[i], spacing)
    one_empty = (n_pred == 0) != (n_truth == 0)
    part = {
        **c,
        "dice": np.where(den == 0, 1.0, 2 * c["tp"] / np.maximum(den, 1)),
        "hd95": hd,
        "hd95_penalized": np.where(one_empty, diagonal(pred_BxHxW.shape[1:], spacing), hd),
        "pred_label": n_pred > 0 if pred_labels_B is None else np.asarray(pred_labels_B, bool).reshape(-1),
        "true_label": n_truth > 0 if true_labels_B is None else np.asarray(true_labels_B, bool).reshape(-1),
    }
    if len(part["pred_label"]) != len(n_pred) or len(part["true_label"]) != len(n_pred):
        raise ValueError(f"slice labels must have one entry per slice ({len(n_pred)})")
    return part


class SegmentationAccumulator:
    """Collects per-slice statistics batch by batch; `report()` gives `segmentation_report`'s dict.

    Keeps only a few numbers per slice, so a dataset is evaluated without
    holding its masks.
    """

    def __init__(self, spacing: float | Sequence[float] = 1.0, *, volumes: bool = False, empty: str = "one"):
        """volumes: also keep each patient's masks (bit-packed, 16 KB per
        256 x 256 slice pair) for the per-volume 3D HD95. empty: "one" or
        "exclude" (nnU-Net's), how an empty/empty case enters Dice and IoU means."""
        if empty not in EMPTY_CONVENTIONS:
            raise ValueError(f"empty must be one of {EMPTY_CONVENTIONS}, got {empty!r}")
        self.spacing = spacing
        self.empty = empty
        self._parts: list[dict[str, np.ndarray]] = []
        self._patients: list[str] = []
        self._volumes: dict[str, list[tuple[np.ndarray, np.ndarray]]] | None = {} if volumes else None
        self._slice_shape: tuple[int, int] | None = None

    def add(
        self,
        pred_BxHxW: np.ndarray,
        truth_BxHxW: np.ndarray,
        patient_ids_B: Sequence[str],
        pred_labels_B: np.ndarray | None = None,
        true_labels_B: np.ndarray | None = None,
    ) -> dict[str, np.ndarray]:
        """Adds a batch; returns its per-slice stats (counts, "dice", "hd95": float64 [B]).

        Labels are bool [B] ("slice has tumor"); by default the prediction's
        label is "mask non-empty" and the truth's is "truth mask non-empty".
        """
        if len(patient_ids_B) != len(pred_BxHxW):
            raise ValueError(f"{len(patient_ids_B)} patient ids for {len(pred_BxHxW)} slices")
        part = slice_stats(pred_BxHxW, truth_BxHxW, pred_labels_B, true_labels_B, self.spacing)
        self.add_stats(part, patient_ids_B)
        if self._volumes is not None:
            self._slice_shape = tuple(pred_BxHxW.shape[1:])
            for p, pred, truth in zip(patient_ids_B, pred_BxHxW, truth_BxHxW):
                self._volumes.setdefault(str(p), []).append((np.packbits(pred != 0), np.packbits(truth != 0)))
        return part

    def _volume_hd95(self, patient: str) -> tuple[float, float]:
        """(3D HD95, the same with the volume diagonal when exactly one volume
        is empty); both NaN when both volumes are empty."""
        h, w = self._slice_shape
        n = h * w
        pairs = self._volumes[patient]
        pred = np.stack([np.unpackbits(p, count=n).reshape(h, w) for p, _ in pairs]).astype(bool)
        truth = np.stack([np.unpackbits(t, count=n).reshape(h, w) for _, t in pairs]).astype(bool)
        spacing = (1.0, *np.broadcast_to(np.asarray(self.spacing, np.float64), (2,)))
        if not (pred.any() or truth.any()):
            return float("nan"), float("nan")  # nothing to measure, in either mean
        value = hd95(pred, truth, spacing)
        if pred.any() != truth.any():
            return value, diagonal(pred.shape, spacing)
        return value, value

    def add_stats(self, part: dict[str, np.ndarray], patient_ids_B: Sequence[str]) -> None:
        """Adds per-slice stats made by `slice_stats` (e.g. on other processes and gathered)."""
        if len(patient_ids_B) != len(part["dice"]):
            raise ValueError(f"{len(patient_ids_B)} patient ids for {len(part['dice'])} slices")
        self._parts.append({k: np.asarray(v) for k, v in part.items()})
        self._patients.extend(str(p) for p in patient_ids_B)

    def report(self) -> dict:
        """The report dict described in `segmentation_report`."""
        if not self._parts:
            raise ValueError("no slices to report on")
        s = {k: np.concatenate([p[k] for p in self._parts]) for k in self._parts[0]}
        names, idx = _group(self._patients)
        n_p = len(names)

        slice_c = confusion(s["pred_label"], s["true_label"])
        slice_m = classification_metrics(slice_c)
        pixel_c = {k: int(s[k].sum()) for k in ("tp", "fp", "tn", "fn")}
        pixel_m = classification_metrics(pixel_c)

        vol = {k: np.bincount(idx, weights=s[k], minlength=n_p) for k in ("tp", "fp", "tn", "fn")}
        per_patient = []
        dice_v, iou_v = np.empty(n_p), np.empty(n_p)
        hd = s["hd95"]
        measured = ~np.isnan(hd) & (s["tp"] + s["fp"] > 0)  # both masks non-empty
        hd_pen = s["hd95_penalized"] if "hd95_penalized" in s else np.where(measured, hd, np.nan)
        penalized = ~np.isnan(hd_pen) & (s["tp"] + s["fp"] + s["fn"] > 0)  # at least one mask non-empty
        hd_vol = np.full(n_p, np.nan)
        hd_vol_pen = np.full(n_p, np.nan)
        for i, p in enumerate(names):
            c = {k: vol[k][i] for k in vol}
            dice_v[i], iou_v[i] = dice_from_counts(c), iou_from_counts(c)
            if self.empty == "exclude" and c["tp"] + c["fp"] + c["fn"] == 0:
                dice_v[i] = iou_v[i] = np.nan  # nnU-Net: no Dice for an empty/empty case
            mine = idx == i
            hd_p = hd[mine & measured]
            row = {
                "patient": p,
                "n_slices": int(mine.sum()),
                "n_tumor_slices": int(s["true_label"][mine].sum()),
                "n_pred_tumor_slices": int(s["pred_label"][mine].sum()),
                "dice": float(dice_v[i]),
                "iou": float(iou_v[i]),
                "hd95": float(hd_p.mean()) if hd_p.size else float("nan"),
                "hd95_n": int(hd_p.size),
                "hd95_penalized": _nanmean(hd_pen[mine & penalized]),
            }
            if self._volumes is not None and p in self._volumes:
                hd_vol[i], hd_vol_pen[i] = self._volume_hd95(p)
                row["hd95_volume"] = float(hd_vol[i])
            per_patient.append(row)
        tumor = s["tp"] + s["fn"] > 0
        slice_dice = s["dice"]
        if self.empty == "exclude":
            slice_dice = np.where(s["tp"] + s["fp"] + s["fn"] == 0, np.nan, slice_dice)
        scored = ~np.isnan(dice_v)
        volume = {}
        if self._volumes is not None:
            both = ~np.isnan(hd_vol) & np.array([(vol["tp"][i] + vol["fp"][i] > 0) for i in range(n_p)])
            volume = {
                "hd95_volume_mean": _nanmean(hd_vol[both]),
                "hd95_volume_n": int(both.sum()),
                "hd95_volume_penalized_mean": _nanmean(hd_vol_pen),
                "hd95_volume_penalized_n": int((~np.isnan(hd_vol_pen)).sum()),
            }
        return {
            "n_slices": int(len(hd)),
            "n_patients": n_p,
            "n_tumor_slices": int(tumor.sum()),
            "slice_accuracy": slice_m["accuracy"],
            "slice_precision": slice_m["precision"],
            "slice_recall": slice_m["recall"],
            "slice_f1": slice_m["f1"],
            "slice_counts": slice_c,
            "pixel_accuracy": pixel_m["accuracy"],
            "pixel_precision": pixel_m["precision"],
            "pixel_recall": pixel_m["recall"],
            "pixel_f1": pixel_m["f1"],
            "pixel_counts": pixel_c,
            "empty_convention": self.empty,
            "dice_volume_mean": _nanmean(dice_v),
            "dice_volume_median": float(np.median(dice_v[scored])) if scored.any() else float("nan"),
            "dice_volume_n": int(scored.sum()),
            "dice_tumor_slices_mean": float(s["dice"][tumor].mean()) if tumor.any() else float("nan"),
            "dice_slice_mean": _nanmean(slice_dice),
            "dice_slice_n": int((~np.isnan(slice_dice)).sum()),
            "iou_mean": _nanmean(iou_v),
            "hd95_mean": _nanmean(hd[measured]),
            "hd95_median": float(np.median(hd[measured])) if measured.any() else float("nan"),
            "hd95_n": int(measured.sum()),
            "hd95_skipped": int(np.isnan(hd).sum()),
            "hd95_penalized_mean": _nanmean(hd_pen[penalized]),
            "hd95_penalized_n": int(penalized.sum()),
            "hd95_one_empty_n": int(np.isnan(hd).sum()),
            **volume,
            "per_patient": per_patient,
        }


def segmentation_report(
    pred_NxHxW: np.ndarray,
    truth_NxHxW: np.ndarray,
    patient_ids_N: Sequence[str],
    *,
    pred_labels_N: np.ndarray | None = None,
    tumor_prob_N: np.ndarray | None = None,
    threshold: float = 0.5,
    true_labels_N: np.ndarray | None = None,
    spacing: float | Sequence[float] = 1.0,
) -> dict:
    """Every figure of an evaluation, from per-slice masks.

    pred_NxHxW, truth_NxHxW: bool (or integer, nonzero = tumor) [N, H, W]
    masks, taken as given (no thresholding, no gating by the slice label).
    patient_ids_N: one id per slice. Predicted slice labels: `pred_labels_N`
    (bool [N]), else ``tumor_prob_N >= threshold`` (float [N]), else "mask
    non-empty". True slice labels: `true_labels_N`, else "truth mask
    non-empty". spacing: pixel size for HD95 (1.0 = pixels).

    Returns a dict:

    * ``n_slices``, ``n_patients``, ``n_tumor_slices`` (truth mask non-empty);
    * ``slice_accuracy|precision|recall|f1``: Eqs. 13-16 on slice labels,
      counts in ``slice_counts``;
    * ``pixel_accuracy|precision|recall|f1``: Eqs. 13-16 on all pixels pooled
      (``pixel_f1`` is the global Dice), counts in ``pixel_counts``;
    * ``dice_volume_mean|median``: over patients of the per-volume Dice;
      ``iou_mean``: mean over patients of the per-volume IoU;
    * ``dice_tumor_slices_mean``: mean per-slice Dice over slices whose truth
      has tumor (NaN if none); ``dice_slice_mean``: over all slices;
    * ``hd95_mean|median`` (pixels), ``hd95_n``, ``hd95_skipped``: see the
      module docstring;
    * ``per_patient``: rows {patient, n_slices, n_tumor_slices,
      n_pred_tumor_slices, dice, iou, hd95 (mean over the patient's slices
      with both masks non-empty, NaN if none), hd95_n}, sorted by patient.
    """
    if pred_labels_N is None and tumor_prob_N is not None:
        pred_labels_N = np.asarray(tumor_prob_N) >= threshold
    acc = SegmentationAccumulator(spacing)
    ids = list(patient_ids_N)
    if len(ids) != len(pred_NxHxW):
        raise ValueError(f"{len(ids)} patient ids for {len(pred_NxHxW)} slices")
    for start in range(0, len(ids), _CHUNK):
        stop = start + _CHUNK
        acc.add(
            pred_NxHxW[start:stop], truth_NxHxW[start:stop], ids[start:stop],
            None if pred_labels_N is None else np.asarray(pred_labels_N)[start:stop],
            None if true_labels_N is None else np.asarray(true_labels_N)[start:stop],
        )
    return acc.report()


THRESHOLD = 0.5  # probability cut of both the class head and the pixel map
PRESENCE_RULES = ("class", "mask")  # what calls a slice "tumor" (`decide`)


def remove_small_components(masks_BxHxW: np.ndarray, min_size: int) -> np.ndarray:
    """Each slice's mask without its 8-connected components of fewer than
    `min_size` pixels (the post-processing nnU-Net also applies, with the size
    chosen on validation data): bool [B, H, W]."""
    masks = np.asarray(masks_BxHxW, bool).copy()
    if min_size <= 1:
        return masks
    structure = np.ones((3, 3), bool)
    for i in np.flatnonzero(masks.any(axis=(1, 2))):
        labels, n = ndimage.label(masks[i], structure=structure)
        sizes = np.bincount(labels.ravel(), minlength=n + 1)
        small = sizes < min_size
        small[0] = False
        masks[i][small[labels]] = False
    return masks


def remove_small_volume_components(masks_DxHxW: np.ndarray, min_share: float) -> np.ndarray:
    """One volume's mask (its slices stacked in order) without the 26-connected
    3D components smaller than `min_share` of its largest: bool [D, H, W].

    min_share 1.0 keeps the largest component only (with its ties), the rule
    nnU-Net chooses by cross-validation; 0 keeps everything. A tumor in the
    LGG data is one connected region in nearly every patient, so a smaller
    separate region of the predicted mask is mostly a false positive."""
    masks = np.asarray(masks_DxHxW, bool).copy()
    if min_share <= 0 or not masks.any():
        return masks
    labels, n = ndimage.label(masks, structure=np.ones((3, 3, 3), bool))
    if n <= 1:
        return masks
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    sizes[0] = 0
    small = sizes < min_share * sizes.max()
    small[0] = False
    masks[small[labels]] = False
    return masks


def decide(out: dict[str, np.ndarray], n: int, shape_HxW: tuple[int, int],
           min_component: int = 0, presence: str = "class",
           min_volume_share: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """The slice decision shared by evaluation, prediction and in-training validation.

    A slice's mask is the pixels with ``prob >= THRESHOLD``, without its
    components smaller than `min_component` pixels when that is > 1
    (`remove_small_components`), and, when `min_volume_share` > 0, without the 3D
    components smaller than that share of the largest
    (`remove_small_volume_components`): the n slices must then be one
    patient's volume, in slice order. Whether the slice is called "tumor":

    * presence="class": the class head's ``tumor_prob >= THRESHOLD``; the
      mask of a slice called "no tumor" is emptied (the class head decides
      presence, the pixel map extent; a "tumor" slice may keep an empty mask);
    * presence="mask": the mask is not empty (the pixel map decides both, and
      the class head is not read).

    out: {"prob_BxHxW": float [B, H, W], "tumor_prob_B": float [B]} for n
    slices of shape_HxW. Returns (masks bool [B, H, W], labels bool [B]).
    Raises DlvaeError when the output does not have those shapes or the rule
    is unknown.
    """
    if presence not in PRESENCE_RULES:
        raise DlvaeError(f"presence must be one of {', '.join(PRESENCE_RULES)}, got {presence!r}")
    if not 0.0 <= min_volume_share <= 1.0:
        raise DlvaeError(f"min_volume_share must be in [0, 1], got {min_volume_share}")
    try:
        prob, tumor_prob = np.asarray(out["prob_BxHxW"]), np.asarray(out["tumor_prob_B"]).reshape(-1)
    except (KeyError, TypeError) as err:
        raise DlvaeError(f"predictor output lacks {err}; expected prob_BxHxW and tumor_prob_B") from None
    if prob.shape != (n, *shape_HxW) or tumor_prob.shape != (n,):
        raise DlvaeError(
            f"predictor returned prob {prob.shape} and tumor_prob {tumor_prob.shape} "
            f"for {n} slices of {shape_HxW[0]}x{shape_HxW[1]}"
        )
    masks = prob >= THRESHOLD
    if presence == "class":
        labels = tumor_prob >= THRESHOLD
        masks &= labels[:, None, None]
    if min_component > 1:
        masks = remove_small_components(masks, min_component)
    if min_volume_share > 0:
        masks = remove_small_volume_components(masks, min_volume_share)
    if presence == "mask":
        labels = masks.any(axis=(1, 2))
    return masks, labels


# ------------------------------------------------------------ what a latent carries

ACTIVE_VARIANCE = 0.01  # a latent dimension is active when Var over slices of its posterior mean exceeds this


def latent_report(means_NxD: np.ndarray, kl_NxD: np.ndarray, sizes: dict[str, int] | None = None) -> dict:
    """Information diagnostics of a VAE posterior over N slices.

    means_NxD: the posterior means; kl_NxD: KL(q(z|x) || N(0, I)) per slice
    and dimension, in nats. A dimension is active when the variance over the
    slices of its posterior mean exceeds `ACTIVE_VARIANCE` (Burda et al.,
    2016, "Importance weighted autoencoders", Section 5.2). The mean KL is an
    upper bound on the mutual information between the slices and z (in
    nats). sizes: {latent name: its number of dimensions}, in order, to split
    the figures by latent.
    """
    means, kl = np.asarray(means_NxD, np.float64), np.asarray(kl_NxD, np.float64)
    var_D = means.var(axis=0)
    kl_D = kl.mean(axis=0)
    out = {
        "n_slices": int(len(means)),
        "kl_nats": float(kl_D.sum()),
        "active_units": int((var_D > ACTIVE_VARIANCE).sum()),
        "n_dims": int(means.shape[1]),
        "kl_per_dim": [float(v) for v in kl_D],
        "mean_variance_per_dim": [float(v) for v in var_D],
    }
    if sizes:
        start, per = 0, {}
        for name, n in sizes.items():
            per[name] = {"kl_nats": float(kl_D[start:start + n].sum()),
                         "active_units": int((var_D[start:start + n] > ACTIVE_VARIANCE).sum()), "n_dims": int(n)}
            start += n
        out["per_latent"] = per
    return out


def probe_counts(masks_BxHxW: np.ndarray, truth_BxHxW: np.ndarray, labels_B: np.ndarray) -> dict[str, np.ndarray]:
    """What `probe_report` needs per slice: confusion counts and the slice labels."""
    c = slice_counts(masks_BxHxW, truth_BxHxW)
    return {**c, "pred_label": np.asarray(labels_B, bool), "true_label": (c["tp"] + c["fn"]) > 0}


def _volume_dice_and_accuracy(part: dict[str, np.ndarray], patient_ids: Sequence[str]) -> tuple[float, float]:
    names, idx = _group(patient_ids)
    sums = {k: np.bincount(idx, weights=part[k], minlength=len(names)) for k in ("tp", "fp", "tn", "fn")}
    dice_v = [dice_from_counts({k: sums[k][i] for k in sums}) for i in range(len(names))]
    return float(np.mean(dice_v)), float(np.mean(part["pred_label"] == part["true_label"]))


def probe_report(base: dict[str, np.ndarray], probes: dict[str, dict[str, np.ndarray]],
                 patient_ids: Sequence[str]) -> dict:
    """The latent probe: Dice per volume (mean over patients) and slice
    accuracy with the CNN's z as encoded and with each probe's z, and the
    drops (as encoded minus probe). All arguments come from `probe_counts`
    over the same slices."""
    dice0, acc0 = _volume_dice_and_accuracy(base, patient_ids)
    out = {"n_slices": int(len(base["tp"])), "n_patients": len(set(map(str, patient_ids))),
           "dice_volume_mean": dice0, "slice_accuracy": acc0}
    for name, part in probes.items():
        d, a = _volume_dice_and_accuracy(part, patient_ids)
        out[name] = {"dice_volume_mean": d, "slice_accuracy": a, "dice_drop": dice0 - d, "accuracy_drop": acc0 - a}
    return out
