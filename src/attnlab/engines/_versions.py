"""What a cached plan depends on: the tensors a mask holds, with their versions.

The blocked and flex engines memoize a mask's plan for the last mask object; its key
holds :func:`versions`, which changes when any of those tensors is replaced or changed in
place (a custom mask's function counts the tensors it closes over and module-level
tensors it names).
"""

from __future__ import annotations

from types import FunctionType
from typing import Any

import torch
from torch import Tensor

from attnlab.masks import Mask

__all__ = ["versions"]


def _version_of(t: Tensor) -> object:
    """``t``'s version counter; an inference tensor (made under ``torch.inference_mode``)
    has none, so its contents stand for it where that is cheap (small, on the CPU), and
    otherwise a new object, which matches nothing: the caller recomputes."""
    if not t.is_inference():
        return t._version
    if t.device.type == "cpu" and t.numel() <= 1 << 16:
        return (
            t.dtype,
            tuple(t.shape),
            t.contiguous().view(-1).view(torch.uint8).numpy().tobytes(),
        )
    return object()


def versions(obj: object, depth: int = 0) -> tuple:
    """The tensors held by a mask (through its attributes, nested masks and sequences) as
    ``(data pointer, version)`` pairs: they change when a tensor is replaced or changed in
    place.

    Example:
        >>> from attnlab import masks
        >>> lengths = torch.tensor([3, 2])
        >>> m = masks.causal() & masks.padding(lengths)
        >>> before = versions(m)
        >>> _ = lengths.add_(0)
        >>> versions(m) != before
        True
    """
    if isinstance(obj, Tensor):
        return ((obj.data_ptr(), _version_of(obj)),)
    if depth > 4:
        return ()
    if isinstance(obj, FunctionType):  # a custom mask's function: the tensors it reads
        items: Any = [c.cell_contents for c in obj.__closure__ or () if _filled(c)]
        named = (obj.__globals__.get(name) for name in obj.__code__.co_names)
        items += [t for t in named if isinstance(t, Tensor)]  # module-level tensors only
    elif isinstance(obj, (tuple, list)):
        items = obj
    else:
        items = getattr(obj, "__dict__", {}).values()
    return tuple(
        v
        for x in items
        if isinstance(x, (Tensor, Mask, tuple, list, FunctionType))
        for v in versions(x, depth + 1)
    )


def _filled(cell: Any) -> bool:
    """Whether a closure cell holds a value (an empty one raises ValueError when read)."""
    try:
        cell.cell_contents  # noqa: B018
    except ValueError:
        return False
    return True
