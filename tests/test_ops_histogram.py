"""equalize_hist against cv2.equalizeHist, pixel for pixel."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import tifffile
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from dlvae_jax.ops import equalize_hist

METHODS = ("scan", "scatter")


def _cv2_batch(images: np.ndarray) -> np.ndarray:
    flat = images.reshape(-1, *images.shape[-2:])
    return np.stack([cv2.equalizeHist(np.ascontiguousarray(im)) for im in flat]).reshape(images.shape)


def _cv2_masked(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Reference for masked equalization: cv2 on the masked pixels alone."""
    out = image.copy()
    inside = mask.astype(bool)
    if inside.any():
        out[inside] = cv2.equalizeHist(np.ascontiguousarray(image[inside]).reshape(1, -1)).ravel()
    return out


def _corner_cases() -> dict[str, np.ndarray]:
    h, w = 16, 16
    two = np.zeros((h, w), np.uint8)
    two[:, w // 2 :] = 200
    single = np.zeros((h, w), np.uint8)
    single[3, 5] = 255
    ramp = np.arange(h * w, dtype=np.uint8).reshape(h, w)
    return {
        "all_zero": np.zeros((h, w), np.uint8),
        "all_255": np.full((h, w), 255, np.uint8),
        "constant_7": np.full((h, w), 7, np.uint8),
        "two_levels": two,
        "single_bright_pixel": single,
        "ramp": ramp,
        "two_high_levels": np.where(ramp % 2 == 0, 254, 255).astype(np.uint8),
    }


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", sorted(_corner_cases()))
def test_corner_cases_match_cv2(name, method):
    image = _corner_cases()[name]
    np.testing.assert_array_equal(np.asarray(equalize_hist(image, method=method)), cv2.equalizeHist(image))


@pytest.mark.parametrize("method", METHODS)
@settings(max_examples=60, deadline=None)
@given(
    images=arrays(
        np.uint8,
        (4, 12, 20),
        elements=st.one_of(st.integers(0, 255), st.sampled_from([0, 1, 128, 254, 255])),
    )
)
def test_random_images_match_cv2(images, method):
    np.testing.assert_array_equal(np.asarray(equalize_hist(images, method=method)), _cv2_batch(images))


@settings(max_examples=30, deadline=None)
@given(
    images=arrays(np.uint8, (3, 10, 10), elements=st.integers(0, 255)),
    mask=arrays(np.bool_, (3, 10, 10)),
)
def test_masked_matches_cv2_on_masked_pixels(images, mask):
    out = np.asarray(equalize_hist(images, mask))
    for i in range(images.shape[0]):
        np.testing.assert_array_equal(out[i], _cv2_masked(images[i], mask[i]))


def test_empty_and_full_mask():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (2, 24, 24), dtype=np.uint8)
    np.testing.assert_array_equal(np.asarray(equalize_hist(image, np.zeros_like(image, bool))), image)
    np.testing.assert_array_equal(np.asarray(equalize_hist(image, np.ones_like(image, bool))), _cv2_batch(image))


def test_leading_batch_dims_and_single_image():
    rng = np.random.default_rng(1)
    images = rng.integers(0, 60, (2, 3, 9, 11), dtype=np.uint8)
    out = np.asarray(equalize_hist(images))
    assert out.shape == images.shape and out.dtype == np.uint8
    np.testing.assert_array_equal(out, _cv2_batch(images))
    np.testing.assert_array_equal(np.asarray(equalize_hist(images[0, 0])), cv2.equalizeHist(images[0, 0]))


def test_rejects_bad_input():
    with pytest.raises(TypeError, match="uint8"):
        equalize_hist(np.zeros((4, 4), np.float32))
    with pytest.raises(ValueError, match="mask shape"):
        equalize_hist(np.zeros((4, 4), np.uint8), np.zeros((4, 5), bool))


def test_every_real_flair_slice_matches_cv2(lgg_dir):
    paths = sorted(p for p in lgg_dir.glob("*/*.tif") if not p.name.endswith("_mask.tif"))
    assert paths, f"no slices under {lgg_dir}"
    flair = np.stack([tifffile.imread(p)[..., 1] for p in paths])
    differing = 0
    for start in range(0, len(flair), 256):
        chunk = flair[start : start + 256]
        if len(chunk) < 256:  # keep one compiled shape
            chunk = np.concatenate([chunk, np.zeros((256 - len(chunk), *chunk.shape[1:]), np.uint8)])
        out = np.asarray(equalize_hist(chunk))[: len(flair) - start]
        differing += int((out != _cv2_batch(flair[start : start + 256])).sum())
    print(f"{len(flair)} real FLAIR slices compared with cv2.equalizeHist: {differing} differing pixels")
    assert differing == 0
