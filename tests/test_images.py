"""What `predict` reads (dlvae_jax.eval.images): cases, the intensity rule, channels, NIfTI headers.

References are NumPy written here (the documented rule), nibabel and Pillow.
"""

from __future__ import annotations

import numpy as np
import pytest
import tifffile

from dlvae_jax.errors import DlvaeError
from dlvae_jax.eval import images


def rule(x: np.ndarray) -> np.ndarray:
    """The documented scaling, written again: minimum -> 0, 99.5th percentile -> 255, clipped, rounded."""
    x = x.astype(np.float64)
    lo, hi = x.min(), np.percentile(x, 99.5)
    return np.clip(np.rint((x - lo) * 255.0 / (hi - lo)), 0, 255).astype(np.uint8)


def test_16_bit_slices_follow_the_rule_and_it_is_not_min_max(tmp_path):
    rng = np.random.default_rng(0)
    image = rng.integers(1000, 3000, size=(64, 64)).astype(np.uint16)
    image[:2, :3] = 60000  # 6 of 4096 pixels (0.15%) above the 99.5th percentile: clipped to 255
    tifffile.imwrite(tmp_path / "a.tif", image)
    from PIL import Image

    Image.fromarray(image).save(tmp_path / "a.png")
    want = rule(image)
    minmax = np.rint((image - 1000.0) * 255 / (60000 - 1000)).astype(np.uint8)
    assert (want != minmax).mean() > 0.9  # the two rules differ almost everywhere
    for name in ("a.tif", "a.png"):
        model_input, flair = images.read_slice(tmp_path / name)
        np.testing.assert_array_equal(model_input, want)
        np.testing.assert_array_equal(flair, want)
    assert images.to_uint8(np.full((4, 4), 7, np.int16), "x").max() == 0  # a constant image
    eight = rng.integers(0, 256, size=(8, 8)).astype(np.uint8)
    assert images.to_uint8(eight, "x") is eight  # 8-bit data is used as it is


def test_channels_are_scaled_each_on_its_own_and_png_alpha_is_dropped(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(1)
    rgb = np.stack([rng.integers(0, 500, (32, 40)), rng.integers(0, 60000, (32, 40)),
                    rng.integers(100, 200, (32, 40))], axis=-1).astype(np.uint16)
    tifffile.imwrite(tmp_path / "three.tif", rgb, photometric="rgb")
    model_input, flair = images.read_slice(tmp_path / "three.tif", "all")
    for c in range(3):
        np.testing.assert_array_equal(model_input[:, :, c], rule(rgb[:, :, c]))
    np.testing.assert_array_equal(flair, rule(rgb[:, :, 1]))
    rgba = rng.integers(0, 256, (20, 30, 4)).astype(np.uint8)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    np.testing.assert_array_equal(images.read_slice(tmp_path / "rgba.png", "all")[0], rgba[:, :, :3])
    Image.fromarray(rgba[:, :, :2], "LA").save(tmp_path / "la.png")
    np.testing.assert_array_equal(images.read_slice(tmp_path / "la.png")[0], rgba[:, :, 0])
    # A 4-channel TIFF (four sequences?) is not guessed at, and a gray slice cannot feed a three-channel run.
    tifffile.imwrite(tmp_path / "four.tif", rng.integers(0, 256, (20, 30, 4)).astype(np.uint8))
    with pytest.raises(DlvaeError, match=r"four.tif: shape is \(20, 30, 4\)"):
        images.read_slice(tmp_path / "four.tif")
    with pytest.raises(DlvaeError, match="trained on all three"):
        images.read_slice(tmp_path / "la.png", "all")


def test_16_bit_colour_png_is_refused_not_truncated(tmp_path):
    cv2 = pytest.importorskip("cv2")
    path = tmp_path / "c16.png"
    assert cv2.imwrite(str(path), np.random.default_rng(0).integers(0, 4000, (16, 16, 3)).astype(np.uint16))
    with pytest.raises(DlvaeError, match="c16.png: a 16-bit colour PNG"):
        images.read_slice(path)


def _touch_slices(folder, names):
    folder.mkdir(parents=True, exist_ok=True)
    for n in names:
        tifffile.imwrite(folder / n, np.zeros((8, 8), np.uint8))


def test_cases_group_by_folder_sort_by_number_and_refuse_clashes(tmp_path):
    import nibabel

    _touch_slices(tmp_path / "p1", ["s10.tif", "s2.tif", "s1.tif", "x_mask.tif", "x_prob.png", "x_overlay.png"])
    _touch_slices(tmp_path / "p2" / "flair", ["A_1.tif"])
    _touch_slices(tmp_path / "p3" / "flair", ["B_1.tif"])
    vol = tmp_path / "p1" / "v.nii.gz"
    nibabel.save(nibabel.Nifti1Image(np.zeros((8, 8, 5), np.int16), np.eye(4)), str(vol))
    nibabel.save(nibabel.Nifti1Image(np.zeros((8, 8, 5), np.uint8), np.eye(4)), str(tmp_path / "p1" / "v_seg.nii.gz"))

    cases = images.collect_cases([tmp_path / "p1" / "s2.tif", tmp_path / "p1", vol])
    assert [(c.name, c.kind, c.n_slices) for c in cases] == [("p1", "slices", 3), ("v", "nifti", 5)]
    assert [p.name for p in cases[0].paths] == ["s1.tif", "s2.tif", "s10.tif"]  # numbers in order, once each
    # Two folders of one name would stack two patients into one volume: refused.
    with pytest.raises(DlvaeError, match="writes the same outputs"):
        images.collect_cases([tmp_path / "p2" / "flair", tmp_path / "p3" / "flair" / "B_1.tif"])
    with pytest.raises(DlvaeError, match="is a mask"):
        images.collect_cases([tmp_path / "p1" / "x_mask.tif"])
    bad = tmp_path / "bad.nii.gz"
    nibabel.save(nibabel.Nifti1Image(np.zeros((8, 8, 2, 5), np.int16), np.eye(4)), str(bad))
    with pytest.raises(DlvaeError, match=r"bad.nii.gz: shape is \(8, 8, 2, 5\)"):
        images.collect_cases([bad])


def test_written_volumes_keep_the_grid_but_not_the_inputs_intensity_header(tmp_path):
    import nibabel

    affine = np.array([[0.0, -0.9, 0, 120.5], [1.1, 0, 0, -98.0], [0, 0, 5.0, -40.0], [0, 0, 0, 1]])
    src = nibabel.Nifti1Image(np.arange(8 * 6 * 3, dtype=np.int16).reshape(8, 6, 3), affine)
    src.header["cal_max"] = 1500
    src.header.set_intent("t test", (4,), name="stat")
    src.header.set_slope_inter(2.0, 10.0)
    src.header.set_qform(affine, code=1)
    nibabel.save(src, str(tmp_path / "in.nii.gz"))
    like = nibabel.load(str(tmp_path / "in.nii.gz"))
    mask = (np.arange(8 * 6 * 3).reshape(8, 6, 3) % 2).astype(np.uint8)
    images.write_nifti(tmp_path / "mask.nii.gz", mask, like)
    out = nibabel.load(str(tmp_path / "mask.nii.gz"))
    np.testing.assert_array_equal(out.affine, like.affine)
    np.testing.assert_array_equal(out.header.get_qform(), like.header.get_qform())
    assert out.get_data_dtype() == np.uint8 and out.header["cal_max"] == 0
    assert out.header.get_intent()[0] == "none"
    np.testing.assert_array_equal(np.asarray(out.dataobj), mask)  # no slope or intercept applied
