"""The blocked engine: exact attention that skips masked-out work, forward and backward.

The query axis is cut into blocks of ``block`` rows. The mask's block layout says, for each
query block, which key tiles hold any allowed pair; only those keys are read (a zero-copy
slice when they are contiguous, as for windows, documents and causal masks, a gather
otherwise). Each query block then attends over its keys in one matmul, so no softmax has
to be merged across tiles and no ``Lq x Lk`` tensor exists: memory is
``O(block x keys of one block)``.

* Tiles that are empty for every (batch, head) are never computed.
* The mask is evaluated only on partial tiles; full tiles skip it.
* Biases are evaluated per block from their function (never as ``Lq x Lk``).
* Forward saves the per-row logsumexp; backward recomputes each block's probabilities from
  it and gives ``dq``, ``dk``, ``dv`` and the gradients of learnable biases.
* ``return_weights`` recomputes the normalized weights block by block from the logsumexp;
  :meth:`BlockedEngine.weights` returns only some heads and query rows.
"""

from __future__ import annotations

import dataclasses
import weakref
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from attnlab._grid import Grid
from attnlab.bias import ALiBi, Bias
from attnlab.engines._native import kernel, kernel_error
from attnlab.engines.base import AttentionRequest, Engine, EngineResult, may_hold_nan
from attnlab.masks import Mask, TileState, _Causal, _Combined, _Custom, _Not
from attnlab.scores import grouped_matmul

__all__ = ["BlockedEngine", "kernel", "kernel_error"]


@dataclass(frozen=True)
class _Block:
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


@dataclass(frozen=True)
class _Plan:
    """The work of one request: non-empty query blocks and the fraction of tiles kept."""

    blocks: tuple[_Block, ...]
    computed_fraction: float


def _plan(mask: Mask | None, req: AttentionRequest, block: int) -> _Plan:
    """Turn the mask's block layout (union over batch and heads) into a block schedule."""
    lq, lk = req.lq, req.lk
    if mask is None:
        spans = [(r, min(r + block, lq)) for r in range(0, lq, block)]
        return _Plan(tuple(_Block(r, slice(0, lk), ()) for r in spans), 1.0)
    layout = mask.block_layout(lq, lk, block, block, batch=req.batch, heads=req.heads)
    states = layout.states.flatten(0, 1)  # (Bm*Hm, nQ, nK)
    needed = (states != TileState.EMPTY).any(0)  # (nQ, nK)
    full = (states == TileState.FULL).all(0)  # (nQ, nK)
    blocks: list[_Block] = []
    for qb in range(needed.shape[0]):
        kbs = needed[qb].nonzero().flatten().tolist()
        if kbs:
            rows = (qb * block, min((qb + 1) * block, lq))
            blocks.append(_make_block(rows, kbs, full[qb], block, lk))
    frac = float(needed.float().mean()) if needed.numel() else 0.0
    return _Plan(tuple(blocks), frac)


def _make_block(
    rows: tuple[int, int], kbs: list[int], full_row: Tensor, block: int, lk: int
) -> _Block:
    """The keys of one query block (slice if contiguous) and its partial column ranges."""
    full = full_row.tolist()
    spans = [(kb * block, min((kb + 1) * block, lk)) for kb in kbs]
    if kbs[-1] - kbs[0] + 1 == len(kbs):
        keys: slice | Tensor = slice(spans[0][0], spans[-1][1])
    else:
        keys = torch.cat([torch.arange(a, b) for a, b in spans])
    masked: list[tuple[int, int]] = []
    col = 0
    for kb, (a, b) in zip(kbs, spans, strict=True):
        if not full[kb]:
            if masked and masked[-1][1] == col:
                masked[-1] = (masked[-1][0], col + b - a)  # merge adjacent partial tiles
            else:
                masked.append((col, col + b - a))
        col += b - a
    return _Block(rows, keys, tuple(masked), has_full=any(full[kb] for kb in kbs))


