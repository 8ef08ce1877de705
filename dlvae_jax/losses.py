"""Loss terms of DL-VAE-CNN (Rao et al., Section IV-D, Eqs. 6-9) plus segmentation.

Every term is a small pure function of arrays, returning a float32 scalar
averaged over the batch; `total_loss` mixes them with the weights of a
`LossConfig`. All terms are computed in float32 whatever the model's
computation dtype.

Every term takes an optional `valid_B` (bool or 0/1, (B,)): the batch mean is
then over the valid rows only, so the padding rows of an evaluation batch
(`valid=False` in `dlvae_jax.data.pipeline`) do not count.

Terms (keys of `LossConfig.weights()` and of the logged dict):
  kl                     Eq. 6, the four latents against N(0, I), with beta
                         warm-up and free bits
  reconstruction         Eq. 7, both views; 'l2' (mean squared error), 'l1' or 'bce'
  cosine                 Eq. 8 as a loss, 1 - cos(shared latent B1, shared latent B2)
  latent_classification  Eq. 9, softmax cross-entropy of the classifier D on the latents
  classification         softmax cross-entropy of the slice classifier (`logits_Bx2`),
                         the output every model has
  segmentation           soft Dice + BCE of the pixel mask
"""

from __future__ import annotations

from typing import Any, Mapping

import flax.struct
import jax
import jax.numpy as jnp

RECONSTRUCTION_KINDS = ("l2", "l1", "bce")
TERMS = ("kl", "reconstruction", "cosine", "latent_classification", "classification", "segmentation")


def _f32(x: jax.Array) -> jax.Array:
    return jnp.asarray(x, jnp.float32)


def _batch_mean(x_B: jax.Array, valid_B: jax.Array | None = None) -> jax.Array:
    """Mean over axis 0, over the rows where `valid_B` is true (0 if none are)."""
    if valid_B is None:
        return jnp.mean(x_B, axis=0)
    w = _f32(valid_B).reshape((-1,) + (1,) * (x_B.ndim - 1))
    return jnp.sum(x_B * w, axis=0) / jnp.maximum(jnp.sum(w), 1.0)


# ---------------------------------------------------------------- KL (Eq. 6)


def kl_per_dim(mean_BxD: jax.Array, logvar_BxD: jax.Array) -> jax.Array:
    """KL(N(mean, exp(logvar)) || N(0, 1)) per sample and latent dimension, in nats.

    Returns (B, D) float32: 0.5 * (mean^2 + exp(logvar) - 1 - logvar).
    """
    mean, logvar = _f32(mean_BxD), _f32(logvar_BxD)
    return 0.5 * (jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar)


def kl(
    means: tuple[jax.Array, ...] | list[jax.Array],
    logvars: tuple[jax.Array, ...] | list[jax.Array],
    free_bits: float | jax.Array = 0.0,
    valid_B: jax.Array | None = None,
    axis_name: str | None = None,
) -> jax.Array:
    """Eq. 6: sum over latents of KL(q(z | x, y) || N(0, I)), batch mean, in nats.

    means/logvars: matching sequences of (B, D_i) arrays (the four latents
    pp, pv, qq, qv of the dual-view VAE). Free bits (Kingma et al., 2016): each
    latent dimension's batch-mean KL is floored at `free_bits` nats, so the
    optimizer gains nothing from pushing a dimension below that (guards
    against posterior collapse). free_bits=0 gives the plain KL.

    The floor applies to the *global* batch mean: with `axis_name` (the step
    runs per device under shard_map / pmap) whether a dimension is above the
    floor is decided on the mean over all devices, and the term is written as
    where(above, local mean, free_bits), whose average over devices (the
    runners' pmean of losses and gradients) is max(global mean, free_bits)
    and its gradient, exactly as under jit.
    """
    total = jnp.zeros((), jnp.float32)
    for mean, logvar in zip(means, logvars, strict=True):
        per_dim_D = _batch_mean(kl_per_dim(mean, logvar), valid_B)
        if isinstance(free_bits, (int, float)) and free_bits == 0:
            total = total + jnp.sum(per_dim_D)
            continue
        global_D = jax.lax.stop_gradient(per_dim_D)
        if axis_name is not None:
            global_D = jax.lax.pmean(global_D, axis_name)
        total = total + jnp.sum(jnp.where(global_D > free_bits, per_dim_D, free_bits))
    return total


