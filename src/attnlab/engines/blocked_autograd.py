"""The blocked engine's computation: one autograd function over a plan, three ways.

:class:`BlockedAttention` runs a :class:`~attnlab.engines.blocked_plan.Plan` with
attnlab's compiled tile kernel when it can (``csrc/blocked.cpp``, float32 and half on the
CPU, ALiBi-like biases), else torch's fused CPU flash kernel per query block, else eager
PyTorch per block (any bias, learnable ones included, float64). Forward saves the per-row
logsumexp; backward recomputes each block's probabilities from it and gives ``dq``,
``dk``, ``dv`` and the gradients of learnable biases: the kernel's own backward, else
eager PyTorch per block (torch's fused CPU flash backward in float32 carried 3-7x plain
PyTorch's error in dV, and 2-4x in dQ and dK, past flash-attn's 2x rule).

Tests switch paths with the module flags :data:`USE_KERNEL` and :data:`USE_FUSED`, and
read the kernel's work counter in :data:`STATS`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from attnlab._eager import any_nan, first_order_only, legacy_batched, no_forward_mode
from attnlab._grid import Grid
from attnlab.engines._leaves import bias_leaves, holding
from attnlab.engines._native import kernel, kernel_error
from attnlab.engines.base import AttentionRequest, may_hold_nan, weighted_values
from attnlab.engines.blocked_plan import LN2 as LN2
from attnlab.engines.blocked_plan import LOG2E as LOG2E
from attnlab.engines.blocked_plan import Block, KernelPlan, Plan, natural_lse, widen
from attnlab.scores import grouped_matmul, scores_of

__all__ = [
    "ROWS",
    "STATS",
    "USE_FUSED",
    "USE_KERNEL",
    "BlockedAttention",
    "acc_dtype",
    "bias_leaves",
    "block_tile",
    "blocked_attention",
    "cap_scores",
    "kernel",
    "kernel_backward",
    "kernel_error",
    "kernel_ok",
    "softmax_lse",
    "take",
]


def take(x: Tensor, keys: slice | Tensor) -> Tensor:
    """Rows of ``x (B, H, L, E)`` at ``keys``: a view for slices, a gather otherwise."""
    if isinstance(keys, slice):
        return x[:, :, keys]
    return x.index_select(2, keys.to(x.device))


def _grid(req: AttentionRequest, blk: Block, keys: Tensor, batch: bool, heads: bool) -> Grid:
    rows = torch.arange(*blk.rows, device=keys.device)
    return Grid.tile(
        rows,
        keys,
        lq=req.lq,
        lk=req.lk,
        batch=req.batch if batch else 1,
        heads=req.heads if heads else 1,
        dtype=req.q.dtype,
    )


def block_tile(
    req: AttentionRequest, blk: Block, keys: Tensor, dtype: torch.dtype, *, bias_grad: bool = False
) -> tuple[Tensor | None, Tensor | None]:
    """The additive bias-and-mask tile ``(Bt, Ht, T, Ks)`` of one query block, or None.

    Masked pairs are ``-inf``; the mask is evaluated only on the block's partial columns.
    Also returns the bias tile with its autograd graph (with ``bias_grad``).
    """
    tile = bias_tile = None
    t = blk.rows[1] - blk.rows[0]
    if req.bias is not None:
        with torch.set_grad_enabled(bias_grad):  # (backward runs without grad mode)
            bias_tile = req.bias(_grid(req, blk, keys, req.bias.per_batch, req.bias.per_head))
            bias_tile = bias_tile.reshape((1,) * (4 - bias_tile.dim()) + bias_tile.shape)
        tile = bias_tile.detach().to(dtype)  # a key or row bias broadcasts over the tile:
        tile = tile.expand(*tile.shape[:2], t, len(keys))  # the mask writes every pair
    if req.mask is not None and blk.masked:
        m = req.mask
        if tile is None:
            tile = torch.zeros(1, 1, t, len(keys), dtype=dtype, device=keys.device)
        for c0, c1 in blk.masked:
            allowed = m(_grid(req, blk, keys[c0:c1], m.per_batch, m.per_head))
            shape = torch.broadcast_shapes(tile.shape, (*allowed.shape[:2], 1, 1))
            tile = tile.expand(shape).contiguous()  # a copy where it was a broadcast
            tile[..., c0:c1].masked_fill_(~allowed, float("-inf"))
    return tile, bias_tile


def cap_scores(s: Tensor, softcap: float | None) -> Tensor:
    """Logit soft-capping ``softcap * tanh(s / softcap)`` of scaled scores (None: ``s``).

    Example:
        >>> cap_scores(torch.tensor([0.0, 100.0]), 5.0).tolist()
        [0.0, 5.0]
    """
    return s if softcap is None else torch.tanh(s / softcap) * softcap


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Softmax statistics run in float32 at least (float64 stays float64)."""
    return torch.promote_types(dtype, torch.float32)


