"""Attention masks: typed, composable, and aware of their block structure.

A mask says which (query, key) pairs may attend. Every mask is a function of
``(batch, head, query position, key index)``; query positions are aligned bottom-right
(query row ``i`` sits at position ``i + Lk - Lq``), the frame of cached decoding. ``True``
means *may attend*, as in :func:`torch.nn.functional.scaled_dot_product_attention`.

Masks combine with ``&`` (both allow), ``|`` (either allows) and ``~`` (negation). Each
mask knows two things:

* its dense form, :meth:`Mask.dense` -> bool ``(Bm, Hm, Lq, Lk)``;
* its block layout, :meth:`Mask.block_layout`: which ``(q-block, k-block)`` tiles are
  empty, partial or full, so that an engine can skip empty tiles and skip mask evaluation
  on full ones.

Example:
    >>> from attnlab import masks
    >>> m = masks.causal() & masks.window(2)
    >>> m.dense(4, 4)[0, 0].int().tolist()
    [[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [0, 1, 1, 1]]
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import IntEnum

import torch
from torch import Tensor

from attnlab._grid import Grid

__all__ = [
    "BlockLayout",
    "Mask",
    "TileState",
    "as_mask",
    "block_random",
    "causal",
    "custom",
    "dilated",
    "documents",
    "global_tokens",
    "padding",
    "prefix",
    "tensor",
    "window",
]

Device = torch.device | str | None
MaskFn = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]


class TileState(IntEnum):
    """State of one ``(block_q x block_k)`` tile. ``&`` is ``min``, ``|`` is ``max``."""

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
    envelope (nothing outside it is allowed).
    """

    lo: Tensor
    hi: Tensor
    exact: bool


