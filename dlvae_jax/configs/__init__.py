"""Training configurations as Python code (the big_vision / nanodo convention).

Each module here has `get_config()` returning an `ml_collections.ConfigDict`
with the sections

    data       where the slices come from and at what size the model sees them
    augment    `dlvae_jax.data.augment.AugmentConfig` fields
    preprocess the classical stages run on the device in every step
    model      `name` plus the registered model's options (`dlvae_jax.models.get_model`)
    loss       `dlvae_jax.losses.LossConfig` fields
    optimizer  AdamW with warm-up + cosine decay, clipping, accumulation
    train      batch size, steps, seed, logging / eval / checkpoint cadence
    eval       batch size and thresholds

`load(name_or_file, overrides)` resolves a config by name (`demo`, `cpu`,
`default`, `unet`, `cnn`, `vgg16`, `dcnn`) or from a Python file with a
`get_config()`, then applies `--set a.b=value` overrides: the value is parsed
as a Python literal and must match the field's type (an int is accepted for a
float field); an unknown field is an error naming the closest fields.

`validate(cfg, where)` checks a whole config before anything is written: every
section, the fields of `base()` with their types, and the values the run would
otherwise trip over later (seeds in [0, 2**32), split fractions, positive
counts). `load` and `from_json` (a run's config.json) both call it, so
`train`, `evaluate`, `predict` and the experiments see the same rules; an
error is a `ConfigError` naming the config file or name and the field.
"""

from __future__ import annotations

import ast
import difflib
import importlib
import importlib.util
import json
import math
import os
from pathlib import Path
from typing import Any, Sequence

import ml_collections

from dlvae_jax.errors import DlvaeError
from dlvae_jax.options import SEED_MAX

NAMES = ("demo", "cpu", "default", "unet", "cnn", "vgg16", "dcnn")
SECTIONS = ("data", "augment", "preprocess", "model", "loss", "optimizer", "train", "eval")


class ConfigError(DlvaeError):
    """A config that cannot be loaded or an override that does not fit it."""


def _from_file(path: Path) -> ml_collections.ConfigDict:
    spec = importlib.util.spec_from_file_location(f"_dlvae_config_{path.stem}", path)
    if spec is None or spec.loader is None:
        raise ConfigError(f"{path}: not a Python file")
    module = importlib.util.module_from_spec(spec)
    # A user's file: whatever it raises (SystemExit included) is reported, not let through.
    try:
        spec.loader.exec_module(module)
    except KeyboardInterrupt:
        raise
    except BaseException as err:
        raise ConfigError(f"{path}: cannot be loaded: {_describe(err)}") from None
    get_config = getattr(module, "get_config", None)
    if not callable(get_config):
        raise ConfigError(f"{path}: has no get_config() function")
    try:
        cfg = get_config()
    except KeyboardInterrupt:
        raise
    except BaseException as err:
        raise ConfigError(f"{path}: get_config() failed: {_describe(err)}") from None
    if not isinstance(cfg, ml_collections.ConfigDict):
        raise ConfigError(f"{path}: get_config() must return an ml_collections.ConfigDict, "
                          f"got {type(cfg).__name__}")
    return cfg


def _describe(err: BaseException) -> str:
    if isinstance(err, SystemExit):
        return f"it called sys.exit({err.code!r})"
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__


def get(name_or_file: str) -> ml_collections.ConfigDict:
    """The config registered as `name_or_file`, or the one a `.py` file defines."""
    if name_or_file in NAMES:
        cfg = importlib.import_module(f"dlvae_jax.configs.{name_or_file}").get_config()
    elif name_or_file.endswith(".py"):
        path = Path(name_or_file)
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found")
        cfg = _from_file(path)
    else:
        raise ConfigError(f"unknown config {name_or_file!r}; known: {', '.join(NAMES)} or a path to a .py file")
    return cfg


