"""Kernelized attention, shared by the linear and Performer engines.

Both replace ``softmax(q k^T * scale)`` by a kernel ``phi(q) phi(k)^T`` with a positive
feature map ``phi``, so attention factorizes::

    out_i = phi(q_i) (sum_j phi(k_j) v_j^T) / phi(q_i) (sum_j phi(k_j))

Non-causal attention sums over all keys once; causal attention takes prefix sums, in
chunks of ``chunk_size`` keys (a quadratic ``C x C`` product inside a chunk, one running
state per chunk), so memory is ``O(L F E / C)`` per head instead of ``O(L F E)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from attnlab.engines.base import AttentionRequest
from attnlab.scores import grouped_matmul

__all__ = ["kernel_attention", "kernel_result", "kernel_weights"]


def kernel_attention(
    qf: Tensor, kf: Tensor, v: Tensor, *, causal: bool, chunk_size: int = 128
) -> Tensor:
    """``out_i = sum_j (qf_i . kf_j) v_j / sum_j (qf_i . kf_j)`` in linear time.

    Args:
        qf: query features ``(B, Hq, Lq, F)``, nonnegative.
        kf: key features ``(B, Hkv, Lk, F)``, nonnegative (0 on padded keys).
        v: values ``(B, Hkv, Lk, Ev)``; ``Hq % Hkv == 0``.
        causal: sum over keys ``j <= i + Lk - Lq`` only (bottom-right aligned).
        chunk_size: keys per chunk of the causal prefix sums.

    Returns:
        ``(B, Hq, Lq, Ev)``; 0 where a query has no key (or all features vanish).

    Example:
        >>> qf, kf, v = torch.rand(1, 2, 5, 3), torch.rand(1, 1, 5, 3), torch.randn(1, 1, 5, 4)
        >>> out = kernel_attention(qf, kf, v, causal=True, chunk_size=2)
        >>> torch.allclose(out[:, :, 0], v[:, :, 0].expand(1, 2, 4))
        True
    """
    if causal:  # numerator and denominator together: v with a column of ones
        v1 = torch.cat([v, v.new_ones(*v.shape[:-1], 1)], dim=-1)  # (B, Hkv, Lk, Ev + 1)
        both = _causal_sums(qf, kf, v1, chunk_size)  # (B, Hq, Lq, Ev + 1)
        num, den = both[..., :-1], both[..., -1:]
    else:
        num = grouped_matmul(qf, kf.transpose(-1, -2) @ v)  # (B, Hq, Lq, Ev)
        den = grouped_matmul(qf, kf.sum(-2).unsqueeze(-1))  # (B, Hq, Lq, 1)
    return _safe_ratio(num, den)


def _safe_ratio(num: Tensor, den: Tensor) -> Tensor:
    """``num / den`` where ``den`` is a normal float, 0 elsewhere (a row with no key, or
    whose features all vanish), with 0 gradient there: dividing by a clamped ``den``
    instead gives such rows gradients ``1 / tiny`` that overflow, and their ``0 * inf``
    (through the zeroed features of padded keys) NaN."""
    ok = den >= torch.finfo(den.dtype).tiny  # den >= 0: nonnegative features
    return torch.where(ok, num / torch.where(ok, den, 1), 0)


def _causal_sums(qf: Tensor, kf: Tensor, v1: Tensor, chunk: int) -> Tensor:
    """Causal ``sum_{j <= p(i)} (qf_i . kf_j) v1_j`` for bottom-right aligned rows."""
    b, hq, lq, f = qf.shape
    hkv, lk = kf.shape[1], kf.shape[2]
    qg = qf.reshape(b, hkv, hq // hkv, lq, f)  # (B, Hkv, G, Lq, F)
    shift = lk - lq  # query row i sits at key position i + shift
    state = None
    if shift > 0:  # keys every query sees
        state = kf[:, :, :shift].transpose(-1, -2) @ v1[:, :, :shift]  # (B, Hkv, F, Ev1)
        kf, v1 = kf[:, :, shift:], v1[:, :, shift:]
    elif shift < 0:  # rows before the first key see nothing
        qg = qg[:, :, :, -shift:]
    out = _chunked_prefix(qg, kf, v1, chunk, state)  # (B, Hkv, G, min(Lq, Lk), Ev1)
    if shift < 0:
        out = F.pad(out, (0, 0, -shift, 0))
    return out.reshape(b, hq, lq, -1)


def _chunked_prefix(qg: Tensor, kf: Tensor, v1: Tensor, chunk: int, state: Tensor | None) -> Tensor:
    """Square causal kernel sums by chunks: an exclusive running state per chunk plus a
    masked ``C x C`` product inside it."""
    b, hkv, g, n, f = qg.shape
    c = max(1, min(chunk, n))
    m = -(-n // c)
    pad = m * c - n
    if pad:
        qg, kf, v1 = (F.pad(t, (0, 0, 0, pad)) for t in (qg, kf, v1))
    qc = qg.reshape(b, hkv, g, m, c, f)  # (B, Hkv, G, M, C, F)
    kc = kf.reshape(b, hkv, 1, m, c, f)  # (B, Hkv, 1, M, C, F)
    vc = v1.reshape(b, hkv, 1, m, c, -1)  # (B, Hkv, 1, M, C, Ev1)
    kv = kc.transpose(-1, -2) @ vc  # (B, Hkv, 1, M, F, Ev1)
    prev = torch.cat([torch.zeros_like(kv[:, :, :, :1]), kv[:, :, :, :-1]], 3).cumsum(3)
    if state is not None:
        prev = prev + state[:, :, None, None]
    intra = (qc @ kc.transpose(-1, -2)).tril()  # (B, Hkv, G, M, C, C)
    out = qc @ prev + intra @ vc  # (B, Hkv, G, M, C, Ev1)
    return out.reshape(b, hkv, g, m * c, -1)[:, :, :, :n]


def kernel_weights(qf: Tensor, kf: Tensor, causal: bool) -> Tensor:
    """The weights ``(B, Hq, Lq, Lk)`` that :func:`kernel_attention` applies, dense."""
    a = grouped_matmul(qf, kf.transpose(-1, -2))  # (B, Hq, Lq, Lk)
    if causal:
        lq, lk = a.shape[-2:]
        a = a.tril(lk - lq)  # key j <= i + Lk - Lq
    return _safe_ratio(a, a.sum(-1, keepdim=True))


def kernel_result(
    req: AttentionRequest, qf: Tensor, kf: Tensor, causal: bool, chunk: int
) -> tuple[Tensor, Tensor | None]:
    """``(out, weights)`` of features ``qf``, ``kf``: the weights ``(B, Hq, Lq, Lk)``
    materialized only when ``req.return_weights`` asks (else None, in linear time)."""
    if req.return_weights:
        w = kernel_weights(qf, kf, causal)  # (B, Hq, Lq, Lk)
        return grouped_matmul(w, req.v), w
    return kernel_attention(qf, kf, req.v, causal=causal, chunk_size=chunk), None
