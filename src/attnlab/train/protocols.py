"""What the training loop asks of the code it runs: a :class:`Task` (the model, its data,
its loss and its evaluation) and, optionally, :class:`Plugin` s that change how a step
computes its gradients. The loop (:class:`~attnlab.train.loop.Trainer`) knows nothing of
any model beyond these.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any, Protocol

from torch import Tensor, nn

__all__ = ["LossFn", "Plugin", "Task", "eval_score"]


class Task(Protocol):
    """What the trainer needs from a task (see :mod:`attnlab.tasks`).

    Example:
        >>> import torch
        >>> from attnlab.train import TrainConfig, Trainer
        >>> class Mean:  # learn the mean of 64 numbers, 1.0
        ...     name, data = "mean", torch.linspace(0, 2, 64)[:, None]
        ...     def build_model(self): return nn.Linear(1, 1)
        ...     def config(self): return {}
        ...     def num_train(self): return len(self.data)
        ...     def batch(self, indices): return self.data[indices]
        ...     def loss(self, model, batch): return (model(0 * batch) - batch).square().mean()
        ...     def evaluate(self, model):  # a "score", higher is better, picks the best
        ...         mean = float(model(torch.zeros(1, 1)))
        ...         return {"mean": mean, "score": -abs(mean - 1.0)}
        >>> cfg = TrainConfig(steps=100, batch_size=16, lr=0.1, eval_every=100, progress=False)
        >>> round(Trainer(Mean(), cfg).fit()[-1]["mean"], 1)
        1.0
    """

    name: str

    def build_model(self) -> nn.Module: ...
    def config(self) -> dict[str, Any]: ...
    def num_train(self) -> int: ...
    def batch(self, indices: Tensor) -> Any: ...
    def loss(self, model: nn.Module, batch: Any) -> Tensor: ...
    def evaluate(self, model: nn.Module) -> dict[str, float]: ...


# ``evaluate`` returns the metrics of one evaluation; its ``"score"`` (higher is better)
# decides ``best.safetensors``, ``target`` and ``patience`` (:func:`eval_score`).
#
# A task may also define ``begin_step(model, step)``: the trainer calls it before each
# step's ``batch``, so a task whose data comes from the model itself (reinforcement
# learning's rollouts, :mod:`attnlab.rl`) can collect it. It should be a pure function of
# ``(seed, step, model)`` for exact resume, and keep what it holds between steps (a
# rollout) through ``task_state()`` and ``load_task_state()`` (see ``restore_task_state``).
#
# A task may also define ``param_groups(model)``: AdamW parameter groups (dicts with
# ``params`` and any of ``betas``, ``weight_decay``, ``lr_scale``); a group's learning rate
# is ``lr * lr_scale`` on the schedule. A GAN uses it for its two learning rates (TTUR).
#
# ``config()`` must name everything that decides the run's data and loss (a resume is
# refused when it differs, :func:`~attnlab.train.checkpoint.check_same_run`); a task may
# also define ``config_defaults()``: what an entry its older checkpoints' config lacks
# means (:class:`attnlab.tasks.options.DataOptions`).

LossFn = Callable[[nn.Module, Any], Tensor]


def eval_score(metrics: dict[str, Any], loss: float, *, first: bool = False) -> float:
    """What an evaluation's ``metrics`` rank by: their ``"score"``, else minus ``loss``,
    the last training batch's (said in a warning at the ``first`` evaluation: the best
    checkpoint, ``target`` and ``patience`` followed that noisy loss without a word).

    Example:
        >>> eval_score({"score": 0.5, "bleu": 20.0}, 1.2), eval_score({"bleu": 20.0}, 1.2)
        (0.5, -1.2)
    """
    if "score" in metrics:
        return float(metrics["score"])
    if first:
        keys = ", ".join(map(repr, metrics)) or "none"
        warnings.warn(
            f"the task's evaluate() returned no 'score' (its keys: {keys}): the best "
            f"checkpoint, target and patience follow minus the last training batch's loss; "
            f"return a 'score', higher is better",
            stacklevel=3,
        )
    return -loss


class Plugin(Protocol):
    """A change to how a step computes its gradients (adversarial training, a loss term;
    see :mod:`attnlab.robust`).

    ``step(model, batch, loss_fn)`` returns a loss still in the autograd graph; the
    trainer calls ``backward`` on it. A plug-in may also have put gradients into the
    parameters' ``.grad`` before returning (the trainer zeroes them before the step and
    never after), and it reports through the returned value: ``float(loss)`` is the
    step's logged loss. ``Trainer(..., plugins=[a, b])`` runs ``b`` around ``a``: ``b``'s
    ``loss_fn`` is ``a.step`` over the task's loss.

    Example:
        >>> from attnlab.tasks.translation import TranslationTask
        >>> from attnlab.train import TrainConfig, Trainer
        >>> class Scaled:  # a loss term: the loss below it times ``factor``
        ...     def __init__(self, factor): self.factor = factor
        ...     def step(self, model, batch, loss_fn): return self.factor * loss_fn(model, batch)
        >>> task = TranslationTask(train_size=128, test_size=8, d_model=32)
        >>> cfg = TrainConfig(steps=1, batch_size=16, eval_every=1, progress=False)
        >>> (plain,) = Trainer(task, cfg).fit()
        >>> (both,) = Trainer(task, cfg, plugins=[Scaled(2.0), Scaled(3.0)]).fit()
        >>> round(both["loss"] / plain["loss"], 3)  # 3 x (2 x the task's loss), as logged
        6.0
    """

    def step(self, model: nn.Module, batch: Any, loss_fn: LossFn) -> Tensor: ...
