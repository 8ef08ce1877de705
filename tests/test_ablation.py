"""Loss variants trained at once with vmap (dlvae_jax.train.ablation) against
each variant trained alone with the ordinary train step."""

from __future__ import annotations

import functools

import jax
import numpy as np
import optax
import pytest

from dlvae_jax.data.augment import AugmentConfig
from dlvae_jax.losses import LossConfig
from dlvae_jax.models import example_inputs, get_model
from dlvae_jax.train import ablation
from dlvae_jax.train.state import create_state
from dlvae_jax.train.step import PrepConfig, train_step

S, B = 32, 8


def _batches(n: int):
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:S, :S]
    out = []
    for t in range(n):
        masks = np.stack([((yy - 10 - (i + t) % 7) ** 2 + (xx - 14) ** 2 < 20 + i) for i in range(B)]).astype(np.uint8)
        masks[t % 3::3] = 0
        images = (rng.integers(20, 120, (B, S, S, 1)) + 100 * masks[..., None]).astype(np.uint8)
        out.append({"image_BxHxWxC": images, "mask_BxHxW": masks,
                    "label_B": masks.reshape(B, -1).any(1).astype(np.int32),
                    "valid_B": np.ones(B, bool), "index_B": np.arange(t * B, (t + 1) * B, dtype=np.int32)})
    return out


def _max_diff(a, b) -> float:
    d = jax.tree_util.tree_map(lambda x, y: float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64)))),
                               a, b)
    return max(jax.tree_util.tree_leaves(d))


def _setup(opt: str):
    model = get_model("dlvae_cnn", features=4, levels=2, vae_features=4, vae_levels=2, specific_dim=4, shared_dim=4)
    # Clipped, small steps: unclipped SGD on this tiny model diverges within 3
    # steps, and a diverging run turns float rounding into large differences.
    # Adam with eps=1e-3: its first step is lr * g / (|g| + eps), which for a
    # gradient that is zero up to rounding is +-lr with the default eps=1e-8.
    tx = optax.chain(optax.clip_by_global_norm(1.0),
                     optax.sgd(0.01) if opt == "sgd" else optax.adamw(1e-3, eps=1e-3, weight_decay=1e-4))
    prep, augment = PrepConfig(image_size=S, n_init=1), AugmentConfig()
    base = LossConfig.make(kl_warmup_steps=2)
    # Per pixel, the KL of 3 steps barely moves these tiny weights: the
    # variants change terms that do.
    variants = [base, base.set(reconstruction=0.0), base.set(cosine=0.0), base.set(latent_classification=3.0)]
    state0 = jax.device_get(create_state(model, tx, jax.random.key(3), example_inputs(2, S, 1)))
    return model, tx, prep, augment, variants, state0


@functools.lru_cache(maxsize=None)
def _alone(opt: str):
    """Reference: the ordinary step, one variant at a time, weights as Python
    numbers (a zero weight drops its term there)."""
    model, tx, prep, augment, variants, state0 = _setup(opt)
    alone = []
    for cfg in variants:
        step = jax.jit(functools.partial(train_step, model=model, tx=tx, loss_cfg=cfg, prep=prep, augment=augment))
        st = state0
        for b in _batches(3):
            st, m = step(st, b)
        alone.append((jax.device_get(st), float(m["total"])))
    return alone


# vmap (slow on XLA:CPU: grouped convolutions) once; the optimizer state is checked under map.
@pytest.mark.parametrize("opt,mode", [("sgd", "vmap"), ("adamw", "map")])
def test_stacked_variants_equal_each_variant_trained_alone(opt, mode):
    model, tx, prep, augment, variants, state0 = _setup(opt)
    batches = _batches(3)
    alone = _alone(opt)

    vstep = ablation.variant_step(model, tx, prep, augment, donate=False, mode=mode)
    many = ablation.stack_states(state0, len(variants))
    losses = ablation.stack_losses(variants)
    for b in batches:
        many, metrics = vstep(many, b, losses)
    many = jax.device_get(many)
    assert int(many.step) == len(batches) and np.asarray(many.key).shape == (2,)
    tol = 1e-5 if opt == "sgd" else 3e-4  # Adam divides by |g| + eps: rounding in small gradients grows
    for i, (ref, total) in enumerate(alone):
        got = ablation.variant_state(many, i)
        assert int(got.step) == len(batches)
        assert _max_diff((got.params, got.batch_stats), (ref.params, ref.batch_stats)) <= tol, i
        assert abs(float(metrics["total"][i]) - total) <= 1e-4 * max(1.0, abs(total)), i
    # The variants really differ, by five times the tolerance or more: removing a term
    # or changing a weight moves the weights.
    for i in (1, 2, 3):
        assert _max_diff(alone[i][0].params, alone[0][0].params) > 5 * tol, i


def test_loss_variants_cover_each_vae_term_and_a_kl_sweep():
    v = ablation.loss_variants(LossConfig.make())
    assert len(v) >= 8
    zeroed = {name: [t for t, w in cfg.weights().items() if w == 0] for name, cfg in v.items()}
    assert sorted(t for ts in zeroed.values() for t in ts) == sorted(
        ["kl", "reconstruction", "cosine", "latent_classification"])
    assert len({cfg.kl for cfg in v.values()}) >= 5
    # full, 4 terms removed, free bits, then 0.1 and 3: 0 and 1 are not repeated
    assert len(ablation.loss_variants(LossConfig.make(), (0.0, 0.1, 0.1, 1.0, 3.0))) == 8
    with pytest.raises(ValueError, match="static"):
        ablation.stack_losses([LossConfig.make(), LossConfig.make(kl_warmup_steps=5)])
    # Variants are overrides of the base, which keeps its schedules; a variant
    # that changes a static field cannot be stacked and is left out.
    cyc = ablation.loss_variants(LossConfig.make(schedules={"kl": "cyclical:200"}), (),
                                 {**ablation.VARIANTS, "linear KL": {"schedules": {"kl": "linear:10"}}})
    assert cyc["free bits 0.25"].free_bits == 0.25 and cyc["free bits 0.25"].schedule("kl") == "cyclical:200"
    assert "linear KL" not in cyc
