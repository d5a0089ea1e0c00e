"""Absolute position encodings added to the embeddings ``(B, L, D)`` before the first layer:
sinusoidal (Vaswani et al., 2017) and learned (GPT-2, BERT)."""

from __future__ import annotations

import numbers

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnlab._validate import float_dtype, nonnegative_int, positive_int
from attnlab.positional._common import (
    _check_positions,
    _check_span,
    _compute_dtype,
    _inverse_frequencies,
    _positive_float,
)

__all__ = ["LearnedPositional", "SinusoidalPositional", "sinusoidal_table"]


# --------------------------------------------------------------------------- validation


def _check_embeddings(x: object, dim: int) -> Tensor:
    """``x`` as a float tensor of shape ``(B, L, D)`` with ``D == dim``."""
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor of shape (B, L, D), got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got dtype {x.dtype}")
    if x.dim() != 3 or x.shape[-1] != dim:
        raise ValueError(
            f"x must have shape (B, L, D) with D = dim = {dim}, got shape {tuple(x.shape)}"
        )
    return x


def _positions(
    offset: object, positions: Tensor | None, *, batch: int, length: int, device: torch.device
) -> Tensor:
    """The positions of ``length`` tokens: ``offset + arange(length)`` or the explicit ones."""
    if positions is None:
        start = _check_span("offset", nonnegative_int("offset", offset), length)
        return torch.arange(start, start + length, device=device)  # (L,)
    if not (isinstance(offset, numbers.Integral) and offset == 0):
        raise ValueError(
            f"pass either offset or positions, not both; got offset={offset!r} and a "
            f"positions tensor"
        )
    return _check_positions(positions, batch=batch, length=length).to(device)  # (L,) or (B, L)


# --------------------------------------------------------------------------- shared math


def _sinusoid(pos: Tensor, dim: int, base: float, dtype: torch.dtype) -> Tensor:
    """The sinusoidal encoding of integer positions ``pos`` (...) as a tensor (..., dim)."""
    work = _compute_dtype(dtype)
    inv_freq = _inverse_frequencies(dim, base).to(pos.device, work)  # (ceil(D/2),)
    angle = pos.to(work)[..., None] * inv_freq  # (..., ceil(D/2))
    pe = torch.stack((angle.sin(), angle.cos()), dim=-1).flatten(-2)  # (..., 2 ceil(D/2))
    return pe[..., :dim].to(dtype)  # (..., D): sin at 2i, cos at 2i + 1


# --------------------------------------------------------------------------- absolute


