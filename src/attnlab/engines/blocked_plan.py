"""The blocked engine's plan: which query blocks run, which keys each reads, and which
tiles need the mask.

:func:`make_plan` turns a mask's block layout (union over batch and heads) into a
schedule of :class:`Block` s; :func:`kernel_plan` turns that schedule into the compiled
kernel's terms (:class:`KernelPlan`): key spans per row, and the mask evaluated once on
the partial tiles, or nothing at all when the mask reports exact key intervals per row
(:meth:`Mask.row_bounds <attnlab.masks.Mask.row_bounds>`). Masks are asked through their
public protocol only.
"""

from __future__ import annotations

import itertools
import math
import weakref
from dataclasses import dataclass, field

import torch
from torch import Tensor

from attnlab._grid import Grid
from attnlab.engines._dense_cache import KEPT_MAX
from attnlab.engines._memo import LastMask
from attnlab.engines._native import ops
from attnlab.engines.base import AttentionRequest
from attnlab.masks import BlockLayout, Mask, TileState

__all__ = [
    "LN2",
    "LOG2E",
    "Block",
    "KernelPlan",
    "Plan",
    "PlanCache",
    "kernel_plan",
    "make_plan",
    "natural_lse",
    "widen",
]

LN2, LOG2E = math.log(2.0), 1.0 / math.log(2.0)  # the kernel's logsumexp is in log2 units


def natural_lse(lse2: Tensor) -> Tensor:
    """The kernel's logsumexp in log2 units ``(B, Hq, Lq)`` in natural-log units, in its
    dtype: multiplied in float64 and rounded once (multiplied in float32, it was rounded
    twice). One-row calls stay at 1.5x plain PyTorch's float32 error at the median, from
    the kernel's scores (README, "few rows"), not from this rounding.

    Example:
        >>> natural_lse(torch.tensor([1.0, float("-inf")])).tolist()
        [0.6931471824645996, -inf]
    """
    return (lse2.double() * LN2).to(lse2.dtype)


@dataclass(frozen=True)
class Block:
    """One query block: its rows, the keys it reads, and which columns need the mask.

    Attributes:
        rows: ``(r0, r1)`` query rows.
        keys: a ``slice`` of key indices, or a 1-D index tensor (gathered keys).
        masked: ``(c0, c1)`` column ranges (into the block's keys) of partial tiles.
        has_full: whether some tile is full for every (batch, head): then no row of the
            block can be fully masked.
    """

    rows: tuple[int, int]
    keys: slice | Tensor
    masked: tuple[tuple[int, int], ...]
    has_full: bool = True

    def key_index(self, device: torch.device) -> Tensor:
        """The key indices as a tensor ``(Ks,)``."""
        if isinstance(self.keys, slice):
            return torch.arange(self.keys.start, self.keys.stop, device=device)
        return self.keys


_MaskPart = tuple[Tensor, Tensor, Tensor, Tensor, bool]  # blocks, tiles, allowed, spans, interval


@dataclass(frozen=True)
class Plan:
    """The work of one request: non-empty query blocks and the fraction of tiles kept
    (``computed_fraction``: their union over batch items; ``item_fraction``: the mean of
    each item's own, the tiles the compiled kernel computes under per-item key spans), and
    ``spans`` ``(Bm, 1, Lq, 2)``: each row's keys ``[lo, hi)`` where the mask allows exactly
    those (the same for every head), else None; kept with the plan, as the kernel's mask
    (asked per call, ``|`` and ``&`` combined their parts' bounds again each time).
    ``kernel`` holds :func:`kernel_plan`'s mask-dependent part, made once per plan."""

    blocks: tuple[Block, ...]
    computed_fraction: float
    item_fraction: float = 1.0
    spans: Tensor | None = None
    kernel: LastMask[_MaskPart] = field(
        default_factory=lambda: LastMask(keep=_fits), compare=False, repr=False
    )


