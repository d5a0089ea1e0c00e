"""A checkpoint's tensors must be able to stand for the model's and the optimizer's:
``load_state_dict`` cast int8 and bool tensors to float silently, and an Adam moment of
another shape failed only inside the first step (auditor helper-270)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from attnlab.train.checkpoint import (
    Checkpoint,
    CheckpointError,
    load_checkpoint,
    load_model_state,
    load_optimizer_state,
    save_checkpoint,
)
from tests.conftest import check_and_control


def _saved(tmp_path: Path, name: str, edit: dict[str, torch.Tensor]) -> Checkpoint:
    """A Linear's checkpoint after one Adam step, with ``edit``'s tensors put in
    (``model.*`` for weights, ``0.exp_avg`` for optimizer state), saved and read back."""
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    opt = torch.optim.Adam(model.parameters())
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    state, optim = model.state_dict(), opt.state_dict()
    for key, value in edit.items():
        if key.startswith("model."):
            state[key.removeprefix("model.")] = value
        else:
            pid, entry = key.split(".")
            optim["state"][int(pid)][entry] = value
    path = save_checkpoint(tmp_path / f"{name}.safetensors", Checkpoint(state, {}, optim))
    return load_checkpoint(path)


def _load_model(ckpt: Checkpoint, path: str) -> None:
    load_model_state(nn.Linear(3, 2), ckpt, path)


def _load_optimizer(ckpt: Checkpoint, path: str) -> None:
    load_optimizer_state(torch.optim.Adam(nn.Linear(3, 2).parameters()), ckpt, path)


MODEL = r"does not fit this model: "
OPTIM = r"holds an optimizer state that does not fit this model \(ValueError: "


@pytest.mark.parametrize(
    ("load", "key", "bad", "match"),
    [
        *[
            (_load_model, "model.weight", torch.ones(2, 3, dtype=d), MODEL + rf"weight \({d}, ")
            for d in (torch.int8, torch.bool)
        ],
        (
            _load_optimizer,
            "0.exp_avg",
            torch.ones(2, 3, dtype=torch.int8),
            OPTIM + r"optim\.0\.exp_avg \(torch\.int8, its parameter torch\.float32\)",
        ),
        (
            _load_optimizer,
            "0.exp_avg",
            torch.zeros(3),
            OPTIM + r"optim\.0\.exp_avg \(shape \(3,\), its parameter \(2, 3\)\)",
        ),
    ],
)
def test_tensors_that_cannot_stand_for_the_models_are_refused(
    tmp_path: Path, load: Any, key: str, bad: torch.Tensor, match: str
) -> None:
    """The file and the tensor are named; float16 and float64 ones are cast, and load."""
    wrong = _saved(tmp_path, "bad", {key: bad})
    dtype = torch.float16 if key.startswith("model.") else torch.float64
    other_float = _saved(tmp_path, "good", {key: torch.zeros(2, 3, dtype=dtype)})
    check_and_control(
        lambda: load(wrong, "bad.safetensors"),
        lambda: load(other_float, "good.safetensors"),
        CheckpointError,
        r"'bad\.safetensors' " + match,
    )
