"""Training: configs, the runners against the single-device step on 8
simulated devices, two real processes against one, resume after SIGKILL,
a corrupted checkpoint, a non-finite loss, and evaluate/predict on a trained
run. Tiny shapes (32x32 synthetic phantoms, 4-feature models) keep it short."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from dlvae_jax import configs
from dlvae_jax.errors import DlvaeError

REPO_ROOT = Path(__file__).resolve().parents[1]
TINY = str(REPO_ROOT / "tests" / "configs" / "tiny.py")
# The tiny config with a U-Net: half the compile time, for tests of the training machinery rather than the model.
TINY_UNET = str(REPO_ROOT / "tests" / "configs" / "tiny_unet.py")
# Compiling, not running, dominates these tiny programs on CPU.
FAST_ENV = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_backend_optimization_level=0")


def _cli(*args, env=None, timeout=600):
    return subprocess.run([sys.executable, "-m", "dlvae_jax.cli", *args], cwd=REPO_ROOT, env=env or FAST_ENV,
                          capture_output=True, text=True, timeout=timeout)


def _train_losses(workdir: Path) -> dict[int, dict]:
    """step -> the last logged train row of that step (a resumed run re-logs its steps)."""
    rows = {}
    for line in (workdir / "log.jsonl").read_text().splitlines():
        r = json.loads(line)
        if r["kind"] == "train":
            rows[r["step"]] = r
    return rows


# ------------------------------------------------------------------ configs


def test_every_named_config_loads_and_builds_its_model():
    from dlvae_jax.train import experiment as ex

    for name in configs.NAMES:
        cfg = configs.load(name)
        ex.check_config(cfg)
        assert cfg.model.name in ("dlvae_cnn", "unet", "cnn", "vgg16", "dcnn")
    assert configs.load("cpu").data.image_size == 64 and configs.load("unet").data.image_size == 128
    assert configs.load("default").model.dtype == "bfloat16"


def test_real_data_configs_read_the_folder_from_the_environment(tmp_path, monkeypatch):
    """cpu/default name no machine path: DLVAE_LGG_DIR (made absolute) or --data-dir."""
    data = tmp_path / "lgg"
    data.mkdir()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DLVAE_LGG_DIR", "lgg")
    assert configs.load("cpu").data.data_dir == str(data)
    monkeypatch.delenv("DLVAE_LGG_DIR")
    cfg = configs.load("default")
    assert cfg.data.data_dir == "${DLVAE_LGG_DIR}"
    with pytest.raises(DlvaeError, match="DLVAE_LGG_DIR"):
        from dlvae_jax.train.loop import train

        train(cfg, tmp_path / "run", progress="none")
    assert not (tmp_path / "run").exists()


def test_loss_overrides_name_registered_terms_and_valid_schedules():
    from dlvae_jax import losses
    from dlvae_jax.train import experiment as ex

    cfg = configs.load("demo", ["loss.weights.cosine=0.5", "loss.schedules.kl=cyclical:100:0.25",
                                "loss.reduction=sum"])
    loss = ex.loss_from_config(cfg)
    assert loss.cosine == 0.5 and loss.schedule("kl") == "cyclical:100:0.25" and loss.reduction == "sum"
    with pytest.raises(DlvaeError, match=r"loss.weights has no field 'kll'; did you mean kl"):
        configs.load("demo", ["loss.weights.kll=1"])
    with pytest.raises(DlvaeError, match=r"loss.schedules.kl: schedule 'sometimes'"):
        configs.load("demo", ["loss.schedules.kl=sometimes"])
    with pytest.raises(DlvaeError, match=r"loss.reduction must be one of pixel, sum, mean"):
        configs.load("demo", ["loss.reduction=median"])
    with pytest.raises(DlvaeError, match=r"loss.dice_kind must be one of slice, batch"):
        configs.load("demo", ["loss.dice_kind=volume"])
    with pytest.raises(DlvaeError, match=r"eval.presence must be one of class, mask"):
        configs.load("demo", ["eval.presence=area"])
    with pytest.raises(DlvaeError, match=r"eval.presence=mask needs a mask, and cnn only classifies"):
        configs.load("cnn", ["eval.presence=mask"])
    assert ex.loss_from_config(configs.load("demo", ["loss.dice_kind=batch"])).dice_kind == "batch"
    # A term registered (e.g. by a config file) takes a weight that the config did not list.
    losses.term("test_extra_term")(lambda outputs, batch, cfg, ctx: None)
    try:
        cfg = configs.load("demo", ["loss.weights.test_extra_term=0.25"])
        assert ex.loss_from_config(cfg).term_weights["test_extra_term"] == 0.25
    finally:
        del losses.TERMS["test_extra_term"]
    # A run's config.json naming a term this process never registered still loads (evaluate needs no loss).
    assert configs.from_json(configs.to_json(cfg)).loss.weights.test_extra_term == 0.25


def test_overrides_are_type_checked_and_unknown_fields_named():
    cfg = configs.load("demo", ["train.steps=7", "optimizer.learning_rate=1", "model.name=unet",
                                "data.fractions=(0.6, 0.2, 0.2)"])
    assert cfg.train.steps == 7 and isinstance(cfg.optimizer.learning_rate, float)
    assert cfg.model.name == "unet" and tuple(cfg.data.fractions) == (0.6, 0.2, 0.2)
    with pytest.raises(DlvaeError, match=r"train has no field 'step'; did you mean steps"):
        configs.load("demo", ["train.step=7"])
    with pytest.raises(DlvaeError, match=r"train.steps: expected a value of type int, got 'many'"):
        configs.load("demo", ["train.steps=many"])
    with pytest.raises(DlvaeError, match=r"train.steps: expected a value of type int, got None"):
        configs.load("demo", ["train.steps=None"])
    with pytest.raises(DlvaeError, match=r"data.fractions: expected 3 values, got 1"):
        configs.load("demo", ["data.fractions=(0.5,)"])
    # Options of the model the config does not list can be set too, and every
    # option is written out (a later change of a default cannot pass for the same run).
    cfg = configs.load("unet", ["model.norm=group"])
    assert cfg.model.norm == "group" and cfg.model.classifier_hidden == 128
    with pytest.raises(DlvaeError, match=r"model has no field 'vae_norm'"):
        configs.load("unet", ["model.vae_norm=group"])
    with pytest.raises(DlvaeError, match="expected KEY=VALUE"):
        configs.load("demo", ["train.steps"])
    with pytest.raises(DlvaeError, match="unknown config"):
        configs.load("nope")


def test_cli_rejects_a_bad_override_in_one_line(tmp_path):
    res = _cli("train", "--config", "demo", "--workdir", str(tmp_path / "w"), "--set", "optimizer.lr=1")
    assert res.returncode == 2, res.stderr
    lines = [l for l in res.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and "optimizer has no field 'lr'" in lines[0], res.stderr
    assert not (tmp_path / "w").exists()


# ------------------------------------------------------------------ runners


RUNNER_CHECK = r"""
import functools, sys
import jax, jax.numpy as jnp, numpy as np
from dlvae_jax.data.augment import AugmentConfig
from dlvae_jax.losses import LossConfig
from dlvae_jax.models import example_inputs, get_model
from dlvae_jax.train.runners import make_runner
from dlvae_jax.train.state import create_state
from dlvae_jax.train.step import PrepConfig, eval_outputs, train_step
assert jax.device_count() == 8
rng = np.random.default_rng(0)
B, S = 16, 32
yy, xx = np.mgrid[:S, :S]
masks = np.stack([((yy - 10 - i % 7) ** 2 + (xx - 14) ** 2 < 20 + i) for i in range(B)]).astype(np.uint8)
masks[::3] = 0
images = (rng.integers(20, 120, (B, S, S, 1)) + 100 * masks[..., None]).astype(np.uint8)
batch = {"image_BxHxWxC": images, "mask_BxHxW": masks, "label_B": masks.reshape(B, -1).any(1).astype(np.int32),
         "valid_B": np.ones(B, bool), "index_B": np.arange(B, dtype=np.int32)}
