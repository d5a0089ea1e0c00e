"""What ``attnlab CMD --help`` says is true and complete: every option with a default
shows it, in one form, ``(default X)``; the options a command refuses in a case are named
as refused there. The text is read from the real ``--help`` output."""

from __future__ import annotations

import argparse
import inspect
import re
from pathlib import Path

import pytest

from attnlab.cli import bench, build_parser, main

README = Path(__file__).resolve().parents[1] / "README.md"


def _help_text(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """``attnlab ARGV --help``'s output, its line wrapping undone."""
    assert main([*argv, "--help"]) == 0
    return " ".join(capsys.readouterr().out.split())


def _parsers() -> dict[str, argparse.ArgumentParser]:
    """Every subcommand's parser, and ``attnlab bench``'s own (the one it runs with)."""
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return {**sub.choices, "bench (own parser)": bench.build_parser()}


@pytest.mark.parametrize("command", sorted(_parsers()))
def test_every_option_with_a_default_shows_it(command: str) -> None:
    parser = _parsers()[command]
    text = " ".join(parser.format_help().split())
    for action in parser._actions:
        default = action.default
        unset = any(default is x for x in (None, False, argparse.SUPPRESS)) or default == []
        if unset or not action.option_strings:  # (a flag, a list that starts empty)
            continue
        shown = " ".join(default) if isinstance(default, list) else str(default)
        said = (action.help or "") % dict(vars(action), prog=parser.prog)  # as argparse does
        assert f"(default {shown})" in said, f"{command} {action.option_strings}: {said!r}"
        assert " ".join(said.split()) in text  # and --help prints it


@pytest.mark.parametrize("command", sorted(_parsers()))
def test_every_option_says_what_it_does(command: str) -> None:
    # train's --warmup, --eval-every and --seed, demo's --no-progress said nothing
    for action in _parsers()[command]._actions:
        if action.option_strings and action.help is not argparse.SUPPRESS:
            said = (action.help or "").strip()
            assert said, f"{command} {action.option_strings}: no help text"


def test_train_help_shows_each_tasks_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    from attnlab.tasks import TASKS, spec

    text = _help_text(["train"], capsys)  # --steps etc. said "default per task", no value
    assert text.count("(default per task: see the table below)") == 6, text
    table = text[text.index("defaults per task:") :]
    for name in TASKS:
        d = spec(name).defaults
        assert f" {name} {d['steps']} {d['batch_size']} {d['lr']:g} " in table, name
    assert "(default 0)" in text  # --seed


@pytest.mark.parametrize("command", sorted(_parsers()))
def test_defaults_are_named_in_one_form(command: str) -> None:
    for action in _parsers()[command]._actions:
        said = action.help or ""
        if "default" in said:  # "(default: all)", "(task default)", "'pydoc' (the default)"
            assert re.search(r"\(default [^:)][^)]*\)", said), f"{command}: {said!r}"


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


def test_debug_is_one_option_everywhere_and_bench_honours_the_variable(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # bench's --help said "print the traceback of an error", without the variable
    assert "--debug print the traceback of an error (or set ATTNLAB_DEBUG=1)" in _help_text(
        ["bench"], capsys
    )
    parsers = {"attnlab": build_parser(), **_parsers()}
    helps = {
        name: [a.help for a in p._actions if "--debug" in a.option_strings]
        for name, p in parsers.items()
    }
    assert all(len(h) == 1 for h in helps.values()), helps
    assert len({h[0] for h in helps.values()}) == 1, helps
    # ... and what it says is true of bench: the variable shows the traceback
    argv = ["bench", "--memory", "--cases", "dense"]  # a usage error found in its runner
    for value, traceback in (("1", True), ("0", False)):
        monkeypatch.setenv("ATTNLAB_DEBUG", value)
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "argument --cases: is dense" in err
        assert ("Traceback (most recent call last)" in err) is traceback, (value, err)
