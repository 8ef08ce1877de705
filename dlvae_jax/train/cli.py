"""`dlvae-jax train`."""

from __future__ import annotations

import os

from dlvae_jax.errors import DlvaeError


CLOSING_PATIENTS = 6  # training patients a run without validation patients is scored on at the end


def _cmd_train(args) -> int:
    from dlvae_jax import configs

    overrides = list(args.set or [])
    if args.data_dir is not None:
        # Stored absolute: `evaluate` and `predict` run from anywhere find the data.
        overrides.append(f"data.data_dir={os.path.abspath(os.path.expanduser(os.fspath(args.data_dir)))!r}")
    if args.tfds_dir is not None:
        overrides.append(f"data.tfds_dir={os.path.abspath(os.fspath(args.tfds_dir))!r}")
        overrides.append("data.source='array_record'")
    cfg = configs.load(args.config, overrides)
    if args.print_config:
        print(configs.describe(cfg))
        return 0
    if not args.workdir:
        raise DlvaeError("train: --workdir is required (the run folder: config, splits, checkpoints, logs)")
    if args.distributed:
        _init_distributed(args)
    import jax

    from dlvae_jax import signals
    from dlvae_jax.train.loop import train
    from dlvae_jax.train.step import PROBES

    try:
        summary = train(cfg, args.workdir, parallel=args.parallel, overwrite=args.overwrite,
                        progress="none" if args.quiet else None)
    except signals.Interrupted:
        if args.distributed:
            # Every process stops after the same step (the loop agrees on it); leaving
            # the job together lets the coordinator's shutdown barrier pass. An
            # interrupted process ends through os._exit, which skips JAX's atexit.
            jax.distributed.shutdown()
        raise
    if summary.get("already_finished"):
        print(f"{summary['workdir']}: already trained ({summary['steps']} of {summary['steps']} steps); nothing "
              "to do. Score it with `dlvae-jax evaluate`, or train longer in a new --workdir "
              "(train.steps sets the learning-rate schedule)")
        return 0
    val = summary.get("validation") or {}
    scored = "validation"
    if jax.process_count() == 1:
        # The best checkpoint on the validation split: confusion matrix, Dice per
        # patient and overlays in eval_validation/. A run without validation
        # patients is its last checkpoint, scored on 6 of the patients it trained
        # on (eval_train/), which shows what its latent carries, not how it does
        # on others. (A multi-process job leaves this to `dlvae-jax evaluate`:
        # Orbax's restore is collective.)
        from dlvae_jax.eval.evaluate import evaluate
        from dlvae_jax.train.loop import summary_metrics

        if val:
            evaluate(summary["workdir"], data_dir=summary["data_dir"], split="validation", checkpoint="best")
        else:
            report = evaluate(summary["workdir"], data_dir=summary["data_dir"], split="train", checkpoint="latest",
                              max_patients=CLOSING_PATIENTS)
            scored = (f"{report['n_patients']} of its {report['n_patients_in_split']} training patients "
                      "(seen in training: not a figure for unseen patients)")
            val = summary_metrics(report)
    print(f"trained {summary['steps']} steps in {summary['seconds']:.0f} s "
          f"({summary['slices_per_s']:.1f} slices/s); workdir {summary['workdir']}")
    if val:
        main = {k: v for k, v in val.items() if not k.startswith(("probe_", "latent_"))}
        print(f"{scored}: " + ", ".join(f"{k} {v:.4f}" for k, v in sorted(main.items())))
        if "latent_kl_nats" in val:
            drops = ", ".join(f"{n} {val[f'probe_{n}_dice_drop']:+.4f}" for n in PROBES)
            print(f"VAE latent: KL {val['latent_kl_nats']:.2f} nats, {val['latent_active_units']:.0f} active units; "
                  f"Dice drop with z replaced: {drops}")
    return 0


def _init_distributed(args) -> None:
    import jax

    kwargs = {}
    if args.coordinator:
        kwargs["coordinator_address"] = args.coordinator
    if args.num_processes is not None:
        kwargs["num_processes"] = args.num_processes
    if args.process_id is not None:
        kwargs["process_id"] = args.process_id
    # Cross-process collectives for CPU devices (GPUs and TPUs bring their own);
    # set before initialize(), which must run before any backend starts.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(**kwargs)
    except (RuntimeError, ValueError) as err:
        raise DlvaeError(f"--distributed: cannot join the job ({err})") from None
    # initialize() starts JAX's preemption notifier, which takes SIGTERM; the
    # loop's own stop agreement needs it back.
    from dlvae_jax import signals

    signals.reclaim()


def register(subparsers) -> None:
    from dlvae_jax.train.runners import RUNNERS

    p = subparsers.add_parser(
        "train", help="train a model from a config into a workdir (resumes by itself)",
        description="Train a model from a config (a name or a .py file, with --set overrides) into a workdir: "
                    "config.json, splits.json, checkpoints (latest and best by validation score), log.jsonl, "
                    "plots, and at the end the best checkpoint scored on the validation split (with no validation "
                    "patients, data.fractions = (1, 0, 0), the last checkpoint on 6 of the training patients). Run it again on "
                    "the same workdir to resume where it stopped. --print-config lists every field --set "
                    "accepts.")
    p.add_argument("--config", default="demo",
                   help="config name (demo, cpu, default, unet, cnn, vgg16, dcnn) or a .py file (default: demo)")
    p.add_argument("--workdir", default=None, help="run folder: config, splits, checkpoints, logs, plots (required "
                                                   "unless --print-config)")
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved config (every field --set accepts, with its value and type) and exit")
    p.add_argument("--data-dir", default=None, help="dataset folder in the kaggle_3m layout (default: the config's)")
    p.add_argument("--tfds-dir", default=None,
                   help="read slices from this `dlvae-jax data build` folder (array_record, each process its shard) "
                        "instead of loading TIFFs; its splits become the run's")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a config field, e.g. --set train.steps=200 (repeatable)")
    p.add_argument("--parallel", choices=RUNNERS, default="jit", help="how the step runs on many devices (default: jit)")
    p.add_argument("--overwrite", action="store_true", help="replace a run of another config in --workdir")
    p.add_argument("--quiet", action="store_true",
                   help="no progress (default: a bar on a terminal, else one line per log interval on stderr)")
    p.add_argument("--distributed", action="store_true", help="join a multi-process job (jax.distributed.initialize)")
    p.add_argument("--coordinator", default=None, help="coordinator host:port (default: from the environment)")
    p.add_argument("--num-processes", type=int, default=None, help="process count (default: from the environment)")
    p.add_argument("--process-id", type=int, default=None, help="this process's id (default: from the environment)")
    p.set_defaults(func=_cmd_train)
