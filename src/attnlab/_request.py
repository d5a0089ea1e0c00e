"""What an :func:`attnlab.attention` call takes in and gives back: the validated request
its arguments become (:func:`build_request`), whether an engine can compute it
(:func:`unsupported_by`), and the :class:`AttentionOutput` it returns with weights or the
logsumexp. :mod:`attnlab.functional` re-exports the public names.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

from torch import Tensor

from attnlab import _validate as V
from attnlab.bias import Bias, as_bias
from attnlab.engines import AttentionRequest, get_engine, validate_options
from attnlab.masks import Mask, as_mask
from attnlab.scores import ScoreFn, default_scale

__all__ = ["AttentionOutput", "build_request", "unsupported_by"]


class AttentionOutput(NamedTuple):
    """What :func:`attention` returns when weights or the logsumexp are asked for.

    Attributes:
        out: ``(B, Hq, Lq, Ev)``.
        weights: ``(B, Hq, Lq, Lk)`` normalized weights (before dropout), or None.
        lse: ``(B, Hq, Lq)`` logsumexp of the scaled, biased, masked scores (``-inf`` on
            fully masked rows), or None.

    Example:
        >>> import torch
        >>> from attnlab import attention
        >>> q = torch.randn(1, 2, 5, 8, dtype=torch.float64)  # (B, H, L, E)
        >>> r = attention(q, q, q, return_weights=True, return_lse=True)
        >>> s = q @ q.mT / 8**0.5  # the scaled scores
        >>> torch.allclose(r.out, r.weights @ q), torch.allclose(r.lse, s.logsumexp(-1))
        (True, True)
    """

    out: Tensor
    weights: Tensor | None
    lse: Tensor | None


def unsupported_by(
    engine: str,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    mask: Mask | Tensor | None = None,
    bias: Bias | Tensor | None = None,
    scale: float | None = None,
    score: str | ScoreFn = "dot",
    normalize: str = "softmax",
    return_weights: bool = False,
) -> str | None:
    """Why ``engine`` cannot compute this :func:`attention` call, or None if it can.

    Layers use it to fall back (for example to recompute weights) instead of failing.

    Example:
        >>> import torch
        >>> q = torch.randn(1, 2, 4, 8)
        >>> unsupported_by("sdpa", q, q, q, return_weights=True)
        'torch SDPA does not return attention weights (return_weights=True)'
        >>> unsupported_by("reference", q, q, q, return_weights=True) is None
        True
    """
    req = build_request(q, k, v, mask, bias, scale, score, normalize, 0.0, return_weights, False)
    return get_engine(engine).unsupported(req)


def build_request(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Mask | Tensor | None,
    bias: Bias | Tensor | None,
    scale: float | None,
    score: str | ScoreFn,
    normalize: str,
    dropout_p: float,
    return_weights: bool,
    return_lse: bool,
    *,
    engine_options: Mapping[str, object] | None = None,
    approximate: bool = False,
    softcap: float | None = None,
    sinks: Tensor | None = None,
) -> AttentionRequest:
    """Validate every argument and build the engine request."""
    score_ = V.validate_score(score)
    q, k, v = V.validate_qkv(q, k, v, same_dim=isinstance(score_, str))
    mask_, bias_ = as_mask(mask), as_bias(bias)
    if mask_ is not None or bias_ is not None:
        sizes = {"batch": q.shape[0], "heads": q.shape[1], "lq": q.shape[2], "lk": k.shape[2]}
        for checked in (mask_, bias_):
            if checked is not None:
                checked.check(**sizes)
    want_lse = V.validate_flag("return_lse", return_lse)
    scale_ = V.validate_scale(scale)
    normalize_ = V.validate_normalize(normalize, want_lse)
    return _request(
        q=q,
        k=k,
        v=v,
        mask=mask_,
        bias=bias_,
        scale=default_scale(score_, q.shape[-1]) if scale_ is None else scale_,
        score=score_,
        normalize=normalize_,
        dropout_p=V.validate_dropout(dropout_p),
        return_weights=V.validate_flag("return_weights", return_weights),
        return_lse=want_lse,
        options=validate_options(engine_options),
        approximate=V.validate_flag("approximate", approximate),
        softcap=V.validate_softcap(softcap),
        sinks=V.validate_sinks(sinks, q, normalize_),
    )


def _request(**fields: object) -> AttentionRequest:
    """``AttentionRequest(**fields)``, every field given, without the frozen dataclass's
    ``__init__``, which sets each of its 15 fields through ``object.__setattr__`` (2.1 us
    of a 1x8x16x16 call; 0.5 us here). The same object: equal, hashed and replaced alike
    (``tests/test_attention.py`` pins the fields given).

    Example:
        >>> import torch
        >>> q = torch.zeros(1, 1, 2, 4)
        >>> req = build_request(q, q, q, None, None, None, "dot", "softmax", 0.0, False, False)
        >>> req == AttentionRequest(q, q, q, None, None, 0.5, "dot", "softmax", 0.0, False, False)
        True
    """
    req = object.__new__(AttentionRequest)
    req.__dict__.update(fields)
    return req