def _parse_value(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text  # a bare word is a string: --set model.name=unet


def _coerce(key: str, old: Any, new: Any) -> Any:
    if old is None:
        return new
    if isinstance(old, bool):
        if isinstance(new, bool):
            return new
    elif isinstance(old, float) and isinstance(new, (int, float)) and not isinstance(new, bool):
        if _is_number(new):
            return float(new)
    elif isinstance(old, int) and isinstance(new, int) and not isinstance(new, bool):
        return new
    elif isinstance(old, str) and isinstance(new, str):
        return new
    elif isinstance(old, (tuple, list)) and isinstance(new, (tuple, list)):
        if len(new) != len(old):
            raise ConfigError(f"--set {key}: expected {len(old)} values, got {len(new)}")
        return type(old)(_coerce(f"{key}[{i}]", o, v) for i, (o, v) in enumerate(zip(old, new)))
    kind = "a finite number" if isinstance(old, float) else f"a value of type {type(old).__name__}"
    raise ConfigError(f"--set {key}: expected {kind}, got {new!r}")


def model_fields(name: str) -> dict[str, Any]:
    """The options of the model registered as `name` with their defaults, as
    config values (the computation dtype as its name); {} for an unknown name."""
    import dataclasses

    from dlvae_jax.models.registry import MODELS

    cls = MODELS.get(name)
    if cls is None:
        return {}
    out = {}
    for f in dataclasses.fields(cls):
        if f.name in ("parent", "name", "norm_axis_name") or f.default is dataclasses.MISSING:
            continue
        value = f.default
        if f.name == "dtype":
            value = getattr(value, "__name__", str(value))
        out[f.name] = value
    return out


def apply_overrides(cfg: ml_collections.ConfigDict, overrides: Sequence[str]) -> ml_collections.ConfigDict:
    """Returns a copy of `cfg` with every `a.b=value` of `overrides` applied."""
    cfg = ml_collections.ConfigDict(cfg.to_dict())
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. train.steps=100")
        key, text = item.split("=", 1)
        key = key.strip()
        parts = key.split(".")
        node = cfg
        for i, part in enumerate(parts):
            fields = list(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
            if i == 2 and parts[0] == "loss" and parts[1] in ("weights", "schedules") and part not in fields:
                # Any registered loss term may be given a weight or a schedule.
                from dlvae_jax.losses import TERMS

                if part in TERMS and len(parts) == 3:
                    node[part] = 0.0 if parts[1] == "weights" else "constant"
                    fields.append(part)
                else:
                    fields += list(TERMS)
            if i == 1 and parts[0] == "model" and part not in fields:
                # Any option of the chosen model may be set, listed in the config or not.
                known = model_fields(cfg.model.get("name", ""))
                if part in known and len(parts) == 2:
                    node[part] = known[part]
                    fields.append(part)
                else:
                    fields += list(known)
            if part not in fields:
                where = ".".join(parts[:i]) or "the config"
                close = difflib.get_close_matches(part, fields, n=3)
                hint = f"; did you mean {', '.join(close)}?" if close else f"; fields: {', '.join(sorted(set(fields)))}"
                raise ConfigError(f"--set {key}: {where} has no field {part!r}{hint}")
            if i < len(parts) - 1:
                node = node[part]
        old = node[parts[-1]]
        if isinstance(old, ml_collections.ConfigDict):
            raise ConfigError(f"--set {key}: is a section, set one of its fields")
        node[parts[-1]] = _coerce(key, old, _parse_value(text))
    return cfg


def resolve_model(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Writes every option of the config's model into `cfg.model` (defaults for
    those not set), so the config written into a run names the whole model and
    a later change of a default cannot pass for the same run."""
    for key, value in model_fields(cfg.model.name).items():
        if key not in cfg.model:
            cfg.model[key] = value
    return cfg


def expand_data_dir(value: str) -> str:
    """A data_dir naming environment variables (`${DLVAE_LGG_DIR}`) with them
    expanded, made absolute; left as written while a variable is unset (the
    run then stops with a message saying which to set)."""
    if not value or "$" not in value:
        return value
    expanded = os.path.expandvars(value)
    if "$" in expanded:
        return value
    return os.path.abspath(os.path.expanduser(expanded))


def load(name_or_file: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
    """The config `name_or_file` with `overrides` applied, validated (`validate`)."""
    where = name_or_file if name_or_file.endswith(".py") else f"config {name_or_file!r}"
    cfg = get(name_or_file)
    _check_shape(cfg, where)
    cfg = apply_overrides(cfg, overrides)
    cfg.data.data_dir = expand_data_dir(cfg.data.data_dir)
    validate(cfg, where)
    cfg = resolve_model(cfg)
    cfg.config_name = name_or_file if name_or_file in NAMES else str(Path(name_or_file).resolve())
    return cfg


def to_json(cfg: ml_collections.ConfigDict) -> str:
    return json.dumps(cfg.to_dict(), indent=2, sort_keys=True) + "\n"


def describe(cfg: ml_collections.ConfigDict) -> str:
    """Every field of a resolved config, one `section.field = value  (type)` line
    each: what `--set section.field=value` accepts (`train --print-config`)."""
    lines = []

    def walk(node, prefix):
        for key in sorted(node):
            value = node[key]
            if isinstance(value, (dict, ml_collections.ConfigDict)):
                walk(value, f"{prefix}{key}.")
            else:
                kind = type(value).__name__ if value is not None else "None"
                lines.append(f"{prefix}{key} = {value!r}  ({kind})")

    walk(cfg.to_dict(), "")
    return "\n".join(lines)


class ConfigFileError(ConfigError, ValueError):
    """A config.json that is not a config (also a ValueError, as a JSON syntax error is)."""


def from_json(text: str, source: str | os.PathLike | None = None) -> ml_collections.ConfigDict:
    """The config a run wrote to its config.json, validated (`validate`).

    Raises ConfigFileError (a DlvaeError and a ValueError): the message names
    `source` when given; a caller that adds the path itself passes none.
    """
    where = os.fspath(source) if source is not None else None
    try:
        data = json.loads(text)
    except ValueError as err:
        raise ConfigFileError(_at(where, f"not valid JSON ({err})")) from None
    if not isinstance(data, dict):
        raise ConfigFileError(_at(where, f"holds a JSON {_json_type(data)}, not a config object"))
    try:
        cfg = ml_collections.ConfigDict(data)
    except Exception as err:  # e.g. a key that is not a valid field name
        raise ConfigFileError(_at(where, f"not a config ({err})")) from None
    try:
        validate(cfg, where, complete=False)
    except ConfigError as err:
        raise ConfigFileError(str(err)) from None
    return cfg


# ----------------------------------------------------------------------------- validation


def _at(where: str | None, message: str) -> str:
    return f"{where}: {message}" if where else message


def _json_type(value: Any) -> str:
    return {list: "array", str: "string", bool: "boolean", int: "number", float: "number",
            type(None): "null"}.get(type(value), type(value).__name__)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    if not isinstance(v, (int, float)) or isinstance(v, bool):
        return False
    try:
        return math.isfinite(v)
    except OverflowError:  # an int beyond any float
        return False


def _check_shape(cfg: Any, where: str | None) -> None:
    """Every section present, and a mapping."""
    if not isinstance(cfg, (ml_collections.ConfigDict, dict)):
        raise ConfigError(_at(where, f"a config must be a ConfigDict, got {type(cfg).__name__}"))
    missing = [s for s in SECTIONS if s not in cfg]
    if missing:
        raise ConfigError(_at(where, f"lacks section(s) {', '.join(missing)}"))
    for section in SECTIONS:
        if not isinstance(cfg[section], (ml_collections.ConfigDict, dict)):
            raise ConfigError(_at(where, f"section {section} must be a group of fields, "
                                         f"got {type(cfg[section]).__name__}"))


# Sections whose fields all have defaults elsewhere (dataclasses): a field
# absent there is fine, a field present must still have the base type.
_OPTIONAL_SECTIONS = ("augment", "loss", "eval")
_POSITIVE_INTS = (("train", "batch_size"), ("train", "steps"), ("train", "log_every"), ("train", "eval_every"),
                  ("train", "checkpoint_every"), ("train", "keep_checkpoints"), ("eval", "batch_size"),
                  ("optimizer", "accumulate_steps"), ("data", "image_size"), ("preprocess", "n_init"),
                  ("data", "synth_patients"), ("data", "synth_size"), ("data", "synth_slices"))
_NON_NEGATIVE_INTS = (("eval", "overlays"), ("eval", "min_component"), ("optimizer", "warmup_steps"),
                      ("data", "num_threads"))
_SEEDS = (("train", "seed"), ("data", "split_seed"), ("data", "synth_seed"))


def _type_ok(template: Any, value: Any) -> bool:
    if isinstance(template, bool):
        return isinstance(value, bool)
    if isinstance(template, float):
        return _is_number(value)
    if isinstance(template, int):
        return _is_int(value)
    if isinstance(template, str):
        return isinstance(value, str)
    if isinstance(template, (tuple, list)):
        return (isinstance(value, (tuple, list)) and len(value) == len(template)
                and all(_type_ok(t, v) for t, v in zip(template, value)))
    return True


def _type_name(template: Any) -> str:
    if isinstance(template, bool):
        return "true or false"
    if isinstance(template, float):
        return "a finite number"
    if isinstance(template, int):
        return "an integer"
    if isinstance(template, str):
        return "a string"
    if isinstance(template, (tuple, list)):
        return f"a list of {len(template)} values"
    return type(template).__name__


def validate(cfg: Any, where: str | None = None, *, complete: bool = True) -> ml_collections.ConfigDict:
    """Raises ConfigError (naming `where` and the field) unless `cfg` is a usable config.

    Every section of `SECTIONS` must be there and every field of `base()` with
    its type; the model must be named; seeds in [0, 2**32); the split
    fractions finite, >= 0, summing to 1 (as `dlvae_jax.data.splits` needs),
    with a non-zero train share (a zero validation share leaves the split
    without validation patients, and such a run trains without picking a
    checkpoint: the model is the last one); counts positive. `complete=False` (a run's
    config.json) lets fields of `augment` and `loss` be absent: their
    dataclasses have defaults, and a run of an older version may lack one.
    """
    from dlvae_jax.configs.base import base

    _check_shape(cfg, where)
    template = base()
    for section in SECTIONS:
        if section == "model":
            continue
        for key, default in template[section].items():
            if key not in cfg[section]:
                if section in _OPTIONAL_SECTIONS and not complete:
                    continue
                raise ConfigError(_at(where, f"lacks the field {section}.{key}"))
            value = cfg[section][key]
            if not _type_ok(default, value):
                raise ConfigError(_at(where, f"{section}.{key} must be {_type_name(default)}, got {value!r}"))
    name = cfg.model.get("name") if hasattr(cfg.model, "get") else None
    if not isinstance(name, str) or not name:
        raise ConfigError(_at(where, f"model.name must name a model, got {name!r}"))

    def value(section: str, key: str) -> Any:
        return cfg[section][key] if key in cfg[section] else template[section][key]

    for section, key in _SEEDS:
        v = value(section, key)
        if not 0 <= v < SEED_MAX:
            raise ConfigError(_at(where, f"{section}.{key} must be a seed in [0, 2**32), got {v}"))
    for section, key in _POSITIVE_INTS:
        v = value(section, key)
        if v < 1:
            raise ConfigError(_at(where, f"{section}.{key} must be a positive integer, got {v}"))
    for section, key in _NON_NEGATIVE_INTS:
        v = value(section, key)
        if v < 0:
            raise ConfigError(_at(where, f"{section}.{key} must be an integer >= 0, got {v}"))
    fractions = [float(f) for f in value("data", "fractions")]
    if min(fractions) < 0 or abs(sum(fractions) - 1.0) > 1e-6 or fractions[0] <= 0:
        raise ConfigError(_at(where, "data.fractions must be (train, validation, test) shares >= 0 summing to 1, "
                                     f"with train > 0; got {tuple(value('data', 'fractions'))}"))
    for key in ("p_flip_lr", "p_flip_ud", "p_missing_sequence"):
        v = value("augment", key)
        if not 0.0 <= v <= 1.0:
            raise ConfigError(_at(where, f"augment.{key} must be a probability in [0, 1], got {v}"))
    _validate_loss(cfg.loss, where, check_names=complete)
    share = cfg.eval.get("min_volume_share", 0.0) if "eval" in cfg else 0.0
    if not _is_number(share) or not 0.0 <= share <= 1.0:
        raise ConfigError(_at(where, f"eval.min_volume_share must be a share of the largest component in [0, 1], "
                                     f"got {share!r}"))
    from dlvae_jax.metrics import PRESENCE_RULES

    from dlvae_jax.models.registry import MODELS

    presence = cfg.eval.get("presence", "class") if "eval" in cfg else "class"
    if presence not in PRESENCE_RULES:
        raise ConfigError(_at(where, f"eval.presence must be one of {', '.join(PRESENCE_RULES)}, got {presence!r}"))
    if presence == "mask" and name in MODELS and not MODELS[name].outputs_mask:
        raise ConfigError(_at(where, f"eval.presence=mask needs a mask, and {name} only classifies slices; "
                                     "use eval.presence=class"))
    k = value("preprocess", "k")
    if not 2 <= k <= 255:
        raise ConfigError(_at(where, f"preprocess.k must be in [2, 255] (clusters of grey levels), got {k}"))
    if not value("data", "data_dir"):  # synthetic phantoms: the limits of `dlvae-jax data synth`
        for key, lo in (("synth_size", 32), ("synth_slices", 3)):
            v = value("data", key)
            if v < lo:
                raise ConfigError(_at(where, f"data.{key} must be at least {lo} for synthetic data, got {v}"))
    return cfg


def _validate_loss(loss: Any, where: str | None, check_names: bool = True) -> None:
    """Weights and schedules name registered terms; weights are finite numbers,
    schedules parse; the reconstruction kind and reduction are known. A run's
    config.json (`check_names=False`) may name a term its config file
    registered, which `evaluate` never imports."""
    from dlvae_jax import losses

    for group in ("weights", "schedules"):
        if group not in loss:
            continue
        items = loss[group]
        if not isinstance(items, (dict, ml_collections.ConfigDict)):
            raise ConfigError(_at(where, f"loss.{group} must map loss terms to values, got {items!r}"))
        for name, v in items.items():
            if check_names and name not in losses.TERMS:
                raise ConfigError(_at(where, f"loss.{group}.{name}: no such loss term; registered: "
                                             f"{', '.join(losses.TERMS)}"))
            if group == "weights" and not _is_number(v):
                raise ConfigError(_at(where, f"loss.weights.{name} must be a finite number, got {v!r}"))
            if group == "schedules":
                try:
                    losses.parse_schedule(v)
                except ValueError as err:
                    raise ConfigError(_at(where, f"loss.schedules.{name}: {err}")) from None
    if "dice_fn_weight" in loss and not (_is_number(loss["dice_fn_weight"]) and 0 < loss["dice_fn_weight"] < 1):
        raise ConfigError(_at(where, f"loss.dice_fn_weight must be in (0, 1) (0.5 = Dice), got {loss['dice_fn_weight']!r}"))
    for key, allowed in (("reconstruction_kind", losses.RECONSTRUCTION_KINDS), ("reduction", losses.REDUCTIONS),
                         ("dice_kind", losses.DICE_KINDS)):
        if key in loss and loss[key] not in allowed:
            raise ConfigError(_at(where, f"loss.{key} must be one of {', '.join(allowed)}, got {loss[key]!r}"))
