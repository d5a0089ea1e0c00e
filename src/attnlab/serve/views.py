"""What the explorer sends: attention tensors cut down to what one view needs.

A page never receives every head's full matrix: the thumbnails are each head pooled to
at most 16 x 16 cells, the chosen head comes as its ``top_k`` keys per query, and a
comparison as the largest differences. All figures keep 6 significant digits (a relative
error of at most 5e-6, however small the value).

Example:
    >>> import torch
    >>> w = torch.tensor([[0.1, 0.9], [0.6, 0.4]])  # (Lq, Lk)
    >>> head_view(w, layer=0, head=1, top_k=1)["top"]
    [[[1, 0.9]], [[0, 0.6]]]
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from attnlab.robust.faithfulness import jsd

__all__ = ["THUMB", "divergence", "head_view", "matrix_view", "rounded", "thumbs", "top_rows"]

THUMB = 16  # cells per side of a thumbnail, at most
SIGNIFICANT = 6
_POW10 = torch.tensor([10.0**i for i in range(23)], dtype=torch.float64)  # exact doubles


def rounded(x: Tensor) -> list[Any]:
    """A tensor as nested lists of floats rounded to :data:`SIGNIFICANT` significant
    digits, each the float ``f"{v:.6g}"`` reads as (5 decimals turned a gradient
    relevance of 3e-6 into 0). 0, NaN and infinities stay as they are.

    Example:
        >>> rounded(torch.tensor([0.0, 1.23456789e-7, -98765.4321, 3.0e12]))
        [0.0, 1.23457e-07, -98765.4, 3000000000000.0]
    """
    a = x.detach().to("cpu", torch.float64, copy=True)  # never the caller's tensor
    flat = a.flatten()
    mag = flat.abs()
    live = torch.isfinite(flat) & (mag > 0)
    k = torch.zeros_like(flat)  # decimals kept: SIGNIFICANT - 1 - the decimal exponent
    k[live] = SIGNIFICANT - 1 - mag[live].log10().floor()
    up, down = live & (k >= 0) & (k <= 22), live & (k < 0) & (k >= -22)
    p = _POW10[k[up].long()]
    flat[up] = torch.round(flat[up] * p) / p  # an exact integer / an exact power of 10
    p = _POW10[(-k[down]).long()]
    flat[down] = torch.round(flat[down] / p) * p
    for i in (live & ~up & ~down).nonzero().flatten().tolist():  # |v| < 1e-17 or > 1e27
        flat[i] = float(f"{float(flat[i]):.{SIGNIFICANT}g}")
    return flat.view(a.shape).tolist()


def thumbs(layers: list[Tensor]) -> list[list[list[list[float]]]]:
    """Per layer ``(H, Lq, Lk)`` -> per layer, per head, a ``dq x dk`` grid of block means
    (``dq = min(16, Lq)``, ``dk = min(16, Lk)``).

    Example:
        >>> t = thumbs([torch.full((2, 3, 40), 1 / 40)])
        >>> len(t), len(t[0]), len(t[0][0]), len(t[0][0][0])
        (1, 2, 3, 16)
    """
    out = []
    for w in layers:  # (H, Lq, Lk)
        size = (min(THUMB, w.shape[-2]), min(THUMB, w.shape[-1]))
        out.append(rounded(F.adaptive_avg_pool2d(w.float(), size)))  # (H, dq, dk)
    return out


def top_rows(w: Tensor, top_k: int, *, by_magnitude: bool = False) -> list[list[list[float]]]:
    """``(Lq, Lk)`` -> per query the ``top_k`` pairs ``[key, value]``, largest first (by
    ``|value|`` with ``by_magnitude``); ``top_k`` is clamped to ``Lk``."""
    k = max(1, min(int(top_k), w.shape[-1]))
    idx = (w.abs() if by_magnitude else w).topk(k, dim=-1).indices  # (Lq, k)
    vals = rounded(w.gather(-1, idx))
    return [
        [[int(i), v] for i, v in zip(row_i, row_v, strict=True)]
        for row_i, row_v in zip(idx.tolist(), vals, strict=True)
    ]


def matrix_view(w: Tensor, top_k: int) -> dict[str, Any]:
    """``(Lq, Lk)`` -> ``{"top": top_rows, "argmax": key per query}``."""
    return {"top": top_rows(w, top_k), "argmax": w.argmax(-1).tolist()}


def head_view(w: Tensor, *, layer: int, head: int, top_k: int) -> dict[str, Any]:
    """One head's weights ``(Lq, Lk)`` as the page draws them (see the API contract)."""
    return {
        "layer": layer,
        "head": head,
        "n_queries": w.shape[0],
        "n_keys": w.shape[1],
        "top_k": max(1, min(int(top_k), w.shape[1])),
        **matrix_view(w, top_k),
    }


def divergence(a: list[Tensor], b: list[Tensor]) -> list[list[float]]:
    """Per layer, per head: the mean over query rows of the Jensen-Shannon divergence
    (natural log, so at most ln 2) between ``a``'s and ``b``'s rows; rows that sum to
    0 in either (fully masked) are left out.

    Example:
        >>> p = [torch.tensor([[[1.0, 0.0]]])]
        >>> divergence(p, p), divergence(p, [torch.tensor([[[0.0, 1.0]]])])  # ln 2
        ([[0.0]], [[0.693147]])
    """
    out = []
    for x, y in zip(a, b, strict=True):  # (H, Lq, Lk) each
        x, y = x.double(), y.double()
        js = jsd(x, y)  # (H, Lq)
        live = (x.sum(-1) > 0) & (y.sum(-1) > 0)  # (H, Lq)
        mean = (js * live).sum(-1) / live.sum(-1).clamp_min(1)
        out.append(rounded(mean))
    return out
