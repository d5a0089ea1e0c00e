"""A mask from a user function of ``(b, h, q_pos, k)``."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from attnlab._grid import Grid
from attnlab._validate import check_broadcast, validate_flag
from attnlab.masks.base import Mask

__all__ = ["Custom", "MaskFn", "custom"]

MaskFn = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]


class Custom(Mask):
    """``fn(b, h, q_pos, k) -> bool``. Build with :func:`custom`.

    Not :attr:`~attnlab.masks.Mask.elementwise`: engines hand ``fn`` one tile-shaped grid
    at a time, the form it is documented to receive.

    Example:
        >>> m = custom(lambda b, h, q, k: k <= q + h, per_batch=False)  # head h: h ahead
        >>> isinstance(m, Custom), m.elementwise, m.per_head
        (True, False, True)
        >>> m.dense(2, 2, heads=2)[0].int().tolist()
        [[[1, 0], [1, 1]], [[1, 1], [1, 1]]]
    """

    elementwise = False

    def __init__(self, fn: MaskFn, per_batch: bool, per_head: bool) -> None:
        if not callable(fn):
            raise TypeError(
                f"fn must be callable (b, h, q_pos, k) -> bool tensor, got {type(fn).__name__}"
            )
        per_batch, per_head = (
            validate_flag("per_batch", per_batch),
            validate_flag("per_head", per_head),
        )
        self.fn, self._per_batch, self.per_head = fn, per_batch, per_head

    @property
    def per_batch(self) -> bool:
        return self._per_batch

    def evaluate(self, grid: Grid) -> Tensor:
        coords = (grid.b, grid.h, grid.q, grid.k)
        out = self.fn(*coords)
        if not isinstance(out, Tensor) or out.dtype != torch.bool:
            raise TypeError(
                f"mask={self.spec()}: custom mask fn must return a bool tensor, got "
                f"{getattr(out, 'dtype', type(out).__name__)}"
            )
        check_broadcast(f"mask={self.spec()}", out, coords, "a bool tensor")
        return out

    def spec(self) -> str:
        return f"custom({getattr(self.fn, '__name__', 'fn')})"


def custom(fn: MaskFn, *, per_batch: bool = True, per_head: bool = True) -> Mask:
    """A mask from ``fn(b, h, q_pos, k) -> bool tensor`` on broadcastable index tensors.

    ``q_pos`` is the query *position* (row + Lk - Lq). Set ``per_batch``/``per_head`` to
    False when ``fn`` ignores ``b``/``h``: it is then evaluated once for all of them.

    Example:
        >>> m = custom(lambda b, h, q, k: (q - k) % 2 == 0, per_batch=False, per_head=False)
        >>> m.dense(2, 2)[0, 0].tolist()
        [[True, False], [False, True]]
    """
    return Custom(fn, per_batch, per_head)
