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
"""

from __future__ import annotations

import ast
import difflib
import importlib
import importlib.util
import json
from pathlib import Path
from typing import Any, Sequence

import ml_collections

from dlvae_jax.errors import DlvaeError

NAMES = ("demo", "cpu", "default", "unet", "cnn", "vgg16", "dcnn")
SECTIONS = ("data", "augment", "preprocess", "model", "loss", "optimizer", "train", "eval")


class ConfigError(DlvaeError):
    """A config that cannot be loaded or an override that does not fit it."""


def _from_file(path: Path) -> ml_collections.ConfigDict:
    spec = importlib.util.spec_from_file_location(f"_dlvae_config_{path.stem}", path)
    if spec is None or spec.loader is None:
        raise ConfigError(f"{path}: not a Python file")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as err:  # a user's file: report, do not crash
        raise ConfigError(f"{path}: cannot be loaded: {type(err).__name__}: {err}") from None
    if not hasattr(module, "get_config"):
        raise ConfigError(f"{path}: has no get_config() function")
    return module.get_config()


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
    missing = [s for s in SECTIONS if s not in cfg]
    if missing:
        raise ConfigError(f"config {name_or_file!r} lacks section(s) {missing}")
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
        return float(new)
    elif isinstance(old, int) and isinstance(new, int) and not isinstance(new, bool):
        return new
    elif isinstance(old, str) and isinstance(new, str):
        return new
    elif isinstance(old, (tuple, list)) and isinstance(new, (tuple, list)):
        if len(new) != len(old):
            raise ConfigError(f"--set {key}: expected {len(old)} values, got {len(new)}")
        return type(old)(_coerce(f"{key}[{i}]", o, v) for i, (o, v) in enumerate(zip(old, new)))
    raise ConfigError(f"--set {key}: expected a value of type {type(old).__name__}, got {new!r}")


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


def load(name_or_file: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
    cfg = resolve_model(apply_overrides(get(name_or_file), overrides))
    cfg.config_name = name_or_file if name_or_file in NAMES else str(Path(name_or_file).resolve())
    return cfg


def to_json(cfg: ml_collections.ConfigDict) -> str:
    return json.dumps(cfg.to_dict(), indent=2, sort_keys=True) + "\n"


def from_json(text: str) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(json.loads(text))
