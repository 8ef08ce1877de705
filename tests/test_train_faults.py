"""Fault injection for training at scale: restores that never move a good save,
a save made on 8 devices resumed on 4 and on 1, stop agreement without a
collective per step, a log without repeated steps. Tiny shapes (the `tiny_unet`
test config: 32x32 phantoms, a 4-feature U-Net) keep each case to seconds of
compute; these test the machinery, so the model is the one quickest to compile
(DL-VAE-CNN's random streams resume in test_train's kill test). The CLI runs in
subprocesses, as users run it."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest

from test_train import FAST_ENV, TINY_UNET, _cli, _train_losses


def _steps(folder: Path) -> list[int]:
    return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit()) if folder.is_dir() else []


def _env(devices: int) -> dict:
    return dict(FAST_ENV, XLA_FLAGS=FAST_ENV["XLA_FLAGS"] + f" --xla_force_host_platform_device_count={devices}")


# --------------------------------------------------------------- restore: templates


def test_a_mismatched_template_names_the_leaf_and_moves_nothing(tmp_path):
    from dlvae_jax.train.checkpoint import Checkpoints, TemplateMismatch, abstract

    ckpt = Checkpoints(tmp_path, keep=2, async_save=False)
    state = {"params": {"conv": {"kernel": np.ones((3, 3, 1, 4), np.float32)}}, "step": np.array(1, np.int32)}
    ckpt.save(1, state, {"pos": 1})
    ckpt.save_best(1, state, {"pos": 1}, {"dice_volume_mean": 0.5})
    ckpt.wait()
    before = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    wrong = {"params": {"conv": {"kernel": np.ones((3, 3, 1, 8), np.float32)}}, "step": np.array(1, np.int32)}
    for restore in (ckpt.restore_latest, ckpt.restore_best):
        with pytest.raises(TemplateMismatch) as err:
            restore(abstract(wrong), set_aside=True)  # even the train command's restore moves nothing
        msg = str(err.value)
        assert "params/conv/kernel" in msg and "(3, 3, 1, 4) float32" in msg and "(3, 3, 1, 8) float32" in msg
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == before
    # A leaf the save lacks is named too; the matching template still restores.
    extra = dict(state, extra=np.zeros(2, np.float32))
    with pytest.raises(TemplateMismatch, match="leaf extra: not in the save"):
        ckpt.restore_latest(abstract(extra))
    restored, data, meta = ckpt.restore_latest(abstract(state))
    assert meta["step"] == 1 and data == {"pos": 1}
    np.testing.assert_array_equal(restored["params"]["conv"]["kernel"], state["params"]["conv"]["kernel"])
    ckpt.close()


@pytest.fixture(scope="module")
def run8(tmp_path_factory):
    """A tiny run trained on 8 simulated devices (global batch 8), uninterrupted."""
    w = tmp_path_factory.mktemp("run8") / "w"
    res = _cli("train", "--config", TINY_UNET, "--workdir", str(w), "--set", "train.batch_size=8", env=_env(8))
    assert res.returncode == 0, res.stderr[-3000:]
    return w


def test_train_with_another_model_and_no_config_json_moves_no_save(run8, tmp_path):
    w = tmp_path / "w"
    shutil.copytree(run8, w)
    (w / "config.json").unlink()
    latest, best = _steps(w / "checkpoints" / "latest"), _steps(w / "checkpoints" / "best")
    best_meta = (w / "checkpoints" / "best" / str(best[0]) / "meta" / "metadata").read_bytes() \
        if (w / "checkpoints" / "best" / str(best[0]) / "meta" / "metadata").exists() else None
    res = _cli("train", "--config", TINY_UNET, "--workdir", str(w), "--set", "train.batch_size=8",
               "--set", "model.features=8", env=_env(8))
    assert res.returncode == 2, res.stderr[-3000:]
    lines = [l for l in res.stderr.splitlines() if l.strip()]
    assert len(lines) == 1, lines
    assert "does not match this run's model" in lines[0] and "(leaf " in lines[0] and ": saved (" in lines[0], lines[0]
    assert _steps(w / "checkpoints" / "latest") == latest and _steps(w / "checkpoints" / "best") == best
    assert not (w / "checkpoints" / "unreadable").exists()
    if best_meta is not None:
        assert (w / "checkpoints" / "best" / str(best[0]) / "meta" / "metadata").read_bytes() == best_meta


def _damage(save: Path) -> None:
    for f in (save / "state").rglob("*"):
        if f.is_file() and f.stat().st_size > 0:
            f.write_bytes(f.read_bytes()[: max(1, f.stat().st_size // 3)])  # truncated


def test_evaluate_on_a_truncated_latest_save_moves_nothing(run8, tmp_path):
    w = tmp_path / "w"
    shutil.copytree(run8, w)
    newest = _steps(w / "checkpoints" / "latest")[-1]
    _damage(w / "checkpoints" / "latest" / str(newest))
    before = sorted(str(p.relative_to(w)) for p in (w / "checkpoints").rglob("*"))
    res = _cli("evaluate", "--workdir", str(w), "--split", "test", "--checkpoint", "latest", env=_env(8))
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"latest/{newest} is unreadable" in res.stderr
    assert sorted(str(p.relative_to(w)) for p in (w / "checkpoints").rglob("*")) == before
    m = json.loads((w / "metrics_test.json").read_text())
    assert m["checkpoint"] == "latest" and m["checkpoint_step"] < newest


def test_evaluate_with_an_unreadable_best_says_it_scored_the_latest(run8, tmp_path):
    w = tmp_path / "w"
    shutil.copytree(run8, w)
    for step in _steps(w / "checkpoints" / "best"):
        _damage(w / "checkpoints" / "best" / str(step))
    res = _cli("evaluate", "--workdir", str(w), "--split", "test", env=_env(8))
    assert res.returncode == 0, res.stderr[-3000:]
    m = json.loads((w / "metrics_test.json").read_text())
    assert m["checkpoint"] == "latest", m["checkpoint"]
    assert "scoring the latest" in res.stderr


def test_when_every_latest_save_is_unreadable_train_says_so_instead_of_restarting(run8, tmp_path):
    w = tmp_path / "w"
    shutil.copytree(run8, w)
    steps = _steps(w / "checkpoints" / "latest")
    for step in steps:
        _damage(w / "checkpoints" / "latest" / str(step))
    res = _cli("train", "--config", TINY_UNET, "--workdir", str(w), "--set", "train.batch_size=8", env=_env(8))
    assert res.returncode == 2, res.stderr[-3000:]
    assert "none of the saves" in res.stderr and "is readable" in res.stderr
    assert "resuming" not in res.stderr
    # train (only train) set them aside after they failed; nothing was trained over them.
    assert _steps(w / "checkpoints" / "latest") == []
    assert len(list((w / "checkpoints" / "unreadable").iterdir())) == len(steps)


# ------------------------------------------------- a save from 8 devices, resumed on 4 and 1


@pytest.mark.parametrize("devices,runner", [(4, "shard_map"), (1, "pmap")])
def test_a_save_made_on_8_devices_resumes_on_fewer_with_the_same_losses(run8, tmp_path, devices, runner):
    w = tmp_path / "w"
    shutil.copytree(run8, w)
    kept = _steps(w / "checkpoints" / "latest")
    assert kept == [4, 6]
    shutil.rmtree(w / "checkpoints" / "latest" / "6")
    full = _train_losses(run8)
    log = (w / "log.jsonl").read_text()
    res = _cli("train", "--config", TINY_UNET, "--workdir", str(w), "--set", "train.batch_size=8",
               "--parallel", runner, env=_env(devices))
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resuming from step 4" in res.stderr
    rows = [json.loads(l) for l in (w / "log.jsonl").read_text().splitlines()]
    train_steps = [r["step"] for r in rows if r["kind"] == "train"]
    assert train_steps == sorted(set(train_steps)) == list(range(1, 7)), "each step logged once"
    again = _train_losses(w)
    # Within 1e-5, relative above 1 (float32 batch means whose reduction order
    # changes with the device count).
    for step in (5, 6):
        for term in ("total", "segmentation", "segmentation_dice", "classification"):
            a, b = full[step][term], again[step][term]
            assert abs(a - b) <= 1e-5 * max(1.0, abs(a)), (step, term, a, b)
    assert len(log) > 0


# ------------------------------------------------------------------ stop agreement


def test_processes_agree_on_stopping_only_at_boundaries(tmp_path, monkeypatch):
    """Agreeing to stop is a collective across processes: it runs every
    `stop_check_interval` steps and at checkpoints, never on the steps between."""
    from dlvae_jax import configs
    from dlvae_jax.train import loop

    calls = []
    monkeypatch.setattr(loop, "stop_check_interval", lambda cfg: 4)
    real = loop._any_process
    monkeypatch.setattr(loop, "_any_process", lambda flag: calls.append(1) or real(flag))
    cfg = configs.load(TINY_UNET, ["train.steps=9", "train.eval_every=9", "train.checkpoint_every=9"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        summary = loop.train(cfg, tmp_path / "w", progress=False)
    assert summary["steps"] == 9
    assert len(calls) == 3, f"stop agreed {len(calls)} times in 9 steps; expected at steps 4, 8 and 9"
    assert loop.stop_check_interval.__name__ == "<lambda>"


# ------------------------------------------------------------------ the array_record path


def test_training_from_the_array_record_cache_gives_the_in_memory_losses(run8, tmp_path):
    """Same seed, same batches: the run read per batch from its array_record
    cache (WORKDIR/cache) logs the losses of the run that loaded every TIFF."""
    w = tmp_path / "ar"
    res = _cli("train", "--config", TINY_UNET, "--workdir", str(w), "--set", "train.batch_size=8",
               "--set", "data.source=array_record", env=_env(8))
    assert res.returncode == 0, res.stderr[-3000:]
    assert any((w / "cache").rglob("*.array_record*")), "the run did not read an array_record cache"
    mem, ar = _train_losses(run8), _train_losses(w)
    assert sorted(mem) == sorted(ar) == list(range(1, 7))
    for step in mem:
        for term in ("total", "segmentation", "segmentation_dice", "classification"):
            assert abs(mem[step][term] - ar[step][term]) <= 1e-6, (step, term)
    # Resuming under the other source continues on the same batches.
    shutil.rmtree(w / "checkpoints" / "latest" / "6")
    res = _cli("train", "--config", TINY_UNET, "--workdir", str(w), "--set", "train.batch_size=8",
               "--set", "data.source=memory", env=_env(8))
    assert res.returncode == 0 and "resuming from step 4" in res.stderr, res.stderr[-3000:]
    again = _train_losses(w)
    for step in (5, 6):
        assert abs(mem[step]["total"] - again[step]["total"]) <= 1e-6


# ------------------------------------------------------------------ two processes, one killed


def _two_process_train(workdir: Path, port: str) -> list:
    import subprocess
    import sys

    from test_train import REPO_ROOT

    return [subprocess.Popen(
        [sys.executable, "-m", "dlvae_jax.cli", "train", "--config", TINY_UNET, "--workdir", str(workdir),
         "--set", "train.batch_size=8", "--distributed", "--coordinator", f"127.0.0.1:{port}",
         "--num-processes", "2", "--process-id", str(i)],
        cwd=REPO_ROOT, env=_env(4), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]


def test_two_processes_one_killed_after_a_checkpoint_resume_with_the_same_losses(tmp_path):
    """Two gloo processes train; one is SIGKILLed after a checkpoint (the other,
    stuck in a collective, is killed too, as a cluster scheduler would); both
    restart, resume from the checkpoint and log the uninterrupted run's losses."""
    import signal
    import time

    from test_train import _free_port, _wait_for

    full = tmp_path / "full"
    procs = _two_process_train(full, str(_free_port()))
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]

    w = tmp_path / "killed"
    procs = _two_process_train(w, str(_free_port()))
    _wait_for(w / "checkpoints" / "latest" / "4", procs[0])
    procs[1].send_signal(signal.SIGKILL)
    procs[1].wait(timeout=60)
    time.sleep(1)
    if procs[0].poll() is None:
        procs[0].send_signal(signal.SIGKILL)
    procs[0].communicate(timeout=60)
    assert procs[1].returncode == -signal.SIGKILL

    procs = _two_process_train(w, str(_free_port()))
    errs = []
    for p in procs:
        _, err = p.communicate(timeout=600)
        errs.append(err)
        assert p.returncode == 0, err[-3000:]
    assert any("resuming from step" in e for e in errs), errs[0][-2000:]
    a, b = _train_losses(full), _train_losses(w)
    assert sorted(a) == sorted(b) == list(range(1, 7))
    rows = [json.loads(l) for l in (w / "log.jsonl").read_text().splitlines()]
    assert len([r for r in rows if r["kind"] == "train"]) == 6, "each step logged once"
    for step in a:
        for term in ("total", "segmentation", "segmentation_dice", "classification"):
            assert abs(a[step][term] - b[step][term]) <= 1e-6, (step, term)


