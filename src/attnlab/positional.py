"""Positional encodings, all in one module.

They enter a transformer in three different places:

* **added to the embeddings** before the first layer: :func:`sinusoidal_table` /
  :class:`SinusoidalPositional` (Vaswani et al., 2017) and :class:`LearnedPositional`
  (GPT-2, BERT), on tensors of shape ``(B, L, D)``;
* **rotating q and k** inside the attention layer: :class:`RotaryEmbedding` (RoPE, Su et al.,
  2021), on per-head tensors of shape ``(B, H, L, E)``;
* **biasing the attention scores**: :func:`alibi` (Press et al., 2022) and
  :func:`relative_buckets` (T5, Raffel et al., 2020) build attention biases; pass them as
  ``bias=`` to :func:`attnlab.attention`. They live in :mod:`attnlab.bias` and are re-exported
  here so every positional encoding can be found in one place.

Angles are computed in float32 (float64 for float64 inputs) and the results are cast to the
input's dtype.

Example:
    >>> import attnlab
    >>> rope = RotaryEmbedding(16)
    >>> q = k = v = torch.randn(1, 4, 10, 16)
    >>> out = attnlab.attention(rope(q), rope(k), v)
    >>> out = attnlab.attention(q, k, v, bias=alibi(4))
    >>> out.shape
    torch.Size([1, 4, 10, 16])
"""

from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnlab import bias as _bias
from attnlab._validate import nonnegative_int, positive_int

__all__ = [
    "LearnedPositional",
    "RotaryEmbedding",
    "SinusoidalPositional",
    "alibi",
    "relative_buckets",
    "sinusoidal_table",
]

SCALINGS = ("none", "linear", "ntk")


# --------------------------------------------------------------------------- validation


