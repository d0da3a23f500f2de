"""Atomic file writes: write to a temp file beside the target, then rename.

An interrupted run leaves either the old state or the complete new file, never a half-written one, and an
existing file (possibly one of the user's inputs) is never replaced unless the caller says so.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator

from .errors import CompressError


def refuse_existing(path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Return ``path`` as a Path; raise if it exists and ``overwrite`` is false."""
    target = Path(path)
    if target.exists() and not overwrite:
        raise CompressError(f"{target} already exists", "choose another output path or pass overwrite=True / --overwrite")
    if target.is_dir():
        raise CompressError(f"{target} is a directory, expected a file path", "pass a file name")
    return target


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temp path in the target's folder; on success rename it onto ``path``, on error delete it."""
    target = refuse_existing(path, overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp_name, 0o666 & ~umask)  # mkstemp makes 0600; give the file the permissions open() would
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_text(path: str | os.PathLike, text: str, overwrite: bool = False) -> Path:
    """Atomically write ``text`` to ``path``."""
    with atomic_path(path, overwrite) as tmp:
        tmp.write_text(text)
    return Path(path)
