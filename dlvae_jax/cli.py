"""The `dlvae-jax` command line.

Each subsystem contributes its subcommands through a `register(subparsers)`
function; a subcommand's handler takes the parsed args and returns an exit code.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from dlvae_jax import __version__
from dlvae_jax.errors import DlvaeError

# Modules that add subcommands; a module that is missing (not built yet) is skipped.
_COMMAND_MODULES = (
    "dlvae_jax.pipeline",      # classical: synthesize/equalize/K-means ROI/overlays
    "dlvae_jax.data.cli",      # data synth|check|build
    "dlvae_jax.models.cli",    # models --summary
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dlvae-jax",
        description="DL-VAE-CNN MRI tumor segmentation in JAX.",
    )
    parser.add_argument("--version", action="version", version=f"dlvae-jax {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as err:
            if err.name == name:
                continue
            raise
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except DlvaeError as err:
        print(f"dlvae-jax: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # e.g. an output folder that cannot be written; the message names the path
        print(f"dlvae-jax: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("dlvae-jax: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
