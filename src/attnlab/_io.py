"""File helpers: atomic writes (a crash while writing never leaves a half-written file
behind) and PNGs inlined as data URIs for self-contained HTML."""

from __future__ import annotations

import base64
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

__all__ = ["atomic_write", "atomic_write_text", "png_data_uri"]


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


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically, readable by everyone (0o644).

    Example:
        >>> import tempfile
        >>> atomic_write_text(tempfile.mkdtemp() + "/a.html", "<p>hi</p>").read_text()
        '<p>hi</p>'
    """
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"), mode=0o644)


def png_data_uri(path: str | Path) -> str:
    """``data:image/png;base64,...`` of the PNG at ``path``, for an ``<img src>``.

    Example:
        >>> import tempfile
        >>> p = Path(tempfile.mkdtemp()) / "x.png"
        >>> _ = p.write_bytes(b"PNG")
        >>> png_data_uri(p)
        'data:image/png;base64,UE5H'
    """
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode()
