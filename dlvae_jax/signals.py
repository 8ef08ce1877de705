"""SIGINT, SIGTERM and SIGHUP stop a command cleanly.

`dlvae_jax.cli.main` runs every command inside `handle_signals()`. The first
signal raises `Interrupted` (a `KeyboardInterrupt` subclass carrying
`signum` and `exit_code` = 128 + signum) in the main thread, so every `with`
block unwinds: `dlvae_jax.outdir` removes its temporary folder and lock and
leaves the previous output untouched. `main` then prints one line,
``dlvae-jax: interrupted (SIGTERM)``, and leaves with ``os._exit(exit_code)``
(130 for SIGINT, 143 for SIGTERM, 129 for SIGHUP).

Why `os._exit`: a normal interpreter exit tears down modules while XLA's
compiler threads (or TFDS and thread-pool workers) may still be running, which
segfaults in about half the tries when the stop lands during a JAX
compilation. Everything worth cleaning up has been cleaned up by then, so the
process flushes its streams and ends without teardown.

Why a watchdog thread: Python runs signal handlers only between bytecodes of
the main thread, so a stop that lands in a long XLA compilation or a C-level
write waits for it. The C-level handler also writes the signal number to a
pipe (`signal.set_wakeup_fd`), which wakes the watchdog at once. If the main
thread has not reached the Python handler within `GRACE_S` seconds, or has not
finished within `FINISH_S` seconds after it, or a third signal arrives, the
watchdog removes the registered temporaries itself and exits with the same code.

What a long-running loop (training) must do to cooperate:

- Nothing, to stop at once: `Interrupted` propagates like any exception; do
  not catch `BaseException` or `KeyboardInterrupt` without re-raising.
- To finish a step and write a checkpoint first, run the step inside
  ``with signals.deferred():``; a signal received meanwhile is held and raised
  as `Interrupted` when the block exits. Poll `signals.pending()` (the signal
  number or None) at a safe point, save, then call `signals.check()`, which
  raises `Interrupted` if a signal is pending. Deferred blocks that may take
  long can raise the limit with ``deferred(finish_s=...)``.
- Register temporaries that must not survive an emergency exit with
  `register(path)` / `unregister(path)` (`dlvae_jax.outdir` does this).
"""

from __future__ import annotations

import contextlib
import os
import select
import shutil
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Iterator

GRACE_S = 3.0     # main thread stuck in C code this long after a signal: the watchdog takes over
FINISH_S = 60.0   # after the handler ran, the command has this long to unwind
_FORCE_COUNT = 3  # this many signals end the process at once

_SIGNALS = tuple(s for s in (getattr(signal, n, None) for n in ("SIGINT", "SIGTERM", "SIGHUP")) if s is not None)