class Mask:
    """Base class of all masks. Subclasses implement :meth:`_eval` and :meth:`_spec`.

    Subclasses may also implement :meth:`_row_bounds` (a fast exact block layout) and
    :meth:`check` (size validation).
    """

    per_head: bool = False

    @property
    def per_batch(self) -> bool:
        """Whether the mask varies with the batch index."""
        return self.batch_size is not None

    @property
    def batch_size(self) -> int | None:
        """The batch size the mask is tied to, or ``None`` if it is batch-independent."""
        return None

    @property
    def natural_length(self) -> int | None:
        """A sequence length the mask was built for (documents, padding), if any."""
        return None

    # -- evaluation -------------------------------------------------------------------
    def _eval(self, grid: Grid) -> Tensor:
        raise NotImplementedError

    def _spec(self) -> str:
        raise NotImplementedError

    def __call__(self, grid: Grid) -> Tensor:
        """Evaluate on ``grid``: a bool tensor broadcastable to ``grid.shape``."""
        return self._eval(grid)

    def check(self, *, batch: int, heads: int, lq: int, lk: int) -> None:
        """Raise ``ValueError`` if the mask cannot serve these sizes."""

    def _sizes(self, batch: int | None, heads: int) -> tuple[int, int]:
        """Batch and head extent of the dense form ``(Bm, Hm)``."""
        b = batch if batch is not None else (self.batch_size or 1)
        return (b if self.per_batch else 1), (heads if self.per_head else 1)

    def _check_sizes(self, batch: int | None, heads: int, lq: int, lk: int) -> None:
        b = batch if batch is not None else (self.batch_size or 1)
        self.check(batch=b, heads=heads, lq=lq, lk=lk)

    def dense(
        self,
        lq: int,
        lk: int,
        *,
        batch: int | None = None,
        heads: int = 1,
        device: Device = None,
    ) -> Tensor:
        """Dense bool form ``(Bm, Hm, lq, lk)``; ``Bm``/``Hm`` are 1 unless the mask varies.

        Example:
            >>> causal().dense(2, 3)[0, 0].tolist()
            [[True, True, False], [True, True, True]]
        """
        self._check_sizes(batch, heads, lq, lk)
        bm, hm = self._sizes(batch, heads)
        grid = Grid.full(lq, lk, batch=bm, heads=hm, device=device)
        return torch.broadcast_to(self._eval(grid), (bm, hm, lq, lk))

    # -- block layout -----------------------------------------------------------------
    def _row_bounds(self, lq: int, lk: int, batch: int, device: Device) -> RowBounds | None:
        return None

    def block_layout(
        self,
        lq: int,
        lk: int,
        block_q: int = 64,
        block_k: int = 64,
        *,
        batch: int | None = None,
        heads: int = 1,
        device: Device = None,
    ) -> BlockLayout:
        """Tile states ``(Bm, Hm, ceil(lq/block_q), ceil(lk/block_k))`` for these sizes.

        Example:
            >>> window(1).block_layout(4, 4, 2, 2).states[0, 0].tolist()
            [[1, 0], [1, 1]]
        """
        if block_q <= 0 or block_k <= 0:
            raise ValueError(
                f"block sizes must be positive, got block_q={block_q}, block_k={block_k}"
            )
        self._check_sizes(batch, heads, lq, lk)
        states = self._layout(lq, lk, block_q, block_k, batch, heads, device)
        return BlockLayout(states.to(torch.int8), lq, lk, block_q, block_k)

    def _layout(
        self, lq: int, lk: int, bq: int, bk: int, batch: int | None, heads: int, device: Device
    ) -> Tensor:
        bm, hm = self._sizes(batch, heads)
        bounds = self._row_bounds(lq, lk, bm, device)
        if bounds is not None:
            return _layout_from_bounds(bounds, lq, lk, bq, bk)
        return _layout_by_evaluation(self, lq, lk, bq, bk, bm, hm, device)

    # -- algebra and display ----------------------------------------------------------
    def __and__(self, other: Mask | Tensor) -> Mask:
        return _Combined("&", [self, _operand(other)])

    def __or__(self, other: Mask | Tensor) -> Mask:
        return _Combined("|", [self, _operand(other)])

    def __invert__(self) -> Mask:
        return _Not(self)

    def visible_fraction(self, lq: int, lk: int, *, batch: int | None = None) -> float:
        """Fraction of (query, key) pairs the mask allows, counted in row chunks."""
        total, allowed = 0, 0
        for start in range(0, lq, 512):
            rows = torch.arange(start, min(lq, start + 512))
            bm, hm = self._sizes(batch, 1)
            grid = Grid.tile(rows, torch.arange(lk), lq=lq, lk=lk, batch=bm, heads=hm)
            vals = torch.broadcast_to(self._eval(grid), (bm, hm, len(rows), lk))
            allowed += int(vals.sum())
            total += vals.numel()
        return allowed / total if total else 0.0

    def __repr__(self) -> str:
        n = self.natural_length or 256
        try:
            self._check_sizes(None, 1, n, n)
            frac = self.visible_fraction(n, n)
        except (ValueError, IndexError):  # e.g. a non-square tensor mask: no n x n form
            return self._spec()
        return f"{self._spec()}  [{100 * frac:.1f}% visible at {n}x{n}]"


def _operand(x: Mask | Tensor) -> Mask:
    m = as_mask(x)
    if m is None:
        raise TypeError("cannot combine a mask with None")
    return m


def _layout_from_bounds(bounds: RowBounds, lq: int, lk: int, bq: int, bk: int) -> Tensor:
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


def _layout_by_evaluation(
    mask: Mask, lq: int, lk: int, bq: int, bk: int, bm: int, hm: int, device: Device
) -> Tensor:
    """Exact tile states by evaluating the mask, a few query blocks at a time."""
    nq, nk = math.ceil(lq / bq), math.ceil(lk / bk)
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
    if not out:
        return torch.zeros(bm, hm, nq, nk, dtype=torch.long, device=device)
    return torch.cat(out, dim=2)


# ---------------------------------------------------------------------------------------
# combinators


