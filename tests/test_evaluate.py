"""`dlvae-jax evaluate` / `predict` with a fake predictor on a tiny synthetic dataset.

The fake looks the truth up from the FLAIR bytes, so its predictions are
known exactly; every figure is recomputed here with scikit-learn, medpy and
plain NumPy. Tests with a real trained workdir live with the training tests.
"""

from __future__ import annotations

import csv
import json
import math
import shutil
import zlib
from pathlib import Path

import ml_collections
import numpy as np
import pytest
import tifffile
from medpy.metric import binary as medpy_binary
from scipy import special
from sklearn import metrics as skm

from dlvae_jax import cli
from dlvae_jax.data import lgg
from dlvae_jax.data.splits import read_splits, write_splits
from dlvae_jax.io import write_json
from dlvae_jax.outdir import write_marker
from dlvae_jax.eval import evaluate as evaluate_mod
from dlvae_jax.eval import inference
from dlvae_jax.eval import predict as predict_mod

N_PATIENTS, N_SLICES, SIZE = 4, 6, 64  # patient index 3 has no tumor


class FakePredictor:
    """Follows the inference contract; `mode` picks what it predicts."""

    def __init__(self, data_dir: Path, mode: str, channels: str = "flair"):
        self.config = ml_collections.ConfigDict({"data": {"data_dir": str(data_dir), "image_size": SIZE,
                                                          "channels": channels}})
        self.step = 7
        self.mode = mode
        index = lgg.scan(data_dir)
        flair, masks = lgg.load_arrays(index.records)
        self.truth = {f.tobytes(): m.astype(bool) for f, m in zip(flair, masks)}
        self.draws: dict[bytes, np.ndarray] = {}

    def _truth(self, flair_HxW: np.ndarray) -> np.ndarray:
        """The slice's mask; for a flipped slice (test-time augmentation) the mask flipped alike."""
        for flip in (lambda a: a, lambda a: a[::-1], lambda a: a[:, ::-1], lambda a: a[::-1, ::-1]):
            mask = self.truth.get(np.ascontiguousarray(flip(flair_HxW)).tobytes())
            if mask is not None:
                return flip(mask)
        raise KeyError("not a slice of the data")

    def _rng(self, flair_HxW: np.ndarray, salt: int = 0) -> np.random.Generator:
        return np.random.default_rng([zlib.crc32(flair_HxW.tobytes()), salt])

    def _flair(self, images: np.ndarray) -> np.ndarray:
        assert images.dtype == np.uint8 and images.ndim == (4 if self.config.data.channels == "all" else 3)
        return images[..., 1] if images.ndim == 4 else images

    def __call__(self, images: np.ndarray) -> dict[str, np.ndarray]:
        flair_BxHxW = self._flair(images)
        if self.mode == "bright":  # any image: the bright pixels, called tumor when there are any
            prob = flair_BxHxW / 255.0
            return {"prob_BxHxW": prob.astype(np.float32),
                    "tumor_prob_B": (prob >= 0.5).any(axis=(1, 2)).astype(np.float32)}
        truth = np.stack([self._truth(f) for f in flair_BxHxW])
        has = truth.any(axis=(1, 2))
        if self.mode == "truth":
            prob, tumor_prob = np.where(truth, 0.9, 0.1), np.where(has, 0.8, 0.2)
        elif self.mode == "empty":
            prob, tumor_prob = np.zeros(truth.shape), np.zeros(len(truth))
        else:  # "noisy": a shifted truth and a coin-flip class head, fixed per slice; "speckled": stray pixels too
            prob = np.empty(truth.shape)
            tumor_prob = np.empty(len(truth))
            speckle = 0.52 if self.mode == "speckled" else 0.4  # 0.52: about 4% of pixels reach 0.5
            for i, f in enumerate(flair_BxHxW):
                rng = self._rng(f)
                prob[i] = 0.7 * np.roll(truth[i], int(rng.integers(-3, 4)), axis=1) + speckle * rng.random(f.shape)
                tumor_prob[i] = rng.random()
        return {"prob_BxHxW": prob.astype(np.float32), "tumor_prob_B": tumor_prob.astype(np.float32)}

    can_sample = True

    def sample_mean(self, images: np.ndarray, n: int, seed: int) -> np.ndarray:
        flair_BxHxW = self._flair(images)
        out = np.stack([self._rng(f, seed).random((n, *f.shape)) for f in flair_BxHxW], axis=1).astype(np.float32)
        for i, f in enumerate(flair_BxHxW):
            self.draws[f.tobytes()] = out[:, i]
        return out.mean(axis=0)

    def sample_stats(self, images: np.ndarray, n: int, seed: int):
        return self.sample_mean(images, n, seed), None


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    from dlvae_jax.data.synth import synthesize

    return synthesize(tmp_path_factory.mktemp("eval") / "lgg", n_patients=N_PATIENTS, seed=0, size=SIZE,
                      slices_per_patient=N_SLICES)


@pytest.fixture()
def workdir(tmp_path, data_dir) -> Path:
    w = tmp_path / "run"
    w.mkdir()
    write_marker(w, "train")
    index = lgg.scan(data_dir)
    p = index.patients
    write_splits(w, index, {"train": [p[0]], "validation": [p[2]], "test": [p[1], p[3]]}, seed=0)
    write_json(w / "config.json", {"data": {"data_dir": str(data_dir)}})
    return w


@pytest.fixture()
def use_fake(monkeypatch, data_dir):
    """Installs a FakePredictor of the given mode for both commands; returns it."""

    def install(mode: str, channels: str = "flair") -> FakePredictor:
        fake = FakePredictor(data_dir, mode, channels)
        monkeypatch.setattr(inference, "load_predictor", lambda workdir, checkpoint="best": fake)
        return fake

    return install