@dataclass(frozen=True)
class _KernelPlan:
    """The plan in the compiled kernel's terms (``csrc/blocked.cpp``).

    Attributes:
        blocks: ``(nblk, 4)`` int64: rows ``r0, r1`` and keys ``k0, k1`` of each block.
        tiles: ``(nblk, ntile)`` int64: for the block's j-th key tile, its index in
            ``allowed`` if the tile is partial, else -1 (full: no mask evaluation).
        allowed: ``(Bm, Hm, nP, bs, bs)`` bool: the mask on each partial tile.
        spans: ``(Bm, Hm, Lq, 2)`` int64: each row's key span ``[lo, hi)``, from its first
            allowed key to its last; the kernel computes only the union over a few rows.
        slopes: ``(Hq,)`` float32 ALiBi slopes (evaluated in the kernel), or None.
        bs: the tile size.
        interval: the mask allows exactly each row's span (causal, windows, documents,
            prefixes, padding and their ``&``): the kernel masks by the spans alone and
            no tile is evaluated.
    """

    blocks: Tensor
    tiles: Tensor
    allowed: Tensor
    spans: Tensor
    slopes: Tensor | None
    bs: int
    interval: bool

    def args(self) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor | None, int, bool]:
        return (
            self.blocks,
            self.tiles,
            self.allowed,
            self.spans,
            self.slopes,
            self.bs,
            self.interval,
        )


def _kernel_plan(req: AttentionRequest, plan: _Plan, bs: int) -> _KernelPlan | None:
    """The kernel's form of ``plan``, or None if the kernel cannot run it (gathered keys,
    or a bias other than ALiBi)."""
    if req.bias is not None and type(req.bias) is not ALiBi:
        return None
    if not plan.blocks or any(not isinstance(b.keys, slice) for b in plan.blocks):
        return None
    blocks = torch.tensor(
        [(*b.rows, b.keys.start, b.keys.stop) for b in plan.blocks],  # type: ignore[union-attr]
        dtype=torch.long,
    )
    slopes = None
    if req.bias is not None:
        slopes = req.bias.slopes.detach().to(device="cpu", dtype=torch.float32).contiguous()
    spans = _interval_spans(req)
    if spans is not None:  # no tile to evaluate: the spans are the mask
        tiles = torch.full((len(plan.blocks), 1), -1, dtype=torch.long)
        allowed = torch.ones(spans.shape[0], 1, 0, bs, bs, dtype=torch.bool)
        return _KernelPlan(blocks, tiles, allowed, spans, slopes, bs, True)
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
    spans = _ops().row_spans(blocks, tiles, allowed, bs, req.lq)
    return _KernelPlan(blocks, tiles, allowed, spans, slopes, bs, False)


def _interval_spans(req: AttentionRequest) -> Tensor | None:
    """``(Bm, 1, Lq, 2)`` spans ``[lo, hi)`` if the mask allows exactly one key interval
    per row (the same for every head), else None."""
    m = req.mask
    if m is None or m.per_head:
        return None
    bm = req.batch if m.per_batch else 1
    bounds = m._row_bounds(req.lq, req.lk, bm, "cpu")
    if bounds is None or not bounds.exact:
        return None
    lo = bounds.lo.clamp(0, req.lk)
    hi = (bounds.hi + 1).clamp(0, req.lk)
    return torch.stack([lo, hi], -1).expand(bm, req.lq, 2).reshape(bm, 1, req.lq, 2).contiguous()


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
    if _has_custom(m):
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


def _has_custom(m: Mask) -> bool:
    """Whether a user-defined mask function is part of ``m``."""
    if isinstance(m, _Custom):
        return True
    if isinstance(m, _Combined):
        return any(_has_custom(p) for p in m.parts)
    return isinstance(m, _Not) and _has_custom(m.inner)


def _take(x: Tensor, keys: slice | Tensor) -> Tensor:
    """Rows of ``x (B, H, L, E)`` at ``keys``: a view for slices, a gather otherwise."""
    if isinstance(keys, slice):
        return x[:, :, keys]
    return x.index_select(2, keys.to(x.device))


def _grid(req: AttentionRequest, blk: _Block, keys: Tensor, batch: bool, heads: bool) -> Grid:
    rows = torch.arange(*blk.rows, device=keys.device)
    return Grid.tile(
        rows,
        keys,
        lq=req.lq,
        lk=req.lk,
        batch=req.batch if batch else 1,
        heads=req.heads if heads else 1,
    )