# ------------------------------------------------------------------ a full disk


def test_a_disk_too_full_for_a_checkpoint_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys):
    from dlvae_jax import cli
    from dlvae_jax.train import checkpoint

    real = checkpoint.shutil.disk_usage
    monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda p: real(p)._replace(free=5 * 2**20))
    w = tmp_path / "w"
    capsys.readouterr()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rc = cli.main(["train", "--config", TINY_UNET, "--workdir", str(w)])
    err = capsys.readouterr().err
    assert rc == 2, err[-3000:]
    lines = [l for l in err.splitlines() if l.startswith("dlvae-jax")]
    assert len(lines) == 1 and "5 MiB free" in lines[0] and str(w / "checkpoints") in lines[0], err[-2000:]
    assert "Traceback" not in err
    assert not list(w.rglob("*orbax-checkpoint-tmp*"))
    assert _steps(w / "checkpoints" / "latest") == []


def test_a_disk_that_fills_during_a_save_leaves_no_temporaries(tmp_path):
    import errno

    from dlvae_jax.train.checkpoint import Checkpoints, DiskFull

    ckpt = Checkpoints(tmp_path, keep=2, async_save=False)
    state = {"w": np.ones((4,), np.float32)}
    ckpt.save(1, state, {"pos": 1})

    def full(step, *args, **kwargs):
        (tmp_path / "checkpoints" / "latest" / f"{step}.orbax-checkpoint-tmp-1234").mkdir()
        raise RuntimeError("save failed") from OSError(errno.ENOSPC, "No space left on device")

    ckpt.latest.save = full
    with pytest.raises(DiskFull, match="filled up while writing checkpoint step 2"):
        ckpt.save(2, state, {"pos": 2})
    assert not list(tmp_path.rglob("*orbax-checkpoint-tmp*"))
    assert _steps(tmp_path / "checkpoints" / "latest") == [1]


