"""Loss terms of DL-VAE-CNN (Rao et al., Section IV-D, Eqs. 6-9) plus segmentation.

A loss term is declared once: a function registered with `@term(name)` that
maps (model outputs, batch, LossConfig, context) to a float32 scalar (or
None when the model has no outputs for it), plus its weight in
`LossConfig.term_weights` and, optionally, a schedule in
`LossConfig.schedules`. A new variant is therefore one function and one
config line (`loss.weights.<name> = w`); `total_loss` mixes every registered
term with its weight times its schedule factor. All terms are computed in
float32 whatever the model's computation dtype.

Every term takes the batch's optional `valid_B` (bool or 0/1, (B,)): the
batch mean is then over the valid rows only, so the padding rows of an
evaluation batch (`valid=False` in `dlvae_jax.data.pipeline`) do not count.

Built-in terms (the names of the logged dict):
  kl                     Eq. 6, every latent of every posterior the model
                         returns against N(0, I), with free bits
  reconstruction         Eq. 7, both views of every decoded posterior;
                         'bce' (Bernoulli likelihood), 'l2' or 'l1'
  cosine                 Eq. 8 as a loss, 1 - cos of the two views' shared
                         posterior means
  latent_classification  Eq. 9, softmax cross-entropy of the classifier D on the latents
  classification         softmax cross-entropy of the slice classifier (`logits_Bx2`),
                         the output every model has
  segmentation           soft Dice + BCE of the pixel mask

The VAE's scale (`LossConfig.reduction`). The negative ELBO of a slice is
the reconstruction negative log-likelihood summed over its pixels and
channels plus the KL in nats. 'pixel' (the default) divides both by the
number of pixels H*W, so the VAE terms stay the size of the per-pixel
segmentation loss while their ratio is the ELBO's; 'sum' keeps the ELBO in
nats per slice; 'mean' takes the per-value mean of the reconstruction error
beside the KL in nats, the paper's Eqs. 6-7 read literally, which weights the
KL by the number of reconstructed values (tens of thousands) against a
likelihood and drives the posterior to the prior (posterior collapse).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import flax.struct
import jax
import jax.numpy as jnp

RECONSTRUCTION_KINDS = ("bce", "l2", "l1")
REDUCTIONS = ("pixel", "sum", "mean")
SCHEDULES = ("constant", "linear", "cyclical")


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
    return schedule_factor(f"linear:{int(warmup_steps)}", step)


def parse_schedule(spec: str) -> tuple[str, int, float]:
    """'constant' | 'linear:N' | 'cyclical:N' | 'cyclical:N:R' -> (kind, N, R).

    linear:N     0 at step 0, rising linearly to 1 at step N, then 1 (warm-up).
    cyclical:N:R cycles of N steps; in each, 0 rising linearly to 1 over the
                 first fraction R (default 0.5), then 1 (Fu et al., 2019,
                 "Cyclical annealing schedule", NAACL).
    Raises ValueError naming the spec when it is none of these.
    """
    parts = str(spec).strip().split(":")
    kind = parts[0]
    try:
        if kind == "constant" and len(parts) == 1:
            return kind, 0, 1.0
        if kind == "linear" and len(parts) == 2:
            n = int(parts[1])
            if n >= 0:
                return kind, n, 1.0
        if kind == "cyclical" and len(parts) in (2, 3):
            n, r = int(parts[1]), float(parts[2]) if len(parts) == 3 else 0.5
            if n >= 1 and 0.0 < r <= 1.0:
                return kind, n, r
    except ValueError:
        pass
    raise ValueError(f"schedule {spec!r}: expected 'constant', 'linear:N' (N >= 0 steps), "
                     f"or 'cyclical:N' / 'cyclical:N:R' (N >= 1 steps per cycle, 0 < R <= 1 rising)")


def schedule_factor(spec: str, step: int | jax.Array) -> jax.Array:
    """The factor (float32 in [0, 1]) a term's weight is multiplied by at `step`."""
    kind, n, ratio = parse_schedule(spec)
    if kind == "constant" or (kind == "linear" and n == 0):
        return jnp.ones((), jnp.float32)
    s = _f32(step)
    if kind == "linear":
        return jnp.clip(s / float(n), 0.0, 1.0)
    phase = jnp.mod(s, float(n)) / float(n)
    return jnp.clip(phase / ratio, 0.0, 1.0)


