"""A dense bool mask given as a tensor, and :func:`as_mask` for user arguments."""

from __future__ import annotations

import torch
from torch import Tensor

from attnlab._grid import Grid, moved
from attnlab.masks._args import Device
from attnlab.masks._copies import DeviceCopies
from attnlab.masks.base import Mask

__all__ = ["TensorMask", "as_mask", "tensor"]


class TensorMask(Mask):
    """A bool tensor broadcastable to ``(B, H, Lq, Lk)``. Build with :func:`tensor`.

    Example:
        >>> m = tensor(torch.tensor([[True, False], [True, True]]))
        >>> m.spec(), m.dense(2, 2, batch=3).shape  # a view: no batch axis of its own
        ('tensor(shape=(1, 1, 2, 2))', torch.Size([1, 1, 2, 2]))
        >>> tensor(torch.ones(2, 2))
        Traceback (most recent call last):
        ...
        TypeError: mask tensor must be a bool tensor (True = may attend), got torch.float32
    """

    def __init__(self, t: Tensor) -> None:
        if not isinstance(t, Tensor) or t.dtype != torch.bool:
            raise TypeError(
                f"mask tensor must be a bool tensor (True = may attend), got "
                f"{getattr(t, 'dtype', type(t).__name__)}"
            )
        if t.dim() not in (2, 3, 4):
            raise ValueError(
                f"mask tensor must have rank 2 (Lq, Lk), 3 (H, Lq, Lk) or "
                f"4 (B, H, Lq, Lk), got shape {tuple(t.shape)}"
            )
        self.t = t.view((1,) * (4 - t.dim()) + tuple(t.shape))
        self.per_head = self.t.shape[1] > 1
        self._copies = DeviceCopies()  # the tensor on the devices evaluated on

    def _on(self, device: Device) -> Tensor:
        """The tensor on ``device``: a copy kept while it is the same, unchanged tensor
        (one host-device copy per device, not one per call)."""
        copies = getattr(self, "_copies", None)  # (None: pickled before it kept copies)
        return moved(self.t, device, "mask tensor", copies)

    @property
    def batch_size(self) -> int | None:
        return self.t.shape[0] if self.t.shape[0] != 1 else None  # 0: an empty batch

    @property
    def natural_length(self) -> int:
        return self.t.shape[3]

    def check(self, *, batch: int, heads: int, lq: int, lk: int) -> None:
        want = (batch, heads, lq, lk)
        if any(s not in (1, w) for s, w in zip(self.t.shape, want, strict=True)):
            raise ValueError(
                f"mask tensor of shape {tuple(self.t.shape)} does not broadcast to "
                f"(B, H, Lq, Lk) = {want}"
            )

    def evaluate(self, grid: Grid) -> Tensor:
        return grid.gather(self._on(grid.k.device))

    def dense(
        self,
        lq: int,
        lk: int,
        *,
        batch: int | None = None,
        heads: int = 1,
        device: Device = None,
    ) -> Tensor:
        """The tensor itself broadcast to ``(Bm, Hm, lq, lk)``: on the whole grid the
        gather of :meth:`evaluate` is the identity, so this is a view (size-1 dims keep
        stride 0), not a copy."""
        batch, heads, lq, lk = self._check_sizes(batch, heads, lq, lk)  # (heads=0 was taken)
        bm, hm = self._sizes(batch, heads)
        return torch.broadcast_to(self._on(device), (bm, hm, lq, lk))

    def spec(self) -> str:
        return f"tensor(shape={tuple(self.t.shape)})"


def tensor(t: Tensor) -> Mask:
    """A dense bool mask ``(Lq, Lk)``, ``(H, Lq, Lk)`` or ``(B, H, Lq, Lk)``; True = attend.

    Example:
        >>> tensor(torch.tensor([[True, False]])).dense(1, 2)[0, 0].tolist()
        [[True, False]]
    """
    return TensorMask(t)


def as_mask(x: Mask | Tensor | None) -> Mask | None:
    """Accept a :class:`~attnlab.masks.Mask`, a bool tensor, or ``None``.

    Example:
        >>> as_mask(None) is None
        True
    """
    if x is None or isinstance(x, Mask):
        return x
    if isinstance(x, Tensor):
        if x.dtype != torch.bool:
            raise TypeError(
                f"mask= got a tensor of dtype {x.dtype}; masks are bool tensors "
                f"(True = may attend). Pass additive float tensors as bias="
            )
        return TensorMask(x)
    raise TypeError(
        f"mask= expects an attnlab.masks.Mask, a bool tensor or None, got {type(x).__name__}"
    )
