"""``attnlab train TASK`` and ``attnlab demo``: train a task model, score it and report.

The runners call :mod:`attnlab.tasks`: :func:`~attnlab.tasks.train_config` (the task's
defaults with the command line's settings on top), :func:`~attnlab.tasks.run_task` and
:func:`~attnlab.tasks.demo`.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from attnlab.tasks import TASKS, demo, run_task, spec, train_config

__all__ = ["add_parsers", "run_demo", "run_train"]

# options of ``attnlab train`` that override the task's TrainConfig defaults when given
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
    """Add the ``train`` and ``demo`` subcommands to an argparse subparsers object."""
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
    t.set_defaults(run=run_train)
    d = sub.add_parser("demo", help="the translation task in about 3 minutes, with a report")
    d.add_argument("--out", default="attnlab-demo", help="report folder")
    d.add_argument("--seconds", type=float, default=150.0, help="training time limit")
    d.add_argument("--no-progress", action="store_true")
    d.set_defaults(run=run_demo)


def run_train(args: argparse.Namespace) -> int:
    """``attnlab train``: the task's settings with the command line's on top."""
    s = spec(args.task)
    out = args.out or f"runs/{args.task}"
    over = {k: getattr(args, k) for k in _OVERRIDES}
    cfg = train_config(s, **over, out_dir=out, resume=args.resume, progress=not args.no_progress)
    run_task(s, s.build(args.train_size), cfg, Path(out) / "report")
    return 0


def run_demo(args: argparse.Namespace) -> int:
    """``attnlab demo``: a short translation run with scores and a report."""
    demo(args.out, seconds=args.seconds, progress=not args.no_progress)
    return 0
