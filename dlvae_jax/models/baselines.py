"""Baselines the paper compares against (Rao et al., Section V, refs [25]-[27]),
plus the U-Net of Buda et al. (2019), all with the DL-VAE-CNN interface.

Every model is called as `model.apply(variables, inputs, train=...)` with
`inputs['image_BxHxWxC']` (float in [0, 1]; `clusters_BxHxW` and `label_B`
are accepted and ignored) and returns a dict with `logits_Bx2` (float32) and,
for models with a decoder (only `unet`), `mask_logits_BxHxW`.

The cited papers do not give every layer for 256x256 LGG slices; the
architectures below follow their described structure, and the choices made
here are stated in each docstring.
"""

from __future__ import annotations

from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from dlvae_jax.models.layers import (
    ClassifierHead,
    RowDropout,
    ConvNormAct,
    DoubleConv,
    Dtype,
    Norm,
    UNetDecoder,
    max_pool2x,
)


class CNNBaseline(nn.Module):
    """'cnn': a plain CNN classifier in the manner of Mahjoubi et al. [25]:
    `blocks` x (3x3 conv -> ReLU -> 2x2 max pool) with widths
    features * (1, 2, 4, 4, ...), then flatten -> Dense(hidden) -> ReLU ->
    dropout -> Dense(2). No normalization by default (as in [25])."""

    description: ClassVar[str] = "plain conv/pool CNN classifier after Mahjoubi et al. [25]; class"  # shown by `dlvae-jax models`
    outputs_mask: ClassVar[bool] = False  # `mask_logits_BxHxW` among the outputs

    features: int = 32
    blocks: int = 4
    hidden: int = 128
    dropout: float = 0.5
    norm: str = "none"
    norm_axis_name: str | None = None
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, inputs: dict[str, Any], train: bool = False) -> dict[str, jax.Array]:
        x = inputs["image_BxHxWxC"].astype(self.dtype)
        for i in range(self.blocks):
            x = ConvNormAct(self.features * 2 ** min(i, 2), norm=self.norm, norm_axis_name=self.norm_axis_name, dtype=self.dtype)(x, train)
            x = max_pool2x(x)
        h = x.reshape(x.shape[0], -1)
        h = nn.relu(nn.Dense(self.hidden, dtype=self.dtype, param_dtype=jnp.float32)(h))
        h = RowDropout(self.dropout)(h, not train, inputs.get("index_B"))
        logits = nn.Dense(2, dtype=self.dtype, param_dtype=jnp.float32)(h)
        return {"logits_Bx2": logits.astype(jnp.float32)}


VGG16_LAYOUT = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