def run_cli(monkeypatch, argv: list[str]) -> int:
    if "dlvae_jax.eval.cli" not in cli._COMMAND_MODULES:
        monkeypatch.setattr(cli, "_COMMAND_MODULES", (*cli._COMMAND_MODULES, "dlvae_jax.eval.cli"))
    try:
        return cli.main(argv)
    except SystemExit as err:  # argparse's own errors
        return int(err.code)


def _components_26(vol: np.ndarray) -> list[list[tuple[int, int, int]]]:
    """The 26-connected components of a 3D bool array, by a plain flood fill."""
    seen, comps = np.zeros(vol.shape, bool), []
    steps = [(a, b, c) for a in (-1, 0, 1) for b in (-1, 0, 1) for c in (-1, 0, 1) if (a, b, c) != (0, 0, 0)]
    for start in zip(*np.nonzero(vol)):
        if seen[start]:
            continue
        seen[start], stack, comp = True, [start], []
        while stack:
            z, y, x = stack.pop()
            comp.append((z, y, x))
            for a, b, c in steps:
                q = (z + a, y + b, x + c)
                if all(0 <= q[k] < vol.shape[k] for k in range(3)) and vol[q] and not seen[q]:
                    seen[q] = True
                    stack.append(q)
        comps.append(comp)
    return comps


def _keep_share(vol: np.ndarray, share: float) -> np.ndarray:
    """`vol` without the 3D components smaller than `share` of its largest."""
    comps = _components_26(vol)
    out = np.zeros_like(vol)
    for comp in comps:
        if len(comp) >= share * max(len(c) for c in comps):
            out[tuple(np.array(comp).T)] = True
    return out


def _expected(data_dir: Path, fake: FakePredictor, patients: list[str] | None, presence: str = "class",
              share: float = 0.0) -> dict:
    """The figures, recomputed from the fake's output without dlvae_jax.metrics."""
    index = lgg.scan(data_dir)
    records = [r for r in index.records if patients is None or r.patient in patients]
    images, truth = lgg.load_arrays(records, fake.config.data.channels)
    truth = truth.astype(bool)
    out = fake(images)
    ids = np.array([r.patient for r in records])
    labels = out["tumor_prob_B"] >= 0.5
    pred = out["prob_BxHxW"] >= 0.5
    if presence == "class":
        pred &= labels[:, None, None]
    if share:
        for pid in set(ids):
            pred[ids == pid] = _keep_share(pred[ids == pid], share)
    if presence == "mask":  # the pixel map decides presence too
        labels = pred.any(axis=(1, 2))
    true_labels = truth.any(axis=(1, 2))
    vol_dice, vol_iou = [], []
    for pid in sorted(set(ids)):
        p, t = pred[ids == pid], truth[ids == pid]
        inter, total, union = (p & t).sum(), p.sum() + t.sum(), (p | t).sum()
        vol_dice.append(1.0 if total == 0 else 2 * inter / total)
        vol_iou.append(1.0 if union == 0 else inter / union)
    hds = [medpy_binary.hd95(p, t) for p, t in zip(pred, truth) if p.any() and t.any()]
    return {
        "n_slices": len(records),
        "n_patients": len(set(ids)),
        "slice_accuracy": skm.accuracy_score(true_labels, labels),
        "slice_precision": skm.precision_score(true_labels, labels, zero_division=0),
        "slice_recall": skm.recall_score(true_labels, labels, zero_division=0),
        "slice_f1": skm.f1_score(true_labels, labels, zero_division=0),
        "pixel_precision": skm.precision_score(truth.ravel(), pred.ravel(), zero_division=0),
        "pixel_recall": skm.recall_score(truth.ravel(), pred.ravel(), zero_division=0),
        "pixel_f1": skm.f1_score(truth.ravel(), pred.ravel(), zero_division=0),
        "dice_volume_mean": np.mean(vol_dice),
        "dice_volume_median": np.median(vol_dice),
        "iou_mean": np.mean(vol_iou),
        "dice_tumor_slices_mean": np.mean([2 * (p & t).sum() / (p.sum() + t.sum())
                                           for p, t in zip(pred, truth) if t.any()]),
        "hd95_mean": np.mean(hds) if hds else None,
        "hd95_n": len(hds),
    }


REQUIRED_KEYS = {
    "slice_accuracy", "slice_precision", "slice_recall", "slice_f1", "pixel_precision", "pixel_recall", "pixel_f1",
    "dice_volume_mean", "dice_volume_median", "dice_tumor_slices_mean", "iou_mean", "hd95_mean", "n_patients",
    "n_slices", "per_patient", "data_dir", "split", "checkpoint_step",
}


def test_evaluate_perfect_predictor_writes_everything(monkeypatch, workdir, data_dir, use_fake, capsys):
    use_fake("truth")
    assert run_cli(monkeypatch, ["evaluate", "--workdir", str(workdir), "--quiet"]) == 0
    report = json.loads((workdir / "metrics_test.json").read_text())
    assert json.loads((workdir / "metrics.json").read_text()) == report
    assert REQUIRED_KEYS <= set(report)
    assert report["split"] == "test" and report["checkpoint_step"] == 7 and report["n_patients"] == 2
    assert report["data_dir"] == str(data_dir) and report["n_slices"] == 2 * N_SLICES
    for key in ("slice_accuracy", "slice_f1", "pixel_f1", "dice_volume_mean", "dice_volume_median",
                "dice_tumor_slices_mean", "iou_mean"):
        assert report[key] == 1.0, key
    assert report["hd95_mean"] == 0.0 and report["hd95_skipped"] == 0
    rows = list(csv.DictReader(open(workdir / "per_patient_test.csv")))
    assert [r["patient"] for r in rows] == [p["patient"] for p in report["per_patient"]]
    assert [float(r["dice"]) for r in rows] == [1.0, 1.0]
    assert rows[1]["hd95"] == "" and report["per_patient"][1]["hd95"] is None  # tumor-free patient: nothing measured
    assert (workdir / "eval_test" / "dice_per_patient.png").stat().st_size > 0
    assert list((workdir / "eval_test" / "overlays").glob("*.png"))
    table = capsys.readouterr().out
    assert "99.91" in table and "98.99" in table and "67.08" in table  # the paper's Tables I-IV
    assert not list(workdir.glob(".*tmp*"))


