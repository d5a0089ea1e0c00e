"""A module put in eval mode for a block, and back in the mode it had after it."""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

__all__ = ["eval_mode"]

_LOCK = threading.RLock()  # (a module's own train() may open a block itself)
# module -> [blocks open on it, each submodule's mode before the first]: blocks that
# overlap (in several threads) share one switch to eval, undone when the last one ends
_OPEN: weakref.WeakKeyDictionary[nn.Module, list] = weakref.WeakKeyDictionary()


@contextmanager
def eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    """``module`` in eval mode inside the block (no dropout; batch norm reads its running
    statistics and leaves them as they are), in the mode it had after it, even on an error.

    Each submodule gets its own mode back (a submodule left in eval mode in a training
    model stays so), a model already in eval mode is not touched, and blocks that overlap
    in several threads keep the model in eval mode until the last of them ends.

    Example:
        >>> net = nn.Sequential(nn.Dropout(0.5))
        >>> with eval_mode(net) as m:
        ...     m.training
        False
        >>> net.training
        True
    """
    with _LOCK:
        state = _OPEN.get(module)
        if state is None:
            modes = [(m, m.training) for m in module.modules()]
            state = _OPEN[module] = [0, modes]
            if any(mode for _, mode in modes):
                module.eval()
        state[0] += 1
    try:
        yield module
    finally:
        with _LOCK:
            state[0] -= 1
            if state[0] == 0:
                del _OPEN[module]
                _restore(module, state[1])


def _restore(module: nn.Module, modes: list[tuple[nn.Module, bool]]) -> None:
    """Give each submodule the mode it had (through ``train`` where the root had one, so a
    module's own ``train`` runs, then one by one)."""
    if not any(mode for _, mode in modes):
        return
    module.train(modes[0][1])
    for m, mode in modes:
        if m.training != mode:
            m.training = mode
