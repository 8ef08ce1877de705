"""Several loss variants of one model trained at once: `jax.vmap` (or
`jax.lax.map`) over a leading variant axis, inside one jit.

    states = stack([state] * V)                  # params, batch stats, optimizer states: [V, ...]
    losses = stack([LossConfig(...), ...])       # loss weights: [V]
    step = variant_step(model, tx, prep, augment, lr_schedule)
    states, metrics = step(states, batch, losses)   # metrics: [V] each

Every variant reads the same batch and the same PRNG keys (the step counter
and the run key are shared, not stacked), so the augmentation, the resizing
and the K-means views of a batch are computed once for all variants, and a
variant's trajectory is the one `train_step` gives it alone with the same
seed: `sequential_step` is that single-variant step, jitted once and called
with each variant's state and weights in turn, for comparison.

Loss weights are traced values here, so a zero weight multiplies its term
instead of dropping it (see `dlvae_jax.losses.LossConfig`); a variant whose
removed term turned NaN would show NaN.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp

from dlvae_jax.losses import LossConfig
from dlvae_jax.train.state import TrainState
from dlvae_jax.train.step import train_step


def stack(trees: Sequence[Any]) -> Any:
    """Stacks pytrees of the same structure on a new leading axis."""
    return jax.tree_util.tree_map(lambda *xs: jnp.stack([jnp.asarray(x) for x in xs]), *trees)


def unstack(tree: Any, i: int) -> Any:
    """Variant i of a stacked pytree."""
    return jax.tree_util.tree_map(lambda x: x[i], tree)


def stack_states(state: TrainState, n: int) -> TrainState:
    """n copies of `state` as one variant-stacked state; step and key stay shared (unstacked)."""
    many = stack([state] * n)
    return many.replace(step=state.step, key=state.key)


def variant_state(states: TrainState, i: int) -> TrainState:
    """Variant i of a stacked state, as a plain TrainState (shared step and key kept)."""
    one = unstack(states.replace(step=None, key=None), i)
    return one.replace(step=states.step, key=states.key)


_STATE_AXES = TrainState(step=None, params=0, batch_stats=0, opt_state=0, key=None)


def _step(state, batch, loss_cfg, *, model, tx, prep, augment, lr_schedule):
    return train_step(state, batch, model=model, tx=tx, loss_cfg=loss_cfg, prep=prep, augment=augment,
                      lr_schedule=lr_schedule)


MODES = ("vmap", "map")


def variant_step(model, tx, prep, augment, lr_schedule=None, donate: bool = True, mode: str = "vmap") -> Callable:
    """One jitted step of every variant over (stacked state, shared batch, stacked LossConfig).

    mode "vmap": `jax.vmap` over the variant axis, so each layer runs once on
    all variants (a convolution with stacked weights becomes one grouped
    convolution). mode "map": `jax.lax.map` over the variants inside the same
    jit, the variants one after another in one program. Both share the
    batch's preprocessing and give the same numbers; which is faster depends
    on the backend (grouped convolutions are a slow path of XLA:CPU).
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    fn = functools.partial(_step, model=model, tx=tx, prep=prep, augment=augment, lr_schedule=lr_schedule)
    if mode == "vmap":
        mapped = jax.vmap(fn, in_axes=(_STATE_AXES, None, 0), out_axes=(_STATE_AXES, 0))
    else:
        def mapped(states, batch, losses):
            def one(args):
                per_state, loss_cfg = args
                new, metrics = fn(per_state.replace(step=states.step, key=states.key), batch, loss_cfg)
                return new.replace(step=None, key=None), metrics

            stacked, metrics = jax.lax.map(one, (states.replace(step=None, key=None), losses))
            return stacked.replace(step=states.step + 1, key=states.key), metrics
    return jax.jit(mapped, donate_argnums=(0,) if donate else ())


def sequential_step(model, tx, prep, augment, lr_schedule=None, donate: bool = True) -> Callable:
    """jit(train_step) with the loss weights as traced arguments: one compile serves every variant."""
    fn = functools.partial(_step, model=model, tx=tx, prep=prep, augment=augment, lr_schedule=lr_schedule)
    return jax.jit(fn, donate_argnums=(0,) if donate else ())


# The ablation's variants, as config overrides of the `loss` section.
VARIANTS = {
    "no KL (Eq. 6)": {"weights": {"kl": 0.0}},
    "no reconstruction (Eq. 7)": {"weights": {"reconstruction": 0.0}},
    "no cosine (Eq. 8)": {"weights": {"cosine": 0.0}},
    "no latent classifier (Eq. 9)": {"weights": {"latent_classification": 0.0}},
    "free bits 0.25": {"free_bits": 0.25},
}
# A variant that changes a schedule (e.g. {"schedules": {"kl": "cyclical:200"}})
# changes a static field: it cannot share the stacked step, train it apart.


def loss_variants(base: LossConfig, kl_sweep: Sequence[float] = (0.1, 0.3, 3.0, 10.0),
                  variants: dict[str, dict] | None = None) -> dict[str, LossConfig]:
    """The full loss and each variant of `variants` (default `VARIANTS`, each
    a set of `LossConfig.set` overrides), plus a sweep of the KL weight.
    Variants whose static fields (schedules, kinds) differ from the base are
    left out: they cannot be stacked with it (train them apart)."""
    out = {"full": base}
    for name, change in (VARIANTS if variants is None else variants).items():
        cfg = base.set(**change)
        if _statics(cfg) == _statics(base):
            out[name] = cfg
    for beta in sorted(set(float(b) for b in kl_sweep)):
        if beta not in (0.0, float(base.kl)):  # 0 is "no KL", base.kl is "full"
            out[f"KL weight {beta:g}"] = base.set(kl=beta)
    return out


def _statics(cfg: LossConfig) -> tuple:
    return cfg.schedules, cfg.reconstruction_kind, cfg.reduction, cfg.dice_kind


def stack_losses(cfgs: Sequence[LossConfig]) -> LossConfig:
    """Stacks LossConfigs (weights become float32 [V]); static fields must agree."""
    statics = {_statics(c) for c in cfgs}
    if len(statics) != 1:
        raise ValueError(f"loss variants differ in static fields (schedules, reconstruction_kind, reduction, dice_kind): {statics}")
    names = {tuple(sorted(c.term_weights)) for c in cfgs}
    if len(names) != 1:
        raise ValueError(f"loss variants weigh different terms: {names}")
    cfgs = [c.replace(term_weights={k: float(v) for k, v in c.term_weights.items()},
                      free_bits=float(c.free_bits), seg_dice_weight=float(c.seg_dice_weight),
                      seg_bce_weight=float(c.seg_bce_weight), dice_smooth=float(c.dice_smooth)) for c in cfgs]
    return jax.tree_util.tree_map(lambda *xs: jnp.asarray(xs, jnp.float32), *cfgs)
