"""The training loop: data, steps, evaluation, checkpoints, logs, progress.

    train(cfg, workdir, parallel="jit", overwrite=False) -> summary dict

One readable loop around the pure step (`dlvae_jax.train.step`):

1. The workdir is opened through `dlvae_jax.outdir.run_folder` (marker, lock,
   input-overlap checks). A workdir holding another config's run is refused
   unless `overwrite`; one holding this config's run is resumed from its
   newest readable checkpoint, data position included, so the resumed run
   logs the same losses as an uninterrupted one.
2. Each step's batch comes from a grain iterator created here; the iterator
   state saved with a checkpoint is the one right after the batch the step
   consumed (not the prefetch queue's).
3. Step N+1 is dispatched before step N's metrics are pulled to the host, so
   the device does not wait on Python. A NaN or infinite loss stops the run
   with the step and every loss term; the last checkpoint (all finite) stays.
4. Every `eval_every` steps the validation split is evaluated (Dice per
   volume etc., `dlvae_jax.metrics`); the best `dice_volume_mean` (`slice_f1`
   for a classifier, whose Dice does not change) is kept
   in `checkpoints/best`. A run without validation patients (the second
   share of `data.fractions` 0: the final model on every patient, its
   settings chosen by cross-validation) evaluates nothing, keeps no best,
   and its model is the last checkpoint.
5. Only process 0 writes logs, plots and the config; Orbax writes checkpoints
   from every process, as it requires.

SIGINT/SIGTERM: the step in flight finishes, a checkpoint is written, then the
run stops with the signal's exit code (`dlvae_jax.signals`).
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import signal
import sys
import time
from pathlib import Path

import jax
import numpy as np

from dlvae_jax import configs, metrics, outdir, signals
from dlvae_jax.data import lgg
from dlvae_jax.data.pipeline import Shard, eval_dataset, host_iterator, train_dataset
from dlvae_jax.data.source import split_loader
from dlvae_jax.data.synth import synthesize
from dlvae_jax.errors import DlvaeError
from dlvae_jax.io import write_json, write_text
from dlvae_jax.models import example_inputs
from dlvae_jax.train import experiment as ex
from dlvae_jax.train import plots
from dlvae_jax.train.experiment import CONFIG_FILE, EVAL_SEED, LOG_FILE, SUMMARY_FILE
from dlvae_jax.train.checkpoint import Checkpoints, abstract, best_metric
from dlvae_jax.train.runners import make_runner
from dlvae_jax.train.state import abstract_state, create_state
from dlvae_jax.data import shift
from dlvae_jax.train.step import PROBES, eval_outputs, train_step

# Fields that may change when a run is resumed (logging and evaluation cadence).
# train.steps is not among them: it sets the learning-rate schedule's length.
# The data source is among them: both paths give the same batches, byte for byte.
RESUMABLE = {("train", "log_every"), ("train", "eval_every"), ("train", "checkpoint_every"), ("eval", "overlays"),
             ("eval", "batch_size"), ("data", "num_threads"), ("data", "source"), ("data", "cache_dir"),
             ("data", "tfds_dir")}


class NonFiniteLoss(DlvaeError):
    """The loss became NaN or infinite."""


def _flat(d: dict, prefix=()) -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, prefix + (k,)))
        else:
            out[prefix + (k,)] = v
    return out


# Fields added after runs were written, with the value that gives the behaviour
# those runs had: absent from an old config.json, they are not a conflict.
ADDED_WITH_DEFAULT = {("eval", "tta"): False, ("eval", "min_component"): 0, ("eval", "presence"): "class",
                      ("eval", "min_volume_share"): 0.0,
                      ("model", "use_vae"): True, ("loss", "dice_kind"): "slice", ("loss", "dice_fn_weight"): 0.5,
                      ("augment", "p_missing_sequence"): 0.0}


def _config_conflict(old: dict, new: dict) -> list[str]:
    a, b = _flat(old), _flat(new)
    for key, value in ADDED_WITH_DEFAULT.items():
        if key not in a and b.get(key) == value:
            a[key] = value
    return [".".join(k) for k in sorted(set(a) | set(b))
            if k not in RESUMABLE and k != ("config_name",) and _norm(k, a.get(k)) != _norm(k, b.get(k))]


def _norm(key, v):
    if key == ("data", "data_dir") and v:  # stored absolute now; relative (to the cwd) by older runs
        return str(Path(str(v)).expanduser().resolve())
    return list(v) if isinstance(v, tuple) else v


def resolve_data_dir(cfg, workdir: Path) -> tuple[Path, bool]:
    """(data folder, synthesized?): the config's data_dir, or synthetic phantoms in workdir/data."""
    if cfg.data.data_dir:
        if "$" in str(cfg.data.data_dir):
            raise DlvaeError(f"data.data_dir is {cfg.data.data_dir!r} and that environment variable is not set: "
                             "set DLVAE_LGG_DIR to the kaggle_3m folder, or pass --data-dir DIR")
        path = Path(cfg.data.data_dir).expanduser()
        if not path.is_dir():
            raise DlvaeError(f"{path}: data folder not found (data.data_dir; set it with --data-dir)")
        return path.resolve(), False
    data = workdir / "data"
    if not (data / outdir.MARKER).exists() and not data.exists():
        synthesize(data, n_patients=int(cfg.data.synth_patients), seed=int(cfg.data.synth_seed),
                   size=int(cfg.data.synth_size), slices_per_patient=int(cfg.data.synth_slices))
    return data, True


