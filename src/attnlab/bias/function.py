"""A bias given by a user's function ``fn(h, q_pos, k)``: :func:`custom`."""

from __future__ import annotations

import numbers
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from attnlab._grid import Grid
from attnlab._validate import check_broadcast
from attnlab.bias.base import Bias, _check_bool

__all__ = ["CustomBias", "ScoreBiasFn", "custom"]

#: What :func:`custom` accepts: ``fn(h, q_pos, k)`` returning a float tensor or a Python number.
ScoreBiasFn = Callable[[Tensor, Tensor, Tensor], Tensor | float]


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
        if not isinstance(raw, (Tensor, numbers.Number)):  # (a union: dynamo 2.9 failed)
            raise TypeError(
                f"bias={self!r}: fn returned {type(raw).__name__}, expected a float tensor "
                f"or a Python number"
            )
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
        check_broadcast(lambda: f"bias={self!r}", out, (grid.b, grid.h, grid.q, grid.k), "a shape")
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
