"""``attnlab train TASK`` and ``attnlab demo``: train a task model, score it and report.

The runners call :mod:`attnlab.tasks`: :func:`~attnlab.tasks.train_config` (the task's
defaults with the command line's settings on top), :func:`~attnlab.tasks.run_task` and
:func:`~attnlab.tasks.demo`. Every option is checked before any work starts (ranges,
``--out`` writable, ``--resume`` with a readable checkpoint of the same task); ``--out``
is locked while the run writes there; a resumed run keeps its checkpoint's seed, batch
size, learning rate, warmup and the other settings that decide its steps (a warning names
each given otherwise, :mod:`attnlab.train.resume`). Ctrl-C or SIGTERM
saves ``OUT/last.safetensors`` and prints the command that resumes it.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import shlex
import sys
from pathlib import Path
from typing import Any

from attnlab._io import OutputLock
from attnlab.cli._args import check_entries, check_out_folder, check_report, float_in, int_in
from attnlab.cli._errors import UsageError, warn
from attnlab.cli._paths import user_path
from attnlab.tasks import TASKS, TaskSpec, demo, run_task, spec, train_config
from attnlab.train import CheckpointError, TrainConfig, TrainingInterrupted, load_checkpoint
from attnlab.train.loop import MAX_SEED, Task
from attnlab.train.resume import kept_message, resumed_config

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

MAX_THREADS = 256  # --threads at most
# --batch-size at most: 32x the largest task default; every step's batch is at most the
# training set anyway, and 10**8 used to be accepted (then ran each step on all of it)
MAX_BATCH_SIZE = 4096
# --train-size at most: 10**9 was accepted and generated data until the kernel killed it
MAX_TRAIN_SIZE = 1_000_000
MAX_LR = 10.0  # --lr at most: 1e30 trained on to NaN scores
TARGET_HELP = (
    "stop once an eval line's score reaches this: accuracies and success rates are "
    "fractions (0.9), generation's is 1/perplexity, the generative tasks' -Frechet"
)

PER_TASK = "(default per task: see the table below)"


class _TrainHelp(argparse.HelpFormatter):
    """``attnlab train --help`` with each task's defaults in a table at the end (the
    options said only "default per task"); read only when the help is shown."""

    def format_help(self) -> str:
        return super().format_help() + "\n" + task_defaults() + "\n"


def task_defaults() -> str:
    """A table of every task's defaults of the options that say "default per task"."""
    cols = (("steps", 6), ("batch_size", 11), ("lr", 7), ("warmup", 7), ("eval_every", 11))
    head = "".join(f"{k.replace('_', '-'):>{w}}" for k, w in cols)
    lines = [f"defaults per task:\n  {'TASK':<19}{head}  threads"]
    for name in TASKS:
        cfg = train_config(spec(name))
        row = "".join(f"{getattr(cfg, k):>{w}g}" for k, w in cols)
        lines.append(f"  {name:<19}{row}  {cfg.threads or 'torch default'}")
    return "\n".join(lines)


def add_parsers(sub: Any) -> None:
    """Add the ``train`` and ``demo`` subcommands to an argparse subparsers object."""
    positive, above0 = int_in(1), float_in(0.0, open_low=True)
    t = sub.add_parser(
        "train", help="train a task model (see README: tasks)", formatter_class=_TrainHelp
    )
    t.add_argument("task", choices=sorted(TASKS))
    t.add_argument("--steps", type=positive, default=None, help=f"optimizer steps {PER_TASK}")
    t.add_argument(
        "--batch-size",
        type=int_in(1, MAX_BATCH_SIZE),
        default=None,
        help=f"examples per step, at most {MAX_BATCH_SIZE} {PER_TASK}",
    )
    lr = float_in(0.0, MAX_LR, open_low=True)
    lr_help = f"peak learning rate in (0, {MAX_LR:g}] {PER_TASK}"
    t.add_argument("--lr", type=lr, default=None, help=lr_help)
    warmup = "steps of linear learning-rate warmup, at most --steps (a task default not below "
    warmup += "--steps becomes a tenth of them)"
    t.add_argument("--warmup", type=int_in(0), default=None, help=f"{warmup} {PER_TASK}")
    every = f"steps between evaluations (and checkpoints) {PER_TASK}"
    t.add_argument("--eval-every", type=positive, default=None, help=every)
    size = f"training examples, at most {MAX_TRAIN_SIZE} (default the task's own size)"
    t.add_argument("--train-size", type=int_in(1, MAX_TRAIN_SIZE), help=size)
    seed = f"seed of the weights and the data order, in [0, {MAX_SEED}] (default 0)"
    t.add_argument("--seed", type=int_in(0, MAX_SEED), default=None, help=seed)
    t.add_argument(
        "--time-limit",
        type=above0,
        default=None,
        help="seconds of training in this run (a resumed run counts from 0 again, "
        "as its eval lines' seconds do)",
    )
    t.add_argument("--target", type=float_in(), default=None, help=TARGET_HELP)
    t.add_argument(  # far more threads than cores only thrashes; thousands crash torch
        "--threads",
        type=int_in(1, MAX_THREADS),
        default=None,
        help=f"torch threads {PER_TASK}",
    )
    t.add_argument(
        "--out", type=user_path, default=None, help="checkpoints and report (default runs/TASK)"
    )
    t.add_argument("--resume", action="store_true", help="continue from OUT/last.safetensors")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.set_defaults(run=run_train)
    d = sub.add_parser("demo", help="the translation task (1100 steps, minutes), with a report")
    d.add_argument(
        "--out", type=user_path, default="attnlab-demo", help="report folder (default %(default)s)"
    )
    limit = "seconds of training (default none: the demo's 1100 steps)"
    d.add_argument("--seconds", type=above0, default=None, help=limit)
    d.add_argument("--no-progress", action="store_true", help="no progress bar")
    d.set_defaults(run=run_demo)


