"""Orbax checkpoints of a run: the train state, the data position and metadata.

Layout under `<workdir>/checkpoints/`:

    latest/<step>/  the newest `keep` saves (asynchronous), for resuming
    best/<step>/    the one save with the highest validation score: `dice_volume_mean`
                    for models with a mask output, `slice_f1` for classifiers

Each save holds `state` (the `TrainState` pytree), `data` (the grain iterator
state of the last batch the step consumed, JSON) and `meta` (step, metrics).
`restore_latest` walks the saves newest first and skips one that cannot be
read (a kill in the middle of a write, a corrupted file) with a warning naming
it, so a run resumes from the newest readable save.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

BEST_METRIC = "dice_volume_mean"  # models with a mask output
CLASSIFIER_METRIC = "slice_f1"   # models without one (their Dice is constant)


def best_metric(outputs_mask: bool) -> str:
    """The validation metric that picks the best checkpoint of a model."""
    return BEST_METRIC if outputs_mask else CLASSIFIER_METRIC


class CheckpointWarning(UserWarning):
    """A checkpoint that could not be read and was skipped."""


def _manager(directory: Path, keep: int, async_save: bool, best: bool) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep,
        enable_async_checkpointing=async_save,
        best_fn=(lambda meta: float(meta.get("score", meta.get(BEST_METRIC, float("-inf"))))) if best else None,
        best_mode="max",
        create=True,
    )
    return ocp.CheckpointManager(directory.resolve(), options=options)


class Checkpoints:
    def __init__(self, workdir: str | Path, keep: int = 2, async_save: bool = True, metric: str = BEST_METRIC):
        self.metric = metric
        self.root = Path(workdir) / "checkpoints"
        self.latest = _manager(self.root / "latest", keep, async_save, best=False)
        self.best = _manager(self.root / "best", 1, False, best=True)
        self.best_value = self._read_best_value()

    def _read_best_value(self) -> float:
        step = self.best.latest_step()
        if step is None:
            return float("-inf")
        try:
            meta = self.best.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
            return float(meta["metrics"][self.metric])
        except Exception:  # an unreadable best save is replaced by the next good one
            return float("-inf")

    @staticmethod
    def _args(state, data_state, meta) -> ocp.args.Composite:
        return ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state),
                                  meta=ocp.args.JsonSave(meta))

    def save(self, step: int, state, data_state: dict, metrics: dict | None = None) -> None:
        meta = {"step": int(step), "metrics": metrics or {}}
        self.latest.save(step, args=self._args(state, data_state, meta), force=True)

    def save_best(self, step: int, state, data_state: dict, metrics: dict) -> bool:
        """Saves if `metrics[self.metric]` beats every earlier best; returns whether it did."""
        value = float(metrics.get(self.metric, float("nan")))
        if not value > self.best_value:
            return False
        meta = {"step": int(step), "best_metric": self.metric, "metrics": {self.metric: value, **metrics}}
        self.best.save(step, args=self._args(state, data_state, meta), metrics={"score": value}, force=True)
        self.best.wait_until_finished()
        self.best_value = value
        return True

    def wait(self) -> None:
        self.latest.wait_until_finished()
        self.best.wait_until_finished()

    def close(self) -> None:
        self.latest.close()
        self.best.close()

    def restore_latest(self, abstract_state) -> tuple[Any, dict, dict] | None:
        """(state, data_state, meta) of the newest readable save, or None."""
        return _restore_newest(self.latest, abstract_state, self.root / "latest")

    def restore_best(self, abstract_state):
        return _restore_newest(self.best, abstract_state, self.root / "best")


def _restore_newest(manager: ocp.CheckpointManager, abstract_state, where: Path):
    skipped = []
    try:
        for step in sorted(manager.all_steps(), reverse=True):
            try:
                out = manager.restore(step, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore(),
                    meta=ocp.args.JsonRestore()))
                return out["state"], out["data"], out["meta"]
            except Exception as err:  # noqa: BLE001 - any unreadable save is skipped, never fatal
                warnings.warn(f"checkpoint {where / str(step)} is unreadable ({type(err).__name__}); "
                              "falling back to the previous one", CheckpointWarning, stacklevel=3)
                skipped.append(step)
        return None
    finally:
        _set_aside(manager, where, skipped)


def _set_aside(manager: ocp.CheckpointManager, where: Path, steps: list[int]) -> None:
    """Moves unreadable saves to checkpoints/unreadable/ (kept for inspection, out of
    the manager's way, so the resumed run can save those steps again)."""
    if not steps:
        return
    if jax.process_index() == 0:
        aside = where.parent / "unreadable"
        aside.mkdir(parents=True, exist_ok=True)
        for step in steps:
            src = where / str(step)
            if src.exists():
                dst = aside / f"{where.name}-{step}"
                n = 1
                while dst.exists():
                    dst, n = aside / f"{where.name}-{step}.{n}", n + 1
                src.rename(dst)
    if jax.process_count() > 1:  # every process must see the same steps before saving again
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("dlvae-jax: unreadable checkpoints set aside")
    manager.reload()


def abstract(tree) -> Any:
    """Shapes, dtypes and shardings of `tree`, for a restore that places arrays directly."""
    return jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, tree)
