"""`cnn`: the baseline `cnn` on the `cpu` config's data, resolution and budget."""

from dlvae_jax.configs.cpu import baseline_config


def get_config():
    c = baseline_config()
    c.model = dict(name="cnn", dtype="float32", features=16, blocks=4, hidden=64)
    c.eval.presence = "class"  # no mask: the class head calls each slice
    return c
