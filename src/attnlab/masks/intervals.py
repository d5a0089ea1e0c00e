"""Masks that allow an interval of keys per query row: causal, window, prefix, dilated.

Each reports its exact interval through :meth:`~attnlab.masks.Mask.row_bounds`, so block
layouts come from intervals and the blocked engine masks by spans without evaluating
tiles (a dilated window with ``dilation > 1`` reports its window as an outer bound: its
tiles are evaluated only inside it).
"""

from __future__ import annotations

import torch
from torch import Tensor

from attnlab._grid import Grid
from attnlab.masks._args import SIZE_CAP, nonneg_int, pos_int, positions, size
from attnlab.masks._args import size as _size
from attnlab.masks.base import Mask
from attnlab.masks.layout import Device, RowBounds

__all__ = [
    "Causal",
    "ChunkWindow",
    "Dilated",
    "Prefix",
    "Window",
    "causal",
    "chunk_window",
    "dilated",
    "prefix",
    "window",
]


class Causal(Mask):
    """Query position ``p`` sees keys ``k <= p``. Build with :func:`causal`.

    Example:
        >>> m = causal()
        >>> isinstance(m, Causal), m.is_causal
        (True, True)
        >>> m.row_bounds(3, 3).hi.tolist()  # the last key of each row
        [[0, 1, 2]]
    """

    is_causal = True

    def evaluate(self, grid: Grid) -> Tensor:
        return grid.k <= grid.q

    def row_bounds(self, lq: int, lk: int, batch: int = 1, device: Device = None) -> RowBounds:
        p = positions(lq, lk, 1, device)
        return RowBounds(torch.zeros_like(p), p, exact=True)

    def spec(self) -> str:
        return "causal()"


class Window(Mask):
    """Query position ``p`` sees keys ``p - left <= k <= p + right``. See :func:`window`.

    Example:
        >>> m = Window(left=1, right=0)
        >>> m.spec()
        'window(left=1, right=0)'
        >>> bounds = m.row_bounds(3, 3)  # each row's key interval, exact
        >>> bounds.lo.tolist(), bounds.hi.tolist(), bounds.exact
        ([[-1, 0, 1]], [[0, 1, 2]], True)
    """

    def __init__(self, left: int, right: int) -> None:
        self.left, self.right = size("left", left), size("right", right)

    def evaluate(self, grid: Grid) -> Tensor:
        return (grid.k >= grid.q - self.left) & (grid.k <= grid.q + self.right)

    def row_bounds(self, lq: int, lk: int, batch: int = 1, device: Device = None) -> RowBounds:
        p = positions(lq, lk, 1, device)
        return RowBounds(p - self.left, p + self.right, exact=True)

    def spec(self) -> str:
        return f"window(left={self.left}, right={self.right})"


class Prefix(Mask):
    """Every query sees keys ``k < n``; past the prefix it is causal. See :func:`prefix`.

    Example:
        >>> m = prefix(2)
        >>> m.n, m.dense(4, 4)[0, 0].sum(-1).tolist()  # keys seen by each row
        (2, [2, 2, 3, 4])
    """

    def __init__(self, n: int) -> None:
        self.n = size("n", n)

    def evaluate(self, grid: Grid) -> Tensor:
        return (grid.k < self.n) | (grid.k <= grid.q)

    def row_bounds(self, lq: int, lk: int, batch: int = 1, device: Device = None) -> RowBounds:
        p = positions(lq, lk, 1, device)
        return RowBounds(torch.zeros_like(p), torch.clamp(p, min=self.n - 1), exact=True)

    def spec(self) -> str:
        return f"prefix({self.n})"


class ChunkWindow(Mask):
    """Positions in chunks of ``size`` (position ``p`` in chunk ``(p + start) // size``);
    a query sees its own chunk's keys and the ``back`` chunks' before. See
    :func:`chunk_window`. Only ``start % size`` places the chunks: that is what it keeps.

    Example:
        >>> bounds = ChunkWindow(size=2, back=1, start=0).row_bounds(4, 4)
        >>> bounds.lo.tolist(), bounds.hi.tolist(), bounds.exact
        ([[-2, -2, 0, 0]], [[1, 1, 3, 3]], True)
        >>> ChunkWindow(size=5, back=0, start=2**63 - 1).start
        2
    """

    def __init__(self, size: int, back: int, start: int) -> None:
        whole = pos_int("size", size)
        self.size, self.back = min(whole, SIZE_CAP), _size("back", back)
        self.start = _phase(whole, nonneg_int("start", start))

    def _chunk(self, p: Tensor) -> Tensor:
        return torch.div(p + self.start, self.size, rounding_mode="floor")

    def evaluate(self, grid: Grid) -> Tensor:
        behind = self._chunk(grid.q) - self._chunk(grid.k)  # chunks from the key's to the query's
        return (behind >= 0) & (behind <= self.back)

    def row_bounds(self, lq: int, lk: int, batch: int = 1, device: Device = None) -> RowBounds:
        chunk = self._chunk(positions(lq, lk, 1, device))
        first = chunk * self.size - self.start  # each row's chunk's first position
        oldest = torch.clamp(chunk - self.back, min=-1)  # chunk -1 is before key 0: all
        return RowBounds(oldest * self.size - self.start, first + self.size - 1, exact=True)

    def spec(self) -> str:
        return f"chunk_window(size={self.size}, back={self.back}, start={self.start})"


