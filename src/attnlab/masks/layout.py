"""Block layouts: which tiles of an ``Lq x Lk`` score matrix a mask leaves empty or full.

:class:`BlockLayout` is what :meth:`Mask.block_layout <attnlab.masks.Mask.block_layout>`
returns; :class:`RowBounds` is the key interval of each query row that a mask reports
through :meth:`Mask.row_bounds <attnlab.masks.Mask.row_bounds>`. A layout from row bounds
keeps them and reads its tiles as runs along the key axis (:mod:`attnlab.masks._tiles`, in
``O(Lq + tiles kept)``); its dense ``states`` are made only when asked for, as
:func:`part_states` does to combine a part with others tile by tile.
:func:`layout_by_evaluation` builds tile states by evaluating the mask.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum
from typing import TYPE_CHECKING

import torch
from torch import Tensor
from torch.nn.functional import pad

from attnlab._devices import to_device
from attnlab._grid import Grid
from attnlab.masks._tiles import runs_from_bounds, runs_from_states, states_from_runs

if TYPE_CHECKING:
    from attnlab.masks.base import Mask

__all__ = [
    "BlockLayout",
    "RowBounds",
    "TileState",
    "layout_by_evaluation",
    "layout_within",
    "meet_bounds",
    "on",
    "part_states",
    "union_bounds",
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


class BlockLayout:
    """Which tiles of an ``Lq x Lk`` score matrix a mask leaves empty, partial or full.

    Attributes:
        states: int8 tensor ``(Bm, Hm, nQ, nK)`` of :class:`TileState` values; a layout
            made from row bounds builds it on first use only (:meth:`count`,
            :attr:`computed_fraction` and :meth:`tile_runs` read the intervals).
        lq, lk: the lengths the layout was made for.
        block_q, block_k: tile sizes (the last tile of each axis may be shorter).

    ``EMPTY`` tiles have no allowed pair, ``FULL`` tiles have only allowed pairs, ``PARTIAL``
    tiles may have both (combinations are conservative: a partial tile can turn out empty).

    Example:
        >>> from attnlab import masks
        >>> print(masks.causal().block_layout(256, 256, 64, 64))
        BlockLayout(256x256, tiles 64x64: 6 full, 4 partial, 6 empty; 62.5% of tiles computed)
    """

    lq: int
    lk: int
    block_q: int
    block_k: int
    bounds: RowBounds | None

    def __init__(
        self, states: Tensor | RowBounds, lq: int, lk: int, block_q: int, block_k: int
    ) -> None:
        """``states``: the tile states, or the row bounds they follow from (exactly)."""
        bounds = states if isinstance(states, RowBounds) else None
        self.__dict__.update(lq=lq, lk=lk, block_q=block_q, block_k=block_k, bounds=bounds)
        if not isinstance(states, RowBounds):
            self.__dict__["states"] = states.to(torch.int8)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"BlockLayout is read-only: cannot set {name!r}")

    @functools.cached_property
    def states(self) -> Tensor:
        """The tile states ``(Bm, Hm, nQ, nK)``, from the intervals on first use."""
        return states_from_runs(self._runs, self._shape())

    @functools.cached_property
    def _runs(self) -> Tensor:
        """:meth:`tile_runs` per batch row, computed once for counts and ``states``."""
        return self.tile_runs()

    def _shape(self) -> tuple[int, int, int, int]:
        nq, nk = math.ceil(self.lq / self.block_q), math.ceil(self.lk / self.block_k)
        if self.bounds is not None:
            return self.bounds.lo.shape[0], 1, nq, nk
        bm, hm = self.states.shape[:2]
        return bm, hm, nq, nk

    def tile_runs(self, union: bool = False) -> Tensor:
        """The non-empty tiles as runs along the key axis: ``(R, 4)`` int64 rows
        ``(group, k0, k1, state)`` (key tiles ``k0 .. k1 - 1``), ordered by group then
        ``k0``; ``group`` is ``(b * Hm + h) * nQ + qb``, or ``qb`` with ``union``: the
        union over batch and heads, a tile full only where it is full for all of them.
        From row bounds this takes ``O(Bm Lq + R)``, no ``(nQ, nK)`` table.
        """
        if self.bounds is not None:
            return runs_from_bounds(
                self.bounds, self.lq, self.lk, self.block_q, self.block_k, union
            )
        return runs_from_states(self.states, union)

    def count(self, state: TileState) -> int:
        """Number of tiles in ``state`` (over batch and head rows of the layout)."""
        if self.bounds is None:
            return int((self.states == int(state)).sum())
        runs = self._runs
        total = math.prod(self._shape())
        kept = runs[:, 2] - runs[:, 1]
        if state == TileState.EMPTY:
            return total - int(kept.sum())
        return int(kept[runs[:, 3] == int(state)].sum())

    @property
    def computed_fraction(self) -> float:
        """Fraction of tiles that an engine must compute (partial or full)."""
        total = math.prod(self._shape())
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


def part_states(
    part: Mask,
    lq: int,
    lk: int,
    bq: int,
    bk: int,
    batch: int | None,
    heads: int,
    device: Device,
) -> Tensor:
    """Dense tile states ``(Bm, Hm, nQ, nK)`` of one part of a combination (``Hm = 1`` for
    a part with row bounds), to combine with the others' tile by tile."""
    layout = part._layout(lq, lk, bq, bk, batch, heads, device)
    if isinstance(layout, Tensor):
        return layout
    nq, nk = math.ceil(lq / bq), math.ceil(lk / bk)
    runs = runs_from_bounds(layout, lq, lk, bq, bk, False)
    return states_from_runs(runs, (layout.lo.shape[0], 1, nq, nk)).long()


