"""Errors raised on bad user input; the CLI turns them into one line and exit code 2."""


class DlvaeError(Exception):
    """Base class of the errors the CLI reports without a traceback."""


class DataError(DlvaeError):
    """Bad input data: the message names the file and the fault."""
