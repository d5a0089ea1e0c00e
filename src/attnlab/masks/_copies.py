"""A mask's copies of its tensors on the devices it is evaluated on (private to ``masks``).

Masks keep their tensors where they were given (the CPU, mostly) and meet each call's
device as they evaluate. Copying them there on every evaluation cost a host-device copy
from pageable memory, a sync on CUDA, per layer and per decoding step.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from attnlab._devices import to_device
from attnlab._eager import compiling

__all__ = ["DeviceCopies"]


class DeviceCopies:
    """Copies of a mask's tensors on other devices, each kept while its source is the
    same tensor, unchanged (its version): an in-place change or a new tensor makes a new
    copy. One copy per name and device.

    Not a tensor, mask or container, so what engines key their plans on (a mask's
    tensors, :func:`attnlab.engines._versions.versions`) and the flex engine's ``moved``
    pass it by; a copied mask shares it (the keys are the sources), a deep copy or a
    pickle starts empty.

    Example:
        >>> lengths = torch.tensor([3, 2])
        >>> copies, meta = DeviceCopies(), torch.device("meta")
        >>> a = copies.on("lengths", lengths, meta)
        >>> copies.on("lengths", lengths, meta) is a, copies.on("lengths", lengths, "cpu")
        (True, tensor([3, 2]))
        >>> _ = lengths.add_(0)  # in place: a new copy
        >>> copies.on("lengths", lengths, meta) is a
        False
    """

    __slots__ = ("_kept",)

    def __init__(self) -> None:
        # (name, device) -> (source, its version, the copy)
        self._kept: dict[tuple[str, torch.device], tuple[Tensor, int, Tensor]] = {}

    def on(self, name: str, t: Tensor, device: torch.device | str) -> Tensor:
        """``t`` on ``device``: itself where it is there, else the copy kept for ``name``
        while ``t`` is unchanged, else a new one (kept unless traced, or ``t`` is an
        inference tensor, which has no version)."""
        device = torch.device(device)
        if t.device == device:
            return t
        if compiling() or t.is_inference():
            return t.to(device)
        key = (name, device)
        kept = self._kept.get(key)  # read once: another thread may replace it meanwhile
        if kept is not None and kept[0] is t and kept[1] == t._version:
            return kept[2]
        out = to_device(t, device)  # (from the host to a GPU: without a sync)
        if type(out) is Tensor:  # (not a tracer's fake tensor)
            self._kept[key] = (t, t._version, out)
        return out

    def __reduce__(self) -> tuple[Any, ...]:
        return (DeviceCopies, ())

    def __deepcopy__(self, memo: dict[int, Any]) -> DeviceCopies:
        return DeviceCopies()

    def __repr__(self) -> str:
        return f"DeviceCopies({len(self._kept)} kept)"
