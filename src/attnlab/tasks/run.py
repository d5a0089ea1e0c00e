"""``attnlab train TASK`` and ``attnlab demo``: train, score, show and report.

The demo is a short run of the translation task: French number words to English, on
numbers never seen in training, with its scores, a few translations, and a report folder
holding cross-attention alignment pictures and a self-contained HTML page.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import fields
from pathlib import Path
from typing import Any

from attnlab.tasks.registry import TASKS, TaskSpec, spec
from attnlab.train import TrainConfig, Trainer
from attnlab.train.loop import Task, num_threads

__all__ = ["add_parsers", "demo_command", "run_task", "train_command"]

_OVERRIDES = (
    "steps",
    "batch_size",
    "lr",
    "warmup",
    "eval_every",
    "seed",
    "time_limit",
    "target",
    "threads",
)


def add_parsers(sub: Any) -> None:
    """Add the ``train`` and ``demo`` sub-commands to an argparse sub-parser group."""
    t = sub.add_parser("train", help="train a task model (see README: tasks)")
    t.add_argument("task", choices=sorted(TASKS))
    t.add_argument("--steps", type=int, default=None, help="optimizer steps (task default)")
    t.add_argument("--batch-size", type=int, default=None)
    t.add_argument("--lr", type=float, default=None)
    t.add_argument("--warmup", type=int, default=None)
    t.add_argument("--eval-every", type=int, default=None)
    t.add_argument("--train-size", type=int, default=None, help="training examples")
    t.add_argument("--seed", type=int, default=None)
    t.add_argument("--time-limit", type=float, default=None, help="seconds of training")
    t.add_argument("--target", type=float, default=None, help="stop at this eval score")
    t.add_argument("--threads", type=int, default=None, help="torch threads (task default)")
    t.add_argument("--out", default=None, help="checkpoints and report (runs/TASK)")
    t.add_argument("--resume", action="store_true", help="continue from OUT/last.safetensors")
    t.add_argument("--no-progress", action="store_true")
    t.set_defaults(func=train_command)
    d = sub.add_parser("demo", help="the translation task in about 3 minutes, with a report")
    d.add_argument("--out", default="attnlab-demo", help="report folder")
    d.add_argument("--seconds", type=float, default=150.0, help="training time limit")
    d.add_argument("--no-progress", action="store_true")
    d.set_defaults(func=demo_command)


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


def train_command(args: argparse.Namespace) -> int:
    """Train ``args.task`` with the command line's settings on top of the task's."""
    s = spec(args.task)
    out = args.out or f"runs/{args.task}"
    over = {k: getattr(args, k) for k in _OVERRIDES}
    cfg = train_config(s, **over, out_dir=out, resume=args.resume, progress=not args.no_progress)
    run_task(s, s.build(args.train_size), cfg, Path(out) / "report")
    return 0


def demo_command(args: argparse.Namespace) -> int:
    """A short translation run (``--seconds`` of training) with scores and a report."""
    print("attnlab demo: French number words -> English number words (num2words)")
    print("held-out numbers never appear in training; model: 2+2-layer transformer\n")
    s = spec("translation")
    cfg = train_config(
        s,
        steps=1100,
        eval_every=275,
        time_limit=args.seconds,
        out_dir=None,
        progress=not args.no_progress,
    )
    from attnlab.tasks.translation import TranslationTask

    run_task(s, TranslationTask(40_000, eval_size=200, dropout=0.0), cfg, Path(args.out))
    return 0


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
