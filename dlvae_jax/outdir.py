"""Output folders: every folder a command writes is owned and guarded here.

Rules, the same for every command:

- A folder we create carries a marker file, `MARKER` (JSON: command, kind,
  version, created, pid, host). `--overwrite` replaces only a folder whose
  marker names the same command; a non-empty folder without it (the user's own
  files, a data set, `$PWD`) is never deleted, whatever the flags.
- A training workdir (a run folder of `WORKDIR_COMMANDS`) is never an output
  folder, and no command but `train` writes a folder inside one, unless this
  process holds that workdir (training writes its synthetic data there). A
  folder that holds another dlvae-jax folder is never replaced.
- An output equal to, inside, or around (holding) any input folder is refused,
  after resolving symlinks (and comparing inodes, for bind mounts).
- `output_folder` writes into a fresh temporary sibling of the
  symlink-resolved target (so the final rename stays on one file system) and
  renames it into place only when the command succeeded; an old folder is
  renamed aside first and deleted last, so at every instant the target holds
  either the old output or the new one.
- Temporaries are named ``.NAME.dlvae-jax-tmp-<host>-<pid>-<random>``
  (``...-old-...`` for a folder being replaced; <host> is a hash of the host
  name), a name no user picks. Before writing NAME, a command removes the
  temporaries of that same NAME whose process (on this host) is gone, and puts
  back an old folder whose replacement was cut off between its two renames.
  Nothing else in the parent folder is ever touched.
- A lock file beside the target, ``.NAME.dlvae-jax.lock`` (our JSON: program,
  pid, host), is held with `flock` for the whole write: a second writer is
  refused with a message naming the holder's pid. The kernel drops the lock of
  a killed process, so a stale lock file of ours is simply taken over; a file
  of that name that is not ours is never truncated or removed.
- Errors are `OutputError` naming the path the user gave, never a temporary.

`run_folder` is for folders that live across runs (a training workdir): it
is reused when the marker's command is accepted, and nothing is staged. A
`train` block that fails before its first checkpoint takes back what it added,
so a corrected retry starts clean.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import hashlib
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
PROGRAM = "dlvae-jax"
# Commands that share one run folder: `data split` prepares it, `train` fills
# it, `evaluate` and `predict` add to it.
WORKDIR_COMMANDS = ("data split", "data build", "train", "evaluate", "predict")
# What a run folder's command produces that is worth keeping: a block of that
# command that fails before producing any of it takes back what it added.
RESULTS = {"train": ("checkpoints",)}

_NAME_MAX = 150  # keeps ".NAME.dlvae-jax-tmp-<host>-<pid>-<random>" under the usual 255-byte limit
_TMP_RE = re.compile(
    r"^\.(?P<name>.+)\.dlvae-jax-(?P<kind>tmp|old)-(?P<host>[0-9a-f]{8})-(?P<pid>\d+)-[A-Za-z0-9_]+$")
_LOCK_SUFFIX = ".dlvae-jax.lock"

# Run folders this process holds (`run_folder` blocks in progress), resolved.
_HELD: set[Path] = set()


# ----------------------------------------------------------------------------- small helpers


def _host() -> str:
    return socket.gethostname()


def _host_tag() -> str:
    return hashlib.sha1(_host().encode("utf-8", "surrogateescape")).hexdigest()[:8]


def marker_data(command: str, kind: str | None = None) -> dict:
    data = {
        "command": command,
        "version": __version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "pid": os.getpid(),
        "host": _host(),
    }
    if kind is not None:
        data["kind"] = kind  # "run" (run_folder) or "output" (output_folder)
    return data


def write_marker(folder: Path, command: str, kind: str | None = None) -> None:
    (Path(folder) / MARKER).write_text(json.dumps(marker_data(command, kind), indent=2, sort_keys=True) + "\n")


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


def is_workdir(folder: PathLike, marker: dict | None = None) -> bool:
    """Whether `folder` is a training workdir: a run folder of `WORKDIR_COMMANDS`."""
    folder = Path(folder)
    marker = read_marker(folder) if marker is None else marker
    if marker is None or marker["command"] not in WORKDIR_COMMANDS:
        return False
    kind = marker.get("kind")
    if kind in ("run", "output"):
        return kind == "run"
    # A marker written before markers had a kind: judge by the contents.
    return marker["command"] in ("train", "data split") or any(
        os.path.lexists(folder / name) for name in ("config.json", "checkpoints"))


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (OSError, OverflowError):  # EPERM: someone else's live process
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
    """Prefix of a temporary beside `target`: ``.NAME.dlvae-jax-<kind>-<host>-<pid>-`` (random part added
    by the caller)."""
    return f".{_short(Path(target).name)}.dlvae-jax-{kind}-{_host_tag()}-{os.getpid()}-"


def lock_path(target: Path) -> Path:
    """The lock file of `target`: ``.NAME.dlvae-jax.lock`` beside it."""
    target = Path(target)
    return target.parent / f".{_short(target.name)}{_LOCK_SUFFIX}"


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


def _names(folder: Path) -> set[str]:
    try:
        return {p.name for p in folder.iterdir()}
    except OSError:
        return set()


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


def _enclosing_workdir(target: Path) -> tuple[Path, dict] | None:
    """The nearest training workdir above `target` that this process does not hold, with its marker."""
    for parent in target.parents:
        marker = read_marker(parent)
        if marker is not None and is_workdir(parent, marker) and parent not in _HELD:
            return parent, marker
    return None


def check_not_in_workdir(shown: Path, target: Path, command: str) -> None:
    """Refuses a `target` inside a training workdir, for any command but `train`."""
    if command == "train":
        return
    found = _enclosing_workdir(target)
    if found is not None:
        where, marker = found
        raise OutputError(f"{shown}: is inside the training workdir {where} (made by `dlvae-jax "
                          f"{marker['command']}`); `dlvae-jax {command}` does not write into one, so choose "
                          "an output folder outside it")


def _nested_folder(target: Path) -> tuple[Path, dict] | None:
    """A folder below `target` that carries a marker of its own (another dlvae-jax folder), if any."""
    for dirpath, dirnames, filenames in os.walk(target, onerror=lambda err: None):
        if dirpath != os.fspath(target) and MARKER in filenames:
            marker = read_marker(dirpath)
            if marker is not None:
                return Path(dirpath), marker
    return None


def _is_empty(shown: Path, target: Path) -> bool:
    try:
        with os.scandir(target) as it:
            return next(it, None) is None
    except OSError as err:
        raise OutputError(f"{shown}: cannot be read ({_strerror(err)})") from None


def _check_replaceable(shown: Path, target: Path, overwrite: bool, command: str) -> None:
    """Refuses an existing target unless it is an empty folder or (with overwrite) an output of `command`."""
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
    made_by = f"made by `dlvae-jax {marker['command']}`"
    if is_workdir(target, marker):
        raise OutputError(f"{shown}: is a training workdir ({made_by}); `dlvae-jax {command}` never writes "
                          "over one, so choose another output folder")
    if marker["command"] != command:
        raise OutputError(f"{shown}: already exists ({made_by}); --overwrite only replaces an earlier output "
                          f"of `dlvae-jax {command}`, so choose another folder")
    if not overwrite:
        raise OutputError(f"{shown}: already exists ({made_by}); pass --overwrite to replace it")
    nested = _nested_folder(target)
    if nested is not None:
        raise OutputError(f"{shown}: holds {nested[0]} (made by `dlvae-jax {nested[1]['command']}`) and is not "
                          "replaced; move that folder out first, or choose another output folder")


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


def _lock_content() -> bytes:
    return json.dumps({"program": PROGRAM, "pid": os.getpid(), "host": _host()}).encode()


def _read_lock(fd: int) -> dict | None:
    """Our lock JSON read from `fd`, or None if the content is anything else."""
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        data = json.loads(os.read(fd, 4096).decode())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or not isinstance(data.get("pid"), int):
        return None
    # Ours: tagged with the program, or the {"pid", "host"} an earlier version wrote.
    if data.get("program") == PROGRAM or set(data) == {"pid", "host"}:
        return data
    return None


def _is_empty_fd(fd: int) -> bool:
    try:
        return os.fstat(fd).st_size == 0
    except OSError:
        return False


class _Lock:
    """An exclusive `flock` on our lock file, which holds our JSON (program, pid, host)."""

    def __init__(self, path: Path, shown: Path):
        self.path = path
        for _ in range(20):
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
            except OSError as err:
                if err.errno == errno.ELOOP:
                    raise OutputError(f"{shown}: its lock file {path} is a symbolic link; it is not "
                                      "dlvae-jax's, so remove it or choose another output folder") from None
                raise OutputError(f"{shown}: cannot create its lock file beside it ({_strerror(err)})") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as err:
                holder = _read_lock(fd)
                os.close(fd)
                if err.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    raise OutputError(f"{shown}: cannot lock it ({_strerror(err)})") from None
                who = f" (pid {holder['pid']})" if holder else ""
                raise OutputError(f"{shown}: another dlvae-jax process{who} is writing it; "
                                  "wait for it to finish or stop it") from None
            # The previous holder unlinks the file before releasing it: a lock
            # on an unlinked inode protects nothing, so start again.
            try:
                st = os.stat(path, follow_symlinks=False)
                same = st.st_ino == os.fstat(fd).st_ino and st.st_dev == os.fstat(fd).st_dev
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            if not _is_empty_fd(fd) and _read_lock(fd) is None:
                os.close(fd)  # someone else's file of that name: neither truncated nor removed
                raise OutputError(f"{shown}: {path} exists and is not a dlvae-jax lock file; "
                                  "remove it or choose another output folder")
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)
            os.write(fd, _lock_content())
            self.fd = fd
            signals.register(path)
            return
        raise OutputError(f"{shown}: cannot take its lock file {path.name} (it keeps changing)")

    def release(self) -> None:
        with contextlib.suppress(OSError):
            st = os.stat(self.path, follow_symlinks=False)
            if st.st_ino == os.fstat(self.fd).st_ino and st.st_dev == os.fstat(self.fd).st_dev:
                os.unlink(self.path)
        signals.unregister(self.path)
        os.close(self.fd)


def _stale(host: str, pid: int) -> bool:
    # Another machine's process on a shared file system: its pid means nothing here.
    return host == _host_tag() and not _pid_alive(pid)


def remove_stale_temporaries(target: PathLike) -> list[Path]:
    """Removes the temporaries of `target` (and only those) whose process on this host is gone.

    Only entries named ``.NAME.dlvae-jax-{tmp,old}-<host>-<pid>-<random>``
    beside `target`, NAME being `target`'s own name, are considered: nothing
    else in the parent folder is ever touched. A ``...-old-...`` folder whose
    target is missing is the previous output of a replacement cut off between
    its two renames: it is renamed back instead. Returns the paths removed.
    """
    target = Path(target)
    parent, name = target.parent, _short(target.name)
    prefix = f".{name}.dlvae-jax-"
    try:
        entries = sorted((p for p in parent.iterdir() if p.name.startswith(prefix)),
                         key=lambda p: (_TMP_RE.match(p.name) or {"kind": ""})["kind"] != "old")
    except OSError:
        return []
    removed = []
    for entry in entries:
        m = _TMP_RE.match(entry.name)
        if not m or m["name"] != name or not _stale(m["host"], int(m["pid"])):
            continue
        if m["kind"] == "old" and not os.path.lexists(target):
            # The only copy of the previous output: put back, or left alone, never removed.
            if name == target.name:
                with contextlib.suppress(OSError):
                    os.rename(entry, target)
            continue
        _remove(entry)
        removed.append(entry)
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

    Checked before any work: not equal to, inside or around an input; not a
    training workdir nor inside one (unless this process holds it); an
    existing `path` must be an empty folder, or (with `overwrite`) an earlier
    output of the same `command` that holds no other dlvae-jax folder. On any
    exception, KeyboardInterrupt and SystemExit included, the temporary is
    removed and the old folder stays as it was. Raises OutputError naming `path`.
    """
    shown = Path(path)
    target = _resolve(shown)
    check_inputs(shown, target, inputs)
    check_not_in_workdir(shown, target, command)
    _check_replaceable(shown, target, overwrite, command)
    parent = target.parent
    created = _make_parents(shown, parent)
    lock = tmp = None
    done = False
    try:
        lock = _Lock(lock_path(target), shown)
        remove_stale_temporaries(target)
        # Again, now that no other writer can change it.
        check_not_in_workdir(shown, target, command)
        _check_replaceable(shown, target, overwrite, command)
        with signals.critical():
            try:
                tmp = Path(tempfile.mkdtemp(prefix=sibling(target, "tmp"), dir=parent))
            except OSError as err:
                raise OutputError(f"{shown}: cannot be created ({_strerror(err)})") from None
            signals.register(tmp)
        os.chmod(tmp, _folder_mode())
        write_marker(tmp, command, kind="output")
        try:
            yield tmp
        except (OSError, DlvaeError) as err:
            better = _translate(err, tmp, shown)
            if better is not None:
                raise better from None
            raise
        _commit(tmp, target, shown, overwrite, command)
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


