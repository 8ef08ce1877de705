"""Atomic file writes: nothing half-written is ever left at the final path.

Whole output folders are `dlvae_jax.outdir`'s job (`output_folder`,
`run_folder`, re-exported here); this module writes single files. Temporaries
follow outdir's naming (``.NAME.dlvae-jax-tmp-<host>-<pid>-<random>``), so a later
write of the same NAME removes those of a killed process.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

from dlvae_jax import signals
from dlvae_jax.outdir import MARKER, output_folder, remove_stale_temporaries, run_folder, sibling

__all__ = ["MARKER", "atomic_path", "output_folder", "remove_stale_temporaries", "run_folder",
           "write_json", "write_text"]


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _sibling(path: Path, tag: str) -> Path:
    """A fresh unused name beside `path` (hidden, so it is not mistaken for output)."""
    fd, tmp = tempfile.mkstemp(prefix=sibling(path, tag), dir=path.parent)
    os.close(fd)
    os.unlink(tmp)
    return Path(tmp)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, replace_dir: bool = False) -> Iterator[Path]:
    """Yields a temporary path beside `path`; renames it onto `path` on success.

    On an exception the temporary file (or folder) is removed and `path` is untouched.
    With `replace_dir`, an existing folder at `path` is replaced: it is renamed
    aside first and deleted only once the new one is in place, so an interrupted
    run leaves either the old folder or the new one at `path`, never a mix.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    with signals.critical():
        tmp = _sibling(path, "tmp")
        signals.register(tmp)
    old = None
    try:
        yield tmp
        with signals.critical():
            if replace_dir and path.is_dir() and not path.is_symlink():
                old = _sibling(path, "old")
                os.replace(path, old)
            try:
                os.replace(tmp, path)
            except BaseException:
                if old is not None:
                    os.replace(old, path)
                    old = None
                raise
    finally:
        with signals.critical():
            _remove(tmp)
            signals.unregister(tmp)
            if old is not None:
                _remove(old)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
