"""Dual-view conditional VAE of DL-VAE-CNN (Rao et al., Section IV-D, Eqs. 4-5).

Two views of one slice:
  B1  the histogram-equalized slice, (B, H, W, C) float in [0, 1];
  B2  the K-means cluster map of the same slice, one-hot (B, H, W, K).
Each view's encoder, conditioned on the label Y, gives a view-specific latent
and a shared latent, each as a diagonal Gaussian (mean, log-variance):
  R_pp, R_pv (view B1) -> (mu_pp, logvar_pp), (mu_pv, logvar_pv)      Eq. 4
  R_qq, R_qv (view B2) -> (mu_qq, logvar_qq), (mu_qv, logvar_qv)      Eq. 5
(Eq. 4 as printed feeds B2 to R_pv; we read that as a typo, since pv is
view B1's shared component and Eq. 8 compares it with view B2's qv.)
Each decoder rebuilds its view from [specific, shared, Y]; a small MLP D
classifies the slice from the four latents (Eq. 9).

The label is a probability vector over three states {no tumor, tumor,
unknown}: one-hot of 0/1 when known, one-hot of 2 when unknown (inference,
or label dropout in training), or a soft mix (see `DLVAECNN`).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from dlvae_jax.models.layers import ConvNormAct, Dtype, example_index, row_normal, upsample2x_nearest

LATENT_NAMES = ("pp", "pv", "qq", "qv")
NUM_LABEL_STATES = 3  # 0 no tumor, 1 tumor, 2 unknown
UNKNOWN_LABEL = 2


def reparameterize(key: jax.Array, mean_BxD: jax.Array, logvar_BxD: jax.Array,
                   index_B: jax.Array | None = None) -> jax.Array:
    """z = mean + exp(logvar / 2) * eps with eps ~ N(0, I); row b's eps is drawn
    from fold_in(key, index_B[b]) (record indices; 0..B-1 by default)."""
    rows = example_index(index_B, mean_BxD.shape[0])
    eps = row_normal(key, rows, mean_BxD.shape).astype(mean_BxD.dtype)
    return mean_BxD + jnp.exp(0.5 * logvar_BxD) * eps


def _label_maps(y_Bx3: jax.Array, h: int, w: int, dtype: Dtype) -> jax.Array:
    """Broadcast the label vector to constant image channels (B, h, w, 3)."""
    return jnp.broadcast_to(y_Bx3[:, None, None, :].astype(dtype), (y_Bx3.shape[0], h, w, y_Bx3.shape[-1]))


class ViewEncoder(nn.Module):
    """R_{*p} and R_{*v} of one view: strided convs on [view, label maps], then
    Dense heads to the specific and the shared Gaussian.

    Returns four (B, D) float32 arrays: mean/logvar specific, mean/logvar shared.
    """

    specific_dim: int
    shared_dim: int
    features: int
    levels: int
    bottleneck_channels: int = 16
    norm: str = "batch"
    norm_axis_name: str | None = None
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, view_BxHxWxC: jax.Array, y_Bx3: jax.Array, train: bool):
        b, h, w, _ = view_BxHxWxC.shape
        x = jnp.concatenate([view_BxHxWxC.astype(self.dtype), _label_maps(y_Bx3, h, w, self.dtype)], axis=-1)
        for level in range(self.levels):
            x = ConvNormAct(self.features * 2**level, strides=2, norm=self.norm, norm_axis_name=self.norm_axis_name, dtype=self.dtype)(x, train)
        # A 1x1 conv narrows the channels before flattening, so the Dense heads
        # stay small (16x16x16 -> D at 256x256) while keeping spatial layout.
        x = ConvNormAct(self.bottleneck_channels, kernel=1, norm=self.norm, norm_axis_name=self.norm_axis_name, dtype=self.dtype)(x, train)
        x = jnp.concatenate([x.reshape(b, -1), y_Bx3.astype(self.dtype)], axis=-1)
        dense = lambda d, name: nn.Dense(d, dtype=self.dtype, param_dtype=jnp.float32, name=name)
        out = (
            dense(self.specific_dim, "mean_specific")(x),
            dense(self.specific_dim, "logvar_specific")(x),
            dense(self.shared_dim, "mean_shared")(x),
            dense(self.shared_dim, "logvar_shared")(x),
        )
        return tuple(o.astype(jnp.float32) for o in out)


class ViewDecoder(nn.Module):
    """Rebuilds one view from [z_specific, z_shared, Y]: Dense to a coarse
    (H/2^L, W/2^L, bottleneck) map, then L x (x2 upsample + conv), then a 1x1
    conv to `out_channels` logits (the reconstruction is their sigmoid).

    The output size and channels are call arguments (taken from the input
    view), so one module works at any size divisible by 2^L.
    Returns (B, H, W, out_channels) float32 logits.
    """

    features: int
    levels: int
    bottleneck_channels: int = 16
    norm: str = "batch"
    norm_axis_name: str | None = None
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(
        self,
        z_specific_BxD: jax.Array,
        z_shared_BxD: jax.Array,
        y_Bx3: jax.Array,
        out_hw: tuple[int, int],
        out_channels: int,
        train: bool,
    ) -> jax.Array:
        h0, w0 = out_hw[0] // 2**self.levels, out_hw[1] // 2**self.levels
        z = jnp.concatenate([z_specific_BxD, z_shared_BxD, y_Bx3], axis=-1).astype(self.dtype)
        x = nn.Dense(h0 * w0 * self.bottleneck_channels, dtype=self.dtype, param_dtype=jnp.float32)(z)
        x = nn.relu(x).reshape(z.shape[0], h0, w0, self.bottleneck_channels)
        for level in reversed(range(self.levels)):
            x = upsample2x_nearest(x)
            x = ConvNormAct(self.features * 2**level, norm=self.norm, norm_axis_name=self.norm_axis_name, dtype=self.dtype)(x, train)
        logits = nn.Conv(out_channels, (1, 1), dtype=self.dtype, param_dtype=jnp.float32, name="out")(x)
        return logits.astype(jnp.float32)


class DualViewVAE(nn.Module):
    """The conditional dual-view VAE; see the module docstring.

    Use `encode` (and `decode`, `classify`) from a parent module; `__call__`
    runs all of them once.
    """

    num_clusters: int = 4
    specific_dim: int = 32
    shared_dim: int = 32
    features: int = 32
    levels: int = 4
    classifier_hidden: int = 64
    norm: str = "batch"
    norm_axis_name: str | None = None
    dtype: Dtype = jnp.float32

    def setup(self):
        kw = dict(features=self.features, levels=self.levels, norm=self.norm, norm_axis_name=self.norm_axis_name, dtype=self.dtype)
        self.encoder_b1 = ViewEncoder(self.specific_dim, self.shared_dim, **kw)
        self.encoder_b2 = ViewEncoder(self.specific_dim, self.shared_dim, **kw)
        self.decoder_b1 = ViewDecoder(**kw)
        self.decoder_b2 = ViewDecoder(**kw)
        self.classifier_hidden_layer = nn.Dense(self.classifier_hidden, dtype=self.dtype, param_dtype=jnp.float32)
        self.classifier_out = nn.Dense(2, dtype=self.dtype, param_dtype=jnp.float32)

    def encode(
        self, image_BxHxWxC: jax.Array, b2_BxHxWxK: jax.Array, y_Bx3: jax.Array, train: bool, sample: bool,
        index_B: jax.Array | None = None,
    ) -> dict[str, Any]:
        """Eqs. 4-5. Returns {'means': {pp,pv,qq,qv: (B,D)}, 'logvars': {...},
        'z': {...}}; z are reparameterized samples (rng stream 'sample', one
        draw per row keyed by its record index `index_B`) when `sample`, else
        the means."""
        mpp, lpp, mpv, lpv = self.encoder_b1(image_BxHxWxC, y_Bx3, train)
        mqq, lqq, mqv, lqv = self.encoder_b2(b2_BxHxWxK, y_Bx3, train)
        means = dict(pp=mpp, pv=mpv, qq=mqq, qv=mqv)
        logvars = dict(pp=lpp, pv=lpv, qq=lqq, qv=lqv)
        if sample:
            keys = jax.random.split(self.make_rng("sample"), len(LATENT_NAMES))
            rows = example_index(index_B, image_BxHxWxC.shape[0])
            z = {n: reparameterize(k, means[n], logvars[n], rows) for n, k in zip(LATENT_NAMES, keys)}
        else:
            z = dict(means)
        return {"means": means, "logvars": logvars, "z": z}

    def decode(
        self, z: dict[str, jax.Array], y_Bx3: jax.Array, out_hw: tuple[int, int], image_channels: int, train: bool
    ):
        """Rebuilds both views: returns (B1 logits (B,H,W,C), B2 logits (B,H,W,K))."""
        rec_b1 = self.decoder_b1(z["pp"], z["pv"], y_Bx3, out_hw, image_channels, train)
        rec_b2 = self.decoder_b2(z["qq"], z["qv"], y_Bx3, out_hw, self.num_clusters, train)
        return rec_b1, rec_b2

    def classify(self, z: dict[str, jax.Array]) -> jax.Array:
        """Eq. 9's classifier D on the concatenated latents: (B, 2) float32 logits."""
        h = jnp.concatenate([z[n] for n in LATENT_NAMES], axis=-1).astype(self.dtype)
        h = nn.relu(self.classifier_hidden_layer(h))
        return self.classifier_out(h).astype(jnp.float32)

    def __call__(self, image_BxHxWxC, b2_BxHxWxK, y_Bx3, train: bool = False):
        enc = self.encode(image_BxHxWxC, b2_BxHxWxK, y_Bx3, train, sample=train)
        rec_b1, rec_b2 = self.decode(enc["z"], y_Bx3, image_BxHxWxC.shape[1:3], image_BxHxWxC.shape[-1], train)
        return dict(enc, recon_b1=rec_b1, recon_b2=rec_b2, latent_logits=self.classify(enc["z"]))
