"""The base class of attention biases (:class:`Bias`), their sum (:class:`SumBias`) and the
checks every bias shares. :mod:`attnlab.bias` describes the frame: grids, bottom-right
aligned query positions.
"""

from __future__ import annotations

import abc
from collections.abc import Iterable

import torch
from torch import Tensor, nn

from attnlab._grid import Grid
from attnlab._validate import float_dtype, nonnegative_int, positive_int

__all__ = ["Bias", "SumBias"]


# --------------------------------------------------------------------------- validation


def _check_bool(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {value!r} ({type(value).__name__})")
    return value


def _check_heads(bias: Bias, have: int, heads: int) -> None:
    """Raise when a per-head bias built for ``have`` heads meets a query with ``heads``."""
    if have != heads:
        raise ValueError(
            f"bias={bias!r} has {have} heads but the query has {heads} heads; "
            f"build it with num_heads={heads}"
        )


# --------------------------------------------------------------------------- base classes


class Bias(nn.Module, abc.ABC):
    """An additive attention bias, evaluated lazily on a :class:`~attnlab.masks.Grid`.

    Subclasses implement :meth:`forward` and say whether the values depend on the batch and
    head indices (:attr:`per_batch`, :attr:`per_head`); engines use those flags to skip
    evaluating identical slices.

    Engines that compute a bias inside their own kernel ask it through public methods such as
    :meth:`linear_distance_slopes`, never by its class.

    Example:
        >>> from attnlab.bias import alibi
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

    def linear_distance_slopes(self) -> Tensor | None:
        """The per-head slopes if this bias is ``-slopes[h] * |p - k|``, else None.

        If this bias is exactly ``-slopes[h] * |p - k|`` (``p`` the query position, ``k`` the
        key index), return the ``(H,)`` slopes; otherwise None. Engines that compute such a
        bias inside their kernel ask this instead of checking the class. ``H`` is the number of
        query heads the bias serves (:meth:`check` still says whether it fits a request).

        The default answers None, which is always safe: an engine then evaluates the bias
        through :meth:`forward`. A subclass overrides it only when its values are exactly that
        (as :class:`~attnlab.bias.ALiBi` does).

        Returns:
            A float tensor of shape ``(H,)``, or None.

        Example:
            >>> from attnlab.bias import alibi, tensor
            >>> alibi(2).linear_distance_slopes()
            tensor([0.0625, 0.0039])
            >>> print(tensor(torch.zeros(2, 2)).linear_distance_slopes())
            None
        """
        return None

    def magnitude_bound(self, lq: int, lk: int) -> float | None:
        """A bound on ``|bias|`` over every score of an ``lq x lk`` call, or None where
        only evaluating the bias would tell.

        Engines ask it before building the whole bias (the default knows one for
        :meth:`linear_distance_slopes` biases: the largest slope times the largest
        distance, ``max(lq, lk) - 1``). NaN where a value is NaN.

        Example:
            >>> from attnlab.bias import alibi, custom
            >>> alibi(2).magnitude_bound(3, 5)  # slope 1/16, distance up to 4
            0.25
            >>> print(custom(lambda h, q, k: (q - k).float()).magnitude_bound(3, 5))
            None
        """
        slopes = self.linear_distance_slopes()
        if slopes is None or not slopes.numel():
            return None
        return float(slopes.detach().abs().max()) * max(lq - 1, lk - 1, 0)

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
            batch: batch size of the scores (0, an empty batch, gives an empty bias
                when :attr:`per_batch`).
            heads: number of query heads of the scores.
            device: where to build it; defaults to the device of this bias's tensors (CPU if
                it has none).
            dtype: cast the result to this dtype if given.

        Example:
            >>> from attnlab.bias import alibi
            >>> alibi(2).dense(2, 3, heads=2)[0, 0]
            tensor([[-0.0625, -0.0000, -0.0625],
                    [-0.1250, -0.0625, -0.0000]])
        """
        lq, lk = nonnegative_int("lq", lq), nonnegative_int("lk", lk)
        batch, heads = nonnegative_int("batch", batch), positive_int("heads", heads)
        dtype = None if dtype is None else float_dtype("dtype", dtype)  # (int64: all zeros)
        self.check(batch=batch, heads=heads, lq=lq, lk=lk)
        if device is None:
            device = self._own_device()
        grid = Grid.full(lq, lk, batch=batch, heads=heads, device=device, dtype=dtype)
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
        >>> from attnlab.bias import alibi, learned_relative
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

    def linear_distance_slopes(self) -> Tensor | None:
        """The one term's answer if the sum has a single term, else None."""
        terms = self._biases()
        return terms[0].linear_distance_slopes() if len(terms) == 1 else None

    def magnitude_bound(self, lq: int, lk: int) -> float | None:
        """The sum of the terms' bounds, or None if one has none."""
        total = 0.0
        for t in self._biases():
            bound = t.magnitude_bound(lq, lk)
            if bound is None:
                return None
            total += bound
        return total

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