def _block_tile(
    req: AttentionRequest, blk: _Block, keys: Tensor, dtype: torch.dtype, *, bias_grad: bool = False
) -> tuple[Tensor | None, Tensor | None]:
    """The additive bias-and-mask tile ``(Bt, Ht, T, Ks)`` of one query block, or None.

    Masked pairs are ``-inf``; the mask is evaluated only on the block's partial columns.
    Also returns the bias tile with its autograd graph (with ``bias_grad``).
    """
    tile = bias_tile = None
    if req.bias is not None:
        with torch.set_grad_enabled(bias_grad):
            bias_tile = req.bias(_grid(req, blk, keys, req.bias.per_batch, req.bias.per_head))
        tile = bias_tile.detach().to(dtype)
    if req.mask is not None and blk.masked:
        m = req.mask
        t = blk.rows[1] - blk.rows[0]
        if tile is None:
            tile = torch.zeros(1, 1, t, len(keys), dtype=dtype, device=keys.device)
        for c0, c1 in blk.masked:
            allowed = m(_grid(req, blk, keys[c0:c1], m.per_batch, m.per_head))
            shape = torch.broadcast_shapes(tile.shape, (*allowed.shape[:2], 1, 1))
            tile = tile.expand(shape).clone() if tile.shape != shape else tile
            tile[..., c0:c1].masked_fill_(~allowed, float("-inf"))
    return tile, bias_tile


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Softmax statistics run in float32 at least (float64 stays float64)."""
    return torch.promote_types(dtype, torch.float32)


def _softmax_lse(s: Tensor) -> tuple[Tensor, Tensor]:
    """Probabilities and logsumexp of ``s (..., Ks)``; fully masked rows give 0 and -inf."""
    m = s.amax(-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    p = torch.exp(s - m)
    total = p.sum(-1, keepdim=True)
    p = p / torch.where(total > 0, total, torch.ones_like(total))
    lse = torch.where(total > 0, m + torch.log(total), float("-inf"))
    return p, lse.squeeze(-1)


def _probs(s: Tensor, lse: Tensor) -> Tensor:
    """Recompute probabilities ``exp(s - lse)`` (0 on fully masked rows)."""
    safe = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse)).unsqueeze(-1)
    return torch.exp(s - safe)


def _group_sum(x: Tensor, hkv: int) -> Tensor:
    """Sum ``(B, Hq, L, E)`` over the query heads that share a key/value head."""
    b, hq = x.shape[:2]
    return x if hq == hkv else x.view(b, hkv, hq // hkv, *x.shape[2:]).sum(2)


def _sum_to(x: Tensor, shape: torch.Size) -> Tensor:
    """Sum ``x`` over the dims where ``shape`` broadcasts (size 1)."""
    dims = [i for i, (a, b) in enumerate(zip(x.shape, shape, strict=True)) if b == 1 and a != 1]
    return x.sum(dims, keepdim=True) if dims else x


def _bias_leaves(bias: Bias | None) -> list[Tensor]:
    """The tensors of ``bias`` that autograd should reach (parameters and grad buffers)."""
    if bias is None:
        return []
    return [t for t in (*bias.parameters(), *bias.buffers()) if t.requires_grad]


# torch's fused CPU flash kernel with its logsumexp (a private op: guarded, with a fallback)
_FLASH_FWD: Any = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
_FLASH_BWD: Any = getattr(
    torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None
)
USE_FUSED = True  # tests switch this off to check the eager fallback
USE_KERNEL = True  # tests switch this off to check torch's per-block kernel
ROWS = [32, 64]  # query rows per task of the kernel's forward and backward
STATS: dict[str, int] = {}  # scores the kernel's last forward computed (for tests, benchmarks)


def _fused_ok(q: Tensor, k: Tensor, v: Tensor, leaves: tuple[Tensor, ...]) -> bool:
    """Whether the fused CPU kernel can run this call: CPU, equal head dims, no bias grads,
    and no NaN (the fused kernel turns NaN rows into 0)."""
    return (
        USE_FUSED
        and _FLASH_FWD is not None
        and _FLASH_BWD is not None
        and q.device.type == "cpu"
        and q.shape[-1] == v.shape[-1]
        and not leaves
        and not may_hold_nan(q, k, v)
    )


def _ops() -> Any:
    """The compiled kernel's ops (callers have checked :func:`_kernel_ok`)."""
    ops = kernel()
    if ops is None:  # pragma: no cover - guarded by _kernel_ok
        raise RuntimeError(f"attnlab's CPU kernel is unavailable: {kernel_error()}")
    return ops


def _kernel_ok(req: AttentionRequest, leaves: list[Tensor]) -> bool:
    """Whether attnlab's compiled kernel can run this call (float32 or half on the CPU, no
    bias gradients, no NaN) and could be built."""
    q, k, v = req.q, req.k, req.v
    if not (USE_KERNEL and _acc_dtype(q.dtype) == torch.float32 and q.device.type == "cpu"):
        return False
    return not leaves and not may_hold_nan(q, k, v) and kernel() is not None