class Logger:
    """log.jsonl (one JSON object per line) and TensorBoard events, process 0 only."""

    def __init__(self, workdir: Path, enabled: bool):
        self.enabled = enabled
        self.path = workdir / LOG_FILE
        self.tb = None
        if enabled:
            try:
                from tensorboardX import SummaryWriter

                self.tb = SummaryWriter(str(workdir / "tensorboard"))
            except ImportError:
                self.tb = None

    def write(self, kind: str, step: int, values: dict) -> None:
        if not self.enabled:
            return
        clean = {k: (v if not isinstance(v, float) or math.isfinite(v) else None) for k, v in values.items()}
        row = {"kind": kind, "step": int(step), "time": round(time.time(), 3), **clean}
        with open(self.path, "a") as f:
            f.write(json.dumps(row, sort_keys=True) + "\n")
        if self.tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)) and math.isfinite(v):
                    self.tb.add_scalar(f"{kind}/{k}", v, int(step))

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def _scalars(tree) -> dict[str, float]:
    return {k: float(v) for k, v in jax.device_get(tree).items()}


def evaluate_split(runner, variables, loader, cfg) -> dict:
    """Scores a split held by this process with the runner's sharded eval; returns
    the metrics report (`dlvae_jax.metrics`), with the decision rule of
    `dlvae-jax evaluate` (`metrics.decide`).

    variables: from `runner.eval_variables(state)` or `runner.put_variables`,
    placed once for the whole split. The global eval batch is
    `eval.batch_size` rounded up to a multiple of the device count; every
    process feeds its rows of each global batch and every device scores its
    part. Padding rows (`valid_B` false) are dropped, so each slice is scored
    exactly once; the per-slice figures of all processes are then gathered
    (one collective per evaluation) so every process reports the same numbers
    and agrees on the best checkpoint."""
    n_dev = runner.mesh.size
    global_batch = -(-int(cfg.eval.batch_size) // n_dev) * n_dev
    ds = eval_dataset(loader, global_batch_size=global_batch, shard=Shard.from_jax())
    rows = []
    min_component, presence = int(cfg.eval.get("min_component", 0)), str(cfg.eval.get("presence", "class"))
    for host in host_iterator(ds, num_threads=1):
        out = runner.local_rows(runner.eval(variables, runner.put_batch(host)))
        n, shape = len(host["index_B"]), host["mask_BxHxW"].shape[1:]
        masks, labels = metrics.decide(out, n, shape, min_component, presence)
        truth = host["mask_BxHxW"] > 0
        row = dict(metrics.slice_stats(masks, truth, labels, truth.any(axis=(1, 2))),
                   index=host["index_B"].astype(np.int64))
        if "latent_mean_BxD" in out:  # the VAE's diagnostics (`eval_outputs(diagnostics=True)`)
            row["latent_mean"], row["latent_kl"] = out["latent_mean_BxD"], out["latent_kl_BxD"]
            for name in PROBES:
                probe = {"prob_BxHxW": out[f"probe_{name}_prob_BxHxW"],
                         "tumor_prob_B": out[f"probe_{name}_tumor_prob_B"]}
                m, lab = metrics.decide(probe, n, shape, min_component, presence)
                row.update({f"probe_{name}_{k}": v for k, v in metrics.probe_counts(m, truth, lab).items()})
        rows.append(row)
    local = {k: np.concatenate([r[k] for r in rows]) for k in rows[0]}
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        local = {k: np.asarray(multihost_utils.process_allgather(v, tiled=True)) for k, v in local.items()}
    return _report_from_rows(local, loader.records, ex.latent_sizes(cfg))


def _report_from_rows(rows: dict[str, np.ndarray], records, latent_sizes: dict | None = None) -> dict:
    index = rows["index"]
    order = np.argsort(np.where(index >= 0, index, np.iinfo(np.int64).max), kind="stable")
    order = order[index[order] >= 0]
    acc = metrics.SegmentationAccumulator()
    extra = [k for k in rows if k.startswith(("latent_", "probe_"))]
    part = {k: v[order] for k, v in rows.items() if k != "index" and k not in extra}
    patients = [records[i].patient for i in index[order]]
    acc.add_stats(part, patients)
    report = acc.report()
    if "latent_mean" in rows:
        report["latent"] = metrics.latent_report(rows["latent_mean"][order], rows["latent_kl"][order], latent_sizes)
        probes = {name: {k[len(f"probe_{name}_"):]: rows[k][order] for k in extra if k.startswith(f"probe_{name}_")}
                  for name in PROBES}
        report["probe"] = metrics.probe_report(part, probes, patients)
    return report


def summary_metrics(report: dict) -> dict:
    keys = ("slice_accuracy", "slice_precision", "slice_recall", "slice_f1", "pixel_f1", "dice_volume_mean",
            "dice_volume_median", "dice_tumor_slices_mean", "iou_mean", "hd95_mean")
    out = {k: float(report[k]) for k in keys if report.get(k) is not None}  # None: NaN in a written report
    if "latent" in report:
        out["latent_kl_nats"] = float(report["latent"]["kl_nats"])
        out["latent_active_units"] = float(report["latent"]["active_units"])
        for name in PROBES:
            out[f"probe_{name}_dice_drop"] = float(report["probe"][name]["dice_drop"])
            out[f"probe_{name}_accuracy_drop"] = float(report["probe"][name]["accuracy_drop"])
    return out


PROGRESS_CHOICES = ("bar", "lines", "none")


def progress_mode(progress: bool | str | None) -> str:
    """"bar" (a terminal), "lines" (one line per log interval on stderr: batch
    jobs, `> log 2>&1`, nohup, SLURM) or "none"; None picks by whether stderr
    is a terminal, True/False mean "bar"/"none"."""
    if progress is None:
        return "bar" if sys.stderr.isatty() else "lines"
    if isinstance(progress, bool):
        return "bar" if progress else "none"
    if progress not in PROGRESS_CHOICES:
        raise DlvaeError(f"progress must be one of {PROGRESS_CHOICES}, got {progress!r}")
    return progress


def _duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, m, s = seconds // 3600, seconds % 3600 // 60, seconds % 60
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def train(cfg, workdir: str | Path, *, parallel: str = "jit", overwrite: bool = False,
          progress: bool | str | None = None, splits: dict | None = None) -> dict:
    """Trains (or resumes) the run of `cfg` in `workdir`; returns a summary dict.

    progress: see `progress_mode` (default: a bar on a terminal, else lines).
    splits: {"train", "validation", "test": [patient ids]} to use instead of
    the config's seeded split (a cross-validation fold)."""
    ex.check_config(cfg)
    workdir = Path(workdir)
    is_main = jax.process_index() == 0
    progress = progress_mode(progress)
    new = json.loads(configs.to_json(cfg))
    old_path = workdir / CONFIG_FILE
    if old_path.exists() and not overwrite:
        try:
            old = configs.from_json(old_path.read_text(), source=old_path).to_dict()
        except configs.ConfigError as err:
            raise DlvaeError(f"{err}; use --overwrite to start the run again") from None
        except OSError as err:
            raise DlvaeError(f"{old_path}: unreadable ({err}); use --overwrite to start the run again") from None
        conflict = _config_conflict(old, new)
        if conflict:
            raise DlvaeError(f"{workdir}: holds a run of another config (differs in {', '.join(conflict[:6])}); "
                             "use another --workdir, or --overwrite to replace that run")
    inputs = [cfg.data.data_dir] if cfg.data.data_dir else []
    if not is_main:
        # Process 0 owns the workdir (marker, lock, config, synthetic data,
        # splits); the others start once it has set them up.
        _barrier("dlvae-jax train: workdir ready")
        return _train_in(cfg, workdir.resolve(), parallel, is_main, progress)
    with outdir.run_folder(workdir, "train", overwrite=overwrite, inputs=inputs) as wd:
        (wd / CONFIG_FILE).write_text(configs.to_json(cfg))
        data_dir, _ = resolve_data_dir(cfg, wd)
        ex.workdir_splits(wd, lgg.scan(data_dir), cfg, splits)
        _barrier("dlvae-jax train: workdir ready")
        return _train_in(cfg, wd, parallel, is_main, progress)


def stop_check_interval(cfg) -> int:
    """Steps between two agreements on stopping (signals) across processes:
    every step with one process (no collective is needed), else the logging
    interval, so a signal is acted on within `train.log_every` steps."""
    return 1 if jax.process_count() == 1 else max(1, int(cfg.train.log_every))


def truncate_log(path: Path, step: int) -> None:
    """Drops the log rows of steps after `step` (logged by a run that was then
    killed before its next checkpoint), so a resumed run's log has each step once."""
    if not path.exists():
        return
    lines = path.read_text().splitlines(keepends=True)
    kept = []
    for line in lines:
        try:
            row_step = int(json.loads(line).get("step", 0))
        except (ValueError, TypeError, AttributeError):
            continue  # a line cut by the kill
        if row_step <= step:
            kept.append(line)
    if len(kept) != len(lines):
        write_text(path, "".join(kept))


def _any_process(flag) -> bool:
    """Whether `flag` holds on any process (Orbax saves are collective: every
    process must decide the same)."""
    if jax.process_count() == 1:
        return bool(flag)
    from jax.experimental import multihost_utils

    return bool(np.any(multihost_utils.process_allgather(np.asarray(bool(flag)))))


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def _train_in(cfg, wd: Path, parallel: str, is_main: bool, progress: str) -> dict:
    if int(cfg.train.batch_size) % jax.device_count():
        raise DlvaeError(f"train.batch_size {cfg.train.batch_size} does not split over {jax.device_count()} "
                         "devices; use a multiple of the device count")
    data_dir, _ = resolve_data_dir(cfg, wd)
    index = lgg.scan(data_dir)
    splits = ex.workdir_splits(wd, index, cfg)
    channels = cfg.data.channels
    # In memory for small folders, else per batch from an array_record cache
    # (each process reading only its shard): `dlvae_jax.data.source`.
    source = dict(source=cfg.data.source, cache_dir=cfg.data.cache_dir or wd / "cache",
                  tfds_dir=cfg.data.tfds_dir or None)
    train_loader = split_loader(index, splits, "train", channels, **source)
    # With no validation patients (data.fractions' second share 0) nothing is
    # scored while training and the model is the last checkpoint.
    val_loader = split_loader(index, splits, "validation", channels, **source) if splits.get("validation") else None

    model = ex.model_from_config(cfg)
    axis_model = ex.model_from_config(cfg, norm_axis_name="data") if parallel != "jit" else model
    tx, schedule = ex.optimizer_from_config(cfg)
    prep, augment, loss_cfg = ex.prep_from_config(cfg), ex.augment_from_config(cfg), ex.loss_from_config(cfg)
    step_fn = functools.partial(train_step, model=axis_model, tx=tx, loss_cfg=loss_cfg, prep=prep,
                                augment=augment, lr_schedule=schedule)
    eval_fn = functools.partial(eval_outputs, model=model, prep=prep,
                                eval_key=jax.random.key_data(jax.random.key(EVAL_SEED)),
                                diagnostics=ex.latent_sizes(cfg) is not None)
    runner = make_runner(parallel, step_fn, eval_fn)

    init = example_inputs(2, int(cfg.data.image_size), 3 if channels == "all" else 1)
    ckpt = Checkpoints(wd, keep=int(cfg.train.keep_checkpoints), metric=best_metric(type(model).outputs_mask))
    # The template carries the runner's replicated sharding: a save made on any
    # number of devices (or under another runner) is placed straight onto this run's.
    template = abstract(abstract_state(model, tx, init), runner.replicated)
    restored = ckpt.restore_latest(template, set_aside=True)
    data_state = None
    if restored is not None:
        state, data_state, meta = restored
        if int(meta["step"]) < int(cfg.train.steps):
            print(f"resuming from step {int(meta['step'])} ({wd / 'checkpoints'})", file=sys.stderr)
    else:
        state = create_state(model, tx, jax.random.key(int(cfg.train.seed)), init)
    start = int(state.step)
    total = int(cfg.train.steps)
    if start >= total:  # a finished run: its summary, logs and plots stay as they are
        ckpt.close()
        try:
            prior = json.loads((wd / SUMMARY_FILE).read_text())
        except (OSError, ValueError):
            prior = {}
        return dict(prior, workdir=str(wd), steps=total, resumed_from=start, already_finished=True,
                    data_dir=str(data_dir))
    if is_main:
        truncate_log(wd / LOG_FILE, start)
        if not (wd / shift.PROFILE_FILE).exists():  # what evaluate and predict compare their slices with
            shift.write_training_profile(wd, train_loader.records, cfg.data.data_dir)
    state = runner.put_state(state)

    shard = Shard.from_jax()
    ds = train_dataset(train_loader, global_batch_size=int(cfg.train.batch_size),
                       seed=int(cfg.train.seed), shard=shard)
    it = iter(host_iterator(ds, num_threads=int(cfg.data.num_threads)))
    if data_state is not None:
        it.set_state(data_state)
    logger = Logger(wd, is_main)
    bar = None
    lines = progress == "lines" and is_main
    if progress == "bar" and is_main:
        from tqdm import tqdm

        bar = tqdm(total=total, initial=start, desc="train", unit="step", dynamic_ncols=True, file=sys.stderr)

    last = {"step": start, "train": {}, "eval": {}}
    stop_every = stop_check_interval(cfg)
    pending = None  # (step number, device metrics) of the step in flight
    last_data_state = data_state
    t0, seen0 = time.perf_counter(), start
    batch_size = int(cfg.train.batch_size)

    def finish_step(step_no, dev_metrics):
        host = _scalars(dev_metrics)
        finite = host.pop("params_finite", 1.0) == 1.0
        if not math.isfinite(host["total"]) or not finite:
            terms = ", ".join(f"{k}={v:.4g}" for k, v in sorted(host.items()))
            what = (f"loss is {host['total']}" if not math.isfinite(host["total"])
                    else "the update made the parameters non-finite")
            raise NonFiniteLoss(f"{what} at step {step_no} ({terms}); stopped, "
                                f"the last checkpoint in {wd / 'checkpoints'} is kept")
        last["train"] = host
        if step_no % int(cfg.train.log_every) == 0 or step_no == total:
            rate = (step_no - seen0) * batch_size / max(time.perf_counter() - t0, 1e-9)
            logger.write("train", step_no, dict(host, slices_per_s=round(rate, 3)))
            if bar is not None:
                bar.set_postfix(loss=f"{host['total']:.4f}", sl_s=f"{rate:.1f}")
            if lines:
                eta = (total - step_no) * batch_size / max(rate, 1e-9)
                dice = last["eval"].get("dice_volume_mean")
                print(f"train step {step_no}/{total} ({100 * step_no // total}%)  loss {host['total']:.4f}  "
                      f"{rate:.1f} slices/s  ETA {_duration(eta)}"
                      + (f"  val Dice {dice:.3f} (step {last['eval_step']})" if dice is not None else ""),
                      file=sys.stderr, flush=True)

    def checkpoint(step_no, st, dstate, eval_metrics=None):
        host_state = runner.get_state(st)
        ckpt.save(step_no, host_state, dstate, eval_metrics)
        if eval_metrics:
            ckpt.save_best(step_no, host_state, dstate, eval_metrics)

    # With several processes a stop signal is held across steps until the next
    # agreement (the per-step block below would otherwise raise it at once, and
    # the other processes would wait in a collective for a process that left).
    hold = signals.deferred(finish_s=1800) if stop_every > 1 else contextlib.nullcontext()
    try:
        with hold:
            for step_no in range(start + 1, total + 1):
                with signals.deferred(finish_s=300):
                    host_batch = next(it)
                    data_pos = it.get_state()
                    state, dev_metrics = runner.step(state, runner.put_batch(host_batch))
                    if pending is not None:
                        finish_step(*pending)
                    pending = (step_no, dev_metrics)
                    last_data_state = data_pos
                    if bar is not None:
                        bar.update(1)
                    do_eval = val_loader is not None and (step_no % int(cfg.train.eval_every) == 0
                                                          or step_no == total)
                    do_ckpt = (do_eval or step_no % int(cfg.train.checkpoint_every) == 0
                               or step_no == total)
                    # Whether to stop is agreed at these boundaries only: one small
                    # collective every `stop_every` steps (none at all with one process),
                    # never a blocking one per step; all processes stop after the same step.
                    stop = False
                    if do_ckpt or step_no % stop_every == 0:
                        stop = _any_process(signals.pending())
                    do_ckpt = do_ckpt or stop
                    if do_ckpt:
                        finish_step(*pending)
                        pending = None
                        eval_metrics = None
                        if do_eval:
                            report = evaluate_split(runner, runner.eval_variables(state), val_loader, cfg)
                            eval_metrics = summary_metrics(report)
                            logger.write("eval", step_no, eval_metrics)
                            last["eval"], last["eval_step"] = eval_metrics, step_no
                            if bar is not None:
                                bar.set_postfix(loss=f"{last['train']['total']:.4f}",
                                                val_dice=f"{eval_metrics['dice_volume_mean']:.3f}")
                        checkpoint(step_no, state, last_data_state, eval_metrics)
                        last["step"] = step_no
                    if stop:
                        ckpt.wait()
                        signals.check()  # this process's own signal, now that the checkpoint is written
                        raise signals.Interrupted(signal.SIGTERM)  # another process was signalled: stop together
        if pending is not None:
            finish_step(*pending)
        last["step"] = total
    finally:
        try:
            ckpt.wait()
        finally:
            ckpt.close()
        if bar is not None:
            bar.close()
        logger.close()
    elapsed = time.perf_counter() - t0
    summary = {"workdir": str(wd), "steps": total, "resumed_from": start, "seconds": round(elapsed, 1),
               "slices_per_s": round((total - start) * batch_size / max(elapsed, 1e-9), 3),
               "train": last["train"], "validation": last["eval"], "best_metric": ckpt.metric if val_loader is not None else None,
               "best_value": ckpt.best_value if val_loader is not None else None}
    if is_main:
        write_json(wd / SUMMARY_FILE, summary)
        plots.training_plots(wd)
    summary["data_dir"] = str(data_dir)
    return summary