# Plain SGD: Adam's first step is lr * sign(g), so a parameter whose gradient
# is zero up to rounding would move by +-lr depending on the summation order.
import optax
tx = optax.sgd(0.05)
prep = PrepConfig(image_size=S, n_init=1)
name = sys.argv[1]
kw = dict(features=4, levels=2, dtype="float32")
if name == "dlvae_cnn":
    # dropout in the class head and label dropout: every random draw of the model is exercised
    kw.update(vae_features=4, vae_levels=2, specific_dim=4, shared_dim=4, dropout=0.3, label_dropout=0.5)
model = get_model(name, **kw)
state0 = jax.device_get(create_state(model, tx, jax.random.key(1), example_inputs(2, S, 1)))  # host copy: steps donate

loss_cfg = LossConfig.make(free_bits=float(sys.argv[3]), dice_kind=sys.argv[4], dice_fn_weight=float(sys.argv[5]))
def step_fn(model):
    return functools.partial(train_step, model=model, tx=tx, loss_cfg=loss_cfg, prep=prep,
                             augment=AugmentConfig())

ev = functools.partial(eval_outputs, model=model, prep=prep, eval_key=jax.random.key_data(jax.random.key(0)))
one = jax.device_put(state0, jax.devices()[0])
ref_state, ref_metrics = jax.jit(step_fn(model))(one, jax.device_put(batch, jax.devices()[0]))
ref_state = jax.device_get(ref_state)
ref_eval = jax.device_get(jax.jit(ev)(ref_state.variables(), batch))
runners = sys.argv[2].split(",")
for runner_name in runners:
    m = model if runner_name == "jit" else model.clone(norm_axis_name="data")
    r = make_runner(runner_name, step_fn(m), ev)
    st, metrics = r.step(r.put_state(state0), r.put_batch(batch))
    st = jax.device_get(r.get_state(st))
    diffs = jax.tree_util.tree_map(lambda a, b: float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)))),
                                   (st.params, st.batch_stats), (ref_state.params, ref_state.batch_stats))
    worst = max(jax.tree_util.tree_leaves(diffs))
    nbs = len(jax.tree_util.tree_leaves(st.batch_stats))
    # relative above 1: grad_norm and summed terms are large, their rounding scales with them
    loss_diff = max(abs(float(metrics[k]) - float(ref_metrics[k])) / max(1.0, abs(float(ref_metrics[k])))
                    for k in ref_metrics)
    assert set(metrics) == set(ref_metrics)
    out = r.local_rows(r.eval(r.put_variables(st.variables()), r.put_batch(batch)))
    eval_diff = float(np.max(np.abs(out["prob_BxHxW"] - ref_eval["prob_BxHxW"])))
    print({k: (float(metrics[k]), float(ref_metrics[k])) for k in ref_metrics}, file=sys.stderr)
    print(f"RESULT {runner_name} {worst:.3e} {loss_diff:.3e} {eval_diff:.3e} {nbs}")