def _empty_rows(tile: Tensor | None) -> Tensor | None:
    """Rows ``(Bt, Ht, T)`` of an additive tile that allow no key, or None if none do."""
    if tile is None:
        return None
    empty = torch.isneginf(tile).all(-1)
    return empty if bool(empty.any()) else None


def _block_forward(
    req: AttentionRequest, q: Tensor, k: Tensor, v: Tensor, blk: _Block, fused: bool
) -> tuple[Tensor, Tensor]:
    """Output ``(B, Hq, T, Ev)`` and logsumexp ``(B, Hq, T)`` of one query block."""
    r0, r1 = blk.rows
    keys = blk.key_index(q.device)
    tile, _ = _block_tile(req, blk, keys, q.dtype)
    k_sel, v_sel = _take(k, blk.keys), _take(v, blk.keys)
    if fused:
        out, lse = _FLASH_FWD(
            q[:, :, r0:r1], k_sel, v_sel, 0.0, False, attn_mask=tile, scale=req.scale
        )
        empty = None if blk.has_full else _empty_rows(tile)
        return out, (lse if empty is None else lse.masked_fill(empty, float("-inf")))
    s = grouped_matmul(q[:, :, r0:r1] * req.scale, k_sel.transpose(-1, -2))  # (B, Hq, T, Ks)
    p, lse = _softmax_lse(s if tile is None else s + tile)
    return grouped_matmul(p, v_sel), lse


class _BlockedAttention(torch.autograd.Function):
    """Blocked attention with a logsumexp-recompute backward.

    Three implementations of the same plan, tried in order: attnlab's compiled tile kernel
    (``kplan``), torch's fused CPU flash kernel per block, eager PyTorch per block.
    """

    @staticmethod
    def forward(
        ctx: Any,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        req: AttentionRequest,
        plan: _Plan,
        kplan: _KernelPlan | None,
        *leaves: Tensor,
    ) -> tuple[Tensor, Tensor]:
        ctx.dtypes = (q.dtype, k.dtype, v.dtype)
        acc = _acc_dtype(q.dtype)  # half precision runs in float32 throughout
        q, k, v = q.to(acc), k.to(acc), v.to(acc)
        ops = kernel() if kplan is not None else None
        fused = ops is None and _fused_ok(q, k, v, leaves)
        if ops is not None:
            q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
            out, lse, work = ops.forward(q, k, v, *kplan.args(), req.scale, ROWS[0])  # type: ignore[union-attr]
            STATS["scores"] = work
        else:
            out = q.new_zeros((*q.shape[:3], v.shape[-1]))  # (B, Hq, Lq, Ev)
            lse = torch.full(q.shape[:3], float("-inf"), device=q.device, dtype=acc)
            for blk in plan.blocks:
                r0, r1 = blk.rows
                out[:, :, r0:r1], lse[:, :, r0:r1] = _block_forward(req, q, k, v, blk, fused)
        ctx.save_for_backward(q, k, v, out, lse, *leaves)
        ctx.req, ctx.plan, ctx.fused = req, plan, fused
        ctx.kernel = (ops, kplan) if ops is not None else None
        ctx.mark_non_differentiable(lse)
        return out.to(ctx.dtypes[2]), lse

    @staticmethod
    def backward(ctx: Any, dout: Tensor, _dlse: Tensor | None) -> tuple[Tensor | None, ...]:
        q, k, v, out, lse, *leaves = ctx.saved_tensors
        dout = dout.to(q.dtype)
        delta = (dout * out).sum(-1)  # (B, Hq, Lq)
        if ctx.kernel is not None:
            ops, kplan = ctx.kernel
            dq, dk, dv = ops.backward(
                dout.contiguous(), q, k, v, lse, delta, *kplan.args(), ctx.req.scale, ROWS[1]
            )
            grads = _Grads((dq, dk, dv), [])
        else:
            sv = _Saved(ctx.req, q, k, v, out, lse, dout, delta, leaves)
            grads = _Grads.zeros(q, k, v, leaves)
            step = _fused_block_backward if ctx.fused else _eager_block_backward
            for blk in ctx.plan.blocks:
                step(sv, blk, grads)
        dq, dk, dv = (g.to(t) for g, t in zip(grads.qkv, ctx.dtypes, strict=True))
        return (dq, dk, dv, None, None, None, *grads.leaves)


