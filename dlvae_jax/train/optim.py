"""The optimizer from the config: AdamW with linear warm-up and cosine decay,
global-norm gradient clipping, optional gradient accumulation (optax)."""

from __future__ import annotations

import optax


def learning_rate_schedule(opt, total_steps: int) -> optax.Schedule:
    warmup = max(0, min(int(opt.warmup_steps), max(total_steps - 1, 0)))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=float(opt.learning_rate), warmup_steps=warmup,
        decay_steps=max(total_steps, warmup + 1), end_value=float(opt.learning_rate) * float(opt.end_lr_factor))


def make_optimizer(opt, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """(transform, schedule). `total_steps` counts optimizer updates; with
    `accumulate_steps` > 1 each update averages that many micro-batches."""
    schedule = learning_rate_schedule(opt, total_steps)
    parts = []
    if opt.clip_norm and opt.clip_norm > 0:
        parts.append(optax.clip_by_global_norm(float(opt.clip_norm)))
    parts.append(optax.adamw(schedule, b1=float(opt.b1), b2=float(opt.b2), weight_decay=float(opt.weight_decay)))
    tx = optax.chain(*parts)
    if int(opt.accumulate_steps) > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=int(opt.accumulate_steps))
    return tx, schedule
