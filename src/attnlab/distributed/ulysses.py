"""The Ulysses strategy (DeepSpeed-Ulysses): all-to-all from sequence shards to head shards.

Each rank starts with every head of its piece of the sequence, ``(B, H, L_r, E)``. One
all-to-all per tensor gives rank ``r`` the whole sequence of its group of heads,
``(B, H/P, N, E)`` (query heads ``[r Hq/P, (r+1) Hq/P)`` and the key/value heads they
use, so GQA stays aligned); there it runs plain :func:`attnlab.attention` with the global
mask and bias (``engine="auto"``: the blocked kernel on the CPU, as the ring's steps),
then one all-to-all sends every rank its shard of the output back. A bias or mask that
depends on the head (ALiBi, learned relative buckets) is shown the global head indices
through :class:`HeadSliceBias` and :class:`HeadSliceMask`.

Backward is autograd: the gradient of an all-to-all is the inverse all-to-all, itself
recorded by autograd, so second-order gradients are exact wherever the local engine's
are (``engine="reference"``; the blocked one refuses them by name). It needs
``Hq % P == 0`` and ``Hkv % P == 0``; :func:`attnlab.distributed.attention` checks that
on every rank before any data moves.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

import attnlab
from attnlab._grid import Grid
from attnlab.bias import Bias
from attnlab.distributed.comm import post, wait_all
from attnlab.distributed.layout import shard, unshard
from attnlab.distributed.setup import Setup
from attnlab.distributed.steps import local_engine
from attnlab.masks import Mask, Wrapped

__all__ = ["HeadSliceBias", "HeadSliceMask", "heads_to_seq", "seq_to_heads", "ulysses"]

_TAG = 7919  # one message per peer per all-to-all, so one tag serves them all


def _shift(grid: Grid, start: int) -> Grid:
    return dataclasses.replace(grid, h=grid.h + start)


class HeadSliceMask(Wrapped):
    """``inner`` (a per-head mask of ``total`` heads) on heads ``[start, start + H)``.

    Example:
        >>> from attnlab import masks
        >>> m = masks.custom(lambda b, h, q, k: h == 1, per_head=True)
        >>> HeadSliceMask(m, start=1, total=2).dense(1, 1, heads=1).item()
        True
    """

    def __init__(self, inner: Mask, *, start: int, total: int) -> None:
        super().__init__(inner)
        self.start, self.total = start, total
        self.per_head = True

    def evaluate(self, grid: Grid) -> Tensor:
        return self.inner(_shift(grid, self.start))

    def check(self, *, batch: int, heads: int, lq: int, lk: int) -> None:
        self.inner.check(batch=batch, heads=self.total, lq=lq, lk=lk)

    def spec(self) -> str:
        return f"{self.inner.spec()}[heads {self.start}: of {self.total}]"


class HeadSliceBias(Bias):
    """``inner`` (a per-head bias of ``total`` heads) on heads ``[start, start + count)``;
    gradients of learnable biases flow into ``inner``'s parameters.

    Example:
        >>> from attnlab.bias import alibi
        >>> b = HeadSliceBias(alibi(4), start=2, count=2, total=4)
        >>> torch.equal(b.dense(3, 3, heads=2), alibi(4).dense(3, 3, heads=4)[:, 2:])
        True
    """

    _factory = "head-slice"

    def __init__(self, inner: Bias, *, start: int, count: int, total: int) -> None:
        super().__init__()
        self.inner, self.start, self.count, self.total = inner, start, count, total

    @property
    def per_batch(self) -> bool:
        return self.inner.per_batch

    @property
    def per_head(self) -> bool:
        return True

    def check(self, *, batch: int, heads: int, lq: int, lk: int) -> None:
        self.inner.check(batch=batch, heads=self.total, lq=lq, lk=lk)

    def linear_distance_slopes(self) -> Tensor | None:
        slopes = self.inner.linear_distance_slopes()  # (total,) or None
        return None if slopes is None else slopes[self.start : self.start + self.count]

    def forward(self, grid: Grid) -> Tensor:
        return self.inner(_shift(grid, self.start))

    def extra_repr(self) -> str:
        return f"heads {self.start}:{self.start + self.count} of {self.total}"


def _exchange(
    s: Setup, sends: list[Tensor], shapes: Sequence[tuple[int, ...]], like: Tensor
) -> list[Tensor]:
    """Send ``sends[p]`` to rank ``p`` and receive a tensor of ``shapes[p]`` from each
    (this rank's own entry is kept, not sent); returns the received tensors by rank."""
    r = s.group.rank
    got = [sends[r] if p == r else like.new_empty(shapes[p]) for p in range(s.group.world)]
    peers = [p for p in range(s.group.world) if p != r]
    outgoing = [(sends[p].contiguous(), p) for p in peers if sends[p].numel()]
    incoming = [(got[p], p) for p in peers if got[p].numel()]
    wait_all(post(s.group, outgoing, incoming, _TAG))
    return got


def seq_to_heads(s: Setup, x: Tensor) -> Tensor:
    """This rank's sequence shard ``(B, H, L_r, E)`` to its head group's whole sequence
    ``(B, H/P, N, E)`` in global order."""
    world, r = s.group.world, s.group.rank
    h = x.shape[1] // world
    lengths = [sum(b - a for a, b in s.pieces[p]) for p in range(world)]
    sends = [x[:, p * h : (p + 1) * h] for p in range(world)]
    shapes = [(x.shape[0], h, lengths[p], x.shape[3]) for p in range(world)]
    got = _exchange(s, sends, shapes, x)
    assert got[r].shape == shapes[r]
    return unshard(got, layout=s.layout)


def heads_to_seq(s: Setup, y: Tensor) -> Tensor:
    """Inverse of :func:`seq_to_heads`: ``(B, H/P, N, E)`` to ``(B, H, L_r, E)``."""
    world, r = s.group.world, s.group.rank
    sends = [shard(y, p, world, layout=s.layout) for p in range(world)]
    own = sum(b - a for a, b in s.pieces[r])
    shapes = [(y.shape[0], y.shape[1], own, y.shape[3]) for _ in range(world)]
    return torch.cat(_exchange(s, sends, shapes, y), 1)


class _SeqToHeads(torch.autograd.Function):
    """:func:`seq_to_heads`; its backward is :class:`_HeadsToSeq`, itself differentiable,
    so a second-order gradient goes through the all-to-alls (a plain
    :func:`heads_to_seq` there gave the pieces received from other ranks no history)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, s: Setup) -> Tensor:
        ctx.setup = s
        return seq_to_heads(s, x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        return _HeadsToSeq.apply(grad.contiguous(), ctx.setup), None


class _HeadsToSeq(torch.autograd.Function):
    """:func:`heads_to_seq`; its backward is :class:`_SeqToHeads`."""

    @staticmethod
    def forward(ctx: Any, y: Tensor, s: Setup) -> Tensor:
        ctx.setup = s
        return heads_to_seq(s, y)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        return _SeqToHeads.apply(grad.contiguous(), ctx.setup), None


def head_views(s: Setup) -> tuple[Mask | None, Bias | None]:
    """The global mask and bias as seen by this rank's query heads."""
    world, r, hq = s.group.world, s.group.rank, s.sizes[1]
    start = r * (hq // world)
    mask, bias = s.mask, s.bias
    if mask is not None and mask.per_head:
        mask = HeadSliceMask(mask, start=start, total=hq)
    if bias is not None and bias.per_head:
        bias = HeadSliceBias(bias, start=start, count=hq // world, total=hq)
    return mask, bias


def ulysses(s: Setup, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Exact attention of the shards ``q (B, Hq, L_r, E)``, ``k, v (B, Hkv, L_r, E)``
    by head-group all-to-all; returns this rank's output shard ``(B, Hq, L_r, Ev)``."""
    qh, kh, vh = (_SeqToHeads.apply(t, s) for t in (q, k, v))  # (B, H/P, N, E) each
    mask, bias = head_views(s)
    # on the CPU the ring's local engine: "auto" alone took torch's SDPA, 5-12x plain
    # PyTorch's float32 error in dV (see local_engine)
    engine = local_engine(s, qh, kh, vh, mask, bias) if s.cpu else s.engine
    out = attnlab.attention(qh, kh, vh, mask=mask, bias=bias, scale=s.scale, engine=engine)
    result: Tensor = _HeadsToSeq.apply(out, s)
    return result