@dataclass(frozen=True)
class _Saved:
    """What one backward pass reads: the forward's tensors and the upstream gradient.

    ``delta`` is ``rowsum(dout * out)`` ``(B, Hq, Lq)``; ``leaves`` are the bias tensors
    that need gradients.
    """

    req: AttentionRequest
    q: Tensor
    k: Tensor
    v: Tensor
    out: Tensor
    lse: Tensor
    dout: Tensor
    delta: Tensor
    leaves: list[Tensor]


@dataclass
class _Grads:
    """Gradient accumulators of one backward pass."""

    qkv: tuple[Tensor, Tensor, Tensor]
    leaves: list[Tensor]

    @staticmethod
    def zeros(q: Tensor, k: Tensor, v: Tensor, leaves: list[Tensor]) -> _Grads:
        return _Grads(
            (torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)),
            [torch.zeros_like(t) for t in leaves],
        )


def _fused_block_backward(sv: _Saved, blk: _Block, grads: _Grads) -> None:
    """One block's dq, dk, dv through torch's fused CPU flash backward."""
    req, q, k, v, out, lse, dout = sv.req, sv.q, sv.k, sv.v, sv.out, sv.lse, sv.dout
    r0, r1 = blk.rows
    tile, _ = _block_tile(req, blk, blk.key_index(q.device), q.dtype)
    lse_b = lse[:, :, r0:r1]
    lse_b = torch.where(torch.isfinite(lse_b), lse_b, torch.zeros_like(lse_b))
    dq_b, dk_b, dv_b = _FLASH_BWD(
        dout[:, :, r0:r1].contiguous(),
        q[:, :, r0:r1],
        _take(k, blk.keys),
        _take(v, blk.keys),
        out[:, :, r0:r1],
        lse_b.contiguous(),
        0.0,
        False,
        attn_mask=tile,
        scale=req.scale,
    )
    dq, dk, dv = grads.qkv
    dq[:, :, r0:r1] += dq_b
    _scatter_add(dk, blk.keys, dk_b)
    _scatter_add(dv, blk.keys, dv_b)


def _eager_block_backward(sv: _Saved, blk: _Block, grads: _Grads) -> None:
    """One block's dq, dk, dv and bias gradients, recomputing probabilities from ``lse``."""
    req, q, k, v, lse, dout, leaves = sv.req, sv.q, sv.k, sv.v, sv.lse, sv.dout, sv.leaves
    r0, r1 = blk.rows
    hkv = k.shape[1]
    tile, bias_tile = _block_tile(
        req, blk, blk.key_index(q.device), q.dtype, bias_grad=bool(leaves)
    )
    qs, k_sel, v_sel = q[:, :, r0:r1] * req.scale, _take(k, blk.keys), _take(v, blk.keys)
    s = grouped_matmul(qs, k_sel.transpose(-1, -2))  # (B, Hq, T, Ks)
    p = _probs(s if tile is None else s + tile, lse[:, :, r0:r1])
    do = dout[:, :, r0:r1]  # (B, Hq, T, Ev)
    dp = grouped_matmul(do, v_sel.transpose(-1, -2))  # (B, Hq, T, Ks)
    ds = p * (dp - sv.delta[:, :, r0:r1].unsqueeze(-1))  # (B, Hq, T, Ks)
    dq, dk, dv = grads.qkv
    dq[:, :, r0:r1] += grouped_matmul(ds, k_sel) * req.scale
    _scatter_add(dk, blk.keys, _group_sum(ds.transpose(-1, -2) @ qs, hkv))
    _scatter_add(dv, blk.keys, _group_sum(p.transpose(-1, -2) @ do, hkv))
    if bias_tile is not None and leaves:
        gs = torch.autograd.grad(
            bias_tile, leaves, _sum_to(ds, bias_tile.shape).to(bias_tile.dtype), allow_unused=True
        )
        for acc, g in zip(grads.leaves, gs, strict=True):
            if g is not None:
                acc += g


def _scatter_add(dst: Tensor, keys: slice | Tensor, src: Tensor) -> None:
    """``dst[:, :, keys] += src`` for a slice or an index tensor (duplicates accumulate)."""
    if isinstance(keys, slice):
        dst[:, :, keys] += src
    else:
        dst.index_add_(2, keys.to(dst.device), src)