def make_plan(mask: Mask | None, req: AttentionRequest, block: int) -> Plan:
    """Turn the mask's block layout (union over batch and heads) into a block schedule.

    The layout is read as runs of key tiles per query block (:meth:`BlockLayout.tile_runs
    <attnlab.masks.BlockLayout.tile_runs>`): for masks with row intervals no ``(nQ, nK)``
    table is made (a window over a million queries: 3.9 s and 2 GB, for 24 thousand of
    67 million tiles).
    """
    lq, lk = req.lq, req.lk
    if mask is None:
        spans = [(r, min(r + block, lq)) for r in range(0, lq, block)]
        return Plan(tuple(Block(r, slice(0, lk), ()) for r in spans), 1.0)
    layout = mask.block_layout(lq, lk, block, block, batch=req.batch, heads=req.heads)
    runs = layout.tile_runs(union=True).tolist()  # [[qb, k0, k1, state], ...] by qb, k0
    blocks: list[Block] = []
    start = 0
    for end in range(1, len(runs) + 1):
        if end == len(runs) or runs[end][0] != runs[start][0]:
            qb = runs[start][0]
            rows = (qb * block, min((qb + 1) * block, lq))
            blocks.append(_make_block(rows, runs[start:end], block, lk))
            start = end
    total = -(-lq // block) * -(-lk // block)
    kept = sum(k1 - k0 for _, k0, k1, _ in runs)
    fraction = kept / total if total else 0.0
    kernel_spans = _interval_spans(layout, req.batch if mask.per_batch else 1)
    return Plan(tuple(blocks), fraction, _item_fraction(layout), kernel_spans)


def _item_fraction(layout: BlockLayout) -> float:
    """The mean over batch items of each one's kept tiles (any head's): what the compiled
    kernel computes under per-item key spans. One head row from row bounds: the
    layout's own fraction, no ``(nQ, nK)`` table."""
    if layout.bounds is not None:
        return layout.computed_fraction if layout.lq and layout.lk else 0.0
    per_item = (layout.states != TileState.EMPTY).any(1)  # (Bm, nQ, nK)
    return float(per_item.float().mean()) if per_item.numel() else 0.0


class PlanCache:
    """The plan of the last request, and of the last mask object with its sizes and the
    versions of the tensors it holds (an in-place change of one, or a new mask, makes a
    new plan; :class:`LastMask`, versions read after planning: block_random keeps a new
    table then): every ``attention()`` call makes a new request, and a dilated window's
    plan at 4096 x 4096 took 340 ms of a 383 ms call, again for the same mask.

    Example:
        >>> from attnlab import masks
        >>> q = torch.randn(1, 1, 256, 8)
        >>> req = lambda m: AttentionRequest(q, q, q, m, None, 1.0, "dot", "softmax", 0.0,
        ...                                  False, False)
        >>> cache, m = PlanCache(), masks.dilated(64, 2)
        >>> cache.get(req(m), 64) is cache.get(req(m), 64)  # two calls, one mask object
        True
    """

    def __init__(self) -> None:
        """Empty; weak references only, so no request or mask is kept alive."""
        self._req: tuple[weakref.ref[AttentionRequest], Plan] | None = None
        self._mask: LastMask[Plan] = LastMask()

    def get(self, req: AttentionRequest, block: int) -> Plan:
        """:func:`make_plan` of ``req`` with ``block``, made again only when needed."""
        last = self._req  # read once: another thread may replace it meanwhile
        if last is not None and last[0]() is req:
            return last[1]
        mask = req.mask
        if mask is None:
            plan = make_plan(None, req, block)
        else:
            sizes = (req.lq, req.lk, req.batch, req.heads, block)
            plan = self._mask.get(mask, sizes, lambda: make_plan(mask, req, block))
        self._req = (weakref.ref(req), plan)
        return plan


def _make_block(rows: tuple[int, int], runs: list[list[int]], block: int, lk: int) -> Block:
    """The keys of one query block (slice if contiguous) and its partial column ranges;
    ``runs``: its runs ``[qb, k0, k1, state]`` of key tiles, in key order."""
    spans = [(k0 * block, min(k1 * block, lk)) for _, k0, k1, _ in runs]
    if all(a[1] == b[0] for a, b in itertools.pairwise(spans)):
        keys: slice | Tensor = slice(spans[0][0], spans[-1][1])
    else:
        keys = torch.cat([torch.arange(a, b) for a, b in spans])
    masked: list[tuple[int, int]] = []
    col = 0
    for run, (a, b) in zip(runs, spans, strict=True):
        if run[3] != TileState.FULL:
            if masked and masked[-1][1] == col:
                masked[-1] = (masked[-1][0], col + b - a)  # merge adjacent partial tiles
            else:
                masked.append((col, col + b - a))
        col += b - a
    has_full = any(run[3] == TileState.FULL for run in runs)
    return Block(rows, keys, tuple(masked), has_full=has_full)


@dataclass(frozen=True)
class KernelPlan:
    """The plan in the compiled kernel's terms (``csrc/blocked.cpp``).

    Attributes:
        blocks: ``(nblk, 4)`` int64: rows ``r0, r1`` and keys ``k0, k1`` of each block.
        tiles: ``(nblk, ntile)`` int64: for the block's j-th key tile, its index in
            ``allowed`` if the tile is partial, else -1 (full: no mask evaluation).
        allowed: ``(Bm, Hm, nP, bs, bs)`` bool: the mask on each partial tile.
        spans: ``(Bm, Hm, Lq, 2)`` int64: each row's key span ``[lo, hi)``, from its first
            allowed key to its last; the kernel computes only the union over a few rows.
        slopes: ``(Hq,)`` float32 slopes of a bias ``-slope_h |p - k|`` (ALiBi), evaluated
            in the kernel, or None.
        bs: the tile size.
        interval: the mask allows exactly each row's span (causal, windows, documents,
            prefixes, padding and their ``&``): the kernel masks by the spans alone and
            no tile is evaluated.
        softcap: the scores' soft-cap ``c`` (``c * tanh(s / c)`` before the bias and the
            mask), or 0.0 for none.
    """

    blocks: Tensor
    tiles: Tensor
    allowed: Tensor
    spans: Tensor
    slopes: Tensor | None
    bs: int
    interval: bool
    softcap: float = 0.0

    def args(self) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor | None, int, bool, float]:
        return (
            self.blocks,
            self.tiles,
            self.allowed,
            self.spans,
            self.slopes,
            self.bs,
            self.interval,
            self.softcap,
        )


