"""The mask protocol: what every mask is, and what engines may ask of it.

A mask says which (query, key) pairs may attend: a function of ``(batch, head, query
position, key index)`` (``block_random``'s of ``Lk`` too) on a :class:`~attnlab.masks.Grid`.
Engines never check a mask's class; they ask it through the public members of :class:`Mask`:

=====================  ==================================================================
``mask(grid)``         the bool values on a grid of coordinates
``dense(lq, lk)``      the dense bool form ``(Bm, Hm, Lq, Lk)``
``block_layout(...)``  which tiles are empty, partial or full
``row_bounds(lq, lk)`` the key interval of each query row, when the mask has one
``conjuncts``          the parts whose ``&`` is the mask (``(self,)`` for one part)
``is_causal``          whether the mask is exactly ``causal()``
``lengths()``          the key and query lengths of a padding mask, else None
``elementwise``        whether any grid of coordinates may be evaluated at once
``per_batch``,         whether the mask varies with the batch item / head, and the batch
``per_head``,          size it is tied to
``batch_size``
=====================  ==================================================================

A new mask kind is one subclass in one file: :meth:`Mask.evaluate`, :meth:`Mask.spec`,
and whichever members above describe its structure (an exact ``row_bounds`` lets the
blocked engine mask by intervals, without evaluating tiles)."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from attnlab._grid import Grid
from attnlab._validate import nonnegative_int, positive_int
from attnlab.masks.layout import (
    BlockLayout,
    Device,
    RowBounds,
    layout_within,
    meet_bounds,
    part_states,
    union_bounds,
)

__all__ = ["And", "Mask", "Not", "Or", "Wrapped"]


_NOT_A_TENSOR = (
    "an attnlab mask is not a tensor; mask.dense(Lq, Lk) gives its bool tensor (code that "
    "reads an attention mask as a tensor, like a transformers model that uses its mask "
    "outside the attention function, needs one)"
)
# what code that takes a mask for a tensor reads first
_TENSOR_ATTRIBUTES = frozenset(
    ("dtype", "shape", "size", "dim", "ndim", "device", "to", "float", "bool", "masked_fill")
)


class Mask:
    """Base class of all masks. Subclasses implement :meth:`evaluate` and :meth:`spec`.

    They may also implement :meth:`row_bounds` (exact intervals give fast exact block
    layouts and interval masking in the blocked engine), :meth:`check` (size validation),
    :meth:`lengths`, and set :attr:`is_causal`, :attr:`elementwise`, :attr:`per_head`.

    Example:
        >>> from attnlab import masks
        >>> far = masks.causal() & ~masks.window(1)  # keys at least two positions back
        >>> far.spec()
        '(causal() & ~window(left=1, right=0))'
        >>> far.dense(4, 4)[0, 0].int().tolist()
        [[0, 0, 0, 0], [0, 0, 0, 0], [1, 0, 0, 0], [1, 1, 0, 0]]
        >>> (far | masks.window(0)).dense(4, 4)[0, 0].int().tolist()  # and each query itself
        [[1, 0, 0, 0], [0, 1, 0, 0], [1, 0, 1, 0], [1, 1, 0, 1]]
    """

    per_head: bool = False
    #: Whether the mask is exactly ``causal()`` (engines with a causal fast path ask).
    is_causal: bool = False
    #: Whether the mask may be evaluated on any grid of coordinates at once (all library
    #: masks); False for user functions, which are documented to receive tile-shaped
    #: grids, so an engine evaluates them one tile at a time.
    elementwise: bool = True

    @property
    def per_batch(self) -> bool:
        """Whether the mask varies with the batch index."""
        return self.batch_size is not None

    @property
    def batch_size(self) -> int | None:
        """The batch size the mask is tied to, or ``None`` if it is batch-independent."""
        return None

    @property
    def natural_length(self) -> int | None:
        """A sequence length the mask was built for (documents, padding), if any."""
        return None

    @property
    def conjuncts(self) -> tuple[Mask, ...]:
        """The masks whose ``&`` is this mask: ``(self,)`` unless it is an ``&``."""
        return (self,)

    def lengths(self) -> tuple[Tensor, Tensor | None] | None:
        """``(key_lengths (B,), query_lengths (B,) | None)`` of a padding mask, else None.

        Example:
            >>> from attnlab import masks
            >>> masks.padding([2, 3]).lengths()
            (tensor([2, 3]), None)
        """
        return None

    # -- evaluation -------------------------------------------------------------------
    def evaluate(self, grid: Grid) -> Tensor:
        """The mask on ``grid``: a bool tensor broadcastable to ``grid.shape``."""
        raise NotImplementedError

    def spec(self) -> str:
        """A short description, e.g. ``"window(left=2, right=0)"``."""
        raise NotImplementedError

    def __call__(self, grid: Grid) -> Tensor:
        """Evaluate on ``grid``: a bool tensor broadcastable to ``grid.shape``."""
        return self.evaluate(grid)

    def check(self, *, batch: int, heads: int, lq: int, lk: int) -> None:
        """Raise ``ValueError`` if the mask cannot serve these sizes."""

    def _sizes(self, batch: int | None, heads: int) -> tuple[int, int]:
        """Batch and head extent of the dense form ``(Bm, Hm)``."""
        b = batch if batch is not None else (self.batch_size or 1)
        return (b if self.per_batch else 1), (heads if self.per_head else 1)

    def _check_sizes(
        self, batch: object, heads: object, lq: object, lk: object
    ) -> tuple[int | None, int, int, int]:
        """``(batch, heads, lq, lk)`` as ints, named if bad (as Bias.dense), and checked."""
        lq, lk = nonnegative_int("lq", lq), nonnegative_int("lk", lk)
        h = positive_int("heads", heads)
        b = None if batch is None else nonnegative_int("batch", batch)
        self.check(batch=b if b is not None else (self.batch_size or 1), heads=h, lq=lq, lk=lk)
        return b, h, lq, lk

    def dense(
        self,
        lq: int,
        lk: int,
        *,
        batch: int | None = None,
        heads: int = 1,
        device: Device = None,
    ) -> Tensor:
        """Dense bool form ``(Bm, Hm, lq, lk)``; ``Bm``/``Hm`` are 1 unless the mask varies.

        Example:
            >>> from attnlab import masks
            >>> masks.causal().dense(2, 3)[0, 0].tolist()
            [[True, True, False], [True, True, True]]
        """
        batch, heads, lq, lk = self._check_sizes(batch, heads, lq, lk)
        bm, hm = self._sizes(batch, heads)
        grid = Grid.full(lq, lk, batch=bm, heads=hm, device=device)
        return torch.broadcast_to(self.evaluate(grid), (bm, hm, lq, lk))

    # -- structure --------------------------------------------------------------------
    def row_bounds(
        self, lq: int, lk: int, batch: int = 1, device: Device = None
    ) -> RowBounds | None:
        """The key interval ``[lo, hi]`` of each query row ``(batch or 1, Lq)``, or None.

        ``RowBounds.exact`` says the mask allows exactly the interval (else it is an
        envelope). Masks that vary by head have no interval. ``batch`` is the batch size of
        the call (per-batch masks return one row of bounds per item).
        """
        return None

    def block_layout(
        self,
        lq: int,
        lk: int,
        block_q: int = 64,
        block_k: int = 64,
        *,
        batch: int | None = None,
        heads: int = 1,
        device: Device = None,
    ) -> BlockLayout:
        """Tile states ``(Bm, Hm, ceil(lq/block_q), ceil(lk/block_k))`` for these sizes.

        Example:
            >>> from attnlab import masks
            >>> masks.window(1).block_layout(4, 4, 2, 2).states[0, 0].tolist()
            [[1, 0], [1, 1]]
        """
        batch, heads, lq, lk = self._check_sizes(batch, heads, lq, lk)  # as dense
        block_q, block_k = positive_int("block_q", block_q), positive_int("block_k", block_k)
        states = self._layout(lq, lk, block_q, block_k, batch, heads, device)
        return BlockLayout(states, lq, lk, block_q, block_k)

    def _layout(
        self, lq: int, lk: int, bq: int, bk: int, batch: int | None, heads: int, device: Device
    ) -> Tensor | RowBounds:
        bm, hm = self._sizes(batch, heads)
        bounds = None if self.per_head else self.row_bounds(lq, lk, bm, device)
        return layout_within(self, bounds, (lq, lk, bq, bk, bm, hm), device)

    # -- algebra and display ----------------------------------------------------------
    def __and__(self, other: Mask | Tensor) -> Mask:
        return And([self, _operand(other)])

    def __or__(self, other: Mask | Tensor) -> Mask:
        return Or([self, _operand(other)])

    def __rand__(self, other: Tensor) -> Mask:  # ``bool_tensor & mask``
        return And([_operand(other), self])

    def __ror__(self, other: Tensor) -> Mask:
        return Or([_operand(other), self])

    def __invert__(self) -> Mask:
        return Not(self)

    # -- not a tensor: code that takes a mask for one fails with what to do ----------------
    def __add__(self, other: object) -> Mask:
        raise TypeError(f"{type(self).__name__}: {_NOT_A_TENSOR}")

    __radd__ = __add__

    def __getitem__(self, index: object) -> Mask:
        raise TypeError(f"{type(self).__name__} cannot be indexed: {_NOT_A_TENSOR}")

    if not TYPE_CHECKING:  # for the type checker, a mask's attributes stay what they are

        def __getattr__(self, name: str) -> object:
            if name in _TENSOR_ATTRIBUTES:
                raise AttributeError(f"{type(self).__name__} has no {name!r}: {_NOT_A_TENSOR}")
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def visible_fraction(
        self, lq: int, lk: int, *, batch: int | None = None, heads: int | None = None
    ) -> float:
        """Fraction of (query, key) pairs allowed, over every batch item and head the mask
        varies by (``heads`` defaults to a tensor mask's own ``H``). Example:
            >>> from attnlab import masks
            >>> masks.causal().visible_fraction(4, 4)
            0.625
        """
        from attnlab.masks._fraction import visible_fraction

        return visible_fraction(self, lq, lk, batch, heads)

    def __repr__(self) -> str:
        n = self.natural_length or 256
        if n > 2048:  # its fraction costs n x n (padding of 100,000 keys printed in 39 s)
            return self.spec()
        try:  # (visible_fraction checks the sizes)
            frac = self.visible_fraction(n, n)
        except (ValueError, IndexError):  # e.g. a non-square tensor mask: no n x n form
            return self.spec()
        return f"{self.spec()}  [{100 * frac:.1f}% visible at {n}x{n}]"


def _operand(x: Mask | Tensor) -> Mask:
    from attnlab.masks.tensor import as_mask  # tensor.py subclasses Mask: import late

    m = as_mask(x)
    if m is None:
        raise TypeError("cannot combine a mask with None")
    return m


# ---------------------------------------------------------------------------------------
# combinators


class _Combination(Mask):
    """Shared part of :class:`And` and :class:`Or`: a flat list of parts."""

    op = "?"

    def __init__(self, parts: Sequence[Mask]) -> None:
        flat: list[Mask] = []
        for p in parts:
            flat.extend(p.parts if isinstance(p, _Combination) and p.op == self.op else [p])
        sizes = {p.batch_size for p in flat if p.batch_size is not None}
        if len(sizes) > 1:
            raise ValueError(f"cannot combine masks tied to different batch sizes {sorted(sizes)}")
        self.parts: tuple[Mask, ...] = tuple(flat)
        self.per_head = any(p.per_head for p in flat)
        self.elementwise = all(p.elementwise for p in flat)

    @property
    def per_batch(self) -> bool:
        return any(p.per_batch for p in self.parts)

    @property
    def batch_size(self) -> int | None:
        return next((p.batch_size for p in self.parts if p.batch_size is not None), None)

    @property
    def natural_length(self) -> int | None:
        return max((p.natural_length or 0 for p in self.parts), default=0) or None

    def check(self, *, batch: int, heads: int, lq: int, lk: int) -> None:
        for p in self.parts:
            p.check(batch=batch, heads=heads, lq=lq, lk=lk)

    def _combine(self, a: Tensor, b: Tensor) -> Tensor:
        raise NotImplementedError

    def evaluate(self, grid: Grid) -> Tensor:
        return functools.reduce(self._combine, [p(grid) for p in self.parts])

    def _layout(
        self, lq: int, lk: int, bq: int, bk: int, batch: int | None, heads: int, device: Device
    ) -> Tensor | RowBounds:
        b = batch if batch is not None else self.batch_size
        bm, hm = self._sizes(b, heads)  # an interval, or an outer bound to evaluate inside
        bounds = None if self.per_head else self.row_bounds(lq, lk, bm, device)  # asked once
        if bounds is not None:
            return layout_within(self, bounds, (lq, lk, bq, bk, bm, hm), device)
        states = [part_states(p, lq, lk, bq, bk, b, heads, device) for p in self.parts]
        return functools.reduce(self._combine_states, states)

    def _combine_states(self, a: Tensor, b: Tensor) -> Tensor:
        raise NotImplementedError

    def spec(self) -> str:
        return "(" + f" {self.op} ".join(p.spec() for p in self.parts) + ")"


class And(_Combination):
    """``a & b & ...``: a pair may attend when every part allows it. Build with ``&``.

    Example:
        >>> from attnlab import masks
        >>> [m.spec() for m in (masks.causal() & masks.window(1)).conjuncts]
        ['causal()', 'window(left=1, right=0)']
    """

    op = "&"

    @property
    def conjuncts(self) -> tuple[Mask, ...]:
        return self.parts

    def _combine(self, a: Tensor, b: Tensor) -> Tensor:
        return a & b

    def _combine_states(self, a: Tensor, b: Tensor) -> Tensor:
        return torch.minimum(a, b)

    def row_bounds(
        self, lq: int, lk: int, batch: int = 1, device: Device = None
    ) -> RowBounds | None:
        """The intersection of the parts' row intervals: exact when every part's is, else
        an outer bound (a part without one, ``block_random``, only narrows it)."""
        return None if self.per_head else meet_bounds(self.parts, lq, lk, batch, device)


class Or(_Combination):
    """``a | b | ...``: a pair may attend when some part allows it. Build with ``|``.

    Example:
        >>> from attnlab import masks
        >>> m = masks.window(0) | masks.global_tokens([0])
        >>> type(m).__name__, m.dense(3, 3)[0, 0].int().tolist()
        ('Or', [[1, 1, 1], [1, 1, 0], [1, 0, 1]])
    """

    op = "|"

    def _combine(self, a: Tensor, b: Tensor) -> Tensor:
        return a | b

    def _combine_states(self, a: Tensor, b: Tensor) -> Tensor:
        return torch.maximum(a, b)

    def row_bounds(
        self, lq: int, lk: int, batch: int = 1, device: Device = None
    ) -> RowBounds | None:
        """The parts' exact intervals joined, where each row's join is one interval."""
        return None if self.per_head else union_bounds(self.parts, lq, lk, batch, device)


class Wrapped(Mask):
    """A mask defined from one other mask, ``inner``: it varies by batch and head as
    ``inner`` does, is elementwise when ``inner`` is, and checks sizes through it.

    Subclasses implement :meth:`evaluate` and :meth:`spec` and override what they change
    (:class:`Not`; outside this package, masks that restrict ``inner`` to a shard or to
    some heads).

    Example:
        >>> from attnlab import masks
        >>> class EvenKeys(Wrapped):
        ...     def evaluate(self, grid):
        ...         return self.inner(grid) & (grid.k % 2 == 0)
        ...     def spec(self):
        ...         return f"even_keys({self.inner.spec()})"
        >>> m = EvenKeys(masks.padding([3, 2]))
        >>> m.batch_size, m.dense(1, 3)[:, 0, 0].int().tolist()  # batch size from inner
        (2, [[1, 0, 1], [1, 0, 0]])
    """

    def __init__(self, inner: Mask) -> None:
        self.inner = inner
        self.per_head = inner.per_head
        self.elementwise = inner.elementwise

    @property
    def per_batch(self) -> bool:
        return self.inner.per_batch

    @property
    def batch_size(self) -> int | None:
        return self.inner.batch_size

    def check(self, *, batch: int, heads: int, lq: int, lk: int) -> None:
        self.inner.check(batch=batch, heads=heads, lq=lq, lk=lk)


class Not(Wrapped):
    """``~a``: a pair may attend when ``a`` forbids it. Build with ``~``.

    Example:
        >>> from attnlab import masks
        >>> m = ~masks.causal()
        >>> m.spec(), m.dense(3, 3)[0, 0].int().tolist()
        ('~causal()', [[0, 1, 1], [0, 0, 1], [0, 0, 0]])
    """

    @property
    def natural_length(self) -> int | None:
        return self.inner.natural_length

    def evaluate(self, grid: Grid) -> Tensor:
        return ~self.inner(grid)

    def _layout(
        self, lq: int, lk: int, bq: int, bk: int, batch: int | None, heads: int, device: Device
    ) -> Tensor | RowBounds:
        return 2 - part_states(self.inner, lq, lk, bq, bk, batch, heads, device)

    def spec(self) -> str:
        return f"~{self.inner.spec()}"
