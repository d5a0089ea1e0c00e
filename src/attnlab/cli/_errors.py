"""How every command fails: one line on stderr, an exit status, no traceback.

Exit status 2: a usage error (an argument out of range, a wrong choice, a path that
cannot be read or written, ``--resume`` without a checkpoint), found before any work
starts. Exit status 1: a failure at run time (a write that failed, an output locked by
another run, a corrupt file). 130 / 143: stopped by Ctrl-C (SIGINT) / SIGTERM. With
``--debug`` or ``ATTNLAB_DEBUG=1`` the traceback is printed too.

Example:
    >>> import argparse
    >>> def boom(args):
    ...     raise UsageError("--steps", "must be a positive int, got -5")
    >>> import sys; sys.stderr = sys.stdout  # show stderr in the doctest
    >>> run_command(argparse.Namespace(command="train", run=boom))
    attnlab train: error: argument --steps: must be a positive int, got -5
    2
    >>> sys.stderr = sys.__stderr__
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import sys
import threading
import traceback
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any, NoReturn

from attnlab._io import LockedError, WriteError
from attnlab._validate import env_mib
from attnlab.train import CheckpointError

__all__ = [
    "Parser",
    "UsageError",
    "add_debug_option",
    "debug_wanted",
    "run_command",
    "warn",
    "warnings_as_lines",
]

USAGE, FAILURE = 2, 1


class UsageError(Exception):
    """A command-line argument that is wrong (exit status 2); names the argument."""

    def __init__(self, argument: str, message: str) -> None:
        self.argument = argument
        super().__init__(f"argument {argument}: {message}")


class Parser(argparse.ArgumentParser):
    """An ``argparse`` parser whose errors are one line on stderr, exit status 2, and that
    reads ``--lr -1e-3`` as a (negative) value, not as an option."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # argparse's own pattern (3.10-3.12) misses exponents; 3.13+ has a similar one;
        # -inf and -nan too, so their range check names them ("expected one argument")
        self._negative_number_matcher = re.compile(
            r"^-((\d+\.?\d*|\.\d+)([eE][-+]?\d+)?|inf(inity)?|nan)$", re.IGNORECASE
        )

    def error(self, message: str) -> NoReturn:
        self.exit(USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that clean-ups run."""


def add_debug_option(parser: argparse.ArgumentParser, default: Any = False) -> None:
    """``--debug``, the one definition every command's parser takes (:func:`debug_wanted`
    reads it and ``ATTNLAB_DEBUG``); ``default=argparse.SUPPRESS`` on a subcommand keeps
    a ``--debug`` given before the command."""
    text = "print the traceback of an error (or set ATTNLAB_DEBUG=1)"
    parser.add_argument("--debug", action="store_true", default=default, help=text)


def debug_wanted(args: argparse.Namespace) -> bool:
    """``--debug`` on the command line or ``ATTNLAB_DEBUG`` set (not ``0``)."""
    env = os.environ.get("ATTNLAB_DEBUG", "").strip().lower()
    return bool(getattr(args, "debug", False)) or env not in ("", "0", "false", "no")


def warn(args: argparse.Namespace, message: str) -> None:
    """One warning line on stderr, prefixed with the command."""
    print(f"attnlab {getattr(args, 'command', '')}: warning: {message}", file=sys.stderr)


@contextmanager
def warnings_as_lines(args: argparse.Namespace) -> Iterator[None]:
    """Record the Python warnings raised in the block (a text cut to the model's length,
    ...) and print each distinct message once after it, as a :func:`warn` line, not in
    Python's two-line ``file:line: UserWarning`` format."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    for message in dict.fromkeys(str(w.message) for w in caught):
        warn(args, message)


