"""A trained run as a function: load a workdir's checkpoint and predict.

    predictor = load_predictor("workdir/cpu", checkpoint="best")
    out = predictor(flair_BxHxW)          # {"prob_BxHxW", "tumor_prob_B"}
    mean = predictor.sample_mean(flair_BxHxW, n=16, seed=0)  # [B, H, W], DL-VAE-CNN only

The input is raw uint8 slices at the data's resolution (FLAIR [B, H, W], or
[B, H, W, 3] for a run trained on all three channels); the model's inputs
are made exactly as in training (`dlvae_jax.train.step.eval_outputs`), and
probabilities come back at the input's resolution.
"""

from __future__ import annotations

import functools
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from dlvae_jax import configs
from dlvae_jax.errors import DlvaeError
from dlvae_jax.models import apply_model, example_inputs
from dlvae_jax.models.registry import MODELS
from dlvae_jax.models.vae import LATENT_NAMES
from dlvae_jax.train import experiment as ex
from dlvae_jax.train.experiment import CONFIG_FILE, EVAL_SEED
from dlvae_jax.train.checkpoint import CheckpointWarning, Checkpoints, NoReadableCheckpoint, abstract
from dlvae_jax.train.runners import batch_sharding, data_mesh, replicated
from dlvae_jax.train.state import abstract_state
from dlvae_jax.train.step import eval_outputs, prepare_inputs, prob_to_data_size

CHECKPOINT_CHOICES = ("best", "latest")


