"""``attnlab robust TASK``: train the baseline and the robust variants of a task with the
same budget, then write a table and a report (:mod:`attnlab.robust`'s studies).

Tasks: ``vision`` (ViT on digits under PGD; plain, fgm, pgd, pgd_mixed, freelb), ``shortcut`` (a
reversed cue in the classification task; plain, entropy, supervised), ``dates``
(character edits; plain, freelb, edits, adv_edits) and ``faithfulness`` (Jain & Wallace's and
Wiegreffe & Pinter's tests on the classification and dates models). Every option is
checked before any work starts; ``--out`` is locked while the run writes there, and
``table.json``, ``table.md`` and ``report.html`` are written whole or not at all.
"""

from __future__ import annotations

import argparse
import shlex
from typing import Any

from attnlab._io import OutputLock
from attnlab.cli._args import check_entries, check_out_folder, int_in, shown
from attnlab.cli._errors import UsageError
from attnlab.cli._paths import user_path
from attnlab.train.loop import MAX_SEED

__all__ = ["METHODS", "add_parsers", "run_robust"]

METHODS = {
    "vision": ("plain", "fgm", "pgd", "pgd_mixed", "freelb"),
    "shortcut": ("plain", "entropy", "supervised"),
    "dates": ("plain", "freelb", "edits", "adv_edits"),
    "faithfulness": ("classification", "dates"),
}

# the studies' own steps per row (their functions' defaults; a test holds them equal)
_STUDY_STEPS = {"vision": 800, "shortcut": 400, "dates": 450}
_STEPS_HELP = (
    "training steps per row of vision, shortcut or dates (default "
    + ", ".join(f"{task} {n}" for task, n in _STUDY_STEPS.items())
    + "); faithfulness refuses it: it trains each model with its task's steps"
)


def add_parsers(sub: Any) -> None:
    """Add the ``robust`` subcommand to an argparse subparsers object."""
    r = sub.add_parser("robust", help="adversarial training and attention studies (a table)")
    r.add_argument("task", choices=sorted(METHODS))
    r.add_argument(
        "--method",
        default=None,
        help="comma list of rows (default all): vision: plain,fgm,pgd,pgd_mixed,freelb; "
        "shortcut: plain,entropy,supervised; dates: plain,freelb,edits,adv_edits; "
        "faithfulness: classification,dates",
    )
    r.add_argument("--steps", type=int_in(1), default=None, help=_STEPS_HELP)
    r.add_argument(
        "--seed",
        type=int_in(0, MAX_SEED),
        default=0,
        help="seed of every row (default %(default)s)",
    )
    r.add_argument(
        "--out",
        type=user_path,
        default=None,
        help="table and report folder (default runs/robust-TASK)",
    )
    r.add_argument("--smoke", action="store_true", help="tiny data and models: checks only")
    r.set_defaults(run=run_robust)


def _methods(task: str, text: str | None) -> tuple[str, ...]:
    """The rows asked for, each one of the task's methods (a usage error otherwise)."""
    allowed = METHODS[task]
    if text is None:
        return allowed
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    bad = [n for n in names if n not in allowed]
    twice = [n for n in names if names.count(n) > 1]
    if twice:  # (the row was trained twice and the table held it twice)
        raise UsageError("--method", f"names {twice[0]!r} twice; give each row once")
    if bad or not names:
        raise UsageError(
            "--method", f"{bad[0] if bad else text!r} is not one of {', '.join(allowed)} for {task}"
        )
    return names


def run_robust(args: argparse.Namespace) -> int:
    """Run the study of ``args.task`` and write its table and report into ``--out``."""
    methods = _methods(args.task, args.method)
    if args.task == "faithfulness" and args.steps is not None:
        raise UsageError("--steps", "faithfulness trains each model with its task's steps")
    if args.smoke and args.steps is not None:  # --smoke set its own steps, --steps unread
        raise UsageError("--steps", "and --smoke both set the steps; give one of them")
    out = check_out_folder("--out", f"runs/robust-{args.task}" if args.out is None else args.out)
    check_entries("--out", out, ("table.json", "table.md", "table.png", "report.html"))
    command = "attnlab " + shlex.join(getattr(args, "argv", None) or ["robust", args.task])
    steps = {} if args.steps is None else {"steps": args.steps}
    with OutputLock(out, command=command):
        if args.task == "vision":
            from attnlab.robust.study_vision import vision_study

            vision_study(methods, seed=args.seed, smoke=args.smoke, out=out, **steps)
        elif args.task == "shortcut":
            from attnlab.robust.study_shortcut import shortcut_study

            shortcut_study(methods, seed=args.seed, smoke=args.smoke, out=out, **steps)
        elif args.task == "dates":
            from attnlab.robust.study_dates import dates_study

            dates_study(methods, seed=args.seed, smoke=args.smoke, out=out, **steps)
        else:
            from attnlab.robust.study_faithfulness import faithfulness_study

            faithfulness_study(methods, seed=args.seed, smoke=args.smoke, out=out)
    print(f"table and report: {shown(out / 'table.md')}, {shown(out / 'report.html')}")
    return 0
