"""Stopping a training run by Ctrl-C (SIGINT) or SIGTERM without losing it.

Inside :func:`stop_requests` the first SIGINT or SIGTERM is only recorded: the trainer
finishes its step, saves ``last.safetensors`` atomically and raises
:class:`TrainingInterrupted`. A second signal raises :class:`StoppedAtOnce` (a
``KeyboardInterrupt`` that names the signal) at once; the
checkpoint on disk is never half-written (writes go to a temporary file renamed over it),
so the last complete one survives.

Example:
    >>> import os, signal
    >>> with stop_requests() as requested:
    ...     os.kill(os.getpid(), signal.SIGTERM)  # recorded, not fatal
    ...     requested() == signal.SIGTERM
    True
"""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType

__all__ = ["StoppedAtOnce", "TrainingInterrupted", "say_complete", "stop_requests"]

_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class TrainingInterrupted(KeyboardInterrupt):
    """Training stopped by a signal after saving a final checkpoint.

    Attributes:
        step: optimizer steps done (the checkpoint's step).
        checkpoint: the ``last.safetensors`` written, or None (no ``out_dir``).
        signum: the signal (``signal.SIGINT`` or ``signal.SIGTERM``).

    Example:
        >>> e = TrainingInterrupted(120, Path("run/last.safetensors"), signal.SIGTERM)
        >>> str(e)
        'training stopped by SIGTERM at step 120; saved run/last.safetensors'
        >>> isinstance(e, KeyboardInterrupt), e.step  # uncaught, it ends a run as Ctrl-C does
        (True, 120)
    """

    def __init__(self, step: int, checkpoint: Path | None, signum: int) -> None:
        self.step, self.checkpoint, self.signum = step, checkpoint, signum
        saved = f"saved {checkpoint}" if checkpoint else "no checkpoint (no out_dir)"
        super().__init__(
            f"training stopped by {signal.Signals(signum).name} at step {step}; {saved}"
        )


class StoppedAtOnce(KeyboardInterrupt):
    """A second signal inside :func:`stop_requests`: stopped at once, no checkpoint saved.

    Attributes:
        signum: the second signal (a command exits ``128 + signum``: a process manager's
            second SIGTERM was reported as SIGINT, 130).

    Example:
        >>> e = StoppedAtOnce(signal.SIGTERM)
        >>> str(e), e.signum == signal.SIGTERM, isinstance(e, KeyboardInterrupt)
        ('a second signal, SIGTERM: stopped at once', True, True)
    """

    def __init__(self, signum: int) -> None:
        self.signum = signum
        super().__init__(f"a second signal, {signal.Signals(signum).name}: stopped at once")


@contextmanager
def stop_requests(*, saving: bool = True) -> Iterator[Callable[[], int | None]]:
    """Record the first SIGINT/SIGTERM inside the block; a second one raises
    :class:`StoppedAtOnce`. Yields a function returning the recorded signal (or None).
    Outside the main thread (where Python cannot set handlers) nothing is installed.
    ``saving``: whether a checkpoint is written on the way out (the message says so only
    then: runs without an output folder promised one they never wrote)."""
    got: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield lambda: None
        return

    def handler(signum: int, frame: FrameType | None) -> None:
        if got:
            raise StoppedAtOnce(signum)
        got.append(signum)
        then = " and saving a checkpoint" if saving else ""
        _say(f"\n{signal.Signals(signum).name}: stopping after this step{then}")
        again = "press Ctrl-C again" if signum == signal.SIGINT else "a second signal or Ctrl-C"
        _say(f" ({again} to stop at once)\n")

    old = {s: signal.signal(s, handler) for s in _SIGNALS}
    try:
        yield lambda: got[0] if got else None
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def say_complete(signum: int, step: int) -> None:
    """Say that a signal came during a run's last step (or one that ended it early): the
    run is complete and saved, there is nothing to resume, and what follows (a command's
    held-out scores and report) goes on; outside :func:`stop_requests` a signal again
    stops at once."""
    name = signal.Signals(signum).name
    _say(f"{name}: the step it came in ended the run: training is complete at step {step}\n")


def _say(text: str) -> None:
    """Write to stderr from a signal handler (a re-entrant write is skipped, not fatal)."""
    try:
        sys.stderr.write(text)
        sys.stderr.flush()
    except (RuntimeError, OSError, ValueError):
        pass
