"""`unet`: the baseline `unet` on the `cpu` config's data, resolution and budget."""

from dlvae_jax.configs.cpu import baseline_config


def get_config():
    c = baseline_config()
    c.model = dict(name="unet", dtype="float32", features=16, levels=4)
    # Chosen on the validation patients of U-Net's own 3-fold cross-validation
    # (experiments/results/cv_arms/postprocess.md): mask presence, as for cpu, and
    # predicted components under 100 pixels removed.
    c.eval.min_component = 100
    # Then each patient's 3D tumor components under a fifth of its largest removed: chosen on the out-of-fold
    # predictions of the same cross-validation, with the 100-pixel removal first (experiments/results/cv_arms/
    # volume_rule_unet.md; nested estimate +0.011 Dice per volume, slice accuracy 0.907 -> 0.924, n = 39).
    c.eval.min_volume_share = 0.2
    return c
