"""Score functions: how similar each query is to each key, before scaling and masking.

Built-in scores take ``q (B, Hq, Lq, E)`` and ``k (B, Hkv, Lk, E)`` with ``Hq % Hkv == 0``
(grouped-query attention: query head ``h`` reads key head ``h // (Hq // Hkv)``) and return
``(B, Hq, Lq, Lk)``. A custom score is any callable ``fn(q, k) -> (B, Hq, Lq, Lk)``; it
receives ``k`` already expanded to ``Hq`` heads. The parametric scores (Luong's general,
Bahdanau's additive) are such callables, built as modules in :mod:`attnlab.nn`.

Example:
    >>> import torch
    >>> q, k = torch.ones(1, 2, 3, 4), torch.ones(1, 1, 5, 4)
    >>> dot(q, k).shape
    torch.Size([1, 2, 3, 5])
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["SCORES", "ScoreFn", "cosine", "default_scale", "dot", "expand_kv"]

ScoreFn = Callable[[Tensor, Tensor], Tensor]


def expand_kv(x: Tensor, heads: int) -> Tensor:
    """Repeat key/value heads ``(B, Hkv, L, E)`` to ``(B, heads, L, E)`` (GQA order).

    Example:
        >>> expand_kv(torch.arange(2.).view(1, 2, 1, 1), 4).flatten().tolist()
        [0.0, 0.0, 1.0, 1.0]
    """
    if x.dim() != 4 or x.shape[1] == 0 or heads < x.shape[1] or heads % x.shape[1]:
        got = tuple(x.shape) if x.dim() != 4 else f"Hkv={x.shape[1]}"
        raise ValueError(  # (3 heads to 4 came back as 3; 2 to 5 as 4; 0 as empty)
            f"expand_kv: heads={heads} must be a multiple of the key/value heads "
            f"(B, Hkv, L, E), at least Hkv; got {got}"
        )
    groups = heads // x.shape[1]
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


#: below this many query rows, a group's rows are not stacked against ``k^T``: MKL's
#: few-row product (M <= 3 here) sums more accurately than its GEMM (2-3x less error at
#: E=130, AMD EPYC), and plain PyTorch, one head at a time, gets that few-row product
_FEW_ROWS = 4


def grouped_matmul(a: Tensor, b: Tensor) -> Tensor:
    """``a (B, Hq, M, K) @ b (B, Hkv, K, N)`` without copying ``b`` across query groups (a
    batch of 1 on either side broadcasts). Fewer than 4 rows against a transposed ``b``
    (scores) take one product per query head, as plain PyTorch's repeated keys do.

    A ``b`` that takes a gradient is repeated per query head (GQA), as plain PyTorch's
    keys and values are, so its gradient is summed per head and then over the group: a
    group's ``G * M`` rows in one product gave dV 2.1-4.5x plain PyTorch's float32 error
    (reference engine, 8 query heads on 1 key/value head, 64 rows) and dK 2.3-3.3x
    (linear attention's ``phi(K)^T V``). The copies of keys are ``Hq x Lk x E``, less than
    the ``Hq x Lq x Lk`` scores beside them once ``Lq`` passes ``E``.

    Example:
        >>> a, b = torch.ones(1, 4, 1, 3), torch.ones(1, 2, 5, 3).transpose(-1, -2)
        >>> grouped_matmul(a, b).shape
        torch.Size([1, 4, 1, 5])
    """
    _, hq, m, _ = a.shape
    hkv = b.shape[1]
    if hq == hkv:
        return a @ b
    if hkv == 0 or hq % hkv:  # (torch: "unflatten: Provided sizes [2, 1] don't multiply up")
        raise ValueError(
            f"query heads Hq={hq} must be a multiple of key/value heads Hkv={hkv} (GQA)"
        )
    if torch.is_grad_enabled() and b.requires_grad:  # see the docstring
        return a @ _per_query_head(b, hq)
    if m < _FEW_ROWS and b.stride(-2) == 1:  # b = k^T: one product per query head
        ag = a.unflatten(1, (hkv, hq // hkv))  # (B, Hkv, G, M, K)
        out = torch.stack([ag[:, :, g] @ b for g in range(ag.shape[2])], 2)  # (B, Hkv, G, M, N)
        return out.flatten(1, 2)  # (B, Hq, M, N)
    # query head h reads key/value head h // G: a group's rows stacked are one product with
    # b (one GEMM per key/value head; broadcasting b over a group dimension copies it)
    ag = a.reshape(a.shape[0], hkv, hq // hkv * m, a.shape[-1])  # (B, Hkv, G * M, K)
    out = ag @ b  # (B, Hkv, G * M, N), the batch broadcast
    return out.reshape(out.shape[0], hq, m, b.shape[-1])  # (B, Hq, M, N)


def _per_query_head(b: Tensor, heads: int) -> Tensor:
    """``b (B, Hkv, K, N)`` repeated to ``heads``; a transposed ``b`` (``k^T``) stays a
    transposed view, so the product takes the layout plain PyTorch's repeated keys have."""
    return expand_kv(b.mT, heads).mT if b.stride(-2) == 1 else expand_kv(b, heads)


def scores_of(q: Tensor, k: Tensor, scale: float) -> Tensor:
    """``(q k^T) * scale`` ``(B, Hq, T, Ks)`` for ``q (B, Hq, T, E)``, ``k (B, Hkv, Ks, E)``:
    each score rounded once, as plain PyTorch makes it (q scaled first rounds every element
    of q: the blocked engine's float32 gradients reached 7x plain PyTorch's error).

    Example:
        >>> q, k = torch.ones(1, 1, 2, 4), torch.ones(1, 1, 3, 4)
        >>> scores_of(q, k, 0.5).tolist()
        [[[[2.0, 2.0, 2.0], [2.0, 2.0, 2.0]]]]
    """
    s = grouped_matmul(q, k.transpose(-1, -2))
    return s if scale == 1.0 else s.mul_(scale)


def dot(q: Tensor, k: Tensor) -> Tensor:
    """Dot-product scores ``q @ k^T``: ``(B, Hq, Lq, E), (B, Hkv, Lk, E) -> (B, Hq, Lq, Lk)``.

    Example:
        >>> dot(torch.ones(1, 1, 1, 2), torch.ones(1, 1, 1, 2)).item()
        2.0
    """
    _check_qk("dot", q, k)
    return grouped_matmul(q, k.transpose(-1, -2))


def cosine(q: Tensor, k: Tensor) -> Tensor:
    """Cosine-similarity scores in ``[-1, 1]``, shape ``(B, Hq, Lq, Lk)``.

    Use ``scale`` as the inverse temperature (cosine attention defaults to ``scale=1``).

    Example:
        >>> cosine(torch.ones(1, 1, 1, 2), 3 * torch.ones(1, 1, 1, 2)).item()
        1.0
    """
    _check_qk("cosine", q, k)
    qn, kn = F.normalize(q, dim=-1, eps=1e-12), F.normalize(k, dim=-1, eps=1e-12)
    return grouped_matmul(qn, kn.transpose(-1, -2))


def _check_qk(fn: str, q: Tensor, k: Tensor) -> None:
    """A ValueError naming ``fn``, q and k unless q ``(B, Hq, Lq, E)`` and k ``(B, Hkv,
    Lk, E)`` fit: rank 4, one ``E``, ``Hq`` a multiple of ``Hkv >= 1``, batches equal or
    1 (torch said "not enough values to unpack" or failed in bmm). Shapes only: this runs
    on every reference-engine call."""
    for name, t in (("q", q), ("k", k)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(t).__name__}")
    qs, ks = q.shape, k.shape
    if len(qs) != 4 or len(ks) != 4:
        problem = "must have rank 4, q (B, Hq, Lq, E) and k (B, Hkv, Lk, E)"
    elif qs[3] != ks[3]:
        problem = "must have the same head dim E"
    elif ks[1] == 0 or qs[1] == 0 or qs[1] % ks[1]:
        problem = (
            f"heads: query heads Hq={qs[1]} must be a multiple of key/value heads "
            f"Hkv={ks[1]} >= 1 (GQA)"
        )
    elif qs[0] != ks[0] and 1 not in (qs[0], ks[0]):
        problem = "must have batch sizes that are equal or 1"
    else:
        return
    raise ValueError(f"{fn}: q and k {problem}; got q {tuple(qs)} and k {tuple(ks)}")


SCORES: dict[str, ScoreFn] = {"dot": dot, "cosine": cosine}


def default_scale(score: str | ScoreFn, head_dim: int) -> float:
    """The scale used when none is given: ``1/sqrt(E)`` for ``"dot"``, else 1.

    Example:
        >>> default_scale("dot", 64)
        0.125
    """
    return 1.0 / math.sqrt(head_dim) if score == "dot" and head_dim > 0 else 1.0
