"""`default`: DL-VAE-CNN at the data's full 256x256 with the full widths, bfloat16
compute (float32 parameters), for GPUs and TPUs."""

from dlvae_jax.configs.base import base


def get_config():
    c = base()
    c.data.data_dir = "${DLVAE_LGG_DIR}"  # the kaggle_3m folder: set DLVAE_LGG_DIR, or pass --data-dir
    c.data.image_size = 256
    c.data.num_threads = 8
    c.model = dict(name="dlvae_cnn", dtype="bfloat16", inference_label="unknown")
    c.loss.schedules.kl = "linear:2000"
    c.optimizer.warmup_steps = 500
    c.train.batch_size = 32
    c.train.steps = 20000
    c.train.log_every = 50
    c.train.eval_every = 1000
    c.train.checkpoint_every = 1000
    c.eval.batch_size = 64
    return c
