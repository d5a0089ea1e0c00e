"""The attention mechanism of transformer models: complete, fast and visible.

``attnlab demo|train|tour|engines|info|embed|attend|explain|ask|summarize|serve|robust|bench``.

One module per command or small group of commands (``tour``, ``train`` + ``demo``,
``engines``, ``embed`` + ``attend``, ``explain``, ``ask`` + ``summarize``, ``serve``,
``robust``, ``bench``): its ``add_parsers(sub)`` adds the subparsers and sets each one's
``run`` default to a thin runner, ``args -> exit status``, that calls library functions
(:mod:`attnlab.tasks`, :mod:`attnlab.models`, :mod:`attnlab.interpret`, :mod:`attnlab.apps`,
:mod:`attnlab.robust`, :mod:`attnlab.serve`, :mod:`attnlab.bench`). :func:`main` parses the
command line and runs every command through one place, :func:`_run`.

Example:
    >>> main(["engines"])  # doctest: +ELLIPSIS
    reference ...
    0
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import attnlab
from attnlab.cli import ask, bench, embed, engines, explain, info, robust, serve, tour, train
from attnlab.cli._errors import Parser, add_debug_option, run_command

__all__ = ["build_parser", "main", "parse_args"]

# in the order of ``attnlab --help``
_COMMANDS = (tour, train, engines, info, embed, explain, ask, serve, robust, bench)


def build_parser() -> argparse.ArgumentParser:
    """The ``attnlab`` argument parser (its errors are one line, exit status 2)."""
    parser = Parser(prog="attnlab", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=attnlab.__version__)
    add_debug_option(parser)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    for command in _COMMANDS:
        command.add_parsers(sub)
    for p in sub.choices.values():  # `attnlab CMD ... --debug` works too
        add_debug_option(p, default=argparse.SUPPRESS)
    return parser


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """The parsed command line; ``args.run`` is the command's runner.

    ``attnlab bench ...`` is parsed by the benchmark's own parser, the one that
    ``benchmarks/bench_core.py`` uses, so both print the same usage and errors.
    """
    if list(argv[:1]) == ["bench"]:
        return bench.parse_args(argv[1:])
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # the command's parser names it (the top level said "attnlab: error: ..."),
        # unless it came before the command (the top level's options take no values)
        before = set(argv[: list(argv).index(args.command)])
        named = parser if before & set(extra) else _command_parser(parser, args.command)
        named.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def _command_parser(parser: argparse.ArgumentParser, command: str) -> argparse.ArgumentParser:
    """The subcommand ``command``'s parser in ``parser`` (from :func:`build_parser`)."""
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    found: argparse.ArgumentParser = sub.choices[command]
    return found


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status (``--help`` and parse errors included)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    _printable_output()
    try:
        args = parse_args(argv)
    except SystemExit as e:  # --help, --version, or a usage error already printed
        return e.code if isinstance(e.code, int) else 2
    args.argv = argv
    return _run(args)


def _printable_output() -> None:
    """Characters the terminal's encoding lacks (a cp1252 console, ``PYTHONIOENCODING``)
    are written as escapes: an answer with "東京" raised UnicodeEncodeError after all the
    work, and nothing was printed. An ASCII locale with UTF-8 mode off gives stdout
    ``surrogateescape``, which fails alike on any non-ASCII character."""
    for stream in (sys.stdout, sys.stderr):
        reconfigure = getattr(stream, "reconfigure", None)  # (a test's StringIO has none)
        errors = getattr(stream, "errors", "strict")
        if reconfigure is not None and errors in ("strict", "surrogateescape"):
            reconfigure(errors="backslashreplace")


def _run(args: argparse.Namespace) -> int:
    """The one place where every command runs: errors become one line and a status."""
    return run_command(args)
