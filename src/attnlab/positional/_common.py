"""Checks and math shared by the absolute and rotary position encodings."""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor

# --------------------------------------------------------------------------- validation


def _positive_float(name: str, value: object) -> float:
    """``value`` as a finite float > 0, or a TypeError/ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a float > 0, got {value!r} ({type(value).__name__})")
    out = float(value)
    if not (math.isfinite(out) and out > 0):
        raise ValueError(f"{name} must be a finite float > 0, got {value}")
    return out


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


# --------------------------------------------------------------------------- shared math


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype angles are computed in: float64 for float64, float32 for everything else."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _inverse_frequencies(dim: int, base: float) -> Tensor:
    """``base^(-2i/dim)`` for ``i = 0 .. ceil(dim/2) - 1``: float64 on the CPU, even under
    ``with torch.device("meta")`` (a RoPE built there kept meta frequencies, which no
    ``to_empty`` restores: "Cannot copy out of meta tensor")."""
    steps = torch.arange(0, dim, 2, dtype=torch.float64, device="cpu")
    return torch.pow(base, -steps / dim)


def _check_span(name: str, start: int, length: int) -> int:
    """``start`` if ``start + length`` fits int64, the end of its positions' arange (past
    it torch said "value cannot be converted to type int64_t without overflow")."""
    if start + length > 2**63 - 1:
        raise ValueError(
            f"{name}={start} with {length} tokens runs past the positions int64 holds: "
            f"{name} + length must be at most 2**63 - 1"
        )
    return start