class VGG16(nn.Module):
    """'vgg16': the 13 conv layers of VGG16 (Simonyan & Zisserman), as used by
    Alshammari [26], widths scaled by features / 64.

    Choices: batch norm after each conv (trainable from scratch on a small
    data set; set norm='none' for the original), and a global-average-pool
    head (Dense(hidden) -> dropout -> Dense(2)) instead of the 4096-wide FC
    layers, which would hold ~134M parameters at 256x256.
    """

    description: ClassVar[str] = "VGG16 conv stack (13 convs, batch norm, GAP head) after Alshammari [26]; class"  # shown by `dlvae-jax models`
    outputs_mask: ClassVar[bool] = False  # `mask_logits_BxHxW` among the outputs

    features: int = 64
    hidden: int = 256
    dropout: float = 0.5
    norm: str = "batch"
    norm_axis_name: str | None = None
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, inputs: dict[str, Any], train: bool = False) -> dict[str, jax.Array]:
        x = inputs["image_BxHxWxC"].astype(self.dtype)
        for item in VGG16_LAYOUT:
            if item == "M":
                x = max_pool2x(x)
            else:
                x = ConvNormAct(item * self.features // 64, norm=self.norm, norm_axis_name=self.norm_axis_name, dtype=self.dtype)(x, train)
        logits = ClassifierHead(self.hidden, self.dropout, dtype=self.dtype)(x, train, index_B=inputs.get("index_B"))
        return {"logits_Bx2": logits}


class ResidualBlock(nn.Module):
    """Basic residual block (He et al., 2016): two 3x3 conv-norm with an
    identity (or 1x1 strided projection) shortcut, ReLU after the sum."""

    features: int
    strides: int = 1
    norm: str = "batch"
    norm_axis_name: str | None = None
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        y = ConvNormAct(self.features, strides=self.strides, norm=self.norm, norm_axis_name=self.norm_axis_name, dtype=self.dtype)(x, train)
        y = nn.Conv(self.features, (3, 3), padding="SAME", use_bias=False, dtype=self.dtype, param_dtype=jnp.float32)(y)
        y = Norm(self.norm, axis_name=self.norm_axis_name, dtype=self.dtype)(y, train)
        if self.strides != 1 or x.shape[-1] != self.features:
            x = nn.Conv(
                self.features,
                (1, 1),
                strides=(self.strides, self.strides),
                use_bias=False,
                dtype=self.dtype,
                param_dtype=jnp.float32,
                name="shortcut",
            )(x)
            x = Norm(self.norm, axis_name=self.norm_axis_name, dtype=self.dtype, name="shortcut_norm")(x, train)
        return nn.relu(x + y)


class DCNN(nn.Module):
    """'dcnn': a deeper residual CNN after Alzubaidi et al. [27] (who stack
    convolutions with shortcut connections): a strided 3x3 stem, then four
    stages of `blocks_per_stage` residual blocks with widths
    features * (1, 2, 4, 8), each stage after the first halving the
    resolution, then global average pooling -> Dense(2)."""

    description: ClassVar[str] = "deeper residual CNN after Alzubaidi et al. [27]; class"  # shown by `dlvae-jax models`
    outputs_mask: ClassVar[bool] = False  # `mask_logits_BxHxW` among the outputs

    features: int = 32
    blocks_per_stage: int = 2
    norm: str = "batch"
    norm_axis_name: str | None = None
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, inputs: dict[str, Any], train: bool = False) -> dict[str, jax.Array]:
        x = inputs["image_BxHxWxC"].astype(self.dtype)
        x = ConvNormAct(self.features, strides=2, norm=self.norm, norm_axis_name=self.norm_axis_name, dtype=self.dtype)(x, train)
        for stage in range(4):
            for block in range(self.blocks_per_stage):
                strides = 2 if (stage > 0 and block == 0) else 1
                x = ResidualBlock(self.features * 2**stage, strides, self.norm, self.norm_axis_name, self.dtype)(x, train)
        h = jnp.mean(x, axis=(1, 2))
        logits = nn.Dense(2, dtype=self.dtype, param_dtype=jnp.float32)(h)
        return {"logits_Bx2": logits.astype(jnp.float32)}


class UNet(nn.Module):
    """'unet': the U-Net of Buda et al. (2019) for LGG FLAIR segmentation:
    `levels` encoder levels of DoubleConv (3x3 conv -> batch norm -> ReLU,
    twice) starting at `features` = 32 and doubling, 2x2 max pooling, a
    bottleneck at features * 2^levels, and a mirrored decoder with skip
    connections and a 1x1 conv to the mask logit.

    Choices: x2 nearest upsampling + 3x3 conv replaces the 2x2 transposed
    conv (same receptive field, faster on XLA:CPU), and a classification head
    (global average pool of the bottleneck -> Dense -> Dense(2)) is added so
    the model has the common `logits_Bx2` output.
    """

    description: ClassVar[str] = "U-Net of Buda et al. (32 features, 4 levels, batch norm) + GAP class head; class + mask"  # shown by `dlvae-jax models`
    outputs_mask: ClassVar[bool] = True  # `mask_logits_BxHxW` among the outputs

    features: int = 32
    levels: int = 4
    classifier_hidden: int = 128
    norm: str = "batch"
    norm_axis_name: str | None = None
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, inputs: dict[str, Any], train: bool = False) -> dict[str, jax.Array]:
        x = inputs["image_BxHxWxC"].astype(self.dtype)
        skips = []
        for level in range(self.levels):
            x = DoubleConv(self.features * 2**level, norm=self.norm, norm_axis_name=self.norm_axis_name, dtype=self.dtype)(x, train)
            skips.append(x)
            x = max_pool2x(x)
        x = DoubleConv(self.features * 2**self.levels, norm=self.norm, norm_axis_name=self.norm_axis_name, dtype=self.dtype)(x, train)
        logits = ClassifierHead(self.classifier_hidden, 0.0, dtype=self.dtype)(x, train)
        mask_logits = UNetDecoder(self.norm, self.norm_axis_name, self.dtype)(x, skips, train)
        return {"logits_Bx2": logits, "mask_logits_BxHxW": mask_logits}
