"""Learned relative position biases: T5's buckets and a clipped-offset table.

Both look up a learned value per (offset ``k - p``, head): :func:`relative_buckets` through
:func:`t5_bucket`'s logarithmic buckets (Raffel et al., 2020), :func:`learned_relative` through
offsets clipped to ``[-max_distance, max_distance]``.
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor, nn

from attnlab._grid import Grid
from attnlab._validate import positive_int
from attnlab.bias.base import Bias, _check_bool, _check_heads

__all__ = [
    "LearnedRelative",
    "RelativeBuckets",
    "learned_relative",
    "relative_buckets",
    "t5_bucket",
]


# --------------------------------------------------------------------------- validation


def _check_bucket_args(num_buckets: object, max_distance: object, bidirectional: object) -> None:
    """Validate the arguments of the T5 bucket function (see :func:`t5_bucket`)."""
    bidirectional = _check_bool("bidirectional", bidirectional)
    if isinstance(num_buckets, bool) or not isinstance(num_buckets, numbers.Integral):
        raise TypeError(
            f"num_buckets must be an int >= 2, got {num_buckets!r} ({type(num_buckets).__name__})"
        )
    if bidirectional and (num_buckets < 4 or num_buckets % 2):
        raise ValueError(
            f"num_buckets must be an even int >= 4 when bidirectional=True (half the buckets "
            f"per direction), got {num_buckets}"
        )
    if num_buckets < 2:
        raise ValueError(f"num_buckets must be an int >= 2, got {num_buckets}")
    max_distance = positive_int("max_distance", max_distance)
    max_exact = _max_exact(int(num_buckets), bidirectional)
    if max_distance <= max_exact:
        raise ValueError(
            f"max_distance must be greater than the {max_exact} exactly-bucketed offsets "
            f"(num_buckets={num_buckets}, bidirectional={bidirectional}), got {max_distance}"
        )


def _max_exact(num_buckets: int, bidirectional: bool) -> int:
    """The number of offsets per direction that get a bucket of their own."""
    per_direction = num_buckets // 2 if bidirectional else num_buckets
    return per_direction // 2


# --------------------------------------------------------------------------- T5 buckets


def t5_bucket(
    relative_position: Tensor, *, bidirectional: bool, num_buckets: int, max_distance: int
) -> Tensor:
    """T5's relative-position bucket (Raffel et al., 2020) of ``key - query_position``.

    With bidirectional buckets, half go to keys after the query (positive offsets) and half
    to the rest. Within a direction, the first ``max_exact = buckets_per_direction // 2``
    distances get a bucket each; larger distances share buckets spaced logarithmically up to
    ``max_distance``, beyond which all fall in the last bucket. Unidirectional buckets only
    tell apart keys at or before the query (later keys share bucket 0). The arithmetic is
    done in float32 as in the reference implementations.

    Args:
        relative_position: integer tensor of ``key - query_position``, any shape.
        bidirectional: whether keys after the query get buckets of their own.
        num_buckets: total buckets (an even number >= 4 if bidirectional, else >= 2).
        max_distance: the distance from which all offsets share the last bucket.

    Returns:
        The int64 bucket of each offset, same shape, in ``[0, num_buckets)``.

    Example:
        >>> rel = torch.tensor([-200, -9, -1, 0, 1, 9, 200])
        >>> t5_bucket(rel, bidirectional=True, num_buckets=32, max_distance=128)
        tensor([15,  8,  1,  0, 17, 24, 31])
    """
    _check_bucket_args(num_buckets, max_distance, bidirectional)
    if not isinstance(relative_position, Tensor):
        raise TypeError(
            f"relative_position must be an integer tensor, got {type(relative_position).__name__}"
        )
    if (
        relative_position.is_floating_point()
        or relative_position.is_complex()
        or (relative_position.dtype == torch.bool)
    ):
        raise TypeError(
            f"relative_position must be an integer tensor, got dtype {relative_position.dtype}"
        )
    # past max_distance every offset shares the last bucket: clamp (-2**63's abs overflowed)
    rel = relative_position.long().clamp(-max_distance, max_distance)
    per_direction = num_buckets // 2 if bidirectional else num_buckets
    if bidirectional:
        offset = (rel > 0).long() * per_direction  # keys after the query: upper half
        distance = rel.abs()
    else:
        offset = torch.zeros_like(rel)
        distance = (-rel).clamp(min=0)  # later keys collapse onto distance 0
    max_exact = per_direction // 2
    # Log-spaced buckets for max_exact <= distance; clamp first so log() never sees 0.
    ratio = distance.clamp(min=max_exact).float() / max_exact
    scaled = torch.log(ratio) / math.log(max_distance / max_exact) * (per_direction - max_exact)
    large = (max_exact + scaled.long()).clamp(max=per_direction - 1)
    return offset + torch.where(distance < max_exact, distance, large)


class _HeadTable(Bias):
    """A bias read from a learned ``table`` of one column per head, drawn
    ``N(0, 0.02**2)`` when built and by ``reset_parameters`` (a meta-device build)."""

    table: nn.Parameter  # (rows, H)

    def reset_parameters(self) -> None:
        """Draw the table again, ``N(0, 0.02**2)`` as when built."""
        nn.init.normal_(self.table, std=0.02)

    @property
    def per_head(self) -> bool:
        return True

    def magnitude_bound(self, lq: int, lk: int) -> float | None:
        """The table's largest ``|value|``: every score reads one of its cells."""
        t = self.table.detach()
        return float(t.abs().max()) if t.numel() else 0.0

    def _lookup(self, index: Tensor, heads: Tensor) -> Tensor:
        """``table[index, heads]`` ``(1, Hg, Tq, Tk)``; a half-precision table is read
        through a float32 copy, so its gradient sums the many cells of each entry in
        float32 and rounds once (256 x 256 scores, entries of size 6: 2.1 off summed in
        bfloat16, 0.05 now)."""
        table = self.table
        if table.dtype in (torch.float16, torch.bfloat16):
            return table.float()[index, heads].to(table.dtype)
        return table[index, heads]


