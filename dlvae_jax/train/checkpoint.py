"""Orbax checkpoints of a run: the train state, the data position and metadata.

Layout under `<workdir>/checkpoints/`:

    latest/<step>/  the newest `keep` saves (asynchronous), for resuming
    best/<step>/    the one save with the highest validation score: `dice_volume_mean`
                    for models with a mask output, `slice_f1` for classifiers

Each save holds `state` (the `TrainState` pytree), `data` (the grain iterator
state of the last batch the step consumed, JSON) and `meta` (step, metrics).
`restore_latest` walks the saves newest first. A save that Orbax's own
checks reject (a kill in the middle of a write, a damaged file) is skipped
with a warning naming it, so a run resumes from the newest readable save; only
`train` moves such a save aside, and only after it failed twice. A save whose
arrays differ from the expected state (another model option, optimizer or
library version) is an error naming the first differing leaf, and nothing on
disk moves. Readers (`evaluate`, `predict`) never move anything.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import shutil
import warnings
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from dlvae_jax.errors import DlvaeError

BEST_METRIC = "dice_volume_mean"  # models with a mask output
CLASSIFIER_METRIC = "slice_f1"   # models without one (their Dice is constant)


def best_metric(outputs_mask: bool) -> str:
    """The validation metric that picks the best checkpoint of a model."""
    return BEST_METRIC if outputs_mask else CLASSIFIER_METRIC


class DiskFull(DlvaeError):
    """The disk cannot hold a checkpoint."""


def _mib(n: int) -> str:
    return f"{n / 2**20:.0f} MiB"


def _is_disk_full(err: BaseException) -> bool:
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno == errno.ENOSPC:
            return True
        if "No space left on device" in str(err):
            return True
        err = err.__cause__ or err.__context__
    return False


class CheckpointWarning(UserWarning):
    """A checkpoint that could not be read and was skipped."""


@contextlib.contextmanager
def _quiet_absl(quiet: bool):
    """Orbax logs a warning for each option `read_only` overrides; to a reader's user they say nothing."""
    absl = logging.getLogger("absl")
    level = absl.level
    if quiet:
        absl.setLevel(logging.ERROR)
    try:
        yield
    finally:
        absl.setLevel(level)


def _manager(directory: Path, keep: int, async_save: bool, best: bool, create: bool = True) -> ocp.CheckpointManager:
    # Handlers named up front: a manager that did not make a save can then read
    # its metadata (and check it against the template) before restoring it.
    handlers = {"state": ocp.StandardCheckpointHandler(), "data": ocp.JsonCheckpointHandler(),
                "meta": ocp.JsonCheckpointHandler()}
    with _quiet_absl(not create):
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            enable_async_checkpointing=async_save,
            best_fn=(lambda meta: float(meta.get("score", meta.get(BEST_METRIC, float("-inf"))))) if best else None,
            best_mode="max",
            create=create,
            read_only=not create,
        )
        return ocp.CheckpointManager(directory.resolve(), options=options, item_handlers=handlers)