"""


# free_bits 0.3 nats: at this state the dimensions' batch-mean KL spans 0.18-1.24,
# so the floor is active for some dimensions and not for others, and the
# per-device means of 2 rows fall on either side of it.
# unet with batch Dice as Tversky's index (b = 0.7), which pools the global batch (per
# device, 2 rows each, it would differ); dlvae_cnn with the per-slice Dice.
@pytest.mark.parametrize("model,free_bits,dice_kind,fn_weight", [("unet", 0.0, "batch", 0.7),
                                                                 ("dlvae_cnn", 0.3, "slice", 0.5)])
def test_each_runner_equals_the_single_device_step_on_8_devices(model, free_bits, dice_kind, fn_weight):
    """One step on a global batch of 16 over 8 simulated devices: parameters,
    batch-norm statistics and every logged metric within 1e-5 of the
    single-device step, for every runner. For dlvae_cnn this needs the model's
    own draws (VAE noise, label dropout, dropout) keyed per example, and free
    bits floored on the global batch mean, not per device (both failed before:
    one draw per device, a floor per device)."""
    runners = "jit,shard_map,pmap"
    env = dict(FAST_ENV, XLA_FLAGS=FAST_ENV["XLA_FLAGS"] + " --xla_force_host_platform_device_count=8")
    res = subprocess.run([sys.executable, "-c", RUNNER_CHECK, model, runners, str(free_bits), dice_kind,
                          str(fn_weight)],
                         cwd=REPO_ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    results = [l.split() for l in res.stdout.splitlines() if l.startswith("RESULT")]
    assert [r[1] for r in results] == runners.split(",")
    for _, name, worst, loss_diff, eval_diff, nbs in results:
        assert int(nbs) > 0, "the model has batch norm: its statistics are compared too"
        assert float(worst) <= 1e-5, (name, worst)
        assert float(loss_diff) <= 1e-5, (name, loss_diff)
        assert float(eval_diff) <= 1e-5, (name, eval_diff)


# -------------------------------------------------------- resume and failures


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """An uninterrupted tiny run (6 steps, checkpoints at 2, 4, 6)."""
    w = tmp_path_factory.mktemp("run") / "full"
    res = _cli("train", "--config", TINY, "--workdir", str(w))
    assert res.returncode == 0, res.stderr[-3000:]
    return w


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 300) -> None:
    t0 = time.time()
    while not path.exists():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.time() - t0 < timeout, f"{path} did not appear"
        time.sleep(0.2)


def test_a_run_killed_after_a_checkpoint_resumes_with_the_same_losses(trained, tmp_path):
    w = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "dlvae_jax.cli", "train", "--config", TINY, "--workdir", str(w)],
                            cwd=REPO_ROOT, env=FAST_ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # Orbax renames a finished save into place: step 4's folder means its save is complete.
    _wait_for(w / "checkpoints" / "latest" / "4", proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    res = _cli("train", "--config", TINY, "--workdir", str(w))
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resuming from step" in res.stderr
    full, resumed = _train_losses(trained), _train_losses(w)
    assert sorted(full) == sorted(resumed) == list(range(1, 7))
    for step in full:
        for term in ("total", "segmentation", "kl", "reconstruction", "classification"):
            assert abs(full[step][term] - resumed[step][term]) <= 1e-6, (step, term)


def test_a_corrupted_newest_checkpoint_falls_back_with_a_warning(trained, tmp_path):
    import shutil

    w = tmp_path / "copy"
    shutil.copytree(trained, w)
    newest = w / "checkpoints" / "latest" / "6"
    for f in (newest / "state").rglob("*"):
        if f.is_file() and f.stat().st_size > 0:
            f.write_bytes(b"\0garbage")
    res = _cli("train", "--config", TINY, "--workdir", str(w), "--set", "train.steps=6")
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"checkpoint {newest} is unreadable" in res.stderr, res.stderr[-2000:]
    assert "resuming from step 4" in res.stderr
    # The resumed steps 5 and 6 repeat the uninterrupted run's.
    full, again = _train_losses(trained), _train_losses(w)
    for step in (5, 6):
        assert abs(full[step]["total"] - again[step]["total"]) <= 1e-6


def test_a_non_finite_loss_stops_the_run_naming_the_step_and_terms(tmp_path):
    w = tmp_path / "nan"
    res = _cli("train", "--config", TINY, "--workdir", str(w), "--set", "optimizer.learning_rate=1e30",
               "--set", "optimizer.warmup_steps=0", "--set", "train.checkpoint_every=1")
    assert res.returncode == 2, res.stderr[-3000:]
    line = [l for l in res.stderr.splitlines() if "loss is" in l]
    assert line and "at step" in line[0] and "segmentation=" in line[0] and "kl=" in line[0], res.stderr[-2000:]
    bad_step = int(line[0].split("at step ")[1].split()[0])
    kept = sorted(int(p.name) for p in (w / "checkpoints" / "latest").iterdir() if p.name.isdigit())
    assert kept and max(kept) == bad_step - 1
    from dlvae_jax.eval.inference import load_predictor

    pred = load_predictor(w, "latest")
    assert pred.step == bad_step - 1
    assert all(np.isfinite(np.asarray(x)).all() for x in __import__("jax").tree_util.tree_leaves(pred.variables))


def test_a_finished_run_says_so_and_keeps_its_summary(trained):
    # Its data profile, what evaluate and predict compare their slices with, is written once.
    profile = json.loads((trained / "data_profile.json").read_text())
    assert profile["source"] == "synthetic phantoms" and profile["n_slices"] > 0 and profile["head_mean"] > 10
    summary = (trained / "train_summary.json").read_bytes()
    log = (trained / "log.jsonl").read_bytes()
    res = _cli("train", "--config", TINY, "--workdir", str(trained))
    assert res.returncode == 0, res.stderr[-3000:]
    assert "already trained (6 of 6 steps); nothing to do" in res.stdout and "slices/s" not in res.stdout
    assert (trained / "train_summary.json").read_bytes() == summary and (trained / "log.jsonl").read_bytes() == log


def test_another_configs_workdir_is_refused_without_overwrite(trained):
    res = _cli("train", "--config", TINY, "--workdir", str(trained), "--set", "model.features=8")
    assert res.returncode == 2 and "holds a run of another config" in res.stderr and "model.features" in res.stderr


# ------------------------------------------------------------- evaluate/predict


def test_evaluate_and_predict_a_trained_run(trained, tmp_path):
    res = _cli("evaluate", "--workdir", str(trained), "--split", "test", "--checkpoint", "latest")
    assert res.returncode == 0, res.stderr[-3000:]
    m = json.loads((trained / "metrics.json").read_text())
    splits = json.loads((trained / "splits.json").read_text())["splits"]
    assert m["split"] == "test" and m["checkpoint_step"] == 6
    assert m["n_patients"] == len(splits["test"])
    for key in ("slice_accuracy", "slice_f1", "pixel_f1", "dice_volume_mean", "dice_volume_median", "iou_mean"):
        assert 0.0 <= m[key] <= 1.0, key
    patient = next(p for p in (trained / "data").iterdir() if p.name.rsplit("_", 1)[0] in splits["test"])
    out = tmp_path / "pred"
    res = _cli("predict", "--workdir", str(trained), "--out", str(out), "--samples", "3", str(patient))
    assert res.returncode == 0, res.stderr[-3000:]
    n = len(list(patient.glob("*_mask.tif")))
    assert len((out / "predictions.jsonl").read_text().splitlines()) == n
    res = _cli("predict", "--workdir", str(trained), "--out", str(tmp_path / "many"), "--samples", "100000",
               str(patient))
    assert res.returncode == 2 and "--samples" in res.stderr and not (tmp_path / "many").exists(), res.stderr


def test_samples_stream_into_a_mean_whatever_the_chunk(trained):
    """sample_mean sums draws on the device a chunk at a time (memory does not
    grow with n); the chunking, padding of the last chunk included, changes
    nothing but the summation order."""
    import tifffile

    from dlvae_jax.eval.inference import load_predictor

    pred = load_predictor(trained, "latest")
    images = np.stack([tifffile.imread(f) for f in sorted((trained / "data").rglob("*_[0-9].tif"))[:3]])[..., 1]
    one = pred.sample_mean(images, 5, seed=3, chunk=1)
    three = pred.sample_mean(images, 5, seed=3, chunk=3)
    assert one.shape == images.shape and one.dtype == np.float32
    np.testing.assert_allclose(one, three, atol=1e-6)
    assert np.abs(pred.sample_mean(images, 5, seed=4, chunk=3) - three).max() > 1e-4, "the seed is used"


def test_tta_averages_the_slice_and_its_trained_flips_only(trained):
    """The tiny config trains with left-right flips only: TTA is the mean of
    the single passes on the slice and on its mirror image (flipped back)."""
    import tifffile

    from dlvae_jax.eval.inference import load_predictor

    cfg = json.loads((trained / "config.json").read_text())
    assert cfg["augment"]["p_flip_lr"] > 0 and cfg["augment"]["p_flip_ud"] == 0
    pred = load_predictor(trained, "latest")
    images = np.stack([tifffile.imread(f) for f in sorted((trained / "data").rglob("*_[0-9].tif"))[:2]])[..., 1]
    a, b = pred.single(images), pred.single(np.ascontiguousarray(images[:, :, ::-1]))
    pred.tta = True
    got = pred(images)
    np.testing.assert_allclose(got["prob_BxHxW"], (a["prob_BxHxW"] + b["prob_BxHxW"][:, :, ::-1]) / 2, atol=1e-6)
    np.testing.assert_allclose(got["tumor_prob_B"], (a["tumor_prob_B"] + b["tumor_prob_B"]) / 2, atol=1e-6)


def test_samples_of_a_deterministic_model_are_refused(tmp_path):
    w = tmp_path / "unet"
    res = _cli("train", "--config", TINY_UNET, "--workdir", str(w),
               "--set", "train.steps=2", "--set", "train.eval_every=2")
    assert res.returncode == 0, res.stderr[-3000:]
    patient = next(p for p in (w / "data").iterdir() if p.is_dir())
    res = _cli("predict", "--workdir", str(w), "--out", str(tmp_path / "p"), "--samples", "4", str(patient))
    assert res.returncode == 2, res.stderr[-2000:]
    assert "deterministic" in res.stderr and "--samples" in res.stderr and not (tmp_path / "p").exists()


# ---------------------------------------------------------------- multi-host


DIST_WORKER = r"""
import functools, sys
import jax
pid, nproc, port, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
if nproc > 1:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=nproc, process_id=pid)
import numpy as np
from dlvae_jax import configs
from dlvae_jax.data.pipeline import ArrayLoader, Shard, host_iterator, train_dataset
from dlvae_jax.models import example_inputs
from dlvae_jax.train import experiment as ex
from dlvae_jax.train.runners import make_runner
from dlvae_jax.train.state import create_state
from dlvae_jax.train.step import eval_outputs, train_step