class Predictor:
    """A run's model as a function of raw slices.

    The parameters are placed once, replicated over this process's devices;
    each call splits its slices over all of them (padded up to a multiple of
    the device count, the padding dropped from the result).
    `checkpoint` says which save the weights came from ("best" or "latest").
    """

    def __init__(self, cfg, variables, step: int, checkpoint: str = "best"):
        self.config = cfg
        self.step = int(step)
        self.checkpoint = checkpoint
        self.mesh = data_mesh(jax.local_devices())
        self._rows = batch_sharding(self.mesh)
        self.variables = jax.device_put(variables, replicated(self.mesh))
        self.model = ex.model_from_config(cfg)
        self.prep = ex.prep_from_config(cfg)
        self.channels = 3 if cfg.data.channels == "all" else 1
        self.segments = MODELS[cfg.model.name].outputs_mask
        self._eval_key = jax.random.key_data(jax.random.key(EVAL_SEED))
        self.latent_sizes = ex.latent_sizes(cfg)  # None: the model has no VAE latent
        ev = cfg.get("eval", {})
        self.tta = bool(ev.get("tta", False))  # predictions averaged over the slice and its trained flips
        from dlvae_jax.eval.uncertainty import trained_flips

        aug = cfg.get("augment", {})  # a run without the section trained with the base config's flips
        self.tta_flips = trained_flips(aug.get("p_flip_lr", 0.5), aug.get("p_flip_ud", 0.0))
        self.min_component = int(ev.get("min_component", 0))  # for `metrics.decide`
        self.presence = str(ev.get("presence", "class"))
        self.min_volume_share = float(ev.get("min_volume_share", 0.0))
        self._predict = self._compile(diagnostics=False)
        self._diagnose = None

    def _compile(self, diagnostics: bool):
        return jax.jit(functools.partial(eval_outputs, model=self.model, prep=self.prep, eval_key=self._eval_key,
                                         diagnostics=diagnostics),
                       in_shardings=(replicated(self.mesh), self._rows), out_shardings=self._rows)

    def _batch(self, images: np.ndarray) -> dict:
        images = np.asarray(images)
        if images.dtype != np.uint8:
            raise DlvaeError(f"expected uint8 slices, got {images.dtype}")
        if images.ndim == 3:
            images = images[..., None]
        if images.ndim != 4 or images.shape[-1] != self.channels:
            raise DlvaeError(f"expected slices [B, H, W{', 3' if self.channels == 3 else ''}], got {images.shape}")
        b = images.shape[0]
        pad = -b % self.mesh.size
        if pad:
            images = np.concatenate([images, np.zeros((pad,) + images.shape[1:], np.uint8)])
        rows = b + pad
        return {"image_BxHxWxC": jax.device_put(images, self._rows),
                "index_B": jax.device_put(np.zeros((rows,), np.int32), self._rows),
                "valid_B": jax.device_put(np.arange(rows) < b, self._rows)}

    def single(self, flair_BxHxW: np.ndarray) -> dict[str, np.ndarray]:
        """One prediction per slice: {"prob_BxHxW", "tumor_prob_B"}, float32."""
        b = len(flair_BxHxW)
        out = self._predict(self.variables, self._batch(flair_BxHxW))
        return {k: np.asarray(v, np.float32)[:b] for k, v in out.items()}

    def __call__(self, flair_BxHxW: np.ndarray) -> dict[str, np.ndarray]:
        """The run's prediction: `single`, or with `tta` the mean of the pixel
        and slice probabilities over the slice and the flips the run trained
        with (`tta_flips`; each flipped back)."""
        if not self.tta:
            return self.single(flair_BxHxW)
        from dlvae_jax.eval.uncertainty import flips_mean

        return flips_mean(self.single, flair_BxHxW, self.tta_flips)

    def diagnose(self, flair_BxHxW: np.ndarray) -> dict[str, np.ndarray]:
        """What `__call__` gives plus, for a model with a VAE latent, the
        label-free posterior's `latent_mean_BxD`, `latent_kl_BxD` and the
        latent probe's `probe_<name>_prob_BxHxW` / `_tumor_prob_B`
        (`dlvae_jax.train.step.eval_outputs`)."""
        if self.latent_sizes is None:
            return self(flair_BxHxW)
        if self._diagnose is None:
            self._diagnose = self._compile(diagnostics=True)
        b = len(flair_BxHxW)
        out = self._diagnose(self.variables, self._batch(flair_BxHxW))
        out = {k: np.asarray(v, np.float32)[:b] for k, v in out.items()}
        if self.tta:  # the probe compares single passes; the prediction is the flips' mean
            out["single_prob_BxHxW"], out["single_tumor_prob_B"] = out["prob_BxHxW"], out["tumor_prob_B"]
            out.update(self(flair_BxHxW))
        return out

    @property
    def can_sample(self) -> bool:
        """Whether the model has a latent to sample (DL-VAE-CNN with its VAE); the others are deterministic."""
        return self.latent_sizes is not None

    def sample_mean(self, flair_BxHxW: np.ndarray, n: int, seed: int, chunk: int = 8) -> np.ndarray:
        """The mean over n predictions with the latent z drawn from the label-free
        posterior q(z | x, Y = unknown): float32 [B, H, W] probabilities.

        The draws are summed on the device `chunk` at a time, so memory does not
        grow with n. Sample i uses key i of `split(key(seed), n)`: the result
        depends on (inputs, n, seed) only. Raises DlvaeError for a model with
        nothing to sample (see `can_sample`)."""
        return self.sample_stats(flair_BxHxW, n, seed, chunk)[0]

    def sample_stats(self, flair_BxHxW: np.ndarray, n: int, seed: int, chunk: int = 8
                     ) -> tuple[np.ndarray, np.ndarray]:
        """(mean probability, mean per-sample entropy in bits), float32 [B, H, W]
        each, over n latent draws as in `sample_mean`. The entropy of the mean
        minus the mean entropy is the mutual information between the
        prediction and z (the part of the uncertainty that is the model's)."""
        if not self.can_sample:
            raise DlvaeError(f"a {self.config.model.name} model is deterministic: it has no latent to sample, "
                             "so its samples would all be the same prediction; drop --samples")
        if n < 1:
            raise DlvaeError(f"the number of samples must be at least 1, got {n}")
        batch = self._batch(flair_BxHxW)
        b = len(flair_BxHxW)
        fn = _sampler(self.model.clone(inference_label="unknown"), self.prep)
        keys = jax.random.split(jax.random.key(seed), n)
        total = None
        for start in range(0, n, chunk):
            part = keys[start:start + chunk]
            # Pad the last chunk to `chunk` keys (one compiled shape); the pads are weighed 0.
            weights = np.zeros((chunk,), np.float32)
            weights[:len(part)] = 1.0
            if len(part) < chunk:
                part = jnp.concatenate([part, jnp.broadcast_to(part[:1], (chunk - len(part),))])
            s = fn(self.variables, batch, self._eval_key, part, weights)
            total = s if total is None else jax.tree_util.tree_map(jnp.add, total, s)
        prob, entropy = (np.asarray(t, np.float64)[:b] / n for t in total)
        return prob.astype(np.float32), entropy.astype(np.float32)


