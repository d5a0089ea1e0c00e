"""Nystromformer (Xiong et al. 2021): softmax attention through ``m`` landmarks.

Landmarks are segment means of the queries and keys (``m`` contiguous segments). With
``F = softmax(Q Kl^T)``, ``A = softmax(Ql Kl^T)`` and ``B = softmax(Ql K^T)`` (all scaled)::

    out = F A^+ (B V)          # (Lq x m) (m x m) (m x Lk) (Lk x Ev): O(L m) time, memory

where ``A^+`` is the Moore-Penrose pseudo-inverse from the paper's iteration
``Z <- Z (13 I - A Z (15 I - A Z (7 I - A Z))) / 4`` from ``Z0 = A^T / (|A|_1 |A|_inf)``.
With as many landmarks as tokens, ``F = A = B`` is the softmax matrix and the output is
exact attention up to the convergence of the iteration (``pinv_iterations``).

The pseudo-inverse's entries can outgrow float16 (6.4e5 at 64 landmarks) and cancel:
float16 calls run in float32, and bfloat16 calls keep ``A^+`` and its products in float32.

Key padding makes landmarks the means of the valid tokens of each segment (a segment with
none is dropped); padded query rows give 0. There is no causal form. The paper's
depthwise-convolution skip connection on ``V`` is a learned layer, not part of the engine.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from attnlab.engines.approximate import ApproximateEngine, MaskPlan, option_field
from attnlab.engines.base import AttentionRequest
from attnlab.scores import grouped_matmul

__all__ = ["NystromEngine", "NystromOptions", "iterative_pinv", "segment_means"]


@dataclass(frozen=True)
class NystromOptions:
    """``engine_options`` of ``"nystrom"``.

    Attributes:
        num_landmarks: landmarks ``m`` (at most the sequence length is used).
        pinv_iterations: iterations of the pseudo-inverse (the paper uses 6).
    """

    num_landmarks: int = option_field(64, minimum=1)
    pinv_iterations: int = option_field(6, minimum=1)


def segment_means(x: Tensor, m: int, valid: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Means of ``m`` contiguous segments of ``x (B, H, L, E)`` over its valid tokens.

    Token ``i`` belongs to segment ``i * m // L`` (every segment non-empty for ``m <= L``).

    Args:
        x: ``(B, H, L, E)``.
        m: number of segments, ``1 <= m <= L``.
        valid: bool ``(B, 1, L, 1)`` (False on padding) or None.

    Returns:
        ``(means (B, H, m, E), live (B or 1, 1, m, 1))``; a segment without valid tokens
        has mean 0 and ``live`` False.

    Example:
        >>> means, live = segment_means(torch.arange(6.).view(1, 1, 6, 1), 2)
        >>> means.flatten().tolist()
        [1.0, 4.0]
    """
    length = x.shape[2]
    seg = torch.arange(length, device=x.device) * m // length  # (L,) segment of each token
    w = x.new_ones(1, 1, length, 1) if valid is None else valid.to(x.dtype)
    xw = x if valid is None else x * w
    sums = x.new_zeros(*x.shape[:2], m, x.shape[3]).index_add(2, seg, xw)  # (B, H, m, E)
    counts = w.new_zeros(w.shape[0], 1, m, 1).index_add(2, seg, w)  # (B, 1, m, 1)
    return sums / counts.clamp_min(1), counts > 0


def iterative_pinv(a: Tensor, iterations: int) -> Tensor:
    """Nystromformer's iterative Moore-Penrose pseudo-inverse of ``a (..., m, m)``.

    Example:
        >>> a = torch.softmax(torch.randn(2, 8, 8, dtype=torch.float64), -1)
        >>> torch.allclose(iterative_pinv(a, 30), torch.linalg.pinv(a))
        True
    """
    eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
    norm = a.abs().sum(-2).amax(-1) * a.abs().sum(-1).amax(-1)  # |A|_1 |A|_inf, (...)
    z = a.transpose(-1, -2) / norm.clamp_min(torch.finfo(a.dtype).tiny)[..., None, None]
    for _ in range(iterations):
        az = a @ z
        z = 0.25 * z @ (13 * eye - az @ (15 * eye - az @ (7 * eye - az)))
    return z