assert jax.device_count() == 8, jax.device_count()
cfg = configs.load(sys.argv[5], ["model.name='unet'", "train.batch_size=16"])
cfg.model = dict(name="unet", features=4, levels=2, dtype="float32")
rng = np.random.default_rng(0)
n, s = 48, 32
masks = (rng.uniform(size=(n, s, s)) > 0.9).astype(np.uint8)
images = (rng.integers(0, 200, (n, s, s)) + 50 * masks).astype(np.uint8)
model = ex.model_from_config(cfg)
# Plain SGD: Adam divides by sqrt(v), which turns the reduction-order noise of
# near-zero gradients (gloo across processes vs in-process) into lr-sized steps.
import optax
tx = optax.sgd(0.05)
step = functools.partial(train_step, model=model, tx=tx, loss_cfg=ex.loss_from_config(cfg), prep=ex.prep_from_config(cfg),
                         augment=ex.augment_from_config(cfg))
ev = functools.partial(eval_outputs, model=model, prep=ex.prep_from_config(cfg), eval_key=jax.random.key_data(jax.random.key(0)))
runner = make_runner("jit", step, ev)
state = runner.put_state(create_state(model, tx, jax.random.key(0), example_inputs(2, s, 1)))
def shard_iter(shard):
    ds = train_dataset(ArrayLoader(images, masks), global_batch_size=16, seed=3, shard=shard)
    return iter(host_iterator(ds, num_threads=1))