class Interrupted(KeyboardInterrupt):
    """Raised in the main thread when a stop signal arrives; `exit_code` is 128 + signum."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = int(signum)
        self.exit_code = 128 + self.signum

    @property
    def name(self) -> str:
        try:
            return signal.Signals(self.signum).name
        except ValueError:
            return f"signal {self.signum}"

    def __str__(self) -> str:
        return f"interrupted ({self.name})"


_signum: int | None = None  # first stop signal received while handling is on
_raised = False
_defer_depth = 0
_finish_s = FINISH_S
_acknowledged = threading.Event()
_critical_lock = threading.RLock()
_cleanups: dict[str, Path] = {}
_registry_lock = threading.Lock()
_exiting = threading.Lock()
_resent = 0  # signals we sent ourselves, which the watchdog must not count


def received() -> int | None:
    """The first stop signal received inside `handle_signals`, or None."""
    return _signum


def pending() -> int | None:
    """A stop signal held by `deferred()` and not yet raised, or None."""
    return _signum if (_signum is not None and not _raised) else None


def check() -> None:
    """Raises `Interrupted` if a stop signal is pending."""
    global _raised
    if pending() is not None:
        _raised = True
        raise Interrupted(_signum)


@contextlib.contextmanager
def deferred(finish_s: float | None = None) -> Iterator[None]:
    """Holds stop signals for the block; a held one is raised when it exits."""
    global _defer_depth, _finish_s
    previous = _finish_s
    if finish_s is not None:
        _finish_s = max(_finish_s, float(finish_s))
    _defer_depth += 1
    try:
        yield
    finally:
        _defer_depth -= 1
        _finish_s = previous
    if _defer_depth == 0:
        check()


@contextlib.contextmanager
def critical() -> Iterator[None]:
    """A short section (renames, cleanup) that neither a signal nor the watchdog may split."""
    with _critical_lock, deferred():
        yield


def register(path: Path) -> None:
    """Marks `path` (file or folder) for removal if the watchdog has to end the process."""
    with _registry_lock:
        _cleanups[os.fspath(path)] = Path(path)


def unregister(path: Path) -> None:
    with _registry_lock:
        _cleanups.pop(os.fspath(path), None)


def remove_registered() -> None:
    with _registry_lock:
        paths = list(_cleanups.values())
    for path in paths:
        for _ in range(3):  # a writer still running in C may add a file between passes
            try:
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path)
                elif path.exists() or path.is_symlink():
                    path.unlink()
                break
            except OSError:
                time.sleep(0.05)


def exit_now(code: int, message: str | None = None) -> None:
    """Flushes, prints `message`, and ends the process without interpreter teardown."""
    if not _exiting.acquire(blocking=False):
        return  # the other thread is already leaving
    try:
        sys.stdout.flush()
    except Exception:
        pass
    if message:
        try:
            sys.stderr.write(message + "\n")
            sys.stderr.flush()
        except Exception:
            pass
    os._exit(code)


def _handler(signum, frame) -> None:
    global _signum, _raised
    if _signum is None:
        _signum = signum
    _acknowledged.set()
    if _raised or _defer_depth:
        return
    _raised = True
    raise Interrupted(signum)


def _unraisable(previous):
    def hook(unraisable) -> None:
        # Raised where Python ignores exceptions (a GC callback, __del__): the
        # stop would be lost, so deliver the signal again; the handler raises
        # once control is back in ordinary code.
        global _raised, _resent
        if isinstance(unraisable.exc_value, Interrupted):
            _raised = False
            _resent += 1
            # From another thread: sent from here, the handler would run (and
            # raise) inside this hook, where it is ignored again.
            threading.Timer(0.01, signal.pthread_kill,
                            (threading.main_thread().ident, unraisable.exc_value.signum)).start()
            return
        previous(unraisable)

    return hook


def _emergency(signum: int) -> None:
    # A commit in progress (two renames) finishes first, so the old output is never lost.
    _critical_lock.acquire(timeout=10)
    remove_registered()
    exit_now(128 + signum, f"dlvae-jax: interrupted ({Interrupted(signum).name})")


def _watch(rfd: int) -> None:
    global _resent
    first = None
    count = 0
    signum = signal.SIGINT
    while True:
        timeout = None
        if first is not None:
            limit = _finish_s if _acknowledged.is_set() else GRACE_S
            timeout = max(0.0, first + limit - time.monotonic())
        try:
            ready, _, _ = select.select([rfd], [], [], timeout)
        except (OSError, ValueError):
            return
        if not ready:
            if first is not None and time.monotonic() >= first + (_finish_s if _acknowledged.is_set() else GRACE_S):
                _emergency(signum)
            continue
        try:
            data = os.read(rfd, 64)
        except BlockingIOError:
            continue
        except OSError:
            return
        if not data:
            return  # handling ended: the write end was closed
        stops = []
        for b in data:
            if b not in _SIGNALS:
                continue
            if _resent > 0:
                _resent -= 1
                continue
            stops.append(b)
        if not stops:
            continue
        if first is None:
            first, signum = time.monotonic(), stops[0]
        count += len(stops)
        if count >= _FORCE_COUNT:
            _emergency(signum)


def reclaim() -> None:
    """Installs our handlers again where a library replaced them at the C level
    while Python still lists ours: `jax.distributed.initialize` starts a
    preemption notifier that takes SIGTERM, after which a SIGTERM would no
    longer stop the run cleanly (checkpoint, agreement, exit 143)."""
    if threading.current_thread() is not threading.main_thread():
        return
    for s in _SIGNALS:
        if signal.getsignal(s) is _handler:
            signal.signal(s, _handler)


@contextlib.contextmanager
def handle_signals() -> Iterator[None]:
    """Turns SIGINT/SIGTERM/SIGHUP into `Interrupted` for the block (main thread only; else a no-op)."""
    global _signum, _raised
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _signum, _raised = None, False
    _acknowledged.clear()
    rfd, wfd = os.pipe()
    os.set_blocking(wfd, False)
    old_handlers = {s: signal.getsignal(s) for s in _SIGNALS}
    old_wakeup = signal.set_wakeup_fd(wfd, warn_on_full_buffer=False)
    old_hook = sys.unraisablehook
    sys.unraisablehook = _unraisable(old_hook)
    watchdog = threading.Thread(target=_watch, args=(rfd,), name="dlvae-jax-signals", daemon=True)
    watchdog.start()
    try:
        for s in _SIGNALS:
            signal.signal(s, _handler)
        yield
    finally:
        for s, h in old_handlers.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)
        signal.set_wakeup_fd(old_wakeup)
        sys.unraisablehook = old_hook
        os.close(wfd)
        watchdog.join(timeout=1)
        if not watchdog.is_alive():
            os.close(rfd)
