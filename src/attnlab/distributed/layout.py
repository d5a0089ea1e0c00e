"""How a sequence is cut across ranks: contiguous and zigzag layouts, shard and unshard.

A sequence of length ``N`` over ``P`` ranks is cut into chunks with
:func:`torch.tensor_split` sizes (the first ``N % parts`` chunks one longer), so lengths
need not divide. In the ``"contiguous"`` layout rank ``r`` holds chunk ``r`` of ``P``; in
the ``"zigzag"`` layout it holds chunks ``r`` and ``2P - 1 - r`` of ``2P``, so every rank
has as much causal work as every other. A rank's shard is its chunks concatenated in
order; the same helpers shard document ids and position ids (any ``dim``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from attnlab._scalars import plain

__all__ = ["LAYOUTS", "Piece", "pieces", "positions", "shard", "shard_lengths", "unshard"]

LAYOUTS = ("contiguous", "zigzag")
Piece = tuple[int, int]  # a contiguous global range [start, stop) of positions


def validate_layout(layout: object) -> str:
    """Return ``layout`` if it is a known layout name, else raise ``ValueError``."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    return str(layout)


def _check_sizes(n: object, world: object) -> tuple[int, int]:
    """``n`` an int >= 0 and ``world`` an int >= 1 (0 ranks gave no shards, no error), as
    Python's ints (numpy's taken)."""
    sizes = []
    for name, value, low in (("n", plain(n), 0), ("world", plain(world), 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        sizes.append(value)
    return sizes[0], sizes[1]


def _chunks(n: int, parts: int) -> list[Piece]:
    """``parts`` consecutive ranges covering ``[0, n)``, sizes as :func:`torch.tensor_split`."""
    base, extra = divmod(n, parts)
    out, start = [], 0
    for i in range(parts):
        size = base + (1 if i < extra else 0)
        out.append((start, start + size))
        start += size
    return out


def pieces(n: int, rank: int, world: int, layout: str = "zigzag") -> list[Piece]:
    """The global ranges ``[start, stop)`` that ``rank`` holds, in shard order.

    Example:
        >>> pieces(8, 0, 2), pieces(8, 1, 2)
        ([(0, 2), (6, 8)], [(2, 4), (4, 6)])
        >>> pieces(7, 1, 2, "contiguous")
        [(4, 7)]
    """
    n, world = _check_sizes(n, world)
    r = plain(rank)
    if isinstance(r, bool) or not isinstance(r, int) or not 0 <= r < world:
        raise ValueError(f"rank must be an int in [0, world={world}), got {rank!r}")
    if validate_layout(layout) == "contiguous":
        return [_chunks(n, world)[r]]
    chunks = _chunks(n, 2 * world)
    return [chunks[r], chunks[2 * world - 1 - r]]


def shard_lengths(n: int, world: int, layout: str = "zigzag") -> list[int]:
    """The shard length of every rank for a sequence of length ``n``.

    Example:
        >>> shard_lengths(10, 4)
        [3, 3, 2, 2]
    """
    n, world = _check_sizes(n, world)
    return [sum(b - a for a, b in pieces(n, r, world, layout)) for r in range(world)]


def positions(n: int, rank: int, world: int, layout: str = "zigzag") -> Tensor:
    """Global position ids ``(L_r,)`` of ``rank``'s shard (e.g. for RoPE or documents).

    Example:
        >>> positions(8, 0, 2).tolist()
        [0, 1, 6, 7]
    """
    return torch.cat([torch.arange(a, b) for a, b in pieces(n, rank, world, layout)])


def shard(x: Tensor, rank: int, world: int, *, layout: str = "zigzag", dim: int = 2) -> Tensor:
    """``rank``'s shard of ``x`` along ``dim`` (default the ``L`` of ``(B, H, L, E)``).

    Use ``dim=-1`` for document ids ``(L,)`` or ``(B, L)``.

    Example:
        >>> shard(torch.arange(8), 1, 2, dim=0).tolist()
        [2, 3, 4, 5]
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a Tensor, got {type(x).__name__}")
    dim = _check_dim(dim, x.dim(), f" for x of shape {tuple(x.shape)}")
    n = x.shape[dim]
    return torch.cat([x.narrow(dim, a, b - a) for a, b in pieces(n, rank, world, layout)], dim)


def unshard(shards: Sequence[Tensor], *, layout: str = "zigzag", dim: int = 2) -> Tensor:
    """The whole sequence from every rank's shard (in rank order): inverse of :func:`shard`.

    Example:
        >>> x = torch.arange(10)
        >>> parts = [shard(x, r, 3, dim=0) for r in range(3)]
        >>> unshard(parts, dim=0).tolist() == x.tolist()
        True
    """
    dim = _check_shards(shards, dim)
    world = len(shards)
    n = sum(s.shape[dim] for s in shards)
    if [s.shape[dim] for s in shards] != shard_lengths(n, world, layout):
        raise ValueError(
            f"shards have lengths {[s.shape[dim] for s in shards]} along dim {dim}; "
            f"the {layout} layout of {n} positions over {world} ranks has "
            f"{shard_lengths(n, world, layout)}"
        )
    placed: list[tuple[int, Tensor]] = []
    for r, s in enumerate(shards):
        offset = 0
        for a, b in pieces(n, r, world, layout):
            placed.append((a, s.narrow(dim, offset, b - a)))
            offset += b - a
    return torch.cat([t for _, t in sorted(placed, key=lambda p: p[0])], dim)


def _check_shards(shards: object, dim: object) -> int:
    """``shards`` a non-empty list of tensors of one rank, each with a ``dim`` (returned as
    Python's int)."""
    if isinstance(shards, Tensor) or not isinstance(shards, Sequence) or not shards:
        raise TypeError(
            f"shards must be a non-empty list of every rank's shard (Tensors), got "
            f"{type(shards).__name__}{'' if shards else ' (empty)'}"
        )
    bad = next((i for i, t in enumerate(shards) if not isinstance(t, Tensor)), None)
    if bad is not None:
        raise TypeError(f"shards[{bad}] must be a Tensor, got {type(shards[bad]).__name__}")
    rank = shards[0].dim()
    if any(t.dim() != rank for t in shards):
        raise ValueError(f"shards must share one rank, got {[t.dim() for t in shards]} dims")
    dim = _check_dim(dim, rank, "")
    outside = {tuple(n for d, n in enumerate(t.shape) if d != dim % rank) for t in shards}
    kinds = {(t.dtype, t.device) for t in shards}
    if len(outside) > 1 or len(kinds) > 1:  # (torch.cat: "Sizes of tensors must match")
        seen = [
            (tuple(t.shape), str(t.dtype).removeprefix("torch."), str(t.device)) for t in shards
        ]
        raise ValueError(
            f"shards must match outside dim {dim} in shape, dtype and device, got {seen}"
        )
    return dim


def _check_dim(dim: object, rank: int, of: str) -> int:
    """``dim`` an int dimension of a tensor of ``rank`` dims (``of``: said after the range),
    as Python's int (numpy's taken)."""
    d = plain(dim)
    if isinstance(d, bool) or not isinstance(d, int) or not -rank <= d < rank:
        raise ValueError(f"dim must be an int in [{-rank}, {rank}){of}, got {dim!r}")
    return d
