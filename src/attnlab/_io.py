"""Atomic file writes: a crash while writing never leaves a half-written file behind."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

__all__ = ["atomic_write"]


def atomic_write(
    path: str | Path, write: Callable[[str], object], *, mode: int | None = None
) -> Path:
    """Call ``write(tmp)`` on a temporary file next to ``path``, flush it to disk and
    rename it over ``path``; on any error the temporary file is removed and ``path`` is
    left as it was.

    Args:
        path: the file to create or replace (its folder is created if missing).
        write: writes the whole content to the temporary path it is given.
        mode: permission bits for the file (default: the temporary file's, 0o600).

    Example:
        >>> import tempfile
        >>> p = atomic_write(tempfile.mkdtemp() + "/a.txt", lambda t: Path(t).write_text("hi"))
        >>> p.read_text()
        'hi'
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path