# the MiB limits a command may read from the environment (their defaults are their
# readers': engines._native's pool, engines.zeros' cache; here only set values are checked)
ENV_MIB = ("ATTNLAB_KERNEL_POOL_MB", "ATTNLAB_ZEROS_CACHE_MB")
# the folders it may write, when set (tasks.generative's cache of the scoring ViT: a file
# there failed after minutes of training, "File exists", exit 1)
ENV_FOLDERS = ("ATTNLAB_CACHE",)


def run_command(args: argparse.Namespace) -> int:
    """Run ``args.run(args)``; any error becomes one line on stderr and an exit status."""
    prog = f"attnlab {getattr(args, 'command', '')}".strip()
    try:  # the settings read from the environment, before any work (a bad pool size
        for name in ENV_MIB:  # failed when the kernel first ran: tour printed 35 lines,
            env_mib(name, 0)  # then exit 1); unset: the 0 is not used
        _check_env_folders()
    except ValueError as e:
        return _fail(args, f"{prog}: error: {e}", USAGE)
    except UsageError as e:  # a setting, not an argument
        return _fail(args, f"{prog}: error: {str(e).removeprefix('argument ')}", USAGE)
    try:
        with _sigterm_as_interrupt(), _one_line_warnings(args):
            return int(args.run(args))
    except UsageError as e:
        return _fail(args, f"{prog}: error: {e}", USAGE)
    except KeyboardInterrupt as e:  # a trainer's stop carries its signal (demo, robust
        # reported a SIGTERM as SIGINT, 130)
        default = signal.SIGTERM if isinstance(e, _Terminated) else signal.SIGINT
        signum = signal.Signals(getattr(e, "signum", default))
        why = f"{prog}: interrupted ({signum.name}); files are written whole or not at all"
        return _fail(args, why, 128 + int(signum))
    except (WriteError, LockedError, CheckpointError) as e:
        return _fail(args, f"{prog}: error: {e}", FAILURE)
    except PermissionError as e:  # a path the checks could not see into, or written later
        why = f"{prog}: error: cannot access {e.filename!r}: permission denied"
        return _fail(args, why, FAILURE)
    except ModuleNotFoundError as e:
        return _fail(args, f"{prog}: error: {e} (an optional dependency is missing)", FAILURE)
    except BrokenPipeError:  # the reader went away (`| head`): stop quietly
        _silence_stdout()
        return FAILURE
    except Exception as e:
        line = f"{prog}: error: {type(e).__name__}: {e}"
        return _fail(args, line, FAILURE, hint=" (--debug or ATTNLAB_DEBUG=1 shows the traceback)")


def _check_env_folders() -> None:
    """Each folder of :data:`ENV_FOLDERS` that is set can be one: not a file, reachable,
    writable or creatable (a :class:`UsageError` naming the variable)."""
    from attnlab.cli._args import check_out_folder  # (_args imports this module)

    for name in ENV_FOLDERS:
        if os.environ.get(name):
            check_out_folder(name, os.path.expanduser(os.environ[name]))  # as read


def _fail(args: argparse.Namespace, line: str, code: int, *, hint: str = "") -> int:
    """Print ``line`` (as one line) and, when debugging, the traceback first."""
    if debug_wanted(args):
        traceback.print_exc()
    print(" ".join(line.split("\n")) + ("" if debug_wanted(args) else hint), file=sys.stderr)
    return code


def _silence_stdout() -> None:
    """Point stdout at /dev/null so that the flush at exit does not fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # pragma: no cover - no real stdout
        pass


@contextmanager
def _one_line_warnings(args: argparse.Namespace) -> Iterator[None]:
    """Python warnings as they come, each a :func:`warn` line (they were Python's two
    lines, ``file:line: UserWarning: ...`` and the source line)."""
    before = warnings.showwarning

    def show(message: Warning | str, *rest: Any, **kw: Any) -> None:
        warn(args, " ".join(str(message).split()))

    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = before


@contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """Inside the block SIGTERM raises like Ctrl-C, so clean-ups run (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: FrameType | None) -> None:
        raise _Terminated

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)
