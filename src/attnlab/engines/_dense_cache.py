"""The sdpa engine's memo of a mask's dense form (private).

A model's layers call attention with one mask object per forward (``attnlab.nn`` stacks
share one combined mask, the transformers backend hands one mask to every layer), and
each call made the same dense mask again: on an H200, bf16 1x8x128x64 with
``padding([100])`` took 577 us per call through ``engine='sdpa'`` against 77 us for torch
SDPA with the same bool mask, the host time spent building it. :class:`DenseCache` keeps
the parts of the last mask object, as the flex engine keeps its block mask.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from attnlab._eager import compiling, unreadable
from attnlab.engines._memo import LastMask
from attnlab.engines.base import AttentionRequest

__all__ = ["DenseCache", "Parts"]

KEPT_MAX = 1 << 24  # elements of a dense mask kept between calls (16 MiB of bool)

Parts = tuple[Tensor, Tensor | None, Tensor | None]  # (allowed, empty rows, single keys)


class DenseCache:
    """The dense parts of the last mask object, for its sizes, device, the call's flags
    and the versions of the tensors it holds (an in-place change of one, or a new mask
    object, builds again). It holds one dense mask (``(Bm, Hm, Lq or 1, Lk)`` bool, at
    most :data:`KEPT_MAX` bytes, on the call's device; a larger one, 1 GiB at 32768
    tokens, is built per call rather than held after it) and its rows per engine
    instance, until the next mask replaces it; no mask is kept alive. The parts are read
    only downstream (never changed in place) and carry no autograd history (bool and
    index tensors). Not kept while compiling, exporting, under vmap or on the meta device.

    Example:
        >>> from attnlab import masks
        >>> q = torch.randn(1, 1, 4, 8)
        >>> req = AttentionRequest(q, q, q, masks.causal(), None, 1.0, "dot", "softmax", 0.0,
        ...                        False, False)
        >>> cache, built = DenseCache(), []
        >>> def build(r):
        ...     built.append(1)
        ...     return r.mask.dense(4, 4), None, None
        >>> a, b = cache.get(req, build), cache.get(req, build)
        >>> a is b, len(built)
        (True, 1)
    """

    def __init__(self) -> None:
        """Empty; a weak reference to the mask only (:class:`LastMask`)."""
        self._last: LastMask[Parts] = LastMask(keep=_small)

    def get(self, req: AttentionRequest, build: Callable[[AttentionRequest], Parts]) -> Parts:
        """``build(req)``, made again only when the mask, its tensors or the call differ
        (the versions of its tensors read after the build: a build may keep a device
        copy in the mask)."""
        mask = req.mask
        if mask is None or unreadable(req.q) or compiling():
            return build(req)
        return self._last.get(mask, _key(req), lambda: build(req))


def _small(parts: Parts) -> bool:
    """Whether ``parts``' dense mask is small enough to keep (:data:`KEPT_MAX`)."""
    return parts[0].numel() <= KEPT_MAX


def _key(req: AttentionRequest) -> tuple:
    """What the parts depend on besides the mask object and its tensors: sizes, device,
    the flags that decide the one-key rows and inference mode (a tensor made there cannot
    be saved for a later call's backward). The versions of the mask's tensors follow
    (:class:`LastMask`; an inference tensor has none: large or off the CPU it matches
    nothing, so it is built each call)."""
    flags = (req.needs_grad, req.dropout_p > 0, torch.is_inference_mode_enabled())
    return (req.lq, req.lk, req.batch, req.heads, req.q.device, *flags)
