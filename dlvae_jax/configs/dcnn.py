"""`dcnn`: the baseline `dcnn` on the `cpu` config's data, resolution and budget."""

from dlvae_jax.configs.cpu import baseline_config


def get_config():
    c = baseline_config()
    c.model = dict(name="dcnn", dtype="float32", features=16, blocks_per_stage=1)
    c.eval.presence = "class"  # no mask: the class head calls each slice
    return c
