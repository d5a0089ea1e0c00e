"""Rotary position embedding (RoPE, Su et al. 2021): rotates q and k, ``(B, H, L, E)``, inside
the attention layer."""

from __future__ import annotations

import numbers
from typing import Any

import torch
from torch import Tensor, nn

from attnlab._validate import positive_int, validate_flag
from attnlab.positional._common import (
    _check_positions,
    _check_span,
    _compute_dtype,
    _inverse_frequencies,
    _positive_float,
)

__all__ = ["SCALINGS", "RotaryEmbedding"]

SCALINGS = ("none", "linear", "ntk")
#: positions the cached cos/sin tables cover at most (64 MiB for 128 rotated features in
#: float32); an int offset past them computes its own tokens' angles
_TABLE_MAX = 1 << 17


# --------------------------------------------------------------------------- validation


def _check_rotary(head_dim: object, rotary_dim: object) -> tuple[int, int]:
    """``(head_dim, rotary_dim)`` with ``rotary_dim`` even and ``<= head_dim``."""
    e = positive_int("head_dim", head_dim)
    r = e if rotary_dim is None else positive_int("rotary_dim", rotary_dim)
    if r % 2 or r > e:
        given = "defaults to head_dim" if rotary_dim is None else f"head_dim={e}"
        raise ValueError(
            f"rotary_dim must be an even int <= head_dim, got {r} ({given}); "
            f"pass rotary_dim={min(e, r) // 2 * 2} or an even head_dim"
        )
    return e, r


def _check_scaling(scaling: object, factor: object) -> tuple[str, float]:
    """``(scaling, factor)``: a known scaling and a finite factor > 0 (== 1 for 'none')."""
    if scaling not in SCALINGS:
        raise ValueError(f"scaling must be one of {SCALINGS}, got {scaling!r}")
    factor = _positive_float("factor", factor)
    if scaling == "none" and factor != 1:
        raise ValueError(
            f"factor must be 1.0 with scaling='none', got {factor}; "
            f"use scaling='linear' or 'ntk' to stretch the context"
        )
    return str(scaling), factor