if nproc > 1:
    it = shard_iter(Shard.from_jax())
    batches = (next(it) for _ in range(3))
else:
    # The same global batches, rows in the order the two processes lay them out.
    its = [shard_iter(Shard(i, 2)) for i in range(2)]
    batches = ({k: np.concatenate([a[k], b[k]]) for k in a} for a, b in ((next(its[0]), next(its[1])) for _ in range(3)))
for batch in batches:
    state, metrics = runner.step(state, runner.put_batch(batch))
params = jax.tree_util.tree_map(lambda x: np.asarray(jax.experimental.multihost_utils.process_allgather(x, tiled=True)),
                                state.params) if nproc > 1 else jax.device_get(state.params)
if pid == 0:
    flat = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(params)}
    np.savez(out, **flat)
print("DONE", pid, float(metrics["total"]))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one_process_on_the_same_global_batches(tmp_path):
    import jax.experimental.multihost_utils  # noqa: F401  (the worker uses it)

    port = str(_free_port())
    env4 = dict(FAST_ENV, XLA_FLAGS=FAST_ENV["XLA_FLAGS"] + " --xla_force_host_platform_device_count=4")
    env8 = dict(FAST_ENV, XLA_FLAGS=FAST_ENV["XLA_FLAGS"] + " --xla_force_host_platform_device_count=8")
    worker = [sys.executable, "-c", DIST_WORKER]
    procs = [subprocess.Popen(worker + [str(i), "2", port, str(tmp_path / "two.npz"), TINY], cwd=REPO_ROOT, env=env4,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (o, e) in zip(procs, outs):
        assert p.returncode == 0, e[-3000:]
    one = subprocess.run(worker + ["0", "1", "0", str(tmp_path / "one.npz"), TINY], cwd=REPO_ROOT, env=env8,
                         capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    a, b = np.load(tmp_path / "two.npz"), np.load(tmp_path / "one.npz")
    assert sorted(a.files) == sorted(b.files) and len(a.files) > 4
    # The gloo all-reduce across processes sums in another order than the
    # in-process one; batch norm's backward pass amplifies that float32
    # rounding: after 3 steps weights of scale 0.2-0.6 differ by 4e-5 at most
    # (measured), far below what a step moves them.
    worst = max(float(np.max(np.abs(a[k] - b[k]))) for k in a.files)
    assert worst <= 1e-4, worst
    loss = lambda out: [float(l.split()[2]) for l in out.splitlines() if l.startswith("DONE")]
    losses = loss(outs[0][0]) + loss(outs[1][0]) + loss(one.stdout)
    assert len(losses) == 3 and max(losses) - min(losses) <= 1e-5, losses


@pytest.mark.parametrize("runner", ["jit", "shard_map", "pmap"])
def test_each_runner_traces_its_step_once_when_fed_its_own_output(runner):
    """The state a step returns goes straight back in: its layout must match
    the one put_state made, or every run compiles the step a second time."""
    import jax

    from dlvae_jax.train.runners import make_runner

    traced = []

    def step(state, batch, axis_name=None):
        traced.append(1)
        g = batch["x"].sum()
        if axis_name is not None:
            g = jax.lax.psum(g, axis_name)
        return {"w": state["w"] + g, "n": state["n"] + 1}, {"g": g}

    r = make_runner(runner, step, lambda v, b: b)
    st = r.put_state({"w": np.zeros(3, np.float32), "n": np.zeros((), np.int32)})
    for _ in range(3):
        st, m = r.step(st, r.put_batch({"x": np.ones((len(jax.devices()) * 2, 2), np.float32)}))
    assert float(jax.device_get(r.get_state(st))["w"][0]) == 3 * 4 * len(jax.devices())
    assert len(traced) == 1, f"{runner}: the step was traced {len(traced)} times"


def test_a_classifier_keeps_its_best_checkpoint_by_slice_f1(tmp_path):
    """A classifier's masks are empty, so its validation Dice never moves; its
    best checkpoint is chosen by slice F1 instead."""
    from dlvae_jax.models.registry import MODELS
    from dlvae_jax.train.checkpoint import Checkpoints, best_metric

    assert {n: best_metric(MODELS[n].outputs_mask) for n in MODELS} == {
        "dlvae_cnn": "dice_volume_mean", "unet": "dice_volume_mean",
        "cnn": "slice_f1", "vgg16": "slice_f1", "dcnn": "slice_f1"}
    ckpt = Checkpoints(tmp_path, keep=2, async_save=False, metric="slice_f1")
    state = {"w": np.zeros(2, np.float32)}
    saved = [ckpt.save_best(step, state, {"pos": step}, {"dice_volume_mean": 0.0, "slice_f1": f1})
             for step, f1 in ((1, 0.5), (2, 0.7), (3, 0.6))]
    assert saved == [True, True, False]
    assert ckpt.best.latest_step() == 2 and ckpt.best_value == 0.7
    ckpt.close()
    assert Checkpoints(tmp_path, metric="slice_f1").best_value == 0.7  # read back on resume


def test_batch_job_output_shows_progress_and_a_relative_data_dir_is_stored_absolute(tmp_path):
    """Output to a file (nohup, SLURM): one progress line per log interval; a
    relative --data-dir is stored absolute, so `evaluate` run from elsewhere finds it."""
    res = _cli("data", "synth", "--out", str(tmp_path / "lgg"), "--patients", "4", "--size", "32", "--slices", "8")
    assert res.returncode == 0, res.stderr[-2000:]
    log = tmp_path / "train.log"
    with open(log, "w") as f:
        proc = subprocess.run([sys.executable, "-m", "dlvae_jax.cli", "train", "--config", TINY, "--workdir", "w",
                               "--data-dir", "lgg", "--set", "train.steps=4"], cwd=tmp_path, env=FAST_ENV,
                              stdout=f, stderr=subprocess.STDOUT, timeout=600)
    text = log.read_text()
    assert proc.returncode == 0, text[-3000:]
    lines = [l for l in text.splitlines() if l.startswith("train step ")]
    assert [l.split()[2] for l in lines] == ["1/4", "2/4", "3/4", "4/4"], text[-2000:]
    assert all("slices/s" in l and "ETA" in l and "loss" in l for l in lines)
    assert "val Dice" in lines[-1] and "val Dice" not in lines[0]
    stored = json.loads((tmp_path / "w" / "config.json").read_text())["data"]["data_dir"]
    assert Path(stored).is_absolute() and Path(stored) == (tmp_path / "lgg").resolve()
    res = _cli("evaluate", "--workdir", str(tmp_path / "w"), "--split", "test")  # from the repository root
    assert res.returncode == 0, res.stderr[-2000:]


def test_print_config_lists_every_field_that_set_accepts():
    import ast

    res = _cli("train", "--config", "demo", "--set", "train.steps=7", "--print-config")
    assert res.returncode == 0, res.stderr[-2000:]
    lines = res.stdout.strip().splitlines()
    assert "train.steps = 7  (int)" in lines and "model.name = 'dlvae_cnn'  (str)" in lines
    fields = dict(l.split(" = ", 1) for l in lines)
    assert {"data.source", "loss.free_bits", "optimizer.learning_rate", "model.label_dropout"} <= set(fields)
    # Each printed field, set back to its printed value, is accepted and gives the same config.
    overrides = [f"{k}={v.rsplit('  (', 1)[0]}" for k, v in fields.items() if k != "config_name"]
    again = configs.load("demo", overrides)
    assert configs.load("demo", ["train.steps=7"]).to_dict() == again.to_dict()
    assert ast.literal_eval(fields["train.steps"].rsplit("  (", 1)[0]) == 7


def test_a_bad_data_source_is_one_line_before_anything_is_written(tmp_path):
    for args, words in ((["--set", "data.source=bogus"], "data.source must be one of"),
                        (["--tfds-dir", str(tmp_path / "none")], "no such folder"),
                        (["--set", "data.source='memory'", "--set", f"data.tfds_dir={str(tmp_path)!r}"],
                         "read as array_record")):
        res = _cli("train", "--config", "demo", "--workdir", str(tmp_path / "w"), *args)
        lines = [l for l in res.stderr.splitlines() if l.strip()]
        assert res.returncode == 2 and len(lines) == 1 and words in lines[0], res.stderr[-2000:]
        assert not (tmp_path / "w").exists()


def test_fields_added_later_do_not_block_resuming_an_older_run():
    from dlvae_jax.train.loop import _config_conflict

    new = json.loads(configs.to_json(configs.load("demo")))
    old = json.loads(json.dumps(new))
    del old["eval"]["tta"], old["eval"]["min_component"], old["model"]["use_vae"]
    del old["eval"]["presence"], old["loss"]["dice_kind"], old["loss"]["dice_fn_weight"]
    del old["augment"]["p_missing_sequence"], old["eval"]["min_volume_share"]
    assert _config_conflict(old, new) == []
    new["eval"]["min_component"] = 25  # a real change still is one
    assert _config_conflict(old, new) == ["eval.min_component"]


def test_a_run_without_validation_patients_is_its_last_checkpoint(tmp_path):
    """data.fractions with a zero validation share: nothing is scored while
    training, no best is kept, `best` loads the last save without a warning,
    and the closing report is on the training patients, named as such."""
    import warnings

    from dlvae_jax.data.splits import read_splits
    from dlvae_jax.eval.inference import load_predictor

    with pytest.raises(DlvaeError, match="with train > 0"):
        configs.load("demo", ["data.fractions=(0.0, 0.5, 0.5)"])
    w = tmp_path / "noval"
    res = _cli("train", "--config", TINY, "--workdir", str(w), "--set", "data.fractions=(0.75, 0.0, 0.25)",
               "--set", "train.steps=3")
    assert res.returncode == 0, res.stderr[-3000:]
    splits = read_splits(w / "splits.json")
    assert splits["validation"] == [] and len(splits["train"]) == 3 and len(splits["test"]) == 1
    kinds = [json.loads(line)["kind"] for line in (w / "log.jsonl").read_text().splitlines()]
    assert "eval" not in kinds and kinds.count("train") == 3
    assert sorted(p.name for p in (w / "checkpoints" / "latest").iterdir() if p.name.isdigit()) == ["2", "3"]
    assert not [p for p in (w / "checkpoints" / "best").iterdir() if p.name.isdigit()]
    assert json.loads((w / "train_summary.json").read_text())["best_metric"] is None
    assert "training patients (seen in training: not a figure for unseen patients): " in res.stdout
    assert (w / "metrics_train.json").is_file()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        predictor = load_predictor(w)
    assert predictor.step == 3 and predictor.checkpoint == "latest"
    from dlvae_jax.data import lgg
    from dlvae_jax.eval.evaluate import select_records

    with pytest.raises(DlvaeError, match="the validation split has no patients"):  # what `evaluate --split val` says
        select_records(lgg.scan(w / "data"), w, "validation")