class Checkpoints:
    def __init__(self, workdir: str | Path, keep: int = 2, async_save: bool = True, metric: str = BEST_METRIC,
                 read_only: bool = False):
        """read_only: for readers (`evaluate`, `predict`): no folder is created, nothing is saved or moved."""
        self.metric = metric
        self.root = Path(workdir) / "checkpoints"
        self.latest = _manager(self.root / "latest", keep, async_save, best=False, create=not read_only)
        self.best = _manager(self.root / "best", 1, False, best=True, create=not read_only)
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
        self.check_space(state, step)
        with self._disk_errors(step):
            self.latest.save(step, args=self._args(state, data_state, meta), force=True)

    def check_space(self, state, step: int) -> None:
        """Stops with one line before a save that the disk cannot hold (the state's
        bytes, twice over for the temporary and the kept saves, plus 64 MiB)."""
        need = 2 * sum(int(getattr(x, "nbytes", 0)) for x in jax.tree_util.tree_leaves(state)) + 64 * 2**20
        free = shutil.disk_usage(self.root if self.root.exists() else self.root.parent).free
        if free < need:
            raise DiskFull(f"{self.root}: {_mib(free)} free, checkpoint step {step} needs about {_mib(need)}; "
                           "free some space and run train again (it resumes from the last checkpoint)")

    @contextlib.contextmanager
    def _disk_errors(self, step: int):
        """A disk that fills up during a save: the save's temporaries removed, one line naming the folder."""
        try:
            yield
        except Exception as err:  # noqa: BLE001 - Orbax wraps the OSError in its own types
            if not _is_disk_full(err):
                raise
            self._remove_temporaries()
            free = shutil.disk_usage(self.root if self.root.exists() else self.root.parent).free
            raise DiskFull(f"{self.root}: the disk filled up while writing checkpoint step {step} "
                           f"({_mib(free)} free); nothing half-written was kept; free some space and run train "
                           "again (it resumes from the last complete checkpoint)") from None

    def _remove_temporaries(self) -> None:
        if jax.process_index() != 0:
            return
        for folder in (self.root / "latest", self.root / "best"):
            for tmp in folder.glob("*.orbax-checkpoint-tmp*"):
                shutil.rmtree(tmp, ignore_errors=True)

    def save_best(self, step: int, state, data_state: dict, metrics: dict) -> bool:
        """Saves if `metrics[self.metric]` beats every earlier best; returns whether it did."""
        value = float(metrics.get(self.metric, float("nan")))
        if not value > self.best_value:
            return False
        meta = {"step": int(step), "best_metric": self.metric, "metrics": {self.metric: value, **metrics}}
        self.check_space(state, step)
        with self._disk_errors(step):
            self.best.save(step, args=self._args(state, data_state, meta), metrics={"score": value}, force=True)
            self.best.wait_until_finished()
        self.best_value = value
        return True

    def wait(self) -> None:
        with self._disk_errors(-1 if self.latest.latest_step() is None else self.latest.latest_step()):
            self.latest.wait_until_finished()
            self.best.wait_until_finished()

    def close(self) -> None:
        self.latest.close()
        self.best.close()

    def restore_latest(self, abstract_state, *, set_aside: bool = False):
        """(state, data_state, meta) of the newest readable save, or None when there is none.

        A save whose tree differs from `abstract_state` raises `TemplateMismatch`
        (nothing on disk changes). A save Orbax's own checks reject is skipped
        with a warning; with `set_aside` (the `train` command only) it is then
        moved to `checkpoints/unreadable/`. When saves exist and none is
        readable, `NoReadableCheckpoint` is raised instead of returning None.
        """
        return _restore_newest(self.latest, abstract_state, self.root / "latest", set_aside)

    def restore_best(self, abstract_state, *, set_aside: bool = False):
        return _restore_newest(self.best, abstract_state, self.root / "best", set_aside)


class TemplateMismatch(DlvaeError):
    """A save whose arrays do not match the state the run expects."""


class NoReadableCheckpoint(DlvaeError):
    """Saves exist, and none of them can be read."""


def _key_name(entry) -> str:
    for attr in ("name", "key", "idx"):
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    return str(entry)


def _leaves_by_path(tree) -> dict[str, Any]:
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {"/".join(_key_name(k) for k in path): leaf for path, leaf in leaves}


def _saved_leaves(metadata_tree) -> dict[str, Any]:
    """Orbax's metadata tree (nested dicts and lists of ArrayMetadata) by leaf path."""
    is_leaf = lambda x: hasattr(x, "shape") and hasattr(x, "dtype")  # noqa: E731
    leaves, _ = jax.tree_util.tree_flatten_with_path(metadata_tree, is_leaf=is_leaf)
    return {"/".join(_key_name(k) for k in path): leaf for path, leaf in leaves if is_leaf(leaf)}


