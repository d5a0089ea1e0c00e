"""A bias given as a dense float tensor (:func:`tensor`), and :func:`as_bias`, which turns a
user's ``bias=`` argument (a :class:`~attnlab.bias.Bias`, a float tensor or None) into a bias."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from attnlab._devices import DeviceCopies
from attnlab._grid import Grid, moved
from attnlab.bias.base import Bias

__all__ = ["TensorBias", "as_bias", "tensor"]

_DIM_NAMES = ("batch", "heads", "lq", "lk")


class TensorBias(Bias):
    """A bias given as a dense float tensor broadcastable to ``(B, H, Lq, Lk)``.

    Rank 2 is ``(Lq, Lk)``, rank 3 ``(H, Lq, Lk)`` and rank 4 ``(B, H, Lq, Lk)``; any size-1
    dimension is broadcast. Evaluating on a grid gathers just the grid's block, and gradients
    flow back to the tensor if it requires grad. An ``nn.Parameter`` is registered as a
    parameter, any other tensor as a non-persistent buffer. Build with :func:`tensor`.
    Evaluated on another device, the tensor's copy there is kept while it is the same,
    unchanged tensor (not when it requires grad: each call copies it, with its graph).

    Example:
        >>> b = tensor(torch.arange(6.0).view(2, 3))
        >>> b(Grid.tile(torch.tensor([1]), torch.tensor([0, 2]), lq=2, lk=3))
        tensor([[[[3., 5.]]]])
    """

    _factory = "tensor"
    values: Tensor

    def __init__(self, t: Tensor) -> None:
        super().__init__()
        if not isinstance(t, Tensor):
            raise TypeError(f"t must be a float tensor, got {type(t).__name__}")
        if t.dtype == torch.bool:
            raise TypeError(
                "t is a boolean tensor; boolean tensors are masks (pass them as mask=), "
                "a bias must be a float tensor"
            )
        if not t.is_floating_point():
            raise TypeError(f"t must be a float tensor, got dtype {t.dtype}; convert it first")
        if t.dim() not in (2, 3, 4):
            raise ValueError(
                f"t must have rank 2 (Lq, Lk), 3 (H, Lq, Lk) or 4 (B, H, Lq, Lk), "
                f"got rank {t.dim()} with shape {tuple(t.shape)}"
            )
        if isinstance(t, nn.Parameter):
            self.values = t
        else:
            self.register_buffer("values", t, persistent=False)
        self._device_copies = DeviceCopies()  # the values on the devices evaluated on

    def _as4d(self) -> Tensor:
        return _rank4(self.values)

    @property
    def full_shape(self) -> tuple[int, int, int, int]:
        """The tensor's shape padded on the left with 1s to rank 4."""
        b, h, q, k = self._as4d().shape
        return (b, h, q, k)

    @property
    def per_batch(self) -> bool:
        return self.full_shape[0] != 1  # 0: the bias of an empty batch

    @property
    def per_head(self) -> bool:
        return self.full_shape[1] != 1

    def check(self, *, batch: int, heads: int, lq: int, lk: int) -> None:
        want = (batch, heads, lq, lk)
        for name, have, size in zip(_DIM_NAMES, self.full_shape, want, strict=True):
            if have not in (1, size):
                expected = "1" if size == 1 else f"1 or {size}"
                raise ValueError(
                    f"bias={self!r} does not fit scores of shape (batch={batch}, heads={heads}, "
                    f"lq={lq}, lk={lk}): its {name} size is {have}, expected {expected}"
                )

    def magnitude_bound(self, lq: int, lk: int) -> float | None:
        """The tensor's largest ``|value|`` (NaN if it holds one)."""
        t = self.values.detach()
        return float(t.abs().max()) if t.numel() else 0.0

    def forward(self, grid: Grid) -> Tensor:
        copies = getattr(self, "_device_copies", None)  # (None: pickled before it kept any)
        # the values' kept copy (keyed by the values, not a view made per call), as rank 4
        t = _rank4(moved(self.values, grid.k.device, "bias tensor", copies))
        if not t.numel():  # an empty batch or sequence's bias: its 0s match the grid's
            return t
        # size-1 dims broadcast; the others gather the grid's slice, on the grid's device
        return grid.gather(t)  # (Bg or 1, Hg or 1, Tq, Tk)

    def extra_repr(self) -> str:
        return f"shape={tuple(self.values.shape)}"


def tensor(t: Tensor) -> TensorBias:
    """A dense bias from a float tensor shaped ``(Lq, Lk)``, ``(H, Lq, Lk)`` or ``(B, H, Lq, Lk)``.

    Example:
        >>> tensor(torch.zeros(8, 4, 4)).per_head
        True
    """
    return TensorBias(t)


def as_bias(x: Bias | Tensor | None) -> Bias | None:
    """Turn a user's ``bias=`` argument into a :class:`Bias` (or ``None``).

    A float tensor becomes :func:`tensor` of it; a :class:`Bias` or ``None`` passes through.

    Raises:
        TypeError: for a boolean tensor (that is a mask) or any other type.

    Example:
        >>> as_bias(torch.zeros(2, 2))
        tensor(shape=(2, 2))
    """
    if x is None or isinstance(x, Bias):
        return x
    if isinstance(x, Tensor):
        if x.dtype == torch.bool:
            raise TypeError(
                "bias= got a boolean tensor; boolean tensors are masks: pass them as mask= "
                "(a bias must be a float tensor or a Bias)"
            )
        if not x.is_floating_point():
            raise TypeError(
                f"bias= got a tensor of dtype {x.dtype}; expected a float tensor, a Bias or None"
            )
        if x.dim() not in (2, 3, 4):
            raise ValueError(
                f"bias= got a tensor of rank {x.dim()} with shape {tuple(x.shape)}; expected "
                f"rank 2 (Lq, Lk), 3 (H, Lq, Lk) or 4 (B, H, Lq, Lk)"
            )
        return tensor(x)
    raise TypeError(
        f"bias= got {type(x).__name__}; expected a Bias (e.g. alibi(num_heads)), "
        f"a float tensor or None"
    )


def _rank4(t: Tensor) -> Tensor:
    """``t`` viewed with 1s on the left to rank 4: ``(Bt, Ht, Lqt, Lkt)``."""
    return t.view((1,) * (4 - t.dim()) + tuple(t.shape))
