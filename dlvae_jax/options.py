"""Command-line option types: every numeric option is checked by the parser.

A bad value stops the command with one line naming the option, the allowed
range and the value, before anything is read or written. `BOUNDS` gives the
range of the options shared by several commands; `dlvae_jax.cli` applies it to
any `--NAME` option declared with a plain ``type=int`` / ``type=float``, and
every other float option is at least required to be finite.
"""

from __future__ import annotations

import argparse
import math

SEED_MAX = 2**32  # seeds feed NumPy and JAX keys; one range for both


def int_in(lo: int, hi: int | None = None, *, multiple_of: int = 1):
    """An argparse type: an integer in [lo, hi] (and a multiple of `multiple_of`)."""

    def parse(text: str) -> int:
        try:
            value = int(text, 10)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < lo or (hi is not None and value > hi) or value % multiple_of:
            where = f"[{lo}, {hi}]" if hi is not None else f">= {lo}"
            extra = f", a multiple of {multiple_of}" if multiple_of > 1 else ""
            raise argparse.ArgumentTypeError(f"must be an integer in {where}{extra}, got {text}")
        return value

    parse.__name__ = "integer"
    return parse


def float_in(lo: float = -math.inf, hi: float = math.inf):
    """An argparse type: a finite float in [lo, hi]."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(value) or value < lo or value > hi:
            raise argparse.ArgumentTypeError(f"must be a finite number in [{lo:g}, {hi:g}], got {text}")
        return value

    parse.__name__ = "number"
    return parse


seed = int_in(0, SEED_MAX - 1)
fraction = float_in(0.0, 1.0)
finite_float = float_in()

# Options shared across commands, by flag.
BOUNDS = {
    "--seed": seed,
    "--split-seed": seed,
    "--k": int_in(2, 255),  # at most one cluster per grey level
    "--channels": int_in(1, 64),
    "--size": int_in(1, 4096),
    "--image-size": int_in(1, 4096),
    "--batch-size": int_in(1, 65536),
    "--patients": int_in(1, 100_000),
    "--slices": int_in(3, 10_000),
    "--n-init": int_in(1, 1000),
    "--overlays": int_in(0, 100_000),
    "--margin": int_in(0, 4096),
    "--min-size": int_in(0, 2**24),
    "--fractions": fraction,
    "--epochs": int_in(1, 1_000_000),
    "--steps": int_in(1, 10**9),
    "--workers": int_in(0, 1024),
    # Samples stream into a running mean (memory does not grow with N); the
    # bound keeps one call to hours, not days, on a CPU.
    "--samples": int_in(0, 10_000),
}


def checked_type(action: argparse.Action):
    """The checked replacement for `action`'s plain int/float type, or None to leave it."""
    if action.type not in (int, float):
        return None
    for flag in action.option_strings:
        if flag in BOUNDS:
            return BOUNDS[flag]
    return finite_float if action.type is float else None