def meet_bounds(
    parts: tuple[Mask, ...], lq: int, lk: int, batch: int, device: Device
) -> RowBounds | None:
    """The intersection of the row intervals of ``parts`` AND-ed: exact when every part's
    is, else an outer bound (a part without one, ``block_random``, only narrows it).

    Example:
        >>> from attnlab import masks
        >>> meet_bounds((masks.causal(), masks.window(1)), 3, 3, 1, None).lo.tolist()
        [[0, 0, 1]]
    """
    bounds = [p.row_bounds(lq, lk, batch, device) for p in parts]
    known = [b for b in bounds if b is not None]
    if not known:
        return None
    lo = functools.reduce(torch.maximum, [b.lo for b in known])
    hi = functools.reduce(torch.minimum, [b.hi for b in known])
    return RowBounds(lo, hi, len(known) == len(bounds) and all(b.exact for b in known))


def union_bounds(
    parts: tuple[Mask, ...], lq: int, lk: int, batch: int, device: Device
) -> RowBounds | None:
    """The exact key interval of each row of ``parts`` OR-ed, where each part has exact
    intervals and each row's, sorted by their first key, meet or touch (or are empty), so
    their union is one interval; else None. Asked on the host (the check reads the
    bounds), copied to ``device`` without a sync: ``causal() | groups(ids)`` keeps its
    intervals for the blocked engine's interval plans and layouts from runs (an ``|`` had
    no row bounds: its tiles were evaluated). The parts' order does not matter.

    Example:
        >>> from attnlab import masks
        >>> b = union_bounds((masks.causal(), masks.documents([0, 0, 1])), 3, 3, 1, None)
        >>> b.lo.tolist(), b.hi.tolist(), b.exact
        ([[0, 0, 0]], [[1, 1, 2]], True)
        >>> union_bounds((masks.window(0), masks.global_tokens([2])), 3, 3, 1, None) is None
        True
    """
    los, his = [], []
    for part in parts:
        b = part.row_bounds(lq, lk, batch, "cpu")
        if b is None or not b.exact:
            return None
        los.append(b.lo.clamp(min=0))  # (Bm or 1, Lq)
        his.append(b.hi.clamp(max=lk - 1))
    if not los:
        return None
    lo, hi = (torch.stack(torch.broadcast_tensors(*t)) for t in (los, his))  # (P, Bm, Lq)
    empty = lo > hi
    first = torch.where(empty, lk + 1, lo).sort(0)  # rows' intervals by first key, empty last
    ends = torch.where(empty, -1, hi).gather(0, first.indices).cummax(0).values
    gap = first.values[1:] > ends[:-1] + 1  # an interval starting past all before it
    if bool((gap & (first.values[1:] <= lk)).any()):
        return None
    none = empty.all(0)  # (Bm, Lq): rows without a key keep the first part's bounds
    lo = torch.where(none, lo[0], first.values[0])
    hi = torch.where(none, hi[0], ends[-1])
    return RowBounds(to_device(lo, on(device)), to_device(hi, on(device)), exact=True)


