"""Whether an uncertainty map means something: per-pixel scores, streamed over a split.

Two sources of a stochastic prediction, each giving a mean tumor
probability p per pixel and an uncertainty u per pixel:

* ``samples``: DL-VAE-CNN with its latent z drawn N times from the
  label-free posterior q(z | x, Y = unknown) it was trained with
  (`Predictor.sample_stats`);
* ``tta``: test-time augmentation, any model: the prediction on the slice
  and on the flips the run trained with (`trained_flips`), flipped back
  (`flips_mean`; `Predictor` with `tta` predicts this way).

u is the predictive entropy of p in bits (`predictive_entropy`); the
pixel's prediction is ``p >= 0.5`` (not gated by the class head).

Scores (`CalibrationAccumulator`):

* ``auroc_error``: how well u ranks the wrong pixels above the right ones
  (area under the ROC curve of u as a detector of pixel errors; 0.5 is
  chance). u is binned into 1,000 equal bins of [0, 1] and ties within a bin
  count one half, which is exact for u on the bin grid and otherwise within
  a bin's width of the exact value.
* ``ece``: expected calibration error of p against the truth, 15 equal bins
  of [0, 1] (Guo et al., 2017): sum over bins of (pixels in bin / pixels) *
  |fraction of tumor pixels - mean p|. Over all pixels, background included
  (most pixels are certain background, which keeps ECE small); the
  reliability table keeps every bin's count so the tumor range can be read.
* ``brier``: mean of (p - truth)^2.
"""

from __future__ import annotations

import numpy as np

U_BINS = 1000
P_BINS = 15


def predictive_entropy(prob: np.ndarray) -> np.ndarray:
    """Binary entropy in bits of a probability map, 0 log 0 = 0: float32, same shape, in [0, 1]."""
    p = np.clip(np.asarray(prob, np.float64), 0.0, 1.0)
    q = 1.0 - p
    with np.errstate(divide="ignore", invalid="ignore"):
        h = -(np.where(p > 0, p * np.log2(p), 0.0) + np.where(q > 0, q * np.log2(q), 0.0))
    return h.astype(np.float32)


def _flipped(x: np.ndarray, flip_ud: bool, flip_lr: bool) -> np.ndarray:
    if flip_ud:
        x = x[:, ::-1]
    if flip_lr:
        x = x[:, :, ::-1]
    return x


ALL_FLIPS = ((False, False), (False, True), (True, False), (True, True))  # (up-down, left-right)


def trained_flips(p_flip_lr: float, p_flip_ud: float) -> tuple[tuple[bool, bool], ...]:
    """The views test-time augmentation may average: the identity and the
    flips training augmented with (a probability > 0), as (up-down,
    left-right) pairs. A model trained on left-right flips only has never
    seen a brain upside down, and predicting one adds error, not information."""
    lr, ud = float(p_flip_lr) > 0, float(p_flip_ud) > 0
    return tuple((u, l) for u, l in ALL_FLIPS if (lr or not l) and (ud or not u))


def flips_mean(predict, images: np.ndarray, flips=ALL_FLIPS) -> dict[str, np.ndarray]:
    """Mean of a predictor's outputs over the given flips of the slices.

    predict: a function of uint8 slices [B, H, W(, C)] returning
    {"prob_BxHxW": [B, H, W], "tumor_prob_B": [B]} (`Predictor.single`);
    flips: (up-down, left-right) pairs, by default the identity and the
    three flips. The pixel maps are flipped back before averaging."""
    prob = tumor = None
    for flip_ud, flip_lr in flips:
        out = predict(np.ascontiguousarray(_flipped(images, flip_ud, flip_lr)))
        p = _flipped(np.asarray(out["prob_BxHxW"], np.float64), flip_ud, flip_lr)
        t = np.asarray(out["tumor_prob_B"], np.float64)
        prob, tumor = (p, t) if prob is None else (prob + p, tumor + t)
    n = len(flips)
    return {"prob_BxHxW": (prob / n).astype(np.float32), "tumor_prob_B": (tumor / n).astype(np.float32)}


