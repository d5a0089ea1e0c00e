"""The reference engine: eager, materializes the scores, supports everything.

It is the oracle of the test suite (run it in float64) and the fallback of ``auto``. Its
four steps are the library's definition of attention::

    scores  = score(q, k) * scale + bias  # softcap: cap * tanh(score * scale / cap) + bias
    scores  = mask(scores)              # masked entries become -inf
    weights = normalize(scores)         # fully masked rows give 0
    out     = dropout(weights) @ v

On a GPU its NaN screens of k and v and its softmax's finite-row check each read a value
back (a host-device sync). Forms without a branch that give the same bits were built and
measured on an H200 (bf16 and fp32, decoding steps of 1-8192 keys to 2 x 8 x 4096^2, with
and without gradients): 1.18x-2.66x the wall time of the branches per call, since the
extra kernels cost the host more than the syncs do here; the branches stay.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import Tensor

from attnlab._eager import autocast_dtype, no_autocast, vmapping
from attnlab.engines._nonfinite import any_nonfinite
from attnlab.engines.base import (
    AttentionRequest,
    Engine,
    EngineResult,
    sink_rows,
    weighted_values,
)
from attnlab.normalize import _compute_dtype, get_normalizer, softmax_rows
from attnlab.scores import SCORES, ScoreFn, expand_kv

__all__ = ["ReferenceEngine", "mix", "request_scores", "softmax_with_sinks"]

#: half-precision inputs are computed in float32: scores rounded to bfloat16 lose 8 bits
#: before the exponential (19x torch SDPA's error at scores of std 16), and float16's
#: unscaled q k^T overflows where the scaled scores fit
_HALF = (torch.float16, torch.bfloat16)


def request_scores(req: AttentionRequest) -> Tensor:
    """Scaled, soft-capped and biased scores ``(B, Hq, Lq, Lk)`` of a request, before
    masking."""
    return _scores(req)[0]


def _scores(req: AttentionRequest) -> tuple[Tensor, bool]:
    """:func:`request_scores`, and whether they are this call's own tensor: then each
    step writes into them: an ``Lq x Lk`` buffer less per step (scores to weights, float32,
    B=8, H=8, L=128, E=32: 1.8 ms with a new tensor per step, 1.1 ms in place). Not under
    vmap, where a bias or mask alone may be batched: a write cannot grow the scores."""
    s, made = _nan_safe_scores(req)
    writable = not vmapping()
    own = made and writable
    if req.scale != 1.0:
        s, own = (s.mul_(req.scale) if own else s * req.scale), writable
    if req.softcap is not None:  # tanh's backward keeps its result: a new one there
        s = s.div_(req.softcap) if own else s / req.softcap
        tracked = s.requires_grad or not writable
        s, own = (torch.tanh(s) * req.softcap if tracked else s.tanh_().mul_(req.softcap)), writable
    if req.bias is not None:
        b = req.bias.dense(
            req.lq, req.lk, batch=req.batch, heads=req.heads, device=s.device, dtype=s.dtype
        )  # (Bb, Hb, Lq, Lk)
        s, own = (s.add_(b) if own and _fits(b, s) else s + b), writable
    return s, own


def _fits(x: Tensor, into: Tensor) -> bool:
    """Whether ``x`` broadcasts to ``into``'s shape without growing it (an in-place
    operation with ``x`` keeps ``into``'s shape)."""
    return torch.broadcast_shapes(x.shape, into.shape) == into.shape


def _nan_safe_scores(req: AttentionRequest) -> tuple[Tensor, bool]:
    """The raw scores ``(B, Hq, Lq, Lk)``, made from keys whose NaN and infinite entries are
    0 (with them in the product, a mask that hides such a key still left ``0 * NaN`` or
    ``0 * inf`` in every row's dq: 600 of 600 rows NaN); such a key's column is then what
    plain math gives (``score="dot"``: ``inf``, ``-inf`` or NaN; other scores: NaN), with
    no gradient; and whether they are a new tensor (a score callable's may be one it
    keeps)."""
    k = req.k
    bad = ~torch.isfinite(k) if req.mask is not None and any_nonfinite(k) else None
    if bad is not None:  # (B, Hkv, Lk, E)
        req = dataclasses.replace(req, k=k.masked_fill(bad, 0.0))
    own = isinstance(req.score, str)
    s = SCORES[req.score](req.q, req.k) if isinstance(req.score, str) else _called_scores(req)
    if bad is None:
        return s, own
    column = expand_kv(bad.any(-1).unsqueeze(2), s.shape[1])  # (B, Hq, 1, Lk)
    if req.score != "dot":
        return s.masked_fill(column, float("nan")), True
    with torch.no_grad():  # plain math's product of q and the key as given (q's inf too)
        plain = SCORES["dot"](req.q.detach(), k)  # (B, Hq, Lq, Lk)
    return torch.where(column, plain, s), True


