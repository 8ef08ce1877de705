"""The train step and the eval step: pure module-level functions.

    train_step(state, batch, *, model, tx, loss_cfg, prep, augment, axis_name=None)
        -> (state, metrics)
    eval_outputs(variables, batch, *, model, prep, eval_key, axis_name=None)
        -> {"prob_BxHxW", "tumor_prob_B"} at the batch's own resolution

`batch` follows the contract of `dlvae_jax.data.pipeline` (raw uint8 slices).
The model's inputs are made here, on the device, in the order of the paper:
augmentation of the raw slice and mask (training only), resizing to the
model's side, histogram equalization inside the head (Eq. 1) and K-means
(Eqs. 2-3) giving the views B1 and B2, then the model. Every per-example
random choice (augmentation, K-means restarts, and the model's VAE noise,
label dropout and dropout) is keyed by `fold_in(key, index_B)`, so an
example's draws depend on neither its batch neighbours nor the device it is on.
The step's key is `fold_in(run key, step)`.

With `axis_name` (shard_map / pmap) gradients and metrics are averaged over
that axis with `lax.pmean`; batch-norm statistics are averaged inside the
model (`norm_axis_name`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from dlvae_jax.data.augment import AugmentConfig, augment_example
from dlvae_jax.losses import LossConfig, kl_per_dim, total_loss
from dlvae_jax.models import apply_model
from dlvae_jax.ops import equalize_hist
from dlvae_jax.ops.classical import model_views


@dataclasses.dataclass(frozen=True)
class PrepConfig:
    """How raw slices become model inputs (hashable: a static argument)."""

    image_size: int = 256
    equalize: str = "head"
    k: int = 4
    n_init: int = 3


def _per_example_keys(key: jax.Array, index_B: jax.Array) -> jax.Array:
    return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, index_B)


def mask_to_model_size(mask_BxHxW: jax.Array, size: int) -> jax.Array:
    """A binary mask resized as training resizes it (linear with antialiasing, then > 0.5): bool [B, size, size]."""
    b = mask_BxHxW.shape[0]
    return jax.image.resize(mask_BxHxW.astype(jnp.float32), (b, size, size), "linear", antialias=True) > 0.5


def prob_to_data_size(prob_BxHxW: jax.Array, h: int, w: int) -> jax.Array:
    """Model-size probabilities resized back to the data's size (linear), as every metric sees them."""
    if prob_BxHxW.shape[1:] == (h, w):
        return prob_BxHxW
    return jax.image.resize(prob_BxHxW, (prob_BxHxW.shape[0], h, w), "linear")


def prepare_inputs(batch: dict[str, jax.Array], key: jax.Array, prep: PrepConfig,
                   augment: AugmentConfig | None = None) -> dict[str, jax.Array]:
    """Raw batch -> model inputs.

    batch: `image_BxHxWxC` uint8, `mask_BxHxW` uint8 {0, 1}, `index_B`,
    `valid_B` (see the data contract). Returns `image_BxHxWxC` float32 in
    [0, 1] (each channel equalized inside the head), `clusters_BxHxW` int32
    (0 darkest .. k-1; -1 outside the head with equalize="head", which the
    model's one-hot turns into an all-zero background), `mask_BxHxW` float32,
    `label_B` int32 (recomputed after augmentation and resizing, so a tumor
    moved out of the frame is labelled "no tumor"), `valid_B` and `index_B`,
    all at `prep.image_size`.
    """
    image = batch["image_BxHxWxC"]
    b, h, w, c = image.shape
    mask = batch["mask_BxHxW"] if batch.get("mask_BxHxW") is not None else jnp.zeros((b, h, w), jnp.uint8)
    valid_B = batch["valid_B"] if batch.get("valid_B") is not None else jnp.ones((b,), bool)
    keys_B = _per_example_keys(key, batch["index_B"])
    aug_keys, view_keys = jax.vmap(jax.random.split, out_axes=1)(keys_B)
    if augment is not None:
        image, mask = jax.vmap(lambda k, im, m: augment_example(k, im, m, augment))(aug_keys, image, mask)
    else:
        image = image.astype(jnp.float32) / 255.0
    s = prep.image_size
    if image.shape[1:3] != (s, s):
        image = jax.image.resize(image, (b, s, s, c), "linear", antialias=True)
        mask = mask_to_model_size(mask, s)
    image_u8 = jnp.round(jnp.clip(image, 0.0, 1.0) * 255.0).astype(jnp.uint8)
    flair = image_u8[..., 1 if c == 3 else 0]
    head, flair_eq, clusters = model_views(flair, view_keys, k=prep.k, n_init=prep.n_init, equalize=prep.equalize)
    if c == 3:
        region = head if prep.equalize == "head" else None
        eq = jnp.stack([equalize_hist(image_u8[..., i], region) for i in range(c)], axis=-1)
    else:
        eq = flair_eq[..., None]
    mask = mask.astype(jnp.float32)
    return {
        "image_BxHxWxC": eq.astype(jnp.float32) / 255.0,
        "clusters_BxHxW": clusters.labels,
        "mask_BxHxW": mask,
        "label_B": jnp.any(mask > 0, axis=(1, 2)).astype(jnp.int32),
        "valid_B": valid_B,
        "index_B": batch["index_B"],
    }


