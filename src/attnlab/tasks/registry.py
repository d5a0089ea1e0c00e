"""The tasks that ``attnlab train TASK`` knows, and what each needs from the command line.

Each task module defines ``SPEC`` (or the attribute named after a colon in :data:`TASKS`),
a :class:`TaskSpec`: how to build the task, its default training settings, and what to do
once training ends (final scores, pictures).
Modules are imported only when their task is asked for.

Example:
    >>> sorted(TASKS)[:3]
    ['captioning', 'classification', 'dates']
    >>> spec("translation").defaults["steps"]
    2000
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from attnlab._validate import instance_of
from attnlab.train.loop import Task

__all__ = ["TASKS", "TaskSpec", "spec"]

TASKS: dict[str, str] = {
    "translation": "attnlab.tasks.translation",
    "dates": "attnlab.tasks.dates",
    "generation": "attnlab.tasks.generation",
    "vision": "attnlab.tasks.vision",
    "captioning": "attnlab.tasks.captioning",
    "classification": "attnlab.tasks.classification",
    # generative attention and the same models without it: "module:ATTR" names the spec
    "gan": "attnlab.tasks.generative_task:GAN_SPEC",
    "gan-plain": "attnlab.tasks.generative_task:GAN_PLAIN_SPEC",
    "vae": "attnlab.tasks.generative_task:VAE_SPEC",
    "vae-plain": "attnlab.tasks.generative_task:VAE_PLAIN_SPEC",
    # PPO agents (attnlab.rl): attention over the recent past, and LSTM / MLP baselines
    "memory-agent": "attnlab.rl.specs:MEMORY_AGENT",
    "memory-agent-lstm": "attnlab.rl.specs:MEMORY_AGENT_LSTM",
    "memory-agent-mlp": "attnlab.rl.specs:MEMORY_AGENT_MLP",
    "doorkey-agent": "attnlab.rl.specs:DOORKEY_AGENT",
    "doorkey-agent-lstm": "attnlab.rl.specs:DOORKEY_AGENT_LSTM",
    "doorkey-agent-mlp": "attnlab.rl.specs:DOORKEY_AGENT_MLP",
}


@dataclass(frozen=True)
class TaskSpec:
    """How the command line trains one task.

    Attributes:
        summary: one line for ``attnlab train --help``.
        build: ``build(train_size)`` makes the task (None: the task's default size).
        defaults: :class:`attnlab.train.TrainConfig` fields (steps, batch_size, lr, ...)
            that the command line's options override.
        finish: ``finish(task, model, folder)`` runs the final evaluation, prints what a
            user should see (scores, samples), writes pictures into ``folder`` and returns
            the final metrics.
        max_train_size: the most training examples the task can make (None: no bound
            below the command line's), checked before any data is made.
        score_range: the ``(low, high)`` every eval line's ``score`` lies in (None: not
            bounded; the generative tasks' ``-Frechet`` is at most 0: ``(-inf, 0)``); a
            ``--target`` outside it is refused before any work (0.95 is a fraction, 95 was
            never reached; 1.5 is a distance, -1.5 its score).

    Example:
        >>> s = spec("dates")
        >>> isinstance(s, TaskSpec), s.defaults["steps"], s.finish is not None
        (True, 450, True)
    """

    summary: str
    build: Callable[[int | None], Task]
    defaults: dict[str, Any] = field(default_factory=dict)
    finish: Callable[[Any, nn.Module, Path], dict[str, float]] | None = None
    max_train_size: int | None = None
    score_range: tuple[float, float] | None = None


def spec(name: str) -> TaskSpec:
    """The :class:`TaskSpec` of task ``name`` (one of :data:`TASKS`).

    Example:
        >>> spec("translation").summary
        'French number words to English (num2words), seq2seq transformer'
        >>> spec("chess")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ValueError: task must be one of ['captioning', 'classification', ...], got 'chess'
    """
    instance_of("task", name, str, f"a task name, one of {sorted(TASKS)}")
    if name not in TASKS:
        raise ValueError(f"task must be one of {sorted(TASKS)}, got {name!r}")
    module, _, attr = TASKS[name].partition(":")  # "module" means "module:SPEC"
    s = getattr(importlib.import_module(module), attr or "SPEC")
    assert isinstance(s, TaskSpec)
    return s
