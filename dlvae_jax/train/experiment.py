"""From a resolved config to the objects a run needs: the model, the
preprocessing and augmentation settings, the loss mix and the optimizer, and
the run's patient split (its slices come from `dlvae_jax.data.source`)."""

from __future__ import annotations

from pathlib import Path

from dlvae_jax import configs
from dlvae_jax.data import lgg
from dlvae_jax.data.augment import AugmentConfig
from dlvae_jax.data.source import SOURCES
from dlvae_jax.data.splits import SPLITS_FILE, make_splits, read_splits, write_splits
from dlvae_jax.errors import DlvaeError
from dlvae_jax import losses
from dlvae_jax.losses import LossConfig
from dlvae_jax.models import get_model
from dlvae_jax.train.optim import make_optimizer
from dlvae_jax.train.step import PrepConfig

CONFIG_FILE = "config.json"  # the resolved config of a run, in its workdir
LOG_FILE = "log.jsonl"
SUMMARY_FILE = "train_summary.json"
EVAL_SEED = 12345  # K-means restarts at evaluation: fixed, so evaluations are comparable

def model_from_config(cfg, norm_axis_name: str | None = None):
    opts = {k: v for k, v in cfg.model.to_dict().items() if k != "name"}
    if norm_axis_name is not None:
        opts["norm_axis_name"] = norm_axis_name
    return get_model(cfg.model.name, **opts)


def prep_from_config(cfg) -> PrepConfig:
    return PrepConfig(image_size=int(cfg.data.image_size), equalize=cfg.preprocess.equalize,
                      k=int(cfg.preprocess.k), n_init=int(cfg.preprocess.n_init))


def augment_from_config(cfg) -> AugmentConfig:
    return AugmentConfig(**cfg.augment.to_dict())


def shorten_schedules(cfg, steps: int) -> None:
    """Caps each term's warm-up ('linear:N') at a fifth of `steps` and each
    cycle ('cyclical:N') at `steps`, for the short runs of the experiments."""
    for name, spec in list(cfg.loss.schedules.items()):
        kind, n, ratio = losses.parse_schedule(spec)
        if kind == "linear":
            cfg.loss.schedules[name] = f"linear:{min(n, max(1, steps // 5))}"
        elif kind == "cyclical":
            cfg.loss.schedules[name] = f"cyclical:{min(n, max(1, steps))}:{ratio:g}"


def latent_sizes(cfg) -> dict[str, int] | None:
    """{pp, pv, qq, qv: dimensions} of a model whose CNN reads a VAE latent
    (dlvae_cnn with its VAE), else None."""
    if cfg.model.name != "dlvae_cnn" or not cfg.model.get("use_vae", True):
        return None
    defaults = configs.model_fields("dlvae_cnn")
    specific = int(cfg.model.get("specific_dim", defaults["specific_dim"]))
    shared = int(cfg.model.get("shared_dim", defaults["shared_dim"]))
    return {"pp": specific, "pv": shared, "qq": specific, "qv": shared}


def loss_from_config(cfg) -> LossConfig:
    return losses.from_config(cfg.loss.to_dict())


def optimizer_from_config(cfg):
    """(optax transform, learning rate as a function of the train step). A train
    step is one batch; with `accumulate_steps` k, k steps make one update."""
    k = max(1, int(cfg.optimizer.accumulate_steps))
    tx, schedule = make_optimizer(cfg.optimizer, max(1, int(cfg.train.steps) // k))
    return tx, (schedule if k == 1 else (lambda step: schedule(step // k)))


def check_config(cfg) -> None:
    """Faults a run would otherwise hit minutes later, reported up front."""
    configs.validate(cfg, "config")
    try:
        loss_from_config(cfg)
    except ValueError as err:
        raise DlvaeError(f"loss: {err}") from None
    size, levels = int(cfg.data.image_size), 0
    for key in ("levels", "vae_levels"):
        if key in cfg.model:
            levels = max(levels, int(cfg.model[key]))
    if size <= 0 or size % (2 ** levels):
        raise DlvaeError(f"data.image_size {size} must be a positive multiple of 2^{levels} for this model")
    if cfg.data.source not in SOURCES:
        raise DlvaeError(f"data.source must be one of {', '.join(SOURCES)}, got {cfg.data.source!r}")
    if cfg.data.tfds_dir:
        if cfg.data.source == "memory":
            raise DlvaeError("data.tfds_dir (train --tfds-dir) is read as array_record; "
                             "drop data.source=memory or the tfds_dir")
        if not Path(cfg.data.tfds_dir).expanduser().is_dir():
            raise DlvaeError(f"{cfg.data.tfds_dir}: no such folder (data.tfds_dir, train --tfds-dir: "
                             "a folder made by `dlvae-jax data build`)")
    if cfg.data.channels not in lgg.CHANNEL_CHOICES:
        raise DlvaeError(f"data.channels must be one of {lgg.CHANNEL_CHOICES}, got {cfg.data.channels!r}")
    if "num_clusters" in cfg.model and int(cfg.model.num_clusters) != int(cfg.preprocess.k):
        raise DlvaeError("model.num_clusters must equal preprocess.k")
    for section, key in (("train", "batch_size"), ("train", "steps"), ("train", "log_every"),
                         ("train", "eval_every"), ("train", "checkpoint_every"), ("train", "keep_checkpoints"),
                         ("eval", "batch_size"), ("optimizer", "accumulate_steps")):
        value = cfg[section][key]
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise DlvaeError(f"{section}.{key} must be a positive integer, got {value!r}")
    model_from_config(cfg)  # unknown model options fail here, naming them


def workdir_splits(workdir: Path, index: lgg.LggIndex, cfg, splits: dict | None = None) -> dict:
    """The run's patient split: read from the workdir; else `splits` when given
    (a cross-validation fold); else a `data build` folder's own (train
    --tfds-dir, so the run reads that build as it is); else made from the
    config's seed. Saved in the workdir. A workdir whose saved split is not
    the `splits` asked for is an error (the run belongs to another fold)."""
    path = workdir / SPLITS_FILE
    if path.exists():
        saved = read_splits(path)
        if splits is not None and {k: sorted(v) for k, v in saved.items()} != {k: sorted(v) for k, v in splits.items()}:
            raise DlvaeError(f"{path}: holds another patient split than the one asked for; use another workdir")
        return saved
    fractions = tuple(float(f) for f in cfg.data.fractions)
    if splits is not None:
        splits = {k: sorted(v) for k, v in splits.items()}
    elif cfg.data.tfds_dir:
        splits = read_splits(Path(cfg.data.tfds_dir).expanduser())
    else:
        splits = make_splits(index, int(cfg.data.split_seed), fractions)
    write_splits(path, index, splits, int(cfg.data.split_seed), fractions)
    return splits
