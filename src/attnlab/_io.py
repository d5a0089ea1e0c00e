"""File helpers: atomic writes (a crash while writing never leaves a half-written file
behind, a failed write keeps the previous file), a lock on an output path that a crashed
run does not leave stuck, PNGs inlined as data URIs for self-contained HTML, and the
names of a file's misfit entries shown in one line."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import socket
import stat
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any

__all__ = [
    "STALE_TEMP_SECONDS",
    "LockedError",
    "OutputLock",
    "WriteError",
    "atomic_write",
    "atomic_write_text",
    "decode_text",
    "first_names",
    "no_script_csp",
    "png_data_uri",
    "remove_stale_temps",
]


class WriteError(OSError):
    """A file could not be written (full disk, read-only folder, ...); the previous file,
    if there was one, is unchanged. ``str()`` names the file and the cause."""

    def __str__(self) -> str:
        return (
            f"could not write {self.filename}: {self.strerror or 'error'} "
            f"[errno {self.errno}]; the previous file, if any, is unchanged"
        )


STALE_TEMP_SECONDS = 600.0  # a temporary file untouched this long is no write in progress
_TEMP = re.compile(r"\.attnlab-[a-z0-9_]{8}\.tmp")  # mkstemp's names with our prefix/suffix


def atomic_write(path: str | Path, write: Callable[[str], object]) -> Path:
    """Call ``write(tmp)`` on a temporary file next to ``path``, flush it to disk and
    rename it over ``path``; on any error the temporary file is removed and ``path`` is
    left as it was. A ``path`` that is a symbolic link is kept: the file it points to is
    written (the temporary file goes beside that file). A file replaced keeps its
    permission bits; a new one gets ``0o666`` less the umask, as ``open()`` gives.

    A process killed mid-write (``kill -9``, out of memory, power loss) cannot remove its
    temporary file; each write first removes, in its folder, the temporary files of this
    function (``.attnlab-XXXXXXXX.tmp``) not modified for :data:`STALE_TEMP_SECONDS`
    (:func:`remove_stale_temps`). A younger one may be another process's write in progress
    and is kept; ``write`` callbacks write their file at once, never pausing that long.

    Args:
        path: the file to create or replace (its folder is created if missing).
        write: writes the whole content to the temporary path it is given.

    Raises:
        WriteError: an ``OSError`` (no space, no permission, ...) while writing, naming
            ``path``; ``path`` keeps its previous content.

    Example:
        >>> import tempfile
        >>> p = atomic_write(tempfile.mkdtemp() + "/a.txt", lambda t: Path(t).write_text("hi"))
        >>> p.read_text()
        'hi'
    """
    if isinstance(path, str) and path.endswith(("/", os.sep)):  # Path() drops the slash:
        # "newdir/" wrote a file named newdir
        raise ValueError(f"path {path!r} ends with a slash, a folder; expected a file's path")
    given = Path(path)
    path = _target(given)
    if path.exists() and not (path.is_file() or path.is_dir()):  # os.replace swapped a
        # pipe or a device (/dev/full, /dev/stdout's link) for a file, not writing into it
        raise ValueError(f"path {str(path)!r} is not a regular file (a pipe or device)")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(path.parent)
        # a short name of fixed length: ".{name}.XXXXXXXX.tmp" was 14 bytes past a legal
        # name of 250 bytes, and the write failed after all the work ("File name too long")
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".attnlab-", suffix=".tmp")
    except OSError as e:
        raise WriteError(e.errno, e.strerror, str(path)) from e
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, _mode_for(path))
        os.replace(tmp, path)
    except OSError as e:
        if isinstance(e, WriteError):
            raise
        raise WriteError(e.errno, e.strerror or str(e), str(path)) from e
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return given


def remove_stale_temps(folder: str | Path, max_age: float = STALE_TEMP_SECONDS) -> list[Path]:
    """Remove from ``folder`` the temporary files :func:`atomic_write` left behind (its
    process killed mid-write): regular files named ``.attnlab-XXXXXXXX.tmp`` not modified
    for ``max_age`` seconds. Younger ones (perhaps a write in progress), other files, and
    files that cannot be removed are kept; a missing folder has none. Returns the removed.

    Example:
        >>> import tempfile
        >>> d = Path(tempfile.mkdtemp())
        >>> for name in (".attnlab-ab12cd34.tmp", ".attnlab-fresh000.tmp", "keep.tmp"):
        ...     _ = (d / name).write_text("x")
        >>> os.utime(d / ".attnlab-ab12cd34.tmp", (0, 0))  # untouched since 1970
        >>> [p.name for p in remove_stale_temps(d)], sorted(p.name for p in d.iterdir())
        (['.attnlab-ab12cd34.tmp'], ['.attnlab-fresh000.tmp', 'keep.tmp'])
    """
    if not (isinstance(max_age, (int, float)) and 0 <= max_age < float("inf")):
        raise ValueError(f"max_age is {max_age!r}; expected a finite number of seconds >= 0")
    removed, now = [], time.time()
    with contextlib.suppress(OSError), os.scandir(folder) as entries:
        for e in entries:
            with contextlib.suppress(OSError):  # gone meanwhile, or not ours to remove
                if _TEMP.fullmatch(e.name) and _untouched(e, now - max_age):
                    os.unlink(e.path)
                    removed.append(Path(e.path))
    return removed


def _untouched(entry: os.DirEntry[str], since: float) -> bool:
    """``entry`` is a regular file (not a link) last modified before time ``since``."""
    if not entry.is_file(follow_symlinks=False):
        return False
    return entry.stat(follow_symlinks=False).st_mtime < since


def _target(path: Path) -> Path:
    """The file a write to ``path`` means: ``path``, or the file a symbolic link there
    points to (links followed): ``os.replace`` on the link replaced the link itself by a
    regular file (``--out /dev/stdout`` as root replaced the system's link), and left its
    target as it was."""
    if not path.is_symlink():
        return path
    target = Path(os.path.realpath(path))
    if target.is_symlink():  # (realpath stops in a loop of links)
        raise ValueError(f"path {str(path)!r} is a link in a loop of links")
    return target


def _mode_for(path: Path) -> int:
    """The permission bits a write to ``path`` leaves: those of the file it replaces (a
    private 0o600 file was widened to 0o644), else ``0o666`` less the umask (reports were
    0o644 under umask 077, checkpoints mkstemp's 0o600 under umask 022)."""
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        return 0o666 & ~_umask()


_UMASK_LOCK = threading.Lock()


def _umask() -> int:
    """The process's umask, read without changing it where Linux shows it
    (``/proc/self/status``); elsewhere set and put back at once, under a lock."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically (:func:`atomic_write`).

    Example:
        >>> import tempfile
        >>> atomic_write_text(tempfile.mkdtemp() + "/a.html", "<p>hi</p>").read_text()
        '<p>hi</p>'
    """
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def decode_text(text: str) -> tuple[str, bool]:
    r"""``text`` with bytes that were not UTF-8 replaced by U+FFFD, and whether any were.

    Python hands undecodable bytes of the command line or a file read with
    ``errors="surrogateescape"`` over as lone surrogates (``\udcXX``), which tokenizers
    and encoders reject; this decodes them the way ``bytes.decode(errors="replace")`` does.

    Example:
        >>> text, replaced = decode_text(b"caf\xe9 ok".decode("utf-8", "surrogateescape"))
        >>> text == "caf\ufffd ok", replaced
        (True, True)
        >>> decode_text("café"), decode_text("café".encode().decode("ascii", "surrogateescape"))
        (('café', False), ('café', False))
    """
    try:
        text.encode("utf-8")
        return text, False
    except UnicodeEncodeError:
        pass
    try:
        raw = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # surrogates that are not escaped bytes
        raw = text.encode("utf-8", "surrogatepass")
    try:  # escaped bytes that are valid UTF-8 (an ASCII locale's command line): none lost
        return raw.decode("utf-8"), False
    except UnicodeDecodeError:
        return raw.decode("utf-8", "replace"), True


def first_names(names: list[str], n: int = 4) -> str:
    """The first ``n`` of ``names`` and how many more, for a one-line message naming a
    file's entries that do not fit (a checkpoint's tensors, a config's fields).

    Example:
        >>> first_names(["a", "b", "c"], 2)
        'a, b, ... and 1 more'
    """
    more = f", ... and {len(names) - n} more" if len(names) > n else ""
    return ", ".join(names[:n]) + more


def png_data_uri(png: str | Path | bytes) -> str:
    """``data:image/png;base64,...`` of the PNG at path ``png`` (or of its bytes, already
    read), for an ``<img src>``.

    Example:
        >>> import tempfile
        >>> p = Path(tempfile.mkdtemp()) / "x.png"
        >>> _ = p.write_bytes(b"PNG")
        >>> png_data_uri(p), png_data_uri(b"PNG")
        ('data:image/png;base64,UE5H', 'data:image/png;base64,UE5H')
    """
    data = png if isinstance(png, bytes) else Path(png).read_bytes()
    return "data:image/png;base64," + base64.b64encode(data).decode()


def no_script_csp(images: bool) -> str:
    """The Content-Security-Policy ``<meta>`` of a written page without scripts: it loads
    nothing, runs no script, and allows only its own styles (a ``<style>`` element and
    ``style`` attributes) and, with ``images``, pictures inlined as ``data:`` URIs. A
    script added to the saved page does not run.

    Example:
        >>> print(no_script_csp(images=True).split('content=')[1])
        "default-src 'none'; img-src data:; style-src 'unsafe-inline'">
    """
    policy = "default-src 'none'; " + "img-src data:; " * images + "style-src 'unsafe-inline'"
    return f'<meta http-equiv="Content-Security-Policy" content="{policy}">'


class LockedError(RuntimeError):
    """Another live run holds the lock on an output path; ``holder`` is what it recorded
    (``pid``, ``host``, ``command``, ``started``)."""

    def __init__(self, target: Path, lock: Path, holder: dict[str, Any]) -> None:
        self.target, self.lock, self.holder = target, lock, holder
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(holder["started"])))
        super().__init__(
            f"{target} is in use by another run: `{holder.get('command') or '?'}` "
            f"(pid {holder['pid']} on {holder['host']}, started {when}); wait for it to end "
            f"or choose another output (if that run is gone, delete {lock})"
        )


