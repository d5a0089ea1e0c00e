"""How output and input paths are read: a link is written through, not replaced; a
system file, a folder-like name and a name too long are refused before any work (one
line, exit 2); file modes follow the umask; ``~`` is expanded on the command line."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from attnlab._io import atomic_write_text
from attnlab.cli import main
from attnlab.cli._args import check_out_file
from attnlab.cli._errors import UsageError
from tests.test_cli_outputs import NEED_MODEL, _one_line


def test_a_link_is_written_through_not_replaced(tmp_path: Path) -> None:
    """``os.replace`` on a link replaced the link by a regular file and left its target
    as it was (as root, ``--out /dev/stdout`` replaced the system's link)."""
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "t.html").write_text("OLD")
    link = tmp_path / "link.html"
    link.symlink_to("real/t.html")  # relative, as ln -s makes it
    chain = tmp_path / "chain.html"
    chain.symlink_to(link)
    assert atomic_write_text(link, "NEW") == link
    assert link.is_symlink() and os.readlink(link) == "real/t.html"
    assert (tmp_path / "real" / "t.html").read_text() == "NEW"
    atomic_write_text(chain, "NEWER")  # a link to a link: the last target is written
    assert chain.is_symlink() and link.is_symlink()
    assert (tmp_path / "real" / "t.html").read_text() == "NEWER"
    assert sorted(p.name for p in (tmp_path / "real").iterdir()) == ["t.html"]  # no temp left
    plain = tmp_path / "plain.html"  # the control: a plain file is replaced
    atomic_write_text(plain, "x")
    assert plain.read_text() == "x" and not plain.is_symlink()


def test_an_out_reached_through_proc_or_dev_is_refused(tmp_path: Path) -> None:
    """``/dev/stdout`` is a link to ``/proc/self/fd/1``, a link to the file stdout goes
    to: a regular file there passed the pipe-or-device check. Here a link made in
    ``tmp_path`` to ``/proc/self/fd/N`` of a file of ``tmp_path`` (nothing outside is
    written)."""
    target = tmp_path / "o.txt"
    with open(target, "w") as f:
        link = tmp_path / "fd.html"
        link.symlink_to(f"/proc/self/fd/{f.fileno()}")
        if not link.exists():
            pytest.skip("no /proc/self/fd here")
        with pytest.raises(UsageError, match=r"argument --out: .*fd\.html' is a system file "
                           r"\(through '/proc/self/fd/\d+'\)"):  # fmt: skip
            check_out_file("--out", str(link))
    assert target.read_text() == ""
    assert check_out_file("--out", str(tmp_path / "r.html")) == tmp_path / "r.html"  # control


@NEED_MODEL
def test_summarize_out_a_link_writes_its_target(tmp_path: Path) -> None:
    (tmp_path / "doc.txt").write_text("Cats purr. Dogs bark. Birds sing.\n")
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "t.html").write_text("OLD")
    link = tmp_path / "link.html"
    link.symlink_to("real/t.html")
    argv = ["summarize", str(tmp_path / "doc.txt"), "--sentences", "1", "--out", str(link)]
    assert main(argv) == 0
    assert link.is_symlink()
    assert (tmp_path / "real" / "t.html").read_text().startswith("<!doctype html>")


