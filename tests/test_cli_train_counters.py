"""``attnlab train --resume`` on a checkpoint whose counters are not numbers: a step "x"
was a bare ValueError from int() (exit 1), a train_size "abc" or [1] a bare ValueError or
TypeError, and a step -5 was refused only after the data was built (auditor helper-270)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from attnlab.cli import main
from attnlab.train import Checkpoint, save_checkpoint


@pytest.mark.parametrize(
    ("state", "shown"),
    [
        ({"step": "x", "train_size": 7}, "step='x'"),
        ({"step": -5, "train_size": 7}, "step=-5"),
        ({"step": 3, "train_size": "abc"}, "train_size='abc'"),
        ({"step": 3, "train_size": [1]}, "train_size=[1]"),
        ({"step": 3, "train_size": 7.5}, "train_size=7.5"),
    ],
)
def test_counters_that_are_not_numbers_are_named_before_any_work(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    state: dict,
    shown: str,
) -> None:
    import attnlab.cli.train as cli_train

    def build(*args: object) -> None:
        raise AssertionError("the data was built")

    monkeypatch.setattr(cli_train, "_build", build)
    last = tmp_path / "run" / "last.safetensors"
    last.parent.mkdir()
    linear = torch.nn.Linear(2, 2).state_dict()
    save_checkpoint(last, Checkpoint(linear, {"task": "dates"}, state=state))
    argv = ["train", "dates", "--out", str(last.parent), "--resume", "--steps", "200"]
    code = main([*argv, "--train-size", "7"] if "step" in shown else argv)
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert f"argument --resume: {last} holds {shown} in its state, not an int" in err, err