class RotaryEmbedding(nn.Module):
    """Rotary position embedding (RoPE, Su et al. 2021) for per-head tensors ``(B, H, L, E)``.

    Feature pair ``j`` of a token at position ``p`` is rotated by the angle
    ``p * theta_j`` with ``theta_j = base^(-2j/R)``, ``R = rotary_dim``. Applied to queries and
    keys it makes ``q·k`` depend on positions only through their difference.

    Args:
        head_dim: the size ``E`` of the last dimension of the inputs.
        rotary_dim: rotate only the first ``R`` features and pass the rest through (partial
            rotary of GPT-NeoX and Phi). Even, at most ``head_dim``; defaults to ``head_dim``.
        base: the frequency base, ``rope_theta`` in Hugging Face configs.
        scaling: ``"none"``; ``"linear"`` divides positions by ``factor`` (position
            interpolation, Chen et al. 2023); ``"ntk"`` raises the base to
            ``base * factor^(R / (R - 2))`` (NTK-aware scaling; a no-op when ``R == 2``).
        factor: the context-stretch factor; must be 1 with ``scaling="none"``.
        interleaved: ``False`` pairs features ``(j, j + R/2)`` (the "rotate_half" layout of
            GPT-NeoX, Llama and Hugging Face); ``True`` pairs ``(2j, 2j + 1)`` (the paper,
            GPT-J).

    The cos/sin tables of positions ``0 .. N-1`` are a plain cache, not buffers: their size
    follows the longest sequence seen, so as buffers they made modules that had run different
    lengths unstackable (``stack_module_state``, ``AveragedModel(use_buffers=True)``). They
    grow (to a power of two) on demand and are rebuilt on a new device or dtype.

    Example:
        >>> rope = RotaryEmbedding(8)
        >>> q = torch.randn(1, 2, 5, 8)
        >>> rope(q).shape
        torch.Size([1, 2, 5, 8])
        >>> torch.allclose(rope(q)[:, :, 3:], rope(q[:, :, 3:], positions=3))  # a cached step
        True
    """

    _cos: Tensor
    _sin: Tensor

    def __init__(
        self,
        head_dim: int,
        *,
        rotary_dim: int | None = None,
        base: float = 10000.0,
        scaling: str = "none",
        factor: float = 1.0,
        interleaved: bool = False,
    ) -> None:
        super().__init__()
        self.head_dim, self.rotary_dim = _check_rotary(head_dim, rotary_dim)
        self.base = _positive_float("base", base)
        self.scaling, self.factor = _check_scaling(scaling, factor)
        self.interleaved = validate_flag("interleaved", interleaved)  # (numpy's taken)
        self._inv_freq = self._scaled_inverse_frequencies()  # (R/2,) float64, CPU
        self._drop_tables()

    @property
    def effective_base(self) -> float:
        """The base after NTK-aware scaling; equal to :attr:`base` otherwise."""
        r = self.rotary_dim
        if self.scaling != "ntk" or r == 2:  # one frequency, base^0 = 1 whatever the base
            return self.base
        return self.base * self.factor ** (r / (r - 2))

    @property
    def inv_freq(self) -> Tensor:
        """The angle per position of each feature pair, float64 of shape ``(R/2,)``.

        ``effective_base^(-2j/R)``, divided by ``factor`` for linear scaling.
        """
        return self._inv_freq.clone()

    def _scaled_inverse_frequencies(self) -> Tensor:
        inv_freq = _inverse_frequencies(self.rotary_dim, self.effective_base)  # (R/2,)
        return inv_freq / self.factor if self.scaling == "linear" else inv_freq

    def forward(self, x: Tensor, positions: int | Tensor = 0) -> Tensor:
        """Rotate ``x`` by the angles of its positions.

        Args:
            x: queries or keys ``(B, H, L, E)`` with ``E = head_dim``.
            positions: an int offset (tokens sit at ``positions .. positions + L - 1``; a KV
                cache passes its current length) or an integer tensor of explicit positions
                ``(L,)`` or ``(B, L)``.

        Returns:
            The rotated tensor, with the shape and dtype of ``x``.
        """
        x = self._check_x(x)  # (B, H, L, E)
        work = _compute_dtype(x.dtype)
        cos, sin = self._cos_sin(positions, x, work)  # (L, R/2) or (B, 1, L, R/2)
        r = self.rotary_dim
        out = self._rotate(x[..., :r].to(work), cos, sin).to(x.dtype)  # (B, H, L, R)
        if r == self.head_dim:
            return out
        return torch.cat((out, x[..., r:]), dim=-1)  # (B, H, L, E)

    def _apply(self, fn: Any, recurse: bool = True) -> RotaryEmbedding:
        """Move or cast as usual, then drop the cos/sin tables (made again on next use, on
        the device and in the dtype the inputs then ask for): they are not buffers, so
        ``.to``, ``.double()`` and ``to_empty`` would otherwise leave them behind."""
        super()._apply(fn, recurse)
        self._drop_tables()
        return self

    def _drop_tables(self) -> None:
        """Empty the cached cos/sin tables ``(0, R/2)``; the next use builds them."""
        empty = torch.empty(0, self.rotary_dim // 2)
        self._cos, self._sin = empty, empty  # (N, R/2) each, plain attributes

    def _check_x(self, x: object) -> Tensor:
        if not isinstance(x, Tensor):
            raise TypeError(f"x must be a torch.Tensor of shape (B, H, L, E), got {type(x)}")
        if not x.is_floating_point():
            raise TypeError(f"x must be a floating-point tensor, got dtype {x.dtype}")
        if x.dim() != 4 or x.shape[-1] != self.head_dim:
            raise ValueError(
                f"x must have shape (B, H, L, E) with E = head_dim = {self.head_dim}, "
                f"got shape {tuple(x.shape)}"
            )
        return x

    def _cos_sin(self, positions: object, x: Tensor, work: torch.dtype) -> tuple[Tensor, Tensor]:
        """cos and sin of the angles of the ``L`` tokens of ``x``, in dtype ``work``."""
        b, _, length, _ = x.shape
        if isinstance(positions, Tensor):
            pos = _check_positions(positions, batch=b, length=length).to(x.device)
            angle = self._angles(pos, work).unsqueeze(-3)  # (1, L, R/2) or (B, 1, L, R/2)
            return angle.cos(), angle.sin()
        if isinstance(positions, bool) or not isinstance(positions, numbers.Integral):
            raise TypeError(
                f"positions must be an int offset or an integer tensor (L,) or (B, L), "
                f"got {type(positions).__name__}"
            )
        if positions < 0:
            raise ValueError(f"positions must be an int offset >= 0, got {positions}")
        start = _check_span("positions", int(positions), length)
        if start + length > max(_TABLE_MAX, self._cos.shape[0]):  # far out: these angles
            # only (one token at 2**21 built 2 GiB of tables, 12.6 s); the same values
            angle = self._angles(torch.arange(start, start + length, device=x.device), work)
            return angle.cos(), angle.sin()  # (L, R/2)
        cos, sin = self._table(start + length, x.device, work)  # (N, R/2)
        return cos[start : start + length], sin[start : start + length]  # (L, R/2)

    def _angles(self, pos: Tensor, work: torch.dtype) -> Tensor:
        """``pos * inv_freq`` for integer positions (...): a tensor (..., R/2)."""
        return pos.to(work)[..., None] * self._inv_freq.to(pos.device, work)

    def _table(self, end: int, device: torch.device, work: torch.dtype) -> tuple[Tensor, Tensor]:
        """The cached cos/sin tables, rebuilt to cover positions ``0 .. end - 1`` if needed."""
        # one read of the pair, and the pair built here returned as built: another thread
        # sharing the module may swap in tables of another length in between
        cos, sin = self._cos, self._sin
        stale = cos.device != device or cos.dtype != work
        if stale or cos.shape[0] < end or (sin.shape, sin.dtype) != (cos.shape, cos.dtype):
            n = max(16, 1 << (end - 1).bit_length())  # the next power of two >= end
            # Built outside inference mode so the cache can serve autograd later on.
            with torch.inference_mode(False), torch.no_grad():
                angle = self._angles(torch.arange(n, device=device), work)  # (N, R/2)
                cos, sin = angle.cos(), angle.sin()
                self._cos, self._sin = cos, sin
        return cos, sin

    def _rotate(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        """Rotate the feature pairs of ``x`` (..., R) by angles given as cos/sin (..., R/2)."""
        if self.interleaved:
            x1, x2 = x.unflatten(-1, (self.rotary_dim // 2, 2)).unbind(-1)  # pairs (2j, 2j+1)
            return torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
        x1, x2 = x.chunk(2, dim=-1)  # pairs (j, j + R/2)
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)

    def extra_repr(self) -> str:
        return (
            f"head_dim={self.head_dim}, rotary_dim={self.rotary_dim}, base={self.base}, "
            f"scaling={self.scaling!r}, factor={self.factor}, interleaved={self.interleaved}"
        )
