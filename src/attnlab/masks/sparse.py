"""Sparse patterns of long-sequence models: global tokens (Longformer) and random key
blocks (BigBird)."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence

import torch
from torch import Tensor

from attnlab._grid import Grid
from attnlab.masks._args import check_nonnegative, int_tensor, nonneg_int, size
from attnlab.masks._copies import DeviceCopies
from attnlab.masks.base import Mask
from attnlab.masks.layout import Device

__all__ = ["BlockRandom", "GlobalTokens", "block_random", "global_tokens"]

TABLES = 8  # block counts whose random table a BlockRandom mask keeps


class GlobalTokens(Mask):
    """Positions in ``indices`` see every key and are seen by every query. See
    :func:`global_tokens`.

    Example:
        >>> m = global_tokens([0, 2])
        >>> m.spec()
        'global_tokens([0, 2])'
        >>> m.dense(3, 3)[0, 0].all(-1).tolist()  # which rows see every key
        [True, False, True]
        >>> global_tokens([-1])
        Traceback (most recent call last):
        ...
        ValueError: indices must be >= 0, got [-1]
    """

    def __init__(self, indices: object) -> None:
        self.idx = int_tensor("indices", indices, (1,))
        check_nonnegative("indices", self.idx)
        self._copies = DeviceCopies()  # the indices on the devices evaluated on

    def evaluate(self, grid: Grid) -> Tensor:
        idx = self._copies.on("idx", self.idx, grid.k.device)
        return torch.isin(grid.q, idx) | torch.isin(grid.k, idx)

    def spec(self) -> str:
        return f"global_tokens({self.idx.tolist()})"

    def _layout(
        self, lq: int, lk: int, bq: int, bk: int, batch: int | None, heads: int, device: Device
    ) -> Tensor:
        """Exact tile states ``(1, 1, nQ, nK)`` from the indices alone, in ``O(Lq + Lk +
        nQ nK)``: a tile is full when all its rows or all its keys are global, partial when
        some are (every pair was evaluated: ``window(256, 256) | global_tokens([0])`` took
        4.8 s at 32768 queries)."""
        idx = self.idx.to(device).unique()
        rows, keys = idx - (lk - lq), idx[idx < lk]  # query rows at global positions
        rows = rows[(rows >= 0) & (rows < lq)]
        q_any, q_all = _blocks_holding(rows, lq, bq, device)
        k_any, k_all = _blocks_holding(keys, lk, bk, device)
        full = q_all[:, None] | k_all[None, :]
        some = q_any[:, None] | k_any[None, :]
        return torch.where(full, 2, some.long())[None, None]


def _blocks_holding(at: Tensor, n: int, block: int, device: Device) -> tuple[Tensor, Tensor]:
    """For each block of ``block`` of ``n`` indices: whether it holds some of the distinct
    indices ``at``, and whether it holds only those."""
    nb = math.ceil(n / block)
    count = torch.bincount(at // block, minlength=nb)
    size = (n - torch.arange(nb, device=device) * block).clamp(max=block)
    return count > 0, count == size


class BlockRandom(Mask):
    """Each query block sees ``num_blocks`` seeded random key blocks, drawn among the
    ``ceil(Lk / block_size)`` there are: the pattern depends on ``Lk``. See
    :func:`block_random`.

    Example:
        >>> m = block_random(block_size=2, num_blocks=1, seed=0)
        >>> m.table(4).int().tolist()  # 4 keys: 2 blocks, one random key block per row
        [[1, 0], [0, 1]]
        >>> m.table(4) is m.table(4)  # kept, not drawn again
        True
    """

    def __init__(self, block_size: int, num_blocks: int, seed: int) -> None:
        self.block_size = size("block_size", block_size, positive=True)
        self.num_blocks = size("num_blocks", num_blocks)
        self.seed = nonneg_int("seed", seed)
        if self.seed >= 2**64:  # (torch's generator: "Overflow when unpacking long long")
            raise ValueError(f"seed must be an int in [0, 2**64), got {seed}")
        self._tables: dict[int, Tensor] = {}
        self._copies = DeviceCopies()  # the last table on the devices evaluated on

    def table(self, lk: int) -> Tensor:
        """Bool ``(n_blocks, n_blocks)``: query block -> its random key blocks (seeded).

        Made again on demand: the last :data:`TABLES` block counts made are kept (one
        table per key length grew without bound while decoding, 86 MiB by 4096 tokens). A
        hit changes nothing (FlexAttention's compiled mask function may not mutate)."""
        n = max(1, math.ceil(lk / self.block_size))
        tab = self._tables.get(n)
        if tab is not None:
            return tab
        gen = torch.Generator().manual_seed(self.seed)
        tab = torch.zeros(n, n, dtype=torch.bool)
        for row in range(n):
            tab[row, torch.randperm(n, generator=gen)[: self.num_blocks]] = True
        self._tables[n] = tab
        while len(self._tables) > TABLES:  # the oldest made first
            with contextlib.suppress(KeyError, StopIteration, RuntimeError):  # other threads
                del self._tables[next(iter(self._tables))]
        return tab

    def evaluate(self, grid: Grid) -> Tensor:
        tab = self._copies.on("table", self.table(grid.lk), grid.k.device)
        qb = grid.q.clamp(min=0) // self.block_size
        ok = tab[qb, grid.k // self.block_size]
        return ok & (grid.q >= 0)

    def spec(self) -> str:
        return (
            f"block_random(block_size={self.block_size}, num_blocks={self.num_blocks}, "
            f"seed={self.seed})"
        )


def global_tokens(indices: Sequence[int] | Tensor) -> Mask:
    """Global tokens: positions in ``indices`` see every key and are seen by every query.

    Combine with a local mask, e.g. ``window(64, 64) | global_tokens([0])`` (Longformer).

    Example:
        >>> global_tokens([0]).dense(3, 3)[0, 0].int().tolist()
        [[1, 1, 1], [1, 0, 0], [1, 0, 0]]
    """
    return GlobalTokens(indices)


def block_random(block_size: int, num_blocks: int, *, seed: int = 0) -> Mask:
    """BigBird's random blocks: each query block sees ``num_blocks`` random key blocks.

    Combine with ``window`` and ``global_tokens`` for the full BigBird pattern.

    .. warning::
        The choice is seeded and drawn per key length: query block ``p // block_size``
        sees ``min(num_blocks, n)`` of the ``n = ceil(Lk / block_size)`` key blocks, and
        the table of ``n`` blocks is drawn afresh for each ``n``. Unlike the other masks
        it is a function of ``Lk`` as well as of (query position, key): a pair allowed
        at one ``Lk`` may be hidden at another. Cached decoding thus differs from one
        pass over the same tokens: the step of position ``p`` draws from
        ``ceil((p + 1) / block_size)`` key blocks, the pass over ``L`` tokens from
        ``ceil(L / block_size)``. For a pattern that stays put, draw it once at the
        longest length ``L`` and slice it: ``full = m.dense(L, L)``, then
        ``masks.tensor(full[..., lk - lq : lk, :lk])`` for ``lq`` queries over ``lk``
        keys.

    Example:
        >>> m = block_random(2, 1, seed=0)
        >>> int(m.dense(4, 4).sum())   # 2 query blocks x 1 key block x (2 x 2) pairs
        8
        >>> m.dense(4, 4)[0, 0, 2].tolist(), m.dense(5, 5)[0, 0, 2].tolist()  # Lk matters
        ([False, False, True, True], [False, False, False, False, True])
    """
    return BlockRandom(block_size, num_blocks, seed)