def _positive_float(name: str, value: object) -> float:
    """``value`` as a finite float > 0, or a TypeError/ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a float > 0, got {value!r} ({type(value).__name__})")
    out = float(value)
    if not (math.isfinite(out) and out > 0):
        raise ValueError(f"{name} must be a finite float > 0, got {value}")
    return out


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


def _check_positions(positions: object, *, batch: int, length: int) -> Tensor:
    """``positions`` as an integer tensor of shape ``(L,)`` or ``(B, L)`` (``B`` may be 1)."""
    if not isinstance(positions, Tensor):
        raise TypeError(f"positions must be an integer tensor, got {type(positions).__name__}")
    if positions.is_floating_point() or positions.is_complex() or positions.dtype == torch.bool:
        raise TypeError(f"positions must be an integer tensor, got dtype {positions.dtype}")
    shape = tuple(positions.shape)
    if shape != (length,) and shape not in ((batch, length), (1, length)):
        raise ValueError(
            f"positions must have shape (L,) = ({length},) or (B, L) = ({batch}, {length}), "
            f"got shape {shape}"
        )
    return positions


def _positions(
    offset: object, positions: Tensor | None, *, batch: int, length: int, device: torch.device
) -> Tensor:
    """The positions of ``length`` tokens: ``offset + arange(length)`` or the explicit ones."""
    if positions is None:
        start = nonnegative_int("offset", offset)
        return torch.arange(start, start + length, device=device)  # (L,)
    if not (isinstance(offset, numbers.Integral) and offset == 0):
        raise ValueError(
            f"pass either offset or positions, not both; got offset={offset!r} and a "
            f"positions tensor"
        )
    return _check_positions(positions, batch=batch, length=length).to(device)  # (L,) or (B, L)


# --------------------------------------------------------------------------- shared math


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype angles are computed in: float64 for float64, float32 for everything else."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _inverse_frequencies(dim: int, base: float) -> Tensor:
    """``base^(-2i/dim)`` for ``i = 0 .. ceil(dim/2) - 1``: float64 on the CPU."""
    return torch.pow(base, -torch.arange(0, dim, 2, dtype=torch.float64) / dim)


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
    offset = nonnegative_int("offset", offset)
    if not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating-point dtype, got {dtype}")
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
        nn.init.normal_(self.weight, std=0.02)

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
        pos = _positions(offset, positions, batch=b, length=length, device=self.weight.device)
        if positions is None:
            self._check_end(offset, length)
        else:
            self._check_values(pos)
        return x + F.embedding(pos, self.weight).to(x.dtype)  # (B, L, D)

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


# --------------------------------------------------------------------------- rotary


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

    The cos/sin tables of positions ``0 .. N-1`` are cached in non-persistent buffers that
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
        if not isinstance(interleaved, bool):
            raise TypeError(f"interleaved must be a bool, got {interleaved!r}")
        self.interleaved = interleaved
        self._inv_freq = self._scaled_inverse_frequencies()  # (R/2,) float64, CPU
        empty = torch.empty(0, self.rotary_dim // 2)
        self.register_buffer("_cos", empty, persistent=False)  # (N, R/2)
        self.register_buffer("_sin", empty.clone(), persistent=False)  # (N, R/2)

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
        start = int(positions)
        cos, sin = self._table(start + length, x.device, work)  # (N, R/2)
        return cos[start : start + length], sin[start : start + length]  # (L, R/2)

    def _angles(self, pos: Tensor, work: torch.dtype) -> Tensor:
        """``pos * inv_freq`` for integer positions (...): a tensor (..., R/2)."""
        return pos.to(work)[..., None] * self._inv_freq.to(pos.device, work)

    def _table(self, end: int, device: torch.device, work: torch.dtype) -> tuple[Tensor, Tensor]:
        """The cached cos/sin tables, rebuilt to cover positions ``0 .. end - 1`` if needed."""
        stale = self._cos.device != device or self._cos.dtype != work
        if stale or self._cos.shape[0] < end:
            n = max(16, 1 << (end - 1).bit_length())  # the next power of two >= end
            # Built outside inference mode so the cache can serve autograd later on.
            with torch.inference_mode(False), torch.no_grad():
                angle = self._angles(torch.arange(n, device=device), work)  # (N, R/2)
                self._cos, self._sin = angle.cos(), angle.sin()
        return self._cos, self._sin

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


# --------------------------------------------------------------------------- biases


def alibi(num_heads: int) -> _bias.ALiBi:
    """ALiBi (Press et al., 2022) as an attention bias: :func:`attnlab.bias.alibi`.

    Pass the result as ``bias=`` to :func:`attnlab.attention`; it replaces position
    embeddings rather than adding to them.

    Args:
        num_heads: number of query heads.

    Returns:
        An :class:`attnlab.bias.ALiBi` bias with the slopes of :func:`attnlab.bias.alibi_slopes`.

    Example:
        >>> alibi(4).slopes
        tensor([0.2500, 0.0625, 0.0156, 0.0039])
    """
    return _bias.alibi(num_heads)


def relative_buckets(
    num_heads: int,
    num_buckets: int = 32,
    max_distance: int = 128,
    bidirectional: bool = True,
) -> _bias.RelativeBuckets:
    """T5's bucketed relative position bias: :func:`attnlab.bias.relative_buckets`.

    Pass the result as ``bias=`` to :func:`attnlab.attention`.

    Args:
        num_heads: number of query heads.
        num_buckets: number of buckets (both directions together if ``bidirectional``).
        max_distance: offsets at least this far apart share the last bucket.
        bidirectional: ``True`` for encoders, ``False`` for causal decoders.

    Returns:
        An :class:`attnlab.bias.RelativeBuckets` bias with a learned ``(num_buckets, H)`` table.

    Example:
        >>> relative_buckets(2, num_buckets=8, max_distance=16).table.shape
        torch.Size([8, 2])
    """
    return _bias.relative_buckets(num_heads, num_buckets, max_distance, bidirectional)
