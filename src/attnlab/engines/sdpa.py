"""The SDPA engine: :func:`torch.nn.functional.scaled_dot_product_attention`.

Used wherever torch computes the request exactly: dot-product scores, softmax, any mask
and bias (passed as one dense additive mask, or as ``is_causal`` for square causal
attention), dropout, grouped-query attention. It does not return weights or the
logsumexp; ``auto`` routes those requests elsewhere.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from attnlab._eager import vmapping
from attnlab.engines.base import AttentionRequest, Engine, EngineResult, may_hold_nan

__all__ = ["SdpaEngine"]


class SdpaEngine(Engine):
    """torch SDPA for dot-product softmax attention with any mask and bias.

    Example:
        >>> import attnlab
        >>> from attnlab import masks
        >>> _ = torch.manual_seed(0)
        >>> q, k, v = torch.randn(3, 1, 2, 4, 8).unbind(0)
        >>> out = attnlab.attention(q, k, v, mask=masks.causal(), engine="sdpa")
        >>> torch.allclose(out, F.scaled_dot_product_attention(q, k, v, is_causal=True))
        True
        >>> attnlab.attention(q, k, v, engine="sdpa", return_weights=True)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ValueError: engine='sdpa' cannot compute this request: torch SDPA does not return ...
    """

    name = "sdpa"
    exact = True
    summary = (
        "dot score, softmax, any mask and bias (as a dense additive mask; square "
        "causal without one), dropout, GQA, autograd incl. learnable biases; "
        "no weights, no lse"
    )

    def unsupported(self, req: AttentionRequest) -> str | None:
        if req.score != "dot":
            return f"torch SDPA computes dot-product scores only, not score={req.score!r}"
        if req.normalize != "softmax":
            return f"torch SDPA normalizes with softmax only, not {req.normalize!r}"
        if req.softcap is not None:
            return "torch SDPA has no logit soft-capping (softcap)"
        if req.sinks is not None:
            return "torch SDPA has no attention sinks (sinks)"
        if req.return_weights:
            return "torch SDPA does not return attention weights (return_weights=True)"
        if req.return_lse:
            return "torch SDPA does not return the logsumexp (return_lse=True)"
        if req.batch == 0 or req.lq == 0 or req.lk == 0:
            return "torch SDPA does not accept empty batches or sequences"
        if _unbatched(req.q):
            return "torch has no vmap batching rule for SDPA's CPU kernels (it warns and loops)"
        if not _keeps_nan(req.q, req.lk, req.dropout_p):  # one screen, whichever applies
            if may_hold_nan(req.q, req.k, req.v):
                return f"the inputs {_hold()} NaN, which torch SDPA's fused kernels turn into 0"
        elif _screens_hidden_nan(req) and may_hold_nan(req.k, req.v):
            return f"k or v {_hold()} NaN, which torch SDPA spreads to rows the mask hides it from"
        return None

    def prefers(self, req: AttentionRequest) -> bool:
        return not _one_tracked_key(req.q, req.k, req.v)

    def plain(self, q: Tensor, k: Tensor, v: Tensor, scale: float | None) -> Tensor | None:
        if 0 in q.shape[:3] or not _keeps_nan(q, k.shape[2], 0.0) or _unbatched(q):
            return None  # empty, a NaN screen to run, or vmapped: the request decides
        if _one_tracked_key(q, k, v):
            return None
        gqa = q.shape[1] != k.shape[1]
        return F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=gqa)

    def forward(self, req: AttentionRequest) -> EngineResult:
        gqa = req.heads != req.k.shape[1]
        causal = req.mask is not None and req.mask.is_causal and req.bias is None
        if causal and req.lq == req.lk and req.scale > 0:  # is_causal: NaN rows at scale <= 0
            out = F.scaled_dot_product_attention(
                req.q,
                req.k,
                req.v,
                dropout_p=req.dropout_p,
                is_causal=True,
                scale=req.scale,
                enable_gqa=gqa,
            )
            return out, None, None
        attn_mask, empty_rows = _dense_mask(req)
        out = F.scaled_dot_product_attention(
            req.q,
            req.k,
            req.v,
            attn_mask=attn_mask,
            dropout_p=req.dropout_p,
            scale=req.scale,
            enable_gqa=gqa,
        )  # (B, Hq, Lq, Ev)
        if empty_rows is not None:
            out = out.masked_fill(empty_rows, 0.0)
        return out, None, None


def _one_tracked_key(q: Tensor, k: Tensor, v: Tensor) -> bool:
    """Whether a call has one key and gradients: each weight is then exactly 1 and dQ and
    dK exactly 0, where torch SDPA's backward gives 1e-6 (float32, E=8); ``auto`` lets
    another engine take it."""
    tracked = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad)
    return k.shape[2] == 1 and tracked


def _keeps_nan(q: Tensor, lk: int, dropout_p: float) -> bool:
    """Whether torch's CPU SDPA passes NaN inputs on to the rows that read them, so the
    NaN screen (a pass over the whole KV cache at every decoding step) can be skipped.

    Measured on torch's CPU kernels over float32, bfloat16 and float64, masks or none,
    ``is_causal``, GQA and head sizes 32-128: with at least 16 keys every NaN reaches
    its rows; with fewer and no mask, NaN queries and keys can come out as 0.
    ``tests/test_attention.py`` pins this, so a torch that changes it fails the suite.
    """
    return q.device.type == "cpu" and lk >= 16 and dropout_p == 0.0


def _screens_hidden_nan(req: AttentionRequest) -> bool:
    """Whether a masked call is screened for NaN in k and v, which torch SDPA spreads to
    rows the mask hides it from: on the CPU from 16 query rows on, where the pass over k
    and v is small beside the attention. A decoding step (a pass over the whole cache per
    step) and a GPU call (a device sync) are not screened."""
    masked = req.mask is not None or req.bias is not None
    return masked and req.q.device.type == "cpu" and req.lq >= 16


def _dense_mask(req: AttentionRequest) -> tuple[Tensor | None, Tensor | None]:
    """The request's mask and bias as one SDPA ``attn_mask``, plus its fully masked rows.

    Fully masked rows are opened to every key (so torch never sees an all ``-inf`` row
    and its gradients stay finite) and their output is zeroed afterwards.
    """
    allowed = empty = None
    if req.mask is not None:
        allowed = _unbroadcast(
            req.mask.dense(req.lq, req.lk, batch=req.batch, heads=req.heads, device=req.q.device)
        )  # (Bm, Hm, Lq or 1, Lk or 1): SDPA broadcasts it
        rows = ~allowed.any(dim=-1, keepdim=True)  # (Bm, Hm, Lq, 1)
        if torch.compiler.is_exporting() or vmapping() or bool(rows.any()):  # else no value
            allowed, empty = allowed | rows, rows
    if req.bias is None:
        return allowed, empty
    bias = req.bias.dense(
        req.lq, req.lk, batch=req.batch, heads=req.heads, device=req.q.device, dtype=req.q.dtype
    )  # (Bb, Hb, Lq, Lk)
    if allowed is not None:
        bias = bias.masked_fill(~allowed, float("-inf"))
    return bias, empty


def _unbroadcast(t: Tensor) -> Tensor:
    """``t`` with each broadcast (stride 0) dim narrowed to size 1: the same mask for
    SDPA, which broadcasts it, without SDPA materializing (and reading) every copy. A key
    padding mask ``(B, 1, 1, Lk)`` stays that size instead of ``(B, 1, Lq, Lk)``."""
    index = tuple(
        slice(0, 1) if t.stride(d) == 0 and t.shape[d] > 1 else slice(None) for d in range(t.dim())
    )
    return t[index]


def _hold() -> str:
    """How a refusal for NaN words it: held, or (vmapped, unread) maybe held."""
    return "may hold (vmapped, they cannot be screened)" if vmapping() else "hold"


def _unbatched(q: Tensor) -> bool:
    """Whether torch.func.vmap runs a call to the CPU, where torch has no batching rule
    for SDPA's kernels (forward and backward): it warned "there is a performance drop"
    and looped over the items."""
    return q.device.type == "cpu" and vmapping()