class _Combined(Mask):
    def __init__(self, op: str, parts: Sequence[Mask]) -> None:
        flat: list[Mask] = []
        for p in parts:
            flat.extend(p.parts if isinstance(p, _Combined) and p.op == op else [p])
        sizes = {p.batch_size for p in flat if p.batch_size is not None}
        if len(sizes) > 1:
            raise ValueError(f"cannot combine masks tied to different batch sizes {sorted(sizes)}")
        self.op: str = op
        self.parts: list[Mask] = flat
        self.per_head = any(p.per_head for p in flat)

    @property
    def per_batch(self) -> bool:
        return any(p.per_batch for p in self.parts)

    @property
    def batch_size(self) -> int | None:
        return next((p.batch_size for p in self.parts if p.batch_size is not None), None)

    @property
    def natural_length(self) -> int | None:
        return max((p.natural_length or 0 for p in self.parts), default=0) or None

    def _eval(self, grid: Grid) -> Tensor:
        vals = [p(grid) for p in self.parts]
        out = vals[0]
        for v in vals[1:]:
            out = (out & v) if self.op == "&" else (out | v)
        return out

    def check(self, *, batch: int, heads: int, lq: int, lk: int) -> None:
        for p in self.parts:
            p.check(batch=batch, heads=heads, lq=lq, lk=lk)

    def _row_bounds(self, lq: int, lk: int, batch: int, device: Device) -> RowBounds | None:
        """An ``&`` of masks with row intervals allows at most their intersection."""
        if self.op != "&":
            return None
        parts = [p._row_bounds(lq, lk, batch, device) for p in self.parts]
        if any(b is None for b in parts):
            return None
        lo = functools.reduce(torch.maximum, [b.lo for b in parts if b is not None])
        hi = functools.reduce(torch.minimum, [b.hi for b in parts if b is not None])
        return RowBounds(lo, hi, all(b.exact for b in parts if b is not None))

    def _layout(
        self, lq: int, lk: int, bq: int, bk: int, batch: int | None, heads: int, device: Device
    ) -> Tensor:
        b = batch if batch is not None else self.batch_size
        if not self.per_head:  # intervals carry no head axis
            bm, _ = self._sizes(b, heads)
            bounds = self._row_bounds(lq, lk, bm, device)
            if bounds is not None:
                return _layout_from_bounds(bounds, lq, lk, bq, bk)
        states = [p._layout(lq, lk, bq, bk, b, heads, device) for p in self.parts]
        out = states[0]
        for s in states[1:]:
            out = torch.minimum(out, s) if self.op == "&" else torch.maximum(out, s)
        return out

    def _spec(self) -> str:
        return "(" + f" {self.op} ".join(p._spec() for p in self.parts) + ")"


class _Not(Mask):
    def __init__(self, inner: Mask) -> None:
        self.inner = inner
        self.per_head = inner.per_head

    @property
    def per_batch(self) -> bool:
        return self.inner.per_batch

    @property
    def batch_size(self) -> int | None:
        return self.inner.batch_size

    @property
    def natural_length(self) -> int | None:
        return self.inner.natural_length

    def _eval(self, grid: Grid) -> Tensor:
        return ~self.inner(grid)

    def check(self, *, batch: int, heads: int, lq: int, lk: int) -> None:
        self.inner.check(batch=batch, heads=heads, lq=lq, lk=lk)

    def _layout(
        self, lq: int, lk: int, bq: int, bk: int, batch: int | None, heads: int, device: Device
    ) -> Tensor:
        return 2 - self.inner._layout(lq, lk, bq, bk, batch, heads, device)

    def _spec(self) -> str:
        return f"~{self.inner._spec()}"


# ---------------------------------------------------------------------------------------
# primitives


def _positions(lq: int, lk: int, batch: int, device: Device) -> Tensor:
    """Query positions ``(batch, lq)`` (bottom-right aligned)."""
    return (torch.arange(lq, device=device) + (lk - lq)).expand(batch, lq)


def _nonneg_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < 0:
        raise ValueError(f"{name} must be a non-negative int, got {value}")
    return value


def _pos_int(name: str, value: object) -> int:
    if _nonneg_int(name, value) == 0:
        raise ValueError(f"{name} must be a positive int, got 0")
    return int(value)  # type: ignore[call-overload]


def _int_tensor(name: str, value: object, ndims: tuple[int, ...]) -> Tensor:
    """Coerce a list or tensor of ints into a long tensor with one of ``ndims`` ranks."""
    t = value if isinstance(value, Tensor) else torch.as_tensor(value)
    if not isinstance(value, Tensor) and t.numel() == 0:
        t = t.long()  # torch.as_tensor([]) is float32; an empty list holds no non-integer
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f"{name} must hold integers, got dtype {t.dtype}")
    if t.dim() not in ndims:
        raise ValueError(
            f"{name} must have rank {' or '.join(map(str, ndims))}, got shape {tuple(t.shape)}"
        )
    return t.long()