def test_evaluate_empty_predictor_has_zero_recall(monkeypatch, workdir, use_fake):
    use_fake("empty")
    assert run_cli(monkeypatch, ["evaluate", "--workdir", str(workdir), "--split", "val", "--quiet"]) == 0
    report = json.loads((workdir / "metrics_validation.json").read_text())
    assert report["split"] == "validation"
    assert report["slice_recall"] == report["pixel_recall"] == report["dice_tumor_slices_mean"] == 0.0
    # A second split leaves the first one's files; metrics.json is the latest.
    assert run_cli(monkeypatch, ["evaluate", "--workdir", str(workdir), "--split", "test", "--quiet"]) == 0
    for split in ("validation", "test"):
        assert json.loads((workdir / f"metrics_{split}.json").read_text())["split"] == split
        assert (workdir / f"per_patient_{split}.csv").is_file() and (workdir / f"eval_{split}").is_dir()
    assert json.loads((workdir / "metrics.json").read_text())["split"] == "test"
    assert report["dice_volume_mean"] == 0.0 and report["hd95_mean"] is None
    assert report["hd95_skipped"] == report["n_tumor_slices"] > 0


@pytest.mark.parametrize("batch_size,channels", [(1, "flair"), (5, "all"), (64, "flair")])
def test_evaluate_figures_match_independent_computation(workdir, data_dir, use_fake, batch_size, channels):
    fake = use_fake("noisy", channels)
    report = evaluate_mod.evaluate(workdir, split="all", batch_size=batch_size, n_overlays=3)
    want = _expected(data_dir, fake, None)
    assert want["hd95_n"] > 0 and 0 < want["dice_volume_mean"] < 1 and 0 < want["slice_accuracy"] < 1
    for key, value in want.items():
        assert report[key] == pytest.approx(value, abs=1e-9), key
    assert report["n_patients_in_train"] == 1
    sheets = {p.stem for p in (workdir / "eval_all" / "overlays").glob("*.png")}
    assert len(sheets) == 3 and sheets <= {r["patient"] for r in report["per_patient"]}


def test_evaluate_presence_from_the_mask(monkeypatch, workdir, data_dir, use_fake):
    """--presence mask: a slice is tumor when its mask is not empty; the class
    head's coin flips no longer matter, so the figures change."""
    fake = use_fake("noisy")
    assert run_cli(monkeypatch, ["evaluate", "--workdir", str(workdir), "--split", "all", "--presence", "mask",
                                 "--overlays", "0", "--quiet"]) == 0
    report = json.loads((workdir / "metrics_all.json").read_text())
    want, old = _expected(data_dir, fake, None, "mask"), _expected(data_dir, fake, None, "class")
    assert want["slice_accuracy"] != old["slice_accuracy"]
    for key, value in want.items():
        assert report[key] == pytest.approx(value, abs=1e-9), key
    assert report["presence"] == "mask"
    with pytest.raises(evaluate_mod.DlvaeError, match="--presence must be one of class, mask"):
        evaluate_mod.evaluate(workdir, presence="area")
    fake.segments = False  # a classifier: its pixel map is empty, so mask presence would call nothing tumor
    with pytest.raises(evaluate_mod.DlvaeError, match="gives no mask"):
        evaluate_mod.evaluate(workdir, presence="mask")


@pytest.mark.parametrize("presence", ["mask", "class"])
def test_evaluate_volume_share_removes_stray_components(monkeypatch, workdir, data_dir, use_fake, presence):
    """--min-volume-share: each patient's slices stacked, its 3D components
    under the share of its largest removed, across batch boundaries (batch 4
    cuts the 6-slice patients); checked against a plain flood fill."""
    fake = use_fake("speckled")
    argv = ["evaluate", "--workdir", str(workdir), "--split", "all", "--presence", presence, "--batch-size", "4",
            "--min-volume-share", "0.5", "--overlays", "2", "--quiet"]
    assert run_cli(monkeypatch, argv) == 0
    report = json.loads((workdir / "metrics_all.json").read_text())
    want, old = _expected(data_dir, fake, None, presence, 0.5), _expected(data_dir, fake, None, presence)
    assert want["pixel_precision"] > old["pixel_precision"] and want["dice_volume_mean"] > old["dice_volume_mean"]
    for key, value in want.items():
        assert report[key] == pytest.approx(value, abs=1e-9), key
    assert report["min_volume_share"] == 0.5
    assert run_cli(monkeypatch, argv[:-5] + ["--min-volume-share", "2", "--quiet"]) == 2


def test_overlay_patients_spread_over_the_dice_ranking():
    from dlvae_jax.report import overlay_patients

    dice = {"a": 0.5, "b": 0.9, "c": None, "d": 0.1, "e": 0.7, "f": 0.3, "g": 0.7, "h": math.nan}
    # ranked: b 0.9, e 0.7, g 0.7 (tie by name), a 0.5, f 0.3, d 0.1, then c, h (no Dice)
    assert overlay_patients(dice, 3) == ["b", "f", "h"]  # ranks 0, 3.5 (rounded to even: 4), 7
    assert overlay_patients(dice, 8) == ["b", "e", "g", "a", "f", "d", "c", "h"]
    assert overlay_patients(dice, 2) == ["b", "h"]
    assert overlay_patients(dice, 0) == [] and overlay_patients({}, 3) == []