def run_train(args: argparse.Namespace) -> int:
    """``attnlab train``: the task's settings with the command line's on top."""
    s = spec(args.task)
    _check_target(args.task, s, args.target)
    out = check_out_folder("--out", f"runs/{args.task}" if args.out is None else args.out)
    check_entries("--out", out, ("last.safetensors", "best.safetensors"), ("report",))
    check_report("--out", out / "report")
    if s.max_train_size is not None and (args.train_size or 0) > s.max_train_size:
        msg = f"{args.task} makes at most {s.max_train_size} training examples"
        raise UsageError("--train-size", f"is {args.train_size}; {msg}")
    state = _check_resume(args.task, out / "last.safetensors", args)
    if args.train_size is not None:  # before the data is made (20-110 s), not after
        _check_size(state, args.train_size, args)
    at = None if state is None else int(state.get("step", 0))
    over = {k: getattr(args, k) for k in _OVERRIDES}
    cfg = train_config(
        s, **over, out_dir=str(out), resume=args.resume, progress=not args.no_progress
    )
    if state is not None:
        cfg = _run_settings(cfg, state, args, out / "last.safetensors")
    if at is not None and cfg.steps <= at:  # it trained 0 steps and said so on exit 0
        given = f"is {cfg.steps}" if args.steps is not None else f"defaults to {cfg.steps}"
        msg = f"{given}, but the checkpoint is at step {at}; give more steps to continue"
        raise UsageError("--steps", msg)
    if args.warmup is not None and cfg.warmup == args.warmup:  # (not a checkpoint's kept one)
        _check_warmup(args, cfg.steps)
    with OutputLock(out, command=_command(args)):
        if args.warmup is None and state is None and cfg.warmup >= cfg.steps:
            cfg = _short_warmup(cfg, args)  # (said once the run is sure to start)
        if not args.resume and (out / "last.safetensors").exists():
            best = " and the earlier best.safetensors removed" * (out / "best.safetensors").exists()
            msg = f"{out / 'last.safetensors'} will be overwritten{best} (--resume continues it)"
            warn(args, msg)
        # resumed without --train-size: the checkpoint's (the task's default was built,
        # 20-110 s of data, and then refused)
        task = _build(s, args.train_size if args.train_size is not None else _saved_size(state))
        _check_size(state, task.num_train(), args)
        try:
            run_task(s, task, cfg, out / "report")
        except TrainingInterrupted as e:
            print(f"attnlab train: {e}", file=sys.stderr)
            if e.checkpoint is not None:
                print(f"resume with: {_command(args, resume=True)}", file=sys.stderr)
            return 128 + int(e.signum)
    return 0


def run_demo(args: argparse.Namespace) -> int:
    """``attnlab demo``: a short translation run with scores and a report."""
    out = check_out_folder("--out", args.out)
    check_report("--out", out)
    with OutputLock(out, command=_command(args)):
        demo(out, seconds=args.seconds, progress=not args.no_progress)
    return 0


def _check_target(task: str, s: TaskSpec, target: float | None) -> None:
    """A ``--target`` outside the task's score range is never reached: ``95`` for 95%
    trained the whole run on a score in [0, 1] (the eval lines' ``exact`` is a percent)."""
    if target is None or s.score_range is None:
        return
    low, high = s.score_range
    if low <= target <= high:
        return
    if low == -math.inf:  # -Frechet: the distance itself was given
        msg = f"is {target:g}; {task} scores (-Frechet distance) are at most {high:g}, so it "
        hint = f"; did you mean {-target:g}?" if -target <= high else ""
        raise UsageError("--target", msg + "is never reached" + hint)
    hint = f"; did you mean {target / 100:g}?" if 5 * high <= target <= 100 * high else ""
    msg = f"is {target:g}; {task} scores lie in [{low:g}, {high:g}], so it is never reached"
    raise UsageError("--target", msg + hint)


def _check_warmup(args: argparse.Namespace, steps: int) -> None:
    """A ``--warmup`` longer than the run's steps keeps the learning rate below its peak
    throughout (10**12 trained 450 steps at lr ~0: exact 0.0, exit 0); equal is allowed
    (the peak comes at the last step)."""
    if args.warmup > steps:
        given = "--steps" if args.steps is not None else f"the {args.task} default"
        msg = f"is {args.warmup}, more than the run's {steps} steps ({given}): the learning "
        raise UsageError("--warmup", msg + f"rate would never reach its peak; give at most {steps}")


