"""The tiny test config with a U-Net (a model with no latent to sample)."""

import importlib.util
from pathlib import Path

_spec = importlib.util.spec_from_file_location("tiny", Path(__file__).with_name("tiny.py"))
_tiny = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_tiny)


def get_config():
    c = _tiny.get_config()
    c.model = dict(name="unet", dtype="float32", features=4, levels=2)
    return c
