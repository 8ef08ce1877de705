"""The statistics and the fold bookkeeping of experiments/vae_effect.py."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import wilcoxon

_PATH = Path(__file__).resolve().parents[1] / "experiments" / "vae_effect.py"
_spec = importlib.util.spec_from_file_location("vae_effect", _PATH)
vae_effect = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(vae_effect)


def test_every_patient_is_tested_once_and_never_trained_on_in_its_fold():
    patients = [f"P{i:02d}" for i in range(39)]
    folds = vae_effect.assign_folds(patients, 5, seed=3)
    assert sorted(p for f in folds for p in f) == patients
    assert {len(f) for f in folds} <= {7, 8}
    assert vae_effect.assign_folds(patients, 5, seed=3) == folds  # same seed, same folds
    for i in range(5):
        s = vae_effect.fold_splits(folds, i, 4, seed=3)
        assert s["test"] == folds[i] and len(s["validation"]) == 4
        assert not (set(s["train"]) | set(s["validation"])) & set(s["test"])
        assert not set(s["train"]) & set(s["validation"])
        assert sorted(s["train"] + s["validation"] + s["test"]) == patients


def test_paired_stats_by_hand_and_against_scipy():
    a = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4])
    b = np.array([0.8, 0.8, 0.5, 0.7, 0.2, 0.1])
    s = vae_effect.paired_stats(a, b, draws=2000, seed=0)
    d = a - b
    assert s["n"] == 6 and s["wins"] == 4 and s["losses"] == 1 and s["ties"] == 1
    assert s["mean_diff"] == pytest.approx(d.mean()) and s["median_diff"] == pytest.approx(np.median(d))
    assert s["wilcoxon_p"] == pytest.approx(wilcoxon(d[d != 0]).pvalue)
    lo, hi = s["ci95"]
    assert lo < d.mean() < hi and lo >= d.min() and hi <= d.max()
    # The bootstrap is the percentile interval of resampled means (NumPy, same draws).
    rng = np.random.default_rng(0)
    means = d[rng.integers(0, 6, size=(2000, 6))].mean(axis=1)
    assert [lo, hi] == pytest.approx([np.percentile(means, 2.5), np.percentile(means, 97.5)])
