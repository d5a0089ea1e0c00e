"""Broadcast keys and values for the blocked engine: a shared K/V is computed once.

A batch of 1 in ``k`` and ``v`` broadcasts (the request holds a stride-0 view of
``(B, Hkv, Lk, E)``), and so do heads a caller expanded. The blocked engine's kernel reads
contiguous tensors: making such a view contiguous copied K and V ``B`` times (q ``(32, 8,
128, 64)``, k and v ``(1, 8, 4096, 64)``, ``window(256)``: +541 MiB and 593 ms, not 20 MiB
and 81 ms as SDPA). Here a broadcast batch folds into the query heads as a grouped-query
request: ``q (B, Hq, Lq, E)`` becomes ``(1, Hq * B, Lq, E)``, query head ``hq * B + b``,
whose key/value head under the grouping ``(Hq / Hkv) * B`` is ``hq // (Hq / Hkv)``, the
right one. The mask and bias must then be the same for every batch item and head (a
per-head one would see head ``hq * B + b``), and no sinks or weights are asked for. Heads
expanded with stride 0 are read once (``Hkv = 1``) whatever the mask.

The folded K and V get one gradient for all the indices they stand for, their sum: it
lands on index 0 (zeros elsewhere), right only where the gradient then goes through an
expand's backward, which sums it. A caller that asks for the gradient of the broadcast
tensor itself (a stride-0 leaf, ``autograd.grad`` of an expanded ``k``, ``retain_grad``,
a hook) would see the whole sum at index 0, and nothing here can tell that caller from
one whose expand sums it. So where autograd wants K's or V's gradient, only the batch
broadcast that attnlab made itself folds (:func:`attnlab._validate.batch_broadcast_here`);
a caller's stride-0 view is made contiguous, whose gradient is per index.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import Tensor

from attnlab._validate import batch_broadcast_here
from attnlab.engines.base import AttentionRequest

__all__ = ["fold", "unfold"]


class _First(torch.autograd.Function):
    """``t`` narrowed to its first index along each of ``dims`` (where ``t`` is a stride-0
    view there, every index holds the same values), contiguous; the gradient lands on that
    index, zeros elsewhere (the expand's backward sums it to the tensor the caller
    broadcast)."""

    @staticmethod
    def forward(ctx: Any, t: Tensor, dims: tuple[int, ...]) -> Tensor:
        ctx.shape = t.shape
        for d in dims:
            t = t.narrow(d, 0, 1)
        return t.contiguous()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        full = grad.new_zeros(ctx.shape)
        full[tuple(slice(0, n) for n in grad.shape)] = grad
        return full, None


def _shared(t: Tensor, dim: int) -> bool:
    """Whether ``t`` repeats one slice along ``dim`` (stride 0, more than one index)."""
    return t.shape[dim] > 1 and t.stride(dim) == 0


def _first(t: Tensor, dims: tuple[int, ...]) -> Tensor:
    """``t``'s first slice along each of ``dims`` (size 1 there), through :class:`_First`."""
    out: Tensor = _First.apply(t, dims)
    return out


def _batch_free(req: AttentionRequest) -> bool:
    """Whether ``req``'s mask and bias are the same for every batch item and head, and it
    asks for neither sinks nor weights: folding its batch into the heads keeps it."""
    mask, bias = req.mask, req.bias
    if mask is not None and (mask.per_batch or mask.per_head):
        return False
    if bias is not None and (bias.per_batch or bias.per_head):
        return False
    return req.sinks is None and not req.return_weights


def _foldable(t: Tensor, dim: int) -> bool:
    """Whether ``t`` repeats one slice along ``dim`` and the gradient :class:`_First` gives
    it there is right: none wanted, or ``t`` is attnlab's own batch broadcast."""
    if not _shared(t, dim):
        return False
    if not (t.requires_grad and torch.is_grad_enabled()):
        return True
    return dim == 0 and batch_broadcast_here(t)


def fold(req: AttentionRequest) -> AttentionRequest:
    """``req`` with broadcast keys and values read once: heads expanded with stride 0 as
    one key/value head, and a broadcast batch folded into the query heads where
    :func:`_batch_free`; ``req`` itself where neither applies or the gradients would not
    be right (see the module's note)."""
    dims: tuple[int, ...] = ()
    if _foldable(req.k, 0) and _foldable(req.v, 0) and _batch_free(req):
        dims = (0,)
    if _foldable(req.k, 1) and _foldable(req.v, 1):
        dims += (1,)
    if not dims:
        return req
    k, v, q = _first(req.k, dims), _first(req.v, dims), req.q
    if 0 in dims:
        q = q.transpose(0, 1).reshape(1, req.heads * req.batch, req.lq, q.shape[-1])
    return dataclasses.replace(req, q=q, k=k, v=v)


def unfold(t: Tensor, req: AttentionRequest) -> Tensor:
    """``t``, an output ``(1, Hq * B, Lq, ...)`` of :func:`fold`'s request, as ``req``'s
    ``(B, Hq, Lq, ...)``; as it is where the batch was not folded."""
    if t.shape[0] == req.batch:
        return t
    return t.reshape(req.heads, req.batch, *t.shape[2:]).transpose(0, 1)
