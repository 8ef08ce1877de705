"""The train state: one pytree holding everything a step reads and writes."""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

from dlvae_jax.models import init_variables
from dlvae_jax.models.registry import abstract_variables


@flax.struct.dataclass
class TrainState:
    """step int32 scalar; params and batch_stats ({} for models without batch
    norm) as Flax collections; opt_state of the optax transform; key the run's
    PRNG key as raw uint32 data [2] (plain arrays checkpoint everywhere; the
    step wraps it back into a typed key)."""

    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    key: jax.Array

    def variables(self) -> dict[str, Any]:
        return {"params": self.params, **({"batch_stats": self.batch_stats} if self.batch_stats else {})}


def create_state(model, tx: optax.GradientTransformation, key: jax.Array, example_inputs: dict) -> TrainState:
    """Initializes the model from `key` (a typed PRNG key) on `example_inputs`."""
    init_key, run_key = jax.random.split(key)
    variables = init_variables(model, init_key, example_inputs)
    params = variables["params"]
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=variables.get("batch_stats", {}),
        opt_state=tx.init(params),
        key=jax.random.key_data(run_key),
    )


def abstract_state(model, tx: optax.GradientTransformation, example_inputs: dict) -> TrainState:
    """The state's shapes and dtypes without computing anything (a restore template)."""
    variables = abstract_variables(model, example_inputs)
    params = variables["params"]
    return TrainState(
        step=jax.ShapeDtypeStruct((), jnp.int32),
        params=params,
        batch_stats=variables.get("batch_stats", {}),
        opt_state=jax.eval_shape(tx.init, params),
        key=jax.ShapeDtypeStruct((2,), jnp.uint32),
    )
