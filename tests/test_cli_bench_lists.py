"""``attnlab bench`` options that went unread or repeated work, refused before any timing:
``--window`` without the case that reads it, a case or mode named twice."""

from __future__ import annotations

from typing import Any

import pytest

import attnlab.cli.bench as bench_cli
from attnlab.cli import main


class Reached(Exception):
    """The stubbed timing began: every check passed."""


@pytest.fixture(autouse=True)
def _no_timing(monkeypatch: pytest.MonkeyPatch) -> None:
    def records(*args: Any, **kwargs: Any) -> None:
        raise Reached("timing")

    monkeypatch.setattr(bench_cli.bench, "records", records)


@pytest.mark.parametrize(
    ("argv", "want"),
    [  # --window 5 went unused (exit 0); dense,dense timed dense twice
        (["--cases", "dense", "--window", "5"], "argument --window: is 5, but only the case "),
        (["--cases", "dense,causal", "--window", "5"], "--cases is dense,causal: add window"),
        (["--cases", "dense,dense"], "argument --cases: names 'dense' twice; give each once"),
        (["--modes", "fwd,fwd"], "argument --modes: names 'fwd' twice"),
    ],
)
def test_unread_or_repeated_options_are_refused(
    argv: list[str], want: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["bench", "--n", "64", *argv]) == 2
    out, err = capsys.readouterr()
    assert out == "" and want in err and "Reached" not in err, err
    assert len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize(
    "argv",
    [["--cases", "window,dense", "--window", "5", "--n", "64"], ["--window", "5", "--n", "64"],
     ["--smoke", "--cases", "dense"]],
)  # fmt: skip
def test_the_case_that_reads_window_runs(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["bench", *argv]) == 1
    assert "Reached: timing" in capsys.readouterr().err
