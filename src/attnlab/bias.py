"""Additive attention biases: ``scores = q·kᵀ * scale + bias``.

A bias is a function of ``(batch, head, query position, key index)``. It is evaluated on a
:class:`~attnlab._grid.Grid`, so a tiled engine asks for one tile at a time and the full
``Lq x Lk`` tensor exists only when :meth:`Bias.dense` is called.

Query positions are aligned bottom-right (row ``i`` sits at position ``i + Lk - Lq``), which
is the frame of cached decoding: the last query is the newest token.

The public constructors are :func:`alibi`, :func:`relative_buckets`, :func:`learned_relative`,
:func:`custom` and :func:`tensor`; :func:`as_bias` turns a user argument into a bias and two
biases add up with ``+``.

Example:
    >>> b = alibi(2) + tensor(torch.zeros(3, 3))
    >>> b.dense(3, 3, heads=2).shape
    torch.Size([1, 2, 3, 3])
"""

from __future__ import annotations

import abc
import math
import numbers
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from attnlab._grid import Grid
from attnlab._validate import nonnegative_int, positive_int

__all__ = [
    "ALiBi",
    "Bias",
    "CustomBias",
    "LearnedRelative",
    "RelativeBuckets",
    "SumBias",
    "TensorBias",
    "alibi",
    "alibi_slopes",
    "as_bias",
    "custom",
    "learned_relative",
    "relative_buckets",
    "t5_bucket",
    "tensor",
]

#: What :func:`custom` accepts: ``fn(h, q_pos, k)`` returning a float tensor or a Python number.
ScoreBiasFn = Callable[[Tensor, Tensor, Tensor], Tensor | float]


# --------------------------------------------------------------------------- validation


