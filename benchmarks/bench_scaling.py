"""The project's train step on 1, 2, 4 and 8 devices under each runner
(`jit` with NamedSharding, `shard_map`, `pmap`; dlvae_jax.train.runners).

For each device count N a child process runs with N devices: on a CPU host
they are simulated (XLA_FLAGS=--xla_force_host_platform_device_count=N), on a
GPU/TPU host the first N real devices are used (counts above what the host
has are skipped). In each child, for each runner:

  slices/s     global batch / median step time (compile excluded, reported apart)
  agreement    the largest |difference| of parameters and batch-norm statistics
               after one step from the same state on the same global batch,
               against the plain single-device jitted step (plain SGD, so the
               comparison is not blurred by Adam's sign-like first step)

  validation   seconds to score a validation split of --val-slices slices with
               the runner's sharded eval (`dlvae_jax.train.loop.evaluate_split`:
               parameters placed once, each device its rows, metrics on the host),
               median of 2 after a warm-up; and its slices/s

Every random draw of the step is keyed per example (dlvae_jax.train.runners),
so `dlvae_cnn` agrees with one device to float rounding too.

Simulated CPU devices share the host's cores: their throughput shows the cost
of partitioning and collectives, not a speed-up. One JSON line per
measurement goes to stdout (and --out); a Markdown table to stderr.

    python benchmarks/bench_scaling.py                       # unet and dlvae_cnn, 64x64, batch 16, N = 1,2,4,8
    python benchmarks/bench_scaling.py --model dlvae_cnn --size 128
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path

CONFIG_OF = {"dlvae_cnn": "cpu", "unet": "unet", "cnn": "cnn", "vgg16": "vgg16", "dcnn": "dcnn"}


def child(args) -> None:
    import functools

    import jax
    import numpy as np
    import optax

    from dlvae_jax import configs
    from dlvae_jax.models import example_inputs
    from dlvae_jax.train import experiment as ex
    from dlvae_jax.data.pipeline import ArrayLoader
    from dlvae_jax.train.loop import evaluate_split
    from dlvae_jax.train.runners import data_mesh, make_runner
    from dlvae_jax.train.state import create_state
    from dlvae_jax.train.step import eval_outputs, train_step

    n = args.child
    devices = jax.devices()
    if len(devices) < n:
        print(json.dumps({"skipped": n, "reason": f"{len(devices)} devices"}))
        return
    devices = devices[:n]
    cfg = configs.load(CONFIG_OF[args.model], [f"data.image_size={args.size}", f"train.batch_size={args.batch}",
                                               f"eval.batch_size={args.batch}"])
    cfg.preprocess.n_init = 1
    B, S = args.batch, args.size
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:S, :S]
    masks = np.stack([((yy - S // 3 - i % 7) ** 2 + (xx - S // 2) ** 2 < (S // 8) ** 2 + i) for i in range(B)])
    masks = masks.astype(np.uint8)
    masks[::3] = 0
    images = (rng.integers(20, 120, (B, S, S, 1)) + 100 * masks[..., None]).astype(np.uint8)
    batch = {"image_BxHxWxC": images, "mask_BxHxW": masks, "label_B": masks.reshape(B, -1).any(1).astype(np.int32),
             "valid_B": np.ones(B, bool), "index_B": np.arange(B, dtype=np.int32)}
    prep, augment, loss_cfg = ex.prep_from_config(cfg), ex.augment_from_config(cfg), ex.loss_from_config(cfg)
    model = ex.model_from_config(cfg)
    axis_model = ex.model_from_config(cfg, norm_axis_name="data")
    tx = optax.sgd(0.01)
    state0 = jax.device_get(create_state(model, tx, jax.random.key(1), example_inputs(2, S, 1)))

    def step_fn(m):
        return functools.partial(train_step, model=m, tx=tx, loss_cfg=loss_cfg, prep=prep, augment=augment)

    ev = functools.partial(eval_outputs, model=model, prep=prep, eval_key=jax.random.key_data(jax.random.key(0)))
    reps = -(-args.val_slices // B)
    val = ArrayLoader(np.concatenate([images[..., 0]] * reps)[:args.val_slices],
                      np.concatenate([masks] * reps)[:args.val_slices])
    val.records = [types.SimpleNamespace(patient=f"P{i // 16}") for i in range(len(val))]  # 16 slices a patient
    ref, _ = jax.jit(step_fn(model))(jax.device_put(state0, devices[0]), jax.device_put(batch, devices[0]))
    ref = jax.device_get((ref.params, ref.batch_stats))
    mesh = data_mesh(devices)
    for name in args.runners.split(","):
        if name == "pmap" and n != len(jax.local_devices()):
            print(json.dumps({"skipped": n, "runner": name, "reason": "pmap uses all local devices"}))
            continue
        r = make_runner(name, step_fn(model if name == "jit" else axis_model), ev, mesh)
        st = r.put_state(state0)
        b = r.put_batch(batch)
        t0 = time.perf_counter()
        st, m = r.step(st, b)
        jax.block_until_ready(m)
        compile_s = time.perf_counter() - t0
        got = jax.device_get(r.get_state(st))
        got_leaves, ref_leaves = jax.tree_util.tree_leaves((got.params, got.batch_stats)), jax.tree_util.tree_leaves(ref)
        assert len(got_leaves) == len(ref_leaves), "state trees differ"
        diff = max(float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(c, np.float64))))
                   for a, c in zip(got_leaves, ref_leaves))
        times = []
        for _ in range(args.steps):
            t0 = time.perf_counter()
            st, m = r.step(st, b)
            jax.block_until_ready(m)
            times.append(time.perf_counter() - t0)
        med = statistics.median(times)
        variables = r.eval_variables(st)
        evaluate_split(r, variables, val, cfg)  # warm-up: compiles the eval step
        val_times = []
        for _ in range(2):
            t0 = time.perf_counter()
            evaluate_split(r, variables, val, cfg)
            val_times.append(time.perf_counter() - t0)
        val_s = statistics.median(val_times)
        print(json.dumps({"model": args.model, "devices": n, "runner": name, "platform": devices[0].platform,
                          "device_kind": devices[0].device_kind, "batch": B, "size": S,
                          "slices_s": round(B / med, 2), "step_ms": round(med * 1e3, 1),
                          "compile_and_first_step_s": round(compile_s, 2), "max_abs_diff_vs_single": diff,
                          "timed_steps": len(times), "validation_s": round(val_s, 3),
                          "validation_slices_s": round(len(val) / val_s, 1)}), flush=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="unet,dlvae_cnn", help=f"comma-separated, of {', '.join(sorted(CONFIG_OF))}")
    p.add_argument("--devices", default="1,2,4,8")
    p.add_argument("--runners", default="jit,shard_map,pmap")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--steps", type=int, default=5, help="timed steps per point (default 5)")
    p.add_argument("--val-slices", type=int, default=64, help="slices of the timed validation split (default 64)")
    p.add_argument("--out", type=Path, default=None, help="also append the JSON lines to this file")
    p.add_argument("--child", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args)
        return 0
    counts = [int(x) for x in args.devices.split(",")]
    if any(args.batch % n for n in counts):
        p.error(f"--batch {args.batch} must divide by every device count {counts}")
    import jax  # only to learn the platform; children choose their own device count

    platform = jax.devices()[0].platform
    rows = []
    failed = 0
    date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    models = args.model.split(",")
    for bad in [m for m in models if m not in CONFIG_OF]:
        p.error(f"unknown --model {bad}")
    for model, n in [(m, c) for m in models for c in counts]:
        env = dict(os.environ)
        if platform == "cpu":
            flags = [f for f in env.get("XLA_FLAGS", "").split() if "force_host_platform_device_count" not in f]
            env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={n}"])
        cmd = [sys.executable, __file__, "--child", str(n), "--model", model] + sum(
            ([f"--{k.replace('_', '-')}", str(getattr(args, k))] for k in ("runners", "batch", "size", "steps",
                                                                           "val_slices")), [])
        res = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if res.returncode:  # the rows measured so far are already printed (and in --out)
            print(f"bench_scaling: {model} on {n} devices failed:\n{res.stderr[-3000:]}", file=sys.stderr)
            failed = res.returncode
            continue
        for line in res.stdout.splitlines():
            if line.startswith("{"):
                rec = dict(json.loads(line), date=date)
                rows.append(rec)
                print(json.dumps(rec), flush=True)
                if args.out:
                    with open(args.out, "a") as f:
                        f.write(json.dumps(rec) + "\n")
    done = [r for r in rows if "slices_s" in r]
    print(f"\nbatch {args.batch}, {args.size}x{args.size}, {platform}, validation {args.val_slices} slices:",
          file=sys.stderr)
    print("| model | devices | runner | slices/s | step ms | compile + first step s | max |diff| vs 1 device "
          "| validation s |", file=sys.stderr)
    print("|---|---|---|---|---|---|---|---|", file=sys.stderr)
    for r in done:
        print(f"| {r['model']} | {r['devices']} | {r['runner']} | {r['slices_s']} | {r['step_ms']} | "
              f"{r['compile_and_first_step_s']} | {r['max_abs_diff_vs_single']:.2e} | {r['validation_s']} |",
              file=sys.stderr)
    return failed


if __name__ == "__main__":
    sys.exit(main())