class BlockedEngine(Engine):
    """Exact, tile-skipping attention for dot-product softmax with any mask and bias."""

    name = "blocked"
    exact = True
    summary = (
        "dot/cosine score, softmax, any mask (skips empty tiles, masks only partial "
        "ones) and bias (per tile), GQA, autograd incl. learnable biases, lse, "
        "weights (recomputed per block, no autograd); no dropout"
    )

    def __init__(self, block: int = 128) -> None:
        self.block = block
        # the last request's plan; a weak reference, so its tensors are not kept alive
        self._cache: tuple[weakref.ref[AttentionRequest], _Plan] | None = None

    def plan(self, req: AttentionRequest) -> _Plan:
        """The block schedule of ``req`` (memoized for the last request)."""
        if self._cache is None or self._cache[0]() is not req:
            self._cache = (weakref.ref(req), _plan(req.mask, req, self.block))
        return self._cache[1]

    def unsupported(self, req: AttentionRequest) -> str | None:
        if req.score not in ("dot", "cosine"):
            return "the blocked engine computes dot and cosine scores only, not a callable"
        if req.normalize != "softmax":
            return f"the blocked engine normalizes with softmax only, not {req.normalize!r}"
        if req.dropout_p > 0:
            return "the blocked engine does not apply dropout (dropout_p > 0)"
        if req.return_weights and req.needs_grad:
            return "the blocked engine returns weights without autograd; use 'reference'"
        if req.batch == 0 or req.lq == 0 or req.lk == 0:
            return "the blocked engine does not accept empty batches or sequences"
        return None

    def forward(self, req: AttentionRequest) -> EngineResult:
        if req.score == "cosine":
            req = _normalized(req)
        plan = self.plan(req)
        leaves = _bias_leaves(req.bias)
        kplan = _kernel_plan(req, plan, self.block) if _kernel_ok(req, leaves) else None
        out, lse = _BlockedAttention.apply(req.q, req.k, req.v, req, plan, kplan, *leaves)
        weights = _weights(req, plan) if req.return_weights else None
        return out, weights, (lse.to(req.q.dtype) if req.return_lse else None)

    def weights(
        self,
        req: AttentionRequest,
        heads: list[int] | None = None,
        rows: tuple[int, int] | None = None,
    ) -> Tensor:
        """Weights ``(B, len(heads), r1 - r0, Lk)`` of some heads and query rows.

        Only the query blocks that overlap ``rows`` are computed.
        """
        if req.score == "cosine":
            req = _normalized(req)
        return _weights(req, self.plan(req), heads, rows)

    def prefers(self, req: AttentionRequest) -> bool:
        """Whether ``auto`` should pick this engine over SDPA for ``req``."""
        if req.mask is None or (isinstance(req.mask, _Causal) and req.bias is None):
            return False  # SDPA's flash kernel is at the roofline for dense and causal
        if req.lq * req.lk < 1 << 18:
            return False
        return self.plan(req).computed_fraction < 0.6


def _normalized(req: AttentionRequest) -> AttentionRequest:
    """Cosine scores are dot scores of unit vectors."""
    qn = torch.nn.functional.normalize(req.q, dim=-1, eps=1e-12)
    kn = torch.nn.functional.normalize(req.k, dim=-1, eps=1e-12)
    return dataclasses.replace(req, q=qn, k=kn, score="dot")


def _weights(
    req: AttentionRequest,
    plan: _Plan,
    heads: list[int] | None = None,
    rows: tuple[int, int] | None = None,
) -> Tensor:
    """Normalized weights ``(B, len(heads), r1 - r0, Lk)`` recomputed block by block.

    Each query block holds all keys its rows may see, so its softmax is complete on its
    own: only the blocks that overlap ``rows`` are computed.
    """
    r_lo, r_hi = rows if rows is not None else (0, req.lq)
    hs = list(range(req.heads)) if heads is None else heads
    acc = _acc_dtype(req.q.dtype)
    with torch.no_grad():
        q, k = req.q.to(acc), req.k.to(acc)
        w = req.q.new_zeros((req.batch, len(hs), r_hi - r_lo, req.lk))
        for blk in plan.blocks:
            a, b = max(blk.rows[0], r_lo), min(blk.rows[1], r_hi)
            if a >= b:
                continue
            keys = blk.key_index(q.device)
            tile, _ = _block_tile(req, blk, keys, acc)
            s = grouped_matmul(
                q[:, :, blk.rows[0] : blk.rows[1]] * req.scale, _take(k, blk.keys).transpose(-1, -2)
            )  # (B, Hq, T, Ks)
            s = s if tile is None else s + tile
            p, _ = _softmax_lse(s[:, hs, a - blk.rows[0] : b - blk.rows[0]])
            w[:, :, a - r_lo : b - r_lo].index_copy_(-1, blk.key_index(w.device), p.to(w.dtype))
    return w