class _Causal(Mask):
    def _eval(self, grid: Grid) -> Tensor:
        return grid.k <= grid.q

    def _row_bounds(self, lq: int, lk: int, batch: int, device: Device) -> RowBounds:
        p = _positions(lq, lk, 1, device)
        return RowBounds(torch.zeros_like(p), p, exact=True)

    def _spec(self) -> str:
        return "causal()"


class _Window(Mask):
    def __init__(self, left: int, right: int) -> None:
        self.left, self.right = _nonneg_int("left", left), _nonneg_int("right", right)

    def _eval(self, grid: Grid) -> Tensor:
        return (grid.k >= grid.q - self.left) & (grid.k <= grid.q + self.right)

    def _row_bounds(self, lq: int, lk: int, batch: int, device: Device) -> RowBounds:
        p = _positions(lq, lk, 1, device)
        return RowBounds(p - self.left, p + self.right, exact=True)

    def _spec(self) -> str:
        return f"window(left={self.left}, right={self.right})"


class _Prefix(Mask):
    def __init__(self, n: int) -> None:
        self.n = _nonneg_int("n", n)

    def _eval(self, grid: Grid) -> Tensor:
        return (grid.k < self.n) | (grid.k <= grid.q)

    def _row_bounds(self, lq: int, lk: int, batch: int, device: Device) -> RowBounds:
        p = _positions(lq, lk, 1, device)
        return RowBounds(torch.zeros_like(p), torch.clamp(p, min=self.n - 1), exact=True)

    def _spec(self) -> str:
        return f"prefix({self.n})"


class _Padding(Mask):
    def __init__(self, key_lengths: object, query_lengths: object | None) -> None:
        self.kl = _int_tensor("key_lengths", key_lengths, (1,))
        self.ql = (
            None if query_lengths is None else _int_tensor("query_lengths", query_lengths, (1,))
        )
        if self.ql is not None and self.ql.shape != self.kl.shape:
            raise ValueError(
                f"query_lengths has shape {tuple(self.ql.shape)} but key_lengths "
                f"has {tuple(self.kl.shape)}; give one length per batch item"
            )
        for name, t in (("key_lengths", self.kl), ("query_lengths", self.ql)):
            if t is not None and bool((t < 0).any()):
                raise ValueError(f"{name} must be >= 0, got {t.tolist()}")

    @property
    def batch_size(self) -> int:
        return self.kl.shape[0]

    @property
    def natural_length(self) -> int | None:
        return int(self.kl.max()) if self.kl.numel() else None

    def check(self, *, batch: int, heads: int, lq: int, lk: int) -> None:
        if batch != self.batch_size:
            raise ValueError(
                f"mask=padding(...) holds {self.batch_size} lengths but the batch "
                f"size is {batch}; give one length per batch item"
            )

    def _eval(self, grid: Grid) -> Tensor:
        kl = self.kl.to(grid.k.device)[grid.b]  # (B, 1, 1, 1)
        ok = grid.k < kl
        if self.ql is not None:
            ok = ok & (grid.rows < self.ql.to(grid.k.device)[grid.b])
        return ok

    def _row_bounds(self, lq: int, lk: int, batch: int, device: Device) -> RowBounds:
        hi = (self.kl.to(device) - 1).view(-1, 1).expand(-1, lq)
        if self.ql is not None:
            rows = torch.arange(lq, device=device).view(1, -1)
            hi = torch.where(rows < self.ql.to(device).view(-1, 1), hi, -1)
        return RowBounds(torch.zeros_like(hi), hi, exact=True)

    def _spec(self) -> str:
        q = "" if self.ql is None else f", query_lengths={self.ql.tolist()}"
        return f"padding(key_lengths={self.kl.tolist()}{q})"