@pytest.mark.parametrize("command", ["summarize", "explain", "ask"])
def test_an_out_ending_in_a_slash_is_refused(
    tmp_path: Path, command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--out newdir/`` (a folder meant) wrote an HTML file named ``newdir``."""
    doc = tmp_path / "doc.txt"
    doc.write_text("Cats purr. Dogs bark. Birds sing.\n")
    first = {
        "summarize": ["summarize", str(doc)],
        "explain": ["explain", "hi", "--steps", "2"],
        "ask": ["ask", "who purrs?", "--docs", str(doc)],
    }[command]
    out = f"{tmp_path}/newdir/"
    assert main([*first, "--out", out]) == 2
    line = _one_line(capsys)
    assert line.endswith(
        f"argument --out: {out!r} ends in '/', a folder; give a file such as "
        f"{tmp_path}/newdir/report.html"
    ), line
    assert not (tmp_path / "newdir").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["doc.txt"]


@NEED_MODEL
def test_explain_out_whose_pictures_get_names_too_long_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A legal 240-byte ``--out``: the pictures written beside it (``NAME_rollout.png``)
    pass 255 bytes, and ``is_dir()`` on them raised a bare OSError (exit 1)."""
    out = tmp_path / ("e" * 235 + ".html")
    assert main(["explain", "hi", "--steps", "2", "--out", str(out)]) == 2
    line = _one_line(capsys)
    assert "argument --out: " in line and "cannot be reached (File name too long)" in line, line
    assert list(tmp_path.iterdir()) == []


def _mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


@pytest.mark.parametrize("umask", [0o077, 0o022, 0o027], ids=oct)
def test_written_files_follow_the_umask_and_keep_their_mode(tmp_path: Path, umask: int) -> None:
    """Reports were forced to 0o644 whatever the umask (and a private 0o600 report was
    widened to 0o644); checkpoints and index caches got mkstemp's 0o600 under umask
    022. Compared with what ``open()`` gives under the same umask."""
    import torch

    from attnlab.interpret.plot import pyplot, save_figure
    from attnlab.train import Checkpoint, save_checkpoint

    old = os.umask(umask)
    try:
        with open(tmp_path / "by_open", "w"):
            pass
        expected = _mode(tmp_path / "by_open")  # the reference: 0o666 & ~umask
        assert expected == 0o666 & ~umask
        text = atomic_write_text(tmp_path / "r.html", "<p>hi</p>")
        fig = save_figure(pyplot().figure(), tmp_path / "f.png")
        ck = save_checkpoint(tmp_path / "c.safetensors", Checkpoint({"w": torch.ones(1)}))
        assert [_mode(p) for p in (text, fig, ck)] == [expected] * 3
        for p, keep in [(text, 0o600), (fig, 0o640), (ck, 0o604)]:  # replaced: kept
            p.chmod(keep)
        atomic_write_text(text, "<p>again</p>")
        save_figure(pyplot().figure(), fig)
        save_checkpoint(ck, Checkpoint({"w": torch.zeros(1)}))
        assert [_mode(p) for p in (text, fig, ck)] == [0o600, 0o640, 0o604]
    finally:
        os.umask(old)


def test_the_umask_is_read_without_proc_too(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where ``/proc/self/status`` cannot be read, the umask is set and put back."""
    from attnlab import _io

    old = os.umask(0o027)
    try:
        assert _io._umask() == 0o027

        def no_proc(*a: object, **k: object) -> None:
            raise OSError("no /proc")

        monkeypatch.setattr(_io, "open", no_proc, raising=False)
        assert _io._umask() == 0o027
        assert os.umask(0o027) == 0o027  # put back as it was
    finally:
        os.umask(old)


#: the dests of the options and arguments that name a file or folder
_PATH_DESTS = {"out", "model", "hf_model", "runs", "cache", "docs", "file"}


def test_every_path_option_expands_a_leading_tilde() -> None:
    """``--out=~/x`` (bash expands no ``~`` after ``=``) or a quoted ``'~/x'`` was taken
    literally: a folder named ``~`` was made; each command's path options now read it as
    the shell does, ``os.path.expanduser``."""
    import argparse

    from attnlab.cli import build_parser

    home = os.path.expanduser("~")
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    seen = set()
    for command, parser in sub.choices.items():
        for action in parser._actions:
            if action.dest in _PATH_DESTS:
                seen.add(action.dest)
                assert action.type is not None, (command, action.dest)
                assert action.type("~/x") == f"{home}/x", (command, action.dest)
                assert action.type("a/~") == "a/~" and action.type("pydoc:with") == "pydoc:with"
    assert seen == _PATH_DESTS  # (each one found: the control)


@NEED_MODEL
def test_summarize_reads_and_writes_under_a_tilde(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir()
    work.mkdir()
    (home / "doc.txt").write_text("Cats purr. Dogs bark. Birds sing.\n")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    assert main(["summarize", "~/doc.txt", "--sentences", "1", "--out=~/sum.html"]) == 0
    assert (home / "sum.html").read_text().startswith("<!doctype html>")
    assert list(work.iterdir()) == []  # no folder named "~"


def test_checkpoint_paths_that_cannot_be_one_are_named(tmp_path: Path) -> None:
    """``load_checkpoint`` of a folder said "does not exist", of ``''`` "checkpoint '.'
    does not exist", of a 256-byte name a bare OSError; ``save_checkpoint('')`` wrote a
    temp file then failed "Device or resource busy", under a file "File exists [errno
    17]", and to ``ck.pt`` wrote safetensors silently."""
    import torch

    from attnlab.train import Checkpoint, CheckpointError, load_checkpoint, save_checkpoint

    ck = Checkpoint(torch.nn.Linear(2, 2).state_dict(), {"n": 2})
    (tmp_path / "adir").mkdir()
    (tmp_path / "afile").write_text("")
    long = str(tmp_path / ("y" * 256 + ".safetensors"))
    loads = [
        ("", r"^path is an empty string; give a file such as runs/x/last\.safetensors$"),
        (tmp_path / "adir", r"^path '.*adir' is a folder; give a file, such as '.*adir/last"),
        (long, r"^path '.*y{256}\.safetensors' cannot be reached \(File name too long\)$"),
    ]
    for path, message in loads:
        with pytest.raises(CheckpointError, match=message):
            load_checkpoint(path)
    saves = [
        *loads,
        (tmp_path / "afile" / "ck.safetensors", r"is in '.*afile', a file, not a folder$"),
        (tmp_path / "ck.pt", r"^path '.*ck\.pt' must end in \.safetensors .*got '\.pt'$"),
        (tmp_path / "ck", r"^path '.*ck' must end in \.safetensors .*got 'no suffix'$"),
    ]
    for path, message in saves:
        with pytest.raises(ValueError, match=message):
            save_checkpoint(path, ck)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adir", "afile"]  # nothing written
    good = tmp_path / "adir" / "ck.safetensors"  # the control
    assert load_checkpoint(save_checkpoint(good, ck)).config == {"n": 2}


@NEED_MODEL
def test_explain_names_what_it_wrote_as_summarize_does(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A file name that is not UTF-8 (``caf\\xe9``: a lone surrogate in Python) was
    printed raw by explain (``caf\\udce9`` here; a strict UTF-8 stdout refuses it);
    summarize prints it through ``shown()``, U+FFFD for the byte."""
    out = tmp_path / os.fsdecode(b"caf\xe9.html")
    assert main(["explain", "hi", "--steps", "2", "--out", str(out)]) == 0
    wrote = [line for line in capsys.readouterr().out.splitlines() if line.startswith("wrote ")]
    assert wrote[0] == f"wrote {tmp_path}/caf\ufffd.html", wrote
    assert len(wrote) > 1 and all("caf\ufffd_" in line for line in wrote[1:])  # the pictures
    assert out.is_file()


def test_robust_names_its_table_through_shown(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """(robust printed its --out raw: ``caf\\udce9`` for a name that is not UTF-8.) The
    study is replaced by a stub: what is checked is the line naming what it wrote."""
    from attnlab.robust import study_shortcut

    monkeypatch.setattr(study_shortcut, "shortcut_study", lambda *a, **k: None)
    out = tmp_path / os.fsdecode(b"caf\xe9")
    assert main(["robust", "shortcut", "--smoke", "--out", str(out)]) == 0
    line = capsys.readouterr().out.strip()
    assert (
        line == f"table and report: {tmp_path}/caf\ufffd/table.md, {tmp_path}/caf\ufffd/report.html"
    )


def test_a_path_ending_with_a_slash_is_not_written_as_a_file(tmp_path: Path) -> None:
    """(``atomic_write_text("newdir/", ...)``, and so ``report("newdir/", ...)``, wrote a
    file named ``newdir``: Path() drops the slash.)"""
    from attnlab.interpret.report import report

    folder = f"{tmp_path}/newdir/"
    with pytest.raises(ValueError, match="newdir/' ends with a slash, a folder; expected a file"):
        atomic_write_text(folder, "x")
    with pytest.raises(ValueError, match="must be an HTML file to write, got the folder"):
        report(folder, ["a", "b"], [torch.full((1, 2, 2), 0.5)])
    assert list(tmp_path.iterdir()) == []  # nothing written
    assert atomic_write_text(folder + "r.html", "x").read_text() == "x"  # the control
