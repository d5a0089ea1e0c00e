"""What ``attnlab CMD --help`` says is true: the options a command refuses in a case are
named as refused there, and the text is read from the real ``--help`` output."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest

from attnlab.cli import main

README = Path(__file__).resolve().parents[1] / "README.md"


def _help_text(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """``attnlab ARGV --help``'s output, its line wrapping undone."""
    assert main([*argv, "--help"]) == 0
    return " ".join(capsys.readouterr().out.split())


def test_robust_steps_help_says_which_studies_take_it(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    from attnlab.robust.study_dates import dates_study
    from attnlab.robust.study_shortcut import shortcut_study
    from attnlab.robust.study_vision import vision_study

    text = _help_text(["robust"], capsys)
    options = text[text.index("options:") :]
    steps = options[options.index("--steps STEPS") : options.index("--seed")]
    for task, study in (("vision", vision_study), ("shortcut", shortcut_study),
                        ("dates", dates_study)):  # fmt: skip
        default = inspect.signature(study).parameters["steps"].default
        assert f"{task} {default}" in steps, steps  # the study's own default, shown
    assert "faithfulness refuses it" in steps, steps
    # ... as the command does (before any work), and as the README's synopsis says
    assert main(["robust", "faithfulness", "--steps", "10", "--out", str(tmp_path / "rf")]) == 2
    assert "argument --steps: faithfulness trains" in capsys.readouterr().err
    assert not (tmp_path / "rf").exists()
    readme = " ".join(README.read_text().split())
    synopsis = readme[readme.index("`attnlab robust TASK [--method a,b] [--steps N]") :][:600]
    assert "`faithfulness` trains each model with its task's steps and refuses it" in synopsis
