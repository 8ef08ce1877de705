"""Are these slices like the ones the model was trained on? A plain intensity check.

`train` records a profile of its training slices in ``W/data_profile.json``:
where they came from (a data folder or the synthetic phantoms) and, per slice,
the mean FLAIR intensity inside the head (pixels above a low floor) and the
head's share of the slice. `evaluate` and `predict` profile the slices they
score and `compare` says, in one plain sentence, when they differ: another
kind of source, or a mean head intensity more than `MAX_SHIFT` training
standard deviations (of the per-slice means) away. It is a warning, not a
verdict: a model can still do well on shifted data, and unshifted data can
still be hard.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np

PROFILE_FILE = "data_profile.json"
HEAD_FLOOR = 10       # uint8 FLAIR levels: pixels above this count as head
MAX_SHIFT = 2.0       # training standard deviations of the per-slice mean
MAX_SLICES = 512      # slices profiled at training (evenly spaced)


def slice_means(flair_NxHxW: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean FLAIR inside the head, head share of the slice) per slice, float64 [N].
    Slices with no head pixel get NaN means (they are left out)."""
    x = np.asarray(flair_NxHxW)
    head = x > HEAD_FLOOR
    n = head.sum(axis=(1, 2))
    total = np.where(head, x, 0).sum(axis=(1, 2), dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(n > 0, total / n, np.nan)
    return mean, n / head[0].size


def profile(means: Sequence[float], shares: Sequence[float], source: str) -> dict:
    m = np.asarray(means, np.float64)
    m = m[~np.isnan(m)]
    s = np.asarray(shares, np.float64)
    return {"source": source, "n_slices": int(len(s)),
            "head_mean": float(m.mean()) if m.size else float("nan"),
            "head_mean_sd": float(m.std()) if m.size else float("nan"),
            "head_share": float(s.mean()) if s.size else float("nan")}


def source_kind(data_dir: str | None) -> str:
    return "folder" if data_dir else "synthetic phantoms"


def write_training_profile(workdir: Path, records, data_dir: str | None) -> dict:
    """Profiles up to MAX_SLICES evenly spaced training slices; writes PROFILE_FILE."""
    from dlvae_jax.data import lgg
    from dlvae_jax.io import write_json

    picked = [records[i] for i in np.linspace(0, len(records) - 1, min(len(records), MAX_SLICES)).astype(int)]
    flair, _ = lgg.load_arrays(picked, "flair")
    means, shares = slice_means(flair)
    prof = profile(means, shares, source_kind(data_dir))
    write_json(Path(workdir) / PROFILE_FILE, prof)
    return prof


def read_profile(workdir: Path) -> dict | None:
    try:
        return json.loads((Path(workdir) / PROFILE_FILE).read_text())
    except (OSError, ValueError):
        return None


def compare(trained: dict | None, scored: dict) -> str | None:
    """A sentence saying how the scored slices differ from the training ones, or None."""
    if not trained:
        return None
    reasons = []
    if trained.get("source") != scored.get("source"):
        reasons.append(f"the model was trained on {trained.get('source')}, these slices come from a "
                       f"{scored.get('source')}")
    mu, sd = trained.get("head_mean"), trained.get("head_mean_sd")
    got = scored.get("head_mean")
    if all(isinstance(v, (int, float)) and np.isfinite(v) for v in (mu, sd, got)):
        z = abs(got - mu) / max(sd, 1.0)
        if z > MAX_SHIFT:
            reasons.append(f"their mean FLAIR intensity inside the head is {got:.1f} against {mu:.1f} "
                           f"(sd {sd:.1f}) in training")
    if not reasons:
        return None
    return ("these slices differ from the training data: " + "; ".join(reasons)
            + ". Figures measured here may not carry over, and the paper's figures are not comparable.")