def _phase(size: int, start: int) -> int:
    """The ``start`` of chunks of ``min(size, SIZE_CAP)`` positions whose boundaries below
    :data:`SIZE_CAP` are those of chunks of ``size`` from ``start``: ``start % size`` (a
    capped size keeps the one boundary below the cap, at ``size - start % size``).

    Example:
        >>> _phase(5, 2**63 - 1), _phase(3 * 2**61, 3 * 2**61 - 7) == SIZE_CAP - 7
        (2, True)
    """
    rest = start % size  # (clamping start to SIZE_CAP, as a size is, moved the chunks)
    return rest if size <= SIZE_CAP else max(SIZE_CAP - (size - rest), 0)


class Dilated(Mask):
    """Keys with ``|p - k| <= window`` and ``(p - k) % dilation == 0``. See :func:`dilated`.

    Example:
        >>> dilated(2, 2).row_bounds(4, 4).exact  # gaps: only an outer bound per row
        False
        >>> dilated(1, 1).row_bounds(3, 3).hi.tolist()  # dilation 1 is a window
        [[1, 2, 3]]
    """

    def __init__(self, window: int, dilation: int) -> None:
        self.window = size("window", window)
        self.dilation = size("dilation", dilation, positive=True)

    def evaluate(self, grid: Grid) -> Tensor:
        d = grid.q - grid.k
        return (d.abs() <= self.window) & (torch.remainder(d, self.dilation) == 0)

    def row_bounds(
        self, lq: int, lk: int, batch: int = 1, device: Device = None
    ) -> RowBounds | None:
        p = positions(lq, lk, 1, device)  # with gaps (dilation > 1), an outer bound only:
        return RowBounds(p - self.window, p + self.window, exact=self.dilation == 1)

    def spec(self) -> str:
        return f"dilated(window={self.window}, dilation={self.dilation})"


def causal() -> Mask:
    """Causal mask: query position ``p`` sees keys ``k <= p`` (bottom-right aligned).

    Example:
        >>> causal().dense(1, 3)[0, 0].tolist()   # one new token sees the whole history
        [[True, True, True]]
    """
    return Causal()


def window(left: int, right: int = 0) -> Mask:
    """Sliding window: query position ``p`` sees keys ``p - left <= k <= p + right``.

    Example:
        >>> window(1, 1).dense(3, 3)[0, 0].int().tolist()
        [[1, 1, 0], [1, 1, 1], [0, 1, 1]]
    """
    return Window(left, right)


def chunk_window(size: int, back: int = 0, start: int = 0) -> Mask:
    """Chunked attention with look-back: positions split into chunks of ``size``, position
    ``p`` in chunk ``(p + start) // size`` (``start``: the positions before the first
    query's, as a cache's offset); a query sees every key of its own chunk (later ones
    too) and of the ``back`` chunks before it. ``back=0`` is :func:`documents` of the
    chunks; NeMo's ``chunked_limited`` attention is ``chunk_window(right + 1, left //
    (right + 1))``.

    Example:
        >>> chunk_window(2, back=1).dense(5, 5)[0, 0].int().tolist()
        [[1, 1, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 0], [0, 0, 1, 1, 1]]
    """
    return ChunkWindow(size, back, start)


def prefix(n: int) -> Mask:
    """Prefix-LM: every query sees keys ``k < n``; after the prefix it is causal.

    Example:
        >>> prefix(2).dense(3, 3)[0, 0].int().tolist()
        [[1, 1, 0], [1, 1, 0], [1, 1, 1]]
    """
    return Prefix(n)


def dilated(window: int, dilation: int) -> Mask:
    """Dilated window: keys with ``|p - k| <= window`` and ``(p - k) % dilation == 0``.

    Example:
        >>> dilated(2, 2).dense(3, 3)[0, 0].int().tolist()
        [[1, 0, 1], [0, 1, 0], [1, 0, 1]]
    """
    return Dilated(window, dilation)
