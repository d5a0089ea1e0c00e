"""``attnlab engines``: the registered engines, exact or approximate, and what they support."""

from __future__ import annotations

import argparse
from typing import Any

from attnlab.engines import available_engines
from attnlab.engines.flex import cpu_compile_problem

__all__ = ["add_parsers", "print_engines", "run"]


def add_parsers(sub: Any) -> None:
    """Add the ``engines`` subcommand to an argparse subparsers object."""
    p = sub.add_parser("engines", help="list the engines and what they support")
    p.set_defaults(run=run)


def print_engines() -> None:
    """One line per engine: name, exact or approximate, summary, and the
    ``engine_options`` it takes (from the engine itself)."""
    for name, eng in available_engines().items():
        kind = "exact" if eng.exact else "approximate"
        opts = f"; engine_options: {', '.join(eng.options)}" if eng.options else ""
        print(f"{name:<10} {kind:<11} {eng.summary}{opts}{_here(name)}")


def _here(name: str) -> str:
    """What keeps an engine from its usual work in this process (flex where torch cannot
    compile it for the CPU: listed as any other engine, then refused when called)."""
    problem = cpu_compile_problem() if name == "flex" else None
    return f" [here on the CPU: {problem}; compile=False runs it uncompiled]" if problem else ""


def run(args: argparse.Namespace) -> int:
    """``attnlab engines``."""
    print_engines()
    return 0
