"""A mask's copies of its tensors on the devices it is evaluated on (private to ``masks``).

Masks keep their tensors where they were given (the CPU, mostly) and meet each call's
device as they evaluate. Copying them there on every evaluation cost a host-device copy
from pageable memory, a sync on CUDA, per layer and per decoding step.
:class:`~attnlab._devices.DeviceCopies` keeps one copy per tensor and device; it lives
beside ``to_device`` so the dense tensor bias keeps its copies the same way.
"""

from __future__ import annotations

from attnlab._devices import DeviceCopies

__all__ = ["DeviceCopies"]