def _softmax(s: Tensor, allowed: Tensor | None) -> Tensor:
    """Softmax over the last axis of ``s`` where ``allowed`` (broadcast; rows with no
    allowed entry give 0)."""
    if allowed is None:
        return torch.softmax(s, dim=-1)
    w = torch.softmax(s.masked_fill(~allowed, torch.finfo(s.dtype).min), dim=-1)
    return w * allowed.any(-1, keepdim=True)


class NystromEngine(ApproximateEngine):
    """Nystromformer's landmark approximation of softmax attention (non-causal).

    Example:
        >>> import torch, attnlab
        >>> _ = torch.manual_seed(0)
        >>> q, k, v = torch.randn(3, 1, 2, 64, 16).double().unbind(0)
        >>> opts = {"num_landmarks": 64, "pinv_iterations": 40}  # landmarks = tokens
        >>> err = attnlab.approximation_error(q, k, v, engine="nystrom", engine_options=opts)
        >>> err["max_abs"] < 1e-8
        True
    """

    name = "nystrom"
    summary = (
        "Nystromformer, segment-mean landmarks and an iterative "
        "pseudo-inverse; non-causal; padding, GQA"
    )
    options = ("num_landmarks", "pinv_iterations")
    settings_type = NystromOptions
    causal_ok = False
    auto_min_pairs = 1 << 22  # 64 landmarks: 5x faster than SDPA at 2K tokens (forward)
    float16_in_float32 = True  # its pseudo-inverse outgrows float16 (output inf/NaN)

    def feature_dim(self, req: AttentionRequest, opts: NystromOptions) -> int:
        return opts.num_landmarks

    def compute(
        self, req: AttentionRequest, plan: MaskPlan, opts: NystromOptions
    ) -> tuple[Tensor, Tensor | None]:
        m, s = min(opts.num_landmarks, req.lq, req.lk), req.scale
        ql, q_live = segment_means(req.q, m, plan.query_valid)  # (B, Hq, m, E)
        kl, k_live = segment_means(req.k, m, plan.key_valid)  # (B, Hkv, m, E)
        k_ok = key_ok = None  # which landmarks and keys a softmax may use (padding)
        if plan.key_valid is not None:
            k_ok, key_ok = k_live.transpose(-1, -2), plan.key_valid.transpose(-1, -2)
        f = _softmax(grouped_matmul(req.q, kl.transpose(-1, -2)) * s, k_ok)  # (B, Hq, Lq, m)
        a = _softmax(grouped_matmul(ql, kl.transpose(-1, -2)) * s, k_ok)  # (B, Hq, m, m)
        b = _softmax(grouped_matmul(ql, req.k.transpose(-1, -2)) * s, key_ok)  # (.., m, Lk)
        if plan.query_valid is not None:  # query landmarks without a valid query drop out
            a, b = a * q_live, b * q_live
        low = req.q.dtype  # z and its products stay in float32 (its entries cancel)
        z = iterative_pinv(_at_least_fp32(a), opts.pinv_iterations)  # (B, Hq, m, m)
        f = f.to(z.dtype)  # (B, Hq, Lq, m)
        if req.return_weights:
            w = f @ z @ b.to(z.dtype)  # (B, Hq, Lq, Lk)
            return grouped_matmul(w, req.v.to(z.dtype)).to(low), w.to(low)
        bv = grouped_matmul(b, req.v).to(z.dtype)  # (B, Hq, m, Ev)
        return (f @ (z @ bv)).to(low), None  # (B, Hq, Lq, Ev)


def _at_least_fp32(a: Tensor) -> Tensor:
    return a.float() if a.dtype in (torch.float16, torch.bfloat16) else a