def _called_scores(req: AttentionRequest) -> Tensor:
    """A score callable's scores ``(B, Hq, Lq, Lk)``, checked: a wrong result is named."""
    assert callable(req.score)
    s = req.score(req.q, expand_kv(req.k, req.heads))
    want = (req.batch, req.heads, req.lq, req.lk)
    if not isinstance(s, Tensor):
        raise TypeError(f"score: the callable must return a tensor {want}, got {type(s).__name__}")
    if tuple(s.shape) != want:
        raise ValueError(
            f"score: the callable must return scores of shape (B, Hq, Lq, Lk) = {want}, "
            f"got {tuple(s.shape)}"
        )
    if not s.is_floating_point() or s.device != req.q.device:
        raise TypeError(
            f"score: the callable must return float scores on q's device ({req.q.device}), "
            f"got {s.dtype} on {s.device}"
        )
    return s.to(req.q.dtype)  # another float dtype (float64 for float32 q) failed to mix


def _in_dtype(score: ScoreFn, dtype: torch.dtype, kind: str) -> ScoreFn:
    """``score`` called on q and k in ``dtype`` (a half-precision call's own): its layers'
    weights are in that dtype (given float32 q and k, a bfloat16 Linear raised torch's bare
    "expected m1 and m2 to have the same dtype"). The round trip is exact. It runs under
    the autocast of the caller (on device type ``kind``), which the engine's own float32
    steps turn off: a float32 Linear met bfloat16 q."""
    cast = autocast_dtype(kind)
    if cast is None:
        return lambda q, k: score(q.to(dtype), k.to(dtype))

    def scored(q: Tensor, k: Tensor) -> Tensor:
        with torch.autocast(kind, dtype=cast):
            return score(q.to(dtype), k.to(dtype))

    return scored


def mix(
    scores: Tensor,
    v: Tensor,
    allowed: Tensor | None,
    *,
    normalize: str = "softmax",
    dropout_p: float = 0.0,
    want_lse: bool = False,
    sinks: Tensor | None = None,
    own: bool = False,
) -> EngineResult:
    """Mask, normalize and take the weighted sum of ``v``.

    Args:
        scores: ``(B, Hq, Lq, Lk)`` scaled scores.
        v: ``(B, Hkv, Lk, Ev)`` values, ``Hq % Hkv == 0``.
        allowed: bool, broadcastable to ``scores``; ``False`` entries are masked.
        normalize: normalizer name.
        dropout_p: dropout on the weights (the returned weights are before dropout).
        want_lse: also return the logsumexp ``(B, Hq, Lq)`` (softmax only).
        sinks: ``(Hq,)`` or ``(B or 1, Hq, Lq)`` logits that join the softmax denominator
            (softmax only), or None.
        own: ``scores`` is the caller's own tensor, which the mask may overwrite.

    Returns:
        ``(out (B, Hq, Lq, Ev), weights (B, Hq, Lq, Lk), lse | None)``.
    """
    s = scores
    if allowed is not None:
        inplace = own and _fits(allowed, s)
        s = s.masked_fill_(~allowed, -math.inf) if inplace else s.masked_fill(~allowed, -math.inf)
    lse = None
    if normalize == "softmax" and sinks is not None:
        w, lse = softmax_with_sinks(s, sink_rows(sinks).to(s.dtype))
    elif normalize == "softmax":
        w, lse = softmax_rows(s, want_lse=want_lse)
    else:
        w = get_normalizer(normalize)(s)
    wd = F.dropout(w, p=dropout_p, training=True) if dropout_p > 0 else w
    out = weighted_values(wd, v, allowed)  # (B, Hq, Lq, Ev)
    return out, w, (lse if want_lse else None)


