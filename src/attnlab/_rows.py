"""Row helpers of the normalizers (:mod:`attnlab.normalize`): input checks, the compute
dtype, the row shift and sort, and the rules for masked and NaN rows."""

from __future__ import annotations

import math

import torch
from torch import Tensor

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def _check_scores(scores: Tensor, fn: str) -> None:
    """Reject inputs that have no last dim or are not floating point.

    Args:
        scores: the tensor handed to a normalizer.
        fn: the public function name, used in the error message.

    Raises:
        ValueError: ``scores`` is 0-dimensional.
        TypeError: ``scores`` is not a floating-point tensor.
    """
    if not isinstance(scores, Tensor):
        raise TypeError(f"{fn}: scores must be a torch.Tensor, got {type(scores).__name__}")
    if scores.ndim == 0:
        raise ValueError(f"{fn}: scores must have at least one dimension, got a 0-d tensor")
    if not scores.is_floating_point():
        raise TypeError(f"{fn}: scores must be a floating-point tensor, got {scores.dtype}")


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype to compute in: float32 for half types, otherwise ``dtype`` itself."""
    return torch.float32 if dtype in _LOW_PRECISION else dtype


def _safe_row_max(x: Tensor) -> Tensor:
    """Row max with non-finite values (fully masked rows, NaN, +inf) replaced by 0.

    Args:
        x: scores, shape ``(..., L)`` with ``L >= 1``.

    Returns:
        The shift to subtract, shape ``(..., 1)``.
    """
    m = x.amax(dim=-1, keepdim=True)  # (..., 1)
    return torch.where(torch.isfinite(m), m, torch.zeros_like(m))


def _nan_rows(x: Tensor) -> Tensor:
    """Rows containing a NaN, shape ``(..., 1)`` bool."""
    return torch.isnan(x).any(dim=-1, keepdim=True)


def _finish(p: Tensor, x: Tensor) -> Tensor:
    """Force fully masked rows to exact zeros and NaN-containing rows to NaN.

    Args:
        p: computed weights, shape ``(..., L)``.
        x: the scores they were computed from, shape ``(..., L)``.

    Returns:
        The cleaned weights, shape ``(..., L)``.
    """
    all_masked = torch.isneginf(x).all(dim=-1, keepdim=True)  # (..., 1)
    p = torch.where(all_masked, torch.zeros_like(p), p)
    return torch.where(_nan_rows(x), torch.full_like(p, math.nan), p)


def _sorted_rows(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Sort each row in descending order, zeroing the masked ``-inf`` tail.

    The ``-inf`` entries sort last; instead of doing arithmetic on them (which gives NaN in
    cumulative sums) they are replaced by 0 and excluded through a rank mask built from the
    count of valid (non ``-inf``) entries.

    Args:
        x: shifted scores, shape ``(..., L)``.

    Returns:
        ``(xs, k, in_range)``: sorted values with the tail zeroed ``(..., L)``, the 1-based
        ranks ``(L,)`` in ``x.dtype``, and ``k <= n_valid`` as a bool ``(..., L)``.
    """
    xs = torch.sort(x, dim=-1, descending=True).values  # (..., L)
    n_valid = (~torch.isneginf(x)).sum(dim=-1, keepdim=True)  # (..., 1)
    k = torch.arange(1, x.shape[-1] + 1, device=x.device, dtype=x.dtype)  # (L,)
    in_range = k <= n_valid  # (..., L)
    return torch.where(in_range, xs, torch.zeros_like(xs)), k, in_range


def _support_size(in_support: Tensor) -> Tensor:
    """Count the support per row, at least 1 so it can index, shape ``(..., 1)`` int64."""
    return in_support.sum(dim=-1, keepdim=True).clamp(min=1)


def _empty_like_result(scores: Tensor) -> Tensor:
    """Result for an empty last dim: an empty tensor of the same shape, still in the graph."""
    return scores.clone()
