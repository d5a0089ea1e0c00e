"""Attention normalizers: softmax, sparsemax and 1.5-entmax over the last dim of the scores.

Every normalizer maps a scores tensor (usually ``(B, H, Lq, Lk)``, but any shape works) to
weights along ``dim=-1`` that are non-negative and sum to 1. They share one set of rules:

* an entry equal to ``-inf`` is *masked* and gets weight exactly 0;
* a fully masked row (all ``-inf``) gives an all-zero row and zero gradients, never NaN;
* a NaN anywhere in a row makes that whole row of weights NaN (it is never silently zeroed);
* an empty last dim returns an empty tensor of the same shape;
* float16 / bfloat16 inputs are computed in float32 and cast back.

``sparsemax`` (Martins & Astudillo, 2016) and ``entmax15`` (Peters, Niculae & Martins,
2019) are exact, sort-based, and can put exactly zero weight on low scores. Both are
:class:`torch.autograd.Function` s with a closed-form backward and forward-mode
derivative (``jvp``).

Example:
    >>> import torch
    >>> scores = torch.tensor([[1.0, 0.5, -1.0], [0.0, float("-inf"), 0.0]])
    >>> sparsemax(scores)
    tensor([[0.7500, 0.2500, 0.0000],
            [0.5000, 0.0000, 0.5000]])
    >>> get_normalizer("softmax")(scores)[1]
    tensor([0.5000, 0.0000, 0.5000])
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from attnlab._eager import compiling, first_order_only, vmapping
from attnlab._rows import (
    _check_scores,
    _compute_dtype,
    _empty_like_result,
    _finish,
    _nan_rows,
    _safe_row_max,
    _sorted_rows,
    _support_size,
)

__all__ = [
    "NORMALIZERS",
    "entmax15",
    "get_normalizer",
    "softmax",
    "softmax_with_lse",
    "sparsemax",
]

# --------------------------------------------------------------------------- sparsemax


def _sparsemax_forward(x: Tensor) -> Tensor:
    """Euclidean projection of each row onto the simplex (exact, sort-based).

    Args:
        x: scores shifted by their row max, shape ``(..., L)``.

    Returns:
        Weights ``max(x - tau, 0)``, shape ``(..., L)``.
    """
    xs, k, in_range = _sorted_rows(x)  # (..., L), (L,), (..., L)
    cs = xs.cumsum(dim=-1)  # (..., L)
    in_support = in_range & (1 + k * xs > cs)  # (..., L)
    k_star = _support_size(in_support)  # (..., 1)
    tau = (cs.gather(-1, k_star - 1) - 1) / k_star.to(x.dtype)  # (..., 1)
    return torch.clamp(x - tau, min=0)


def _sparsemax_backward(p: Tensor, g: Tensor) -> Tensor:
    """Vector-Jacobian product of sparsemax: ``S * (g - mean of g over S)``.

    Args:
        p: forward output, shape ``(..., L)``.
        g: upstream gradient, shape ``(..., L)``.

    Returns:
        Gradient w.r.t. the scores, shape ``(..., L)``.
    """
    support = p > 0  # (..., L)
    g_s = torch.where(support, g, torch.zeros_like(g))  # (..., L)
    n = support.sum(dim=-1, keepdim=True).clamp(min=1)  # (..., 1)
    g_mean = g_s.sum(dim=-1, keepdim=True) / n.to(g.dtype)  # (..., 1)
    grad = torch.where(support, g - g_mean, torch.zeros_like(g))
    return torch.where(_nan_rows(p), torch.full_like(grad, math.nan), grad)


class _SparseMap(torch.autograd.Function):
    """A sparse normalizer along the last dim with a closed-form backward.

    Subclasses set ``project`` (shifted scores -> weights) and ``gradient``
    (weights, upstream gradient -> gradient w.r.t. the scores).
    """

    project: Callable[[Tensor], Tensor]
    gradient: Callable[[Tensor, Tensor], Tensor]
    # forward and backward are torch ops row by row, so torch.func.vmap may batch them
    generate_vmap_rule = True

    @classmethod
    def forward(cls, scores: Tensor) -> Tensor:
        """The weights, computed in (at least) float32 (no ``ctx``: ``torch.func.grad``
        can differentiate it)."""
        x = scores.to(_compute_dtype(scores.dtype))  # (..., L)
        return _finish(cls.project(x - _safe_row_max(x)), x)  # (..., L)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Tensor], output: Tensor) -> None:
        """Save the weights (in the compute dtype) for backward and forward mode."""
        ctx.save_for_backward(output)
        ctx.save_for_forward(output)
        ctx.in_dtype = inputs[0].dtype

    @classmethod
    def jvp(cls, ctx: Any, tangent: Tensor) -> Tensor:
        """Forward mode (``torch.func.jvp``, ``jacfwd``): the Jacobian is symmetric
        (``diag(g) - g g^T / sum(g)``, with ``g`` the support for sparsemax and ``sqrt(p)``
        for 1.5-entmax), so the tangent is ``gradient`` of it. It raised torch's "You must
        implement the jvp function"."""
        (p,) = ctx.saved_tensors
        return cls.gradient(p, tangent.to(p.dtype))

    @classmethod
    def backward(cls, ctx: Any, grad_out: Tensor) -> Tensor:
        """The closed-form gradient of ``gradient``, itself differentiable: for sparsemax
        it is linear in ``grad_out`` with the support fixed, so autograd's second order
        (``J^T H J`` of a loss that is not linear in the weights) is exact. It was cut
        (``once_differentiable``): MAML's outer gradient came out 0.3250 for 0.3128."""
        return cls.scores_grad(ctx, grad_out)

    @classmethod
    def scores_grad(cls, ctx: Any, grad_out: Tensor) -> Tensor:
        (p,) = ctx.saved_tensors
        return cls.gradient(p, grad_out.to(p.dtype)).to(ctx.in_dtype)


