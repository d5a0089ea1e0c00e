"""Temporary files of a write killed mid-way (``kill -9``: the ``finally`` that removes
them never runs) are removed by a later write into their folder, and by taking an output
lock there, once they are older than ``STALE_TEMP_SECONDS``; a younger one (perhaps
another process's write in progress) and every other file are kept.

(A kill -9 during ``atomic_write`` of a 256 MB tensor left a 256 MB ``.attnlab-XXXX.tmp``
beside the intact file, and no later run removed it.)"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from attnlab import _io
from attnlab._io import OutputLock, atomic_write_text

OLD = time.time() - 3600  # an hour old: past STALE_TEMP_SECONDS (checked below)


def _folder_with_temps(folder: Path) -> dict[str, Path]:
    """A stale temp file, a fresh one, and files that only look like temp files."""
    folder.mkdir(parents=True, exist_ok=True)
    files = {
        "stale": folder / ".attnlab-ab12cd34.tmp",
        "fresh": folder / ".attnlab-zz98yy76.tmp",
        "other_name": folder / ".attnlab-ab12cd34.tmp.keep",  # not the pattern
        "user_tmp": folder / "notes.tmp",
        "lock": folder / ".attnlab.lock.old",
    }
    for path in files.values():
        path.write_bytes(b"x" * 100)
    for name in ("stale", "other_name", "user_tmp", "lock"):
        os.utime(files[name], (OLD, OLD))
    files["stale_dir"] = folder / ".attnlab-dir00000.tmp"  # a folder: not removed
    files["stale_dir"].mkdir()
    os.utime(files["stale_dir"], (OLD, OLD))
    return files


def _left(files: dict[str, Path]) -> set[str]:
    return {name for name, path in files.items() if os.path.lexists(path)}


def test_a_write_removes_the_stale_temp_files_of_its_folder_only(tmp_path: Path) -> None:
    files = _folder_with_temps(tmp_path / "out")
    elsewhere = _folder_with_temps(tmp_path / "elsewhere")
    atomic_write_text(tmp_path / "out" / "report.html", "<p>hi</p>")
    assert _left(files) == set(files) - {"stale"}
    assert _left(elsewhere) == set(elsewhere)  # another folder: untouched
    assert (tmp_path / "out" / "report.html").read_text() == "<p>hi</p>"


def test_taking_an_output_lock_removes_them(tmp_path: Path) -> None:
    files = _folder_with_temps(tmp_path / "run")
    with OutputLock(tmp_path / "run", command="attnlab train dates"):
        assert _left(files) == set(files) - {"stale"}
    assert _left(files) == set(files) - {"stale"}


def test_a_link_named_like_a_temp_file_is_not_followed_or_removed(tmp_path: Path) -> None:
    target = tmp_path / "precious"
    target.write_text("keep")
    link = tmp_path / ".attnlab-link0000.tmp"
    link.symlink_to(target)
    os.utime(link, (OLD, OLD), follow_symlinks=False)
    assert _io.remove_stale_temps(tmp_path) == []
    assert link.is_symlink() and target.read_text() == "keep"


def test_remove_stale_temps_checks_max_age(tmp_path: Path) -> None:
    assert 60 <= _io.STALE_TEMP_SECONDS < 3600
    for bad in (-1.0, float("nan"), float("inf"), "600"):
        with pytest.raises(ValueError, match=r"max_age is .*; expected a finite number"):
            _io.remove_stale_temps(tmp_path, bad)  # type: ignore[arg-type]
    assert _io.remove_stale_temps(tmp_path / "missing") == []  # the control: no folder, none


def test_the_temp_file_of_a_killed_write_is_removed_by_the_next_write(tmp_path: Path) -> None:
    """A real ``kill -9`` mid-write, then the next write into the folder."""
    script = textwrap.dedent(f"""
        import time
        from pathlib import Path
        from attnlab._io import atomic_write
        def write(tmp):
            Path(tmp).write_bytes(b"y" * 1000)
            print("writing", flush=True)
            time.sleep(60)
        atomic_write({str(tmp_path / "x.bin")!r}, write)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "writing\n"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    (left,) = tmp_path.glob(".attnlab-*.tmp")  # the killed write's temp file
    atomic_write_text(tmp_path / "x.bin", "new")
    assert left.exists()  # young: perhaps a write in progress, kept
    os.utime(left, (OLD, OLD))
    atomic_write_text(tmp_path / "x.bin", "newer")
    assert not left.exists() and (tmp_path / "x.bin").read_text() == "newer"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.bin"]
