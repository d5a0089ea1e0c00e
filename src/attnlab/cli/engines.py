"""``attnlab engines``: the registered engines, exact or approximate, and what they support."""

from __future__ import annotations

import argparse
from typing import Any

from attnlab.engines import available_engines

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
        print(f"{name:<10} {kind:<11} {eng.summary}{opts}")


def run(args: argparse.Namespace) -> int:
    """``attnlab engines``."""
    print_engines()
    return 0