class _Sparsemax(_SparseMap):
    """Autograd wrapper of sparsemax along the last dim."""

    project = staticmethod(_sparsemax_forward)
    gradient = staticmethod(_sparsemax_backward)


def sparsemax(scores: Tensor) -> Tensor:
    """Sparsemax along the last dim: the Euclidean projection of each row onto the simplex.

    Args:
        scores: any shape ``(..., L)``; ``-inf`` entries are masked.

    Returns:
        Weights of the same shape and dtype; rows sum to 1 (0 for fully masked rows).

    Example:
        >>> sparsemax(torch.tensor([1.0, 0.5, -1.0]))
        tensor([0.7500, 0.2500, 0.0000])
    """
    _check_scores(scores, "sparsemax")
    if scores.shape[-1] == 0:
        return _empty_like_result(scores)
    out: Tensor = _Sparsemax.apply(scores)
    return out.to(scores.dtype)


# --------------------------------------------------------------------------- entmax15


def _entmax15_forward(x: Tensor) -> Tensor:
    """Exact 1.5-entmax of each row: ``max(x / 2 - tau, 0) ** 2`` with ``sum = 1``.

    For a candidate support of the ``k`` largest ``y = x / 2``, ``tau`` solves
    ``sum (y_i - tau)^2 = 1``, i.e. ``tau = mean - sqrt((1 - ss) / k)`` with ``ss`` the sum
    of squared deviations; the support is the ranks where ``tau_k <= y_(k)``.

    Args:
        x: scores shifted by their row max, shape ``(..., L)``.

    Returns:
        Weights, shape ``(..., L)``.
    """
    y = x / 2  # (..., L)
    ys, k, in_range = _sorted_rows(y)  # (..., L), (L,), (..., L)
    mean = ys.cumsum(dim=-1) / k  # (..., L)
    mean_sq = (ys * ys).cumsum(dim=-1) / k  # (..., L)
    ss = k * (mean_sq - mean * mean)  # (..., L)
    tau = mean - torch.sqrt(torch.clamp((1 - ss) / k, min=0))  # (..., L)
    in_support = in_range & (tau <= ys)  # (..., L)
    tau_star = tau.gather(-1, _support_size(in_support) - 1)  # (..., 1)
    return torch.clamp(y - tau_star, min=0) ** 2


