"""DL-VAE-CNN: the dual-view conditional VAE feeding a FiLM-conditioned CNN
(Rao et al., Sections IV-D and IV-E).

The CNN is a U-Net-shaped network on the equalized slice. After every conv's
(affine-free) batch norm, FiLM scales and shifts each channel with values
computed from the VAE latent z = [z_pp, z_pv, z_qq, z_qv]; the bottleneck
feeds a softmax classification head (tumor / no tumor), and a decoder with
skip connections gives one mask logit per pixel.

How the label Y is resolved (the VAE encoders are conditioned on it):
  training, label given   the true label `label_B`; with probability
                          `label_dropout` per slice it is replaced by the
                          'unknown' state, so the encoders also learn the
                          label-free path.
  inference (train=False) `label_B` is never read, so an evaluation batch
                          that carries its labels (for the loss) cannot leak
                          them into the prediction; `inference_label` decides:
    'predicted' (default) pass 1 encodes with Y = unknown and runs the CNN;
                          its argmax class is the predicted label; pass 2
                          encodes with that label and gives the outputs.
    'marginal'            pass 1 as above gives p(y | x); the latents under
                          Y = 0 and Y = 1 (means, and log-variances as a
                          simple approximation) are averaged with weights
                          p(y | x) (the decoder sees the soft label).
    'unknown'             one pass with Y = unknown (cheapest).
  `condition_label_B` (int 0/1), when given, conditions the encoders on that
  label in training and inference alike (for analysis and tests).
  `resolved_label_Bx3` in the outputs is the label vector that was used.
"""

from __future__ import annotations

from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from dlvae_jax.models.layers import (ClassifierHead, DoubleConv, Dtype, UNetDecoder, example_index, max_pool2x,
                                     row_bernoulli)
from dlvae_jax.models.vae import LATENT_NAMES, NUM_LABEL_STATES, UNKNOWN_LABEL, DualViewVAE

INFERENCE_LABEL_MODES = ("predicted", "marginal", "unknown")
CNN_CONDITIONS = ("unknown", "label")


class ConditionalUNet(nn.Module):
    """U-Net whose every DoubleConv is FiLM-modulated by z.

    image (B, H, W, C), z (B, Dz) -> (class logits (B, 2), mask logits (B, H, W)),
    both float32 (mask logits None when `with_mask` is False). H and W must be divisible by 2^levels.
    """

    features: int = 32
    levels: int = 4
    classifier_hidden: int = 128
    dropout: float = 0.0
    norm: str = "batch"
    norm_axis_name: str | None = None
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, image_BxHxWxC: jax.Array, z_BxD: jax.Array, train: bool, with_mask: bool = True,
                 index_B: jax.Array | None = None):
        x = image_BxHxWxC.astype(self.dtype)
        z = z_BxD.astype(self.dtype)
        skips = []
        for level in range(self.levels):
            x = DoubleConv(self.features * 2**level, norm=self.norm, norm_axis_name=self.norm_axis_name, dtype=self.dtype)(x, train, z)
            skips.append(x)
            x = max_pool2x(x)
        x = DoubleConv(self.features * 2**self.levels, norm=self.norm, norm_axis_name=self.norm_axis_name, dtype=self.dtype)(x, train, z)
        # The head also sees z directly: the slice label is a global property
        # the latent classifier D already predicts from z.
        logits = ClassifierHead(self.classifier_hidden, self.dropout, dtype=self.dtype)(x, train, z, index_B)
        if not with_mask:  # label-resolution pass: the decoder would be wasted work
            return logits, None
        mask_logits = UNetDecoder(self.norm, self.norm_axis_name, self.dtype)(x, skips, train, z)
        return logits, mask_logits


