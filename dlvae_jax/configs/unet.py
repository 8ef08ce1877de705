"""`unet`: the baseline `unet` on the `cpu` config's data, resolution and budget."""

from dlvae_jax.configs.cpu import get_config as cpu_config


def get_config():
    c = cpu_config()
    c.model = dict(name="unet", dtype="float32", features=16, levels=4)
    return c
