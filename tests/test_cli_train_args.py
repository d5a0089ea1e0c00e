"""``attnlab train`` settings that can never do what they ask, refused before any work:
a ``--warmup`` longer than the run, a ``--target`` outside the task's score range."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest

import attnlab.cli.train as train_mod
from attnlab.cli import main
from attnlab.tasks import TASKS, spec


class Reached(Exception):
    """The stubbed work was reached: every check passed."""


def _stop(*args: Any, **kwargs: Any) -> None:
    raise Reached("work started")


def _error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """The one stderr line of ``attnlab train ARGV``'s usage error (exit 2)."""
    assert main(["train", *argv]) == 2
    out, err = capsys.readouterr()
    lines = [x for x in err.splitlines() if x.strip()]
    assert out == "" and len(lines) == 1 and "Traceback" not in err, (out, err)
    return lines[0]


@pytest.fixture
def stubbed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(train_mod, "_build", _stop)  # the data, then the training


def _reached(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", *argv]) == 1
    assert "Reached: work started" in capsys.readouterr().err


def test_warmup_longer_than_the_run_is_refused(
    stubbed: None, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    out = ["--out", str(tmp_path / "r")]
    # 10**12 trained dates' 450 default steps at lr ~0 (exact 0.0) and exited 0
    line = _error(["dates", "--warmup", "1000000000000", *out], capsys)
    assert "argument --warmup: is 1000000000000, more than the run's 450 steps" in line
    assert "(the dates default)" in line and "give at most 450" in line
    line = _error(["dates", "--steps", "10", "--warmup", "11", *out], capsys)
    assert "is 11, more than the run's 10 steps (--steps)" in line
    assert not (tmp_path / "r").exists()
    _reached(["dates", "--steps", "10", "--warmup", "10", *out], capsys)  # peak at the end
    _reached(["dates", "--steps", "10", *out], capsys)  # dates' own warmup is not refused


def test_target_outside_the_score_range_is_refused(
    stubbed: None, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    out = ["--out", str(tmp_path / "r")]
    line = _error(["dates", "--target", "95", *out], capsys)  # a percent: never reached
    assert "argument --target: is 95; dates scores lie in [0, 1]" in line
    assert line.endswith("did you mean 0.95?")
    for value in ("1.5", "-0.1"):
        line = _error(["dates", "--target", value, *out], capsys)
        assert f"is {value}; dates scores lie in [0, 1], so it is never reached" in line
        assert "did you mean" not in line
    for value in ("0.95", "1", "0"):
        _reached(["dates", "--target", value, *out], capsys)
    _reached(["gan", "--target", "-5", *out], capsys)  # -Frechet: at most 0
    line = _error(["gan", "--target", "1.5", *out], capsys)  # the distance, not the score
    assert "is 1.5; gan scores (-Frechet distance) are at most 0, so it is never" in line
    assert line.endswith("did you mean -1.5?")


def test_every_fraction_task_names_its_score_range() -> None:
    frechet = {"gan", "gan-plain", "vae", "vae-plain"}  # -Frechet, at most 0
    for name in TASKS:
        want = (-math.inf, 0.0) if name in frechet else (0.0, 1.0)
        assert spec(name).score_range == want, name


def test_a_task_default_warmup_not_shorter_than_the_steps_is_cut_to_a_tenth(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """(``vision --steps 40`` kept vision's default warmup of 150 steps: the learning rate
    never reached its peak, and nothing said so; only a --warmup given was checked.)"""
    from types import SimpleNamespace

    used: list[int] = []
    monkeypatch.setattr(train_mod, "_build", lambda s, n: SimpleNamespace(num_train=lambda: 8))
    monkeypatch.setattr(train_mod, "run_task", lambda s, task, cfg, out: used.append(cfg.warmup))
    assert spec("vision").defaults["warmup"] == 150
    for i, (argv, want) in enumerate(
        [(["--steps", "40"], 4), (["--steps", "150"], 15), (["--steps", "5"], 1)]
    ):
        assert main(["train", "vision", *argv, "--out", str(tmp_path / str(i))]) == 0
        assert capsys.readouterr().err.splitlines() == [
            f"attnlab train: warning: the vision default warmup of 150 steps is not shorter "
            f"than the run's {argv[1]} steps: warming up for {want} (--warmup sets it)"
        ]
        assert used.pop() == want
    for argv, want in [(["--steps", "151"], 150), (["--steps", "40", "--warmup", "40"], 40)]:
        assert main(["train", "vision", *argv, "--out", str(tmp_path / "c")]) == 0
        assert capsys.readouterr().err == "" and used.pop() == want  # the controls
