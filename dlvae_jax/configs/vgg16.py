"""`vgg16`: the baseline `vgg16` on the `cpu` config's data, resolution and budget."""

from dlvae_jax.configs.cpu import baseline_config


def get_config():
    c = baseline_config()
    c.model = dict(name="vgg16", dtype="float32", features=16, hidden=64)
    c.eval.presence = "class"  # no mask: the class head calls each slice
    return c