def template_mismatch(saved_tree, abstract_state) -> str | None:
    """The first difference between a save's metadata and the expected state, in words; None if they match."""
    saved, want = _saved_leaves(saved_tree), _leaves_by_path(abstract_state)
    for path in sorted(set(saved) | set(want)):
        if path not in saved:
            return f"leaf {path}: not in the save (expected {tuple(want[path].shape)} {want[path].dtype})"
        if path not in want:
            return f"leaf {path}: in the save ({tuple(saved[path].shape)} {saved[path].dtype}) but not expected"
        a, b = saved[path], want[path]
        if tuple(a.shape) != tuple(b.shape) or jax.numpy.dtype(a.dtype) != jax.numpy.dtype(b.dtype):
            return (f"leaf {path}: saved {tuple(a.shape)} {jax.numpy.dtype(a.dtype)}, "
                    f"expected {tuple(b.shape)} {jax.numpy.dtype(b.dtype)}")
    return None


def _read_metadata(manager: ocp.CheckpointManager, step: int):
    """The save's state metadata tree, or raises when Orbax's own checks reject the save."""
    metadata = manager.item_metadata(step)["state"]
    if metadata is None:
        raise ValueError("no state metadata")
    return metadata.tree


def _restore_newest(manager: ocp.CheckpointManager, abstract_state, where: Path, set_aside: bool):
    steps = sorted(manager.all_steps(), reverse=True)
    skipped = []
    try:
        for step in steps:
            path = where / str(step)
            try:
                saved_tree = _read_metadata(manager, step)
            except Exception as err:  # noqa: BLE001 - Orbax raises many types for a damaged save
                if isinstance(err, OSError) and not isinstance(err, FileNotFoundError):
                    raise DlvaeError(f"checkpoint {path}: cannot be read ({type(err).__name__}: {err}); "
                                     "nothing was moved, try again") from None
                _skip_warning(path, f"its metadata fails Orbax's checks: {type(err).__name__}")
                skipped.append(step)
                continue
            mismatch = template_mismatch(saved_tree, abstract_state)
            if mismatch is not None:
                raise TemplateMismatch(
                    f"checkpoint {path} does not match this run's model ({mismatch}); nothing on disk was "
                    "changed. A model option, the optimizer or a library version differs from the run that "
                    "saved it: restore it with that config, or train into another --workdir")
            try:
                out = _restore(manager, step, abstract_state)
            except Exception as first:  # noqa: BLE001
                if isinstance(first, OSError) and not isinstance(first, FileNotFoundError):
                    raise DlvaeError(f"checkpoint {path}: cannot be read ({type(first).__name__}: {first}); "
                                     "nothing was moved, try again") from None
                try:  # a passing fault reads the second time; a damaged save fails again
                    out = _restore(manager, step, abstract_state)
                except Exception as err:  # noqa: BLE001
                    _skip_warning(path, f"its arrays fail to load twice: {type(err).__name__}")
                    skipped.append(step)
                    continue
            return out["state"], out["data"], out["meta"]
        if steps:
            raise NoReadableCheckpoint(
                f"{where}: none of the saves ({', '.join(map(str, steps))}) is readable"
                + ("; they were moved to " + str(where.parent / "unreadable") if set_aside else "")
                + "; rerun to start again from step 0, or use --overwrite")
        return None
    finally:
        if set_aside:
            _set_aside(manager, where, skipped)


def _restore(manager: ocp.CheckpointManager, step: int, abstract_state):
    return manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore(), meta=ocp.args.JsonRestore()))


def _skip_warning(path: Path, why: str) -> None:
    warnings.warn(f"checkpoint {path} is unreadable ({why}); falling back to the previous one",
                  CheckpointWarning, stacklevel=4)


def _set_aside(manager: ocp.CheckpointManager, where: Path, steps: list[int]) -> None:
    """Moves saves verified unreadable to checkpoints/unreadable/ (kept for
    inspection, out of the manager's way, so the resumed run can save those
    steps again). Only `train` asks for this; readers never move anything."""
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


def abstract(tree, sharding=None) -> Any:
    """Shapes, dtypes and shardings of `tree`, for a restore that places arrays
    directly: each leaf's own sharding, or `sharding` for every leaf (e.g. the
    runner's replicated sharding, so a save made on 8 devices restores onto
    the devices of this run, however many)."""
    if sharding is None:
        return jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, tree)
    return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)
