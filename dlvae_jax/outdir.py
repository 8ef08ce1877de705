"""Output folders: every folder a command writes is owned and guarded here.

Rules, the same for every command:

- A folder we create carries a marker file, `MARKER` (JSON: command, version,
  created, pid, host). `--overwrite` replaces only a folder with that marker;
  a non-empty folder without it (the user's own files, a data set, `$PWD`) is
  never deleted, whatever the flags.
- An output equal to, inside, or around (holding) any input folder is refused,
  after resolving symlinks (and comparing inodes, for bind mounts).
- `output_folder` writes into a fresh temporary sibling of the
  symlink-resolved target (so the final rename stays on one file system) and
  renames it into place only when the command succeeded; an old folder is
  renamed aside first and deleted last, so at every instant the target holds
  either the old output or the new one.
- Temporaries are named ``.NAME.tmp-<pid>-<random>`` (``.NAME.old-...`` for a
  folder being replaced); every entry into this module removes, in the parent
  folder, those whose process is gone, and puts back an old folder whose
  replacement was cut off between its two renames.
- A lock file beside the target, ``.NAME.lock`` (holding the writer's pid),
  is held with `flock` for the whole write: a second writer is refused with a
  message naming the holder's pid. The kernel drops the lock of a killed
  process, so a stale lock file is simply taken over.
- Errors are `OutputError` naming the path the user gave, never a temporary.

`run_folder` is for folders that live across runs (a training workdir): it
is reused when the marker's command is accepted, and nothing is staged.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import os
import re
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Iterator, Sequence, Union

from dlvae_jax import __version__, signals
from dlvae_jax.errors import DlvaeError, OutputError

PathLike = Union[str, os.PathLike]

MARKER = ".dlvae-jax"
# Commands that share one run folder: `data split` prepares it, `train` fills
# it, `evaluate` and `predict` add to it.
WORKDIR_COMMANDS = ("data split", "data build", "train", "evaluate", "predict")

_NAME_MAX = 150  # keeps ".NAME.tmp-<pid>-<random>" under the usual 255-byte limit
_TMP_RE = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-(?P<pid>\d+)-[A-Za-z0-9_]+$")
_LOCK_RE = re.compile(r"^\.(?P<name>.+)\.lock$")


# ----------------------------------------------------------------------------- small helpers


def _host() -> str:
    return socket.gethostname()


def marker_data(command: str) -> dict:
    return {
        "command": command,
        "version": __version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "pid": os.getpid(),
        "host": _host(),
    }


def write_marker(folder: Path, command: str) -> None:
    (Path(folder) / MARKER).write_text(json.dumps(marker_data(command), indent=2, sort_keys=True) + "\n")


def read_marker(folder: PathLike) -> dict | None:
    """The marker of `folder` as a dict with a "command" string, or None if it has none."""
    path = Path(folder) / MARKER
    try:
        if path.is_symlink() or not path.is_file():
            return None
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or not isinstance(data.get("command"), str):
        return None
    return data


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: someone else's live process
        return True
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        with contextlib.suppress(OSError):
            path.unlink()


def _short(name: str) -> str:
    return name if len(name) <= _NAME_MAX else name[:_NAME_MAX]


def sibling(target: Path, kind: str) -> str:
    """Prefix of a temporary beside `target`: ``.NAME.<kind>-<pid>-`` (random part added by the caller)."""
    return f".{_short(target.name)}.{kind}-{os.getpid()}-"


def _resolve(path: PathLike) -> Path:
    return Path(os.path.realpath(os.path.abspath(os.fspath(path))))


def _same(a: Path, b: Path) -> bool:
    if a == b:
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _folder_mode() -> int:
    # mkdtemp makes 0700 folders; a finished output gets the usual mode under the umask.
    mask = os.umask(0)
    os.umask(mask)
    return 0o777 & ~mask


def _is_mount(path: Path) -> bool:
    try:
        return os.path.ismount(path)
    except OSError:
        return False


def _strerror(err: OSError) -> str:
    return err.strerror or str(err)


# ----------------------------------------------------------------------------- checks


def check_inputs(shown: Path, target: Path, inputs: Sequence[PathLike | None]) -> None:
    """Refuses an output equal to, inside, or holding any input (symlinks resolved)."""
    for given in inputs:
        if given is None:
            continue
        src = _resolve(given)
        if _same(target, src):
            raise OutputError(f"{shown}: is the input folder {given}; choose another output folder")
        if any(_same(parent, src) for parent in target.parents):
            raise OutputError(f"{shown}: is inside the input folder {given}; choose an output folder outside it")
        if any(_same(parent, target) for parent in src.parents):
            raise OutputError(f"{shown}: holds the input folder {given}; choose another output folder")


def _is_empty(shown: Path, target: Path) -> bool:
    try:
        with os.scandir(target) as it:
            return next(it, None) is None
    except OSError as err:
        raise OutputError(f"{shown}: cannot be read ({_strerror(err)})") from None


def _check_replaceable(shown: Path, target: Path, overwrite: bool) -> None:
    """Refuses an existing target unless it is an empty folder or (with overwrite) one we made."""
    if not os.path.lexists(target):
        return
    if not target.is_dir():
        raise OutputError(f"{shown}: exists and is not a folder")
    if _is_mount(target):
        raise OutputError(f"{shown}: is a mount point; the output is built beside it and renamed into place, "
                          f"so choose a folder inside it, e.g. {shown / 'out'}")
    if _is_empty(shown, target):
        return
    marker = read_marker(target)
    if marker is None:
        raise OutputError(f"{shown}: already exists, is not empty and was not made by dlvae-jax (no {MARKER} "
                          "file); --overwrite only replaces folders dlvae-jax made, so choose another folder")
    if not overwrite:
        raise OutputError(f"{shown}: already exists (made by `dlvae-jax {marker['command']}`); "
                          "pass --overwrite to replace it")


def _make_parents(shown: Path, folder: Path) -> list[Path]:
    """Creates `folder` and missing ancestors; returns those created, deepest first."""
    created = []
    p = folder
    while not os.path.lexists(p):
        created.append(p)
        p = p.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OutputError(f"{shown}: cannot create its parent folder ({_strerror(err)})") from None
    return created


def _remove_created(created: list[Path]) -> None:
    for p in created:  # deepest first; stops at the first that is not empty
        try:
            p.rmdir()
        except OSError:
            break


# ----------------------------------------------------------------------------- locks and stale temporaries


class _Lock:
    """An exclusive `flock` on a lock file holding the owner's pid."""

    def __init__(self, path: Path, shown: Path):
        self.path = path
        for _ in range(20):
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            except OSError as err:
                raise OutputError(f"{shown}: cannot create its lock file beside it ({_strerror(err)})") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as err:
                holder = _lock_owner(fd)
                os.close(fd)
                if err.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    raise OutputError(f"{shown}: cannot lock it ({_strerror(err)})") from None
                who = f" (pid {holder})" if holder else ""
                raise OutputError(f"{shown}: another dlvae-jax process{who} is writing it; "
                                  "wait for it to finish or stop it") from None
            # The previous holder unlinks the file before releasing it: a lock
            # on an unlinked inode protects nothing, so start again.
            try:
                same = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            os.ftruncate(fd, 0)
            os.write(fd, json.dumps({"pid": os.getpid(), "host": _host()}).encode())
            self.fd = fd
            signals.register(path)
            return
        raise OutputError(f"{shown}: cannot take its lock file {path.name} (it keeps changing)")

    def release(self) -> None:
        with contextlib.suppress(OSError):
            os.unlink(self.path)
        signals.unregister(self.path)
        os.close(self.fd)


