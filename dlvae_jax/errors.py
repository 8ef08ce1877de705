"""Errors raised on bad user input; the CLI turns them into one line and exit code 2."""

import sys


class DlvaeError(Exception):
    """Base class of the errors the CLI reports without a traceback."""


class DataError(DlvaeError):
    """Bad input data: the message names the file and the fault."""


class OutputError(DlvaeError):
    """An output folder that cannot or must not be written: the message names the user's path."""


def print_warning(message: str) -> None:
    """A finding that does not stop the command, as one line on stderr."""
    print(f"dlvae-jax: warning: {message}", file=sys.stderr)