def softmax_with_sinks(s: Tensor, sink: Tensor) -> tuple[Tensor, Tensor]:
    """Softmax of ``s (B, H, Lq, Lk)`` with one more logit per row, ``sink (B or 1, H, Lq
    or 1)``, in the denominator; and the logsumexp ``(B, H, Lq)`` of both.

    The sink joins the sum under the row's shared max, as a last column of plain
    PyTorch's softmax would. Scaling a finished softmax by ``exp(lse - lse')`` instead
    carried ``lse``'s rounding, which grows with its size (scores of std 11: scale 1,
    E=130). A row with no key and no sink (both ``-inf``) gives 0 with gradient 0.

    Example:
        >>> w, lse = softmax_with_sinks(torch.zeros(1, 1, 1, 1), torch.zeros(1, 1, 1))
        >>> w.item(), round(lse.item(), 4)
        (0.5, 0.6931)
    """
    x = s.to(_compute_dtype(s.dtype))  # (B, H, Lq, Lk)
    sink = sink.to(x.dtype)
    top = x.detach().amax(-1) if x.shape[-1] else sink.detach()  # (no keys: amax raised)
    m = torch.maximum(top, sink.detach())  # (B, H, Lq); the result ignores it
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e = torch.exp(x - m.unsqueeze(-1))  # (B, H, Lq, Lk)
    total = e.sum(-1) + torch.exp(sink - m)  # (B, H, Lq)
    empty = total == 0
    total = torch.where(empty, torch.ones_like(total), total)  # log(0)'s gradient is NaN
    w = e / total.unsqueeze(-1)
    lse = torch.where(empty, torch.full_like(total, -math.inf), m + torch.log(total))
    return w.to(s.dtype), lse.to(s.dtype)


class ReferenceEngine(Engine):
    """Eager attention over materialized ``Lq x Lk`` scores; every feature, any dtype.

    Example:
        >>> import attnlab
        >>> from attnlab import masks
        >>> _ = torch.manual_seed(0)
        >>> q, k, v = torch.randn(3, 1, 2, 4, 8).unbind(0)
        >>> out, w, lse = attnlab.attention(q, k, v, mask=masks.causal(), engine="reference",
        ...                                 return_weights=True, return_lse=True)
        >>> w[0, 0].triu(1).any().item(), torch.allclose(w.sum(-1), torch.ones(1, 2, 4))
        (False, True)
        >>> torch.allclose(out, w @ v), tuple(lse.shape)
        (True, (1, 2, 4))
    """

    name = "reference"
    exact = True
    summary = (
        "every score, mask, bias and normalizer; dropout; weights and lse; "
        "autograd; any dtype and device (materializes Lq x Lk)"
    )

    def unsupported(self, req: AttentionRequest) -> str | None:
        if req.return_lse and req.normalize != "softmax":
            return f"the logsumexp is only defined for softmax, not {req.normalize!r}"
        return None

    def forward(self, req: AttentionRequest) -> EngineResult:
        if req.q.dtype in _HALF:  # scores, softmax and sum in float32, as torch SDPA's are
            low, wide = req.q.dtype, [t.float() for t in (req.q, req.k, req.v)]
            kind = req.q.device.type
            score = req.score if isinstance(req.score, str) else _in_dtype(req.score, low, kind)
            wider = dataclasses.replace(req, q=wide[0], k=wide[1], v=wide[2], score=score)
            with no_autocast(req.q.device.type):  # (its bfloat16 matmuls undid the float32)
                out, w, lse = self.forward(wider)
            return (
                out.to(low),
                None if w is None else w.to(low),
                None if lse is None else lse.to(low),
            )
        s, own = _scores(req)  # (B, Hq, Lq, Lk)
        allowed = None
        if req.mask is not None:
            allowed = req.mask.dense(
                req.lq, req.lk, batch=req.batch, heads=req.heads, device=s.device
            )  # (Bm, Hm, Lq, Lk)
        out, w, lse = mix(
            s,
            req.v,
            allowed,
            normalize=req.normalize,
            dropout_p=req.dropout_p,
            want_lse=req.return_lse,
            sinks=req.sinks,
            own=own,
        )
        return out, (w if req.return_weights else None), lse
