"""Train a task, score it, show it and report: what ``attnlab train`` and ``attnlab demo``
run (:mod:`attnlab.cli.train` parses their command lines).

The demo is a short run of the translation task: French number words to English, on
numbers never seen in training, with its scores, a few translations, and a report folder
holding cross-attention alignment pictures and a self-contained HTML page.
"""

from __future__ import annotations

import json
import time
from dataclasses import fields
from pathlib import Path
from typing import Any

from attnlab.tasks.registry import TaskSpec, spec
from attnlab.train import TrainConfig, Trainer
from attnlab.train.loop import Task, num_threads

__all__ = ["demo", "run_task", "train_config"]


def train_config(s: TaskSpec, **overrides: Any) -> TrainConfig:
    """The task's default settings with the non-None ``overrides`` on top.

    Example:
        >>> from attnlab.tasks.registry import spec
        >>> train_config(spec("translation"), steps=10, lr=None).steps
        10
    """
    known = {f.name for f in fields(TrainConfig)}
    bad = sorted(set(s.defaults) - known)
    if bad:
        raise ValueError(f"task defaults name unknown TrainConfig fields {bad}")
    values = dict(s.defaults) | {k: v for k, v in overrides.items() if v is not None}
    return TrainConfig(**values)


def demo(out: str | Path, *, seconds: float = 150.0, progress: bool = True) -> dict[str, float]:
    """A short translation run (``seconds`` of training) with scores and a report in ``out``."""
    print("attnlab demo: French number words -> English number words (num2words)")
    print("held-out numbers never appear in training; model: 2+2-layer transformer\n")
    s = spec("translation")
    cfg = train_config(
        s, steps=1100, eval_every=275, time_limit=seconds, out_dir=None, progress=progress
    )
    from attnlab.tasks.translation import TranslationTask

    return run_task(s, TranslationTask(40_000, eval_size=200, dropout=0.0), cfg, Path(out))


def run_task(s: TaskSpec, task: Task, cfg: TrainConfig, report: Path) -> dict[str, float]:
    """Train ``task`` under ``cfg`` printing each evaluation, then run the spec's finish."""
    print(f"data: {task.num_train()} training examples")
    trainer = Trainer(task, cfg, on_eval=lambda r: print(json.dumps(r), flush=True))
    t0 = time.perf_counter()
    trainer.fit()
    print(f"trained {trainer.step} steps in {time.perf_counter() - t0:.0f} s")
    model = trainer.model.eval()
    if s.finish is None:
        return trainer.history[-1] if trainer.history else {}
    with num_threads(cfg.threads):
        final = s.finish(task, model, report)
    print(f"report: {report}")
    return final
