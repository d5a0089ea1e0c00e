"""Block layouts: which tiles of an ``Lq x Lk`` score matrix a mask leaves empty or full.

:class:`BlockLayout` is what :meth:`Mask.block_layout <attnlab.masks.Mask.block_layout>`
returns; :class:`RowBounds` is the key interval of each query row that a mask reports
through :meth:`Mask.row_bounds <attnlab.masks.Mask.row_bounds>`. The two functions here
build tile states from either (intervals in ``O(Lq + nQ nK)``, or by evaluating the mask).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum

import torch
from torch import Tensor

from attnlab._grid import Grid

__all__ = [
    "BlockLayout",
    "RowBounds",
    "TileState",
    "layout_by_evaluation",
    "layout_from_bounds",
    "on",
]

Device = torch.device | str | None


def on(device: Device) -> torch.device:
    """Where row bounds asked for on ``device`` go: torch's default device for None (as
    positions built with ``torch.arange`` land), whatever device a mask's own tensors are
    on, so that the bounds of an ``&`` of masks meet on one device.

    Example:
        >>> on(None).type, on("cpu").type
        ('cpu', 'cpu')
    """
    return torch.get_default_device() if device is None else torch.device(device)


class TileState(IntEnum):
    """State of one ``(block_q x block_k)`` tile. ``&`` is ``min``, ``|`` is ``max``.

    Example:
        >>> from attnlab import masks
        >>> states = masks.causal().block_layout(4, 4, 2, 2).states[0, 0]
        >>> [[TileState(int(s)).name for s in row] for row in states]
        [['PARTIAL', 'EMPTY'], ['FULL', 'PARTIAL']]
        >>> min(TileState.FULL, TileState.PARTIAL).name  # a full tile & a partial one
        'PARTIAL'
    """

    EMPTY = 0
    PARTIAL = 1
    FULL = 2


@dataclass(frozen=True)
class BlockLayout:
    """Which tiles of an ``Lq x Lk`` score matrix a mask leaves empty, partial or full.

    Attributes:
        states: int8 tensor ``(Bm, Hm, nQ, nK)`` of :class:`TileState` values.
        lq, lk: the lengths the layout was made for.
        block_q, block_k: tile sizes (the last tile of each axis may be shorter).

    ``EMPTY`` tiles have no allowed pair, ``FULL`` tiles have only allowed pairs, ``PARTIAL``
    tiles may have both (combinations are conservative: a partial tile can turn out empty).

    Example:
        >>> from attnlab import masks
        >>> print(masks.causal().block_layout(256, 256, 64, 64))
        BlockLayout(256x256, tiles 64x64: 6 full, 4 partial, 6 empty; 62.5% of tiles computed)
    """

    states: Tensor
    lq: int
    lk: int
    block_q: int
    block_k: int

    def count(self, state: TileState) -> int:
        """Number of tiles in ``state`` (over batch and head rows of the layout)."""
        return int((self.states == int(state)).sum())

    @property
    def computed_fraction(self) -> float:
        """Fraction of tiles that an engine must compute (partial or full)."""
        total = self.states.numel()
        return 1.0 if total == 0 else 1.0 - self.count(TileState.EMPTY) / total

    def __str__(self) -> str:
        full, part = self.count(TileState.FULL), self.count(TileState.PARTIAL)
        empty = self.count(TileState.EMPTY)
        return (
            f"BlockLayout({self.lq}x{self.lk}, tiles {self.block_q}x{self.block_k}: "
            f"{full} full, {part} partial, {empty} empty; "
            f"{100 * self.computed_fraction:.1f}% of tiles computed)"
        )


@dataclass(frozen=True)
class RowBounds:
    """Per-row key interval ``[lo, hi]`` (inclusive), shapes ``(Bm, Lq)``.

    ``exact`` says the mask allows exactly the interval; otherwise the interval is only an
    envelope (nothing outside it is allowed). An empty row has ``lo > hi``.

    Example:
        >>> from attnlab import masks
        >>> b = masks.window(1).row_bounds(3, 3)
        >>> b.lo.tolist(), b.hi.tolist(), b.exact
        ([[-1, 0, 1]], [[0, 1, 2]], True)
    """

    lo: Tensor
    hi: Tensor
    exact: bool

    def __post_init__(self) -> None:
        """Integer bounds become int64, as the engines' kernels read them (a custom mask's
        int32 bounds failed there: "spans must be contiguous int64")."""
        for name in ("lo", "hi"):
            t = getattr(self, name)
            ok = isinstance(t, Tensor) and not (t.is_floating_point() or t.is_complex())
            if not ok or t.dtype == torch.bool:
                seen = t.dtype if isinstance(t, Tensor) else type(t).__name__
                raise TypeError(f"RowBounds {name} must be an integer tensor (Bm, Lq), got {seen}")
            if t.dtype != torch.int64:
                object.__setattr__(self, name, t.long())


def layout_from_bounds(bounds: RowBounds, lq: int, lk: int, bq: int, bk: int) -> Tensor:
    """Exact tile states from per-row intervals; returns ``(Bm, 1, nQ, nK)``.

    Each row touches the key tiles ``lo // bk .. hi // bk``; a difference array summed along
    the tiles marks the union per query block in ``O(Lq + nQ nK)``. A tile is full when
    every row of its block covers it (the block's largest ``lo`` and smallest ``hi``).
    """
    nq, nk = math.ceil(lq / bq), math.ceil(lk / bk)
    pad, bm = nq * bq - lq, bounds.lo.shape[0]  # explicit bm: a view(-1, 0, ...) fails at lq=0
    lo, hi = bounds.lo.clamp(min=0), bounds.hi.clamp(max=lk - 1)  # (Bm, Lq)
    some = lo <= hi  # rows that allow any key
    first = torch.where(some, lo // bk, nk)  # (Bm, Lq) first tile touched (nk: none)
    after = torch.where(some, hi // bk + 1, nk)  # one past the last tile touched
    block = (torch.arange(lq, device=lo.device) // bq).expand(bm, lq)  # (Bm, Lq)
    diff = torch.zeros(bm, nq, nk + 1, dtype=torch.int32, device=lo.device)
    ones = torch.ones_like(first, dtype=torch.int32)
    diff.view(bm, -1).scatter_add_(1, block * (nk + 1) + first, ones)
    diff.view(bm, -1).scatter_add_(1, block * (nk + 1) + after, -ones)
    touched = diff.cumsum(-1)[..., :nk] > 0  # (Bm, nQ, nK)
    lo_max = torch.nn.functional.pad(lo, (0, pad), value=0).view(bm, nq, bq).amax(-1)
    hi_min = torch.nn.functional.pad(hi, (0, pad), value=lk - 1).view(bm, nq, bq).amin(-1)
    ks = torch.arange(nk, device=lo.device) * bk  # (nK,)
    ke = torch.clamp(ks + bk, max=lk) - 1
    full = (lo_max[..., None] <= ks) & (hi_min[..., None] >= ke) & bounds.exact & touched
    states = torch.where(touched, torch.where(full, 2, 1), 0)
    return states.unsqueeze(1)


def layout_by_evaluation(
    mask: Callable[[Grid], Tensor],
    lq: int,
    lk: int,
    bq: int,
    bk: int,
    bm: int,
    hm: int,
    device: Device,
) -> Tensor:
    """Exact tile states ``(bm, hm, nQ, nK)`` by evaluating ``mask``, a few query blocks at
    a time."""
    nq, nk = math.ceil(lq / bq), math.ceil(lk / bk)
    if nq == 0 or nk == 0:  # no tile (torch before 2.10 refuses to pad a size-0 dim)
        return torch.zeros(bm, hm, nq, nk, dtype=torch.long, device=device)
    keys = torch.arange(lk, device=device)
    step = max(1, (1 << 22) // max(1, bm * hm * bq * lk))  # query blocks per chunk
    out = []
    for qb in range(0, nq, step):
        rows = torch.arange(qb * bq, min(lq, (qb + step) * bq), device=device)
        grid = Grid.tile(rows, keys, lq=lq, lk=lk, batch=bm, heads=hm)
        vals = torch.broadcast_to(mask(grid), (bm, hm, len(rows), lk))
        nblk = math.ceil(len(rows) / bq)
        pads = (0, nk * bk - lk, 0, nblk * bq - len(rows))
        anyv = torch.nn.functional.pad(vals, pads, value=False).view(bm, hm, nblk, bq, nk, bk)
        allv = torch.nn.functional.pad(vals, pads, value=True).view(bm, hm, nblk, bq, nk, bk)
        some, every = anyv.any(dim=5).any(dim=3), allv.all(dim=5).all(dim=3)
        out.append(torch.where(~some, 0, torch.where(every, 2, 1)))
    return torch.cat(out, dim=2)