def _entmax15_backward(p: Tensor, g: Tensor) -> Tensor:
    """Vector-Jacobian product of 1.5-entmax with ``s = sqrt(p)``: ``g*s - s*sum(g*s)/sum(s)``.

    Args:
        p: forward output, shape ``(..., L)``.
        g: upstream gradient, shape ``(..., L)``.

    Returns:
        Gradient w.r.t. the scores, shape ``(..., L)``.
    """
    gppr = torch.sqrt(p)  # (..., L), 0 off the support
    dx = torch.where(p > 0, g, torch.zeros_like(g)) * gppr  # (..., L)
    denom = gppr.sum(dim=-1, keepdim=True)  # (..., 1)
    q = dx.sum(dim=-1, keepdim=True) / torch.where(denom == 0, torch.ones_like(denom), denom)
    grad = dx - q * gppr
    return torch.where(_nan_rows(p), torch.full_like(grad, math.nan), grad)


class _Entmax15(_SparseMap):
    """Autograd wrapper of 1.5-entmax along the last dim."""

    project = staticmethod(_entmax15_forward)
    gradient = staticmethod(_entmax15_backward)

    @classmethod
    @first_order_only("1.5-entmax", "its Jacobian depends on the weights; use softmax there")
    def backward(cls, ctx: Any, grad_out: Tensor) -> Tensor:
        """The closed-form gradient; a second derivative through it raises."""
        return cls.scores_grad(ctx, grad_out)


def entmax15(scores: Tensor) -> Tensor:
    """1.5-entmax along the last dim (Peters, Niculae & Martins, 2019), exact sort-based.

    Args:
        scores: any shape ``(..., L)``; ``-inf`` entries are masked.

    Returns:
        Weights of the same shape and dtype; rows sum to 1 (0 for fully masked rows).

    Example:
        >>> entmax15(torch.tensor([0.0, 0.0, -5.0]))
        tensor([0.5000, 0.5000, 0.0000])
    """
    _check_scores(scores, "entmax15")
    if scores.shape[-1] == 0:
        return _empty_like_result(scores)
    out: Tensor = _Entmax15.apply(scores)
    return out.to(scores.dtype)


# --------------------------------------------------------------------------- softmax


