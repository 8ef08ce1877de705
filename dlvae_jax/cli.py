"""The `dlvae-jax` command line.

Each subsystem contributes its subcommands through a `register(subparsers)`
function; a subcommand's handler takes the parsed args and returns an exit code.
Every command runs under `dlvae_jax.signals.handle_signals()`: SIGINT,
SIGTERM and SIGHUP unwind it (temporaries removed) and end it with exit code
128 + the signal number. Parser errors, bad input and warnings each print as
one line.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import re
import sys
import warnings

from dlvae_jax import __version__, options, signals
from dlvae_jax.errors import DlvaeError, print_warning

# Modules that add subcommands; a module that is missing (not built yet) is skipped.
_COMMAND_MODULES = (
    "dlvae_jax.classical",     # classical: synthesize/equalize/K-means ROI/overlays
    "dlvae_jax.data.cli",      # data synth|check|split|build
    "dlvae_jax.models.cli",    # models --summary
    "dlvae_jax.train.cli",     # train
    "dlvae_jax.eval.cli",  # evaluate | predict
)


class _HelpFormatter(argparse.HelpFormatter):
    """Shows each option's default unless its help already mentions one."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or action.default in (None, False, argparse.SUPPRESS) or not action.option_strings:
            return text
        default = action.default
        if isinstance(default, (list, tuple)):
            default = " ".join(str(d) for d in default)
        return f"{text} (default: {default})".strip().replace("%", "%%")


class _Parser(argparse.ArgumentParser):
    """One-line errors naming the (sub)command, with a pointer to its --help."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)

    def parse_known_args(self, args=None, namespace=None):
        self._seen = list(sys.argv[1:] if args is None else args)
        return super().parse_known_args(args, namespace)

    def error(self, message):
        # A misspelt required flag is reported as missing; name the misspelling too.
        unknown = _unknown_flags(self, getattr(self, "_seen", []))
        if unknown and "required" in message:
            message = f"{message}; {_unknown_message(self, unknown)}"
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def _walk(parser: argparse.ArgumentParser):
    """Every parser below `parser`, `parser` included."""
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in dict.fromkeys(action.choices.values()):
                yield from _walk(sub)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="dlvae-jax",
        description="DL-VAE-CNN MRI tumor segmentation in JAX.",
    )
    parser.add_argument("--version", action="version", version=f"dlvae-jax {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as err:
            if err.name == name or name.startswith(f"{err.name}."):
                continue
            raise
        module.register(subparsers)
    for sub in _walk(parser):
        # Lets an unknown flag be reported by the subcommand it was given to.
        sub.set_defaults(_parser=sub)
        for action in sub._actions:
            checked = options.checked_type(action)
            if checked is not None:
                action.type = checked
    return parser


def _known_flags(parser: argparse.ArgumentParser) -> list[str]:
    return [s for a in parser._actions for s in a.option_strings]


def _unknown_flags(parser: argparse.ArgumentParser, words: list[str]) -> list[str]:
    known = _known_flags(parser)
    out = []
    for word in words:
        if word == "--":
            break
        flag = word.split("=", 1)[0]
        if flag.startswith("--") and not any(k.startswith(flag) for k in known):
            out.append(word)
    return out


def _unknown_message(parser: argparse.ArgumentParser, extras: list[str]) -> str:
    known = _known_flags(parser)
    hints = []
    for word in extras:
        if word.startswith("-"):
            close = difflib.get_close_matches(word.split("=", 1)[0], known, n=1)
            if close:
                hints.append(f"did you mean {close[0]}?")
    return f"unrecognized arguments: {' '.join(extras)}" + (f"; {' '.join(hints)}" if hints else "")


def _unrecognized(parser: argparse.ArgumentParser, extras: list[str]) -> None:
    parser._seen = []
    parser.error(_unknown_message(parser, extras))


_FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")


def _fit_hints(message: str, parser: argparse.ArgumentParser | None) -> str:
    """`message` without the hints that suggest an option the command does not have.

    Errors raised deep down (e.g. the data scan) may add a hint such as
    "--skip-bad skips bad slices" as a clause after "; " or in parentheses;
    such a clause is dropped when the command that failed has no such option.
    The first clause, the fault itself, is always kept.
    """
    if parser is None:
        return message
    known = set(_known_flags(parser))

    def fits(clause: str) -> bool:
        return all(flag in known for flag in _FLAG.findall(clause))

    def in_parens(m: re.Match) -> str:
        kept = [c for c in m.group(1).split("; ") if fits(c)]
        return f" ({'; '.join(kept)})" if kept else ""

    head, *rest = re.sub(r" \(([^()]*)\)", in_parens, message).split("; ")
    return "; ".join([head] + [c for c in rest if fits(c)])


def _one_line_warning(message, category, filename, lineno, file=None, line=None):
    ours = category.__module__.startswith("dlvae_jax")
    print_warning(str(message) if ours else f"{message} ({category.__name__})")


def main(argv: list[str] | None = None) -> int:
    args = None
    with signals.handle_signals():
        try:
            parser = build_parser()
            try:
                args, extras = parser.parse_known_args(argv)
                if extras:
                    _unrecognized(getattr(args, "_parser", parser), extras)
            except SystemExit as done:  # --help, --version, or a one-line parser error
                return done.code if isinstance(done.code, int) else 2
            if not getattr(args, "func", None):
                parser.print_help()
                return 2
            with warnings.catch_warnings():
                warnings.showwarning = _one_line_warning
                return int(args.func(args) or 0)
        except DlvaeError as err:
            print(f"dlvae-jax: error: {_fit_hints(str(err), getattr(args, '_parser', None))}", file=sys.stderr)
            return 2
        except OSError as err:  # e.g. an output folder that cannot be written; the message names the path
            print(f"dlvae-jax: error: {err}", file=sys.stderr)
            return 1
        except KeyboardInterrupt as err:
            code = getattr(err, "exit_code", 130)
            message = f"dlvae-jax: {err}" if isinstance(err, signals.Interrupted) else "dlvae-jax: interrupted"
            if signals.received() is None:
                print(message, file=sys.stderr)
                return code
            # A real signal: XLA or worker threads may still run, and interpreter
            # teardown under them can crash; cleanup is done, so leave now.
            signals.exit_now(code, message)
            return code  # the watchdog is already leaving
        finally:
            got = signals.received()
            if got is not None and sys.exc_info()[0] is None:
                # The signal was swallowed somewhere below; still report it.
                signals.exit_now(128 + got, f"dlvae-jax: interrupted ({signals.Interrupted(got).name})")


if __name__ == "__main__":
    sys.exit(main())
