"""`dlvae-jax data synth|check|split|build`."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

from dlvae_jax.errors import DataError


def _scan(args, progress: bool = True):
    from dlvae_jax.data import lgg

    with warnings.catch_warnings():
        # Warnings are printed once below, as plain lines, not as Python warnings.
        warnings.simplefilter("ignore", lgg.DataWarning)
        index = lgg.scan(args.data_dir, skip_bad=args.skip_bad, progress=progress and sys.stderr.isatty())
    for note in index.warnings:
        print(f"warning: {note}", file=sys.stderr)
    if index.skipped:
        print(f"skipped {len(index.skipped)} bad files (--skip-bad):")
        for _, fault in index.skipped:
            print(f"  skipped: {fault}")
    return index


def _cmd_synth(args) -> int:
    from dlvae_jax.data.synth import synthesize

    out = synthesize(args.out, n_patients=args.patients, seed=args.seed, size=args.size,
                     slices_per_patient=args.slices)
    print(f"wrote {args.patients} synthetic patients x {args.slices} slices ({args.size}x{args.size}) to {out}")
    return 0


def _cmd_check(args) -> int:
    from dlvae_jax.data.lgg import summary_lines

    index = _scan(args)
    print("\n".join(summary_lines(index)))
    return 0


def _fractions(args):
    f = tuple(args.fractions)
    if len(f) != 3 or min(f) < 0 or abs(sum(f) - 1.0) > 1e-6:
        raise DataError(f"--fractions must be three non-negative numbers summing to 1, got {list(f)}")
    return f


def _print_split_counts(index, splits):
    from dlvae_jax.data.splits import split_report

    for name, c in split_report(index, splits).items():
        print(f"{name}: {c['patients']} patients, {c['slices']} slices, {c['tumor_slices']} with tumor")


def _cmd_split(args) -> int:
    from dlvae_jax.data.splits import make_splits, write_splits

    fractions = _fractions(args)
    index = _scan(args)
    splits = make_splits(index, args.seed, fractions)
    path = write_splits(Path(args.work_dir) / "splits.json", index, splits, args.seed, fractions)
    _print_split_counts(index, splits)
    print(f"wrote {path}")
    return 0


def _cmd_build(args) -> int:
    from dlvae_jax.data import tfds_lgg
    from dlvae_jax.data.splits import write_splits

    fractions = _fractions(args)
    index = _scan(args)  # every file is checked before TFDS writes anything
    builder, splits = tfds_lgg.build(args.data_dir, args.tfds_dir, split_seed=args.seed,
                                     fractions=fractions, index=index, overwrite=args.overwrite)
    work_dir = Path(args.work_dir) if args.work_dir else Path(args.tfds_dir)
    path = write_splits(work_dir / "splits.json", index, splits, args.seed, fractions)
    _print_split_counts(index, splits)
    print(f"built {tfds_lgg.NAME} at {builder.data_dir}")
    print(f"wrote {path}")
    return 0


def register(subparsers) -> None:
    data = subparsers.add_parser("data", help="LGG dataset: synthesize, check, split, build TFDS")
    sub = data.add_subparsers(dest="data_command", metavar="DATA_COMMAND")
    data.set_defaults(func=lambda args: (data.print_help(), 2)[1])

    p = sub.add_parser("synth", help="write a synthetic phantom dataset in the LGG layout")
    p.add_argument("--out", required=True, help="output folder (must not exist or be empty)")
    p.add_argument("--patients", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=256, help="image side in pixels")
    p.add_argument("--slices", type=int, default=20, help="slices per patient")
    p.set_defaults(func=_cmd_synth)

    def common(p):
        p.add_argument("--data-dir", required=True, help="dataset folder in the LGG layout")
        p.add_argument("--skip-bad", action="store_true", help="skip bad slices and report them instead of failing")

    p = sub.add_parser("check", help="validate a dataset folder and print its summary")
    common(p)
    p.set_defaults(func=_cmd_check)

    def split_opts(p):
        p.add_argument("--seed", type=int, default=0, help="split seed")
        p.add_argument("--fractions", type=float, nargs=3, default=(0.7, 0.15, 0.15),
                       metavar=("TRAIN", "VAL", "TEST"))

    p = sub.add_parser("split", help="write patient-level splits.json")
    common(p)
    split_opts(p)
    p.add_argument("--work-dir", required=True, help="folder that receives splits.json")
    p.set_defaults(func=_cmd_split)

    p = sub.add_parser("build", help="build the lgg_mri TFDS dataset (array_record)")
    common(p)
    split_opts(p)
    p.add_argument("--tfds-dir", required=True, help="TFDS data dir that receives lgg_mri/")
    p.add_argument("--work-dir", default=None, help="folder for splits.json (default: --tfds-dir)")
    p.add_argument("--overwrite", action="store_true", help="rebuild if already built")
    p.set_defaults(func=_cmd_build)