class _Documents(Mask):
    def __init__(self, doc_ids: object) -> None:
        ids = _int_tensor("doc_ids", doc_ids, (1, 2))
        self.ids = ids if ids.dim() == 2 else ids.unsqueeze(0)  # (Bd, L)
        self._bounds = _run_bounds(self.ids)

    @property
    def batch_size(self) -> int | None:
        return self.ids.shape[0] if self.ids.shape[0] > 1 else None

    @property
    def natural_length(self) -> int:
        return self.ids.shape[1]

    def check(self, *, batch: int, heads: int, lq: int, lk: int) -> None:
        n = self.ids.shape[1]
        if lk != n or lq > lk:
            raise ValueError(
                f"mask=documents(...) has doc_ids of length {n} but the call has "
                f"Lq={lq}, Lk={lk}; expected Lk == {n} and Lq <= Lk"
            )
        if self.batch_size is not None and batch != self.batch_size:
            raise ValueError(
                f"mask=documents(...) has doc_ids for {self.batch_size} batch "
                f"items but the batch size is {batch}"
            )

    def _eval(self, grid: Grid) -> Tensor:
        ids = self.ids.to(grid.k.device)
        b = grid.b if ids.shape[0] > 1 else torch.zeros_like(grid.b)
        return ids[b, grid.q.clamp(min=0)] == ids[b, grid.k]

    def _row_bounds(self, lq: int, lk: int, batch: int, device: Device) -> RowBounds | None:
        if self._bounds is None:
            return None
        lo, hi = (t.to(device)[:, lk - lq :] for t in self._bounds)
        return RowBounds(lo, hi, exact=True)

    def _spec(self) -> str:
        n_docs = int(self.ids[0].unique().numel()) if self.ids.numel() else 0
        return f"documents({n_docs} documents, length {self.ids.shape[1]})"


def _run_bounds(ids: Tensor) -> tuple[Tensor, Tensor] | None:
    """Per-position ``(start, end)`` of its document, if every document is one run."""
    if ids.shape[1] == 0:
        return ids.clone(), ids.clone()
    change = torch.nn.functional.pad(ids[:, 1:] != ids[:, :-1], (1, 0), value=True)
    run = change.long().cumsum(1) - 1  # (Bd, L) run index of each position
    for row, r in zip(ids, run, strict=True):
        if int(r[-1]) + 1 != row.unique().numel():
            return None
    pos = torch.arange(ids.shape[1]).expand_as(ids)
    start = torch.zeros_like(ids).scatter_reduce(1, run, pos, "amin", include_self=False)
    end = torch.zeros_like(ids).scatter_reduce(1, run, pos, "amax", include_self=False)
    return start.gather(1, run), end.gather(1, run)


class _GlobalTokens(Mask):
    def __init__(self, indices: object) -> None:
        self.idx = _int_tensor("indices", indices, (1,))
        if bool((self.idx < 0).any()):
            raise ValueError(f"indices must be >= 0, got {self.idx.tolist()}")

    def _eval(self, grid: Grid) -> Tensor:
        idx = self.idx.to(grid.k.device)
        return torch.isin(grid.q, idx) | torch.isin(grid.k, idx)

    def _spec(self) -> str:
        return f"global_tokens({self.idx.tolist()})"


class _Dilated(Mask):
    def __init__(self, window: int, dilation: int) -> None:
        self.window, self.dilation = _nonneg_int("window", window), _pos_int("dilation", dilation)

    def _eval(self, grid: Grid) -> Tensor:
        d = grid.q - grid.k
        return (d.abs() <= self.window) & (torch.remainder(d, self.dilation) == 0)

    def _row_bounds(self, lq: int, lk: int, batch: int, device: Device) -> RowBounds | None:
        if self.dilation != 1:
            return None  # an envelope only: evaluate, so that the layout stays exact
        p = _positions(lq, lk, 1, device)
        return RowBounds(p - self.window, p + self.window, exact=True)

    def _spec(self) -> str:
        return f"dilated(window={self.window}, dilation={self.dilation})"