class OutputLock:
    """An exclusive lock on an output folder or file, held while a run writes there.

    The lock file (``FOLDER/.attnlab.lock``, or ``.NAME.lock`` beside a file) records the
    holder's pid, host, command and start time. A second run is refused with a
    :class:`LockedError` naming the first; a lock whose process is gone (same host, pid
    dead, a zombie, or reused by a process started later) is stale and taken over, so a
    crashed run never blocks the next one. A lock from another host cannot be checked and
    is respected. Taking the lock writes its file with :func:`atomic_write`, which removes
    the stale temporary files a killed run left in the lock's folder.

    Example:
        >>> import tempfile
        >>> d = tempfile.mkdtemp()
        >>> with OutputLock(d, command="attnlab train dates"):
        ...     OutputLock(d).acquire()  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        attnlab._io.LockedError: ... is in use by another run: `attnlab train dates` (pid ...
    """

    def __init__(self, target: str | Path, *, folder: bool = True, command: str = "") -> None:
        self.target = Path(target)
        parent, name = (self.target, "") if folder else (self.target.parent, self.target.name)
        self.path = parent / (f".{name}.lock" if name else ".attnlab.lock")
        self.command, self._held = command, False
        self._made: list[Path] = []  # the folders acquire() created, deepest first

    def acquire(self) -> OutputLock:
        """Take the lock (creating its folder); :class:`LockedError` if a live run has it."""
        me = {"pid": os.getpid(), "host": socket.gethostname(), "command": self.command}
        me["started"] = time.time()
        new = self.path.with_name(f"{self.path.name}.{os.getpid()}.new")
        self._made = _missing_folders(self.path.parent)
        atomic_write(new, lambda t: _dump(t, me))
        try:
            for _ in range(5):
                try:
                    _link(new, self.path)  # atomic: fails if a lock exists
                    self._held = True
                    return self
                except FileExistsError:
                    holder = _read_lock(self.path)
                    if holder is not None and not _is_stale(holder):
                        raise LockedError(self.target, self.path, holder) from None
                    _take_over(self.path, holder)
            raise LockedError(self.target, self.path, _read_lock(self.path) or me)
        finally:
            new.unlink(missing_ok=True)

    def release(self) -> None:
        """Give the lock back (only if this object holds it), and remove the folders its
        acquire created, from the deepest up, while the run left them empty."""
        if self._held:
            self._held = False
            holder = _read_lock(self.path)
            if holder is not None and holder.get("pid") == os.getpid():
                self.path.unlink(missing_ok=True)
            for made in self._made:  # the folders this lock made (not only the last:
                # an interrupted `demo --out x/y` left x/), if the run left them empty
                try:
                    made.rmdir()
                except OSError:
                    break

    def __enter__(self) -> OutputLock:
        return self.acquire()

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()