class RelativeBuckets(_HeadTable):
    """T5 relative position bias: a learned value per (bucket of ``k - p``, head).

    ``bias[h, p, k] = table[t5_bucket(k - p), h]`` with ``table`` an ``nn.Parameter`` of shape
    ``(num_buckets, num_heads)``. Build with :func:`relative_buckets`.

    Example:
        >>> relative_buckets(4).table.shape
        torch.Size([32, 4])
    """

    _factory = "relative_buckets"

    def __init__(
        self,
        num_heads: int,
        num_buckets: int = 32,
        max_distance: int = 128,
        bidirectional: bool = True,
    ) -> None:
        super().__init__()
        self.num_heads = positive_int("num_heads", num_heads)
        _check_bucket_args(num_buckets, max_distance, bidirectional)
        self.num_buckets = int(num_buckets)
        self.max_distance = int(max_distance)
        self.bidirectional = bidirectional
        self.table = nn.Parameter(torch.empty(self.num_buckets, self.num_heads))  # (NB, H)
        self.reset_parameters()

    def check(self, *, batch: int, heads: int, lq: int, lk: int) -> None:
        _check_heads(self, self.num_heads, heads)

    def forward(self, grid: Grid) -> Tensor:
        device = self.table.device
        rel = (grid.k - grid.q).to(device)  # (1, 1, Tq, Tk)
        bucket = t5_bucket(
            rel,
            bidirectional=self.bidirectional,
            num_buckets=self.num_buckets,
            max_distance=self.max_distance,
        )
        return self._lookup(bucket, grid.h.to(device))  # (1, Hg, Tq, Tk)

    def extra_repr(self) -> str:
        return (
            f"num_heads={self.num_heads}, num_buckets={self.num_buckets}, "
            f"max_distance={self.max_distance}, bidirectional={self.bidirectional}"
        )


def relative_buckets(
    num_heads: int,
    num_buckets: int = 32,
    max_distance: int = 128,
    bidirectional: bool = True,
) -> RelativeBuckets:
    """T5's bucketed relative position bias (Raffel et al., 2020).

    The buckets are those of :func:`t5_bucket` applied to ``key - query_position``. Pass the
    result as ``bias=`` to :func:`attnlab.attention`. Also found as
    :func:`attnlab.positional.relative_buckets`.

    Args:
        num_heads: number of query heads.
        num_buckets: number of buckets (both directions together if ``bidirectional``).
        max_distance: offsets at least this far apart share the last bucket.
        bidirectional: ``True`` for encoders, ``False`` for causal decoders.

    Returns:
        A :class:`RelativeBuckets` bias with a learned ``(num_buckets, H)`` table that starts
        as N(0, 0.02²).

    Example:
        >>> b = relative_buckets(2, num_buckets=8, max_distance=16)
        >>> b.table.shape
        torch.Size([8, 2])
        >>> b.dense(3, 3, heads=2).shape
        torch.Size([1, 2, 3, 3])
    """
    return RelativeBuckets(num_heads, num_buckets, max_distance, bidirectional)


# --------------------------------------------------------------------------- learned relative


class LearnedRelative(_HeadTable):
    """A learned value per (clipped offset ``k - p``, head).

    ``bias[h, p, k] = table[clamp(k - p, -D, D) + D, h]`` with ``table`` an ``nn.Parameter`` of
    shape ``(2D + 1, num_heads)`` and ``D = max_distance``. Build with
    :func:`learned_relative`.

    Example:
        >>> learned_relative(4, 16).table.shape
        torch.Size([33, 4])
    """

    _factory = "learned_relative"

    def __init__(self, num_heads: int, max_distance: int) -> None:
        super().__init__()
        self.num_heads = positive_int("num_heads", num_heads)
        self.max_distance = positive_int("max_distance", max_distance)
        rows = 2 * self.max_distance + 1
        self.table = nn.Parameter(torch.empty(rows, self.num_heads))  # (2D + 1, H)
        self.reset_parameters()

    def check(self, *, batch: int, heads: int, lq: int, lk: int) -> None:
        _check_heads(self, self.num_heads, heads)

    def forward(self, grid: Grid) -> Tensor:
        device = self.table.device
        d = self.max_distance
        index = (grid.k - grid.q).to(device).clamp(-d, d) + d  # (1, 1, Tq, Tk)
        return self._lookup(index, grid.h.to(device))  # (1, Hg, Tq, Tk)

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, max_distance={self.max_distance}"


def learned_relative(num_heads: int, max_distance: int) -> LearnedRelative:
    """A learned relative position bias with offsets clipped to ``[-max_distance, max_distance]``.

    Example:
        >>> b = learned_relative(2, max_distance=3)
        >>> b.dense(4, 4, heads=2).shape
        torch.Size([1, 2, 4, 4])
    """
    return LearnedRelative(num_heads, max_distance)