def _pmean(tree, axis_name):
    return tree if axis_name is None else jax.lax.pmean(tree, axis_name)


def train_step(state, batch: dict[str, jax.Array], *, model: nn.Module, tx: optax.GradientTransformation,
               loss_cfg: LossConfig, prep: PrepConfig, augment: AugmentConfig | None,
               lr_schedule=None, axis_name: str | None = None):
    """One optimizer step on a global batch; returns (new state, metrics dict of scalars)."""
    step_key = jax.random.fold_in(jax.random.wrap_key_data(state.key), state.step)
    prep_key, model_key = jax.random.split(step_key)
    inputs = prepare_inputs(batch, prep_key, prep, augment)

    def loss_fn(params):
        variables = {**state.variables(), "params": params}
        outputs, new_variables = apply_model(model, variables, inputs, train=True, key=model_key)
        total, logs = total_loss(outputs, inputs, loss_cfg, state.step, axis_name)
        return total, (logs, new_variables.get("batch_stats", {}))

    (_, (logs, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    grads = _pmean(grads, axis_name)
    logs = _pmean(logs, axis_name)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    # A finite loss can still come with an update that overflows: the loop checks
    # this flag too before it saves the new parameters.
    finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(params)]))
    metrics = dict(logs, grad_norm=optax.global_norm(grads), params_finite=finite.astype(jnp.float32))
    if lr_schedule is not None:
        metrics["learning_rate"] = lr_schedule(state.step)
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state, batch_stats=batch_stats)
    return new_state, metrics


PROBES = ("zeros", "shuffle", "prior")


def _probabilities(outputs, b: int, h: int, w: int) -> tuple[jax.Array, jax.Array]:
    if outputs.get("mask_logits_BxHxW") is not None:
        prob = prob_to_data_size(jax.nn.sigmoid(outputs["mask_logits_BxHxW"].astype(jnp.float32)), h, w)
    else:
        prob = jnp.zeros((b, h, w), jnp.float32)
    return prob, jax.nn.softmax(outputs["logits_Bx2"].astype(jnp.float32))[:, 1]


def eval_outputs(variables: dict[str, Any], batch: dict[str, jax.Array], *, model: nn.Module, prep: PrepConfig,
                 eval_key: jax.Array, axis_name: str | None = None, diagnostics: bool = False) -> dict[str, jax.Array]:
    """Deterministic inference on a raw batch: `prob_BxHxW` float32 tumor
    probability per pixel, resized back to the batch's H x W (zeros for models
    without a mask head), and `tumor_prob_B` float32 (the class head's
    softmax). Every slice's K-means restarts use `eval_key` itself, so a
    slice's prediction depends on neither its batch nor its position.

    diagnostics (models with a VAE latent): also the label-free posterior's
    `latent_mean_BxD` and per-dimension KL `latent_kl_BxD` (nats), and the
    latent probe: `probe_<name>_prob_BxHxW` / `probe_<name>_tumor_prob_B`
    with the CNN's z replaced by zeros, by the z of another slice of the
    batch (rolled by one row), or by a draw of the prior N(0, I) (keyed by
    `eval_key` and the row). A latent the CNN does not use changes nothing.
    The shuffled and prior probes depend on how the slices are batched (a
    slice gets its neighbour's z, a row's draw), so they are diagnostics, not
    figures to compare across batch sizes.
    """
    del axis_name  # inference needs no cross-device reduction
    key = jax.random.wrap_key_data(eval_key) if not jax.dtypes.issubdtype(eval_key.dtype, jax.dtypes.prng_key) \
        else eval_key
    b = batch["image_BxHxWxC"].shape[0]
    batch = {**batch, "index_B": jnp.zeros((b,), jnp.int32)}
    inputs = prepare_inputs(batch, key, prep, None)
    inputs = {k: v for k, v in inputs.items() if k not in ("label_B", "mask_BxHxW")}  # never seen at inference
    outputs, _ = apply_model(model, variables, inputs, train=False)
    h, w = batch["image_BxHxWxC"].shape[1:3]
    prob, tumor_prob = _probabilities(outputs, b, h, w)
    result = {"prob_BxHxW": prob, "tumor_prob_B": tumor_prob}
    if diagnostics and "latent_means" in outputs:
        means = outputs.get("free_latent_means", outputs["latent_means"])
        logvars = outputs.get("free_latent_logvars", outputs["latent_logvars"])
        result["latent_mean_BxD"] = jnp.concatenate([means[n] for n in means], axis=-1).astype(jnp.float32)
        result["latent_kl_BxD"] = jnp.concatenate([kl_per_dim(means[n], logvars[n]) for n in means], axis=-1)
        z_BxD = outputs["z_BxD"]
        rows_B = jnp.arange(b)
        prior = jax.vmap(lambda r: jax.random.normal(jax.random.fold_in(jax.random.fold_in(key, 0x5EED), r),
                                                     z_BxD.shape[1:]))(rows_B)
        probes = {"zeros": jnp.zeros_like(z_BxD), "shuffle": jnp.roll(z_BxD, 1, axis=0), "prior": prior}
        for name in PROBES:
            probed, _ = apply_model(model, variables, dict(inputs, z_BxD=probes[name]), train=False)
            result[f"probe_{name}_prob_BxHxW"], result[f"probe_{name}_tumor_prob_B"] = _probabilities(probed, b, h, w)
    return result
