"""Model registry and the helpers every trainer needs (init, apply, FLOPs).

    model = get_model("unet", features=8, levels=2, dtype="bfloat16")
    variables = init_variables(model, jax.random.key(0), example_inputs(2, 32))
    outputs, variables = apply_model(model, variables, batch, train=True, key=step_key)
    loss, logs = losses.total_loss(outputs, batch, LossConfig.make(), step)
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dlvae_jax.errors import DlvaeError
from dlvae_jax.models.baselines import DCNN, VGG16, CNNBaseline, UNet
from dlvae_jax.models.cnn import DLVAECNN

MODELS: dict[str, type[nn.Module]] = {
    "dlvae_cnn": DLVAECNN,
    "cnn": CNNBaseline,
    "vgg16": VGG16,
    "dcnn": DCNN,
    "unet": UNet,
}
MODEL_NAMES = tuple(MODELS)
RNG_STREAMS = ("sample", "dropout")
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def get_model(name: str, **config: Any) -> nn.Module:
    """The model registered under `name`, built with `config` (its dataclass
    fields, e.g. features, levels, norm, dtype). `dtype` may be a string
    ('float32', 'bfloat16', 'float16'): it sets the computation dtype only;
    parameters stay float32. Raises DlvaeError for an unknown name or field."""
    if name not in MODELS:
        raise DlvaeError(f"unknown model {name!r}; known models: {', '.join(MODEL_NAMES)}")
    cls = MODELS[name]
    fields = {f.name for f in dataclasses.fields(cls)} - {"parent", "name"}
    unknown = sorted(set(config) - fields)
    if unknown:
        raise DlvaeError(f"model {name!r} has no option(s) {unknown}; options: {', '.join(sorted(fields))}")
    if isinstance(config.get("dtype"), str):
        if config["dtype"] not in _DTYPES:
            raise DlvaeError(f"unknown dtype {config['dtype']!r}; expected one of {', '.join(_DTYPES)}")
        config = dict(config, dtype=_DTYPES[config["dtype"]])
    return cls(**config)


def example_inputs(batch: int = 1, size: int = 256, channels: int = 3, label: bool = True) -> dict[str, Any]:
    """Zero-filled inputs of the shapes and dtypes models expect (for init and
    FLOPs); all-zero cluster ids are valid for any number of clusters.

    `image_BxHxWxC` float32, `clusters_BxHxW` int32, `label_B` int32 (None
    when `label` is False, i.e. inference), `mask_BxHxW` float32.
    """
    return {
        "image_BxHxWxC": jnp.zeros((batch, size, size, channels), jnp.float32),
        "clusters_BxHxW": jnp.zeros((batch, size, size), jnp.int32),
        "label_B": jnp.zeros((batch,), jnp.int32) if label else None,
        "mask_BxHxW": jnp.zeros((batch, size, size), jnp.float32),
    }


def rngs_for(key: jax.Array) -> dict[str, jax.Array]:
    """One key per RNG stream a model may draw from in training."""
    return dict(zip(RNG_STREAMS, jax.random.split(key, len(RNG_STREAMS))))


def init_variables(model: nn.Module, key: jax.Array, inputs: dict[str, Any]) -> dict[str, Any]:
    """Jitted `model.init` (eager init of these models is several times slower).

    Initializes in training mode with the label present, so every submodule
    and the `batch_stats` collection (for batch-norm models) are created.
    On CPU the init program is compiled without backend optimization: it runs
    once, and LLVM's optimization of its many random-number kernels takes
    ~10x longer (measured 43 s vs 4 s for a tiny DL-VAE-CNN) than the
    unoptimized code takes to run.
    """
    pkey, skey = jax.random.split(key)
    options = {"xla_backend_optimization_level": 0} if jax.default_backend() == "cpu" else None

    def _init(pkey, skey, inputs):
        return model.init({"params": pkey, **rngs_for(skey)}, inputs, train=True)

    return jax.jit(_init, compiler_options=options)(pkey, skey, inputs)


def apply_model(
    model: nn.Module,
    variables: dict[str, Any],
    inputs: dict[str, Any],
    *,
    train: bool,
    key: jax.Array | None = None,
) -> tuple[dict[str, jax.Array], dict[str, Any]]:
    """Runs the model; returns (outputs, variables with updated batch stats).

    In training (`train=True`) `key` seeds the RNG streams ('sample',
    'dropout') and batch-norm statistics are updated; at inference the
    model is deterministic and `variables` come back unchanged. Pure, so it
    can be wrapped in jax.jit with `model` and `train` static.
    """
    rngs = rngs_for(key) if key is not None else None
    if train and "batch_stats" in variables:
        outputs, updates = model.apply(variables, inputs, train=True, rngs=rngs, mutable=["batch_stats"])
        return outputs, {**variables, **updates}
    return model.apply(variables, inputs, train=train, rngs=rngs), variables


def count_params(variables: dict[str, Any]) -> int:
    """Number of trainable parameters (the 'params' collection)."""
    return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(variables["params"])))


def forward_flops(model: nn.Module, variables: dict[str, Any], inputs: dict[str, Any], train: bool = False) -> float:
    """FLOPs of one forward pass as XLA counts them (a multiply-add is 2),
    from the lowered (not compiled) computation's cost analysis."""
    key = jax.random.key(0)
    fn: Callable = lambda v, x: apply_model(model, v, x, train=train, key=key if train else None)[0]
    cost = jax.jit(fn).lower(variables, inputs).cost_analysis()
    if isinstance(cost, (list, tuple)):  # older jax returned one dict per device
        cost = cost[0]
    return float(cost["flops"])


def abstract_variables(model: nn.Module, inputs: dict[str, Any]) -> dict[str, Any]:
    """Shapes/dtypes of the variables without computing them (jax.eval_shape)."""
    key = jax.random.key(0)
    return jax.eval_shape(lambda: model.init({"params": key, **rngs_for(key)}, inputs, train=True))
