"""A task whose ``evaluate()`` returns no ``"score"``: the trainer ranked its evaluations
by minus the last training batch's loss without a word, so the best checkpoint, ``target``
and ``patience`` followed a noisy minibatch (best at step 70 where the task's own metric
was best at step 60; ``target=0.99`` unreachable). It still does, and says so once."""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch
from torch import nn

from attnlab.train import TrainConfig, Trainer


class Mean:
    """Learn the mean of 64 numbers, 1.0."""

    name, data = "mean", torch.linspace(0, 2, 64)[:, None]

    def __init__(self, with_score: bool) -> None:
        self.with_score = with_score

    def build_model(self) -> nn.Module:
        return nn.Linear(1, 1)

    def config(self) -> dict[str, Any]:
        return {}

    def num_train(self) -> int:
        return len(self.data)

    def batch(self, indices: torch.Tensor) -> torch.Tensor:
        return self.data[indices]

    def loss(self, model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
        return (model(0 * batch) - batch).square().mean()

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        error = abs(float(model(torch.zeros(1, 1))) - 1.0)
        return {"val_error": error, "score": -error} if self.with_score else {"val_error": error}


def _fit(with_score: bool) -> list[dict[str, Any]]:
    cfg = TrainConfig(steps=30, batch_size=16, lr=0.1, eval_every=10, progress=False)
    return Trainer(Mean(with_score), cfg).fit()


def test_no_score_is_said_once() -> None:
    with pytest.warns(UserWarning, match=r"returned no 'score' \(its keys: 'val_error'\)") as seen:
        _fit(with_score=False)
    assert sum("no 'score'" in str(w.message) for w in seen) == 1  # of 3 evaluations


def test_a_score_is_used_without_a_word() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(_fit(with_score=True)) == 3