def kernel_plan(req: AttentionRequest, plan: Plan, bs: int) -> KernelPlan | None:
    """The kernel's form of ``plan``, or None if the kernel cannot run it (gathered keys,
    or a bias that is not linear in distance, i.e. not ALiBi-like).

    The mask's part (blocks, tiles, the mask on the partial tiles and the row spans) is
    kept with ``plan`` (:data:`KEPT_MAX` elements of ``allowed`` at most): a plan kept
    for the same mask object (:class:`PlanCache`) evaluated its partial tiles again on
    every call, 8.1 ms of a 37 ms call for ``causal() | groups(...)`` at 1024 tokens.
    The bias's slopes and the soft-cap are read per call."""
    slopes = None if req.bias is None else req.bias.linear_distance_slopes()  # (Hq,)
    if req.bias is not None and slopes is None:
        return None
    if not plan.blocks or any(not isinstance(b.keys, slice) for b in plan.blocks):
        return None
    if slopes is not None:
        slopes = slopes.detach().to(device="cpu", dtype=torch.float32).contiguous()
    blocks, tiles, allowed, spans, interval = _mask_part(req, plan, bs)
    return KernelPlan(blocks, tiles, allowed, spans, slopes, bs, interval, kernel_softcap(req))


def _mask_part(req: AttentionRequest, plan: Plan, bs: int) -> _MaskPart:
    """:func:`_build_mask_part`, kept in ``plan.kernel`` (:class:`LastMask`: the mask held
    weakly) for its mask object, sizes and inference mode while ``allowed`` has at most
    :data:`KEPT_MAX` elements. The parts are only read (the kernel takes them as
    ``const``) and carry no autograd history."""
    mask = req.mask
    if mask is None:
        return _build_mask_part(req, plan, bs)
    key = (bs, req.lq, req.lk, req.batch, req.heads, torch.is_inference_mode_enabled())
    return plan.kernel.get(mask, key, lambda: _build_mask_part(req, plan, bs))


def _fits(part: _MaskPart) -> bool:
    """Whether ``part``'s mask on the partial tiles is small enough to keep."""
    return part[2].numel() <= KEPT_MAX