# ------------------------------------------------------ reconstruction (Eq. 7)


def _bce_with_logits(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Elementwise binary cross-entropy of sigmoid(logits) against targets in [0, 1].

    Written as max(l, 0) - l t + log1p(exp(-|l|)), which never overflows.
    """
    logits, targets = _f32(logits), _f32(targets)
    return jnp.maximum(logits, 0.0) - logits * targets + jnp.log1p(jnp.exp(-jnp.abs(logits)))


def _reduce(err_BxHxWxC: jax.Array, reduction: str) -> jax.Array:
    """Per-example size of an elementwise error: 'mean' over pixels and
    channels, 'sum' over them, or 'pixel' (the sum divided by H*W)."""
    if reduction == "mean":
        return jnp.mean(err_BxHxWxC, axis=(1, 2, 3))
    total = jnp.sum(err_BxHxWxC, axis=(1, 2, 3))
    if reduction == "sum":
        return total
    if reduction == "pixel":
        return total / float(err_BxHxWxC.shape[1] * err_BxHxWxC.shape[2])
    raise ValueError(f"unknown reduction {reduction!r}; expected one of {REDUCTIONS}")


def reconstruction_view(
    logits_BxHxWxC: jax.Array, target_BxHxWxC: jax.Array, kind: str = "l2", valid_B: jax.Array | None = None,
    reduction: str = "mean",
) -> jax.Array:
    """One view's reconstruction error, reduced per example (`_reduce`), batch mean.

    The decoder emits logits; the reconstruction is sigmoid(logits) in [0, 1].
    kind 'bce': binary cross-entropy, the negative log-likelihood of a
    Bernoulli decoder in nats; 'l2': squared error; 'l1': absolute error.
    With reduction 'sum' or 'pixel' and kind 'bce' this is Eq. 7 as a
    likelihood; Eq. 7 as printed is the (unsquared) L2 norm of the error.
    """
    if kind == "bce":
        err = _bce_with_logits(logits_BxHxWxC, target_BxHxWxC)
    elif kind in ("l2", "l1"):
        diff = jax.nn.sigmoid(_f32(logits_BxHxWxC)) - _f32(target_BxHxWxC)
        err = jnp.square(diff) if kind == "l2" else jnp.abs(diff)
    else:
        raise ValueError(f"unknown reconstruction kind {kind!r}; expected one of {RECONSTRUCTION_KINDS}")
    return _batch_mean(_reduce(err, reduction), valid_B)


def reconstruction(
    recon_b1_logits: jax.Array,
    image_b1: jax.Array,
    recon_b2_logits: jax.Array,
    target_b2: jax.Array,
    kind: str = "l2",
    valid_B: jax.Array | None = None,
    reduction: str = "mean",
) -> jax.Array:
    """Eq. 7: reconstruction error of view B1 (equalized slice, (B,H,W,C)) plus
    view B2 (one-hot K-means cluster map, (B,H,W,K))."""
    return (reconstruction_view(recon_b1_logits, image_b1, kind, valid_B, reduction)
            + reconstruction_view(recon_b2_logits, target_b2, kind, valid_B, reduction))


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


DICE_KINDS = ("slice", "batch")


def soft_dice_loss(
    mask_logits_BxHxW: jax.Array, mask_BxHxW: jax.Array, smooth: float = 1.0, valid_B: jax.Array | None = None,
    kind: str = "slice", axis_name: str | None = None, fn_weight: float = 0.5,
) -> jax.Array:
    """1 - soft Dice of sigmoid(logits) against the binary mask.

    Dice = (2 sum(p t) + smooth) / (sum p + sum t + smooth). `fn_weight` (b)
    makes it the Tversky index (Salehi et al., 2017) with false negatives
    weighted b and false positives 1 - b: (2 TP + smooth) / (2 TP + 2(1 - b)
    FP + 2 b FN + smooth), that is (2 sum(p t) + smooth) / (2(1 - b) sum p +
    2 b sum t + smooth); b = 0.5 is Dice, b > 0.5 trades precision for
    recall. kind="slice":
    one Dice per slice, then the batch mean; `smooth` makes an empty
    prediction on an empty mask (most LGG slices) score 1, not 0/0.
    kind="batch": the sums run over every (valid) slice of the batch at once,
    as nnU-Net's batch Dice does, so each tumor pixel weighs the same whatever
    its slice (closer to Dice per volume, which pools a patient's slices).
    The batch is the global one under every runner: with `axis_name` (the
    step runs per device) the sums are taken over all devices, and each
    device returns the global loss plus its own sums' first-order share of
    it scaled by the device count, so the runners' mean over devices of
    losses and gradients is the global batch Dice and its gradient, as
    under jit.
    """
    if kind not in DICE_KINDS:
        raise ValueError(f"dice kind must be one of {DICE_KINDS}, got {kind!r}")
    p = jax.nn.sigmoid(_f32(mask_logits_BxHxW))
    t = _f32(mask_BxHxW)
    if kind == "batch":
        w = jnp.ones(p.shape[:1], jnp.float32) if valid_B is None else _f32(valid_B)
        p, t = p * w[:, None, None], t * w[:, None, None]
        inter, denom = jnp.sum(p * t), 2.0 * ((1.0 - fn_weight) * jnp.sum(p) + fn_weight * jnp.sum(t))
        if axis_name is None:
            return 1.0 - (2.0 * inter + smooth) / (denom + smooth)
        n = jax.lax.psum(1, axis_name)
        g_inter, g_denom = jax.lax.psum(jax.lax.stop_gradient((inter, denom)), axis_name)
        value = 1.0 - (2.0 * g_inter + smooth) / (g_denom + smooth)
        d_inter = -2.0 / (g_denom + smooth)
        d_denom = (2.0 * g_inter + smooth) / (g_denom + smooth) ** 2
        return value + n * (d_inter * (inter - jax.lax.stop_gradient(inter))
                            + d_denom * (denom - jax.lax.stop_gradient(denom)))
    inter = jnp.sum(p * t, axis=(1, 2))
    denom = 2.0 * ((1.0 - fn_weight) * jnp.sum(p, axis=(1, 2)) + fn_weight * jnp.sum(t, axis=(1, 2)))
    return _batch_mean(1.0 - (2.0 * inter + smooth) / (denom + smooth), valid_B)


def pixel_bce(mask_logits_BxHxW: jax.Array, mask_BxHxW: jax.Array, valid_B: jax.Array | None = None) -> jax.Array:
    """Binary cross-entropy per pixel, mean over pixels and batch, in nats."""
    return _batch_mean(jnp.mean(_bce_with_logits(mask_logits_BxHxW, mask_BxHxW), axis=(1, 2)), valid_B)


# ------------------------------------------------------------- the terms


@dataclasses.dataclass(frozen=True)
class TermContext:
    """What a term may need besides outputs, batch and config."""

    valid_B: jax.Array | None = None
    axis_name: str | None = None  # the device axis when the loss runs per device


TermFn = Callable[[Mapping[str, Any], Mapping[str, Any], "LossConfig", TermContext], Any]
TERMS: dict[str, TermFn] = {}


def term(name: str) -> Callable[[TermFn], TermFn]:
    """Registers a loss term under `name` (the key of its weight, schedule and log).

    The function gets (outputs, batch, config, context) and returns None when
    the model has no outputs for it, else a float32 scalar or (scalar, dict of
    extra scalars to log). Its weight is `config.term_weights[name]`; a term
    without a weight there is not computed.
    """

    def register(fn: TermFn) -> TermFn:
        TERMS[name] = fn
        return fn

    return register


# Posteriors a model may return, as (means key, logvars key, B1 logits key, B2 logits key).
_POSTERIORS = (
    ("latent_means", "latent_logvars", "recon_b1_logits_BxHxWxC", "recon_b2_logits_BxHxWxK"),
    ("free_latent_means", "free_latent_logvars", "free_recon_b1_logits_BxHxWxC", "free_recon_b2_logits_BxHxWxK"),
)


def _vae_scale(cfg: "LossConfig", batch: Mapping[str, Any]) -> float:
    """What nats are multiplied by under `cfg.reduction`: 1 / (H * W) for 'pixel'."""
    if cfg.reduction != "pixel":
        return 1.0
    h, w = batch["image_BxHxWxC"].shape[1:3]
    return 1.0 / float(h * w)


@term("kl")
def _kl_term(outputs, batch, cfg, ctx):
    """Eq. 6 for every posterior the model returns (dlvae_cnn: the
    label-conditioned and the label-free one), with free bits, in nats times
    the reduction's scale. Logs `kl_nats` (the floored objective) and
    `kl_free_nats` (the plain KL of the label-free posterior, an upper bound on
    what its z tells about a slice)."""
    posts = [(m, lv) for m, lv, _, _ in _POSTERIORS if m in outputs]
    if not posts:
        return None
    total = jnp.zeros((), jnp.float32)
    extra = {}
    for means_key, logvars_key in posts:
        means, logvars = outputs[means_key], outputs[logvars_key]
        names = list(means)
        total = total + kl([means[n] for n in names], [logvars[n] for n in names], cfg.free_bits, ctx.valid_B,
                           ctx.axis_name)
    free = outputs.get("free_latent_means", outputs["latent_means"])
    free_lv = outputs.get("free_latent_logvars", outputs["latent_logvars"])
    extra["kl_free_nats"] = sum(jnp.sum(_batch_mean(kl_per_dim(free[n], free_lv[n]), ctx.valid_B)) for n in free)
    extra["kl_nats"] = total
    return total * _vae_scale(cfg, batch), extra


@term("reconstruction")
def _reconstruction_term(outputs, batch, cfg, ctx):
    """Eq. 7 for every decoded posterior, both views, reduced by `cfg.reduction`."""
    decoded = [(b1, b2) for _, _, b1, b2 in _POSTERIORS if b1 in outputs]
    if not decoded:
        return None
    total = jnp.zeros((), jnp.float32)
    for b1, b2 in decoded:
        k = outputs[b2].shape[-1]
        target_b2 = jax.nn.one_hot(batch["clusters_BxHxW"], k, dtype=jnp.float32)
        total = total + reconstruction(outputs[b1], batch["image_BxHxWxC"], outputs[b2], target_b2,
                                       cfg.reconstruction_kind, ctx.valid_B, cfg.reduction)
    return total


@term("cosine")
def _cosine_term(outputs, batch, cfg, ctx):
    """Eq. 8 on the posterior means of the shared latents pv and qv (samples
    of near-prior posteriors are noise), averaged over the posteriors."""
    posts = [outputs[m] for m, _, _, _ in _POSTERIORS if m in outputs and "pv" in outputs[m]]
    if not posts:
        return None
    return sum(cosine(p["pv"], p["qv"], valid_B=ctx.valid_B) for p in posts) / len(posts)


@term("latent_classification")
def _latent_classification_term(outputs, batch, cfg, ctx):
    if "latent_logits_Bx2" not in outputs or batch.get("label_B") is None:
        return None
    return classification(outputs["latent_logits_Bx2"], batch["label_B"], ctx.valid_B)


@term("classification")
def _classification_term(outputs, batch, cfg, ctx):
    if "logits_Bx2" not in outputs or batch.get("label_B") is None:
        return None
    return classification(outputs["logits_Bx2"], batch["label_B"], ctx.valid_B)


@term("segmentation")
def _segmentation_term(outputs, batch, cfg, ctx):
    if outputs.get("mask_logits_BxHxW") is None or batch.get("mask_BxHxW") is None:
        return None
    dice = soft_dice_loss(outputs["mask_logits_BxHxW"], batch["mask_BxHxW"], cfg.dice_smooth, ctx.valid_B,
                          cfg.dice_kind, ctx.axis_name, cfg.dice_fn_weight)
    bce = pixel_bce(outputs["mask_logits_BxHxW"], batch["mask_BxHxW"], ctx.valid_B)
    return cfg.seg_dice_weight * dice + cfg.seg_bce_weight * bce, {"segmentation_dice": dice, "segmentation_bce": bce}


# ------------------------------------------------------------- configuration

DEFAULT_WEIGHTS = {"kl": 1.0, "reconstruction": 1.0, "cosine": 1.0, "latent_classification": 1.0,
                   "classification": 1.0, "segmentation": 1.0}
_OPTIONS = ("free_bits", "seg_dice_weight", "seg_bce_weight", "dice_smooth", "dice_fn_weight", "dice_kind",
            "reconstruction_kind",
            "reduction")


@flax.struct.dataclass(frozen=True)
class LossConfig:
    """Weights, schedules and options of the loss mix.

    term_weights: {term name: weight}, pytree leaves, so a LossConfig can be
    passed through `jax.jit` as an argument (changing a weight does not
    recompile) and stacked to vmap over several loss variants. schedules
    ((name, spec) pairs; `parse_schedule`), `reconstruction_kind` and
    `reduction` are static. Build one with `LossConfig.make(kl=0.5, ...)` or
    `from_config(cfg.loss)`; `cfg.kl` reads a term's weight.

    A weight that is the Python number 0 drops the term from the total (it is
    still computed and logged), so a NaN in a disabled term cannot leak in.
    """

    term_weights: dict = flax.struct.field(pytree_node=True, default_factory=lambda: dict(DEFAULT_WEIGHTS))
    free_bits: float = 0.0  # nats per latent dimension
    seg_dice_weight: float = 1.0
    seg_bce_weight: float = 1.0
    dice_smooth: float = 1.0
    dice_fn_weight: float = 0.5  # Tversky's weight of false negatives; 0.5 = Dice
    schedules: tuple = flax.struct.field(pytree_node=False, default=())
    reconstruction_kind: str = flax.struct.field(pytree_node=False, default="bce")
    reduction: str = flax.struct.field(pytree_node=False, default="pixel")
    dice_kind: str = flax.struct.field(pytree_node=False, default="slice")

    def __post_init__(self):
        if self.reconstruction_kind not in RECONSTRUCTION_KINDS:
            raise ValueError(
                f"reconstruction_kind must be one of {RECONSTRUCTION_KINDS}, got {self.reconstruction_kind!r}"
            )
        if self.reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {self.reduction!r}")
        if self.dice_kind not in DICE_KINDS:
            raise ValueError(f"dice_kind must be one of {DICE_KINDS}, got {self.dice_kind!r}")
        for name in self.term_weights:
            if name not in TERMS:
                raise ValueError(f"unknown loss term {name!r}; registered terms: {', '.join(TERMS)}")
        for name, spec in self.schedules:
            if name not in TERMS:
                raise ValueError(f"schedule for unknown loss term {name!r}; registered terms: {', '.join(TERMS)}")
            parse_schedule(spec)

    def __getattr__(self, name: str) -> Any:
        weights = self.__dict__.get("term_weights")
        if weights is not None and name in weights:
            return weights[name]
        raise AttributeError(name)

    @classmethod
    def make(cls, **kw) -> "LossConfig":
        """A LossConfig from flat keywords: term names set weights (the rest
        keep DEFAULT_WEIGHTS), `schedules` a {term: spec} dict, and
        `kl_warmup_steps=N` is short for schedules={'kl': 'linear:N'}."""
        return cls().set(**kw)

    def set(self, **kw) -> "LossConfig":
        """A copy with the given weights (by term name), schedules and options changed."""
        weights = dict(self.term_weights)
        weights.update(kw.pop("weights", None) or {})
        schedules = dict(self.schedules)
        schedules.update(dict(kw.pop("schedules", None) or {}))
        if "kl_warmup_steps" in kw:
            schedules["kl"] = f"linear:{int(kw.pop('kl_warmup_steps'))}"
        for name in [k for k in kw if k not in _OPTIONS]:
            if name not in TERMS:
                raise ValueError(f"unknown loss option or term {name!r}; options: {', '.join(_OPTIONS)}; "
                                 f"terms: {', '.join(TERMS)}")
            weights[name] = kw.pop(name)
        schedules = {k: v for k, v in schedules.items() if parse_schedule(v)[0] != "constant"}
        return self.replace(term_weights=weights, schedules=tuple(sorted(schedules.items())), **kw)

    def weights(self) -> dict[str, Any]:
        return dict(self.term_weights)

    def schedule(self, name: str) -> str:
        return dict(self.schedules).get(name, "constant")


def from_config(loss: Mapping[str, Any]) -> LossConfig:
    """The LossConfig of a config's `loss` section.

    A section without `weights` is a run written before terms were declared
    once (weights as top-level fields, `kl_warmup_steps`, per-value mean
    reconstruction): it is read with the reduction it was trained with,
    'mean', unless it names one."""
    d = dict(loss)
    if "weights" not in d:
        weights = {k: d.pop(k) for k in list(d) if k in TERMS}
        d.setdefault("reduction", "mean")
        d.setdefault("reconstruction_kind", "l2")
        return LossConfig.make(weights=weights, **d)
    return LossConfig.make(**d)


def _is_concrete_zero(w: Any) -> bool:
    return isinstance(w, (int, float)) and w == 0


def total_loss(
    outputs: Mapping[str, jax.Array],
    batch: Mapping[str, Any],
    config: LossConfig,
    step: int | jax.Array = 0,
    axis_name: str | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Weighted sum of the registered terms a model has outputs for.

    outputs: a model's output dict (see `dlvae_jax.models`): `logits_Bx2`,
      optionally `mask_logits_BxHxW`, and for the VAE model `latent_means`,
      `latent_logvars` (dicts keyed pp, pv, qq, qv), optionally
      `free_latent_means` / `free_latent_logvars` (dlvae_cnn's label-free
      posterior) and the decoded views `recon_b1_logits_BxHxWxC`,
      `recon_b2_logits_BxHxWxK` (and `free_recon_*` of the label-free
      posterior), `latent_logits_Bx2`.
    batch: `image_BxHxWxC` in [0, 1], `clusters_BxHxW` int, `label_B` int 0/1,
      optional `mask_BxHxW` in {0, 1} (segmentation is skipped without it),
      optional `valid_B` bool (rows where it is false, e.g. evaluation
      padding, are left out of every batch mean).
    step: training step, for the schedules.
    axis_name: the device axis when the loss runs per device (shard_map,
      pmap): terms that are not means of per-example values (free bits) are
      then decided on the global batch.

    Returns (total float32 scalar, logs): logs hold each computed term
    unweighted under its name, its extra values (`kl_nats`, `kl_free_nats`,
    `segmentation_dice`, `segmentation_bce`), `<name>_beta` for every
    scheduled term, and `total`.
    """
    logs: dict[str, jax.Array] = {}
    ctx = TermContext(valid_B=batch.get("valid_B"), axis_name=axis_name)
    total = jnp.zeros((), jnp.float32)
    for name, weight in config.term_weights.items():
        value = TERMS[name](outputs, batch, config, ctx)
        if value is None:
            continue
        if isinstance(value, tuple):
            value, extra = value
            logs.update(extra)
        logs[name] = value
        spec = config.schedule(name)
        factor = None
        if spec != "constant":
            factor = logs[f"{name}_beta"] = schedule_factor(spec, step)
        if _is_concrete_zero(weight):
            continue
        contribution = weight * value
        total = total + (contribution if factor is None else contribution * factor)
    logs["total"] = total
    return total, logs
