"""Which forward passes a regularizer listed around an adversarial plug-in reads.

``Trainer(..., plugins=[a, b])`` runs ``b`` around ``a``. An adversarial plug-in makes
several forward passes per step and spends the graphs of most of them itself (an attack
step's ``autograd.grad``, FGM's clean ``backward``, FreeLB's first ``K - 1`` passes). A
regularizer around it adds its term to the loss the plug-in returns, so it reads the
attention of one pass only: the one the plug-in trains on. The plug-in runs every other
pass inside :func:`hidden_pass`, and :func:`visible_calls` (what the regularizers capture
with) leaves out the calls made there. A regularizer listed inside the plug-in
(``plugins=[EntropyRegularizer(0.01), FGM(0.5)]``) is called once per pass instead, and
adds its term to each.

Thread-local: a pass hidden in one thread hides nothing from another's capture.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from torch import nn

from attnlab.interpret import Captured, capture

__all__ = ["hidden_pass", "visible_calls"]

_LOCAL = threading.local()


class _Reader:
    """One open :func:`visible_calls`: its capture, the calls kept, how deep in hidden passes."""

    def __init__(self, cap: capture) -> None:
        self.cap, self.seen, self.hidden = cap, 0, 0
        self.kept: list[Captured] = []

    def sync(self) -> None:
        """Take the calls recorded since the last look: kept, unless inside a hidden pass."""
        new = self.cap.records[self.seen :]
        if self.hidden == 0:
            self.kept.extend(new)
        self.seen += len(new)


def _readers() -> list[_Reader]:
    if not hasattr(_LOCAL, "readers"):
        _LOCAL.readers = []
    readers: list[_Reader] = _LOCAL.readers
    return readers


@contextmanager
def hidden_pass() -> Iterator[None]:
    """Forward passes inside the block are left out by every :func:`visible_calls` already
    open (a regularizer around the plug-in); one opened inside the block sees them.

    Example:
        >>> import torch
        >>> from attnlab.nn import MultiHeadAttention
        >>> mha, x = MultiHeadAttention(8, 2), torch.randn(1, 3, 8)
        >>> with visible_calls(mha) as calls:
        ...     with hidden_pass():
        ...         _ = mha(x)  # an attack step: left out
        ...     _ = mha(x)  # the pass the loss comes from
        >>> len(calls)
        1
    """
    readers = list(_readers())
    for r in readers:
        r.sync()
        r.hidden += 1
    try:
        yield
    finally:
        for r in readers:
            r.sync()
            r.hidden -= 1


@contextmanager
def visible_calls(
    model: nn.Module, layers: Sequence[str] | None = None
) -> Iterator[list[Captured]]:
    """``capture(model, layers=layers, grad=True)``, but the list it gives holds (once the
    block has closed) only the calls made outside the :func:`hidden_pass` blocks opened
    inside it.

    Example:
        >>> import torch
        >>> from attnlab.nn import MultiHeadAttention
        >>> mha = MultiHeadAttention(8, 2)
        >>> with visible_calls(mha) as calls:
        ...     _ = mha(torch.randn(2, 3, 8))
        >>> [tuple(c.weights.shape) for c in calls], calls[0].weights.requires_grad
        ([(2, 2, 3, 3)], True)
    """
    with capture(model, layers=layers, grad=True) as cap:
        reader = _Reader(cap)
        _readers().append(reader)
        try:
            yield reader.kept
        finally:
            _readers().remove(reader)
            reader.sync()