def _lock_owner(fd: int) -> int | None:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        return int(json.loads(os.read(fd, 4096).decode())["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _stale(entry: Path, pid: int) -> bool:
    if _pid_alive(pid):
        return False
    marker = read_marker(entry) if entry.is_dir() else None
    # Another machine's process on a shared file system: its pid means nothing here.
    return marker is None or marker.get("host") in (None, _host())


def remove_stale_temporaries(parent: Path) -> list[Path]:
    """Removes our temporaries (and locks) in `parent` whose owner pid is no longer alive.

    A ``.NAME.old-<pid>-*`` folder whose NAME is missing is the previous output
    of a replacement cut off between its two renames: it is renamed back
    instead. Returns the paths removed.
    """
    parent = Path(parent)
    try:
        entries = sorted(parent.iterdir(), key=lambda p: (not p.name.endswith("old"), p.name))
    except OSError:
        return []
    removed = []
    olds = [e for e in entries if (m := _TMP_RE.match(e.name)) and m["kind"] == "old"]
    for entry in olds + [e for e in entries if e not in olds]:
        m = _TMP_RE.match(entry.name)
        if m:
            if not _stale(entry, int(m["pid"])):
                continue
            original = parent / m["name"]
            if m["kind"] == "old" and len(m["name"]) < _NAME_MAX and not os.path.lexists(original):
                with contextlib.suppress(OSError):
                    os.rename(entry, original)
                    continue
            _remove(entry)
            removed.append(entry)
        elif _LOCK_RE.match(entry.name) and entry.is_file() and not entry.is_symlink():
            try:
                fd = os.open(entry, os.O_RDWR | os.O_CLOEXEC)
            except OSError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                owner = _lock_owner(fd)
                if owner is None or not _pid_alive(owner):
                    os.unlink(entry)
                    removed.append(entry)
            except OSError:
                pass  # held: its writer is alive
            finally:
                os.close(fd)
    return removed


# ----------------------------------------------------------------------------- error messages


def _translate(err: BaseException, tmp: Path, shown: Path) -> BaseException | None:
    """The same error with the temporary's path replaced by the user's."""
    t = os.fspath(tmp)
    if isinstance(err, OSError):
        where = err.filename if isinstance(err.filename, str) else None
        if where and where.startswith(t):
            where = os.fspath(shown) + where[len(t):]
        where = where or os.fspath(shown)
        return OutputError(f"{where}: cannot be written ({_strerror(err)})")
    if isinstance(err, DlvaeError) and err.args and isinstance(err.args[0], str) and t in err.args[0]:
        err.args = (err.args[0].replace(t, os.fspath(shown)),) + err.args[1:]
    return None


# ----------------------------------------------------------------------------- the two kinds of folders


@contextlib.contextmanager
def output_folder(
    path: PathLike, command: str, *, overwrite: bool = False, inputs: Sequence[PathLike | None] = ()
) -> Iterator[Path]:
    """Yields a temporary folder (marker written) that becomes `path` when the block succeeds.

    Checked before any work: not equal to, inside or around an input; an
    existing `path` must be an empty folder, or (with `overwrite`) one that
    carries our marker. On any exception, KeyboardInterrupt and SystemExit
    included, the temporary is removed and the old folder stays as it was.
    Raises OutputError naming `path`.
    """
    shown = Path(path)
    target = _resolve(shown)
    check_inputs(shown, target, inputs)
    _check_replaceable(shown, target, overwrite)
    parent = target.parent
    created = _make_parents(shown, parent)
    lock = tmp = None
    done = False
    try:
        lock = _Lock(parent / f".{_short(target.name)}.lock", shown)
        remove_stale_temporaries(parent)
        _check_replaceable(shown, target, overwrite)  # again, now that no other writer can change it
        with signals.critical():
            try:
                tmp = Path(tempfile.mkdtemp(prefix=sibling(target, "tmp"), dir=parent))
            except OSError as err:
                raise OutputError(f"{shown}: cannot be created ({_strerror(err)})") from None
            signals.register(tmp)
        os.chmod(tmp, _folder_mode())
        write_marker(tmp, command)
        try:
            yield tmp
        except (OSError, DlvaeError) as err:
            better = _translate(err, tmp, shown)
            if better is not None:
                raise better from None
            raise
        _commit(tmp, target, shown, overwrite)
        done = True
    finally:
        with signals.critical():
            if tmp is not None:
                _remove(tmp)
                signals.unregister(tmp)
            if lock is not None:
                lock.release()
            if not done:
                _remove_created(created)


def _commit(tmp: Path, target: Path, shown: Path, overwrite: bool) -> None:
    with signals.critical():
        _check_replaceable(shown, target, overwrite)
        try:
            if os.path.lexists(target):
                old = Path(tempfile.mkdtemp(prefix=sibling(target, "old"), dir=target.parent))
                os.rename(target, old)  # onto the fresh empty folder: POSIX allows it
                try:
                    os.rename(tmp, target)
                except BaseException:
                    os.rename(old, target)
                    raise
                _remove(old)
            else:
                os.rename(tmp, target)
        except OSError as err:
            raise OutputError(f"{shown}: could not be put in place ({_strerror(err)})") from None


@contextlib.contextmanager
def run_folder(
    path: PathLike,
    command: str,
    *,
    overwrite: bool = False,
    inputs: Sequence[PathLike | None] = (),
    resume: bool = True,
    accept: Sequence[str] = (),
) -> Iterator[Path]:
    """Yields the resolved folder `path`, created (with the marker) or reused, locked for the block.

    Absent or empty: created with the marker. Carrying our marker of `command`
    (or of a command in `accept`): reused when `resume`. Carrying our marker of
    another command, or not empty without a marker: refused, except that with
    `overwrite` a folder with our marker is emptied and re-created (`overwrite`
    wins over `resume`). A folder this block created that still holds only the
    marker when the block fails is removed again. Raises OutputError naming `path`.
    """
    shown = Path(path)
    target = _resolve(shown)
    check_inputs(shown, target, inputs)
    accepted = {command, *accept}

    def decide() -> str:
        if not os.path.lexists(target):
            return "create"
        if not target.is_dir():
            raise OutputError(f"{shown}: exists and is not a folder")
        if _is_empty(shown, target):
            return "create"
        marker = read_marker(target)
        if marker is None:
            raise OutputError(f"{shown}: already exists, is not empty and was not made by dlvae-jax (no {MARKER} "
                              "file); --overwrite only replaces folders dlvae-jax made, so choose another folder")
        if overwrite:
            return "wipe"
        if marker["command"] not in accepted:
            raise OutputError(f"{shown}: was made by `dlvae-jax {marker['command']}`, not for "
                              f"`dlvae-jax {command}`; choose another folder or pass --overwrite to replace it")
        if not resume:
            raise OutputError(f"{shown}: already exists; pass --overwrite to start over")
        return "reuse"

    decide()
    parent = target.parent
    created = _make_parents(shown, parent)
    lock = None
    made = False
    ok = False
    try:
        if os.access(parent, os.W_OK | os.X_OK) or not target.is_dir():
            lock = _Lock(parent / f".{_short(target.name)}.lock", shown)
            remove_stale_temporaries(parent)
        else:  # e.g. a mount point in a read-only parent: lock inside the folder
            lock = _Lock(target / f"{MARKER}.lock", shown)
        action = decide()
        with signals.critical():
            if action == "wipe":
                _empty_folder(shown, target)
            if action in ("create", "wipe"):
                try:
                    made = not os.path.lexists(target)
                    target.mkdir(exist_ok=True)
                    write_marker(target, command)
                except OSError as err:
                    raise OutputError(f"{shown}: cannot be created ({_strerror(err)})") from None
        if not os.access(target, os.W_OK | os.X_OK):
            raise OutputError(f"{shown}: is not writable")
        yield target
        ok = True
    finally:
        with signals.critical():
            if not ok and made and _only_marker(target):
                _remove(target)
            if lock is not None:
                lock.release()
            if not ok and not made:
                _remove_created(created)
            elif not ok and not os.path.lexists(target):
                _remove_created(created)


def _only_marker(folder: Path) -> bool:
    try:
        return {p.name for p in folder.iterdir()} <= {MARKER, f"{MARKER}.lock"}
    except OSError:
        return False


def _empty_folder(shown: Path, target: Path) -> None:
    """Removes a marked folder's contents: renamed aside first where possible, so a cut-off run loses nothing."""
    if not _is_mount(target):
        try:
            old = Path(tempfile.mkdtemp(prefix=sibling(target, "old"), dir=target.parent))
            os.rename(target, old)
            target.mkdir()
            _remove(old)
            return
        except OSError:
            pass
    for entry in list(target.iterdir()):
        if entry.name != f"{MARKER}.lock":
            _remove(entry)