def test_overlay_picks_by_hand():
    from dlvae_jax.report import overlay_picks

    dice = [1.0, 0.2, 0.9, 0.5, 0.7, 0.9, math.nan, 0.0]
    tumor = [False, True, True, True, True, True, True, False]
    fp = [0, 3, 0, 0, 0, 0, 0, 40]
    # tumor slices 1..5 by Dice: 0.2 (1), 0.5 (3), 0.7 (4), 0.9 (2), 0.9 (5): median slice 4, best 2 (earlier tie)
    assert overlay_picks(dice, tumor, fp) == [(2, "best"), (4, "median"), (1, "worst"), (7, "largest false positive")]
    # an even count takes the lower median; a slice picked twice is listed once
    assert overlay_picks([0.3, 0.8], [True, True], [5, 0]) == [(1, "best"), (0, "median, worst, largest false positive")]
    assert overlay_picks([1.0, 1.0], [False, False], [0, 0]) == []


def test_evaluate_split_errors(monkeypatch, tmp_path, workdir, data_dir, use_fake, capsys):
    use_fake("truth")
    other = tmp_path / "other"
    other.mkdir()
    write_marker(other, "train")
    write_json(other / "config.json", {})
    write_json(other / "splits.json", {"splits": {"train": ["TCGA_ZZ_0001"], "validation": [],
                                                  "test": ["TCGA_ZZ_0002"]}})
    assert run_cli(monkeypatch, ["evaluate", "--workdir", str(other), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--split all" in err and "test patients" in err
    # The same folder scored as a whole is fine, and no training patient is in it.
    assert run_cli(monkeypatch, ["evaluate", "--workdir", str(other), "--split", "all", "--quiet"]) == 0
    assert json.loads((other / "metrics_all.json").read_text())["n_patients_in_train"] == 0
    # A split the run's fractions left empty is named, not scored as nothing.
    assert run_cli(monkeypatch, ["evaluate", "--workdir", str(other), "--split", "val", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "validation split has no patients" in err, err

    bad = [
        (["--workdir", str(tmp_path / "missing")], "no such training folder"),
        (["--workdir", str(data_dir)], "made by `dlvae-jax data synth`"),
        (["--workdir", str(tmp_path)], "no .dlvae-jax marker"),
        (["--workdir", str(workdir), "--data-dir", str(tmp_path / "nodata")], "no such folder"),
        (["--workdir", str(workdir), "--batch-size", "0"], "--batch-size"),
    ]
    for args, words in bad:
        assert run_cli(monkeypatch, ["evaluate", *args, "--quiet"]) == 2, args
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and words in err, err


def test_predict_presence_and_component_flags(monkeypatch, tmp_path, workdir, data_dir, use_fake, capsys):
    """predict --presence mask --min-component N: each slice's call is whether its
    mask, without components under N pixels, is empty; the class head is not read."""
    from scipy import ndimage

    fake = use_fake("noisy")
    patient = sorted(p for p in data_dir.iterdir() if p.is_dir())[0]
    out = tmp_path / "pred"
    argv = ["predict", "--workdir", str(workdir), "--out", str(out), "--presence", "mask", "--min-component", "40",
            "--quiet", str(patient)]
    assert run_cli(monkeypatch, argv) == 0
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    disagree = 0
    for row in rows:
        flair = tifffile.imread(row["input"])[:, :, 1]
        ref = fake(flair[None])
        pix = ref["prob_BxHxW"][0] >= 0.5
        labels, n = ndimage.label(pix, structure=np.ones((3, 3), bool))
        sizes = np.bincount(labels.ravel(), minlength=n + 1)
        keep = pix & (sizes[labels] >= 40)
        np.testing.assert_array_equal(tifffile.imread(out / f"{row['output']}_mask.tif"), keep.astype(np.uint8) * 255)
        assert row["tumor"] == bool(keep.any())
        disagree += row["tumor"] != bool(ref["tumor_prob_B"][0] >= 0.5)
    assert disagree > 0, "the class head's coin flips would have given other calls"
    # --min-volume-share: the patient folder is one volume; stray components leave its masks.
    fake.mode = "speckled"
    monkeypatch.setattr(predict_mod, "BATCH_SIZE", 4)  # the 6 slices come in two batches
    out = tmp_path / "pred_volume"
    assert run_cli(monkeypatch, [*argv[:4], str(out), "--presence", "mask", "--min-component", "0",
                                 "--min-volume-share", "1", "--quiet", str(patient)]) == 0
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    flair = np.stack([tifffile.imread(row["input"])[:, :, 1] for row in rows])
    pix = fake(flair)["prob_BxHxW"] >= 0.5
    keep = _keep_share(pix, 1.0)
    assert keep.sum() < pix.sum() and len(_components_26(keep)) == 1
    for row, want in zip(rows, keep):
        np.testing.assert_array_equal(tifffile.imread(out / f"{row['output']}_mask.tif"), want.astype(np.uint8) * 255)
        assert row["tumor"] == bool(want.any())
    fake.mode = "noisy"
    fake.segments = False
    argv[4] = str(tmp_path / "pred2")
    assert run_cli(monkeypatch, argv) == 2 and "gives no mask" in capsys.readouterr().err
    assert not (tmp_path / "pred2").exists()


@pytest.mark.parametrize("channels", ["flair", "all"])
def test_predict_files(monkeypatch, tmp_path, workdir, data_dir, use_fake, channels):
    fake = use_fake("noisy", channels)
    patients = sorted(p for p in data_dir.iterdir() if p.is_dir())
    single = sorted(patients[1].glob("*_3.tif"))[0]
    out = tmp_path / "pred"
    argv = ["predict", "--workdir", str(workdir), "--out", str(out), "--samples", "3", "--seed", "5", "--quiet",
            str(patients[0]), str(single), str(single)]
    assert run_cli(monkeypatch, argv) == 0
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == N_SLICES + 1  # the slice given twice is predicted once
    assert [Path(r["input"]).name for r in rows[:3]] == [f"{patients[0].name}_{k}.tif" for k in (1, 2, 3)]
    for row in rows:
        image = tifffile.imread(row["input"])
        flair = image[:, :, 1]
        ref = fake((image if channels == "all" else flair)[None])
        base = out / row["output"]
        mask = tifffile.imread(f"{base}_mask.tif")
        assert mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 255}
        gate = ref["tumor_prob_B"][0] >= 0.5
        np.testing.assert_array_equal(mask, ((ref["prob_BxHxW"][0] >= 0.5) & gate).astype(np.uint8) * 255)
        np.testing.assert_array_equal(np.load(f"{base}_prob.npy"), ref["prob_BxHxW"][0])
        assert row["tumor"] == bool(gate) and row["tumor_prob"] == pytest.approx(float(ref["tumor_prob_B"][0]))
        assert row["mask_pixels"] == int((mask > 0).sum())
        mean = fake.draws[flair.tobytes()].mean(axis=0)
        np.testing.assert_allclose(np.load(f"{base}_mean.npy"), mean, rtol=0, atol=1e-6)
        entropy_bits = (special.entr(mean) + special.entr(1 - mean)) / math.log(2)
        got = np.load(f"{base}_entropy.npy")
        assert got.dtype == np.float32 and got.shape == (SIZE, SIZE)
        np.testing.assert_allclose(got, entropy_bits, atol=1e-6)
        assert row["entropy_mean_bits"] == pytest.approx(float(got.mean()))
        for suffix in ("overlay", "mean", "entropy"):
            assert Path(f"{base}_{suffix}.png").stat().st_size > 0


def test_evaluate_scores_uncertainty_maps_against_sklearn(monkeypatch, workdir, data_dir, use_fake):
    """evaluate --samples: AUROC of the entropy of the sample mean for its
    pixel errors (sklearn on the same 1/1000 bins) and the Brier score; the
    reliability diagram is written; --tta uses the 4 flips."""
    from sklearn.metrics import roc_auc_score

    from dlvae_jax.eval.evaluate import evaluate

    fake = use_fake("noisy")
    report = evaluate(workdir, split="test", samples=5, seed=3)
    index = lgg.scan(data_dir)
    records = [r for r in index.records if r.patient in read_splits(workdir)["test"]]
    images, truth = lgg.load_arrays(records)
    mean = np.concatenate([fake.sample_mean(images[i:i + 32], 5, 3 + i) for i in range(0, len(images), 32)])
    p = mean.astype(np.float64)
    u = predict_mod.predictive_entropy(mean).astype(np.float64)  # float32 bits, checked by hand below
    wrong = (mean >= 0.5) != truth.astype(bool)
    u_bin = np.minimum(np.floor(u * 1000), 999)
    got = report["uncertainty"]
    assert got["auroc_error"] == pytest.approx(roc_auc_score(wrong.ravel(), u_bin.ravel()), abs=1e-9)
    assert got["brier"] == pytest.approx(np.mean((p - truth.astype(bool)) ** 2), rel=1e-6)
    assert (workdir / "eval_test" / "reliability.png").stat().st_size > 0
    assert json.loads((workdir / "metrics_test.json").read_text())["uncertainty"]["n_pixels"] == truth.size
    assert "flips" in evaluate(workdir, split="test", tta=True)["uncertainty"]["method"]


def test_evaluate_refuses_samples_it_cannot_draw(monkeypatch, workdir, use_fake, capsys):
    fake = use_fake("noisy")
    assert run_cli(monkeypatch, ["evaluate", "--workdir", str(workdir), "--min-component", "-1"]) != 0
    assert "--min-component" in capsys.readouterr().err
    monkeypatch.setattr(type(fake), "can_sample", False)
    assert run_cli(monkeypatch, ["evaluate", "--workdir", str(workdir), "--samples", "4"]) != 0
    assert "deterministic" in capsys.readouterr().err
    assert not (workdir / "metrics_test.json").exists()


def test_predictive_entropy_edges():
    got = predict_mod.predictive_entropy(np.array([0.0, 1.0, 0.5, 0.25]))
    np.testing.assert_allclose(got, [0.0, 0.0, 1.0, -(0.25 * np.log2(0.25) + 0.75 * np.log2(0.75))], atol=1e-7)


def test_predict_bad_inputs(monkeypatch, tmp_path, workdir, data_dir, use_fake, capsys):
    use_fake("truth")
    patient = sorted(p for p in data_dir.iterdir() if p.is_dir())[0]
    mask = sorted(patient.glob("*_mask.tif"))[0]
    notes = tmp_path / "notes.txt"
    notes.write_text("x")
    empty = tmp_path / "empty"
    empty.mkdir()
    out = tmp_path / "pred"
    for bad, words in [(tmp_path / "nope_1.tif", "no such file"), (mask, "is a mask"),
                       (notes, "not a slice image"), (empty, "no slice images")]:
        rc = run_cli(monkeypatch, ["predict", "--workdir", str(workdir), "--out", str(out), "--quiet",
                                   str(patient), str(bad)])
        err = capsys.readouterr().err.strip()
        assert rc == 2 and len(err.splitlines()) == 1 and str(bad) in err and words in err, err
        assert not out.exists()
    # Output folders that hold an input or the workdir, or sit in an input folder, are refused
    # before anything is written, --overwrite or not.
    for target in (data_dir, patient / "pred", workdir, workdir.parent):
        rc = run_cli(monkeypatch, ["predict", "--workdir", str(workdir), "--out", str(target), "--overwrite",
                                   "--quiet", str(patient)])
        err = capsys.readouterr().err.strip()
        assert rc == 2 and len(err.splitlines()) == 1 and str(target) in err and "choose" in err, err
    assert patient.is_dir() and (workdir / "splits.json").is_file() and not (patient / "pred").exists()
    # A folder of the user's is never replaced; an earlier prediction is, with --overwrite only.
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    argv = ["predict", "--workdir", str(workdir), "--quiet", str(patient)]
    assert run_cli(monkeypatch, [*argv, "--out", str(mine), "--overwrite"]) == 2
    assert (mine / "notes.txt").read_text() == "keep"
    capsys.readouterr()
    assert run_cli(monkeypatch, [*argv, "--out", str(out)]) == 0
    assert run_cli(monkeypatch, [*argv, "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert run_cli(monkeypatch, [*argv, "--out", str(out), "--overwrite"]) == 0


def _decided(fake, flair_HxW: np.ndarray) -> np.ndarray:
    """The fake's mask for one slice, decided by hand: prob >= 0.5 where the class head says tumor."""
    ref = fake(flair_HxW[None])
    return ((ref["prob_BxHxW"][0] >= 0.5) & (ref["tumor_prob_B"][0] >= 0.5)).astype(np.uint8)


def test_predict_nifti_volume_keeps_its_affine(monkeypatch, tmp_path, workdir, data_dir, use_fake):
    """A NIfTI volume of 3 slices (non-trivial affine, int16 on disk, 8-bit
    range): each axial slice data[:, :, k] is predicted; the mask, probability
    and entropy volumes have the input's shape and affine, and the mask is the
    slice-by-slice prediction."""
    import nibabel

    fake = use_fake("truth")
    patient = sorted(p for p in data_dir.iterdir() if p.is_dir())[0]
    flair, _ = lgg.load_arrays([r for r in lgg.scan(data_dir).records if r.path.parent == patient][:3])
    volume = np.stack(list(flair), axis=-1).astype(np.int16) * 3 + 7  # [X, Y, 3], not 8-bit: scaled by the rule
    affine = np.array([[0.0, -0.9, 0, 120.5], [1.1, 0, 0, -98.0], [0, 0, 5.0, -40.0], [0, 0, 0, 1]])
    src = tmp_path / "scans" / "sub-01_flair.nii.gz"
    src.parent.mkdir()
    nibabel.save(nibabel.Nifti1Image(volume, affine), str(src))
    affine = nibabel.load(str(src)).affine  # as stored: float32 in the header
    assert np.allclose(affine[0, 1], -0.9)
    expected_flair = np.clip(np.rint((volume - volume.min()) * 255.0 / (np.percentile(volume, 99.5) - volume.min())),
                             0, 255).astype(np.uint8)
    fake.truth.update({np.ascontiguousarray(expected_flair[:, :, k]).tobytes(): fake._truth(flair[k]) for k in range(3)})
    out = tmp_path / "pred"
    assert run_cli(monkeypatch, ["predict", "--workdir", str(workdir), "--out", str(out), "--quiet", str(src)]) == 0
    case = out / "sub-01_flair"
    mask_img = nibabel.load(str(case / "sub-01_flair_mask.nii.gz"))
    np.testing.assert_array_equal(mask_img.affine, affine)
    assert mask_img.shape == volume.shape and mask_img.get_data_dtype() == np.uint8
    want = np.stack([_decided(fake, expected_flair[:, :, k]) for k in range(3)], axis=-1)
    assert want.any() and not want.all()
    np.testing.assert_array_equal(np.asarray(mask_img.dataobj), want)
    prob = nibabel.load(str(case / "sub-01_flair_prob.nii.gz"))
    np.testing.assert_array_equal(prob.affine, affine)
    np.testing.assert_allclose(prob.get_fdata()[:, :, 1], fake(expected_flair[None, :, :, 1])["prob_BxHxW"][0])
    entropy = nibabel.load(str(case / "sub-01_flair_entropy.nii.gz")).get_fdata()
    p = prob.get_fdata()
    np.testing.assert_allclose(entropy, (special.entr(p) + special.entr(1 - p)) / math.log(2), atol=1e-6)
    # The per-slice masks in the dataset's convention, numbered from 1.
    for k in range(3):
        np.testing.assert_array_equal(tifffile.imread(case / f"sub-01_flair_{k + 1}_mask.tif"), want[:, :, k] * 255)
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert [r["input"] for r in rows] == [f"{src}#{k}" for k in (1, 2, 3)]


@pytest.mark.parametrize("channels", ["flair", "all"])
def test_predict_any_slice_name_writes_a_volume_that_round_trips(monkeypatch, tmp_path, workdir, data_dir, use_fake,
                                                                 channels):
    """brain.tif (a slice under any name) and a PNG copy are predicted like the
    dataset's file; a folder's volumes stack its slices with an identity affine
    beside the model input they came from, and predicting that image volume
    gives the same masks, for a FLAIR and a three-channel run."""
    import shutil

    import nibabel
    from PIL import Image

    fake = use_fake("noisy", channels)
    patient = sorted(p for p in data_dir.iterdir() if p.is_dir())[1]
    first = sorted(patient.glob("*_2.tif"))[0]
    own = tmp_path / "mine"
    own.mkdir()
    shutil.copy(first, own / "brain.tif")
    Image.fromarray(tifffile.imread(first)).save(own / "brain2.png")
    out = tmp_path / "pred"
    assert run_cli(monkeypatch, ["predict", "--workdir", str(workdir), "--out", str(out), "--quiet",
                                 str(own / "brain.tif"), str(own / "brain2.png")]) == 0
    rgb = tifffile.imread(first)
    want = _decided(fake, rgb if channels == "all" else rgb[:, :, 1])
    for stem in ("brain", "brain2"):
        np.testing.assert_array_equal(tifffile.imread(out / "mine" / f"{stem}_mask.tif"), want * 255)
    vol = nibabel.load(str(out / "mine" / "mine_mask.nii.gz"))
    np.testing.assert_array_equal(vol.affine, np.eye(4))
    np.testing.assert_array_equal(np.asarray(vol.dataobj), np.stack([want, want], axis=-1))

    # A patient folder -> image and mask volumes -> the image volume predicted again: the same masks.
    first_pass = tmp_path / "first"
    assert run_cli(monkeypatch, ["predict", "--workdir", str(workdir), "--out", str(first_pass), "--quiet",
                                 str(patient)]) == 0
    image = first_pass / patient.name / f"{patient.name}_image.nii.gz"
    inputs, _ = lgg.load_arrays([r for r in lgg.scan(data_dir).records if r.path.parent == patient], channels)
    np.testing.assert_array_equal(np.asarray(nibabel.load(str(image)).dataobj), np.stack(list(inputs), axis=2))
    second = tmp_path / "second"
    assert run_cli(monkeypatch, ["predict", "--workdir", str(workdir), "--out", str(second), "--quiet",
                                 str(image)]) == 0
    a = nibabel.load(str(first_pass / patient.name / f"{patient.name}_mask.nii.gz"))
    b = nibabel.load(str(second / f"{patient.name}_image" / f"{patient.name}_image_mask.nii.gz"))
    assert np.asarray(a.dataobj).any()
    np.testing.assert_array_equal(np.asarray(a.dataobj), np.asarray(b.dataobj))
    np.testing.assert_array_equal(a.affine, b.affine)


@pytest.mark.parametrize("suffix", [".tif", ".png"])
def test_predict_16_bit_slices_are_scaled_by_the_documented_rule(monkeypatch, tmp_path, workdir, use_fake, suffix):
    from PIL import Image

    fake = use_fake("bright")
    rng = np.random.default_rng(0)
    image = rng.integers(300, 1500, size=(40, 52)).astype(np.uint16)  # dark under the rule
    image[10:12, 10:14] = 60000  # 8 of 2080 pixels (0.4%), above the 99.5th percentile: clipped to 255
    image[30:35, 5:45] = 3000  # the 99.5th percentile: 255 under the rule, dark under min-max scaling
    path = tmp_path / "scan" / f"t2{suffix}"
    path.parent.mkdir()
    if suffix == ".png":
        Image.fromarray(image).save(path)
        assert Image.open(path).mode.startswith("I")
    else:
        tifffile.imwrite(path, image)
    x = image.astype(np.float64)
    hi = np.percentile(x, 99.5)
    scaled = np.clip(np.rint((x - x.min()) * 255.0 / (hi - x.min())), 0, 255).astype(np.uint8)
    out = tmp_path / "pred"
    assert run_cli(monkeypatch, ["predict", "--workdir", str(workdir), "--out", str(out), "--quiet", str(path)]) == 0
    got = tifffile.imread(out / "scan" / "t2_mask.tif")
    np.testing.assert_array_equal(got, _decided(fake, scaled) * 255)
    assert got[11, 12] == 255 and got[32, 20] == 255 and (got == 0).mean() > 0.8
    minmax = np.rint((x - x.min()) * 255.0 / (x.max() - x.min()))
    assert (minmax[30:35, 5:45] < 128).all()  # so min-max scaling would have missed the band


def test_predict_three_channel_run_refuses_gray_slice(monkeypatch, tmp_path, workdir, use_fake, capsys):
    use_fake("truth", "all")
    gray = tmp_path / "case" / "case_1.tif"
    gray.parent.mkdir()
    tifffile.imwrite(gray, np.zeros((SIZE, SIZE), np.uint8))
    rc = run_cli(monkeypatch, ["predict", "--workdir", str(workdir), "--out", str(tmp_path / "pred"), "--quiet",
                               str(gray)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and str(gray) in err and "three" in err, err
    assert not (tmp_path / "pred").exists()


def test_default_data_dir(tmp_path):
    cfg = ml_collections.ConfigDict({"data": {"data_dir": ""}})
    with pytest.raises(evaluate_mod.DlvaeError, match="--data-dir"):
        evaluate_mod.default_data_dir(cfg, tmp_path)
    (tmp_path / "data").mkdir()  # where training writes its synthetic phantoms
    assert evaluate_mod.default_data_dir(cfg, tmp_path) == tmp_path / "data"
    cfg.data.data_dir = str(tmp_path / "lgg")
    assert evaluate_mod.default_data_dir(cfg, tmp_path) == tmp_path / "lgg"


def test_evaluate_on_a_read_only_workdir_fails_before_any_work(monkeypatch, workdir, use_fake, capsys):
    import errno

    use_fake("truth")
    calls = []
    loader = inference.load_predictor
    monkeypatch.setattr(inference, "load_predictor", lambda *a, **k: calls.append(1) or loader(*a, **k))
    real = evaluate_mod.tempfile.TemporaryFile

    def read_only(*args, dir=None, **kwargs):
        if dir is not None and Path(dir) == workdir:
            raise OSError(errno.EROFS, "Read-only file system")
        return real(*args, dir=dir, **kwargs)

    monkeypatch.setattr(evaluate_mod.tempfile, "TemporaryFile", read_only)
    assert run_cli(monkeypatch, ["evaluate", "--workdir", str(workdir), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(workdir) in err and "Read-only file system" in err, err
    assert ".tmp" not in err and "dlvae-jax-tmp" not in err
    assert not list(workdir.glob("metrics*")) and not calls


def test_evaluate_writes_nothing_when_the_run_was_replaced_meanwhile(monkeypatch, workdir, data_dir, use_fake, capsys):
    """`train --overwrite` finishing during an `evaluate` must not end up
    holding the old model's metrics."""
    fake = use_fake("truth")
    real_call = type(fake).__call__
    state = {"n": 0}

    def replacing(self, images):
        state["n"] += 1
        if state["n"] == 1:  # the run is replaced while the first batch is scored
            write_json(workdir / "config.json", {"data": {"data_dir": str(data_dir)}, "new": 1})
        return real_call(self, images)

    monkeypatch.setattr(type(fake), "__call__", replacing)
    assert run_cli(monkeypatch, ["evaluate", "--workdir", str(workdir), "--split", "all", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "was replaced" in err and "nothing was written" in err
    assert not list(workdir.glob("metrics*")) and not (workdir / "eval_all").exists()


def test_evaluate_and_predict_warn_when_the_data_differ_from_training(monkeypatch, tmp_path, workdir, data_dir,
                                                                      use_fake, capsys):
    """The head intensity of the scored slices against the training profile
    (NumPy by hand): far away (or another kind of source) gives a plain
    warning and `data_shift` in the report; close gives none."""
    from dlvae_jax.data import shift
    from dlvae_jax.eval.evaluate import evaluate

    use_fake("noisy")
    index = lgg.scan(data_dir)
    records = [r for r in index.records if r.patient in read_splits(workdir)["test"]]
    flair, _ = lgg.load_arrays(records)
    head = flair > shift.HEAD_FLOOR
    per_slice = np.array([f[h].mean() for f, h in zip(flair, head) if h.any()])
    write_json(workdir / shift.PROFILE_FILE, {"source": "folder", "head_mean": float(per_slice.mean()),
                                              "head_mean_sd": 5.0, "head_share": 0.3, "n_slices": 10})
    report = evaluate(workdir, split="test", data_dir=data_dir)
    assert report["data_shift"] is None and "differ" not in capsys.readouterr().err
    assert report["data_profile"]["head_mean"] == pytest.approx(per_slice.mean())
    write_json(workdir / shift.PROFILE_FILE, {"source": "synthetic phantoms", "head_mean": float(per_slice.mean()) + 40,
                                              "head_mean_sd": 5.0, "head_share": 0.3, "n_slices": 10})
    report = evaluate(workdir, split="test", data_dir=data_dir)
    err = capsys.readouterr().err
    assert "trained on synthetic phantoms" in report["data_shift"] and "inside the head" in report["data_shift"]
    assert "differ from the training data" in err
    assert json.loads((workdir / "metrics_test.json").read_text())["data_shift"] == report["data_shift"]
    # predict says it too.
    slice_file = records[0].path
    assert run_cli(monkeypatch, ["predict", "--workdir", str(workdir), "--out", str(tmp_path / "p"),
                                 str(slice_file)]) == 0
    assert "differ from the training data" in capsys.readouterr().err


def test_evaluate_with_nnunet_empty_convention_writes_everything(workdir, use_fake):
    """--empty exclude: the patient without tumor (test patient index 3) has
    no Dice, is left out of the mean, and the plot and CSV still get written."""
    from dlvae_jax.eval.evaluate import evaluate

    use_fake("truth")
    report = evaluate(workdir, split="test", empty="exclude")
    rows = {r["patient"]: r for r in report["per_patient"]}
    assert report["empty_convention"] == "exclude" and report["dice_volume_n"] == len(rows) - 1
    assert sum(r["dice"] is None for r in rows.values()) == 1
    assert (workdir / "eval_test" / "dice_per_patient.png").stat().st_size > 0
    assert ",," in (workdir / "per_patient_test.csv").read_text()  # the empty Dice cell


def test_per_patient_rows_name_the_sequences_the_data_lacks(workdir, data_dir, use_fake, tmp_path):
    """A test patient whose post-contrast channel is a copy of FLAIR is marked in the
    report and the CSV; the other is not."""
    from dlvae_jax.eval.evaluate import evaluate

    use_fake("truth")
    copy = tmp_path / "copy"
    shutil.copytree(data_dir, copy)
    test_patients = read_splits(workdir / "splits.json")["test"]
    folder = next(d for d in copy.iterdir() if d.name.startswith(test_patients[0]))
    for f in folder.glob("*.tif"):
        if not f.name.endswith("_mask.tif"):
            im = tifffile.imread(f)
            im[:, :, 2] = im[:, :, 1]
            tifffile.imwrite(f, im)
    report = evaluate(workdir, data_dir=copy, split="test")
    marks = {r["patient"]: r["missing_sequences"] for r in report["per_patient"]}
    assert marks == {test_patients[0]: "post-contrast", test_patients[1]: ""}
    assert report["n_patients_missing_sequences"] == 1
    rows = {r["patient"]: r for r in csv.DictReader(open(workdir / "per_patient_test.csv"))}
    assert rows[test_patients[0]]["missing_sequences"] == "post-contrast"
    assert rows[test_patients[1]]["missing_sequences"] == ""


def test_max_patients_scores_an_even_spread_of_the_split(workdir, use_fake, data_dir):
    from dlvae_jax.eval.evaluate import evaluate

    use_fake("truth")
    index = lgg.scan(data_dir)
    p = index.patients
    write_splits(workdir, index, {"train": [], "validation": [p[2]], "test": [p[0], p[1], p[3]]}, seed=0)
    report = evaluate(workdir, split="test", max_patients=2, write=False)
    assert [r["patient"] for r in report["per_patient"]] == [p[0], p[3]]  # first and last of the sorted ids
    assert report["n_patients"] == 2 and report["n_patients_in_split"] == 3
    assert report["n_slices"] == sum(r.patient in (p[0], p[3]) for r in index.records)
