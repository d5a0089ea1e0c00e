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

from attnlab._validate import instance_of, plain
from attnlab.tasks.registry import TaskSpec, spec
from attnlab.train import TrainConfig, Trainer
from attnlab.train.loop import Task, num_threads

__all__ = ["DEMO_STEPS", "demo", "demo_config", "run_task", "train_config"]


def train_config(s: TaskSpec, **overrides: Any) -> TrainConfig:
    """The task's default settings with the non-None ``overrides`` on top.

    Example:
        >>> from attnlab.tasks.registry import spec
        >>> train_config(spec("translation"), steps=10, lr=None).steps
        10
    """
    if not isinstance(s, TaskSpec):
        raise TypeError(f"s must be a TaskSpec (see attnlab.tasks.spec), got {type(s).__name__}")
    known = {f.name for f in fields(TrainConfig)}
    bad = sorted(set(s.defaults) - known)
    if bad:
        raise ValueError(f"task defaults name unknown TrainConfig fields {bad}")
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise TypeError(
            f"overrides {unknown} are not TrainConfig fields; expected some of {sorted(known)}"
        )
    values = dict(s.defaults) | {k: v for k, v in overrides.items() if v is not None}
    return TrainConfig(**values)


DEMO_STEPS = 1100


def demo_config(seconds: float | None = None, *, progress: bool = True) -> TrainConfig:
    """The demo's training settings: :data:`DEMO_STEPS` steps of the translation task,
    with a time limit only when ``seconds`` is given (the result must not depend on the
    CPU's speed).

    Example:
        >>> cfg = demo_config()
        >>> cfg.steps, cfg.time_limit
        (1100, None)
    """
    s = spec("translation")
    return train_config(
        s, steps=DEMO_STEPS, eval_every=275, time_limit=seconds, out_dir=None, progress=progress
    )


def demo(
    out: str | Path, *, seconds: float | None = None, progress: bool = True
) -> dict[str, float]:
    """A short translation run with scores and a report in ``out``.

    It trains a fixed number of steps (:func:`demo_config`), so its result does not depend
    on how fast the CPU is; ``seconds`` adds an optional time limit on the training.
    Prints the time it took.

    Raises:
        TypeError, ValueError: ``seconds`` is not None or a number > 0, ``out`` not a path.

    Example:
        >>> demo_config().steps  # what it trains (minutes): 1100 steps, whatever the CPU
        1100
        >>> demo("demo-report", seconds=0)  # checked before any work
        Traceback (most recent call last):
        ValueError: seconds must be a finite number > 0, got 0
    """
    if not isinstance(out, str | Path):
        raise TypeError(f"out must be a str or Path (a folder), got {type(out).__name__}")
    seconds = _seconds(seconds)
    t0 = time.perf_counter()
    print("attnlab demo: French number words -> English number words (num2words)")
    print("held-out numbers never appear in training; model: 2+2-layer transformer\n")
    s = spec("translation")
    cfg = demo_config(seconds, progress=progress)
    from attnlab.tasks.translation import TranslationTask

    final = run_task(s, TranslationTask(40_000, eval_size=200, dropout=0.0), cfg, Path(out))
    print(f"demo took {time.perf_counter() - t0:.0f} s in all")
    return final


def _seconds(seconds: object) -> float | None:
    """``None``, or ``seconds`` as a finite float > 0 (numpy's numbers too)."""
    if seconds is None:
        return None
    number = plain(seconds)
    if isinstance(number, bool) or not isinstance(number, int | float):
        raise TypeError(f"seconds must be None or a number > 0, got {type(seconds).__name__}")
    if not number > 0 or number == float("inf"):
        raise ValueError(f"seconds must be a finite number > 0, got {seconds!r}")
    return float(number)


def run_task(s: TaskSpec, task: Task, cfg: TrainConfig, report: str | Path) -> dict[str, float]:
    """Train ``task`` under ``cfg`` printing each evaluation, then run the spec's finish
    (its held-out scores and the report folder ``report``).

    Raises:
        TypeError: ``s``, ``cfg`` or ``report`` of the wrong type, before any training.

    Example:
        >>> import os, tempfile
        >>> from attnlab.tasks.translation import TranslationTask
        >>> s, task = spec("translation"), TranslationTask(train_size=128, test_size=8, d_model=32)
        >>> cfg = train_config(s, steps=2, batch_size=16, eval_every=2, progress=False)
        >>> with tempfile.TemporaryDirectory() as report:  # doctest: +ELLIPSIS
        ...     final = run_task(s, task, cfg, report)
        ...     written = sorted(os.listdir(report))
        data: 128 training examples
        {"step": 2, "loss": ...}
        trained 2 steps in ...
        report: ...
        >>> written[-1], "greedy_exact" in final  # the report page; the held-out scores
        ('report.html', True)
    """
    instance_of("s", s, TaskSpec, "a TaskSpec (see attnlab.tasks.spec)")
    instance_of("cfg", cfg, TrainConfig, "a TrainConfig")
    if not isinstance(report, str | Path):  # (a str failed in the finish, after training)
        raise TypeError(f"report must be a str or Path (a folder), got {type(report).__name__}")
    report = Path(report)
    print(f"data: {task.num_train()} training examples")
    trainer = Trainer(task, cfg, on_eval=lambda r: print(json.dumps(r), flush=True))
    t0 = time.perf_counter()
    trainer.fit()
    done, first = trainer.step - trainer.first_step, trainer.first_step
    resumed = f" (resumed at step {first}, now at {trainer.step})" if first else ""
    took = f"{time.perf_counter() - t0:.0f} s ({trainer.eval_seconds:.0f} s of it evaluating)"
    print(f"trained {done} steps{resumed} in {took}")
    if trainer.stop_reason is not None:
        print(f"stopped early at step {trainer.step}: {trainer.stop_reason}")
    model = trainer.model.eval()
    if s.finish is None:
        return trainer.history[-1] if trainer.history else {}
    with num_threads(cfg.threads):
        final = s.finish(task, model, report)
    print(f"report: {report}")
    return final