def _missing_folders(folder: Path) -> list[Path]:
    """``folder`` and its ancestors that do not exist yet, deepest first."""
    missing = []
    for level in (folder.absolute(), *folder.absolute().parents):
        if level.exists():
            break
        missing.append(level)
    return missing


def _dump(path: str, info: dict[str, Any]) -> None:
    Path(path).write_text(json.dumps(info), encoding="utf-8")


def _link(new: Path, path: Path) -> None:
    """Create ``path`` with ``new``'s content, or FileExistsError if it exists: a hard link
    (atomic), or an exclusive create where the file system has no hard links."""
    try:
        os.link(new, path)
    except FileExistsError:
        raise
    except OSError:  # FAT, some FUSE mounts
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        with os.fdopen(fd, "wb") as f:
            f.write(new.read_bytes())


def _read_lock(path: Path) -> dict[str, Any] | None:
    """The holder recorded in ``path``; None if it is gone or unreadable (a stale lock)."""
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
        return info if isinstance(info, dict) and {"pid", "host", "started"} <= set(info) else None
    except (OSError, ValueError):
        return None


def _is_stale(holder: dict[str, Any]) -> bool:
    """Whether the run that wrote ``holder`` is certainly gone (same host only)."""
    if holder["host"] != socket.gethostname():
        return False
    pid = int(holder["pid"])
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass  # alive, another user's
    proc = Path(f"/proc/{pid}")
    try:
        zombie = proc.joinpath("stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
        reused = proc.stat().st_ctime > float(holder["started"]) + 2.0
    except (OSError, IndexError):
        return False  # no /proc: alive as far as we can tell
    return zombie or reused


def _take_over(path: Path, holder: dict[str, Any] | None) -> None:
    """Move a stale lock aside; if another run replaced it meanwhile, put that one back."""
    aside = path.with_name(f"{path.name}.stale-{os.getpid()}")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return
    if _read_lock(aside) != holder:  # not the stale lock we judged: a live one, restore it
        with contextlib.suppress(FileExistsError):
            os.link(aside, path)
    aside.unlink(missing_ok=True)