def test_a_signal_to_one_of_two_processes_stops_both_after_the_same_step(tmp_path):
    """SIGTERM to process 1 between agreements: it is held until the next one
    (every `train.log_every` steps), then both processes checkpoint the same
    step and stop with 143 (resuming from a checkpoint is tested above)."""
    import signal
    import subprocess
    import sys

    from test_train import REPO_ROOT, _free_port

    w = tmp_path / "w"
    args = ["--set", "train.batch_size=8", "--set", "train.steps=400", "--set", "train.log_every=5",
            "--set", "train.eval_every=400", "--set", "train.checkpoint_every=400"]
    port = str(_free_port())
    procs = [subprocess.Popen(
        [sys.executable, "-m", "dlvae_jax.cli", "train", "--config", TINY_UNET, "--workdir", str(w), *args,
         "--distributed", "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(i)],
        cwd=REPO_ROOT, env=_env(4), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    import time

    t0 = time.time()
    while not ((w / "log.jsonl").exists() and any(json.loads(l)["step"] >= 7 for l in
                                                     (w / "log.jsonl").read_text().splitlines() if l.strip())):
        assert all(p.poll() is None for p in procs), procs[0].communicate()[1][-3000:]
        assert time.time() - t0 < 300
        time.sleep(0.05)
    procs[1].send_signal(signal.SIGTERM)
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [143, 143], [o[1][-1500:] for o in outs]
    saved = _steps(w / "checkpoints" / "latest")
    assert len(saved) == 1 and saved[0] % 5 == 0 and 7 < saved[0] < 400, saved
    assert "interrupted (SIGTERM)" in outs[1][1]
