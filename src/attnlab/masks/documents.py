"""Packed documents: a query sees only keys of its own document."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from attnlab._grid import Grid
from attnlab.masks._args import int_tensor
from attnlab.masks._copies import DeviceCopies
from attnlab.masks.base import Mask
from attnlab.masks.layout import Device, RowBounds, on

__all__ = ["Documents", "Groups", "documents", "groups"]


class Documents(Mask):
    """``doc_ids[p] == doc_ids[k]``. Build with :func:`documents`.

    When every document is one contiguous run, each row's keys are that run: the mask
    reports it as an exact :meth:`row_bounds` interval.

    Example:
        >>> m = documents([0, 0, 1, 1])
        >>> m.spec(), m.row_bounds(4, 4).lo.tolist()  # each row's first key: its run's
        ('documents(2 documents, length 4)', [[0, 0, 2, 2]])
        >>> documents([0, 1, 0]).row_bounds(3, 3) is None  # document 0 is split
        True
    """

    #: whether a position with a negative id is in no document (:class:`Groups`)
    _outside: bool = False
    _names = ("documents", "doc_ids", "document")  # the function, its argument, a part

    def __init__(self, doc_ids: object) -> None:
        ids = int_tensor(self._names[1], doc_ids, (1, 2))
        self.ids = ids if ids.dim() == 2 else ids.unsqueeze(0)  # (Bd, L)
        self._runs = _Runs(None, None)
        self._copies = DeviceCopies()  # the ids on the devices evaluated on

    def _bounds(self) -> tuple[Tensor, Tensor] | None:
        """Each position's document run, found when a call asks (reading the ids' values
        then, not when the mask is made, lets torch.compile trace a model that makes this
        mask), and found again when the ids changed in place (an engine replans then; kept
        from the mask's making, the runs went stale: off by 0.91)."""
        ids = self.ids
        key = None if ids.is_inference() else (ids.data_ptr(), ids._version)
        if key is None or self._runs.key != key:
            self._runs = _Runs(key, _run_bounds(ids, ids < 0 if self._outside else None))
        return self._runs.bounds

    @property
    def batch_size(self) -> int | None:
        return self.ids.shape[0] if self.ids.shape[0] != 1 else None  # 0: an empty batch

    @property
    def natural_length(self) -> int:
        return self.ids.shape[1]

    def check(self, *, batch: int, heads: int, lq: int, lk: int) -> None:
        n = self.ids.shape[1]
        if lk != n or lq > lk:
            raise ValueError(
                f"mask={self._names[0]}(...) has {self._names[1]} of length {n} but the call has "
                f"Lq={lq}, Lk={lk}; expected Lk == {n} and Lq <= Lk"
            )
        if self.batch_size is not None and batch != self.batch_size:
            raise ValueError(
                f"mask={self._names[0]}(...) has {self._names[1]} for {self.batch_size} batch "
                f"items but the batch size is {batch}"
            )

    def evaluate(self, grid: Grid) -> Tensor:
        ids = self._copies.on("ids", self.ids, grid.k.device)
        b = grid.b if ids.shape[0] != 1 else torch.zeros_like(grid.b)
        mine = ids[b, grid.q.clamp(min=0)]
        same = mine == ids[b, grid.k]
        return same & (mine >= 0) if self._outside else same

    def row_bounds(
        self, lq: int, lk: int, batch: int = 1, device: Device = None
    ) -> RowBounds | None:
        runs = self._bounds()
        if runs is None:
            return None
        where = on(device)
        lo, hi = (  # (Bd, Lq): kept on the host, copied once to each device asked for
            self._copies.on(name, t, where)[:, lk - lq :]
            for name, t in zip(("starts", "ends"), runs, strict=True)
        )
        return RowBounds(lo, hi, exact=True)

    def spec(self) -> str:
        """``documents(3 documents, length 16)``; for ``(B, L)`` ids each row's count
        (``2 rows of 1-4 documents``: row 0's alone was reported as all rows')."""
        ids = self.ids.clamp(min=-1) if self._outside else self.ids  # (Bd, L)
        ranked = ids.sort(dim=1).values
        counts = (ranked[:, 1:] != ranked[:, :-1]).sum(1) + (ranked.shape[1] > 0)  # (Bd,)
        if self._outside:  # the negative ids name no group
            counts = counts - (ranked[:, :1] < 0).flatten().long()
        lo, hi = (int(c) for c in counts.aminmax()) if counts.numel() else (0, 0)
        noun = self._names[2]
        n = f"{lo} {noun}{'' if hi == 1 else 's'}" if lo == hi else f"{lo}-{hi} {noun}s"
        rows = f"{len(counts)} rows of " if len(counts) > 1 else ""
        return f"{self._names[0]}({rows}{n}, length {self.ids.shape[1]})"


class Groups(Documents):
    """``group_ids[p] == group_ids[k] >= 0``: a query in a group sees the keys of its group,
    a query with a negative id (in no group) sees none. Build with :func:`groups`.

    It is what transformers' ``blockwise_overlay`` adds to causal attention in Gemma 3,
    PaliGemma and other vision-language models (an image's tokens see each other):
    ``causal() | groups(ids)``. When every group is one contiguous run, each row's keys
    are its run (a row in no group: an empty interval, ``lo > hi``), exact, so the ``|``
    with causal keeps one exact interval per row.

    Example:
        >>> m = groups([-1, 0, 0, -1])
        >>> m.spec(), m.row_bounds(4, 4).hi.tolist()  # rows 0 and 3 see no key
        ('groups(1 group, length 4)', [[-1, 2, 2, -1]])
        >>> from attnlab.masks import causal
        >>> (causal() | m).row_bounds(4, 4).hi.tolist()  # each row one interval: exact
        [[0, 2, 2, 3]]
    """

    _outside = True
    _names = ("groups", "group_ids", "group")


@dataclass(frozen=True)
class _Runs:
    """The runs found for the ids at ``key`` (their storage and version): derived from
    the ids, so kept out of what engines key their caches on (a mask's tensors, its
    tuples and lists), which would otherwise change once at the first call."""

    key: object
    bounds: tuple[Tensor, Tensor] | None


def _run_bounds(ids: Tensor, outside: Tensor | None = None) -> tuple[Tensor, Tensor] | None:
    """Per-position ``(start, end)`` of its document ``(Bd, L)``, if every document is one
    run, on the host: the check and the runs come back from ids on a device in one read
    (it was two per row, a run count and ``unique``, and the runs one per call after).
    ``outside (Bd, L)``: positions in no document, each given ``(0, -1)``, an empty run."""
    if ids.shape[1] == 0:
        return ids.cpu(), ids.cpu()
    pos = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
    if outside is not None:  # each its own document, so they split no other
        ids = torch.where(outside, -1 - pos, ids)
    change = torch.nn.functional.pad(ids[:, 1:] != ids[:, :-1], (1, 0), value=True)
    run = change.long().cumsum(1) - 1  # (Bd, L) run index of each position
    ranked = ids.sort(dim=1).values  # (Bd, L)
    distinct = (ranked[:, 1:] != ranked[:, :-1]).sum(1) + 1  # (Bd,) documents per row
    one_run = (run[:, -1] + 1 == distinct).all()  # each document one run
    start = torch.zeros_like(ids).scatter_reduce(1, run, pos, "amin", include_self=False)
    end = torch.zeros_like(ids).scatter_reduce(1, run, pos, "amax", include_self=False)
    start, end = start.gather(1, run), end.gather(1, run)
    if outside is not None:
        start, end = start.masked_fill(outside, 0), end.masked_fill(outside, -1)
    parts = (one_run.to(ids.dtype)[None], start.flatten(), end.flatten())
    read = torch.cat(parts).cpu()  # the one read
    if not read[0]:
        return None
    return read[1 : 1 + ids.numel()].view(ids.shape), read[1 + ids.numel() :].view(ids.shape)


def documents(doc_ids: Sequence[int] | Tensor) -> Mask:
    """Packed documents: a query sees only keys with the same document id.

    Args:
        doc_ids: ``(L,)`` or ``(B, L)`` integer ids, ``L == Lk``.

    Example:
        >>> documents([0, 0, 1]).dense(3, 3)[0, 0].int().tolist()
        [[1, 1, 0], [1, 1, 0], [0, 0, 1]]
    """
    return Documents(doc_ids)


def groups(group_ids: Sequence[int] | Tensor) -> Mask:
    """Groups: a query sees only keys with its own group id; a query whose id is negative
    (in no group) sees none (OR it with another mask, e.g. ``causal() | groups(ids)``).

    Args:
        group_ids: ``(L,)`` or ``(B, L)`` integer ids, ``L == Lk``; negative: no group.

    Example:
        >>> groups([-1, 0, 0]).dense(3, 3)[0, 0].int().tolist()
        [[0, 0, 0], [0, 1, 1], [0, 1, 1]]
    """
    return Groups(group_ids)
