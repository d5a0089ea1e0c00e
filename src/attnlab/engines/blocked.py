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
* ``return_weights``: the compiled forward writes every weight of an interval mask from
  the scores it computes anyway; otherwise they are recomputed block by block;
  :meth:`BlockedEngine.weights` returns only some heads and query rows.
* Decoding (a few query rows per key/value head, float32 or half precision, no autograd):
  the compiled kernel's ``decode`` reads each key and value once for all the query heads
  that share them, and under an interval mask (a sliding window, padding) only the keys
  of the rows' intervals. ``auto`` picks it for such calls with a mask, and without one
  where query heads are grouped (torch's SDPA reads the cache once per query head); in
  half precision nearly always (:func:`~attnlab.engines.blocked_decode.kernel_wins`).

The engine is six files: this one (the engine: what it supports),
:mod:`~attnlab.engines.blocked_decode` (which decoding steps its kernel serves),
:mod:`~attnlab.engines.blocked_choice` (when ``auto`` picks it),
:mod:`~attnlab.engines.blocked_plan` (the schedule of blocks, key spans and partial
tiles), :mod:`~attnlab.engines.blocked_weights` (weights recomputed block by block) and
:mod:`~attnlab.engines.blocked_autograd` (the autograd function and its three
implementations: compiled kernel, torch's per-block kernel, eager).
"""

from __future__ import annotations

import dataclasses
import weakref

import torch
from torch import Tensor
from torch._C._functorch import is_functorch_wrapped_tensor

from attnlab._eager import forward_mode, vmapping
from attnlab.engines import blocked_autograd, blocked_choice, blocked_fold
from attnlab.engines._leaves import HIDES_GRAD, hides_grad
from attnlab.engines._memo import LastMask
from attnlab.engines._native import build_settings, ops, pool_limit_mib
from attnlab.engines.base import AttentionRequest, Engine, EngineResult, sink_rows, with_sinks
from attnlab.engines.blocked_autograd import (
    bias_leaves,
    blocked_attention,
    kernel,
    kernel_error,
    kernel_ok,
)
from attnlab.engines.blocked_decode import DECODE_ROWS, decodes, kernel_wins
from attnlab.engines.blocked_decode import decode_op as _decode_op
from attnlab.engines.blocked_decode import exact_bounds as _exact_bounds
from attnlab.engines.blocked_decode import plain_request as _plain_request
from attnlab.engines.blocked_plan import (
    KernelPlan,
    Plan,
    PlanCache,
    kernel_plan,
    kernel_softcap,
)
from attnlab.engines.blocked_weights import weights as weights_of
from attnlab.engines.zeros import PAGE, lazy_zeros_unzeroed
from attnlab.masks import RowBounds

__all__ = ["DECODE_ROWS", "BlockedEngine", "decodes", "kernel", "kernel_error", "kernel_status"]


class BlockedEngine(Engine):
    """Exact, tile-skipping attention for dot-product softmax with any mask and bias.

    Example:
        >>> from attnlab import masks
        >>> q = torch.randn(1, 2, 512, 16)  # (B, H, L, E)
        >>> band = masks.causal() & masks.window(64)
        >>> req = AttentionRequest(q, q, q, band, None, 0.25, "dot", "softmax", 0.0,
        ...                        return_weights=False, return_lse=False)
        >>> engine = BlockedEngine(block=128)
        >>> engine.plan(req).computed_fraction  # 7 of the 4 x 4 tiles: the rest are skipped
        0.4375
        >>> out, _, _ = engine.forward(req)
        >>> s = (q @ q.mT * 0.25).masked_fill(~band.dense(512, 512), float("-inf"))
        >>> torch.allclose(out, s.softmax(-1) @ q, atol=1e-5)  # exact all the same
        True
    """

    name = "blocked"
    exact = True
    passes_plain = True  # sdpa's plain() passes on the maskless calls prefers() takes
    summary = (
        "dot/cosine score, softmax, any mask (skips empty tiles, masks only partial "
        "ones) and bias (per tile), softcap, sinks, GQA, autograd incl. learnable biases, lse, "
        "weights (recomputed per block, no autograd); no dropout"
    )

    def __init__(self, block: int = 128) -> None:
        self.block = block
        self._plans = PlanCache()  # the last request's and the last mask object's plans
        # the last request asked about decoding: whether it decodes, and its row bounds
        self._decode: tuple[weakref.ref[AttentionRequest], bool, RowBounds | None] | None = None
        # the last mask's row bounds, by its sizes and tensors' versions
        self._last_bounds: LastMask[RowBounds | None] = LastMask()

    def plan(self, req: AttentionRequest) -> Plan:
        """The block schedule of ``req``, memoized for the last request and for the last
        mask object, sizes and versions of the tensors it holds (:class:`PlanCache`)."""
        return self._plans.get(req, self.block)

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
        if not req.q.shape[-1] or not req.v.shape[-1]:  # (its backward: std::bad_alloc)
            return "the blocked engine needs head sizes E >= 1 and Ev >= 1"
        if vmapping():
            return "the blocked engine plans from values, which torch.func.vmap hides"
        if forward_mode(req.q, req.k, req.v):
            return "the blocked engine has no forward-mode AD (jvp, forward_ad); use 'reference'"
        if req.q.is_meta:  # (auto: sdpa or reference give the shapes)
            return "the blocked engine plans from values, which tensors on the meta device lack"
        if any(is_functorch_wrapped_tensor(t) for t in bias_leaves(req.bias)):
            return (
                "the blocked engine takes a bias's gradient with torch.autograd in its "
                "backward, which cannot follow a torch.func transform of the bias; use "
                "'reference'"
            )
        if hides_grad(req.bias):
            return (
                f"{HIDES_GRAD}; the blocked engine's backward reaches only those: pass an "
                "nn.Module holding it to bias.custom, or use 'reference'"
            )
        return None

    def plain(self, q: Tensor, k: Tensor, v: Tensor, scale: float | None) -> Tensor | None:
        if not decodes(q, k, v, masked=False) or not kernel_wins(q, k, None):
            return None  # passed on to SDPA
        return _decode_op()(q, k, v, None, None, q.shape[-1] ** -0.5 if scale is None else scale)

    def decoding(self, req: AttentionRequest) -> tuple[bool, RowBounds | None]:
        """Whether ``req`` is a decoding call for the compiled kernel (:func:`decodes`, and
        dot-product softmax with no bias, dropout, weights or logsumexp; the kernel applies
        soft-capping and sinks), and its mask's row bounds ``(1 or B, Lq)``, if it has a
        mask; a mask must allow exactly one key interval per row, the same for every head.
        Memoized for the last request."""
        cached = self._decode  # read once: two threads' calls got each other's bounds
        if cached is None or cached[0]() is not req:
            ok, bounds = _plain_request(req), None
            if ok and req.mask is not None:
                bounds = self._decode_bounds(req)
                ok = bounds is not None
            self._decode = cached = (weakref.ref(req), ok, bounds)
        return cached[1], cached[2]

    def _decode_bounds(self, req: AttentionRequest) -> RowBounds | None:
        """:func:`_exact_bounds` of ``req``'s mask, memoized for the last mask, sizes and
        versions of the tensors it holds (an in-place change of one recomputes them): a
        model's layers share one mask object per decoding step. The versions are read
        after computing (:class:`LastMask`): read before, a mask that keeps tensors it
        makes for its bounds computed them twice."""
        mask = req.mask
        assert mask is not None
        key = (req.lq, req.lk, req.batch)
        return self._last_bounds.get(mask, key, lambda: _exact_bounds(mask, req))

    def forward(self, req: AttentionRequest) -> EngineResult:
        decode, bounds = self.decoding(req)
        if not decode and req.mask is None:  # named for a maskless step: the kernel serves
            decode = _plain_request(req, named=True)  # it too (auto leaves those to SDPA)
        if decode:
            lo, hi = (None, None) if bounds is None else (bounds.lo, bounds.hi)
            sinks = req.sinks
            if sinks is not None:
                sinks = sink_rows(sinks.detach()).float().contiguous()  # (1 or B, Hq, 1 or Lq)
            cap = kernel_softcap(req)
            return _decode_op()(req.q, req.k, req.v, lo, hi, req.scale, cap, sinks), None, None
        given, req = req, blocked_fold.fold(req)  # a broadcast K and V read once
        if req.score == "cosine":
            req = _normalized(req)
        plan = self.plan(req)
        leaves = bias_leaves(req.bias)
        kplan = kernel_plan(req, plan, self.block) if kernel_ok(req, leaves) else None
        weights: Tensor | None = None
        if req.return_weights and kplan is not None and _fused_weights_ok(req, kplan):
            out, weights, lse = _forward_with_weights(req, kplan)
        else:
            out, lse = blocked_attention(req, plan, kplan, leaves)
            out, lse = _join_sinks(out, lse, req.sinks)
            out = out.to(req.v.dtype)
            weights = weights_of(req, plan) if req.return_weights else None
        kept = blocked_fold.unfold(lse.to(req.q.dtype), given) if req.return_lse else None
        return blocked_fold.unfold(out, given), weights, kept

    def _given_plan(self, req: AttentionRequest) -> KernelPlan | None:
        """The kernel plan of a part of a larger softmax (:meth:`forward_given`), or None
        where the compiled kernel cannot run ``req``."""
        if req.score != "dot" or req.softcap is not None or req.sinks is not None:
            return None
        if not kernel_ok(req, bias_leaves(req.bias)):
            return None
        return kernel_plan(req, self.plan(req), self.block)

    def forward_given(self, req: AttentionRequest) -> tuple[Tensor, Tensor] | None:
        """``out (B, Hq, Lq, Ev)`` float32 and the logsumexp ``(B, Hq, Lq)`` in float64 of
        ``req`` as one part of a larger softmax (context parallelism's pairs), from the
        compiled kernel without autograd; None where it cannot run ``req``. The kernel's
        float32 log2 logsumexp, rounded again to float32 in natural-log units, put up to
        7x plain PyTorch's error into dV where the parts' logsumexps merge."""
        kplan = self._given_plan(req)
        if kplan is None:
            return None
        q, k, v = (t.float().contiguous() for t in (req.q, req.k, req.v))
        out, lse2, _ = ops().forward(q, k, v, *kplan.args(), req.scale, blocked_autograd.ROWS[0])
        return out, lse2.double() * blocked_autograd.LN2

    def backward_given(
        self,
        req: AttentionRequest,
        dout: Tensor,
        out: Tensor,
        lse: Tensor,
        own: tuple[Tensor, Tensor] | None = None,
    ) -> tuple[Tensor, Tensor, Tensor] | None:
        """``dq, dk, dv`` of ``req`` as one part of a larger softmax over more keys, whose
        output ``out (B, Hq, Lq, Ev)`` and logsumexp ``lse (B, Hq, Lq)`` are given (context
        parallelism's pairs), from the compiled kernel's backward: it recomputes the
        scores bit for bit as its forward made them. None where the kernel cannot run
        ``req`` (its forward did not make those scores either).

        The kernel takes the logsumexp in float32 log2 units; the rows' ``P`` it then
        makes are off from the given (float64) logsumexp's by a factor ``c`` per row,
        which the upstream gradient and delta take instead (``dS = c P (dO V^T - delta)``
        and ``dV = c P^T dO`` are linear in them).

        ``own = (mass, shift)``, each ``(B, Hq, Lq)``: the rows of ``mass > 0`` make their
        delta of the kernel's own ``P`` and ``dP`` (``P`` normalized to sum to ``mass``, the
        part's share of the row) plus ``shift``, the other parts' ``sum_j P_ij dP_ij``.
        A delta made of the output misses the kernel's ``dP`` by rounding, which a row's
        heaviest keys carry whole (a row of one key, whose exact dQ is 0, too): dK came out
        4.4x plain PyTorch's float32 error with global tokens (see ``kernel_backward``)."""
        kplan = None if self.unsupported(req) is not None else self._given_plan(req)
        if kplan is None:
            return None
        lse2 = lse.double() * blocked_autograd.LOG2E  # (B, Hq, Lq)
        rounded = lse2.float()
        c = torch.exp2(rounded.double() - lse2).nan_to_num(1.0)  # ~1; NaN on empty rows
        kept = req.k.shape[2] * blocked_autograd.ROWS[1] * 3 <= blocked_autograd.KEEP_FLOATS
        own = own if kept else None  # else the kernel takes every row's delta as given
        if own is not None:  # normalized by its sum, an own row's P needs no c
            c = torch.where(own[0] > 0, 1.0, c)
        dout = dout * c.to(dout.dtype).unsqueeze(-1)
        delta = (dout * out).sum(-1)  # (B, Hq, Lq), of the scaled dout: c * delta
        saved = (req.q, req.k, req.v, rounded, delta)
        shift, mass = (None, None) if own is None else (own[1], own[0])
        return blocked_autograd.kernel_backward(
            ops(), kplan, req.scale, dout, *saved, shift=shift, mass=mass
        )

    def weights(
        self,
        req: AttentionRequest,
        heads: list[int] | None = None,
        rows: tuple[int, int] | None = None,
    ) -> Tensor:
        """Weights ``(B, len(heads), r1 - r0, Lk)`` of some heads and query rows; only the
        query blocks that overlap ``rows`` are computed."""
        if req.score == "cosine":
            req = _normalized(req)
        return weights_of(req, self.plan(req), heads, rows)

    def prefers(self, req: AttentionRequest) -> bool:
        """Whether ``auto`` should pick this engine for ``req`` (:mod:`.blocked_choice`)."""
        decode, bounds = self.decoding(req)
        if decode and kernel_wins(req.q, req.k, bounds):
            return True
        return blocked_choice.prefers(self, req)

    def declines(self, req: AttentionRequest) -> bool:
        """A small call that is no decoding step (:func:`decodes`, blocked_choice.prefers)."""
        rows = req.heads // req.k.shape[1] * req.lq  # query rows per key/value head
        small = req.lq * req.lk < 1 << 12 and req.lk < 1 << 10
        return small and (req.lk < 16 or rows > DECODE_ROWS)

    def intervals(self, req: AttentionRequest) -> bool:
        """Whether ``req``'s mask allows one key interval per row, the same for every head."""
        return req.mask is not None and self._decode_bounds(req) is not None


def _normalized(req: AttentionRequest) -> AttentionRequest:
    """Cosine scores are dot scores of unit vectors, made in float32 or float64: in
    float16 the eps 1e-12 rounded to 0 (a zero vector gave 0/0, NaN in every row that saw
    it) and a norm past 65504 to inf (the vector became 0)."""

    def unit(t: Tensor) -> Tensor:  # (B, H, L, E)
        wide = t if t.dtype in (torch.float32, torch.float64) else t.float()
        return torch.nn.functional.normalize(wide, dim=-1, eps=1e-12).to(t.dtype)

    return dataclasses.replace(req, q=unit(req.q), k=unit(req.k), score="dot")


def _fused_weights_ok(req: AttentionRequest, kplan: KernelPlan) -> bool:
    """Whether the compiled forward can write every weight beside the output: an interval
    mask, no bias, float32 (and no gradient: the engine refuses weights with one)."""
    f32 = req.q.dtype == torch.float32  # (q, k and v share one dtype)
    return kplan.interval and req.bias is None and f32


def _join_sinks(out: Tensor, lse: Tensor, sinks: Tensor | None) -> tuple[Tensor, Tensor]:
    """The sinks joined to the finished softmax of ``out (B, Hq, Lq, Ev)`` and ``lse (B,
    Hq, Lq)`` (:func:`~attnlab.engines.base.with_sinks`) as differentiable ops outside
    :func:`blocked_attention`: its backward then sees a softmax over keys alone, whose
    rows' deltas it makes of their own probabilities (with the delta of the output, dQ was
    up to 2.6x plain PyTorch's float32 error). The sinks' terms run in float64: a per-head
    sink's gradient sums ``B * Lq`` terms of one sign.

    Example:
        >>> out, lse = _join_sinks(torch.ones(1, 1, 1, 1), torch.zeros(1, 1, 1), torch.zeros(1))
        >>> out.item(), lse.dtype
        (0.5, torch.float32)
    """
    if sinks is None:
        return out, lse
    wide = torch.promote_types(lse.dtype, torch.float64)
    out, total = with_sinks(out, lse.to(wide), sinks.to(wide))
    return out, total.to(lse.dtype)


def _forward_with_weights(
    req: AttentionRequest, kplan: KernelPlan
) -> tuple[Tensor, Tensor, Tensor]:
    """Output, weights ``(B, Hq, Lq, Lk)`` and logsumexp from one pass of the compiled
    forward (``forward_weights``): each row tile's weights come from the scores its softmax
    computed, so ``Q K^T`` is not computed again. The reused pages a cached result had
    written are zeroed by the kernel's own tasks, where no weight goes."""
    w, dirty = lazy_zeros_unzeroed((req.batch, req.heads, req.lq, req.lk), req.q)
    q, k, v = req.q.contiguous(), req.k.contiguous(), req.v.contiguous()
    with torch.no_grad():
        out, lse2, work = ops().forward_weights(
            q, k, v, *kplan.args(), req.scale, blocked_autograd.ROWS[0], w, dirty, PAGE // 4
        )
    lse = blocked_autograd.natural_lse(lse2)  # the kernel's logsumexp is in log2 units
    blocked_autograd.STATS["scores"] = work
    if req.sinks is not None:  # the sinks take their share of every row, weights too
        out, total = with_sinks(out, lse, req.sinks)
        # a row with neither keys nor a sink (both -inf) keeps weights 0 (the exp was NaN)
        share = torch.exp(lse - total).masked_fill(torch.isneginf(total), 0.0)  # (B, Hq, Lq)
        share = share.unsqueeze(-1)  # (B, Hq, Lq, 1)
        for r0, r1, k0, k1 in kplan.blocks.tolist():  # only the blocks' keys hold weights:
            w[:, :, r0:r1, k0:k1].mul_(share[:, :, r0:r1])  # the other pages stay unbacked
        lse = total
    return out, w, lse


def kernel_status() -> dict[str, object]:
    """The blocked engine's compiled CPU kernel: the instruction set it is built for, its
    compiler flags, whether it loaded (building it on first use, 25-65 s), why not, the
    query rows per task of its forward and backward, and its output pool's limit in MiB.

    Example:
        >>> status = kernel_status()
        >>> sorted(status)  # doctest: +NORMALIZE_WHITESPACE
        ['build', 'flags', 'isa', 'loaded', 'pool_mib', 'rows_backward', 'rows_forward',
         'why_not']
    """
    name, flags = build_settings()
    loaded = kernel() is not None
    return {
        "isa": name.rsplit("_", 1)[-1].upper(),
        "build": name,
        "flags": flags,
        "loaded": loaded,
        "why_not": None if loaded else (kernel_error() or "switched off (ATTNLAB_NO_KERNEL)"),
        "rows_forward": blocked_autograd.ROWS[0],
        "rows_backward": blocked_autograd.ROWS[1],
        "pool_mib": pool_limit_mib() if loaded else 0,
    }
