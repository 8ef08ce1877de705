"""DL-VAE-CNN loss ablation: every variant trained at once, in one jitted step.

Variants (`dlvae_jax.train.ablation.loss_variants`): the full loss; each VAE
loss of Eqs. 6-9 removed in turn (KL, reconstruction, cosine, latent
classifier); and the KL weight swept over --kl-sweep. All variants start from
the same initialization (--seed) and read the same batches and PRNG keys;
their parameters, batch statistics and optimizer states are stacked on a
leading axis and one jitted step advances them together: `vmap(train_step)`
or `lax.map(train_step)` over the variant axis (`dlvae_jax.train.ablation`).

Speed. Before training, each stacked mode (--modes) and the same variants
stepped one after another (the ordinary jitted step, compiled once, called
once per variant) are timed on the same batches in this run, compile apart;
the ratios are printed and recorded, and training uses the fastest of them
(they give the same numbers: tests/test_ablation.py). On XLA:CPU vmap loses: convolutions with stacked weights become
grouped convolutions, a slow path there.

Evaluation. After --steps steps each variant's final weights are scored on
the validation patients of the config's patient-level split (never the test
patients: the ablation chooses nothing on them)
with the decision rule of `dlvae-jax evaluate`.

Outputs in --out: loss_ablation.md (tables), loss_ablation.png (validation Dice and
accuracy per variant, training loss curves), loss_ablation.json (every
figure) and loss_ablation_log.jsonl (per-variant losses during training).

    python experiments/loss_ablation.py --data-dir ../shared/data/lgg/kaggle_3m \\
        --steps 300 --set data.image_size=64 --out experiments/results
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import sys
import time
from pathlib import Path

import numpy as np


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="DL-VAE-CNN loss ablation, variants trained at once with vmap.")
    p.add_argument("--data-dir", type=Path, required=True, help="LGG data in the kaggle_3m layout")
    p.add_argument("--config", default="cpu", help="DL-VAE-CNN config to start from (default cpu)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="config override (repeatable)")
    p.add_argument("--steps", type=int, default=300, help="train steps (default 300)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--kl-sweep", default="0.1,0.3,3,10", help="KL weights besides the config's (default 0.1,0.3,3,10)")
    p.add_argument("--timing-steps", type=int, default=3, help="timed steps per mode for the speed ratio (default 3)")
    p.add_argument("--modes", default="vmap,map",
                   help="stacked modes to time against one-after-another (default vmap,map); "
                        "training uses the fastest of these and one-after-another")
    p.add_argument("--train-with", default="fastest", help="fastest (default), sequential, or a mode of --modes")
    p.add_argument("--out", type=Path, default=Path("experiments/results"))
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--render", action="store_true",
                   help="only rewrite loss_ablation.md and .png from the loss_ablation.json in --out")
    args = p.parse_args(argv)
    p_train = args.train_with
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not args.modes or any(m not in ("vmap", "map") for m in args.modes):
        p.error(f"--modes: a comma-separated subset of vmap,map, got {','.join(args.modes)!r}")
    if p_train not in ("fastest", "sequential", *args.modes):
        p.error(f"--train-with {p_train}: must be fastest, sequential or one of --modes")
    if args.steps < 1 or args.timing_steps < 1:
        p.error("--steps and --timing-steps must be at least 1")
    try:
        args.kl_sweep = [float(x) for x in args.kl_sweep.split(",") if x.strip()]
    except ValueError:
        p.error(f"--kl-sweep: not a list of numbers: {args.kl_sweep!r}")
    if any(not math.isfinite(x) or x < 0 for x in args.kl_sweep):
        p.error("--kl-sweep: weights must be finite and >= 0")
    if not args.data_dir.is_dir() and not args.render:
        p.error(f"--data-dir {args.data_dir}: no such folder")
    return args


def _timed(fn, n: int) -> float:
    import jax

    t0 = time.perf_counter()
    out = None
    for _ in range(n):
        out = fn()
    jax.block_until_ready(out)
    return time.perf_counter() - t0


def run(args) -> dict:
    import jax
    from tqdm import tqdm

    from dlvae_jax import configs
    from dlvae_jax.data import lgg
    from dlvae_jax.data.pipeline import Shard, host_iterator, train_dataset
    from dlvae_jax.data.source import split_loader
    from dlvae_jax.data.splits import make_splits
    from dlvae_jax.models import example_inputs
    from dlvae_jax.train import ablation
    from dlvae_jax.train import experiment as ex
    from dlvae_jax.train.experiment import EVAL_SEED
    from dlvae_jax.train.loop import evaluate_split, summary_metrics
    from dlvae_jax.train.runners import make_runner
    from dlvae_jax.train.state import create_state
    from dlvae_jax.train.step import eval_outputs

    cfg = configs.load(args.config, list(args.set or []))
    if cfg.model.name != "dlvae_cnn":
        raise SystemExit(f"loss_ablation: --config {args.config} is a {cfg.model.name} config; the ablation is of dlvae_cnn")
    named = {o.split("=", 1)[0].strip() for o in (args.set or [])}
    if "data.fractions" not in named and float(cfg.data.fractions[1]) == 0:
        # The ablation is judged on validation patients; a config that trains on every patient gets the
        # split the ablation was measured with (33 train, 6 validation).
        cfg.data.fractions = (0.85, 0.15, 0.0)
    if "augment.p_missing_sequence" not in named:
        cfg.augment.p_missing_sequence = 0.0  # as the ablation was measured, before the `cpu` config added it
    if "eval.min_volume_share" not in named:
        cfg.eval.min_volume_share = 0.0  # likewise for the 3D component rule
    for key, value in (("max_rotate_deg", 10.0), ("max_scale", 0.1)):
        if f"augment.{key}" not in named:
            cfg.augment[key] = value  # likewise for the wider rotations and scaling
    cfg.data.data_dir = str(args.data_dir)
    cfg.train.steps = int(args.steps)
    cfg.train.seed = int(args.seed)
    cfg.optimizer.warmup_steps = min(int(cfg.optimizer.warmup_steps), max(1, args.steps // 20))
    ex.shorten_schedules(cfg, int(args.steps))
    ex.check_config(cfg)

    index = lgg.scan(args.data_dir)
    splits = make_splits(index, int(cfg.data.split_seed), tuple(float(f) for f in cfg.data.fractions))
    # The ablation is judged on the validation patients only: the test patients are never scored here.
    data = {name: split_loader(index, splits, name, cfg.data.channels) for name in ("train", "validation")}

    model = ex.model_from_config(cfg)
    tx, schedule = ex.optimizer_from_config(cfg)
    prep, augment = ex.prep_from_config(cfg), ex.augment_from_config(cfg)
    variants = ablation.loss_variants(ex.loss_from_config(cfg), args.kl_sweep)
    names = list(variants)
    n_var = len(names)
    losses = ablation.stack_losses([variants[n] for n in names])
    c = 3 if cfg.data.channels == "all" else 1
    state0 = jax.device_get(create_state(model, tx, jax.random.key(int(args.seed)), example_inputs(2, int(cfg.data.image_size), c)))
    bs = int(cfg.train.batch_size)
    ds = train_dataset(data["train"], global_batch_size=bs,
                       seed=int(args.seed), shard=Shard(0, 1))

    sstep = ablation.sequential_step(model, tx, prep, augment, schedule)

    # ---- speed: each stacked mode against one variant after another, same batches, compile apart
    print(f"loss_ablation: {n_var} variants, timing {args.timing_steps} steps each way ...", file=sys.stderr, flush=True)
    timing_batches = [jax.device_put(ds[i]) for i in range(args.timing_steps + 1)]
    steps_of, speed = {}, {"variants": n_var, "batch_size": bs, "image_size": int(cfg.data.image_size),
                           "timed_steps": args.timing_steps}
    for mode in args.modes:
        steps_of[mode] = ablation.variant_step(model, tx, prep, augment, schedule, mode=mode)
        many = ablation.stack_states(state0, n_var)
        t0 = time.perf_counter()
        many, m = steps_of[mode](many, timing_batches[0], losses)
        jax.block_until_ready(m)
        speed[f"{mode}_compile_s"] = round(time.perf_counter() - t0, 2)
        box = {"s": many, "t": 1}

        def once(mode=mode, box=box):
            box["s"], mm = steps_of[mode](box["s"], timing_batches[box["t"]], losses)
            box["t"] += 1
            return mm

        speed[f"{mode}_step_s"] = _timed(once, args.timing_steps) / args.timing_steps
        del box, many
    singles = [jax.device_put(state0) for _ in range(n_var)]
    per_variant = [jax.tree_util.tree_map(lambda x, i=i: x[i], losses) for i in range(n_var)]
    t0 = time.perf_counter()
    singles[0], m = sstep(singles[0], timing_batches[0], per_variant[0])
    jax.block_until_ready(m)
    speed["sequential_compile_s"] = round(time.perf_counter() - t0, 2)
    for i in range(1, n_var):  # the first step of the other variants (same compiled program)
        singles[i], m = sstep(singles[i], timing_batches[0], per_variant[i])
    jax.block_until_ready(m)
    seq_box = {"t": 1}

    def s_once():
        t = seq_box["t"]
        seq_box["t"] += 1
        out = None
        for i in range(n_var):
            singles[i], out = sstep(singles[i], timing_batches[t], per_variant[i])
        return out

    speed["sequential_step_s"] = _timed(s_once, args.timing_steps) / args.timing_steps
    del singles
    for mode in steps_of:
        speed[f"{mode}_vs_sequential"] = speed["sequential_step_s"] / speed[f"{mode}_step_s"]
    chosen = (min([*steps_of, "sequential"], key=lambda md: speed[f"{md}_step_s"]) if args.train_with == "fastest"
              else args.train_with)
    speed["trained_with"] = chosen
    print("loss_ablation: s/step for all " + f"{n_var} variants: " +
          ", ".join(f"{md} {speed[f'{md}_step_s']:.2f} ({speed[f'{md}_vs_sequential']:.2f}x)" for md in steps_of) +
          f", one after another {speed['sequential_step_s']:.2f}; training with {chosen}", file=sys.stderr, flush=True)

    # ---- training, with the fastest way measured above (all give the same numbers; tests/test_ablation.py)
    if chosen == "sequential":
        def vstep(states, batch, _losses):
            batch = jax.device_put(batch)
            outs = [sstep(states[i], batch, per_variant[i]) for i in range(n_var)]
            return [o[0] for o in outs], ablation.stack([o[1] for o in outs])

        many = [jax.device_put(state0) for _ in range(n_var)]
        get_variant = lambda host, i: host[i]  # noqa: E731
    else:
        vstep = steps_of[chosen]
        many = jax.device_put(ablation.stack_states(state0, n_var))
        get_variant = ablation.variant_state
    it = iter(host_iterator(ds, num_threads=int(cfg.data.num_threads)))
    log_every = max(1, args.steps // 50)
    curves: dict[str, list] = {n: [] for n in names}
    log_rows = []
    nonfinite: dict[str, int] = {}  # variant -> first logged step with a non-finite loss or weights
    bar = tqdm(total=args.steps, desc="ablation", unit="step", disable=args.quiet or not sys.stderr.isatty(),
               file=sys.stderr)
    t0 = time.perf_counter()
    for step_no in range(1, args.steps + 1):
        many, metrics = vstep(many, next(it), losses)
        if step_no % log_every == 0 or step_no == args.steps:
            host = jax.device_get(metrics)
            bad = [names[i] for i in np.flatnonzero(~np.isfinite(host["total"]) | (host["params_finite"] < 1))]
            for n in bad:
                if n not in nonfinite:
                    nonfinite[n] = step_no
                    print(f"loss_ablation: warning: {n}: non-finite loss or weights at step {step_no}",
                          file=sys.stderr)
            for i, n in enumerate(names):
                row = {"step": step_no, "variant": n, **{k: float(v[i]) for k, v in host.items()}}
                log_rows.append(row)
                curves[n].append((step_no, float(host["total"][i])))
        bar.update(1)
    jax.block_until_ready(many)
    train_s = time.perf_counter() - t0
    bar.close()
    final_train = {n: {k: v for k, v in log_rows[-n_var + i].items() if k not in ("step", "variant")}
                   for i, n in enumerate(names)}

    # ---- evaluation of each variant's final weights
    evaluator = make_runner("jit", None, functools.partial(
        eval_outputs, model=model, prep=prep, eval_key=jax.random.key_data(jax.random.key(EVAL_SEED)),
        diagnostics=True))
    results = {}
    host_many = jax.device_get(many)
    for i, n in enumerate(names):
        variables = evaluator.put_variables(get_variant(host_many, i).variables())
        results[n] = {"weights": {k: float(v) for k, v in variants[n].weights().items()},
                      "train": final_train[n], "non_finite_at": nonfinite.get(n),
                      "validation": summary_metrics(evaluate_split(evaluator, variables, data["validation"], cfg))}
        print(f"loss_ablation: {n}: validation slice accuracy {results[n]['validation']['slice_accuracy']:.4f}, "
              f"Dice/volume {results[n]['validation']['dice_volume_mean']:.4f}", file=sys.stderr, flush=True)
    return {"config": json.loads(configs.to_json(cfg)), "config_arg": args.config, "variants": names, "speed": speed, "results": results,
            "train_wall_s": round(train_s, 1), "curves": curves, "log_rows": log_rows,
            "n_patients": {s: len({r.patient for r in d.records}) for s, d in data.items()},
            "n_slices": {s: len(d.records) for s, d in data.items()}}


MODE_TEXT = {"vmap": "`jax.vmap` over variants, one jit", "map": "`jax.lax.map` over variants, one jit"}


def render(res: dict, command: str, machine: str, wall_s: float) -> str:
    sp = res["speed"]
    cfg = res["config"]
    lines = [
        "# DL-VAE-CNN loss ablation", "",
        f"Produced by `{command}` on {machine}; wall time {wall_s / 60:.1f} min "
        f"(training {res['train_wall_s'] / 60:.1f} min).", "",
        f"- {sp['variants']} variants trained side by side with `{sp['trained_with']}` (the fastest way measured "
        "below; every way gives the same parameters, tests/test_ablation.py).",
        f"- Model: `dlvae_cnn` from the `{res['config_arg']}` config at {cfg['data']['image_size']}x"
        f"{cfg['data']['image_size']}, batch {cfg['train']['batch_size']}, {cfg['train']['steps']} steps, seed "
        f"{cfg['train']['seed']}; every variant starts from the same weights and sees the same batches.",
        f"- Patients (slices): train {res['n_patients']['train']} ({res['n_slices']['train']}), validation "
        f"{res['n_patients']['validation']} ({res['n_slices']['validation']}); split seed "
        f"{cfg['data']['split_seed']}. Variants are judged on the validation patients only; the test patients "
        "are never scored by the ablation.",
        "- Figures are from each variant's final weights, one seed: differences of a few points between "
        "variants are within what another seed could change (see the spread over seeds in tables.md).", "",
        "## Speed: stacked variants against one variant after another", "",
        "| | s per step (all variants) | variant-slices/s | compile (s) | vs sequential |", "|---|---|---|---|---|",
        *[f"| {MODE_TEXT[md]} | {sp[md + '_step_s']:.2f} | {sp['variants'] * sp['batch_size'] / sp[md + '_step_s']:.1f} | "
          f"{sp[md + '_compile_s']:.1f} | **{sp[md + '_vs_sequential']:.2f}x** |" for md in ("vmap", "map") if md + "_step_s" in sp],
        f"| one after another (the same jitted step) | {sp['sequential_step_s']:.2f} | "
        f"{sp['variants'] * sp['batch_size'] / sp['sequential_step_s']:.1f} | {sp['sequential_compile_s']:.1f} | 1x |", "",
        f"{sp['timed_steps']} timed steps each way, same batches, in the same run; the variants were trained with "
        f"`{sp['trained_with']}`.", "",
        "## Results", "",
        f"Validation, {res['n_patients']['validation']} patients. KL: the label-free posterior's, in nats, on "
        "the validation slices; active: dimensions whose posterior mean varies (variance > 0.01); probe: the "
        "validation Dice lost when the CNN's z is replaced by a prior draw.", "",
        "| Variant | KL | rec | cos | latent cls | final train loss | KL (nats) | active | probe Dice drop | "
        "val acc | val F1 | val Dice/vol | val IoU |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    nan = float("nan")
    for n in res["variants"]:
        r = res["results"][n]
        w, t, v = r["weights"], r["train"], r["validation"]
        label = n if r.get("non_finite_at") is None else f"{n} (**non-finite from step {r['non_finite_at']}**)"
        lines.append(
            f"| {label} | {w['kl']:g} | {w['reconstruction']:g} | {w['cosine']:g} | {w['latent_classification']:g} | "
            f"{t['total']:.3f} | {v.get('latent_kl_nats', nan):.2f} | {v.get('latent_active_units', nan):.0f} | "
            f"{v.get('probe_prior_dice_drop', nan):+.3f} | {v['slice_accuracy']:.3f} | {v['slice_f1']:.3f} | "
            f"{v['dice_volume_mean']:.3f} | {v['iou_mean']:.3f} |")
    lines += ["", "![ablation](loss_ablation.png)", ""]
    return "\n".join(lines) + "\n"


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dlvae_jax.io import atomic_path

    names = res["variants"]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4))
    x = np.arange(len(names))
    a1.bar(x - 0.2, [res["results"][n]["validation"]["dice_volume_mean"] for n in names], 0.4,
           label="validation Dice/volume")
    a1.bar(x + 0.2, [res["results"][n]["validation"]["slice_accuracy"] for n in names], 0.4,
           label="validation slice accuracy")
    a1.set_xticks(x, names, rotation=35, ha="right", fontsize=7)
    a1.set_ylim(0, 1)
    a1.legend(fontsize=7)
    a1.set_title("final weights on the validation patients", fontsize=9)
    for n in names:
        pts = res["curves"][n]
        a2.plot([p[0] for p in pts], [p[1] for p in pts], lw=1, label=n)
    a2.set_yscale("log")
    a2.set_xlabel("step")
    a2.set_title("training loss (weighted total)", fontsize=9)
    a2.legend(fontsize=6)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)


def _command(args) -> str:
    from tables import _shown_path

    argv = ["--data-dir", _shown_path(args.data_dir), "--steps", str(args.steps), "--seed", str(args.seed)]
    if args.config != "cpu":
        argv += ["--config", args.config]
    if args.kl_sweep != [0.1, 0.3, 3.0, 10.0]:
        argv += ["--kl-sweep", ",".join(f"{x:g}" for x in args.kl_sweep)]
    if args.train_with != "fastest":
        argv += ["--train-with", args.train_with]
    if args.modes != ["vmap", "map"]:
        argv += ["--modes", ",".join(args.modes)]
    if args.timing_steps != 3:
        argv += ["--timing-steps", str(args.timing_steps)]
    for s in args.set or []:
        argv += ["--set", s]
    argv += ["--out", _shown_path(args.out)]
    return " ".join(["python", "experiments/loss_ablation.py"] + argv)


def main(argv=None) -> int:
    import jax

    from dlvae_jax import outdir, signals
    from dlvae_jax.errors import DlvaeError
    from dlvae_jax.io import write_json, write_text
    from dlvae_jax.eval.evaluate import json_safe

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from tables import _machine

    args = parse_args(argv)
    if args.render:
        res = json.loads((args.out / "loss_ablation.json").read_text())
        write_text(args.out / "loss_ablation.md", render(res, res["command"], res["machine"], res["wall_s"]))
        plot(res, args.out / "loss_ablation.png")
        print(f"loss_ablation: rewrote {args.out / 'loss_ablation.md'}")
        return 0
    t0 = time.perf_counter()
    with signals.handle_signals():
        try:
            # The results folder is shared with experiments/tables.py: same marker rules, and
            # its lock, taken before any work, keeps one writer (and one CPU hog) at a time.
            with outdir.run_folder(args.out, "loss_ablation", accept=("tables",), inputs=[args.data_dir]) as out:
                res = run(args)
                wall = time.perf_counter() - t0
                command = _command(args)
                log_rows = res.pop("log_rows")
                write_text(out / "loss_ablation_log.jsonl", "".join(json.dumps(r) + "\n" for r in log_rows))
                write_json(out / "loss_ablation.json", json_safe(dict(res, command=command, machine=_machine(),
                                                                       wall_s=round(wall, 1), jax=jax.__version__)))
                write_text(out / "loss_ablation.md", render(res, command, _machine(), wall))
                plot(res, out / "loss_ablation.png")
        except DlvaeError as err:
            print(f"loss_ablation: error: {err}", file=sys.stderr)
            return 2
        except KeyboardInterrupt as err:
            print("loss_ablation: interrupted; nothing written", file=sys.stderr)
            if signals.received() is not None:
                signals.exit_now(getattr(err, "exit_code", 130))
            return 130
    print(f"loss_ablation: wrote {args.out / 'loss_ablation.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
