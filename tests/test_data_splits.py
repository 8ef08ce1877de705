"""Patient-level splits and the synthetic dataset writer."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tifffile

from dlvae_jax.cli import main
from dlvae_jax.data import lgg
from dlvae_jax.data.splits import make_splits, read_splits, records_for_split
from dlvae_jax.data.synth import synthesize
from dlvae_jax.errors import DataError, OutputError
from dlvae_jax.outdir import MARKER


@pytest.fixture(scope="module")
def index20(tmp_path_factory):
    # 20 patients: 2 institutions x (tumor / no tumor) strata.
    root = synthesize(tmp_path_factory.mktemp("s20") / "lgg", n_patients=20, seed=1, size=32, slices_per_patient=3)
    return lgg.scan(root)


def test_no_patient_in_two_splits_and_all_covered(index20):
    for seed in range(5):
        splits = make_splits(index20, seed)
        sets = [set(v) for v in splits.values()]
        assert sum(len(s) for s in sets) == len(set().union(*sets))  # pairwise disjoint
        assert set().union(*sets) == set(index20.patients)
        # Slice records follow their patient: no slice of a split's patient leaks elsewhere.
        for name, pids in splits.items():
            assert {r.patient for r in records_for_split(index20, splits, name)} == set(pids)
        assert [len(v) for v in splits.values()] == [14, 3, 3]


def test_same_seed_same_split_other_seed_differs(index20):
    a, b = make_splits(index20, 7), make_splits(index20, 7)
    assert a == b
    assert any(make_splits(index20, s) != a for s in range(8, 12))


def test_stratified_by_institution_and_tumor(index20):
    info = index20.patient_info()
    splits = make_splits(index20, 3, fractions=(0.5, 0.25, 0.25))
    for stratum in {(d["institution"], d["tumor_slices"] > 0) for d in info.values()}:
        members = [p for p, d in info.items() if (d["institution"], d["tumor_slices"] > 0) == stratum]
        in_train = sum(p in splits["train"] for p in members)
        # Proportional allocation within one patient of the 50% target.
        assert abs(in_train - 0.5 * len(members)) <= 1, (stratum, in_train, len(members))


def test_split_cli_writes_splits_json(synth_dir, tmp_path, capsys):
    assert main(["data", "split", "--data-dir", str(synth_dir), "--workdir", str(tmp_path), "--seed", "4"]) == 0
    data = json.loads((tmp_path / "splits.json").read_text())
    assert data["seed"] == 4
    assert data["splits"] == make_splits(lgg.scan(synth_dir), 4)
    assert read_splits(tmp_path) == data["splits"]
    assert sum(c["slices"] for c in data["counts"].values()) == 72
    assert sorted(p.name for p in tmp_path.iterdir()) == [MARKER, "splits.json"]  # no temp files left
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"splits": {"train": ["A", "B"], "test": ["B"]}}))
    with pytest.raises(DataError, match="patient B is in both train and test"):
        read_splits(bad)


# ----------------------------------------------------------------------------- synth


def test_synth_is_deterministic_and_in_layout(tmp_path):
    a = synthesize(tmp_path / "a", n_patients=2, seed=9, size=64, slices_per_patient=5)
    b = synthesize(tmp_path / "b", n_patients=2, seed=9, size=64, slices_per_patient=5)
    c = synthesize(tmp_path / "c", n_patients=2, seed=10, size=64, slices_per_patient=5)
    files_a = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file() and p.name != MARKER)
    assert files_a == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file() and p.name != MARKER)
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files_a)
    assert any((a / f).read_bytes() != (c / f).read_bytes() for f in files_a if f.suffix == ".tif")
    assert len(files_a) == 2 * 5 * 2 + 1 and Path("data.csv") in files_a
    img = tifffile.imread(a / "TCGA_SY_0001_20000101" / "TCGA_SY_0001_20000101_3.tif")
    msk = tifffile.imread(a / "TCGA_SY_0001_20000101" / "TCGA_SY_0001_20000101_3_mask.tif")
    assert img.shape == (64, 64, 3) and img.dtype == np.uint8
    assert msk.shape == (64, 64) and msk.dtype == np.uint8 and set(np.unique(msk)) <= {0, 255}
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    assert json.loads((a / MARKER).read_text())["command"] == "data synth"
    with pytest.raises(OutputError, match="already exists"):
        synthesize(a, n_patients=1, seed=0)


def test_synth_tumor_is_brightest_flair_structure(synth_dir):
    idx = lgg.scan(synth_dir)
    tumor = [r for r in idx.records if r.has_tumor]
    assert tumor and len(tumor) < len(idx)
    assert idx.patient_info()["TCGA_SZ_0004"]["tumor_slices"] == 0
    for r in tumor:
        image = tifffile.imread(r.path)
        mask = tifffile.imread(r.mask_path) > 0
        flair = image[:, :, 1].astype(float)
        head = image.max(-1) > 0
        # Median tumor FLAIR above everything but a few noisy pixels of the rest of the head.
        assert np.median(flair[mask]) > np.percentile(flair[head & ~mask], 99.9)
