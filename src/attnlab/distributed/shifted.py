"""A global mask or bias restricted to one (query range, key range) pair of a sequence.

A local step of context-parallel attention attends the queries of one contiguous global
range ``[qs, qs + lq)`` over the keys of another, ``[ks, ks + lk)``, of a sequence of
length ``N``. :class:`ShiftedMask` and :class:`ShiftedBias` present the global mask and
bias to an engine as if that pair were the whole call: they move the grid's coordinates to
global positions and forward the mask's structure (its row intervals, shifted), so the
blocked engine still skips empty tiles and runs its compiled kernel.
"""

from __future__ import annotations

import torch
from torch import Tensor

from attnlab._grid import Grid
from attnlab.bias import Bias
from attnlab.masks import Mask, RowBounds, Wrapped
from attnlab.masks.layout import Device

__all__ = ["ShiftedBias", "ShiftedMask", "global_grid"]


def global_grid(grid: Grid, n: int, qs: int, ks: int, sink: bool = False) -> Grid:
    """``grid`` of a local call moved to global positions of a length-``n`` sequence.

    With ``sink``, local key 0 is an extra key (its coordinate becomes the first real
    key's, so masks and biases can be evaluated there) and key ``j >= 1`` is global
    key ``ks + j - 1``.
    """
    k = (grid.k - 1).clamp(min=0) + ks if sink else grid.k + ks
    return Grid(b=grid.b, h=grid.h, q=grid.rows + qs, k=k, lq=n, lk=n, dtype=grid.dtype)


class ShiftedMask(Wrapped):
    """``inner`` on the queries ``[qs, qs + lq)`` and keys ``[ks, ks + lk)`` of ``n``.

    With ``sink``, the local keys are one extra key (index 0, allowed for every row)
    followed by the ``lk`` real ones; the backward pass uses it to normalize a local step
    by the global logsumexp. ``bounds`` are the inner mask's global row intervals, if
    already known.

    Example:
        >>> from attnlab import masks
        >>> m = ShiftedMask(masks.causal(), n=8, qs=4, ks=2, lq=2, lk=2)
        >>> m.dense(2, 2)[0, 0].tolist()
        [[True, True], [True, True]]
        >>> m.row_bounds(2, 2).hi.tolist()
        [[2, 3]]
    """

    def __init__(
        self,
        inner: Mask,
        *,
        n: int,
        qs: int,
        ks: int,
        lq: int,
        lk: int,
        sink: bool = False,
        bounds: RowBounds | None = None,
    ) -> None:
        super().__init__(inner)
        self.n, self.qs, self.ks, self.sink = n, qs, ks, sink
        self.is_causal = inner.is_causal and qs == ks and lq == lk and not sink
        self._global: dict[int, RowBounds | None] = {}
        if bounds is not None:
            self._global[bounds.lo.shape[0]] = bounds

    def evaluate(self, grid: Grid) -> Tensor:
        allowed = self.inner(global_grid(grid, self.n, self.qs, self.ks, self.sink))
        return allowed | (grid.k == 0) if self.sink else allowed

    def check(self, *, batch: int, heads: int, lq: int, lk: int) -> None:
        self.inner.check(batch=batch, heads=heads, lq=self.n, lk=self.n)

    def row_bounds(
        self, lq: int, lk: int, batch: int = 1, device: Device = None
    ) -> RowBounds | None:
        """The inner mask's global row intervals on these rows, in local key indices."""
        if batch not in self._global:
            self._global[batch] = self.inner.row_bounds(self.n, self.n, batch, device)
        g = self._global[batch]
        if g is None:
            return None
        rows = slice(self.qs, self.qs + lq)
        lo, hi = g.lo[:, rows] - self.ks, g.hi[:, rows] - self.ks  # (Bm, lq) local keys
        if not self.sink:
            return RowBounds(lo, hi, g.exact)
        lo, hi = lo.clamp(min=0), hi.clamp(max=lk - 2)  # the real keys are 0 .. lk - 2
        empty = lo > hi
        exact = g.exact and bool(((lo == 0) | empty).all())  # the sink joins the interval
        return RowBounds(torch.zeros_like(lo), torch.where(empty, 0, hi + 1), exact)

    def spec(self) -> str:
        return f"{self.inner.spec()}[q {self.qs}:, k {self.ks}: of {self.n}]"


class ShiftedBias(Bias):
    """``inner`` on the queries ``[qs, qs + lq)`` and keys ``[ks, ks + lk)`` of ``n``.

    Gradients of learnable biases flow into ``inner``'s parameters. With ``sink``, local
    key 0 is an extra key with bias 0 (see :class:`ShiftedMask`).

    Example:
        >>> from attnlab.bias import alibi
        >>> b = ShiftedBias(alibi(1), n=8, qs=4, ks=0, lq=2, lk=2)
        >>> import torch
        >>> whole = alibi(1).dense(8, 8)[..., 4:6, 0:2]
        >>> torch.equal(b.dense(2, 2), whole)
        True
    """

    _factory = "shifted"

    def __init__(
        self, inner: Bias, *, n: int, qs: int, ks: int, lq: int, lk: int, sink: bool = False
    ) -> None:
        super().__init__()
        self.inner, self.n, self.qs, self.ks, self.sink = inner, n, qs, ks, sink
        self.aligned = qs - ks == lk - lq and not sink  # local p - k equals global p - k

    @property
    def per_batch(self) -> bool:
        return self.inner.per_batch

    @property
    def per_head(self) -> bool:
        return self.inner.per_head

    def check(self, *, batch: int, heads: int, lq: int, lk: int) -> None:
        self.inner.check(batch=batch, heads=heads, lq=self.n, lk=self.n)

    def linear_distance_slopes(self) -> Tensor | None:
        """The inner slopes when local distances equal global ones (else None: the
        kernel's ALiBi has no offset, so the engine evaluates the bias per tile)."""
        return self.inner.linear_distance_slopes() if self.aligned else None

    def forward(self, grid: Grid) -> Tensor:
        values = self.inner(global_grid(grid, self.n, self.qs, self.ks, self.sink))
        return torch.where(grid.k == 0, 0.0, values) if self.sink else values

    def extra_repr(self) -> str:
        return f"{self.inner!r}, q {self.qs}:, k {self.ks}: of {self.n}"
