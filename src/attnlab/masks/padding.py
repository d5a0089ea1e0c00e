"""Padding: per batch item, keys past its length are hidden and padded query rows see
nothing."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from attnlab._devices import _Stamp, _stamp
from attnlab._eager import compiling, unreadable
from attnlab._grid import Grid
from attnlab.masks._args import check_nonnegative, int_tensor
from attnlab.masks._copies import DeviceCopies
from attnlab.masks.base import Mask
from attnlab.masks.layout import Device, RowBounds, on

__all__ = ["Padding", "padding"]


class Padding(Mask):
    """Keys ``k >= key_lengths[b]`` hidden; rows ``i >= query_lengths[b]`` see nothing.

    Build with :func:`padding`. Engines that need only validity (approximate engines,
    Linformer) read it through :meth:`lengths`.

    Example:
        >>> m = padding([2, 3], query_lengths=[1, 3])
        >>> m.batch_size, m.natural_length
        (2, 3)
        >>> m.dense(3, 3)[0, 0].int().tolist()  # item 0: 2 keys, only its first row
        [[1, 1, 0], [0, 0, 0], [0, 0, 0]]
    """

    def __init__(self, key_lengths: object, query_lengths: object | None) -> None:
        self.kl = int_tensor("key_lengths", key_lengths, (1,))
        self.ql = (
            None if query_lengths is None else int_tensor("query_lengths", query_lengths, (1,))
        )
        if self.ql is not None and self.ql.shape != self.kl.shape:
            raise ValueError(
                f"query_lengths has shape {tuple(self.ql.shape)} but key_lengths "
                f"has {tuple(self.kl.shape)}; give one length per batch item"
            )
        # the largest lengths, read with the check (vmapped or exported: taken as given)
        # and kept as host ints, so that each call's check() compares ints: no read of a
        # device's lengths per call
        self._longest = _Longest()
        for name, t in (("key_lengths", self.kl), ("query_lengths", self.ql)):
            top = check_nonnegative(name, t)
            if t is not None and top is not None:
                self._longest.put(name, t, top)
        self._copies = DeviceCopies()  # the lengths on the devices evaluated on

    @property
    def batch_size(self) -> int:
        return self.kl.shape[0]

    @property
    def natural_length(self) -> int | None:
        if not self.kl.numel():
            return None
        top = self._most("key_lengths", self.kl)  # (the longest the check keeps)
        return int(self.kl.max()) if top is None else top

    def lengths(self) -> tuple[Tensor, Tensor | None]:
        return self.kl, self.ql

    def check(self, *, batch: int, heads: int, lq: int, lk: int) -> None:
        if batch != self.batch_size:
            raise ValueError(
                f"mask=padding(...) holds {self.batch_size} lengths but the batch "
                f"size is {batch}; give one length per batch item"
            )
        for name, t, n, what in (
            ("key_lengths", self.kl, lk, "Lk"),
            ("query_lengths", self.ql, lq, "Lq"),
        ):
            top = None if t is None else self._most(name, t)
            if t is not None and top is not None and top > n:
                seen = t.tolist() if t.numel() <= 8 else f"up to {top}"  # (an error: a read)
                raise ValueError(
                    f"mask=padding(...) has {name}={seen} but the call has {what}={n}; "
                    f"expected {name} <= {what} (each a count of the call's "
                    f"{'keys' if what == 'Lk' else 'queries'})"
                )

    def _most(self, name: str, t: Tensor) -> int | None:
        """The largest of the lengths ``t`` as an int: the one kept while ``t`` is
        unchanged, else read again and kept, on a GPU too (one read, a sync, per change
        of the lengths, as at construction; lengths changed in place there were taken
        unchecked); None where no read can be made (vmapped, exported, the meta device,
        a CUDA graph capturing), for an inference tensor off the CPU (no version: it
        would be read on every call) and under ``torch.compile`` (whose trace would break
        at the stamp): that call is not checked."""
        if compiling():
            return None
        kept = self._longest.get(name, t)
        if kept is not None:
            return kept
        if unreadable(t) or (t.is_cuda and torch.cuda.is_current_stream_capturing()):
            return None
        if not t.is_cpu and _stamp(t) is None:  # an inference tensor: nothing to keep a
            return None  # read by, so a read (a sync) per call; unchecked, as before
        top = int(t.max()) if t.numel() else 0
        self._longest.put(name, t, top)
        return top

    def evaluate(self, grid: Grid) -> Tensor:
        kl = self._copies.on("kl", self.kl, grid.k.device)[grid.b]  # (B, 1, 1, 1)
        ok = grid.k < kl
        if self.ql is not None:
            ok = ok & (grid.rows < self._copies.on("ql", self.ql, grid.k.device)[grid.b])
        return ok

    def row_bounds(self, lq: int, lk: int, batch: int = 1, device: Device = None) -> RowBounds:
        device = on(device)  # not the lengths' own device: an & meets the others there
        hi = (self._copies.on("kl", self.kl, device) - 1).view(-1, 1).expand(-1, lq)
        if self.ql is not None:
            rows = torch.arange(lq, device=device).view(1, -1)
            hi = torch.where(rows < self._copies.on("ql", self.ql, device).view(-1, 1), hi, -1)
        return RowBounds(torch.zeros_like(hi), hi, exact=True)

    def spec(self) -> str:
        q = "" if self.ql is None else f", query_lengths={self.ql.tolist()}"
        return f"padding(key_lengths={self.kl.tolist()}{q})"


class _Longest:
    """The largest of each of a mask's lengths tensors, as read: kept per name with the
    tensor read and its stamp then (version, storage, dtype), the answer only for that
    same tensor, unchanged. The stamp alone named no tensor: a view of the same buffer at
    the same address and version (``buf[0]`` after ``buf[:, 0]``), or a new tensor where
    a freed one lay (a CUDA copy in the caching allocator), took the other's value.

    Not a tensor, dict or mask, so flex's ``moved`` passes it by: the shallow copy it
    makes with the lengths on the device shares it and cannot answer with the original's
    value, nor the original with the copy's; a deep copy or a pickle starts empty.

    Example:
        >>> buf = torch.tensor([[2, 9], [3, 9]])
        >>> lengths, kept = buf[:, 0], _Longest()
        >>> kept.put("key_lengths", lengths, 3)
        >>> kept.get("key_lengths", lengths), kept.get("key_lengths", buf[0])
        (3, None)
    """

    __slots__ = ("_kept",)

    def __init__(self) -> None:
        self._kept: dict[str, tuple[Tensor, _Stamp, int]] = {}

    def get(self, name: str, t: Tensor) -> int | None:
        """The value kept for ``name`` where it was read from ``t`` as it is now."""
        kept, stamp = self._kept.get(name), _stamp(t)  # (read once: threads may put)
        if kept is None or kept[0] is not t or stamp is None or kept[1] != stamp:
            return None
        return kept[2]

    def put(self, name: str, t: Tensor, top: int) -> None:
        """Keep ``top``, the largest value of ``t`` read now, for ``name``."""
        stamp = _stamp(t)
        if stamp is not None:  # (no storage of its own: a functorch wrapper)
            self._kept[name] = (t, stamp, top)

    def __reduce__(self) -> tuple[Any, ...]:
        return (_Longest, ())

    def __deepcopy__(self, memo: dict[int, Any]) -> _Longest:
        return _Longest()


def padding(
    key_lengths: Sequence[int] | Tensor, query_lengths: Sequence[int] | Tensor | None = None
) -> Mask:
    """Padding: in batch item ``b`` keys ``k >= key_lengths[b]`` are hidden; rows
    ``i >= query_lengths[b]`` (query padding) see nothing and give output 0.

    Example:
        >>> padding([2, 3]).dense(1, 3)[:, 0, 0].int().tolist()
        [[1, 1, 0], [1, 1, 1]]
    """
    return Padding(key_lengths, query_lengths)
