"""`dlvae-jax classical` end to end on the synthetic set, and its refusals."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import tifffile
from sklearn import metrics as skm

from dlvae_jax.cli import main


@pytest.fixture(scope="module")
def classical_out(synth_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("classical") / "out"
    assert main(["classical", "--data-dir", str(synth_dir), "--out", str(out), "--overlays", "3",
                 "--batch-size", "32", "--quiet"]) == 0
    return out


def test_outputs_and_counts(classical_out, synth_dir):
    summary = json.loads((classical_out / "summary.json").read_text())
    masks = sorted(synth_dir.glob("*/*_mask.tif"))
    has_tumor = {(m.parent.name.rsplit("_", 1)[0], int(m.stem.split("_")[-2])): bool(tifffile.imread(m).any())
                 for m in masks}
    assert summary["n_slices"] == len(masks)
    assert summary["n_tumor_slices"] == sum(has_tumor.values())
    assert summary["n_patients"] == len({p for p, _ in has_tumor})
    rows = [json.loads(line) for line in (classical_out / "slices.jsonl").read_text().splitlines()]
    assert {(r["patient"], r["slice"]): r["tumor"] for r in rows} == has_tumor
    # Slice metrics (Eqs. 13-16) recomputed from the per-slice log with scikit-learn.
    truth = np.array([r["tumor"] for r in rows])
    pred = np.array([r["roi_pixels"] > 0 for r in rows])
    assert np.isclose(summary["slice"]["accuracy"], skm.accuracy_score(truth, pred))
    assert np.isclose(summary["slice"]["f1"], skm.f1_score(truth, pred, zero_division=0))
    assert len(list((classical_out / "overlays").glob("*.png"))) == 3
    assert (classical_out / "dice_per_patient.png").stat().st_size > 0
    assert len((classical_out / "log.jsonl").read_text().splitlines()) == -(-len(rows) // 32)
    # Per-volume Dice and pixel metrics recomputed from the per-slice counts: the
    # padding of the last batch (72 slices, batches of 32) must not count anywhere.
    h, w = tifffile.imread(masks[0]).shape
    for patient, dice in summary["dice_volume"].items():
        mine = [r for r in rows if r["patient"] == patient]
        tp, pred, true = (sum(r[f] for r in mine) for f in ("overlap_pixels", "roi_pixels", "tumor_pixels"))
        assert np.isclose(dice, 2 * tp / (pred + true) if pred + true else 1.0)
    tp, pred, true = (sum(r[f] for r in rows) for f in ("overlap_pixels", "roi_pixels", "tumor_pixels"))
    assert np.isclose(summary["pixel"]["precision"], tp / pred)
    assert np.isclose(summary["pixel"]["recall"], tp / true)
    assert np.isclose(summary["pixel"]["accuracy"], 1 - (pred + true - 2 * tp) / (len(rows) * h * w))
    # Slices without brain (all flat on disk) get no ROI and are counted.
    flat = {(m.parent.name.rsplit("_", 1)[0], int(m.stem.split("_")[-2]))
            for m in masks if np.ptp(tifffile.imread(str(m).replace("_mask.tif", ".tif"))[:, :, 1]) == 0}
    blank = {(r["patient"], r["slice"]) for r in rows if r["blank"]}
    assert flat <= blank and summary["n_blank_slices"] == len(blank)
    assert all(r["roi_pixels"] == 0 for r in rows if r["blank"])
    # The synthetic tumors are FLAIR-bright: the ROI must overlap them.
    assert summary["pixel"]["recall"] > 0.5
    assert not list(classical_out.parent.glob(".*tmp"))


def test_refuses_non_empty_output(classical_out, synth_dir, capsys):
    before = sorted(p.name for p in classical_out.iterdir())
    assert main(["classical", "--data-dir", str(synth_dir), "--out", str(classical_out), "--quiet"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert sorted(p.name for p in classical_out.iterdir()) == before


def test_bad_data_names_the_file_and_leaves_nothing(synth_dir, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(synth_dir, data)
    bad = sorted(data.glob("*/*_3_mask.tif"))[0]
    bad.write_bytes(bad.read_bytes()[:50])  # truncated TIFF
    out = tmp_path / "out"
    assert main(["classical", "--data-dir", str(data), "--out", str(out), "--quiet"]) == 2
    assert bad.name in capsys.readouterr().err
    assert not out.exists() and list(tmp_path.iterdir()) == [data]
    assert main(["classical", "--data-dir", str(tmp_path / "missing"), "--out", str(out), "--quiet"]) == 2
    assert not out.exists()


def test_overwrite_is_deterministic_and_batch_size_independent(classical_out, synth_dir, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(classical_out, out)
    (out / "stale.txt").write_text("from an earlier run")
    assert main(["classical", "--data-dir", str(synth_dir), "--out", str(out), "--overlays", "0",
                 "--batch-size", "24", "--overwrite", "--quiet"]) == 0
    assert (out / "slices.jsonl").read_text() == (classical_out / "slices.jsonl").read_text()
    assert not (out / "stale.txt").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_interrupted_run_leaves_old_output(classical_out, synth_dir, tmp_path, monkeypatch, capsys):
    from dlvae_jax.data import lgg

    out = tmp_path / "out"
    shutil.copytree(classical_out, out)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(lgg, "load_arrays", interrupt)
    assert main(["classical", "--data-dir", str(synth_dir), "--out", str(out), "--overwrite", "--quiet"]) == 130
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    fresh = tmp_path / "fresh"
    assert main(["classical", "--data-dir", str(synth_dir), "--out", str(fresh), "--quiet"]) == 130
    assert not fresh.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.parametrize("case", ["file", "data_inside", "batch_size"])
def test_refuses_bad_arguments(case, synth_dir, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["classical", "--data-dir", str(synth_dir), "--out", str(out), "--quiet"]
    if case == "file":
        out.write_text("keep me")
        args.append("--overwrite")
        message = "not a folder"
    elif case == "data_inside":
        shutil.copytree(synth_dir, out / "data")
        args = ["classical", "--data-dir", str(out / "data"), "--out", str(out), "--overwrite", "--quiet"]
        message = "holds the input folder"
    else:
        args += ["--batch-size", "0"]
        message = "--batch-size"
    assert main(args) == 2
    assert message in capsys.readouterr().err
    assert case != "file" or out.read_text() == "keep me"
    assert case != "data_inside" or len(list((out / "data").glob("*/*.tif"))) == len(list(synth_dir.glob("*/*.tif")))
