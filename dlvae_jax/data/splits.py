"""Patient-level train/validation/test splits, stratified and deterministic.

Slices of one patient are strongly correlated, so splitting by slice would
leak a patient into both training and evaluation; every split here is a set of
patient ids and a patient belongs to exactly one.

Stratification: patients are grouped by (institution, has any tumor slice).
Each group is shuffled with a NumPy Generator seeded from `seed`, the groups
are laid end to end, and patients are dealt in that order to whichever split
is furthest below its target share so far (largest deficit). Every group is
thus spread over the splits in proportion to `fractions`, and the split sizes
track the fractions to within one patient.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from dlvae_jax.data.lgg import LggIndex, SliceRecord
from dlvae_jax.errors import DataError
from dlvae_jax.io import write_json

SPLIT_NAMES = ("train", "validation", "test")
SPLITS_FILE = "splits.json"


def _stratum(info: dict) -> tuple[str, bool]:
    return info["institution"], info["tumor_slices"] > 0


def make_splits(
    index: LggIndex, seed: int, fractions: Sequence[float] = (0.7, 0.15, 0.15)
) -> dict[str, list[str]]:
    """Returns {"train": [...], "validation": [...], "test": [...]} of sorted patient ids.

    Deterministic in (the index's patients, seed, fractions).
    """
    fractions = np.asarray(fractions, np.float64)
    if fractions.shape != (len(SPLIT_NAMES),) or (fractions < 0).any() or not np.isclose(fractions.sum(), 1.0):
        raise ValueError(f"fractions must be {len(SPLIT_NAMES)} non-negative numbers summing to 1, got {fractions}")
    info = index.patient_info()
    strata: dict[tuple[str, bool], list[str]] = {}
    for pid in sorted(info):
        strata.setdefault(_stratum(info[pid]), []).append(pid)

    rng = np.random.default_rng(seed)
    order: list[str] = []
    for key in sorted(strata):
        members = strata[key]
        order.extend(members[i] for i in rng.permutation(len(members)))

    counts = np.zeros(len(SPLIT_NAMES))
    out: dict[str, list[str]] = {name: [] for name in SPLIT_NAMES}
    for k, pid in enumerate(order):
        deficit = fractions * (k + 1) - counts
        deficit[fractions == 0] = -np.inf
        j = int(np.argmax(deficit))  # ties go to the earlier split
        counts[j] += 1
        out[SPLIT_NAMES[j]].append(pid)
    return {name: sorted(pids) for name, pids in out.items()}


def split_report(index: LggIndex, splits: dict[str, list[str]]) -> dict[str, dict]:
    """Per split: patients, slices, tumor slices and patients per institution."""
    info = index.patient_info()
    report = {}
    for name, pids in splits.items():
        insts: dict[str, int] = {}
        for p in pids:
            insts[info[p]["institution"]] = insts.get(info[p]["institution"], 0) + 1
        report[name] = {
            "patients": len(pids),
            "slices": sum(info[p]["slices"] for p in pids),
            "tumor_slices": sum(info[p]["tumor_slices"] for p in pids),
            "institutions": dict(sorted(insts.items())),
        }
    return report


def write_splits(
    path: str | os.PathLike,
    index: LggIndex,
    splits: dict[str, list[str]],
    seed: int,
    fractions: Sequence[float] = (0.7, 0.15, 0.15),
) -> Path:
    """Writes splits.json atomically; a folder `path` gets `path/splits.json`.

    Format: {"seed": int, "fractions": [train, validation, test],
    "splits": {name: [patient ids]}, "counts": {name: {patients, slices,
    tumor_slices, institutions}}}.
    """
    path = Path(path)
    if path.is_dir() or path.suffix != ".json":
        path = path / SPLITS_FILE
    write_json(path, splits_document(index, splits, seed, fractions))
    return path


def splits_document(
    index: LggIndex, splits: dict[str, list[str]], seed: int, fractions: Sequence[float] = (0.7, 0.15, 0.15)
) -> dict:
    """The JSON object `write_splits` writes (see there)."""
    check_disjoint(splits)
    return {
        "seed": int(seed),
        "fractions": [float(f) for f in fractions],
        "splits": splits,
        "counts": split_report(index, splits),
    }


def read_splits(path: str | os.PathLike) -> dict[str, list[str]]:
    """Reads splits.json (or DIR/splits.json, or DIR/lgg_mri/splits.json); returns {name: [patient ids]}."""
    path = Path(path)
    if path.is_dir():
        # A TFDS data dir: `data build` keeps the splits inside lgg_mri/.
        inner = path / "lgg_mri" / SPLITS_FILE
        path = inner if not (path / SPLITS_FILE).exists() and inner.exists() else path / SPLITS_FILE
    try:
        data = json.loads(path.read_text())
        splits = {k: list(v) for k, v in data["splits"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise DataError(f"{path}: not a readable splits file ({err})") from None
    check_disjoint(splits, path)
    return splits


def check_disjoint(splits: dict[str, list[str]], where: object = "splits") -> None:
    """Raises DataError if any patient id appears in two splits (or twice in one)."""
    seen: dict[str, str] = {}
    for name, pids in splits.items():
        for p in pids:
            if p in seen:
                raise DataError(f"{where}: patient {p} is in both {seen[p]} and {name}")
            seen[p] = name


def records_for_split(index: LggIndex, splits: dict[str, list[str]], name: str) -> list[SliceRecord]:
    """The index's slice records whose patient is in split `name`, in index order."""
    if name not in splits:
        raise DataError(f"no split named {name!r}; have {sorted(splits)}")
    return index.for_patients(splits[name])
