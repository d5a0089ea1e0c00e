"""Checks of the paths the commands write, beside :mod:`attnlab.cli._args`: an output
reached through the system's own files (``/dev``, ``/proc``, ``/sys``) is refused before
any work, one line naming the argument; and :func:`user_path`, the ``type`` of every
option or argument that names a path, expands a leading ``~`` as a shell would.

Example:
    >>> check_not_system("--out", Path("runs/report.html"))
    >>> check_not_system("--out", Path("/proc/self/fd/1"))  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    attnlab.cli._errors.UsageError: argument --out: '/proc/self/fd/1' is a system file, not ...
"""

from __future__ import annotations

import os
from pathlib import Path

from attnlab.cli._errors import UsageError

__all__ = ["check_not_system", "user_path"]

#: folders of the system's own files: a device, a process's open file, a kernel setting
#: (``/dev/shm``, a memory-backed folder of ordinary files, is not one)
_SYSTEM = ("/dev", "/proc", "/sys")


def user_path(text: str) -> str:
    """An argparse type: the path ``text`` with a leading ``~`` or ``~user`` expanded
    (``--out=~/r.html`` and a quoted ``'~/r.html'`` reach the command unexpanded: a
    folder named ``~`` was made, and ``summarize '~/doc.txt'`` said it does not exist).
    The library's functions take a path literally, as ``open()`` does.

    Example:
        >>> user_path("~/r.html") == os.path.expanduser("~") + "/r.html", user_path("a/~")
        (True, 'a/~')
    """
    return os.path.expanduser(text)


user_path.__name__ = "path"  # (argparse's "invalid path value")


def check_not_system(argument: str, path: Path) -> None:
    """Refuse an output file ``path`` that is, or is reached by links through, a file of
    ``/dev``, ``/proc`` or ``/sys``: as root ``summarize doc --out /dev/stdout > o.txt``
    (``/dev/stdout`` a link to ``/proc/self/fd/1``, to ``o.txt``, a regular file) replaced
    the system's ``/dev/stdout`` link by a file."""
    for hop in _hops(path):
        if _is_system(hop):
            via = "" if hop == Path(os.path.abspath(path)) else f" (through {str(hop)!r})"
            raise UsageError(
                argument, f"{str(path)!r} is a system file{via}, not one to write a report "
                "in; give a file such as report.html"
            )  # fmt: skip


def _hops(path: Path) -> list[Path]:
    """``path`` (absolute), each place its links lead to in turn, and where they end."""
    hops = [Path(os.path.abspath(path))]
    while hops[-1].is_symlink() and len(hops) < 41:  # (40: the kernel's limit)
        hops.append(Path(os.path.normpath(hops[-1].parent / os.readlink(hops[-1]))))
    return [*hops, Path(os.path.realpath(path))]


def _is_system(path: Path) -> bool:
    inside = [path.is_relative_to(folder) for folder in _SYSTEM]
    return any(inside) and not path.is_relative_to("/dev/shm")