class _BlockRandom(Mask):
    def __init__(self, block_size: int, num_blocks: int, seed: int) -> None:
        self.block_size = _pos_int("block_size", block_size)
        self.num_blocks = _nonneg_int("num_blocks", num_blocks)
        self.seed = _nonneg_int("seed", seed)
        self._tables: dict[int, Tensor] = {}

    def table(self, lk: int) -> Tensor:
        """Bool ``(n_blocks, n_blocks)``: query block -> its random key blocks (seeded)."""
        if lk not in self._tables:
            n = max(1, math.ceil(lk / self.block_size))
            gen = torch.Generator().manual_seed(self.seed)
            tab = torch.zeros(n, n, dtype=torch.bool)
            for row in range(n):
                tab[row, torch.randperm(n, generator=gen)[: self.num_blocks]] = True
            self._tables[lk] = tab
        return self._tables[lk]

    def _eval(self, grid: Grid) -> Tensor:
        tab = self.table(grid.lk).to(grid.k.device)
        qb = grid.q.clamp(min=0) // self.block_size
        ok = tab[qb, grid.k // self.block_size]
        return ok & (grid.q >= 0)

    def _spec(self) -> str:
        return (
            f"block_random(block_size={self.block_size}, num_blocks={self.num_blocks}, "
            f"seed={self.seed})"
        )


class _Custom(Mask):
    def __init__(self, fn: MaskFn, per_batch: bool, per_head: bool) -> None:
        if not callable(fn):
            raise TypeError(
                f"fn must be callable (b, h, q_pos, k) -> bool tensor, got {type(fn).__name__}"
            )
        self.fn, self._per_batch, self.per_head = fn, per_batch, per_head

    @property
    def per_batch(self) -> bool:
        return self._per_batch

    def _eval(self, grid: Grid) -> Tensor:
        out = self.fn(grid.b, grid.h, grid.q, grid.k)
        if not isinstance(out, Tensor) or out.dtype != torch.bool:
            raise TypeError(
                f"custom mask fn must return a bool tensor, got "
                f"{getattr(out, 'dtype', type(out).__name__)}"
            )
        return out

    def _spec(self) -> str:
        return f"custom({getattr(self.fn, '__name__', 'fn')})"


class _Tensor(Mask):
    def __init__(self, t: Tensor) -> None:
        if not isinstance(t, Tensor) or t.dtype != torch.bool:
            raise TypeError(
                f"mask tensor must be a bool tensor (True = may attend), got "
                f"{getattr(t, 'dtype', type(t).__name__)}"
            )
        if t.dim() not in (2, 3, 4):
            raise ValueError(
                f"mask tensor must have rank 2 (Lq, Lk), 3 (H, Lq, Lk) or "
                f"4 (B, H, Lq, Lk), got shape {tuple(t.shape)}"
            )
        self.t = t.view((1,) * (4 - t.dim()) + tuple(t.shape))
        self.per_head = self.t.shape[1] > 1

    @property
    def batch_size(self) -> int | None:
        return self.t.shape[0] if self.t.shape[0] > 1 else None

    @property
    def natural_length(self) -> int:
        return self.t.shape[3]

    def check(self, *, batch: int, heads: int, lq: int, lk: int) -> None:
        want = (batch, heads, lq, lk)
        if any(s not in (1, w) for s, w in zip(self.t.shape, want, strict=True)):
            raise ValueError(
                f"mask tensor of shape {tuple(self.t.shape)} does not broadcast to "
                f"(B, H, Lq, Lk) = {want}"
            )

    def _eval(self, grid: Grid) -> Tensor:
        return grid.gather(self.t.to(grid.k.device))

    def _spec(self) -> str:
        return f"tensor(shape={tuple(self.t.shape)})"


# ---------------------------------------------------------------------------------------
# public constructors


def causal() -> Mask:
    """Causal mask: query position ``p`` sees keys ``k <= p`` (bottom-right aligned).

    Example:
        >>> causal().dense(1, 3)[0, 0].tolist()   # one new token sees the whole history
        [[True, True, True]]
    """
    return _Causal()


def window(left: int, right: int = 0) -> Mask:
    """Sliding window: query position ``p`` sees keys ``p - left <= k <= p + right``.

    Example:
        >>> window(1, 1).dense(3, 3)[0, 0].int().tolist()
        [[1, 1, 0], [1, 1, 1], [0, 1, 1]]
    """
    return _Window(left, right)


def prefix(n: int) -> Mask:
    """Prefix-LM: every query sees keys ``k < n``; after the prefix it is causal.

    Example:
        >>> prefix(2).dense(3, 3)[0, 0].int().tolist()
        [[1, 1, 0], [1, 1, 0], [1, 1, 1]]
    """
    return _Prefix(n)


def padding(
    key_lengths: Sequence[int] | Tensor, query_lengths: Sequence[int] | Tensor | None = None
) -> Mask:
    """Padding: in batch item ``b`` keys ``k >= key_lengths[b]`` are hidden; rows
    ``i >= query_lengths[b]`` (query padding) see nothing and give output 0.

    Example:
        >>> padding([2, 3]).dense(1, 3)[:, 0, 0].int().tolist()
        [[1, 1, 0], [1, 1, 1]]
    """
    return _Padding(key_lengths, query_lengths)


def documents(doc_ids: Sequence[int] | Tensor) -> Mask:
    """Packed documents: a query sees only keys with the same document id.

    Args:
        doc_ids: ``(L,)`` or ``(B, L)`` integer ids, ``L == Lk``.

    Example:
        >>> documents([0, 0, 1]).dense(3, 3)[0, 0].int().tolist()
        [[1, 1, 0], [1, 1, 0], [0, 0, 1]]
    """
    return _Documents(doc_ids)


def global_tokens(indices: Sequence[int] | Tensor) -> Mask:
    """Global tokens: positions in ``indices`` see every key and are seen by every query.

    Combine with a local mask, e.g. ``window(64, 64) | global_tokens([0])`` (Longformer).

    Example:
        >>> global_tokens([0]).dense(3, 3)[0, 0].int().tolist()
        [[1, 1, 1], [1, 0, 0], [1, 0, 0]]
    """
    return _GlobalTokens(indices)


def dilated(window: int, dilation: int) -> Mask:
    """Dilated window: keys with ``|p - k| <= window`` and ``(p - k) % dilation == 0``.

    Example:
        >>> dilated(2, 2).dense(3, 3)[0, 0].int().tolist()
        [[1, 0, 1], [0, 1, 0], [1, 0, 1]]
    """
    return _Dilated(window, dilation)


def block_random(block_size: int, num_blocks: int, *, seed: int = 0) -> Mask:
    """BigBird's random blocks: each query block sees ``num_blocks`` random key blocks.

    The choice is seeded and fixed per key length. Combine with ``window`` and
    ``global_tokens`` for the full BigBird pattern.

    Example:
        >>> m = block_random(2, 1, seed=0)
        >>> int(m.dense(4, 4).sum())   # 2 query blocks x 1 key block x (2 x 2) pairs
        8
    """
    return _BlockRandom(block_size, num_blocks, seed)


def custom(fn: MaskFn, *, per_batch: bool = True, per_head: bool = True) -> Mask:
    """A mask from ``fn(b, h, q_pos, k) -> bool tensor`` on broadcastable index tensors.

    ``q_pos`` is the query *position* (row + Lk - Lq). Set ``per_batch``/``per_head`` to
    False when ``fn`` ignores ``b``/``h``: it is then evaluated once for all of them.

    Example:
        >>> m = custom(lambda b, h, q, k: (q - k) % 2 == 0, per_batch=False, per_head=False)
        >>> m.dense(2, 2)[0, 0].tolist()
        [[True, False], [False, True]]
    """
    return _Custom(fn, per_batch, per_head)


def tensor(t: Tensor) -> Mask:
    """A dense bool mask ``(Lq, Lk)``, ``(H, Lq, Lk)`` or ``(B, H, Lq, Lk)``; True = attend.

    Example:
        >>> tensor(torch.tensor([[True, False]])).dense(1, 2)[0, 0].tolist()
        [[True, False]]
    """
    return _Tensor(t)


def as_mask(x: Mask | Tensor | None) -> Mask | None:
    """Accept a :class:`Mask`, a bool tensor, or ``None``.

    Example:
        >>> as_mask(None) is None
        True
    """
    if x is None or isinstance(x, Mask):
        return x
    if isinstance(x, Tensor):
        if x.dtype != torch.bool:
            raise TypeError(
                f"mask= got a tensor of dtype {x.dtype}; masks are bool tensors "
                f"(True = may attend). Pass additive float tensors as bias="
            )
        return _Tensor(x)
    raise TypeError(
        f"mask= expects an attnlab.masks.Mask, a bool tensor or None, got {type(x).__name__}"
    )
