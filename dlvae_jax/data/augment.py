"""On-device data augmentation: jitted, one PRNG key per example.

Each example gets its own key (split from the batch key), so the transform of
an example does not depend on its batch neighbours or on the batch size. Image
and mask share one geometric transform: random left-right / up-down flips, a
rotation of up to `max_rotate_deg` degrees and an isotropic scaling in
[1 - max_scale, 1 + max_scale], both about the image centre. The image is
resampled bilinearly, the mask with nearest neighbour so it stays binary; both
are zero outside the source. Intensity jitter (contrast gain, brightness
offset) applies to the image only, then it is clipped to [0, 1].

Missing sequences: in the LGG dataset a patient whose pre-contrast or
post-contrast sequence was not acquired carries FLAIR in its place (Buda et
al., 2019; 3 of the 39 shared patients, two of them FLAIR in all three
channels). With `p_missing_sequence` > 0 each of those two channels of a
3-channel slice is replaced by its FLAIR channel with that probability,
independently, before the geometric transform, so a model fed all three
channels also learns to read slices that have FLAIR alone.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.scipy.ndimage import map_coordinates

from dlvae_jax.data.lgg import FLAIR_CHANNEL


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    p_flip_lr: float = 0.5
    p_flip_ud: float = 0.0     # axial MRI has a fixed anterior/posterior orientation
    max_rotate_deg: float = 10.0
    max_scale: float = 0.1     # scale factor drawn from [1 - max_scale, 1 + max_scale]
    max_contrast: float = 0.1  # gain drawn from [1 - max_contrast, 1 + max_contrast]
    max_brightness: float = 0.05  # offset drawn from [-b, b], image units in [0, 1]
    p_missing_sequence: float = 0.0  # pre- / post-contrast channel replaced by FLAIR (3-channel slices)
    image_order: int = 1       # 1 = bilinear; 0 = nearest (tests use it to compare with the mask)


# Folded into the example key, so the other draws do not change with this option. With partitionable
# threefry fold_in(k, i) equals split(k, n)[i] for i < n: a large constant stays clear of `_params`' split.
_MISSING_KEY = 0x6D697373


def missing_sequences(key, image, p: float):
    """image [H, W, 3]: channels 0 and 2 each replaced by FLAIR with probability p."""
    drop = jax.random.bernoulli(jax.random.fold_in(key, _MISSING_KEY), p, (3,))
    drop = drop.at[FLAIR_CHANNEL].set(False)
    return jnp.where(drop, image[..., FLAIR_CHANNEL:FLAIR_CHANNEL + 1], image)


def _params(key, cfg: AugmentConfig):
    k = jax.random.split(key, 6)
    return {
        "flip_lr": jax.random.bernoulli(k[0], cfg.p_flip_lr),
        "flip_ud": jax.random.bernoulli(k[1], cfg.p_flip_ud),
        "angle": jnp.deg2rad(jax.random.uniform(k[2], (), minval=-cfg.max_rotate_deg, maxval=cfg.max_rotate_deg)),
        "scale": jax.random.uniform(k[3], (), minval=1 - cfg.max_scale, maxval=1 + cfg.max_scale),
        "gain": jax.random.uniform(k[4], (), minval=1 - cfg.max_contrast, maxval=1 + cfg.max_contrast),
        "offset": jax.random.uniform(k[5], (), minval=-cfg.max_brightness, maxval=cfg.max_brightness),
    }


def _source_coords(h: int, w: int, p):
    """For every output pixel, the (row, col) it samples in the input; float32 [2, H, W]."""
    yy, xx = jnp.meshgrid(jnp.arange(h, dtype=jnp.float32), jnp.arange(w, dtype=jnp.float32), indexing="ij")
    yy = jnp.where(p["flip_ud"], h - 1 - yy, yy)
    xx = jnp.where(p["flip_lr"], w - 1 - xx, xx)
    cy, cx = (h - 1) / 2.0, (w - 1) / 2.0
    dy, dx = yy - cy, xx - cx
    # Inverse map: rotate by -angle and divide by scale to find the source pixel.
    c, s = jnp.cos(p["angle"]), jnp.sin(p["angle"])
    sy = (c * dy - s * dx) / p["scale"] + cy
    sx = (s * dy + c * dx) / p["scale"] + cx
    return jnp.stack([sy, sx])


def _warp(img_HxW, coords, order):
    return map_coordinates(img_HxW, [coords[0], coords[1]], order=order, mode="constant", cval=0.0)


def augment_example(key, image, mask_HxW, cfg: AugmentConfig = AugmentConfig()):
    """One example: image [H, W] or [H, W, C] (uint8 0..255 or float in [0, 1]), mask [H, W] {0, 1}.

    Returns (image float32 same shape in [0, 1], mask uint8 [H, W] in {0, 1}).
    """
    if jnp.issubdtype(image.dtype, jnp.integer):
        image = image.astype(jnp.float32) / 255.0
    image = image.astype(jnp.float32)
    if cfg.p_missing_sequence > 0 and image.ndim == 3 and image.shape[-1] == 3:
        image = missing_sequences(key, image, cfg.p_missing_sequence)
    h, w = mask_HxW.shape
    p = _params(key, cfg)
    coords = _source_coords(h, w, p)
    if image.ndim == 2:
        out = _warp(image, coords, cfg.image_order)
    else:
        out = jax.vmap(lambda ch: _warp(ch, coords, cfg.image_order), in_axes=2, out_axes=2)(image)
    out_mask = _warp(mask_HxW.astype(jnp.float32), coords, 0)
    out = jnp.clip(out * p["gain"] + p["offset"], 0.0, 1.0)
    return out, (out_mask > 0.5).astype(jnp.uint8)


@functools.partial(jax.jit, static_argnames=("cfg",))
def augment_batch(key, images, masks_BxHxW, cfg: AugmentConfig = AugmentConfig()):
    """Batch version: images [B, H, W] or [B, H, W, C], masks [B, H, W]; one key per example.

    Works on sharded global arrays: the per-example vmap keeps the batch axis
    sharding, so each device transforms its own rows.
    """
    keys = jax.random.split(key, images.shape[0])
    return jax.vmap(lambda k, im, m: augment_example(k, im, m, cfg))(keys, images, masks_BxHxW)
