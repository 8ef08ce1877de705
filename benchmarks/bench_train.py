"""Train-step and inference throughput of every model, with the PyTorch U-Net
(benchmarks/peers/unet_torch.py) timed beside our `unet` in the same run.

For each grid point (model, batch B, side S) the script reports, for training
(one optax.adamw step on the model's total loss, state donated) and for
inference (forward pass, train=False):

  slices/s      B / median step time over the timed repeats
  compile_s     jax.jit(...).lower(...) + .compile(), reported apart
  gflop_s       achieved GFLOP/s: XLA's cost analysis of the lowered step
                (a multiply-add counts 2) / median step time; for PyTorch
                torch.utils.flop_counter, which counts convs and matmuls only
  peak_rss_mib  the process's peak host RSS (resource.getrusage); inference is
                measured first, so the training record's peak covers both
  device_peak_mib / temp_mib  device memory where the device reports it (GPU),
                and XLA's temporary buffer size of the compiled program

Inputs are synthetic random arrays made on the device in the format of
`dlvae_jax.models.example_inputs`; models are built with the widths of their
configs (`cpu` for dlvae_cnn, `unet`, `cnn`, `vgg16`, `dcnn`). Each grid point
runs in its own subprocess, so memory peaks and thread pools do not carry over
between measurements. One JSON line per measurement goes to stdout (and to
--out), followed by one line per ours/PyTorch ratio; a Markdown table goes to
stderr at the end.

The default grid (about 10 minutes on 2 cores) is every model at batch 16,
128x128, plus `unet` and its PyTorch peer at batch 64 x 128x128 and batch
16 x 256x256; --full runs every model at {16, 64} x {128, 256}:

    python benchmarks/bench_train.py
    python benchmarks/bench_train.py --models unet --batches 16,64 --sizes 128,256
    python benchmarks/bench_train.py --models unet --dtype bfloat16 --no-peer
    XLA_FLAGS=--xla_cpu_use_onednn=true python benchmarks/bench_train.py --models unet

PyTorch runs eagerly with torch.set_num_threads(os.cpu_count()) (--torch-threads), channels-last
tensors (faster for its CPU convolutions) and the fused AdamW. Requires the
`peers` extra for the peer (`pip install -e '.[peers]'`).
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

CONFIG_OF = {"dlvae_cnn": "cpu", "unet": "unet", "cnn": "cnn", "vgg16": "vgg16", "dcnn": "dcnn"}
# Where unet meets its peer beyond the base point. Batch 64 at 256x256 is left to --full: on 2 cores that
# point alone (~9 GiB of XLA temporaries, tens of seconds a step, both frameworks) takes about 5 minutes.
DEFAULT_EXTRA = ((64, 128), (16, 256))
PEER = "unet"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _rss_mib() -> float:
    # ru_maxrss is in KiB on Linux, in bytes on macOS.
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20


def _env() -> dict:
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host_cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
    }


def _timed(fn, block, warmup: int, repeats: int, min_repeats: int, budget_s: float) -> tuple[list[float], float]:
    """Runs `fn` warmup times, then times it until `repeats` runs or, past
    `min_repeats`, until `budget_s` is spent. Returns (times, first call s)."""
    t0 = time.perf_counter()
    block(fn())
    first = time.perf_counter() - t0
    for _ in range(warmup - 1):
        if first > 2.0:  # a call this long has no start-up cost left worth a second warm-up
            break
        block(fn())
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < repeats and (len(times) < min_repeats or time.perf_counter() - start < budget_s):
        t0 = time.perf_counter()
        block(fn())
        times.append(time.perf_counter() - t0)
    return times, first


def _summary(times: list[float], batch: int) -> dict:
    med = statistics.median(times)
    return {
        "step_ms": round(med * 1e3, 2),
        "step_ms_min": round(min(times) * 1e3, 2),
        "step_ms_max": round(max(times) * 1e3, 2),
        "repeats": len(times),
        "slices_s": round(batch / med, 2),
    }


# ------------------------------------------------------------------ JAX


def _model_config(name: str, dtype: str | None) -> dict:
    config = importlib.import_module(f"dlvae_jax.configs.{CONFIG_OF[name]}").get_config()
    model_cfg = dict(config.model)
    assert model_cfg.pop("name") == name
    if dtype:
        model_cfg["dtype"] = dtype
    return {"model": model_cfg, "loss": dict(config.loss), "optimizer": dict(config.optimizer),
            "channels": 3 if config.data.channels == "all" else 1, "k": int(config.preprocess.k)}


def bench_jax(name: str, batch: int, size: int, args) -> list[dict]:
    import jax
    import jax.numpy as jnp
    import optax

    from dlvae_jax.losses import from_config as losses_from_config, total_loss
    from dlvae_jax.models import apply_model, count_params, example_inputs, get_model, init_variables

    cfg = _model_config(name, args.dtype)
    model = get_model(name, **cfg["model"])
    loss_cfg = losses_from_config(cfg["loss"])
    opt = cfg["optimizer"]
    tx = optax.adamw(opt["learning_rate"], b1=opt["b1"], b2=opt["b2"], weight_decay=opt["weight_decay"])
    device = jax.devices()[0]

    template = example_inputs(batch, size, cfg["channels"])

    @jax.jit
    def synth(key):
        ki, kc, kl, km = jax.random.split(key, 4)
        return {
            "image_BxHxWxC": jax.random.uniform(ki, template["image_BxHxWxC"].shape, jnp.float32),
            "clusters_BxHxW": jax.random.randint(kc, template["clusters_BxHxW"].shape, 0, cfg["k"], jnp.int32),
            "label_B": jax.random.randint(kl, template["label_B"].shape, 0, 2, jnp.int32),
            "mask_BxHxW": jax.random.bernoulli(km, 0.1, template["mask_BxHxW"].shape).astype(jnp.float32),
        }

    inputs = synth(jax.random.key(1))
    # Parameters do not depend on the batch; one slice keeps the unoptimized init program quick.
    variables = init_variables(model, jax.random.key(0), example_inputs(1, size, cfg["channels"]))
    params = count_params(variables)

    def train_step(state, batch_inputs):
        key = jax.random.fold_in(jax.random.key(2), state["step"])

        def loss_fn(p):
            outputs, new_vars = apply_model(model, {**state["variables"], "params": p}, batch_inputs,
                                            train=True, key=key)
            total, _ = total_loss(outputs, batch_inputs, loss_cfg, state["step"])
            return total, new_vars

        (total, new_vars), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["variables"]["params"])
        updates, opt_state = tx.update(grads, state["opt_state"], state["variables"]["params"])
        new_params = optax.apply_updates(state["variables"]["params"], updates)
        return {"step": state["step"] + 1, "variables": {**new_vars, "params": new_params},
                "opt_state": opt_state}, total

    def infer(v, x):
        return apply_model(model, v, x, train=False)[0]

    base = {
        "bench": "train", "framework": "jax", "jax": jax.__version__, "model": name, "batch": batch, "size": size,
        "channels": cfg["channels"], "params": params, "dtype": str(cfg["model"].get("dtype", "float32")),
        "device": f"{device.platform}:{device.device_kind}", "threads": f"XLA default ({os.cpu_count()} cores)",
        **_env(),
    }
    records = []

    def compile_(fn, *xs, donate=()):
        t0 = time.perf_counter()
        lowered = jax.jit(fn, donate_argnums=donate).lower(*xs)
        t1 = time.perf_counter()
        cost = lowered.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        t2 = time.perf_counter()
        compiled = lowered.compile()
        seconds = (t1 - t0) + (time.perf_counter() - t2)
        try:
            temp = compiled.memory_analysis().temp_size_in_bytes / 2**20
        except Exception:  # not every backend / version reports it
            temp = None
        return compiled, seconds, float(cost.get("flops", 0.0)) if cost else 0.0, temp

    def device_peak():
        stats = device.memory_stats() if hasattr(device, "memory_stats") else None
        return round(stats["peak_bytes_in_use"] / 2**20, 1) if stats and "peak_bytes_in_use" in stats else None

    # Inference first: the process's RSS peak is then inference's alone, and
    # training's peak (measured second) is the larger one anyway.
    if not args.no_infer:
        infer_inputs = {**inputs, "label_B": None, "mask_BxHxW": None}
        compiled, compile_s, flops, temp = compile_(infer, variables, infer_inputs)
        times, first = _timed(lambda: compiled(variables, infer_inputs), jax.block_until_ready,
                              args.warmup, args.repeats, args.min_repeats, args.budget_s)
        s = _summary(times, batch)
        records.append({**base, "mode": "infer", **s, "compile_s": round(compile_s, 2),
                        "first_call_s": round(first, 3), "gflop_step": round(flops / 1e9, 3),
                        "gflop_s": round(flops / 1e9 / (s["step_ms"] / 1e3), 2),
                        "peak_rss_mib": round(_rss_mib(), 1), "device_peak_mib": device_peak(),
                        "temp_mib": None if temp is None else round(temp, 1), "donate": False})

    state = {"step": jnp.zeros((), jnp.int32), "variables": variables, "opt_state": tx.init(variables["params"])}
    donate = () if args.no_donate else (0,)
    compiled, compile_s, flops, temp = compile_(train_step, state, inputs, donate=donate)
    holder = {"state": state}
    del state, variables

    def run_train():
        holder["state"], total = compiled(holder["state"], inputs)
        return holder["state"], total

    times, first = _timed(run_train, jax.block_until_ready, args.warmup, args.repeats, args.min_repeats,
                          args.budget_s)
    loss = float(run_train()[1])
    s = _summary(times, batch)
    records.append({**base, "mode": "train", **s, "compile_s": round(compile_s, 2), "first_call_s": round(first, 3),
                    "gflop_step": round(flops / 1e9, 3), "gflop_s": round(flops / 1e9 / (s["step_ms"] / 1e3), 2),
                    "peak_rss_mib": round(_rss_mib(), 1), "device_peak_mib": device_peak(),
                    "temp_mib": None if temp is None else round(temp, 1), "donate": not args.no_donate,
                    "loss": round(loss, 4)})
    return records


# -------------------------------------------------------------- PyTorch


def bench_torch(batch: int, size: int, args) -> list[dict]:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from peers import unet_torch

    torch.set_num_threads(args.torch_threads)
    torch.manual_seed(0)
    cfg = _model_config(PEER, None)
    m = cfg["model"]
    c = cfg["channels"]
    opt = cfg["optimizer"]
    fmt = torch.channels_last if args.torch_layout == "channels_last" else torch.contiguous_format
    model = unet_torch.UNet(c, m["features"], m["levels"]).to(memory_format=fmt)
    params = unet_torch.count_params(model)

    # The peer is only a fair comparison if it is the same model: same trainable parameters.
    from dlvae_jax.models import abstract_variables, count_params, example_inputs, get_model

    ours = count_params(abstract_variables(get_model(PEER, **m), example_inputs(1, 32, c)))
    if ours != params:
        raise SystemExit(f"PyTorch U-Net has {params} parameters, ours {ours}: the models differ")

    optimizer = unet_torch.adamw(model, opt["learning_rate"], opt["b1"], opt["b2"], opt["weight_decay"])
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(batch, c, size, size, generator=gen).contiguous(memory_format=fmt)
    mask = (torch.rand(batch, size, size, generator=gen) < 0.1).float()
    label = torch.randint(0, 2, (batch,), generator=gen)

    base = {
        "bench": "train", "framework": "pytorch", "torch": torch.__version__, "model": PEER, "batch": batch,
        "size": size, "channels": c, "params": params, "params_ours": ours, "dtype": "float32",
        "device": "cpu", "layout": args.torch_layout, "optimizer": type(optimizer).__name__
        + (" fused" if optimizer.defaults.get("fused") else " foreach"),
        "threads": f"intra-op {torch.get_num_threads()}, inter-op {torch.get_num_interop_threads()}",
        **_env(),
    }
    records = []

    def flops_of(fn) -> float:
        with FlopCounterMode(display=False) as counter:
            fn()
        return float(counter.get_total_flops())

    if not args.no_infer:
        model.eval()

        @torch.inference_mode()
        def infer():
            return model(x)

        flops = flops_of(infer)
        times, first = _timed(infer, lambda out: None, args.warmup, args.repeats, args.min_repeats, args.budget_s)
        s = _summary(times, batch)
        records.append({**base, "mode": "infer", **s, "compile_s": None, "first_call_s": round(first, 3),
                        "gflop_step": round(flops / 1e9, 3), "gflop_s": round(flops / 1e9 / (s["step_ms"] / 1e3), 2),
                        "flop_count": "torch FlopCounterMode (convs, matmuls)",
                        "peak_rss_mib": round(_rss_mib(), 1), "device_peak_mib": None, "temp_mib": None})

    model.train()

    def step():
        optimizer.zero_grad(set_to_none=True)
        logits, mask_logits = model(x)
        total = unet_torch.loss(logits, mask_logits, mask, label)
        total.backward()
        optimizer.step()
        return total

    flops = flops_of(step)
    times, first = _timed(step, lambda out: None, args.warmup, args.repeats, args.min_repeats, args.budget_s)
    loss = float(step().detach())
    s = _summary(times, batch)
    records.append({**base, "mode": "train", **s, "compile_s": None, "first_call_s": round(first, 3),
                    "gflop_step": round(flops / 1e9, 3), "gflop_s": round(flops / 1e9 / (s["step_ms"] / 1e3), 2),
                    "flop_count": "torch FlopCounterMode (convs, matmuls)",
                    "peak_rss_mib": round(_rss_mib(), 1), "device_peak_mib": None, "temp_mib": None,
                    "loss": round(loss, 4)})
    return records


# ---------------------------------------------------------------- driver


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def _grid(args, model_names) -> list[tuple[str, str, int, int]]:
    """(framework, model, batch, size) in run order; the peer right after our unet."""
    if args.full:
        args.batches, args.sizes = [16, 64], [128, 256]
    if args.batches is None and args.sizes is None:
        points = {name: [(16, 128)] + (list(DEFAULT_EXTRA) if name == PEER else []) for name in args.models}
    else:
        batches = args.batches or [16]
        sizes = args.sizes or [128]
        points = {name: [(b, s) for s in sizes for b in batches] for name in args.models}
    grid = []
    for name in model_names:
        for b, s in points.get(name, []):
            grid.append(("jax", name, b, s))
            if name == PEER and not args.no_peer:
                grid.append(("pytorch", name, b, s))
    return grid


def _table(records: list[dict]) -> str:
    head = ("| framework | model | batch | size | train slices/s | infer slices/s | compile s (train) | "
            "train GFLOP/s | peak RSS MiB |\n|---|---|---|---|---|---|---|---|---|")
    rows = {}
    for r in records:
        key = (r["framework"], r["model"], r["batch"], r["size"])
        rows.setdefault(key, {})[r["mode"]] = r
    lines = [head]
    for (fw, model, b, s), modes in rows.items():
        t, i = modes.get("train", {}), modes.get("infer", {})
        comp = t.get("compile_s")
        lines.append(f"| {fw} | {model} | {b} | {s} | {t.get('slices_s', '')} | {i.get('slices_s', '')} | "
                     f"{'' if comp is None else comp} | {t.get('gflop_s', '')} | {t.get('peak_rss_mib', '')} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=None, help="comma-separated model names (default: all)")
    parser.add_argument("--batches", type=_ints, default=None, help="e.g. 16,64; with --sizes, the grid for every model")
    parser.add_argument("--sizes", type=_ints, default=None, help="e.g. 128,256")
    parser.add_argument("--full", action="store_true", help="every model at batch 16, 64 and 128x128, 256x256")
    parser.add_argument("--dtype", default=None, help="computation dtype for our models (e.g. bfloat16)")
    parser.add_argument("--no-donate", action="store_true", help="do not donate the train state")
    parser.add_argument("--no-peer", action="store_true", help="skip the PyTorch U-Net")
    parser.add_argument("--no-infer", action="store_true", help="time training only")
    # One per core by default; on a machine shared with another job fewer can be faster, as
    # PyTorch's OpenMP threads wait on each other after every operator.
    parser.add_argument("--torch-threads", type=int, default=os.cpu_count(), help="PyTorch intra-op threads")
    parser.add_argument("--torch-layout", choices=("channels_last", "contiguous"), default="channels_last")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls after compilation")
    parser.add_argument("--repeats", type=int, default=7, help="at most this many timed calls")
    parser.add_argument("--min-repeats", type=int, default=3, help="at least this many, whatever the budget")
    parser.add_argument("--budget-s", type=float, default=12.0, help="stop timing a point past this once --min-repeats ran")
    parser.add_argument("--out", type=Path, default=None, help="also append the JSON lines to this file")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # framework:model:batch:size, in a subprocess
    args = parser.parse_args()

    if args.one:
        fw, name, b, s = args.one.split(":")
        records = bench_torch(int(b), int(s), args) if fw == "pytorch" else bench_jax(name, int(b), int(s), args)
        for r in records:
            print(json.dumps(r), flush=True)
        return

    from dlvae_jax.models import MODEL_NAMES

    args.models = MODEL_NAMES if args.models is None else tuple(args.models.split(","))
    unknown = set(args.models) - set(MODEL_NAMES)
    if unknown:
        parser.error(f"unknown model(s) {sorted(unknown)}; known: {', '.join(MODEL_NAMES)}")
    grid = _grid(args, [n for n in MODEL_NAMES if n in args.models])
    out = args.out.open("a") if args.out else None
    records: list[dict] = []
    t_start = time.perf_counter()
    for fw, name, b, s in grid:
        cmd = [sys.executable, __file__, *sys.argv[1:], "--one", f"{fw}:{name}:{b}:{s}"]
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
        if proc.returncode:
            print(f"{fw} {name} batch {b} size {s}: failed (exit {proc.returncode})", file=sys.stderr)
            continue
        for line in proc.stdout.splitlines():
            if not line.startswith("{"):
                continue
            record = json.loads(line)
            records.append(record)
            print(line, flush=True)
            if out:
                out.write(line + "\n")

    ratios = []
    for r in records:
        if r["framework"] != "pytorch":
            continue
        ours = [o for o in records if o["framework"] == "jax" and o["model"] == r["model"] and o["batch"] == r["batch"]
                and o["size"] == r["size"] and o["mode"] == r["mode"]]
        if ours:
            ratio = {"bench": "train", "kind": "ratio", "model": r["model"], "batch": r["batch"], "size": r["size"],
                     "mode": r["mode"], "ours_slices_s": ours[0]["slices_s"], "pytorch_slices_s": r["slices_s"],
                     "ours_over_pytorch": round(ours[0]["slices_s"] / r["slices_s"], 3)}
            ratios.append(ratio)
            print(json.dumps(ratio), flush=True)
            if out:
                out.write(json.dumps(ratio) + "\n")
    if out:
        out.close()
    print("\n" + _table(records), file=sys.stderr)
    for r in ratios:
        print(f"{r['model']} {r['mode']} batch {r['batch']} {r['size']}x{r['size']}: ours/PyTorch "
              f"{r['ours_over_pytorch']:.2f}x ({r['ours_slices_s']} vs {r['pytorch_slices_s']} slices/s)",
              file=sys.stderr)
    print(f"total {time.perf_counter() - t_start:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