def softmax_lse(s: Tensor) -> tuple[Tensor, Tensor]:
    """Probabilities and logsumexp of ``s (..., Ks)``; fully masked rows give 0 and -inf,
    rows with a NaN score NaN (the lse was -inf there, and the backward took the row's
    unnormalized exponentials for its probabilities)."""
    m = s.amax(-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    p = torch.exp(s - m)
    total = p.sum(-1, keepdim=True)
    some = total != 0  # NaN rows too: their sum is NaN
    p = p / torch.where(some, total, torch.ones_like(total))
    lse = torch.where(some, m + torch.log(total), float("-inf"))
    return p, lse.squeeze(-1)


def _probs(s: Tensor, lse: Tensor) -> Tensor:
    """Recompute probabilities ``exp(s - lse)`` (0 on fully masked rows, NaN on rows whose
    lse is NaN), a new tensor."""
    safe = lse.masked_fill(torch.isinf(lse), 0.0).unsqueeze(-1)
    return torch.exp(s - safe)


def _group_sum(x: Tensor, hkv: int) -> Tensor:
    """Sum ``(B, Hq, L, E)`` over the query heads that share a key/value head."""
    b, hq = x.shape[:2]
    return x if hq == hkv else x.view(b, hkv, hq // hkv, *x.shape[2:]).sum(2)


def _sum_to(x: Tensor, shape: torch.Size) -> Tensor:
    """Sum ``x`` over the dims where ``shape`` broadcasts (size 1)."""
    dims = [i for i, (a, b) in enumerate(zip(x.shape, shape, strict=True)) if b == 1 and a != 1]
    return x.sum(dims, keepdim=True) if dims else x


# torch's fused CPU flash kernel with its logsumexp (a private op: guarded, with a fallback)
_FLASH_FWD: Any = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
USE_FUSED = True  # tests switch this off to check the eager fallback
USE_KERNEL = True  # tests switch this off to check torch's per-block kernel
# query rows per task of the kernel's forward, and per row group of its backward: a group
# computes its rows' whole key span (a window's rows: window + group keys), keeps its P and
# dP over that span between two passes, and transposes them in vector blocks (32: 18-28%
# faster forward+backward than 64 on AVX512 and AVX2, 2026-12-01; see the README)
ROWS = [32, 32]
# floats a row group of the kernel's backward may keep of its P, dP (and a cap's
# derivative) over its key span, for a delta of its own (blocked.cpp's kOwnDeltaFloats)
KEEP_FLOATS = 1 << 22
STATS: dict[str, int] = {}  # scores the kernel's last forward computed (for tests, benchmarks)


def _fused_ok(q: Tensor, k: Tensor, v: Tensor, leaves: tuple[Tensor, ...]) -> bool:
    """Whether the fused CPU kernel can run this call: CPU, equal head dims, no bias grads,
    and no NaN (the fused kernel turns NaN rows into 0)."""
    return (
        USE_FUSED
        and _FLASH_FWD is not None
        and q.device.type == "cpu"
        and q.shape[-1] == v.shape[-1]
        and not leaves
        and not may_hold_nan(q, k, v)
    )


def kernel_ok(req: AttentionRequest, leaves: list[Tensor]) -> bool:
    """Whether attnlab's compiled kernel can run this call (float32 or half on the CPU, no
    bias gradients) and could be built. It soft-caps the scores itself; sinks join its
    output and lse afterwards (the engine's :func:`~attnlab.engines.base.with_sinks`).

    NaN input needs no screen here: the kernel passes a NaN in ``q``, ``k`` or ``v`` on to
    the rows that read it (and their lse), as an fp64 computation does."""
    q = req.q
    if not (USE_KERNEL and acc_dtype(q.dtype) == torch.float32 and q.device.type == "cpu"):
        return False
    return not leaves and kernel() is not None


def kernel_backward(
    ops: Any,
    kplan: KernelPlan,
    scale: float,
    dout: Tensor,
    *saved: Tensor,
    shift: Tensor | None = None,
    mass: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """``dq, dk, dv`` from the compiled kernel's backward, given ``saved`` = ``q, k, v``,
    the logsumexp in log2 units ``(B, Hq, Lq)`` (the kernel recomputes ``P = 2^(s - lse2)``)
    and ``delta`` ``(B, Hq, Lq)``; each is taken as contiguous float32.

    With ``shift (B, Hq, Lq)`` (the call saw every key of its rows), each
    row's delta is ``sum_j P_ij dP_ij / sum_j P_ij + shift_i`` of the kernel's own ``P``
    and ``dP``, wherever its rows' key span fits the kernel's keep (else the ``delta``
    given): a delta made from the forward's output differs from it by rounding, and every
    key's ``dS`` carries that difference (dQ up to 4x plain PyTorch's error at head size
    80, scale 0.7, causal). The gradients then take ``P`` divided by its row's sum too,
    which cancels a rounding of lse (it scales a whole row of ``P`` alike). With ``mass
    (B, Hq, Lq)`` too, a row's ``P`` sums to its mass instead (the call's share of a larger
    softmax; ``shift`` then holds the other keys' ``sum_j P_ij dP_ij``), and a row of mass
    0 takes its ``delta`` as given."""
    args = [t.float().contiguous() for t in (dout, *saved)]
    extra, mass = (None if t is None else t.float().contiguous() for t in (shift, mass))
    dq, dk, dv = ops.backward(*args, *kplan.args(), scale, ROWS[1], extra, mass)
    return dq, dk, dv


def _empty_rows(tile: Tensor | None) -> Tensor | None:
    """Rows ``(Bt, Ht, T)`` of an additive tile that allow no key, or None if none do."""
    if tile is None:
        return None
    empty = torch.isneginf(tile).all(-1)
    return empty if bool(empty.any()) else None


def _block_forward(
    req: AttentionRequest, q: Tensor, k: Tensor, v: Tensor, blk: Block, fused: bool
) -> tuple[Tensor, Tensor]:
    """Output ``(B, Hq, T, Ev)`` and logsumexp ``(B, Hq, T)`` of one query block."""
    r0, r1 = blk.rows
    keys = blk.key_index(q.device)
    tile, _ = block_tile(req, blk, keys, q.dtype)
    k_sel, v_sel = take(k, blk.keys), take(v, blk.keys)
    if fused:
        out, lse = _FLASH_FWD(
            q[:, :, r0:r1], k_sel, v_sel, 0.0, False, attn_mask=tile, scale=req.scale
        )
        if not bool(lse.isnan().any()):  # (a +inf score's lse: NaN below 16 keys; eager: +inf)
            # rows the tile hides whole (a full block's row of -inf bias got torch's lse 0)
            empty = None if blk.has_full and req.bias is None else _empty_rows(tile)
            return out, (lse if empty is None else lse.masked_fill(empty, float("-inf")))
    s = scores_of(q[:, :, r0:r1], k_sel, req.scale)  # (B, Hq, T, Ks)
    hidden = None if tile is None else torch.isneginf(tile)  # the pairs the tile masks
    p, lse = softmax_lse(_masked(cap_scores(s, req.softcap), tile, hidden))
    return weighted_values(p, v_sel, None if hidden is None else ~hidden), lse


def _masked(s: Tensor, tile: Tensor | None, hidden: Tensor | None = None) -> Tensor:
    """Scores plus the additive tile, -inf wherever the tile masks a pair (``hidden``, if
    known) even where ``s`` is NaN (a hidden key's NaN stays out of the rows it is hidden
    from)."""
    if tile is None:
        return s
    return (s + tile).masked_fill(torch.isneginf(tile) if hidden is None else hidden, float("-inf"))


class BlockedAttention(torch.autograd.Function):
    """Blocked attention with a logsumexp-recompute backward; the logsumexp it returns has
    a gradient too (``d lse_i / d s_ij = p_ij``: it joins ``delta``).

    Three implementations of the same plan, tried in order: attnlab's compiled tile kernel
    (``kplan``), torch's fused CPU flash kernel per block (forward only), eager PyTorch per
    block. q, k and v come as :func:`blocked_attention` makes them (autograd converts their
    gradients back to the callers' dtypes and layouts). The forward takes no ``ctx``
    (``setup_context`` saves what the backward reads), so ``torch.func.grad`` can
    differentiate it. Returns ``out``, ``lse`` and, without a gradient, what the backward
    needs of the forward: the kernel's logsumexp in log2 units (empty without it).
    """

    @staticmethod
    def forward(
        q: Tensor,
        k: Tensor,
        v: Tensor,
        req: AttentionRequest,
        plan: Plan,
        kplan: KernelPlan | None,
        *leaves: Tensor,
    ) -> tuple[Tensor, Tensor, Tensor]:
        ops = kernel() if kplan is not None else None
        if ops is not None:
            out, lse2, work = ops.forward(q, k, v, *kplan.args(), req.scale, ROWS[0])  # type: ignore[union-attr]
            STATS["scores"] = work
            return out, natural_lse(lse2), lse2
        fused = req.softcap is None and _fused_ok(q, k, v, leaves)
        out = q.new_zeros((*q.shape[:3], v.shape[-1]))  # (B, Hq, Lq, Ev)
        lse = torch.full(q.shape[:3], float("-inf"), device=q.device, dtype=q.dtype)
        for blk in plan.blocks:
            r0, r1 = blk.rows
            out[:, :, r0:r1], lse[:, :, r0:r1] = _block_forward(req, q, k, v, blk, fused)
        return out, lse, lse.new_empty(0)  # in the accumulation dtype: sinks may scale

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: tuple[Tensor, Tensor, Tensor]) -> None:
        q, k, v, req, plan, kplan, *leaves = inputs
        out, lse, aux = output
        ctx.save_for_backward(q, k, v, out, lse, *leaves)
        ops = kernel() if kplan is not None else None
        ctx.req, ctx.plan = req, plan
        ctx.kernel = (ops, kplan) if ops is not None else None
        # the kernel's backward recomputes P = 2^(s - lse2) against its own forward's lse2
        ctx.lse2 = aux if ops is not None else None
        ctx.mark_non_differentiable(aux)
        ctx.set_materialize_grads(False)  # an unused lse (or output) has no gradient: None

    jvp = staticmethod(no_forward_mode("the blocked engine", "give such calls engine='reference'"))

    @staticmethod
    @first_order_only("the blocked engine", "give such calls engine='reference'")
    def backward(
        ctx: Any, dout: Tensor | None, dlse: Tensor | None, _dlse2: None
    ) -> tuple[Tensor | None, ...]:
        q, k, v, out, lse, *leaves = ctx.saved_tensors
        dout = torch.zeros_like(out) if dout is None else dout.to(q.dtype)
        # d lse_i / d s_ij = p_ij: dS = p * (dP - (delta - dlse)); each row's delta comes
        # from its own P and dP (see kernel_backward), shifted by -dlse
        shift = lse.new_zeros(lse.shape) if dlse is None else -dlse.to(lse.dtype)  # (B, Hq, Lq)
        if ctx.kernel is not None:  # the kernel's fallback, where a row's span is too long:
            # the delta of the forward's output (not read, and not made, if none can be)
            kept = k.shape[2] * ROWS[1] * 3 <= KEEP_FLOATS  # every span, capped or not
            delta = shift if kept else (dout * out).sum(-1) + shift
            saved = (q, k, v, ctx.lse2, delta)
            qkv = kernel_backward(*ctx.kernel, ctx.req.scale, dout, *saved, shift=shift)
            grads = _Grads(qkv, [])
        else:
            sv = _Saved(ctx.req, q, k, v, lse, dout, shift, leaves)
            grads = _Grads.zeros(dout, (q, k, v, *leaves))  # batched as dout is (jacrev)
            with holding(ctx.req.bias, leaves):  # as at the forward (functional_call)
                for blk in ctx.plan.blocks:
                    _eager_block_backward(sv, blk, grads)
        return (*grads.qkv, None, None, None, *grads.leaves)


def blocked_attention(
    req: AttentionRequest, plan: Plan, kplan: KernelPlan | None, leaves: list[Tensor]
) -> tuple[Tensor, Tensor]:
    """``out, lse`` of ``req`` by :class:`BlockedAttention`, both in the accumulation
    dtype; its q, k and v converted to that dtype (half precision runs in float32
    throughout) and made contiguous for the kernel (a ``kplan`` is made only where
    :func:`kernel_ok`; elsewhere the last dim gets unit stride, for torch's fused op)
    here, where autograd sees it (each is the input itself where it already is)."""
    acc = acc_dtype(req.q.dtype)
    kv = (widen(t, acc, plan) if kplan is not None else t.to(acc) for t in (req.k, req.v))
    qkv = [req.q.to(acc), *kv]
    # torch's fused CPU op read a last dim of stride != 1 wrongly (off by 1.5-2, or
    # values of 1e33 from outside the tensor, torch 2.13): every path gets unit stride
    qkv = [t.contiguous() if kplan is not None or t.stride(-1) != 1 else t for t in qkv]
    out, lse, _ = BlockedAttention.apply(*qkv, req, plan, kplan, *leaves)
    return out, lse


@dataclass(frozen=True)
class _Saved:
    """What one backward pass reads: the forward's tensors and the upstream gradient.

    ``shift`` ``(B, Hq, Lq)`` is the lse's upstream gradient negated, added to each row's
    delta, which each block makes of its own probabilities (see :func:`kernel_backward`);
    ``leaves`` are the bias tensors that need gradients.
    """

    req: AttentionRequest
    q: Tensor
    k: Tensor
    v: Tensor
    lse: Tensor
    dout: Tensor
    shift: Tensor
    leaves: list[Tensor]


@dataclass
class _Grads:
    """Gradient accumulators of one backward pass."""

    qkv: tuple[Tensor, Tensor, Tensor]
    leaves: list[Tensor]

    @staticmethod
    def zeros(like: Tensor, ts: tuple[Tensor, ...]) -> _Grads:
        """Zeros of each of ``ts`` made by ``like.new_zeros``: batched where ``like`` is
        (``jacrev`` and ``is_grads_batched`` vmap the backward over the upstream gradient,
        and an in-place sum into an unbatched zero failed)."""
        z = [like.new_zeros(t.shape, dtype=t.dtype) for t in ts]
        return _Grads((z[0], z[1], z[2]), z[3:])


def _eager_block_backward(sv: _Saved, blk: Block, grads: _Grads) -> None:
    """One block's dq, dk, dv and bias gradients, recomputing probabilities from ``lse``."""
    req, q, k, v, lse, dout, leaves = sv.req, sv.q, sv.k, sv.v, sv.lse, sv.dout, sv.leaves
    r0, r1 = blk.rows
    hkv = k.shape[1]
    tile, bias_tile = block_tile(req, blk, blk.key_index(q.device), q.dtype, bias_grad=bool(leaves))
    qs, k_sel, v_sel = q[:, :, r0:r1], take(k, blk.keys), take(v, blk.keys)
    s = cap_scores(scores_of(qs, k_sel, req.scale), req.softcap)  # (B, Hq, T, Ks)
    p = _probs(_masked(s, tile), lse[:, :, r0:r1])  # a new tensor: written in place below
    do = dout[:, :, r0:r1]  # (B, Hq, T, Ev)
    dp = grouped_matmul(do, v_sel.transpose(-1, -2))  # (B, Hq, T, Ks)
    # a NaN key or value the tile hides: its 0 * NaN made every row's gradient NaN; a row's
    # NaN query, lse, upstream gradient or shift reached the dK and dV of keys it does not
    # see (0 * NaN in ds^T q, p^T dout, and ds = p * (dp - NaN delta))
    rows = (lse[:, :, r0:r1], qs, do, sv.shift[:, :, r0:r1])
    hidden = torch.isneginf(tile) if tile is not None and any_nan(k_sel, v_sel, *rows) else None
    if hidden is not None:  # (., ., T, Ks)
        p = p.masked_fill(hidden, 0.0)  # (a row with a NaN lse: NaN throughout)
        dp = dp.masked_fill(hidden, 0.0)
    # the block holds every key of its rows: p normalized, delta of this p and dp
    total = p.sum(-1, keepdim=True)  # (B, Hq, T, 1); 0 for rows without keys
    p.div_(torch.where(total > 0, total, torch.ones_like(total)))
    delta = (p * dp).sum(-1, keepdim=True) + sv.shift[:, :, r0:r1].unsqueeze(-1)
    ds = dp.sub_(delta).mul_(p)  # (B, Hq, T, Ks): p * (dp - delta)
    if hidden is not None:  # a NaN row's delta
        ds = ds.masked_fill_(hidden, 0.0)
    bias_ds = ds  # the bias is added after the cap
    if req.softcap is not None:  # d(c tanh(x / c)) / dx = 1 - (s / c)^2
        capped = s if hidden is None else s.masked_fill(hidden, 0.0)  # a hidden NaN key's s
        ds = ds * (1 - (capped / req.softcap) ** 2)
    dq, dk, dv = grads.qkv
    ds_k = grouped_matmul(ds, k_sel) if hidden is None else weighted_values(ds, k_sel, ~hidden)
    dq[:, :, r0:r1] += ds_k * req.scale
    ds = ds * req.scale  # dK = (scale dS)^T q, as autograd of (q k^T) * scale makes it
    if hidden is None:
        dk_blk, dv_blk = ds.transpose(-1, -2) @ qs, p.transpose(-1, -2) @ do
    else:  # a NaN in q or dout reaches the keys its row sees only
        seen = (~hidden).transpose(-1, -2)  # (., ., Ks, T)
        dk_blk = weighted_values(ds.transpose(-1, -2), qs, seen)
        pt = p.transpose(-1, -2)
        dv_blk = pt @ do if legacy_batched(do) else weighted_values(pt, do, seen)
    _scatter_add(dk, blk.keys, _group_sum(dk_blk, hkv))
    _scatter_add(dv, blk.keys, _group_sum(dv_blk, hkv))
    if bias_tile is not None and leaves:
        gs = torch.autograd.grad(
            bias_tile,
            leaves,
            _sum_to(bias_ds, bias_tile.shape).to(bias_tile.dtype),
            allow_unused=True,
        )
        for acc, g in zip(grads.leaves, gs, strict=True):
            if g is not None:
                acc += g


def _scatter_add(dst: Tensor, keys: slice | Tensor, src: Tensor) -> None:
    """``dst[:, :, keys] += src`` for a slice or an index tensor (duplicates accumulate)."""
    if isinstance(keys, slice):  # a slice of the whole length is an alias, which vmap
        whole = src.shape[2] == dst.shape[2]  # (jacrev, is_grads_batched) cannot write into
        (dst if whole else dst[:, :, keys]).add_(src)
    else:
        dst.index_add_(2, keys.to(dst.device), src)