def _short_warmup(cfg: TrainConfig, args: argparse.Namespace) -> TrainConfig:
    """``cfg`` with a warmup of a tenth of its steps (at least 1), said in a line, when the
    task's default warmup is not shorter than ``--steps`` (``vision --steps 40`` warmed up
    for 150 steps: the learning rate never reached its peak, and nothing said so)."""
    warmup = max(1, cfg.steps // 10)
    msg = f"the {args.task} default warmup of {cfg.warmup} steps is not shorter than the "
    warn(args, msg + f"run's {cfg.steps} steps: warming up for {warmup} (--warmup sets it)")
    return dataclasses.replace(cfg, warmup=warmup)


def _check_resume(task: str, last: Path, args: argparse.Namespace) -> dict | None:
    """With ``--resume``, ``last`` must be a readable checkpoint of ``task``; its state
    (``step``, ``train_size``, ...)."""
    if not args.resume:
        return None
    if not last.is_file():
        raise UsageError("--resume", f"no checkpoint at {last}; drop --resume to start fresh")
    try:
        ckpt = load_checkpoint(last)
    except CheckpointError as e:
        raise UsageError("--resume", f"{e}; or drop --resume to start fresh") from e
    saved = ckpt.config.get("task")
    if saved is None:  # (every task's config names it; an empty one passed, and built data)
        has = f"its config has {sorted(ckpt.config)}" if ckpt.config else "its config is empty"
        msg = f"{last} names no task ({has}), so nothing shows it is a run of {task!r}"
        raise UsageError("--resume", f"{msg}; drop --resume to start fresh")
    if saved != task:
        raise UsageError("--resume", f"{last} is a checkpoint of task {saved!r}, not {task!r}")
    _check_counters(last, ckpt.state)
    return ckpt.state


def _check_counters(last: Path, state: dict) -> None:
    """The checkpoint's ``step`` and ``train_size`` must be ints (>= 0, >= 1), before any
    work: a step "x" was a bare ValueError from int() (exit 1), a train_size [1] a bare
    TypeError, and a step -5 was refused only after the data was built."""
    for key, low in (("step", 0), ("train_size", 1)):
        val = state.get(key, low)
        if isinstance(val, bool) or not isinstance(val, int) or val < low:
            msg = f"{last} holds {key}={val!r} in its state, not an int >= {low}"
            raise UsageError("--resume", f"{msg}; drop --resume to start fresh")


def _run_settings(
    cfg: TrainConfig, state: dict, args: argparse.Namespace, last: Path
) -> TrainConfig:
    """``cfg`` with a resumed run's settings that decide which steps it takes (the
    checkpoint's, :func:`~attnlab.train.resume.resumed_config`), each given otherwise on
    the command line named in a warning (they changed the data order and the schedule
    without a word; a changed --seed goes on as the agent tasks' does). One not given
    takes the checkpoint's without a word (not the task's default)."""
    try:
        cfg, changed = resumed_config(cfg, state, last)
    except CheckpointError as e:
        raise UsageError("--resume", f"{e}; or drop --resume to start fresh") from e
    for k, (kept, given) in changed.items():
        if getattr(args, k, None) is not None:
            flag = "--" + k.replace("_", "-")
            warn(args, kept_message(flag, kept, given, "drop --resume to train afresh"))
    return cfg


def _check_size(state: dict | None, size: int, args: argparse.Namespace) -> None:
    """A resumed run must build the checkpoint's training set (another size gave another
    vocabulary here: a bare state-dict size mismatch, or other data)."""
    was = None if state is None else state.get("train_size")
    if was is not None and int(was) != size:
        given = "is" if args.train_size is not None else "defaults to"
        msg = f"{given} {size}, but the checkpoint trained on {int(was)} examples; "
        raise UsageError("--train-size", msg + f"give --train-size {int(was)} to continue it")


def _saved_size(state: dict | None) -> int | None:
    """The training set size a checkpoint's state records (None: none, or not a size)."""
    was = None if state is None else state.get("train_size")
    return was if isinstance(was, int) and not isinstance(was, bool) and was >= 1 else None


def _build(s: TaskSpec, train_size: int | None) -> Task:
    """The task; a size it cannot make is a usage error of ``--train-size``."""
    try:
        return s.build(train_size)
    except ValueError as e:
        if train_size is not None and "size" in str(e):
            raise UsageError("--train-size", str(e)) from e
        raise


def _command(args: argparse.Namespace, *, resume: bool = False) -> str:
    """The command line of this run (with ``--resume`` added if asked)."""
    argv = list(getattr(args, "argv", None) or [args.command])
    if args.command == "train" and getattr(args, "argv", None) is None:
        argv += [args.task, "--out", str(args.out or f"runs/{args.task}")]
    if resume and "--resume" not in argv:
        argv.append("--resume")
    return "attnlab " + shlex.join(argv)