def _commit(tmp: Path, target: Path, shown: Path, overwrite: bool, command: str) -> None:
    with signals.critical():
        _check_replaceable(shown, target, overwrite, command)
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


def _has_results(folder: Path, names: Sequence[str]) -> bool:
    """Whether any of `names` in `folder` is a file or a folder holding at least one file."""
    for name in names:
        p = folder / name
        if p.is_file():
            return True
        if p.is_dir() and any(f for _, _, files in os.walk(p) for f in files):
            return True
    return False


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
    (or of a command in `accept`): reused when `resume`, emptied and
    re-created with `overwrite` (`overwrite` wins over `resume`). Carrying our
    marker of another command, or not empty without a marker: refused,
    `overwrite` or not. Inside a training workdir: refused for any command
    but `train`. When the block fails: a command with `RESULTS` that produced
    none of them takes back what the block added to the folder; a folder this
    block created that then holds only the marker is removed again. Raises
    OutputError naming `path`.
    """
    shown = Path(path)
    target = _resolve(shown)
    check_inputs(shown, target, inputs)
    check_not_in_workdir(shown, target, command)
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
        if marker["command"] not in accepted:
            raise OutputError(f"{shown}: was made by `dlvae-jax {marker['command']}`, not for "
                              f"`dlvae-jax {command}`, and is not replaced, --overwrite or not; "
                              "choose another folder")
        if overwrite:
            return "wipe"
        if not resume:
            raise OutputError(f"{shown}: already exists; pass --overwrite to start over")
        return "reuse"

    decide()
    parent = target.parent
    created = _make_parents(shown, parent)
    lock = None
    made = False
    ok = False
    before: set[str] | None = None
    try:
        if os.access(parent, os.W_OK | os.X_OK) or not target.is_dir():
            lock = _Lock(lock_path(target), shown)
            remove_stale_temporaries(target)
        else:  # e.g. a mount point in a read-only parent: lock inside the folder
            lock = _Lock(target / f"{MARKER}.lock", shown)
        check_not_in_workdir(shown, target, command)
        action = decide()
        with signals.critical():
            if action == "wipe":
                _empty_folder(shown, target)
            if action in ("create", "wipe"):
                try:
                    made = not os.path.lexists(target)
                    target.mkdir(exist_ok=True)
                    write_marker(target, command, kind="run")
                except OSError as err:
                    raise OutputError(f"{shown}: cannot be created ({_strerror(err)})") from None
        if not os.access(target, os.W_OK | os.X_OK):
            raise OutputError(f"{shown}: is not writable")
        before = _names(target)
        _HELD.add(target)
        try:
            yield target
        finally:
            _HELD.discard(target)
        ok = True
    finally:
        with signals.critical():
            if not ok and before is not None and command in RESULTS and not _has_results(target, RESULTS[command]):
                for name in sorted(_names(target) - before - {f"{MARKER}.lock"}):
                    _remove(target / name)
            if not ok and made and _only_marker(target):
                _remove(target)
            if lock is not None:
                lock.release()
            if not ok and not os.path.lexists(target):
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