def _check_bool(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {value!r} ({type(value).__name__})")
    return value


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


def _check_heads(bias: Bias, have: int, heads: int) -> None:
    """Raise when a per-head bias built for ``have`` heads meets a query with ``heads``."""
    if have != heads:
        raise ValueError(
            f"bias={bias!r} has {have} heads but the query has {heads} heads; "
            f"build it with num_heads={heads}"
        )


# --------------------------------------------------------------------------- base classes


class Bias(nn.Module, abc.ABC):
    """An additive attention bias, evaluated lazily on a :class:`~attnlab._grid.Grid`.

    Subclasses implement :meth:`forward` and say whether the values depend on the batch and
    head indices (:attr:`per_batch`, :attr:`per_head`); engines use those flags to skip
    evaluating identical slices.

    Example:
        >>> b = alibi(4)
        >>> b(Grid.full(2, 3, heads=4)).shape
        torch.Size([1, 4, 2, 3])
    """

    #: The name of the public constructor, used by ``repr``.
    _factory: str = "bias"

    @abc.abstractmethod
    def forward(self, grid: Grid) -> Tensor:
        """The bias values on ``grid``: a float tensor broadcastable to ``grid.shape``."""

    @property
    def per_batch(self) -> bool:
        """Whether the values depend on the batch index."""
        return False

    @property
    def per_head(self) -> bool:
        """Whether the values depend on the head index."""
        return False

    def check(self, *, batch: int, heads: int, lq: int, lk: int) -> None:
        """Raise ``ValueError`` if this bias cannot serve scores of shape ``(B, H, Lq, Lk)``.

        ``heads`` is the number of query heads. The default accepts every size.
        """

    def dense(
        self,
        lq: int,
        lk: int,
        *,
        batch: int = 1,
        heads: int = 1,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> Tensor:
        """The whole bias as a tensor of shape ``(Bb, Hb, lq, lk)``.

        ``Bb`` is ``batch`` if :attr:`per_batch` else 1 and ``Hb`` is ``heads`` if
        :attr:`per_head` else 1. The sizes are validated with :meth:`check` first. The result
        may be a broadcast (expanded) view: call ``.contiguous()`` before writing into it.

        Args:
            lq: query length.
            lk: key length.
            batch: batch size of the scores.
            heads: number of query heads of the scores.
            device: where to build it; defaults to the device of this bias's tensors (CPU if
                it has none).
            dtype: cast the result to this dtype if given.

        Example:
            >>> alibi(2).dense(2, 3, heads=2)[0, 0]
            tensor([[-0.0625, -0.0000, -0.0625],
                    [-0.1250, -0.0625, -0.0000]])
        """
        lq, lk = nonnegative_int("lq", lq), nonnegative_int("lk", lk)
        batch, heads = positive_int("batch", batch), positive_int("heads", heads)
        self.check(batch=batch, heads=heads, lq=lq, lk=lk)
        if device is None:
            device = self._own_device()
        grid = Grid.full(lq, lk, batch=batch, heads=heads, device=device)
        grid = grid.restrict(batch=self.per_batch, heads=self.per_head)
        out = torch.broadcast_to(self(grid), grid.shape)  # (Bb, Hb, lq, lk)
        return out if dtype is None else out.to(dtype)

    def _own_device(self) -> torch.device | None:
        """The device of the first parameter or buffer, or None if there is none."""
        for param in self.parameters():
            return param.device
        for buf in self.buffers():
            return buf.device
        return None

    def __add__(self, other: object) -> Bias:
        if not isinstance(other, Bias):
            return NotImplemented
        return SumBias(self, other)

    def extra_repr(self) -> str:
        return ""

    def __repr__(self) -> str:
        return f"{self._factory}({self.extra_repr()})"


class SumBias(Bias):
    """The sum of several biases; built by ``a + b``. Nested sums are flattened.

    Example:
        >>> s = alibi(2) + learned_relative(2, 4) + alibi(2)
        >>> len(s.terms), s.per_head
        (3, True)
    """

    def __init__(self, *terms: Bias) -> None:
        super().__init__()
        flat = list(_flatten(terms))
        if not flat:
            raise ValueError("SumBias needs at least one term, got none")
        self.terms = nn.ModuleList(flat)

    def _biases(self) -> list[Bias]:
        return [t for t in self.terms if isinstance(t, Bias)]

    @property
    def per_batch(self) -> bool:
        return any(t.per_batch for t in self._biases())

    @property
    def per_head(self) -> bool:
        return any(t.per_head for t in self._biases())

    def check(self, *, batch: int, heads: int, lq: int, lk: int) -> None:
        for t in self._biases():
            t.check(batch=batch, heads=heads, lq=lq, lk=lk)

    def forward(self, grid: Grid) -> Tensor:
        terms = self._biases()
        out: Tensor = terms[0](grid)
        for t in terms[1:]:
            out = out + t(grid)  # broadcasts up to (Bg, Hg, Tq, Tk)
        return out

    def __repr__(self) -> str:
        return " + ".join(repr(t) for t in self.terms)


def _flatten(terms: Iterable[Bias]) -> Iterable[Bias]:
    for t in terms:
        if not isinstance(t, Bias):
            raise TypeError(f"SumBias terms must be Bias instances, got {type(t).__name__}")
        if isinstance(t, SumBias):
            yield from t._biases()
        else:
            yield t


# --------------------------------------------------------------------------- ALiBi


def _power_of_two_slopes(n: int) -> list[float]:
    """The geometric sequence 2^(-8/n), 2^(-16/n), ..., 2^(-8) (n a power of 2)."""
    return [2.0 ** (-8.0 * (i + 1) / n) for i in range(n)]


def alibi_slopes(num_heads: int) -> Tensor:
    """The per-head ALiBi slopes of Press et al. (2022), float32 of shape ``(num_heads,)``.

    For a power of two ``n`` the slopes are the geometric sequence that starts at
    ``2^(-8/n)`` with ratio ``2^(-8/n)``. Otherwise, with ``m`` the largest power of two below
    ``n``, they are the ``m`` slopes for ``m`` heads followed by the first ``n - m`` of every
    other slope (indices 0, 2, 4, ...) for ``2m`` heads.

    Example:
        >>> alibi_slopes(4)
        tensor([0.2500, 0.0625, 0.0156, 0.0039])
    """
    n = positive_int("num_heads", num_heads)
    m = 1 << (n.bit_length() - 1)  # the largest power of two <= n
    slopes = _power_of_two_slopes(m)
    if m != n:
        slopes += _power_of_two_slopes(2 * m)[0::2][: n - m]
    return torch.tensor(slopes, dtype=torch.float32)


class ALiBi(Bias):
    """Attention with Linear Biases: ``bias[h, p, k] = -m_h * |p - k|``.

    ``p`` is the query position, ``k`` the key index and ``m_h`` the head's slope from
    :func:`alibi_slopes`, kept as a (non-persistent) buffer, not a parameter. Build with
    :func:`alibi`.

    Example:
        >>> alibi(8).slopes[:3]
        tensor([0.5000, 0.2500, 0.1250])
    """

    _factory = "alibi"
    slopes: Tensor

    def __init__(self, num_heads: int) -> None:
        super().__init__()
        self.num_heads = positive_int("num_heads", num_heads)
        self.register_buffer("slopes", alibi_slopes(self.num_heads), persistent=False)  # (H,)

    @property
    def per_head(self) -> bool:
        return True

    def check(self, *, batch: int, heads: int, lq: int, lk: int) -> None:
        _check_heads(self, self.num_heads, heads)

    def forward(self, grid: Grid) -> Tensor:
        dtype = torch.promote_types(self.slopes.dtype, torch.float32)
        device = self.slopes.device
        slope = self.slopes[grid.h.to(device)].to(dtype)  # (1, Hg, 1, 1)
        distance = (grid.q - grid.k).abs().to(device=device, dtype=dtype)  # (1, 1, Tq, Tk)
        return -slope * distance  # (1, Hg, Tq, Tk)

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}"


def alibi(num_heads: int) -> ALiBi:
    """An ALiBi bias for ``num_heads`` query heads (Press et al., 2022).

    Example:
        >>> alibi(1).dense(1, 3)
        tensor([[[[-0.0078, -0.0039, -0.0000]]]])
    """
    return ALiBi(num_heads)


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
    rel = relative_position.long()
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


class RelativeBuckets(Bias):
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
        nn.init.normal_(self.table, std=0.02)

    @property
    def per_head(self) -> bool:
        return True

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
        return self.table[bucket, grid.h.to(device)]  # (1, Hg, Tq, Tk)

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
    """A T5-style bucketed relative position bias (Raffel et al., 2020).

    The buckets are those of :func:`t5_bucket` applied to ``key - query_position``; encoders
    use ``bidirectional=True``, decoders ``False``. The table starts as N(0, 0.02²).

    Example:
        >>> b = relative_buckets(2, num_buckets=8, max_distance=16)
        >>> b.dense(3, 3, heads=2).shape
        torch.Size([1, 2, 3, 3])
    """
    return RelativeBuckets(num_heads, num_buckets, max_distance, bidirectional)


# --------------------------------------------------------------------------- learned relative


class LearnedRelative(Bias):
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
        nn.init.normal_(self.table, std=0.02)

    @property
    def per_head(self) -> bool:
        return True

    def check(self, *, batch: int, heads: int, lq: int, lk: int) -> None:
        _check_heads(self, self.num_heads, heads)

    def forward(self, grid: Grid) -> Tensor:
        device = self.table.device
        d = self.max_distance
        index = (grid.k - grid.q).to(device).clamp(-d, d) + d  # (1, 1, Tq, Tk)
        return self.table[index, grid.h.to(device)]  # (1, Hg, Tq, Tk)

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


# --------------------------------------------------------------------------- custom


def _fn_name(fn: object) -> str:
    return str(getattr(fn, "__qualname__", None) or type(fn).__name__)


class CustomBias(Bias):
    """A bias given by a function ``fn(h, q_pos, k)`` of broadcastable integer tensors.

    ``h`` has shape ``(1, Hg, 1, 1)``, ``q_pos`` ``(1, 1, Tq, 1)`` (bottom-right aligned query
    positions) and ``k`` ``(1, 1, 1, Tk)``. Like FlexAttention's ``score_mod`` but the result is
    added to the scores rather than replacing them. ``fn`` may return a float tensor
    broadcastable to ``(1, Hg, Tq, Tk)`` or a Python number; integer results are converted to
    the default float dtype. If ``fn`` is an ``nn.Module`` its parameters are registered. Build
    with :func:`custom`.

    Example:
        >>> b = custom(lambda h, q, k: -0.5 * (q - k).abs(), per_head=False)
        >>> b.dense(1, 3)
        tensor([[[[-1.0000, -0.5000, -0.0000]]]])
    """

    _factory = "custom"

    def __init__(self, fn: ScoreBiasFn, *, per_head: bool = True) -> None:
        super().__init__()
        if not callable(fn):
            raise TypeError(
                f"fn must be callable as fn(h, q_pos, k) -> Tensor, got {type(fn).__name__}"
            )
        self._per_head = _check_bool("per_head", per_head)
        self.fn = fn

    @property
    def per_head(self) -> bool:
        return self._per_head

    def forward(self, grid: Grid) -> Tensor:
        raw: Any = self.fn(grid.h, grid.q, grid.k)
        out = torch.as_tensor(raw, device=grid.q.device)
        if out.dtype == torch.bool:
            raise TypeError(
                f"bias={self!r}: fn returned a boolean tensor; a bias must be a float tensor "
                f"(pass boolean masks as mask=)"
            )
        if out.is_complex():
            raise TypeError(f"bias={self!r}: fn returned dtype {out.dtype}, expected a float dtype")
        if not out.is_floating_point():
            out = out.to(torch.get_default_dtype())
        try:
            shape = torch.broadcast_shapes(out.shape, grid.shape)
        except RuntimeError:
            shape = None
        if shape != torch.Size(grid.shape):
            raise ValueError(
                f"bias={self!r}: fn returned shape {tuple(out.shape)}, expected a shape "
                f"broadcastable to {grid.shape} (batch, heads, queries, keys)"
            )
        return out

    def extra_repr(self) -> str:
        return f"fn={_fn_name(self.fn)}, per_head={self._per_head}"


def custom(fn: ScoreBiasFn, *, per_head: bool = True) -> CustomBias:
    """A bias computed by ``fn(h, q_pos, k)`` on broadcastable integer index tensors.

    Args:
        fn: the bias function; see :class:`CustomBias`.
        per_head: whether the values depend on ``h``. With ``False`` the function is
            evaluated for head 0 only and the result is shared by all heads.

    Example:
        >>> b = custom(lambda h, q, k: (h + 1) * (k - q))
        >>> b.dense(2, 2, heads=2)[:, :, 0].tolist()
        [[[0.0, 1.0], [0.0, 2.0]]]
    """
    return CustomBias(fn, per_head=per_head)


# --------------------------------------------------------------------------- dense tensors

_DIM_NAMES = ("batch", "heads", "lq", "lk")


class TensorBias(Bias):
    """A bias given as a dense float tensor broadcastable to ``(B, H, Lq, Lk)``.

    Rank 2 is ``(Lq, Lk)``, rank 3 ``(H, Lq, Lk)`` and rank 4 ``(B, H, Lq, Lk)``; any size-1
    dimension is broadcast. Evaluating on a grid gathers just the grid's block, and gradients
    flow back to the tensor if it requires grad. An ``nn.Parameter`` is registered as a
    parameter, any other tensor as a non-persistent buffer. Build with :func:`tensor`.

    Example:
        >>> b = tensor(torch.arange(6.0).view(2, 3))
        >>> b(Grid.tile(torch.tensor([1]), torch.tensor([0, 2]), lq=2, lk=3))
        tensor([[[[3., 5.]]]])
    """

    _factory = "tensor"
    values: Tensor

    def __init__(self, t: Tensor) -> None:
        super().__init__()
        if not isinstance(t, Tensor):
            raise TypeError(f"t must be a float tensor, got {type(t).__name__}")
        if t.dtype == torch.bool:
            raise TypeError(
                "t is a boolean tensor; boolean tensors are masks (pass them as mask=), "
                "a bias must be a float tensor"
            )
        if not t.is_floating_point():
            raise TypeError(f"t must be a float tensor, got dtype {t.dtype}; convert it first")
        if t.dim() not in (2, 3, 4):
            raise ValueError(
                f"t must have rank 2 (Lq, Lk), 3 (H, Lq, Lk) or 4 (B, H, Lq, Lk), "
                f"got rank {t.dim()} with shape {tuple(t.shape)}"
            )
        if isinstance(t, nn.Parameter):
            self.values = t
        else:
            self.register_buffer("values", t, persistent=False)

    def _as4d(self) -> Tensor:
        t = self.values
        return t.view((1,) * (4 - t.dim()) + tuple(t.shape))  # (Bt, Ht, Lqt, Lkt)

    @property
    def full_shape(self) -> tuple[int, int, int, int]:
        """The tensor's shape padded on the left with 1s to rank 4."""
        b, h, q, k = self._as4d().shape
        return (b, h, q, k)

    @property
    def per_batch(self) -> bool:
        return self.full_shape[0] > 1

    @property
    def per_head(self) -> bool:
        return self.full_shape[1] > 1

    def check(self, *, batch: int, heads: int, lq: int, lk: int) -> None:
        want = (batch, heads, lq, lk)
        for name, have, size in zip(_DIM_NAMES, self.full_shape, want, strict=True):
            if have not in (1, size):
                raise ValueError(
                    f"bias={self!r} does not fit scores of shape (batch={batch}, heads={heads}, "
                    f"lq={lq}, lk={lk}): its {name} size is {have}, expected 1 or {size}"
                )

    def forward(self, grid: Grid) -> Tensor:
        t = self._as4d()
        index = (grid.b, grid.h, grid.rows, grid.k)
        for dim, idx in enumerate(index):
            if t.shape[dim] != 1:  # size-1 dims broadcast; others gather the grid's slice
                t = t.index_select(dim, idx.flatten().to(t.device))
        return t  # (Bg or 1, Hg or 1, Tq or 1, Tk or 1)

    def extra_repr(self) -> str:
        return f"shape={tuple(self.values.shape)}"


def tensor(t: Tensor) -> TensorBias:
    """A dense bias from a float tensor shaped ``(Lq, Lk)``, ``(H, Lq, Lk)`` or ``(B, H, Lq, Lk)``.

    Example:
        >>> tensor(torch.zeros(8, 4, 4)).per_head
        True
    """
    return TensorBias(t)


def as_bias(x: Bias | Tensor | None) -> Bias | None:
    """Turn a user's ``bias=`` argument into a :class:`Bias` (or ``None``).

    A float tensor becomes :func:`tensor` of it; a :class:`Bias` or ``None`` passes through.

    Raises:
        TypeError: for a boolean tensor (that is a mask) or any other type.

    Example:
        >>> as_bias(torch.zeros(2, 2))
        tensor(shape=(2, 2))
    """
    if x is None or isinstance(x, Bias):
        return x
    if isinstance(x, Tensor):
        if x.dtype == torch.bool:
            raise TypeError(
                "bias= got a boolean tensor; boolean tensors are masks: pass them as mask= "
                "(a bias must be a float tensor or a Bias)"
            )
        if not x.is_floating_point():
            raise TypeError(
                f"bias= got a tensor of dtype {x.dtype}; expected a float tensor, a Bias or None"
            )
        return tensor(x)
    raise TypeError(
        f"bias= got {type(x).__name__}; expected a Bias (e.g. alibi(num_heads)), "
        f"a float tensor or None"
    )