def layout_by_evaluation(
    mask: Callable[[Grid], Tensor],
    lq: int,
    lk: int,
    bq: int,
    bk: int,
    bm: int,
    hm: int,
    device: Device,
    within: RowBounds | None = None,
) -> Tensor:
    """Exact tile states ``(bm, hm, nQ, nK)`` by evaluating ``mask``, a few query blocks at
    a time; with ``within``, an outer bound of the mask's rows (``mask`` allows no key
    outside it), only on the key tiles each query block's bound touches: ``O(Lq w)`` for a
    dilated window of width ``w`` (every tile was evaluated: 33 s at 32768 queries)."""
    nq, nk = math.ceil(lq / bq), math.ceil(lk / bk)
    out = torch.zeros(bm, hm, nq, nk, dtype=torch.long, device=device)
    if nq == 0 or nk == 0:  # no tile (torch before 2.10 refuses to pad a size-0 dim)
        return out
    spans = _key_tiles(within, lq, lk, bq, bk) if within is not None else [(0, nk)] * nq
    for q0, q1, k0, k1 in _chunks(spans, bm * hm * bq * bk):
        rows = torch.arange(q0 * bq, min(lq, q1 * bq), device=device)
        keys = torch.arange(k0 * bk, min(lk, k1 * bk), device=device)
        grid = Grid.tile(rows, keys, lq=lq, lk=lk, batch=bm, heads=hm)
        vals = torch.broadcast_to(mask(grid), (bm, hm, len(rows), len(keys)))
        out[:, :, q0:q1, k0:k1] = _tile_states(vals, bq, bk)
    return out


def layout_within(
    mask: Callable[[Grid], Tensor],
    bounds: RowBounds | None,
    sizes: tuple[int, int, int, int, int, int],
    device: Device,
) -> Tensor | RowBounds:
    """A mask's layout from its row ``bounds``, asked once by the caller (``|`` and ``&``
    combine their parts' bounds on each call): the bounds themselves where exact (states
    as runs of key tiles), else :func:`layout_by_evaluation` within them; ``sizes``: its
    ``(lq, lk, bq, bk, bm, hm)``.

    Example:
        >>> from attnlab import masks
        >>> m = masks.causal()
        >>> type(layout_within(m, m.row_bounds(4, 4), (4, 4, 2, 2, 1, 1), None)).__name__
        'RowBounds'
    """
    if bounds is not None and bounds.exact:
        return bounds
    return layout_by_evaluation(mask, *sizes, device, within=bounds)


def _tile_states(vals: Tensor, bq: int, bk: int) -> Tensor:
    """Tile states of bool values ``(bm, hm, rows, keys)`` (last tiles may be shorter)."""
    bm, hm, r, c = vals.shape
    nr, nc = math.ceil(r / bq), math.ceil(c / bk)
    pads = (0, nc * bk - c, 0, nr * bq - r)
    anyv = torch.nn.functional.pad(vals, pads, value=False).view(bm, hm, nr, bq, nc, bk)
    allv = torch.nn.functional.pad(vals, pads, value=True).view(bm, hm, nr, bq, nc, bk)
    some, every = anyv.any(dim=5).any(dim=3), allv.all(dim=5).all(dim=3)
    return torch.where(~some, 0, torch.where(every, 2, 1))


def _key_tiles(b: RowBounds, lq: int, lk: int, bq: int, bk: int) -> list[tuple[int, int]]:
    """Per query block, the key tiles ``k0 .. k1 - 1`` its rows' bounds touch (over every
    batch row; ``k0 >= k1`` for none)."""
    nq = math.ceil(lq / bq)
    lo, hi = b.lo.clamp(min=0), b.hi.clamp(max=lk - 1)  # (Bm, Lq)
    some = lo <= hi
    lo, hi = torch.where(some, lo, lk), torch.where(some, hi, -1)
    extra = nq * bq - lq
    lo = pad(lo, (0, extra), value=lk).view(lo.shape[0], nq, bq).amin((0, 2))
    hi = pad(hi, (0, extra), value=-1).view(hi.shape[0], nq, bq).amax((0, 2))
    return list(zip((lo // bk).tolist(), (hi // bk + 1).tolist(), strict=True))


def _chunks(spans: list[tuple[int, int]], tile: int) -> list[tuple[int, int, int, int]]:
    """Runs ``(q0, q1, k0, k1)`` of consecutive query blocks, evaluated as one grid of
    their blocks' rows and their key tiles' union: at most ``2**22`` values (``tile`` per
    tile) and, past one block, at most twice the widest block's tiles."""
    out: list[tuple[int, int, int, int]] = []
    widest = 0  # the widest block of the last run
    for qb, (a, b) in enumerate(spans):
        if a >= b:  # no key: every tile of the block is empty
            continue
        if out and out[-1][1] == qb:
            q0, _, k0, k1 = out[-1]
            u0, u1 = min(k0, a), max(k1, b)
            small = (qb + 1 - q0) * (u1 - u0) * tile <= 1 << 22
            if small and u1 - u0 <= 2 * max(widest, b - a):
                out[-1], widest = (q0, qb + 1, u0, u1), max(widest, b - a)
                continue
        out.append((qb, qb + 1, a, b))
        widest = b - a
    return out