@functools.lru_cache(maxsize=4)
def _sampler(model, prep):
    @jax.jit
    def run(variables, batch, eval_key, keys_S, weights_S):
        """Sums over the S keys (weighted) of the sampled tumor probability and
        of its binary entropy in bits: two float32 [B, H, W]."""
        inputs = prepare_inputs(batch, jax.random.wrap_key_data(eval_key), prep, None)
        inputs = {k: v for k, v in inputs.items() if k not in ("label_B", "mask_BxHxW")}
        out, _ = apply_model(model, variables, inputs, train=False)
        mean = jnp.concatenate([out["latent_means"][k] for k in LATENT_NAMES], -1)
        std = jnp.exp(0.5 * jnp.concatenate([out["latent_logvars"][k] for k in LATENT_NAMES], -1))
        b, h, w = batch["image_BxHxWxC"].shape[:3]

        def one(total, key_w):
            key, weight = key_w
            z = mean + std * jax.random.normal(key, mean.shape)
            o, _ = apply_model(model, variables, dict(inputs, z_BxD=z), train=False)
            prob = prob_to_data_size(jax.nn.sigmoid(o["mask_logits_BxHxW"].astype(jnp.float32)), h, w)
            p = jnp.clip(prob, 0.0, 1.0)
            ent = -(jnp.where(p > 0, p * jnp.log2(jnp.maximum(p, 1e-30)), 0.0)
                    + jnp.where(p < 1, (1 - p) * jnp.log2(jnp.maximum(1 - p, 1e-30)), 0.0))
            return (total[0] + weight * prob, total[1] + weight * ent), None

        zeros = jnp.zeros((b, h, w), jnp.float32)
        total, _ = jax.lax.scan(one, (zeros, zeros), (keys_S, weights_S))
        return total

    return run


def read_config(workdir: Path):
    path = workdir / CONFIG_FILE
    if not path.exists():
        raise DlvaeError(f"{workdir}: not a training workdir (no {CONFIG_FILE})")
    try:
        return configs.from_json(path.read_text())
    except (OSError, ValueError) as err:
        raise DlvaeError(f"{path}: unreadable ({err})") from None


