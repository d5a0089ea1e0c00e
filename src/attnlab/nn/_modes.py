"""A module put in eval mode for a block, and back in the mode it had after it."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

__all__ = ["eval_mode"]


@contextmanager
def eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    """``module`` in eval mode inside the block (no dropout; batch norm reads its running
    statistics and leaves them as they are), in the mode it had after it, even on an error.

    Example:
        >>> net = nn.Sequential(nn.Dropout(0.5))
        >>> with eval_mode(net) as m:
        ...     m.training
        False
        >>> net.training
        True
    """
    was = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was)
