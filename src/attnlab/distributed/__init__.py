"""Context-parallel attention over ``torch.distributed``: shards in, shards out.

A sequence too long for one process is cut across the ranks of a process group
(:func:`shard`, in the ``"zigzag"`` or ``"contiguous"`` layout); :func:`attention` then
computes exact attention of every rank's queries over the whole sequence, forward and
backward, with any attnlab mask and bias evaluated at global positions. Each local step
runs on attnlab's engines (the blocked kernel on CPU) and partial results merge through
their logsumexp; ranks exchange keys and values only where the mask needs them. The
``"ulysses"`` strategy instead trades sequence shards for head shards by all-to-all and
attends whole sequences per head group; ``"auto"`` picks a strategy from :func:`plan`.

Example:
    >>> import torch
    >>> from attnlab.distributed import shard, unshard
    >>> x = torch.arange(12).view(1, 1, 12, 1)
    >>> parts = [shard(x, r, 3) for r in range(3)]
    >>> [p.flatten().tolist() for p in parts]
    [[0, 1, 10, 11], [2, 3, 8, 9], [4, 5, 6, 7]]
    >>> torch.equal(unshard(parts), x)
    True
"""

from __future__ import annotations

from attnlab.distributed.api import STRATEGIES, attention
from attnlab.distributed.comm import TRAFFIC, Traffic
from attnlab.distributed.layout import LAYOUTS, pieces, positions, shard, shard_lengths, unshard
from attnlab.distributed.plan import CallPlan, RankCost, plan, simulate
from attnlab.distributed.shifted import ShiftedBias, ShiftedMask

__all__ = [
    "LAYOUTS",
    "STRATEGIES",
    "TRAFFIC",
    "CallPlan",
    "RankCost",
    "ShiftedBias",
    "ShiftedMask",
    "Traffic",
    "attention",
    "pieces",
    "plan",
    "positions",
    "shard",
    "shard_lengths",
    "simulate",
    "unshard",
]
