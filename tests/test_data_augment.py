"""On-device augmentation."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage

from dlvae_jax.data.augment import AugmentConfig, _source_coords, _warp, augment_batch

NONE = AugmentConfig(p_flip_lr=0.0, max_rotate_deg=0.0, max_scale=0.0, max_contrast=0.0, max_brightness=0.0)


@pytest.fixture(scope="module")
def batch():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (6, 48, 40), dtype=np.uint8)
    masks = np.zeros((6, 48, 40), np.uint8)
    masks[:, 10:20, 5:30] = 1
    return images, masks


def test_identity_and_flips_match_numpy(batch):
    images, masks = batch
    ref = images.astype(np.float32) / 255.0
    out, m = augment_batch(jax.random.key(0), images, masks, NONE)
    np.testing.assert_allclose(np.asarray(out), ref, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(m), masks)
    cfg = AugmentConfig(p_flip_lr=1.0, p_flip_ud=1.0, max_rotate_deg=0.0, max_scale=0.0,
                        max_contrast=0.0, max_brightness=0.0)
    out, m = augment_batch(jax.random.key(0), images, masks, cfg)
    np.testing.assert_allclose(np.asarray(out), ref[:, ::-1, ::-1], atol=1e-6)
    np.testing.assert_array_equal(np.asarray(m), masks[:, ::-1, ::-1])


def _warp_np(image, order, angle=0.0, scale=1.0, flip_lr=False):
    p = {"flip_lr": flip_lr, "flip_ud": False, "angle": angle, "scale": scale}
    return np.asarray(_warp(jnp.asarray(image, jnp.float32), _source_coords(*image.shape, p), order))


def test_geometry_matches_numpy_and_scipy(batch):
    """The resampling against independent references: np.rot90 for a quarter
    turn (pins the direction), SciPy's affine_transform (bilinear and nearest,
    zero outside the source) for an arbitrary rotation + scaling about the centre."""
    img = batch[0][0].astype(np.float64)  # 48 x 40
    square = img[:40]
    np.testing.assert_allclose(_warp_np(square, 1, angle=np.pi / 2), np.rot90(square, -1), atol=1e-3)
    np.testing.assert_array_equal(_warp_np(img, 0, flip_lr=True), img[:, ::-1])
    centre = (np.array(img.shape) - 1) / 2
    for order, angle, scale in [(1, np.deg2rad(20.0), 1.15), (0, np.deg2rad(-7.0), 0.85)]:
        inv = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]) / scale
        ref = ndimage.affine_transform(img, inv, offset=centre - inv @ centre, order=order, mode="grid-constant")
        np.testing.assert_allclose(_warp_np(img, order, angle, scale), ref, atol=2e-3)


def test_image_and_mask_share_the_geometry(batch):
    _, masks = batch
    cfg = AugmentConfig(max_rotate_deg=15.0, max_scale=0.2, max_contrast=0.0, max_brightness=0.0, image_order=0)
    # An image equal to the mask must come out equal to the transformed mask.
    out, m = augment_batch(jax.random.key(1), masks * 255, masks, cfg)
    np.testing.assert_array_equal(np.rint(np.asarray(out)).astype(np.uint8), np.asarray(m))
    assert set(np.unique(np.asarray(m))) <= {0, 1}
    assert not np.array_equal(np.asarray(m), masks)  # the transform did something


def test_per_example_keys(batch):
    images, masks = batch
    a, _ = augment_batch(jax.random.key(5), images, masks)
    b, _ = augment_batch(jax.random.key(5), images, masks)
    c, _ = augment_batch(jax.random.key(6), images, masks)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert not np.allclose(np.asarray(a), np.asarray(c))
    # Same input in every row, still different outputs: each example draws its own parameters.
    same = np.repeat(images[:1], 6, axis=0)
    d, _ = augment_batch(jax.random.key(5), same, np.repeat(masks[:1], 6, axis=0))
    d = np.asarray(d)
    assert all(not np.allclose(d[0], d[i]) for i in range(1, 6))
    assert d.dtype == np.float32 and d.min() >= 0.0 and d.max() <= 1.0
    # An example's transform does not depend on the batch size either.
    e, _ = augment_batch(jax.random.key(5), images[:3], masks[:3])
    np.testing.assert_array_equal(np.asarray(e), np.asarray(a)[:3])


def test_intensity_jitter_is_affine(batch):
    images, masks = batch
    cfg = AugmentConfig(p_flip_lr=0.0, max_rotate_deg=0.0, max_scale=0.0, max_contrast=0.2, max_brightness=0.1)
    out = np.asarray(augment_batch(jax.random.key(2), images // 2 + 40, masks, cfg)[0]).astype(np.float64)
    x = (images // 2 + 40).astype(np.float64) / 255.0
    for i in range(len(out)):
        gain, offset = np.polyfit(x[i].ravel(), out[i].ravel(), 1)
        assert 0.8 - 1e-4 <= gain <= 1.2 + 1e-4 and abs(offset) <= 0.1 + 1e-4
        np.testing.assert_allclose(out[i], gain * x[i] + offset, atol=1e-5)


def test_all_channels(batch):
    images, masks = batch
    rgb = np.stack([images, images // 2, 255 - images], -1)
    out, m = augment_batch(jax.random.key(3), rgb, masks)
    one, m1 = augment_batch(jax.random.key(3), images, masks)
    assert out.shape == rgb.shape
    np.testing.assert_allclose(np.asarray(out)[..., 0], np.asarray(one), atol=1e-6)
    np.testing.assert_array_equal(np.asarray(m), np.asarray(m1))


def test_missing_sequences_copy_flair_into_pre_and_post_contrast(batch):
    """Each of channels 0 and 2 is the FLAIR channel (1) or itself, FLAIR never changes,
    the other draws do not move, and over many examples each pattern appears about
    as often as the probability says (p = 0.5: 1/4 each)."""
    images, masks = batch
    rgb = np.stack([images, images // 2 + 7, 255 - images], -1)
    n = 400
    many = np.repeat(rgb[:1], n, axis=0)
    many_masks = np.repeat(masks[:1], n, axis=0)
    cfg = AugmentConfig(p_flip_lr=0.0, max_rotate_deg=0.0, max_scale=0.0, max_contrast=0.0,
                        max_brightness=0.0, p_missing_sequence=0.5)
    out = np.asarray(augment_batch(jax.random.key(4), many, many_masks, cfg)[0])
    x = rgb[0].astype(np.float32) / 255.0
    np.testing.assert_allclose(out[..., 1], np.broadcast_to(x[..., 1], out[..., 1].shape), atol=1e-6)
    patterns = []
    for o in out:
        pattern = []
        for ch in (0, 2):
            if np.allclose(o[..., ch], x[..., 1], atol=1e-6):
                pattern.append(1)
            else:
                np.testing.assert_allclose(o[..., ch], x[..., ch], atol=1e-6)
                pattern.append(0)
        patterns.append(tuple(pattern))
    counts = {p: patterns.count(p) for p in ((0, 0), (0, 1), (1, 0), (1, 1))}
    # Binomial(400, 1/4): sd 8.7; 60..140 is more than 4.5 sd either side.
    assert all(60 <= c <= 140 for c in counts.values()), counts
    # The geometric and intensity draws do not depend on the option.
    geo = AugmentConfig(max_contrast=0.0, max_brightness=0.0)
    plain = np.asarray(augment_batch(jax.random.key(5), rgb, masks, geo)[0])
    dropped = np.asarray(augment_batch(jax.random.key(5), rgb, masks,
                                       dataclasses.replace(geo, p_missing_sequence=1.0))[0])
    np.testing.assert_allclose(dropped[..., 1], plain[..., 1], atol=1e-6)
    np.testing.assert_allclose(dropped[..., 0], plain[..., 1], atol=1e-6)
    np.testing.assert_allclose(dropped[..., 2], plain[..., 1], atol=1e-6)
    # FLAIR-only input, [B, H, W] or [B, H, W, 1] as training passes it, is left alone.
    for flair in (images, images[..., None]):
        one = augment_batch(jax.random.key(5), flair, masks, dataclasses.replace(NONE, p_missing_sequence=1.0))[0]
        np.testing.assert_allclose(np.asarray(one), flair.astype(np.float32) / 255.0, atol=1e-6)
