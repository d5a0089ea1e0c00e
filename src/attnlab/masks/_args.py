"""Argument checks and coordinates shared by the mask kinds (private to ``masks``)."""

from __future__ import annotations

import numbers

import torch
from torch import Tensor

from attnlab._eager import PLANS, as_written, exporting, vmapping

Device = torch.device | str | None


def positions(lq: int, lk: int, batch: int, device: Device) -> Tensor:
    """Query positions ``(batch, lq)`` (bottom-right aligned)."""
    return (torch.arange(lq, device=device) + (lk - lq)).expand(batch, lq)


def nonneg_int(name: str, value: object) -> int:
    """``value`` as an int >= 0 (numpy's ints too, as ``_validate.nonnegative_int``), or a
    ``TypeError``/``ValueError`` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < 0:
        raise ValueError(f"{name} must be a non-negative int, got {value}")
    return int(value)


#: Sizes past any sequence reach the same keys; clamped here so that ``p +- size`` stays
#: within int64 (``window(0, sys.maxsize)`` wrapped around and hid every key).
SIZE_CAP = 2**62


def size(name: str, value: object, *, positive: bool = False) -> int:
    """A window, prefix or block size: an int >= 0 (>= 1 with ``positive``), clamped to
    :data:`SIZE_CAP`.

    Example:
        >>> size("left", 2**70) == SIZE_CAP, size("left", 5)
        (True, 5)
    """
    return min((pos_int if positive else nonneg_int)(name, value), SIZE_CAP)


def pos_int(name: str, value: object) -> int:
    """``value`` as an int >= 1, or a ``TypeError``/``ValueError`` naming ``name``.

    Example:
        >>> pos_int("size", -2)
        Traceback (most recent call last):
        ...
        ValueError: size must be a positive int, got -2
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be a positive int, got {value}")
    return int(value)


def int_tensor(name: str, value: object, ndims: tuple[int, ...]) -> Tensor:
    """Coerce a list or tensor of ints into a long tensor with one of ``ndims`` ranks."""
    if not isinstance(value, Tensor | list | tuple | range) and not hasattr(value, "__array__"):
        raise TypeError(
            f"{name} must be a tensor or a list of ints, got {type(value).__name__} {value!r}"
        )
    try:
        t = value if isinstance(value, Tensor) else torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError) as e:  # ragged lists, strings inside
        raise TypeError(f"{name} must be a tensor or a list of ints, got {value!r}") from e
    if not isinstance(value, Tensor) and t.numel() == 0:
        t = t.long()  # torch.as_tensor([]) is float32; an empty list holds no non-integer
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f"{name} must hold integers, got dtype {t.dtype}")
    if t.dim() not in ndims:
        raise ValueError(
            f"{name} must have rank {' or '.join(map(str, ndims))}, got shape {tuple(t.shape)}"
        )
    return t.long()


@as_written(PLANS)
def check_nonnegative(name: str, t: Tensor | None) -> int | None:
    """A ``ValueError`` naming ``name`` where ``t`` holds a value below 0, else ``t``'s
    largest value (0 when empty), from one read; run as written under ``torch.compile``
    (traced, the read broke the graph with dynamo's warning that it cannot trace
    functorch's interpreter stack), skipped (None) where no value can be read (vmapped,
    exported).

    Example:
        >>> check_nonnegative("key_lengths", torch.tensor([2, 5]))
        5
        >>> check_nonnegative("key_lengths", torch.tensor([2, -1]))
        Traceback (most recent call last):
        ...
        ValueError: key_lengths must be >= 0, got [2, -1]
    """
    if t is None or vmapping() or exporting():
        return None
    if not t.numel():
        return 0
    lo, hi = torch.stack(torch.aminmax(t)).tolist()  # (one read where t is on a device)
    if lo < 0:
        raise ValueError(f"{name} must be >= 0, got {t.tolist()}")
    return int(hi)
