"""`demo`: DL-VAE-CNN on the built-in synthetic phantoms, small enough that
`train --config demo` + `evaluate` finish in a few minutes on 2 CPU cores."""

from dlvae_jax.configs.base import base


def get_config():
    c = base()
    c.data.synth_patients = 12
    c.data.synth_slices = 16
    c.data.synth_size = 64
    c.data.image_size = 64
    c.data.fractions = (0.5, 0.25, 0.25)
    c.model = dict(
        name="dlvae_cnn", dtype="float32", features=8, levels=3, vae_features=8, vae_levels=3,
        specific_dim=8, shared_dim=8, label_dropout=0.2, inference_label="unknown",
    )
    c.loss.schedules.kl = "linear:50"
    c.optimizer.learning_rate = 2e-3
    c.optimizer.warmup_steps = 20
    c.train.batch_size = 8
    c.train.steps = 400
    c.train.log_every = 10
    c.train.eval_every = 100
    c.train.checkpoint_every = 100
    c.eval.batch_size = 16
    c.eval.overlays = 4
    return c
