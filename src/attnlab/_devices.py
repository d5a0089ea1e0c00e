"""Copies from the host to a device that do not stall the host (private).

A copy from pageable host memory to a CUDA device waits for the device to take it: a
host-device sync, which ``torch.cuda.set_sync_debug_mode`` reports and which stalls the
host until the GPU's queue drains (on an H200, a 128-token call returned in 380 us
against 48 us for bare SDPA). Copied through pinned memory without blocking, the copy is
queued like a kernel. Masks, engines and integrations use this for the small tensors
they make on the host (row bounds, tile states, lengths); masks and the dense tensor bias
keep their own tensors' copies on each device in a :class:`DeviceCopies`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from attnlab._eager import compiling

__all__ = ["DeviceCopies", "to_device"]


def to_device(t: Tensor, device: torch.device | str) -> Tensor:
    """Host tensor ``t`` on ``device``: on a CUDA device through pinned memory without
    blocking (its values are copied first, so ``t`` may change afterwards), elsewhere
    ``t.to(device)``; ``t`` itself where it is there already.

    Example:
        >>> t = torch.tensor([1, 2])
        >>> to_device(t, "cpu") is t, to_device(t, "meta").device
        (True, device(type='meta'))
    """
    device = torch.device(device)
    if t.device == device:
        return t
    if device.type == "cuda" and t.device.type == "cpu":
        # (pinned already, pin_memory() returns t itself, which the copy would read late)
        src = t.clone() if t.is_pinned() else t
        return src.contiguous().pin_memory().to(device, non_blocking=True)
    return t.to(device)


_Stamp = tuple[int, int, torch.dtype]


def _stamp(t: Tensor) -> _Stamp | None:
    """What a kept copy of ``t`` must still match: ``t``'s version (bumped by a change in
    place), where its values start and its dtype (``t.data = new`` keeps the version);
    None for a tensor without storage of its own (a functorch transform's wrapper)."""
    try:
        return t._version, t.data_ptr(), t.dtype
    except RuntimeError:
        return None


class DeviceCopies:
    """Copies of a mask's (or a tensor bias's) tensors on other devices, each kept while
    its source is the same tensor, unchanged (its version, storage and dtype): an
    in-place change, a new tensor or ``t.data = new`` (as ``module.to`` does to a
    parameter) makes a new copy; a change in place through ``t.data`` is not seen. One
    copy per name and device, made with :func:`to_device` (on CUDA through pinned
    memory, not waiting).
    A tensor that requires grad is copied on every call and not kept: its copy carries
    the autograd graph of that call.

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
        # (name, device) -> (source, its stamp, the copy)
        self._kept: dict[tuple[str, torch.device], tuple[Tensor, _Stamp, Tensor]] = {}

    def on(self, name: str, t: Tensor, device: torch.device | str) -> Tensor:
        """``t`` on ``device``: itself where it is there, else the copy kept for ``name``
        while ``t`` is unchanged, else a new one (kept unless traced, or ``t`` is an
        inference tensor, which has no version, or requires grad)."""
        device = torch.device(device)
        if t.device == device:  # (a copy kept for a source now moved here is dropped:
            self._kept.pop((name, device), None)  # after module.to(device) it held the
            return t  # old source and a second copy on the device)
        if compiling() or t.is_inference() or t.requires_grad:
            return t.to(device)
        key, stamp = (name, device), _stamp(t)
        if stamp is None:
            return t.to(device)
        kept = self._kept.get(key)  # read once: another thread may replace it meanwhile
        if kept is not None and kept[0] is t and kept[1] == stamp:
            return kept[2]
        out = to_device(t, device)
        if type(out) is Tensor:  # (not a tracer's fake tensor)
            self._kept[key] = (t, stamp, out)
        return out

    def __reduce__(self) -> tuple[Any, ...]:
        return (DeviceCopies, ())

    def __deepcopy__(self, memo: dict[int, Any]) -> DeviceCopies:
        return DeviceCopies()

    def __repr__(self) -> str:
        return f"DeviceCopies({len(self._kept)} kept)"