def _softmax_parts(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Shared pieces of softmax and its logsumexp, with plain autograd ops.

    Args:
        x: scores in the compute dtype, shape ``(..., L)`` with ``L >= 1``.

    Returns:
        ``(e, s, m)``: ``exp(x - m)`` ``(..., L)``, its row sum ``(..., 1)`` and the
        (detached, finite) row shift ``m`` ``(..., 1)``.
    """
    m = _safe_row_max(x.detach())  # (..., 1)
    e = torch.exp(x - m)  # (..., L); masked entries give exactly 0
    return e, e.sum(dim=-1, keepdim=True), m


def _nonzero(s: Tensor) -> Tensor:
    """``s`` with exact zeros replaced by 1 (NaN kept), so dividing or taking logs is safe."""
    return torch.where(s == 0, torch.ones_like(s), s)


def _fused_with_dead_rows(
    x: Tensor, dead: Tensor, want_lse: bool, dtype: torch.dtype
) -> tuple[Tensor, Tensor | None]:
    """Torch's fused softmax (and logsumexp) where the only non-finite row maxima are
    fully masked rows: those rows are filled with 0, then their results set to 0 (lse
    ``-inf``), so their gradient is exactly 0 and the other rows round as torch's do.

    Args:
        x: scores in the compute dtype, shape ``(..., L)`` with ``L >= 1``.
        dead: the fully masked rows, shape ``(..., 1)`` bool.
        want_lse: whether to compute the logsumexp.
        dtype: the dtype of the results.

    Returns:
        ``(weights, lse)``: ``(..., L)`` and ``(...)`` (or None), in ``dtype``.
    """
    live = x.masked_fill(dead, 0.0)  # (..., L)
    p = torch.softmax(live, dim=-1).masked_fill(dead, 0.0)  # (..., L)
    if not want_lse:
        return p.to(dtype), None
    lse = torch.logsumexp(live, dim=-1).masked_fill(dead.squeeze(-1), -math.inf)  # (...)
    return p.to(dtype), lse.to(dtype)


def softmax(scores: Tensor) -> Tensor:
    """Softmax along the last dim with masked (``-inf``) and fully masked rows handled.

    Args:
        scores: any shape ``(..., L)``; ``-inf`` entries are masked.

    Returns:
        Weights of the same shape and dtype; rows sum to 1 (0 for fully masked rows).

    Example:
        >>> softmax(torch.tensor([[0.0, 0.0], [float("-inf"), float("-inf")]]))
        tensor([[0.5000, 0.5000],
                [0.0000, 0.0000]])
    """
    _check_scores(scores, "softmax")
    return softmax_rows(scores, want_lse=False)[0]


def softmax_with_lse(scores: Tensor) -> tuple[Tensor, Tensor]:
    """Softmax along the last dim and the per-row logsumexp of the scores.

    The logsumexp is ``-inf`` for fully masked (and empty) rows; its gradient there is 0.

    Args:
        scores: any shape ``(..., L)``; ``-inf`` entries are masked.

    Returns:
        ``(weights, lse)``: weights ``(..., L)`` and lse ``(...)``, both in ``scores.dtype``.

    Example:
        >>> p, lse = softmax_with_lse(torch.tensor([0.0, 0.0]))
        >>> p, round(lse.item(), 4)
        (tensor([0.5000, 0.5000]), 0.6931)
    """
    _check_scores(scores, "softmax_with_lse")
    p, lse = softmax_rows(scores, want_lse=True)
    return p, lse  # type: ignore[return-value]  # (want_lse: a tensor)


def softmax_rows(scores: Tensor, *, want_lse: bool) -> tuple[Tensor, Tensor | None]:
    """:func:`softmax_with_lse` (unchecked), the logsumexp only if ``want_lse``.

    Where no row's max is NaN or +inf it is torch's fused softmax (and logsumexp), fully
    masked rows filled and then zeroed: the general form's five passes took 2x its time (the
    reference engine's weights, B=8, H=8, 512 x 512) and, used for a whole call because one
    row was fully masked, up to 3.6x plain PyTorch's float32 dq error on the other rows
    (rows 0-14 of window(1) & padding([16], [15])). Under compile, vmap or meta, the latter.

    Example:
        >>> softmax_rows(torch.tensor([[0.0, 0.0]]), want_lse=False)
        (tensor([[0.5000, 0.5000]]), None)
    """
    if scores.shape[-1] == 0:
        return _empty_like_result(scores), scores.new_full(scores.shape[:-1], -math.inf)
    x = scores.to(_compute_dtype(scores.dtype))  # (..., L)
    if not (x.is_meta or compiling() or vmapping()):  # values readable
        row_max = x.detach().amax(dim=-1, keepdim=True)  # (..., 1)
        if bool(torch.isfinite(row_max).all()):
            p = torch.softmax(x, dim=-1)  # (..., L)
            lse = torch.logsumexp(x, dim=-1).to(scores.dtype) if want_lse else None  # (...)
            return p.to(scores.dtype), lse
        if not bool((torch.isnan(row_max) | torch.isposinf(row_max)).any()):
            return _fused_with_dead_rows(x, torch.isneginf(row_max), want_lse, scores.dtype)
    e, s, m = _softmax_parts(x)  # (..., L), (..., 1), (..., 1)
    s_safe = _nonzero(s)  # (..., 1)
    p = e / s_safe  # (..., L)
    lse = torch.where(s == 0, torch.full_like(s, -math.inf), m + torch.log(s_safe))  # (..., 1)
    return p.to(scores.dtype), lse.squeeze(-1).to(scores.dtype)


# --------------------------------------------------------------------------- registry

NORMALIZERS: dict[str, Callable[[Tensor], Tensor]] = {
    "softmax": softmax,
    "sparsemax": sparsemax,
    "entmax15": entmax15,
}


def _valid_names() -> str:
    """The registered names, quoted and comma separated."""
    return ", ".join(repr(name) for name in NORMALIZERS)


def get_normalizer(name: object) -> Callable[[Tensor], Tensor]:
    """Look up a normalizer by name.

    Args:
        name: one of the keys of :data:`NORMALIZERS`.

    Returns:
        The normalizer function.

    Raises:
        TypeError: ``name`` is not a string.
        ValueError: ``name`` is not a registered normalizer.

    Example:
        >>> get_normalizer("sparsemax") is sparsemax
        True
    """
    if not isinstance(name, str):
        raise TypeError(
            f"normalize={name!r} must be a str (got {type(name).__name__}); "
            f"expected one of {_valid_names()}"
        )
    if name not in NORMALIZERS:
        raise ValueError(
            f"normalize={name!r} is not a known normalizer; expected one of {_valid_names()}"
        )
    return NORMALIZERS[name]