def sinusoidal_table(
    length: int,
    dim: int,
    *,
    base: float = 10000.0,
    offset: int = 0,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> Tensor:
    """The sinusoidal position encodings of Vaswani et al. (2017).

    ``PE[p, 2i] = sin(pos / base^(2i/dim))`` and ``PE[p, 2i+1] = cos(pos / base^(2i/dim))``
    with ``pos = offset + p``: sine and cosine interleaved as in the paper. An odd ``dim``
    ends with a sine column.

    Args:
        length: number of positions ``L``.
        dim: embedding width ``D``.
        base: the wavelength base.
        offset: the position of the first row.
        dtype: a floating-point dtype for the result.
        device: where to build it.

    Returns:
        A tensor of shape ``(L, D)``.

    Example:
        >>> sinusoidal_table(3, 4, offset=1)
        tensor([[ 0.8415,  0.5403,  0.0100,  0.9999],
                [ 0.9093, -0.4161,  0.0200,  0.9998],
                [ 0.1411, -0.9900,  0.0300,  0.9996]])
    """
    length = nonnegative_int("length", length)
    dim = positive_int("dim", dim)
    offset = _check_span("offset", nonnegative_int("offset", offset), length)
    dtype = float_dtype("dtype", dtype)
    pos = torch.arange(offset, offset + length, device=device)  # (L,)
    return _sinusoid(pos, dim, _positive_float("base", base), dtype)  # (L, D)


class SinusoidalPositional(nn.Module):
    """Adds :func:`sinusoidal_table` encodings to embeddings ``(B, L, D)``; no parameters.

    The encodings are computed on the fly in float32 (float64 for float64 inputs).

    Args:
        dim: embedding width ``D``.
        base: the wavelength base.

    Example:
        >>> pe = SinusoidalPositional(4)
        >>> x = torch.zeros(1, 3, 4)
        >>> torch.equal(pe(x, offset=2), sinusoidal_table(3, 4, offset=2)[None])
        True
    """

    def __init__(self, dim: int, *, base: float = 10000.0) -> None:
        super().__init__()
        self.dim = positive_int("dim", dim)
        self.base = _positive_float("base", base)

    def forward(self, x: Tensor, offset: int = 0, *, positions: Tensor | None = None) -> Tensor:
        """Add the encodings of positions ``offset .. offset + L - 1`` (or ``positions``).

        Args:
            x: embeddings ``(B, L, D)``.
            offset: the position of the first token, e.g. the length of a KV cache.
            positions: explicit integer positions ``(L,)`` or ``(B, L)`` instead of ``offset``.

        Returns:
            ``x + PE`` with the shape and dtype of ``x``.
        """
        x = _check_embeddings(x, self.dim)  # (B, L, D)
        b, length, _ = x.shape
        pos = _positions(offset, positions, batch=b, length=length, device=x.device)
        return x + _sinusoid(pos, self.dim, self.base, x.dtype)  # (B, L, D)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, base={self.base}"


class LearnedPositional(nn.Module):
    """Adds a learned vector per absolute position, as in GPT-2 and BERT.

    Args:
        max_len: the number of positions with a vector; positions must be below it.
        dim: embedding width ``D``.

    Attributes:
        weight: ``nn.Parameter`` of shape ``(max_len, D)``, initialised from N(0, 0.02²).

    Example:
        >>> pe = LearnedPositional(16, 4)
        >>> x = torch.zeros(2, 3, 4)
        >>> torch.equal(pe(x, offset=5)[0], pe.weight[5:8].detach())
        True
    """

    def __init__(self, max_len: int, dim: int) -> None:
        super().__init__()
        self.max_len = positive_int("max_len", max_len)
        self.dim = positive_int("dim", dim)
        self.weight = nn.Parameter(torch.empty(self.max_len, self.dim))  # (max_len, D)
        self.reset_parameters()

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Draw the vectors again, ``N(0, 0.02**2)`` as when built (from ``generator``
        if given, else torch's global RNG)."""
        nn.init.normal_(self.weight, std=0.02, generator=generator)

    def forward(self, x: Tensor, offset: int = 0, *, positions: Tensor | None = None) -> Tensor:
        """Add the vectors of positions ``offset .. offset + L - 1`` (or ``positions``).

        Args:
            x: embeddings ``(B, L, D)``.
            offset: the position of the first token, e.g. the length of a KV cache.
            positions: explicit integer positions ``(L,)`` or ``(B, L)`` instead of ``offset``.

        Returns:
            ``x + weight[positions]`` with the shape and dtype of ``x``.

        Raises:
            ValueError: if a position is negative or ``>= max_len``.
        """
        x = _check_embeddings(x, self.dim)  # (B, L, D)
        b, length, _ = x.shape
        if positions is None and isinstance(offset, numbers.Integral) and offset is not True:
            self._check_end(int(offset), length)  # (first: arange overflowed at 2**63)
        pos = _positions(offset, positions, batch=b, length=length, device=self.weight.device)
        if positions is not None:
            self._check_values(pos)
        return x + F.embedding(pos.long(), self.weight).to(x.dtype)  # (B, L, D): any int dtype

    def _check_end(self, offset: int, length: int) -> None:
        """Raise if positions ``offset .. offset + length - 1`` run past :attr:`max_len`."""
        if offset + length > self.max_len:
            raise ValueError(
                f"positions run past max_len: offset={offset} + length={length} "
                f"= {offset + length} > max_len={self.max_len}"
            )

    def _check_values(self, pos: Tensor) -> None:
        """Raise if an explicit position has no row in :attr:`weight` (a host sync)."""
        if pos.numel():
            lo, hi = int(pos.min()), int(pos.max())
            if lo < 0 or hi >= self.max_len:
                raise ValueError(
                    f"positions must lie in [0, max_len={self.max_len}), got values from "
                    f"{lo} to {hi}"
                )

    def extra_repr(self) -> str:
        return f"max_len={self.max_len}, dim={self.dim}"