def kl_beta(step: int | jax.Array, warmup_steps: int) -> jax.Array:
    """KL warm-up factor: linear from 0 at step 0 to 1 at `warmup_steps`, then 1."""
    if warmup_steps <= 0:
        return jnp.ones((), jnp.float32)
    return jnp.clip(_f32(step) / float(warmup_steps), 0.0, 1.0)


# ------------------------------------------------------ reconstruction (Eq. 7)


def _bce_with_logits(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Elementwise binary cross-entropy of sigmoid(logits) against targets in [0, 1].

    Written as max(l, 0) - l t + log1p(exp(-|l|)), which never overflows.
    """
    logits, targets = _f32(logits), _f32(targets)
    return jnp.maximum(logits, 0.0) - logits * targets + jnp.log1p(jnp.exp(-jnp.abs(logits)))


def reconstruction_view(
    logits_BxHxWxC: jax.Array, target_BxHxWxC: jax.Array, kind: str = "l2", valid_B: jax.Array | None = None
) -> jax.Array:
    """One view's reconstruction error, mean over pixels and channels, batch mean.

    The decoder emits logits; the reconstruction is sigmoid(logits) in [0, 1].
    kind 'l2': mean squared error; 'l1': mean absolute error; 'bce': binary
    cross-entropy (the Bernoulli likelihood). Eq. 7 writes the unsquared L2
    norm; the per-pixel mean of the square is used instead so the scale does
    not depend on the image size (the weight absorbs the constant).
    """
    if kind == "bce":
        err = _bce_with_logits(logits_BxHxWxC, target_BxHxWxC)
    elif kind in ("l2", "l1"):
        diff = jax.nn.sigmoid(_f32(logits_BxHxWxC)) - _f32(target_BxHxWxC)
        err = jnp.square(diff) if kind == "l2" else jnp.abs(diff)
    else:
        raise ValueError(f"unknown reconstruction kind {kind!r}; expected one of {RECONSTRUCTION_KINDS}")
    return _batch_mean(jnp.mean(err, axis=(1, 2, 3)), valid_B)


def reconstruction(
    recon_b1_logits: jax.Array,
    image_b1: jax.Array,
    recon_b2_logits: jax.Array,
    target_b2: jax.Array,
    kind: str = "l2",
    valid_B: jax.Array | None = None,
) -> jax.Array:
    """Eq. 7: reconstruction error of view B1 (equalized slice, (B,H,W,C)) plus
    view B2 (one-hot K-means cluster map, (B,H,W,K))."""
    return reconstruction_view(recon_b1_logits, image_b1, kind, valid_B) + reconstruction_view(
        recon_b2_logits, target_b2, kind, valid_B
    )


# -------------------------------------------------------------- cosine (Eq. 8)


def cosine(
    shared_b1_BxD: jax.Array, shared_b2_BxD: jax.Array, eps: float = 1e-8, valid_B: jax.Array | None = None
) -> jax.Array:
    """Eq. 8 as a loss: batch mean of 1 - cos(z_pv, z_qv).

    Pulls the shared latents of the two views together (0 when parallel, 2
    when opposite). eps guards the norm of an all-zero vector.
    """
    a, b = _f32(shared_b1_BxD), _f32(shared_b2_BxD)
    dot = jnp.sum(a * b, axis=-1)
    norms = jnp.sqrt(jnp.sum(a * a, axis=-1) + eps) * jnp.sqrt(jnp.sum(b * b, axis=-1) + eps)
    return _batch_mean(1.0 - dot / norms, valid_B)


# ------------------------------------------------------ classification (Eq. 9)


def classification(logits_BxK: jax.Array, labels_B: jax.Array, valid_B: jax.Array | None = None) -> jax.Array:
    """Eq. 9: softmax cross-entropy -sum_k x_k log softmax(logits)_k with x the
    one-hot of the integer labels, batch mean, in nats."""
    logp = jax.nn.log_softmax(_f32(logits_BxK), axis=-1)
    onehot = jax.nn.one_hot(labels_B, logits_BxK.shape[-1], dtype=jnp.float32)
    return _batch_mean(-jnp.sum(onehot * logp, axis=-1), valid_B)


# ------------------------------------------------------------- segmentation


def soft_dice_loss(
    mask_logits_BxHxW: jax.Array, mask_BxHxW: jax.Array, smooth: float = 1.0, valid_B: jax.Array | None = None
) -> jax.Array:
    """1 - soft Dice of sigmoid(logits) against the binary mask, per slice, batch mean.

    Dice = (2 sum(p t) + smooth) / (sum p + sum t + smooth); `smooth` makes an
    empty prediction on an empty mask (most LGG slices) score 1, not 0/0.
    """
    p = jax.nn.sigmoid(_f32(mask_logits_BxHxW))
    t = _f32(mask_BxHxW)
    inter = jnp.sum(p * t, axis=(1, 2))
    denom = jnp.sum(p, axis=(1, 2)) + jnp.sum(t, axis=(1, 2))
    return _batch_mean(1.0 - (2.0 * inter + smooth) / (denom + smooth), valid_B)


def pixel_bce(mask_logits_BxHxW: jax.Array, mask_BxHxW: jax.Array, valid_B: jax.Array | None = None) -> jax.Array:
    """Binary cross-entropy per pixel, mean over pixels and batch, in nats."""
    return _batch_mean(jnp.mean(_bce_with_logits(mask_logits_BxHxW, mask_BxHxW), axis=(1, 2)), valid_B)


# ------------------------------------------------------------- configuration


@flax.struct.dataclass(frozen=True)
class LossConfig:
    """Weights and options of the loss mix.

    The weights are pytree leaves, so a LossConfig can be passed through
    `jax.jit` as an argument (changing a weight does not recompile) and stacked
    to vmap over several loss variants; `reconstruction_kind` and
    `kl_warmup_steps` are static.

    A weight that is the Python number 0 drops the term from the total (it is
    still computed and logged), so a NaN in a disabled term cannot leak in.
    """

    kl: float = 1.0
    reconstruction: float = 1.0
    cosine: float = 1.0
    latent_classification: float = 1.0
    classification: float = 1.0
    segmentation: float = 1.0
    free_bits: float = 0.0  # nats per latent dimension
    seg_dice_weight: float = 1.0
    seg_bce_weight: float = 1.0
    dice_smooth: float = 1.0
    reconstruction_kind: str = flax.struct.field(pytree_node=False, default="l2")
    kl_warmup_steps: int = flax.struct.field(pytree_node=False, default=0)

    def __post_init__(self):
        if self.reconstruction_kind not in RECONSTRUCTION_KINDS:
            raise ValueError(
                f"reconstruction_kind must be one of {RECONSTRUCTION_KINDS}, got {self.reconstruction_kind!r}"
            )
        if self.kl_warmup_steps < 0:
            raise ValueError(f"kl_warmup_steps must be >= 0, got {self.kl_warmup_steps}")

    def weights(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in TERMS}


def _is_concrete_zero(w: Any) -> bool:
    return isinstance(w, (int, float)) and w == 0


def total_loss(
    outputs: Mapping[str, jax.Array],
    batch: Mapping[str, Any],
    config: LossConfig,
    step: int | jax.Array = 0,
    axis_name: str | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Weighted sum of the loss terms a model has outputs for.

    outputs: a model's output dict (see `dlvae_jax.models`): `logits_Bx2`,
      optionally `mask_logits_BxHxW`, and for the VAE model `latent_means`,
      `latent_logvars` (dicts keyed pp, pv, qq, qv), `z_pv_BxD`, `z_qv_BxD`,
      `recon_b1_logits_BxHxWxC`, `recon_b2_logits_BxHxWxK`, `latent_logits_Bx2`.
    batch: `image_BxHxWxC` in [0, 1], `clusters_BxHxW` int, `label_B` int 0/1,
      optional `mask_BxHxW` in {0, 1} (segmentation is skipped without it),
      optional `valid_B` bool (rows where it is false, e.g. evaluation
      padding, are left out of every batch mean).
    step: training step, for the KL warm-up.
    axis_name: the device axis when the loss runs per device (shard_map,
      pmap): terms that are not means of per-example values (free bits) are
      then decided on the global batch.

    Returns (total float32 scalar, logs): logs hold each computed term
    unweighted under its name, `segmentation_dice` / `segmentation_bce`, the
    KL factor `kl_beta`, and `total`.
    """
    logs: dict[str, jax.Array] = {}
    weights = config.weights()
    label_B = batch.get("label_B")
    valid_B = batch.get("valid_B")

    if "latent_means" in outputs:
        names = list(outputs["latent_means"])  # the model's latents, in its order
        logs["kl"] = kl(
            [outputs["latent_means"][n] for n in names],
            [outputs["latent_logvars"][n] for n in names],
            config.free_bits,
            valid_B,
            axis_name,
        )
        if "free_latent_means" in outputs:  # dlvae_cnn's label-free posterior (Y = unknown), also Eq. 6
            logs["kl"] = logs["kl"] + kl(
                [outputs["free_latent_means"][n] for n in names],
                [outputs["free_latent_logvars"][n] for n in names],
                config.free_bits,
                valid_B,
                axis_name,
            )
        logs["kl_beta"] = kl_beta(step, config.kl_warmup_steps)
    if "recon_b1_logits_BxHxWxC" in outputs:
        k = outputs["recon_b2_logits_BxHxWxK"].shape[-1]
        target_b2 = jax.nn.one_hot(batch["clusters_BxHxW"], k, dtype=jnp.float32)
        logs["reconstruction"] = reconstruction(
            outputs["recon_b1_logits_BxHxWxC"],
            batch["image_BxHxWxC"],
            outputs["recon_b2_logits_BxHxWxK"],
            target_b2,
            config.reconstruction_kind,
            valid_B,
        )
    if "z_pv_BxD" in outputs:
        logs["cosine"] = cosine(outputs["z_pv_BxD"], outputs["z_qv_BxD"], valid_B=valid_B)
    if "latent_logits_Bx2" in outputs and label_B is not None:
        logs["latent_classification"] = classification(outputs["latent_logits_Bx2"], label_B, valid_B)
    if "logits_Bx2" in outputs and label_B is not None:
        logs["classification"] = classification(outputs["logits_Bx2"], label_B, valid_B)
    if "mask_logits_BxHxW" in outputs and batch.get("mask_BxHxW") is not None:
        dice = soft_dice_loss(outputs["mask_logits_BxHxW"], batch["mask_BxHxW"], config.dice_smooth, valid_B)
        bce = pixel_bce(outputs["mask_logits_BxHxW"], batch["mask_BxHxW"], valid_B)
        logs["segmentation_dice"] = dice
        logs["segmentation_bce"] = bce
        logs["segmentation"] = config.seg_dice_weight * dice + config.seg_bce_weight * bce

    total = jnp.zeros((), jnp.float32)
    for name in TERMS:
        if name not in logs or _is_concrete_zero(weights[name]):
            continue
        term = weights[name] * logs[name]
        if name == "kl":
            term = term * logs["kl_beta"]
        total = total + term
    logs["total"] = total
    return total, logs
