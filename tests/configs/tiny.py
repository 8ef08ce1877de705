"""A tiny training config for tests: 32x32 synthetic phantoms, narrow models."""

from dlvae_jax.configs.demo import get_config as demo


def get_config():
    c = demo()
    c.data.synth_patients = 4
    c.data.synth_slices = 8
    c.data.synth_size = 32
    c.data.image_size = 32
    c.data.num_threads = 1
    c.model = dict(name="dlvae_cnn", dtype="float32", features=4, levels=2, vae_features=4, vae_levels=2,
                   specific_dim=4, shared_dim=4, inference_label="unknown")
    c.preprocess.n_init = 1
    c.train.batch_size = 4
    c.train.steps = 6
    c.train.log_every = 1
    c.train.eval_every = 3
    c.train.checkpoint_every = 2
    c.eval.batch_size = 8
    return c
