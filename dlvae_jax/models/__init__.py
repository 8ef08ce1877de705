"""Models of dlvae-jax (Flax Linen): DL-VAE-CNN and the baselines.

All models share one interface; see `registry` and docs/models.md.
"""

from dlvae_jax.models.registry import (
    MODEL_NAMES,
    MODELS,
    abstract_variables,
    apply_model,
    count_params,
    example_inputs,
    forward_flops,
    get_model,
    init_variables,
    rngs_for,
)

__all__ = [
    "MODEL_NAMES",
    "MODELS",
    "abstract_variables",
    "apply_model",
    "count_params",
    "example_inputs",
    "forward_flops",
    "get_model",
    "init_variables",
    "rngs_for",
]