class DLVAECNN(nn.Module):
    """The full DL-VAE-CNN model (registry name 'dlvae_cnn').

    Inputs (dict): `image_BxHxWxC` float in [0, 1]; `clusters_BxHxW` int in
    [0, num_clusters); optional `label_B` int 0/1, read only when
    train=True; optional `condition_label_B` int 0/1, an explicit
    conditioning label used in training and inference alike; optional
    `z_BxD` to condition the CNN on a given latent
    (D = 2 * (specific_dim + shared_dim)) instead of the encoded one.

    Outputs (dict, float32): `logits_Bx2`, `mask_logits_BxHxW`,
    `latent_logits_Bx2` (Eq. 9's D), `latent_means` / `latent_logvars`
    ({pp, pv, qq, qv}: (B, D_i)), `z_pv_BxD`, `z_qv_BxD`, `z_BxD` (the
    conditioning latent), `recon_b1_logits_BxHxWxC`,
    `recon_b2_logits_BxHxWxK`, `resolved_label_Bx3`.

    RNG streams: 'sample' (reparameterization) and 'dropout' (dropout and
    label dropout) when train=True; none at inference, where z is the
    posterior mean, so inference is deterministic.
    """

    description: ClassVar[str] = "dual-view conditional VAE + FiLM-conditioned U-Net CNN (Rao et al.); class + mask"  # shown by `dlvae-jax models`
    outputs_mask: ClassVar[bool] = True  # `mask_logits_BxHxW` among the outputs

    num_clusters: int = 4
    specific_dim: int = 32
    shared_dim: int = 32
    vae_features: int = 32
    vae_levels: int = 4
    features: int = 32
    levels: int = 4
    dropout: float = 0.0
    label_dropout: float = 0.2
    inference_label: str = "predicted"
    cnn_condition: str = "unknown"
    # False: the same CNN with the VAE removed, z fixed to zeros (FiLM then
    # reduces to a learned per-channel bias) and no VAE outputs, so no VAE
    # loss terms: the control arm of experiments/vae_effect.py.
    use_vae: bool = True
    norm: str = "batch"
    # The VAE is run twice per training step (label-conditioned and label-free),
    # so batch statistics would mix two input distributions and drift from the
    # label-free ones inference sees; group norm has no train/eval difference.
    vae_norm: str = "group"
    norm_axis_name: str | None = None
    dtype: Dtype = jnp.float32

    def setup(self):
        if self.inference_label not in INFERENCE_LABEL_MODES:
            raise ValueError(f"inference_label must be one of {INFERENCE_LABEL_MODES}, got {self.inference_label!r}")
        self.vae = DualViewVAE(
            num_clusters=self.num_clusters,
            specific_dim=self.specific_dim,
            shared_dim=self.shared_dim,
            features=self.vae_features,
            levels=self.vae_levels,
            norm=self.vae_norm, norm_axis_name=self.norm_axis_name,
            dtype=self.dtype,
        )
        self.cnn = ConditionalUNet(
            features=self.features, levels=self.levels, dropout=self.dropout, norm=self.norm, norm_axis_name=self.norm_axis_name, dtype=self.dtype
        )

    def _encode(self, image, b2, y_Bx3, train, index_B):
        enc = self.vae.encode(image, b2, y_Bx3, train, sample=train, index_B=index_B)
        z_BxD = jnp.concatenate([enc["z"][n] for n in LATENT_NAMES], axis=-1)
        return enc, z_BxD

    def __call__(self, inputs: dict[str, Any], train: bool = False) -> dict[str, jax.Array]:
        if self.cnn_condition not in CNN_CONDITIONS:
            raise ValueError(f"cnn_condition must be one of {CNN_CONDITIONS}, got {self.cnn_condition!r}")
        if not self.use_vae:
            return self._cnn_without_vae(inputs, train)
        if self.cnn_condition == "unknown":
            return self._label_free_cnn(inputs, train)
        return self._label_conditioned_cnn(inputs, train)

    @property
    def latent_dim(self) -> int:
        """D of the conditioning latent z = [z_pp, z_pv, z_qq, z_qv]."""
        return 2 * (self.specific_dim + self.shared_dim)

    def _cnn_without_vae(self, inputs, train):
        image = inputs["image_BxHxWxC"]
        b = image.shape[0]
        z_BxD = inputs.get("z_BxD")
        z_BxD = jnp.zeros((b, self.latent_dim), jnp.float32) if z_BxD is None else jnp.asarray(z_BxD, jnp.float32)
        logits, mask_logits = self.cnn(image, z_BxD, train, index_B=example_index(inputs.get("index_B"), b))
        return {"logits_Bx2": logits, "mask_logits_BxHxW": mask_logits, "z_BxD": z_BxD}

    def _vae_label(self, inputs, train, b):
        """The label Y the VAE is conditioned on: `condition_label_B` if given,
        else the true label in training (with label dropout), else None."""
        label_B = inputs.get("condition_label_B")
        if label_B is None and train:
            label_B = inputs.get("label_B")
        if label_B is None:
            return None
        label_B = jnp.asarray(label_B, jnp.int32)
        if train and self.label_dropout > 0:
            drop_B = row_bernoulli(self.make_rng("dropout"), example_index(inputs.get("index_B"), b),
                                   self.label_dropout, (b,))
            label_B = jnp.where(drop_B, UNKNOWN_LABEL, label_B)
        return label_B

    def _label_free_cnn(self, inputs, train):
        """cnn_condition='unknown': the CNN always sees z encoded with Y = unknown,
        in training and inference alike, so it cannot learn to read the label
        (the shortcut that made the label-conditioned variant predict 'no tumor'
        for every held-out slice). The label-conditioned encoding still trains
        the conditional VAE (Eqs. 6-8); Eq. 9's classifier D reads the
        label-free latents, which pushes them to carry the tumor evidence."""
        image = inputs["image_BxHxWxC"]
        b = image.shape[0]
        index_B = example_index(inputs.get("index_B"), b)
        b2 = jax.nn.one_hot(inputs["clusters_BxHxW"], self.num_clusters, dtype=jnp.float32)
        unknown_Bx3 = jax.nn.one_hot(jnp.full((b,), UNKNOWN_LABEL), NUM_LABEL_STATES, dtype=jnp.float32)
        free, z_BxD = self._encode(image, b2, unknown_Bx3, train, index_B)
        if inputs.get("z_BxD") is not None:
            z_BxD = jnp.asarray(inputs["z_BxD"], jnp.float32)
        logits, mask_logits = self.cnn(image, z_BxD, train, index_B=index_B)

        label_B = self._vae_label(inputs, train, b)
        if label_B is not None:
            y_Bx3 = jax.nn.one_hot(label_B, NUM_LABEL_STATES, dtype=jnp.float32)
            enc, _ = self._encode(image, b2, y_Bx3, train, index_B)
        elif self.inference_label == "unknown":
            y_Bx3, enc = unknown_Bx3, free
        elif self.inference_label == "predicted":
            y_Bx3 = jax.nn.one_hot(jnp.argmax(logits, -1), NUM_LABEL_STATES, dtype=jnp.float32)
            enc, _ = self._encode(image, b2, y_Bx3, train, index_B)
        else:  # marginal
            enc, y_Bx3 = self._marginal_encoding(image, b2, logits, train, index_B)
        outputs = self._outputs(image, enc, y_Bx3, free["z"], z_BxD, logits, mask_logits, train)
        if enc is not free:
            # The label-free posterior feeds the CNN: it is trained as a VAE
            # posterior of its own (its KL and its reconstruction, decoded with
            # Y = unknown), or nothing but the latent classifier would make
            # its z carry information about the slice.
            outputs["free_latent_means"] = free["means"]
            outputs["free_latent_logvars"] = free["logvars"]
            if train:  # only the loss reads it
                rec_b1, rec_b2 = self.vae.decode(free["z"], unknown_Bx3, image.shape[1:3], image.shape[-1], train)
                outputs["free_recon_b1_logits_BxHxWxC"] = rec_b1
                outputs["free_recon_b2_logits_BxHxWxK"] = rec_b2
        return outputs

    def _marginal_encoding(self, image, b2, logits_Bx2, train, index_B):
        b = image.shape[0]
        p_Bx2 = jax.nn.softmax(logits_Bx2, axis=-1)
        encs = [self._encode(image, b2, jax.nn.one_hot(jnp.full((b,), c), NUM_LABEL_STATES), train, index_B) for c in (0, 1)]
        mix = lambda a0, a1: p_Bx2[:, :1] * a0 + p_Bx2[:, 1:] * a1
        enc = jax.tree_util.tree_map(mix, encs[0][0], encs[1][0])
        y_Bx3 = jnp.concatenate([p_Bx2, jnp.zeros((b, 1), jnp.float32)], axis=-1)
        return enc, y_Bx3

    def _outputs(self, image, enc, y_Bx3, classify_z, z_BxD, logits, mask_logits, train):
        rec_b1, rec_b2 = self.vae.decode(enc["z"], y_Bx3, image.shape[1:3], image.shape[-1], train)
        return {
            "logits_Bx2": logits,
            "mask_logits_BxHxW": mask_logits,
            "latent_logits_Bx2": self.vae.classify(classify_z),
            "latent_means": enc["means"],
            "latent_logvars": enc["logvars"],
            "z_pv_BxD": enc["z"]["pv"],
            "z_qv_BxD": enc["z"]["qv"],
            "z_BxD": z_BxD.astype(jnp.float32),
            "recon_b1_logits_BxHxWxC": rec_b1,
            "recon_b2_logits_BxHxWxK": rec_b2,
            "resolved_label_Bx3": y_Bx3,
        }

    def _label_conditioned_cnn(self, inputs, train):
        """cnn_condition='label': the CNN sees the label-conditioned z (the
        paper's literal design, kept for comparison; prone to the label shortcut)."""
        image = inputs["image_BxHxWxC"]
        b = image.shape[0]
        index_B = example_index(inputs.get("index_B"), b)
        b2 = jax.nn.one_hot(inputs["clusters_BxHxW"], self.num_clusters, dtype=jnp.float32)
        label_B = self._vae_label(inputs, train, b)
        z_override_BxD = inputs.get("z_BxD")
        unknown_Bx3 = jax.nn.one_hot(jnp.full((b,), UNKNOWN_LABEL), NUM_LABEL_STATES, dtype=jnp.float32)

        if label_B is not None:
            y_Bx3 = jax.nn.one_hot(label_B, NUM_LABEL_STATES, dtype=jnp.float32)
            enc, z_BxD = self._encode(image, b2, y_Bx3, train, index_B)
        else:
            y_Bx3 = unknown_Bx3
            enc, z_BxD = self._encode(image, b2, y_Bx3, train, index_B)
            if self.inference_label != "unknown":
                pass1_z = z_BxD if z_override_BxD is None else jnp.asarray(z_override_BxD, jnp.float32)
                pass1_logits, _ = self.cnn(image, pass1_z, train, with_mask=False, index_B=index_B)
                if self.inference_label == "predicted":
                    y_Bx3 = jax.nn.one_hot(jnp.argmax(pass1_logits, -1), NUM_LABEL_STATES, dtype=jnp.float32)
                    enc, z_BxD = self._encode(image, b2, y_Bx3, train, index_B)
                else:
                    enc, y_Bx3 = self._marginal_encoding(image, b2, pass1_logits, train, index_B)
                    z_BxD = jnp.concatenate([enc["z"][n] for n in LATENT_NAMES], axis=-1)

        if z_override_BxD is not None:
            z_BxD = jnp.asarray(z_override_BxD, jnp.float32)
        logits, mask_logits = self.cnn(image, z_BxD, train, index_B=index_B)
        return self._outputs(image, enc, y_Bx3, enc["z"], z_BxD, logits, mask_logits, train)
