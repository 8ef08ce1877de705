"""Reader, validation and `data check` CLI of the LGG layout."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import tifffile

from dlvae_jax.cli import main
from dlvae_jax.data import lgg
from dlvae_jax.data.synth import synthesize
from dlvae_jax.errors import DataError


def _tiffs(root: Path):
    images = sorted(p for p in root.glob("*/*.tif") if not p.name.endswith("_mask.tif"))
    masks = sorted(root.glob("*/*_mask.tif"))
    return images, masks


def test_scan_matches_files_on_disk(synth_dir):
    idx = lgg.scan(synth_dir)
    images, masks = _tiffs(synth_dir)
    # Hand count straight from the files: every image has a mask, tumor = any nonzero mask pixel.
    tumor = sum(int(tifffile.imread(m).any()) for m in masks)
    assert len(idx) == len(images) == len(masks) == 6 * 12
    assert idx.n_tumor_slices == tumor
    assert 0 < tumor < len(masks)
    assert idx.patients == sorted(f"TCGA_{'SY' if i % 2 == 0 else 'SZ'}_{i + 1:04d}" for i in range(6))
    assert idx.institutions == {"SY": 3, "SZ": 3}
    assert idx.image_shape == (256, 256, 3)
    r = idx.records[5]
    assert r.path.name == f"{r.patient}_20000101_{r.slice_number}.tif"
    assert r.mask_path.name == f"{r.patient}_20000101_{r.slice_number}_mask.tif"
    assert r.has_tumor == bool(tifffile.imread(r.mask_path).any())
    assert [x.slice_number for x in idx.records[:12]] == list(range(1, 13))  # numeric, not lexical order


def test_load_slice_channels_and_mask(synth_dir):
    idx = lgg.scan(synth_dir)
    rec = next(r for r in idx.records if r.has_tumor)
    raw_image, raw_mask = tifffile.imread(rec.path), tifffile.imread(rec.mask_path)
    flair, mask = lgg.load_slice(rec)
    allc, mask2 = lgg.load_slice(rec, channels="all")
    np.testing.assert_array_equal(flair, raw_image[:, :, 1])
    np.testing.assert_array_equal(allc, raw_image)
    np.testing.assert_array_equal(mask, (raw_mask == 255).astype(np.uint8))
    np.testing.assert_array_equal(mask2, mask)
    assert flair.dtype == mask.dtype == np.uint8 and set(np.unique(mask)) == {0, 1}
    images, masks = lgg.load_arrays(idx.records[:5])
    assert images.shape == (5, 256, 256) and masks.shape == (5, 256, 256)
    np.testing.assert_array_equal(images[3], tifffile.imread(idx.records[3].path)[:, :, 1])
    with pytest.raises(ValueError):
        lgg.load_slice(rec, channels="t1")


# ----------------------------------------------------------------------------- corrupted inputs


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return synthesize(tmp_path_factory.mktemp("tiny") / "lgg", n_patients=2, seed=5, size=64, slices_per_patient=4)


@pytest.fixture
def copy_dir(tiny_dir, tmp_path) -> Path:
    dst = tmp_path / "data"
    shutil.copytree(tiny_dir, dst)
    return dst


def _img(root: Path, n: int = 2) -> Path:
    return root / "TCGA_SY_0001_20000101" / f"TCGA_SY_0001_20000101_{n}.tif"


def _mask(root: Path, n: int = 2) -> Path:
    return root / "TCGA_SY_0001_20000101" / f"TCGA_SY_0001_20000101_{n}_mask.tif"


def _truncate(root):
    p = _img(root)
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    return p


def _missing_mask(root):
    _mask(root).unlink()
    return _img(root)


def _orphan_mask(root):
    _img(root).unlink()
    return _mask(root)


def _mask_3ch(root):
    m = tifffile.imread(_mask(root))
    tifffile.imwrite(_mask(root), np.stack([m] * 3, -1))
    return _mask(root)


def _mask_value_7(root):
    m = tifffile.imread(_mask(root))
    m[0, :5] = 7
    tifffile.imwrite(_mask(root), m)
    return _mask(root)


def _image_uint16(root):
    tifffile.imwrite(_img(root), tifffile.imread(_img(root)).astype(np.uint16))
    return _img(root)


def _image_2d(root):
    tifffile.imwrite(_img(root), tifffile.imread(_img(root))[:, :, 1])
    return _img(root)


def _first_slice_other_size(root):
    # The very first slice scanned is the odd one: it, not the rest, is reported.
    tifffile.imwrite(_img(root, 1), tifffile.imread(_img(root, 1))[:32, :32])
    tifffile.imwrite(_mask(root, 1), tifffile.imread(_mask(root, 1))[:32, :32])
    return _img(root, 1)


def _empty(root):
    shutil.rmtree(root)
    root.mkdir()
    return root


def _no_patients(root):
    for d in root.iterdir():
        if d.is_dir():
            shutil.rmtree(d)
    (root / "notes").mkdir()
    return root


CORRUPTIONS = {
    "truncated_tiff": (_truncate, "truncated"),
    "missing_mask": (_missing_mask, "no mask"),
    "orphan_mask": (_orphan_mask, "no image"),
    "mask_3_channels": (_mask_3ch, "mask shape"),
    "mask_value_7": (_mask_value_7, "not binary"),
    "image_uint16": (_image_uint16, "dtype"),
    "image_without_channels": (_image_2d, "image shape"),
    "image_other_size": (_first_slice_other_size, "differs from the dataset's"),
    "empty_folder": (_empty, "empty folder"),
    "no_patients": (_no_patients, "no patient folders"),
}


@pytest.mark.parametrize("name", sorted(CORRUPTIONS))
def test_bad_input_fails_clearly_and_writes_nothing(name, copy_dir, tmp_path, capsys):
    corrupt, fault = CORRUPTIONS[name]
    bad = corrupt(copy_dir)
    with pytest.raises(DataError, match=fault):
        lgg.scan(copy_dir)

    rc = main(["data", "check", "--data-dir", str(copy_dir)])
    err = capsys.readouterr().err
    assert rc != 0
    assert str(bad) in err and fault in err
    assert len(err.strip().splitlines()) == 1  # one clear line, no traceback

    out_tfds, work = tmp_path / "tfds", tmp_path / "work"
    assert main(["data", "build", "--data-dir", str(copy_dir), "--tfds-dir", str(out_tfds)]) != 0
    assert main(["data", "split", "--data-dir", str(copy_dir), "--workdir", str(work)]) != 0
    assert str(bad) in capsys.readouterr().err
    assert not out_tfds.exists() and not work.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folders either


def test_skip_bad_reports_and_continues(copy_dir, capsys):
    bad = _mask_value_7(copy_dir)
    orphan = _orphan_mask(copy_dir)  # also removes image 2 -> slice 2 gone; its mask is reported
    _truncate_other = copy_dir / "TCGA_SZ_0002_20000101" / "TCGA_SZ_0002_20000101_3.tif"
    _truncate_other.write_bytes(_truncate_other.read_bytes()[:100])
    assert bad == orphan  # same mask file: now an orphan
    with pytest.warns(lgg.DataWarning, match="gap in slice numbers"):  # the skipped slices leave gaps
        idx = lgg.scan(copy_dir, skip_bad=True)
    assert len(idx) == 8 - 2
    assert {p for p, _ in idx.skipped} == {str(orphan), str(_truncate_other)}
    rc = main(["data", "check", "--data-dir", str(copy_dir), "--skip-bad"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "skipped 2 bad files" in out and str(_truncate_other) in out and "slices: 6" in out


def test_gap_in_slice_numbers_is_a_warning(copy_dir, capsys):
    _img(copy_dir, 3).unlink()
    _mask(copy_dir, 3).unlink()
    with pytest.warns(lgg.DataWarning, match=r"gap in slice numbers, missing \[3\]"):
        idx = lgg.scan(copy_dir)
    assert len(idx) == 7
    assert main(["data", "check", "--data-dir", str(copy_dir)]) == 0
    assert "warning: TCGA_SY_0001: gap in slice numbers" in capsys.readouterr().err


def test_check_real_data(lgg_dir, capsys):
    rc = main(["data", "check", "--data-dir", str(lgg_dir)])
    out = capsys.readouterr().out
    assert rc == 0
    masks = sorted(lgg_dir.glob("*/*_mask.tif"))
    tumor = sum(int(tifffile.imread(m).any()) for m in masks)
    assert "patients: 39 " in out and "slices: 1364\n" in out
    assert f"slices with tumor: {tumor}\n" in out
    assert len(masks) == 1364
    # Patients whose pre- or post-contrast channel equals FLAIR on every slice where FLAIR is not blank.
    expect = {}
    for folder in sorted(p for p in lgg_dir.iterdir() if p.is_dir()):
        lit = [im for im in (tifffile.imread(f) for f in folder.glob("*.tif") if not f.name.endswith("_mask.tif"))
               if im[:, :, 1].any()]
        names = [n for c, n in ((0, "pre-contrast"), (2, "post-contrast")) if all((im[:, :, c] == im[:, :, 1]).all()
                                                                               for im in lit)]
        if names:
            expect["_".join(folder.name.split("_")[:3])] = names
    assert lgg.scan(lgg_dir).missing_sequences == expect and len(expect) == 3


def test_flair_in_place_of_a_missing_sequence_is_reported(copy_dir, capsys):
    """A patient whose post-contrast channel is FLAIR on every slice is reported, one whose
    pre-contrast is FLAIR on only some slices is not, and a blank slice (every channel 0)
    neither makes nor breaks a patient's finding."""
    p1, p2 = sorted(d for d in copy_dir.iterdir() if d.is_dir())
    for f in sorted(p1.glob("*.tif")):
        if f.name.endswith("_mask.tif"):
            continue
        im = tifffile.imread(f)
        im[:, :, 2] = im[:, :, 1]
        tifffile.imwrite(f, im)
    blank = next(f for f in sorted(p1.glob("*.tif")) if not f.name.endswith("_mask.tif"))
    tifffile.imwrite(blank, np.zeros_like(tifffile.imread(blank)))
    first = next(f for f in sorted(p2.glob("*.tif")) if not f.name.endswith("_mask.tif"))
    im = tifffile.imread(first)
    im[:, :, 0] = im[:, :, 1]
    tifffile.imwrite(first, im)
    # What the files say, read independently of the reader.
    for d, expect in ((p1, True), (p2, False)):
        slices = [tifffile.imread(f) for f in d.glob("*.tif") if not f.name.endswith("_mask.tif")]
        lit = [s for s in slices if s[:, :, 1].any()]
        assert all(np.array_equal(s[:, :, 2], s[:, :, 1]) for s in lit) is expect
    idx = lgg.scan(copy_dir)
    pid1 = "_".join(p1.name.split("_")[:3])
    assert idx.missing_sequences == {pid1: ["post-contrast"]}
    assert main(["data", "check", "--data-dir", str(copy_dir)]) == 0
    assert f"FLAIR in place of a missing sequence: 1 patient ({pid1}: post-contrast)" in capsys.readouterr().out
    assert lgg.scan(copy_dir, validate=False).missing_sequences == {}  # images not read: nothing claimed
