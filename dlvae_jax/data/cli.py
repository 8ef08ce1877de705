"""`dlvae-jax data synth|check|split|build`."""

from __future__ import annotations

import json
import math
import sys
import warnings
from pathlib import Path

from dlvae_jax import options
from dlvae_jax.errors import DataError, OutputError, print_warning


def _scan(args, progress: bool = True):
    from dlvae_jax.data import lgg

    with warnings.catch_warnings():
        # Warnings are printed once below, as plain lines, not as Python warnings.
        warnings.simplefilter("ignore", lgg.DataWarning)
        index = lgg.scan(args.data_dir, skip_bad=args.skip_bad, progress=progress and sys.stderr.isatty())
    for note in index.warnings:
        print_warning(note)
    if index.skipped:
        print(f"skipped {len(index.skipped)} bad files (--skip-bad):")
        for _, fault in index.skipped:
            print(f"  skipped: {fault}")
    return index


def _cmd_synth(args) -> int:
    from dlvae_jax.data.synth import synthesize

    out = synthesize(args.out, n_patients=args.patients, seed=args.seed, size=args.size,
                     slices_per_patient=args.slices, overwrite=args.overwrite)
    print(f"wrote {args.patients} synthetic patients x {args.slices} slices ({args.size}x{args.size}) to {out}")
    return 0


def _cmd_check(args) -> int:
    from dlvae_jax.data.lgg import summary_lines

    index = _scan(args)
    print("\n".join(summary_lines(index)))
    return 0


def _fractions(args):
    f = tuple(args.fractions)
    if len(f) != 3 or not all(math.isfinite(x) for x in f) or min(f) < 0 or abs(sum(f) - 1.0) > 1e-6:
        raise DataError(f"--fractions must be three non-negative numbers summing to 1, got {list(f)}")
    return f


def _print_split_counts(index, splits):
    from dlvae_jax.data.splits import split_report

    for name, c in split_report(index, splits).items():
        print(f"{name}: {c['patients']} patients, {c['slices']} slices, {c['tumor_slices']} with tumor")


def _write_splits_into(workdir, command, args, index, splits, fractions) -> Path:
    """Writes WORKDIR/splits.json; an existing different one is replaced only with --overwrite."""
    from dlvae_jax.data.splits import SPLITS_FILE, splits_document
    from dlvae_jax.io import write_json
    from dlvae_jax.outdir import WORKDIR_COMMANDS, run_folder

    doc = splits_document(index, splits, args.seed, fractions)
    with run_folder(workdir, command, inputs=[args.data_dir], accept=WORKDIR_COMMANDS) as folder:
        path = folder / SPLITS_FILE
        shown = Path(workdir) / SPLITS_FILE
        if path.exists() and not args.overwrite:
            try:
                same = json.loads(path.read_text()) == json.loads(json.dumps(doc))
            except (OSError, ValueError):
                same = False
            if not same:
                raise OutputError(f"{shown}: already exists with other splits; pass --overwrite to replace it")
        if path.is_dir() or path.is_symlink():
            raise OutputError(f"{shown}: is not a regular file")
        write_json(path, doc)
    return shown


def _cmd_split(args) -> int:
    from dlvae_jax.data.splits import make_splits

    fractions = _fractions(args)
    index = _scan(args)
    splits = make_splits(index, args.seed, fractions)
    path = _write_splits_into(args.workdir, "data split", args, index, splits, fractions)
    _print_split_counts(index, splits)
    print(f"wrote {path}")
    return 0


def _cmd_build(args) -> int:
    from dlvae_jax.data import tfds_lgg
    from dlvae_jax.data.splits import make_splits

    fractions = _fractions(args)
    index = _scan(args)  # every file is checked before TFDS writes anything
    written = []
    if args.workdir:
        # Before the build, so an unusable workdir fails before the slow part; the
        # splits depend only on the index, seed and fractions, as the build's do.
        splits = make_splits(index, args.seed, fractions)
        written.append(_write_splits_into(args.workdir, "data build", args, index, splits, fractions))
    builder, splits = tfds_lgg.build(args.data_dir, args.tfds_dir, split_seed=args.seed,
                                     fractions=fractions, index=index, overwrite=args.overwrite)
    _print_split_counts(index, splits)
    print(f"built {tfds_lgg.NAME} at {builder.data_dir}")
    for path in [Path(args.tfds_dir) / tfds_lgg.NAME / "splits.json", *written]:
        print(f"wrote {path}")
    return 0


def register(subparsers) -> None:
    data = subparsers.add_parser("data", help="LGG dataset: synthesize, check, split, build TFDS")
    sub = data.add_subparsers(dest="data_command", metavar="DATA_COMMAND")
    data.set_defaults(func=lambda args: (data.print_help(), 2)[1])

    p = sub.add_parser("synth", help="write a synthetic phantom dataset in the LGG layout")
    p.add_argument("--out", required=True, help="output folder (must not exist or be empty)")
    p.add_argument("--patients", type=options.BOUNDS["--patients"], default=8, help="patients")
    p.add_argument("--seed", type=options.seed, default=0, help="seed, 0 <= S < 2**32")
    p.add_argument("--size", type=options.int_in(32, 1024), default=256, help="image side in pixels")
    p.add_argument("--slices", type=options.BOUNDS["--slices"], default=20, help="slices per patient")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing output folder made by dlvae-jax (never any other folder)")
    p.set_defaults(func=_cmd_synth)

    def common(p):
        p.add_argument("--data-dir", required=True, help="dataset folder in the LGG layout")
        p.add_argument("--skip-bad", action="store_true", help="skip bad slices and report them instead of failing")

    p = sub.add_parser("check", help="validate a dataset folder and print its summary")
    common(p)
    p.set_defaults(func=_cmd_check)

    def split_opts(p):
        p.add_argument("--seed", type=options.seed, default=0, help="split seed, 0 <= S < 2**32")
        p.add_argument("--fractions", type=options.fraction, nargs=3, default=(0.7, 0.15, 0.15),
                       metavar=("TRAIN", "VAL", "TEST"), help="patient shares of the splits, summing to 1")

    p = sub.add_parser("split", help="write patient-level splits.json")
    common(p)
    split_opts(p)
    p.add_argument("--workdir", required=True, help="run folder that receives splits.json (created if absent)")
    p.add_argument("--overwrite", action="store_true", help="replace a splits.json that holds other splits")
    p.set_defaults(func=_cmd_split)

    p = sub.add_parser("build", help="build the lgg_mri TFDS dataset (array_record)")
    common(p)
    split_opts(p)
    p.add_argument("--tfds-dir", required=True, help="TFDS data dir that receives lgg_mri/")
    p.add_argument("--workdir", default=None,
                   help="run folder that also receives splits.json (the dataset keeps its own in lgg_mri/)")
    p.add_argument("--overwrite", action="store_true",
                   help="rebuild lgg_mri/ (only one dlvae-jax built) and replace a different splits.json")
    p.set_defaults(func=_cmd_build)
