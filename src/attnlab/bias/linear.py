"""ALiBi, Attention with Linear Biases (Press et al., 2022): ``bias[h, p, k] = -m_h * |p - k|``."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from attnlab._eager import compiling, unreadable
from attnlab._grid import Grid
from attnlab._validate import float_dtype, positive_int
from attnlab.bias.base import Bias, _check_heads

__all__ = ["ALiBi", "alibi", "alibi_slopes"]


def _power_of_two_slopes(n: int) -> list[float]:
    """The geometric sequence 2^(-8/n), 2^(-16/n), ..., 2^(-8) (n a power of 2)."""
    return [2.0 ** (-8.0 * (i + 1) / n) for i in range(n)]


def alibi_slopes(num_heads: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """The per-head ALiBi slopes of Press et al. (2022), of shape ``(num_heads,)``.

    For a power of two ``n`` the slopes are the geometric sequence that starts at
    ``2^(-8/n)`` with ratio ``2^(-8/n)``. Otherwise, with ``m`` the largest power of two below
    ``n``, they are the ``m`` slopes for ``m`` heads followed by the first ``n - m`` of every
    other slope (indices 0, 2, 4, ...) for ``2m`` heads. They are computed in Python floats
    (float64) and rounded once to ``dtype`` (float32 by default).

    Example:
        >>> alibi_slopes(4)
        tensor([0.2500, 0.0625, 0.0156, 0.0039])
        >>> alibi_slopes(12, torch.float64)[-1].item() == 2**-3.5
        True
    """
    n = positive_int("num_heads", num_heads)
    return torch.tensor(_slopes(n), dtype=float_dtype("dtype", dtype))


def _slopes(n: int) -> list[float]:
    """The ``n`` slopes of :func:`alibi_slopes` as Python floats."""
    m = 1 << (n.bit_length() - 1)  # the largest power of two <= n
    slopes = _power_of_two_slopes(m)
    if m != n:
        slopes += _power_of_two_slopes(2 * m)[0::2][: n - m]
    return slopes


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

    def _apply(self, fn: Any, recurse: bool = True) -> ALiBi:
        """Move or cast as usual, then make the slopes again (they follow from
        ``num_heads``) in their new dtype, rounded once from float64: ``to_empty`` after a
        build under ``torch.device("meta")`` left them uninitialized (0 or 8.6e32), no
        state dict holds them, and ``.double()`` kept float32's rounding."""
        super()._apply(fn, recurse)
        s = self.slopes
        self.slopes = torch.tensor(_slopes(self.num_heads), dtype=s.dtype).to(s.device)
        self.__dict__["_copies"] = {}  # made from the old slopes
        return self

    def check(self, *, batch: int, heads: int, lq: int, lk: int) -> None:
        _check_heads(self, self.num_heads, heads)

    def linear_distance_slopes(self) -> Tensor:
        """The slopes buffer ``(H,)``: ALiBi is exactly ``-slopes[h] * |p - k|``."""
        return self.slopes

    def forward(self, grid: Grid) -> Tensor:
        wide = grid.dtype == torch.float64 and self.slopes.dtype != torch.float64
        dtype = torch.promote_types(torch.float64 if wide else self.slopes.dtype, torch.float32)
        slope = self._slopes_on(grid.h.device, dtype, wide)[grid.h]  # (1, Hg, 1, 1)
        distance = (grid.q - grid.k).abs().to(dtype)  # (1, 1, Tq, Tk)
        return -slope * distance  # (1, Hg, Tq, Tk)

    def _slopes_on(self, device: torch.device, dtype: torch.dtype, wide: bool) -> Tensor:
        """The slopes ``(H,)`` in ``dtype`` on ``device`` (the grid's: they are constants,
        whichever device the module is on); for float64 scores (``wide``) rounded from
        float64, not float32 (whose rounding was 1e-8).

        A copy to another device is made once and kept (not in the state dict; ``.to()``
        and ``to_empty`` drop it): copied at each call from the CPU to a GPU it was a
        host-device sync per call. Not kept while tracing (a traced copy is no tensor).
        """
        slopes = alibi_slopes(self.num_heads, torch.float64) if wide else self.slopes
        if slopes.device == device and not wide:
            return slopes.to(dtype)
        copies: dict[tuple[torch.device, torch.dtype, bool], Tensor]
        copies = self.__dict__.setdefault("_copies", {})
        key = (torch.device(device), dtype, wide)
        if key not in copies:
            made = slopes.to(device, dtype)
            if compiling() or unreadable(made):
                return made
            copies[key] = made
        return copies[key]

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}"


def alibi(num_heads: int) -> ALiBi:
    """ALiBi (Press et al., 2022) as an attention bias for ``num_heads`` query heads.

    Pass the result as ``bias=`` to :func:`attnlab.attention`; it replaces position
    embeddings rather than adding to them. Also found as :func:`attnlab.positional.alibi`.

    Args:
        num_heads: number of query heads.

    Returns:
        An :class:`ALiBi` bias with the slopes of :func:`alibi_slopes`.

    Example:
        >>> alibi(4).slopes
        tensor([0.2500, 0.0625, 0.0156, 0.0039])
        >>> alibi(1).dense(1, 3)
        tensor([[[[-0.0078, -0.0039, -0.0000]]]])
    """
    return ALiBi(num_heads)