def prediction_settings(predictor, workdir, tta: bool | None = None, min_component: int | None = None,
                        presence: str | None = None,
                        min_volume_share: float | None = None) -> tuple[bool, int, str, float]:
    """Applies `evaluate`'s and `predict`'s --tta, --min-component, --presence
    and --min-volume-share to a predictor (None keeps the run's `eval.*`
    value) and returns the settings in force: (tta, min_component, presence,
    min_volume_share).

    Raises DlvaeError for a negative size, a share outside [0, 1], an unknown rule, or mask presence
    asked of a model that gives no mask. --tta on a run trained without flips
    warns and predicts single passes (there is no other view to average)."""
    from dlvae_jax.errors import print_warning
    from dlvae_jax.metrics import PRESENCE_RULES

    try:
        name = str(predictor.config["model"]["name"])
    except (AttributeError, KeyError, TypeError):
        name = "trained"
    if tta is not None:
        predictor.tta = bool(tta)
    tta = bool(getattr(predictor, "tta", False))
    if tta and len(getattr(predictor, "tta_flips", ((False, False), (False, True)))) == 1:
        print_warning(f"{workdir}: --tta: the run trained without flips, so test-time augmentation has no "
                      "other view to average; predicting single passes")
        predictor.tta = tta = False
    min_component = int(getattr(predictor, "min_component", 0) if min_component is None else min_component)
    if min_component < 0:
        raise DlvaeError(f"--min-component must be >= 0, got {min_component}")
    presence = str(getattr(predictor, "presence", "class") if presence is None else presence)
    if presence not in PRESENCE_RULES:
        raise DlvaeError(f"--presence must be one of {', '.join(PRESENCE_RULES)}, got {presence!r}")
    if presence == "mask" and not getattr(predictor, "segments", True):
        raise DlvaeError(f"--presence mask: the {name} model in {workdir} gives no mask, only a slice label; "
                         "use --presence class")
    share = float(getattr(predictor, "min_volume_share", 0.0) if min_volume_share is None else min_volume_share)
    if not 0.0 <= share <= 1.0:
        raise DlvaeError(f"--min-volume-share must be in [0, 1] (a share of the largest component), got {share}")
    predictor.min_component, predictor.presence, predictor.min_volume_share = min_component, presence, share
    return tta, min_component, presence, share


def has_validation(workdir: Path) -> bool:
    """Whether the run picked checkpoints on validation patients (a run whose
    splits.json is missing or unreadable is taken to have, as runs always did)."""
    from dlvae_jax.data.splits import SPLITS_FILE, read_splits
    from dlvae_jax.errors import DataError

    try:
        return bool(read_splits(workdir / SPLITS_FILE).get("validation", True))
    except DataError:  # a damaged splits.json is reported by whatever reads the split
        return True


def load_predictor(workdir: str | Path, checkpoint: str = "best") -> Predictor:
    """The run's model at its best (highest validation score) or latest checkpoint.

    The one loader of a trained run: `evaluate`, `predict` and the Python API
    all come here. It reads and never moves or writes anything. When "best"
    has no readable save the latest is used, with a warning, and
    `Predictor.checkpoint` says so; a run trained without validation patients
    has no best, and "best" is its latest save, without a warning. A
    checkpoint that does not match the run's config raises `TemplateMismatch`
    naming the leaf."""
    if checkpoint not in CHECKPOINT_CHOICES:
        raise DlvaeError(f"--checkpoint must be one of {CHECKPOINT_CHOICES}, got {checkpoint!r}")
    workdir = Path(workdir)
    if not workdir.is_dir():
        raise DlvaeError(f"{workdir}: workdir not found")
    cfg = read_config(workdir)
    model = ex.model_from_config(cfg)
    tx, _ = ex.optimizer_from_config(cfg)
    c = 3 if cfg.data.channels == "all" else 1
    template = abstract_state(model, tx, example_inputs(2, int(cfg.data.image_size), c))
    template = abstract(template, replicated(data_mesh(jax.local_devices())))
    ckpt = Checkpoints(workdir, keep=int(cfg.train.keep_checkpoints), async_save=False, read_only=True)
    used = checkpoint
    try:
        restored = None
        # A run trained without validation patients has no best: its model is the last save.
        if checkpoint == "best" and has_validation(workdir):
            try:
                restored = ckpt.restore_best(template)
            except NoReadableCheckpoint as err:
                warnings.warn(f"{err}; using the latest checkpoint instead", CheckpointWarning, stacklevel=2)
        if restored is None:
            used = "latest"
            restored = ckpt.restore_latest(template)
    finally:
        ckpt.close()
    if restored is None:
        raise DlvaeError(f"{workdir}: no checkpoint (train first)")
    state, _, meta = restored
    return Predictor(cfg, state.variables(), int(meta["step"]), checkpoint=used)
