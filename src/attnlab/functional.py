"""The one entry point: :func:`attention`, and :func:`attend` for precomputed scores.

Every attention in attnlab is the same four steps::

    scores  = score(q, k) * scale + bias        # dot, cosine, or a parametric module
    scores  = mask(scores)                      # causal, window, padding, documents, ...
    weights = normalize(scores)                 # softmax, sparsemax, entmax15
    out     = weights @ v                       # weighted sum

:func:`attention` hands a validated call to an engine; :func:`attend` runs the last three.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Literal, overload

import torch
from torch import Tensor

from attnlab import _validate as V
from attnlab._eager import PLANS, as_written
from attnlab._observe import (
    AttentionEvent,
    live_weights,
    notify,
    observed_weights,
    observing,
    request_weights,
    rewriter,
)
from attnlab._request import AttentionOutput, unsupported_by
from attnlab._request import build_request as _request
from attnlab.bias import Bias
from attnlab.engines import get_engine, select_engine
from attnlab.engines.approximate import ApproximateEngine
from attnlab.engines.base import plain_attention
from attnlab.engines.reference import ReferenceEngine, mix
from attnlab.masks import Mask, as_mask
from attnlab.masks.intervals import Causal
from attnlab.scores import ScoreFn, expand_kv

__all__ = [
    "AttentionOutput",
    "attend",
    "attention",
    "attention_plain",
    "attention_weights",
    "observed_weights",
    "request_weights",
    "unsupported_by",
]


@overload
def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    mask: Mask | Tensor | None = ...,
    bias: Bias | Tensor | None = ...,
    scale: float | None = ...,
    score: str | ScoreFn = ...,
    normalize: str = ...,
    dropout_p: float = ...,
    engine: str = ...,
    engine_options: Mapping[str, object] | None = ...,
    approximate: bool = ...,
    return_weights: Literal[False] = ...,
    return_lse: Literal[False] = ...,
    softcap: float | None = ...,
    sinks: Tensor | None = ...,
) -> Tensor: ...


@overload
def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    mask: Mask | Tensor | None = ...,
    bias: Bias | Tensor | None = ...,
    scale: float | None = ...,
    score: str | ScoreFn = ...,
    normalize: str = ...,
    dropout_p: float = ...,
    engine: str = ...,
    engine_options: Mapping[str, object] | None = ...,
    approximate: bool = ...,
    return_weights: Literal[True],
    return_lse: bool = ...,
    softcap: float | None = ...,
    sinks: Tensor | None = ...,
) -> AttentionOutput: ...


@overload
def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    mask: Mask | Tensor | None = ...,
    bias: Bias | Tensor | None = ...,
    scale: float | None = ...,
    score: str | ScoreFn = ...,
    normalize: str = ...,
    dropout_p: float = ...,
    engine: str = ...,
    engine_options: Mapping[str, object] | None = ...,
    approximate: bool = ...,
    return_weights: bool = ...,
    return_lse: Literal[True],
    softcap: float | None = ...,
    sinks: Tensor | None = ...,
) -> AttentionOutput: ...


@overload
def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    mask: Mask | Tensor | None = ...,
    bias: Bias | Tensor | None = ...,
    scale: float | None = ...,
    score: str | ScoreFn = ...,
    normalize: str = ...,
    dropout_p: float = ...,
    engine: str = ...,
    engine_options: Mapping[str, object] | None = ...,
    approximate: bool = ...,
    return_weights: bool = ...,
    return_lse: bool = ...,
    softcap: float | None = ...,
    sinks: Tensor | None = ...,
) -> Tensor | AttentionOutput: ...


@as_written(PLANS)
def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    mask: Mask | Tensor | None = None,
    bias: Bias | Tensor | None = None,
    scale: float | None = None,
    score: str | ScoreFn = "dot",
    normalize: str = "softmax",
    dropout_p: float = 0.0,
    engine: str = "auto",
    engine_options: Mapping[str, object] | None = None,
    approximate: bool = False,
    return_weights: bool = False,
    return_lse: bool = False,
    softcap: float | None = None,
    sinks: Tensor | None = None,
) -> Tensor | AttentionOutput:
    """Attention of queries over keys and values, in the ``(B, H, L, E)`` layout.

    Args:
        q: queries ``(B, Hq, Lq, E)``.
        k: keys ``(B, Hkv, Lk, E)``; ``Hq % Hkv == 0`` (grouped / multi-query attention).
        v: values ``(B, Hkv, Lk, Ev)``. A batch of 1 in any of q, k, v broadcasts.
        mask: an :mod:`attnlab.masks` mask or a bool tensor broadcastable to
            ``(B, Hq, Lq, Lk)`` (True = may attend). Query positions are aligned
            bottom-right: row ``i`` is position ``i + Lk - Lq``.
        bias: an :mod:`attnlab.bias` bias or a float tensor added to the scaled scores.
        scale: multiplier of the scores; default ``1/sqrt(E)`` for ``"dot"``, else 1.
        score: ``"dot"``, ``"cosine"``, or a callable ``fn(q, k) -> (B, Hq, Lq, Lk)``
            (it receives k expanded to Hq heads).
        normalize: ``"softmax"``, ``"sparsemax"`` or ``"entmax15"``.
        dropout_p: dropout probability on the weights (reproducible under
            ``torch.manual_seed`` for a given engine).
        engine: ``"auto"`` (the fastest exact engine that supports the call) or a name
            from :func:`attnlab.engines.available_engines`, including the approximate
            ``"linear"``, ``"performer"`` and ``"nystrom"``.
        engine_options: settings of the named engine, e.g. ``{"num_features": 256}`` for
            ``"performer"``; an unknown name or bad value is a ``ValueError``/``TypeError``.
        approximate: let ``engine="auto"`` pick an approximate engine for long sequences
            without weights (Nystromformer from ``Lq * Lk >= 2**22``, Performer for causal
            masks from ``2**24``; see :mod:`attnlab.engines`). Off by default: ``auto`` is
            exact unless asked.
        return_weights: also return the weights ``(B, Hq, Lq, Lk)``.
        return_lse: also return the logsumexp ``(B, Hq, Lq)`` (softmax only).
        softcap: logit soft-capping (Gemma 2, Grok): the scaled scores ``s`` become
            ``softcap * tanh(s / softcap)`` before the bias and the mask. None: off.
        sinks: attention sinks ``(Hq,)`` (gpt-oss): one learned logit per query head in
            the softmax denominator, ``w_j = exp(s_j) / (exp(sink) + sum_k exp(s_k))``; the
            weights then sum to less than 1 and the logsumexp includes the sink. Or
            ``(B or 1, Hq, Lq)``: one logit per query row (Inkling 2 computes them from
            each token).

    Returns:
        ``out (B, Hq, Lq, Ev)``, or an :class:`AttentionOutput` when ``return_weights`` or
        ``return_lse`` is set. Fully masked query rows give output 0 and weights 0.

    Example:
        >>> import torch, attnlab
        >>> from attnlab import masks
        >>> q = k = v = torch.randn(2, 4, 16, 8)
        >>> attnlab.attention(q, k, v, mask=masks.causal()).shape
        torch.Size([2, 4, 16, 8])
        >>> r = attnlab.attention(q, k, v, mask=masks.window(3), return_weights=True)
        >>> r.weights.shape, bool(r.weights[0, 0, 10, :7].sum() == 0)
        (torch.Size([2, 4, 16, 16]), True)
        >>> opts = {"num_features": 128, "seed": 0}
        >>> attnlab.attention(q, k, v, engine="performer", engine_options=opts).shape
        torch.Size([2, 4, 16, 8])
    """
    if type(mask) is Causal and isinstance(q, Tensor) and q.dim() > 1 and q.shape[-2] == 1:
        mask = None  # one query row, a decoding step: bottom-right causal allows every key
    plain = mask is None and bias is None and softcap is None and sinks is None
    if plain and engine == "auto" and engine_options is None:  # a decoding step, say
        flags_off = return_weights is False and return_lse is False and approximate is False
        defaults = flags_off and _defaults(score, normalize, dropout_p)
        out = _plain(q, k, v, scale) if defaults else None
        if out is not None:
            return out
    req = _request(
        q,
        k,
        v,
        mask,
        bias,
        scale,
        score,
        normalize,
        dropout_p,
        return_weights,
        return_lse,
        engine_options=engine_options,
        approximate=approximate,
        softcap=softcap,
        sinks=sinks,
    )
    chosen = select_engine(engine, req)
    rewrite = rewriter()
    own = isinstance(chosen, (ApproximateEngine, ReferenceEngine))  # weights of its own
    if (live_weights() or rewrite) and not own:  # the weights must be the ones in the graph
        chosen = get_engine("reference")
        req = dataclasses.replace(req, return_weights=True, options={})
    elif own and (observing() or live_weights() or rewrite):
        req = dataclasses.replace(req, return_weights=True)
    out, weights, lse = chosen.forward(req)
    if rewrite is not None and weights is not None:  # an intervention on the weights
        weights = rewrite(req, weights)  # (B, Hq, Lq, Lk)
        out = weights.to(req.v.dtype) @ expand_kv(req.v, req.heads)  # (B, Hq, Lq, Ev)
        lse = None
    if observing():  # a capture block is open in this thread
        notify(AttentionEvent(req, weights, lse, chosen.name))
    if return_weights or return_lse:
        return AttentionOutput(out, weights if return_weights else None, lse)
    return out


def _defaults(score: object, normalize: object, dropout_p: object) -> bool:
    """Whether these :func:`attention` arguments are their defaults (a value the full path
    would reject, like ``dropout_p=False``, is not: it goes there and fails)."""
    if type(score) is not str or type(normalize) is not str:
        return False
    no_dropout = type(dropout_p) in (int, float) and dropout_p == 0
    return score == "dot" and normalize == "softmax" and no_dropout


def attention_plain(q: Tensor, k: Tensor, v: Tensor, scale: float | None = None) -> Tensor | None:
    """``attention(q, k, v, scale=scale)`` where ``engine="auto"`` answers it without
    building a request (a decoding step: see :meth:`attnlab.engines.Engine.plain`), else
    None: then call :func:`attention`. For callers on a decoding loop's hot path, like the
    transformers backend; the inputs are validated as by :func:`attention`.

    Example:
        >>> q, k = torch.randn(1, 8, 1, 16), torch.randn(1, 2, 40, 16)
        >>> out = attention_plain(q, k, k)
        >>> out is None or torch.allclose(out, attention(q, k, k), atol=1e-6)
        True
    """
    return _plain(q, k, v, scale)


def _plain(q: Tensor, k: Tensor, v: Tensor, scale: float | None) -> Tensor | None:
    """The output of a plain :func:`attention` call without a request, or None.

    A call with nothing but q, k, v and a scale is the whole of a decoding step, where
    building and routing a request cost as much as the kernel. The engine ``auto`` would
    pick answers it directly (:func:`attnlab.engines.base.plain_attention`) when no
    capture block, weight rewriter or live-weights block is open in this thread; inputs are
    validated as on the full path.
    """
    if observing() or rewriter() or live_weights():  # each a list's truth when none is open
        return None
    q, k, v = V.validate_qkv(q, k, v, same_dim=True)
    return plain_attention(q, k, v, V.validate_scale(scale))


@overload
def attend(
    scores: Tensor,
    v: Tensor,
    *,
    mask: Mask | Tensor | None = ...,
    normalize: str = ...,
    dropout_p: float = ...,
    return_weights: Literal[False] = ...,
    return_lse: Literal[False] = ...,
) -> Tensor: ...


@overload
def attend(
    scores: Tensor,
    v: Tensor,
    *,
    mask: Mask | Tensor | None = ...,
    normalize: str = ...,
    dropout_p: float = ...,
    return_weights: Literal[True],
    return_lse: bool = ...,
) -> AttentionOutput: ...


@overload
def attend(
    scores: Tensor,
    v: Tensor,
    *,
    mask: Mask | Tensor | None = ...,
    normalize: str = ...,
    dropout_p: float = ...,
    return_weights: bool = ...,
    return_lse: Literal[True],
) -> AttentionOutput: ...


@overload
def attend(
    scores: Tensor,
    v: Tensor,
    *,
    mask: Mask | Tensor | None = ...,
    normalize: str = ...,
    dropout_p: float = ...,
    return_weights: bool = ...,
    return_lse: bool = ...,
) -> Tensor | AttentionOutput: ...


@as_written(PLANS)  # (traced, it broke the graph inside, with dynamo's warning)
def attend(
    scores: Tensor,
    v: Tensor,
    *,
    mask: Mask | Tensor | None = None,
    normalize: str = "softmax",
    dropout_p: float = 0.0,
    return_weights: bool = False,
    return_lse: bool = False,
) -> Tensor | AttentionOutput:
    """Mask, normalize and mix precomputed scores: the last three steps of attention; for
    parametric scores (Luong's general, Bahdanau's additive) computed by a module.

    Args:
        scores: ``(B, Hq, Lq, Lk)`` scores, already scaled and biased.
        v: values ``(B, Hkv, Lk, Ev)``, ``Hq % Hkv == 0``.
        mask, normalize, dropout_p, return_weights, return_lse: as in :func:`attention`.

    Returns:
        ``out (B, Hq, Lq, Ev)`` or an :class:`AttentionOutput`.

    Example:
        >>> import torch
        >>> scores, v = torch.zeros(1, 1, 1, 4), torch.arange(4.).view(1, 1, 4, 1)
        >>> attend(scores, v).item()
        1.5
    """
    s, v = V.validate_scores(scores, v)
    _, h, lq, lk = s.shape
    b = torch.broadcast_shapes(s.shape[:1], v.shape[:1])[0]  # the output's batch (s may be 1)
    mask_ = as_mask(mask)
    allowed = None
    if mask_ is not None:
        mask_.check(batch=b, heads=h, lq=lq, lk=lk)
        allowed = mask_.dense(lq, lk, batch=b, heads=h, device=s.device)
    want_lse = V.validate_flag("return_lse", return_lse)
    out, w, lse = mix(
        s,
        v,
        allowed,
        normalize=V.validate_normalize(normalize, want_lse),
        dropout_p=V.validate_dropout(dropout_p),
        want_lse=want_lse,
    )
    if observing():
        notify(AttentionEvent(None, w, lse, "attend"))
    if V.validate_flag("return_weights", return_weights) or want_lse:
        return AttentionOutput(out, w if return_weights else None, lse)
    return out


def attention_weights(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    mask: Mask | Tensor | None = None,
    bias: Bias | Tensor | None = None,
    scale: float | None = None,
    score: str = "dot",
    heads: Sequence[int] | None = None,
    rows: Sequence[int] | None = None,
    softcap: float | None = None,
    sinks: Tensor | None = None,
) -> Tensor:
    """Softmax attention weights of some heads and query rows, without ``Lq x Lk`` for all.

    The blocked engine computes only the query blocks that overlap ``rows`` and keeps only
    ``heads``, so one head of a long sequence costs little memory. No autograd.

    Args:
        q, k, v: ``(B, Hq, Lq, E)``, ``(B, Hkv, Lk, E)``, ``(B, Hkv, Lk, Ev)``.
        mask, bias, scale, score, softcap, sinks: as in :func:`attention` (``"dot"`` or
            ``"cosine"`` score).
        heads: query heads to return, any sequence of indices (default all).
        rows: ``(r0, r1)`` query rows to return (default all).

    Returns:
        ``(B, len(heads), r1 - r0, Lk)`` weights.

    Example:
        >>> import torch
        >>> from attnlab import masks
        >>> q = k = v = torch.randn(1, 4, 300, 16)
        >>> w = attention_weights(q, k, v, mask=masks.window(8), heads=[2], rows=(290, 300))
        >>> w.shape, bool(w[0, 0, 0, :282].sum() == 0)
        (torch.Size([1, 1, 10, 300]), True)
    """
    extras = {"softcap": softcap, "sinks": sinks}
    req = _request(q, k, v, mask, bias, scale, score, "softmax", 0.0, False, False, **extras)  # type: ignore[arg-type]
    heads, rows = V.validate_selection(heads, rows, req.heads, req.lq)
    why = get_engine("blocked").unsupported(req)
    sizes = (*req.q.shape, *req.k.shape[2:], req.v.shape[-1])
    empty = req.q.is_meta or 0 in sizes  # nothing to keep small (meta: shapes only)
    if why is not None and not empty:  # (its reason: a callable score, a float16 mask, ...)
        raise ValueError(f"attention_weights needs the blocked engine, which declines: {why}")
    return request_weights(req, heads, rows)