def _build_mask_part(req: AttentionRequest, plan: Plan, bs: int) -> _MaskPart:
    """The kernel's blocks, tile table, mask on the partial tiles and row spans of
    ``plan`` (every block's keys a slice), and whether the spans alone are the mask."""
    blocks = torch.tensor(
        [(*b.rows, b.keys.start, b.keys.stop) for b in plan.blocks],  # type: ignore[union-attr]
        dtype=torch.long,
    )
    spans = plan.spans
    if spans is not None:  # no tile to evaluate: the spans are the mask
        tiles = torch.full((len(plan.blocks), 1), -1, dtype=torch.long)
        allowed = torch.ones(spans.shape[0], 1, 0, bs, bs, dtype=torch.bool)
        return blocks, tiles, allowed, spans, True
    starts: list[tuple[int, int]] = []  # (first row, first key) of each partial tile
    table: list[list[int]] = []
    for blk in plan.blocks:
        k0, k1 = blk.keys.start, blk.keys.stop  # type: ignore[union-attr]
        ids = [-1] * -(-(k1 - k0) // bs)
        for c0, c1 in blk.masked:
            for j in range(c0 // bs, -(-c1 // bs)):
                ids[j] = len(starts)
                starts.append((blk.rows[0], k0 + j * bs))
        table.append(ids)
    width = max(len(t) for t in table)
    tiles = torch.tensor([t + [-1] * (width - len(t)) for t in table], dtype=torch.long)
    allowed = _allowed_tiles(req, starts, bs)
    spans = ops().row_spans(blocks, tiles, allowed, bs, req.lq)
    return blocks, tiles, allowed, spans, False


def kernel_softcap(req: AttentionRequest) -> float:
    """The request's soft-cap in the kernel's terms (its ops' ``softcap``): 0.0 for none."""
    return 0.0 if req.softcap is None else float(req.softcap)


def _interval_spans(layout: BlockLayout, bm: int) -> Tensor | None:
    """``(Bm, 1, Lq, 2)`` spans ``[lo, hi)`` on the CPU if the layout comes from row bounds
    (the mask allows exactly one key interval per row, the same for every head), else None;
    ``bm``: the mask's batch extent (``B`` for a per-batch mask, else 1)."""
    bounds, lq, lk = layout.bounds, layout.lq, layout.lk
    if bounds is None:
        return None
    lo = bounds.lo.clamp(0, lk)
    hi = (bounds.hi + 1).clamp(0, lk)
    spans = torch.stack([lo, hi], -1).expand(bm, lq, 2).reshape(bm, 1, lq, 2)
    return spans.to("cpu").contiguous()


def _allowed_tiles(req: AttentionRequest, starts: list[tuple[int, int]], bs: int) -> Tensor:
    """The mask on the partial tiles ``(Bm, Hm, nP, bs, bs)``, evaluated in one call.

    Tile ``p`` covers rows ``r0 .. r0 + bs`` and keys ``k0 .. k0 + bs`` of ``starts[p]``
    (indices past the end are clamped; the kernel never reads them). Library masks are
    elementwise in their coordinates, so all tiles are evaluated as one grid; custom
    masks get one grid per tile, the form they are documented to receive.
    """
    m = req.mask
    bm = req.batch if m is not None and m.per_batch else 1
    hm = req.heads if m is not None and m.per_head else 1
    if m is None or not starts:
        return torch.ones(bm, hm, 0, bs, bs, dtype=torch.bool)
    ar = torch.arange(bs)
    r0, c0 = torch.tensor(starts).unbind(1)  # (nP,) each
    rows = (r0[:, None] + ar).clamp(max=req.lq - 1)  # (nP, bs)
    keys = (c0[:, None] + ar).clamp(max=req.lk - 1)  # (nP, bs)
    if not m.elementwise:
        tiles = [
            m(Grid.tile(r, c, lq=req.lq, lk=req.lk, batch=bm, heads=hm)).expand(bm, hm, bs, bs)
            for r, c in zip(rows, keys, strict=True)
        ]
        return torch.stack(tiles, 2).cpu().contiguous()
    grid = Grid(
        b=torch.arange(bm).view(-1, 1, 1, 1),
        h=torch.arange(hm).view(1, -1, 1, 1),
        q=(rows + (req.lk - req.lq)).view(1, 1, -1, 1),
        k=keys[:, None, :].expand(-1, bs, -1).reshape(1, 1, -1, bs),
        lq=req.lq,
        lk=req.lk,
    )
    allowed = m(grid).expand(bm, hm, len(starts) * bs, bs)
    return allowed.reshape(bm, hm, len(starts), bs, bs).cpu().contiguous()


def widen(t: Tensor, dtype: torch.dtype, plan: Plan) -> Tensor:
    """Keys or values ``t (B, H, Lk, E)`` in ``dtype`` for the compiled kernel, which reads
    only the keys of ``plan``'s blocks, forward and backward. Where those are at most half
    of them (a window at the end of a long cache) and ``t`` wants no gradient, only they
    are converted, into a buffer whose other keys are never written or read: converting a
    whole half-precision cache took 91-95% of a few-row call's time (2-19x torch's SDPA,
    which reads it as it is); zeroing the rest (a lazy map) still took 2 ms at 8192 keys.

    Example:
        >>> from attnlab import masks
        >>> k = torch.randn(1, 1, 1024, 8, dtype=torch.bfloat16)
        >>> req = AttentionRequest(k[:, :, -2:], k, k, masks.causal() & masks.window(4), None,
        ...                        1.0, "dot", "softmax", 0.0, False, False)
        >>> w = widen(k, torch.float32, make_plan(req.mask, req, 128))
        >>> w.dtype, torch.equal(w[0, 0, -5:], k[0, 0, -5:].float())
        (torch.float32, True)
    """
    spans = [b.keys for b in plan.blocks]
    if t.dtype == dtype or not all(isinstance(s, slice) for s in spans) or not spans:
        return t.to(dtype)
    k0, k1 = min(s.start for s in spans), max(s.stop for s in spans)  # type: ignore[union-attr]
    if 2 * (k1 - k0) > t.shape[2] or (t.requires_grad and torch.is_grad_enabled()):
        return t.to(dtype)
    out = torch.empty(t.shape, dtype=dtype, device=t.device)  # (B, H, Lk, E)
    out[:, :, k0:k1] = t[:, :, k0:k1]
    return out
