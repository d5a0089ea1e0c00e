"""What :meth:`~attnlab.train.loop.Trainer.fit` runs around its steps: a rich progress bar
with loss and throughput, denormal floats flushed to zero, and a torch thread count."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

from attnlab._validate import positive_int

__all__ = ["flush_denormal", "num_threads", "progress_bar"]


@contextmanager
def flush_denormal(on: bool) -> Iterator[None]:
    """Flush denormals to zero inside the block only (torch's default, off, after it)."""
    if on:
        torch.set_flush_denormal(True)
    try:
        yield
    finally:
        if on:
            torch.set_flush_denormal(False)


class progress_bar:
    """A rich progress bar showing loss and examples/s (or nothing when disabled).

    While it shows, what the run prints to stdout (an evaluation's JSON line) goes above
    the bar through rich's console, unwrapped: a line wider than the terminal stays one
    line (it was cut by a newline at the terminal's width, breaking the JSON).
    """

    def __init__(self, enabled: bool, total: int, done: int) -> None:
        self.enabled, self.total, self.done = enabled, total, done
        self._bar: Any = None

    def __enter__(self) -> Callable[[float, float], None]:
        if self.enabled:
            from rich.console import Console
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

            self._bar = Progress(
                TextColumn("step {task.completed}/{task.total}"),
                BarColumn(),
                TextColumn("loss {task.fields[loss]:.4f}  {task.fields[speed]:.0f} ex/s"),
                TimeElapsedColumn(),
                console=Console(soft_wrap=True),  # printed lines are not cut at the width
            )
            self._bar.start()
            self._id = self._bar.add_task(
                "train", total=self.total, completed=self.done, loss=0, speed=0
            )
        return self._advance

    def _advance(self, loss: float, speed: float) -> None:
        if self._bar is not None:
            self._bar.update(self._id, advance=1, loss=loss, speed=speed)

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.stop()


MAX_THREADS = 1024  # (10**12 passed, then torch.set_num_threads: "Overflow when unpacking long")


def check_threads(n: object) -> int | None:
    """``n`` as a thread count in ``[1, MAX_THREADS]``, or None; an error naming ``threads``.

    Example:
        >>> check_threads(None), check_threads(4)
        (None, 4)
    """
    if n is None:
        return None
    count = positive_int("threads", n)
    if count > MAX_THREADS:
        raise ValueError(f"threads must be a positive int <= {MAX_THREADS} or None, got {n}")
    return count


@contextmanager
def num_threads(n: int | None) -> Iterator[None]:
    """Run the block on ``n`` torch threads (None: as is), then restore the count.

    Example:
        >>> before = torch.get_num_threads()
        >>> with num_threads(1):
        ...     torch.get_num_threads()
        1
        >>> torch.get_num_threads() == before
        True
    """
    old, count = torch.get_num_threads(), check_threads(n)
    if count is not None:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(old)
