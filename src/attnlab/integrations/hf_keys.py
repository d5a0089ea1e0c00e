"""transformers' 2-D padding masks as attnlab masks (private to the hf integration; its
names are :mod:`attnlab.integrations.hf_masks`'). What a call needs of the padding, each
row's length and its run of valid keys, comes back from the device in one read when the
mask is made; row bounds asked for later read nothing back (on a GPU, one sync per layer
was one per layer and decoding step).
"""

from __future__ import annotations

import torch
from torch import Tensor

from attnlab._devices import DeviceCopies
from attnlab._grid import Grid
from attnlab.masks import Mask, RowBounds, padding
from attnlab.masks.layout import on

__all__ = ["KeyValid", "padding_mask"]


class KeyValid(Mask):
    """Keys ``j`` with ``valid[b, j]`` may be attended: a 2-D padding mask, left or right.

    Rows of ``valid`` whose valid keys are one contiguous run report that run as an exact
    :meth:`row_bounds` interval (left padding, right padding, both). ``run``: True finds
    the runs (one read from ``valid``'s device), None: no exact interval, else each row's
    first and last valid key ``(B,)``. ``lengths``: each row's valid keys ``(B,)`` on the
    host where known (:meth:`padded_rows` reads nothing then).

    Example:
        >>> m = KeyValid(torch.tensor([[False, True, True], [True, True, False]]))
        >>> m.dense(1, 3, batch=2)[:, 0, 0].int().tolist()
        [[0, 1, 1], [1, 1, 0]]
        >>> m.row_bounds(1, 3, 2).lo.tolist(), m.padded_rows().tolist()
        ([[1], [0]], [True, True])
    """

    def __init__(
        self,
        valid: Tensor,
        run: tuple[Tensor, Tensor] | bool | None = True,
        lengths: Tensor | None = None,
    ) -> None:
        if valid.dtype != torch.bool or valid.dim() != 2:
            raise TypeError(
                f"valid must be a bool tensor (B, Lk), got {valid.dtype} {tuple(valid.shape)}"
            )
        self.valid = valid
        if run is True:
            run, lengths = _host_runs(valid)
        self._run = run or None  # (first, last) (B,), or None: no run
        self._lengths = lengths  # (B,) on the host, or None: not read
        self._run_copies = DeviceCopies()  # the run on the devices asked for

    @property
    def batch_size(self) -> int:
        return self.valid.shape[0]

    @property
    def natural_length(self) -> int:
        return self.valid.shape[1]

    def check(self, *, batch: int, heads: int, lq: int, lk: int) -> None:
        if (batch, lk) != tuple(self.valid.shape):
            raise ValueError(
                f"KeyValid mask holds valid keys of shape {tuple(self.valid.shape)} but the "
                f"call has (B, Lk) = {(batch, lk)}"
            )

    def evaluate(self, grid: Grid) -> Tensor:
        valid = self.valid.to(grid.k.device)
        return valid[grid.b, grid.k]  # (B, 1, 1, Tk)

    def row_bounds(
        self, lq: int, lk: int, batch: int = 1, device: torch.device | str | None = None
    ) -> RowBounds | None:
        if self._run is None:
            return None
        lo, hi = (  # (B, Lq): the host's run, copied once to each device asked for
            self._run_copies.on(name, t, on(device)).view(-1, 1).expand(-1, lq)
            for name, t in zip(("first", "last"), self._run, strict=True)
        )
        return RowBounds(lo, hi, exact=True)

    def padded_rows(self) -> Tensor:
        """Which rows ``(B,)`` hide a key: on the host where the lengths were read (the
        mask was made by :func:`padding_mask` or found its runs), else where ``valid`` is."""
        if self._lengths is not None:
            return self._lengths < self.valid.shape[1]
        return ~self.valid.all(-1)

    def spec(self) -> str:
        n = self._lengths.sum() if self._lengths is not None else self.valid.sum()
        return f"key_valid({int(n)} of {self.valid.numel()} keys)"


def _run_parts(valid: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Each row's first and last valid key ``(B,)``, and whether each row is one run (0-d)."""
    idx = torch.arange(valid.shape[1], device=valid.device).expand_as(valid)
    first = torch.where(valid, idx, valid.shape[1]).amin(1)
    last = torch.where(valid, idx, -1).amax(1)
    return first, last, ((last - first + 1).clamp(min=0) == valid.sum(1)).all()


def _host_runs(valid: Tensor) -> tuple[tuple[Tensor, Tensor] | None, Tensor]:
    """``(first, last)`` valid key per row ``(B,)`` when each row's valid keys are one run
    (else None), and each row's count of valid keys ``(B,)``: on the host, in one read."""
    (run,), lengths, first, last = _host_rows(valid, [])
    return ((first, last) if run else None), lengths


def _host_rows(valid: Tensor, flags: list[Tensor]) -> tuple[list[int], Tensor, Tensor, Tensor]:
    """``flags`` (0-d each) and whether each row of ``valid`` is one run, then each row's
    count of valid keys, first and last valid key ``(B,)``: on the host, in one read."""
    first, last, one_run = _run_parts(valid)
    n, b = len(flags) + 1, valid.shape[0]
    read = torch.cat([torch.stack([*flags, one_run]).long(), valid.sum(1), first, last]).tolist()
    lengths, first_h, last_h = (
        torch.tensor(read[n + i * b : n + (i + 1) * b], dtype=torch.long) for i in range(3)
    )
    return read[:n], lengths, first_h, last_h


def padding_mask(valid: Tensor) -> Mask | None:
    """The attnlab mask of a 2-D key validity tensor ``(B, Lk)``: None when all are valid,
    :func:`~attnlab.masks.padding` for right padding (engines read its lengths), else
    :class:`KeyValid`. Its checks, lengths and runs come back from the device in one read.

    Example:
        >>> padding_mask(torch.tensor([[True, True, False]])).spec()
        'padding(key_lengths=[2])'
        >>> padding_mask(torch.tensor([[False, True, True]])).row_bounds(1, 3).lo.tolist()
        [[1]]
    """
    lk = valid.shape[1]
    lengths = valid.sum(1)  # (B,)
    prefix = torch.arange(lk, device=valid.device) < lengths.view(-1, 1)  # (B, Lk)
    flags = [(lengths == lk).all(), (prefix == valid).all()]
    (full, right, run), counts, first, last = _host_rows(valid, flags)  # the one read
    if full:
        return None
    if right:
        return padding(counts.to(lengths.dtype))  # (B,) on the host
    return KeyValid(valid, (first, last) if run else None, counts)