class CalibrationAccumulator:
    """Streams (p, u, truth) pixel maps; `report()` gives the scores of the module docstring."""

    def __init__(self):
        self.err_u = np.zeros(U_BINS, np.int64)
        self.ok_u = np.zeros(U_BINS, np.int64)
        self.count_p = np.zeros(P_BINS, np.int64)
        self.sum_p = np.zeros(P_BINS, np.float64)
        self.pos_p = np.zeros(P_BINS, np.int64)
        self.sq_err = 0.0

    def add(self, prob: np.ndarray, uncertainty: np.ndarray, truth: np.ndarray) -> None:
        p = np.asarray(prob, np.float64).ravel()
        u = np.asarray(uncertainty, np.float64).ravel()
        t = np.asarray(truth).ravel() != 0
        if not (p.shape == u.shape == t.shape):
            raise ValueError(f"prob, uncertainty and truth must have one shape, got {prob.shape}, "
                             f"{uncertainty.shape}, {truth.shape}")
        wrong = (p >= 0.5) != t
        ub = np.clip((u * U_BINS).astype(np.int64), 0, U_BINS - 1)
        self.err_u += np.bincount(ub[wrong], minlength=U_BINS)
        self.ok_u += np.bincount(ub[~wrong], minlength=U_BINS)
        pb = np.clip((p * P_BINS).astype(np.int64), 0, P_BINS - 1)
        self.count_p += np.bincount(pb, minlength=P_BINS)
        self.sum_p += np.bincount(pb, weights=p, minlength=P_BINS)
        self.pos_p += np.bincount(pb, weights=t, minlength=P_BINS).astype(np.int64)
        self.sq_err += float(np.sum((p - t) ** 2))

    def report(self) -> dict:
        n_err, n_ok = int(self.err_u.sum()), int(self.ok_u.sum())
        n = n_err + n_ok
        if n == 0:
            raise ValueError("no pixels to report on")
        if n_err and n_ok:
            ok_below = np.concatenate([[0], np.cumsum(self.ok_u)[:-1]])
            auroc = float(np.sum(self.err_u * (ok_below + 0.5 * self.ok_u)) / (n_err * n_ok))
        else:
            auroc = float("nan")  # no errors (or nothing right): nothing to rank
        rows, ece = [], 0.0
        for b in range(P_BINS):
            c = int(self.count_p[b])
            mean_p = float(self.sum_p[b] / c) if c else float("nan")
            frac = float(self.pos_p[b] / c) if c else float("nan")
            if c:
                ece += c / n * abs(frac - mean_p)
            rows.append({"lo": b / P_BINS, "hi": (b + 1) / P_BINS, "count": c, "mean_prob": mean_p,
                         "fraction_tumor": frac})
        return {"n_pixels": n, "n_errors": n_err, "auroc_error": auroc, "ece": float(ece),
                "brier": self.sq_err / n, "reliability": rows}


def save_reliability(path, report: dict, title: str) -> None:
    """Reliability diagram: fraction of tumor pixels against mean p per bin,
    with the pixel count of each bin below (log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in report["reliability"] if r["count"]]
    fig, (ax, axc) = plt.subplots(2, 1, figsize=(5, 6), dpi=120, gridspec_kw={"height_ratios": [3, 1]}, sharex=True)
    ax.plot([0, 1], [0, 1], color="0.6", lw=1, ls="--", label="calibrated")
    ax.plot([r["mean_prob"] for r in rows], [r["fraction_tumor"] for r in rows], marker="o", color="tab:red",
            label=f"ECE {report['ece']:.4f}")
    ax.set_ylabel("fraction of tumor pixels")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.legend(loc="upper left")
    ax.set_title(title, fontsize=9, wrap=True)
    centers = [(r["lo"] + r["hi"]) / 2 for r in report["reliability"]]
    axc.bar(centers, [max(r["count"], 1) for r in report["reliability"]], width=1 / P_BINS * 0.9, color="0.4")
    axc.set_yscale("log")
    axc.set_xlabel("predicted tumor probability (mean)")
    axc.set_ylabel("pixels")
    fig.tight_layout()
    from dlvae_jax.io import atomic_path

    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
