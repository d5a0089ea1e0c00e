"""Index grids: the coordinates at which masks and biases are evaluated.

Masks and biases in attnlab are functions of ``(batch, head, query position, key index)``.
A :class:`Grid` holds those four coordinates as broadcastable integer tensors, so the same
definition serves the dense reference (one grid over all of ``Lq x Lk``) and tiled engines
(one small grid per tile).

Query positions are aligned bottom-right: query row ``i`` sits at position
``i + Lk - Lq``. This is the frame of cached decoding, where the last query is the newest
token and the keys are the whole history.

Public as :class:`attnlab.masks.Grid` (and :class:`attnlab.bias.Grid`): a new mask's
``evaluate`` and a new bias's ``forward`` take one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from attnlab._devices import DeviceCopies


@dataclass(frozen=True)
class Grid:
    """Broadcastable coordinates of a block of the ``(B, H, Lq, Lk)`` score tensor.

    Attributes:
        b: batch indices, shape ``(Bg, 1, 1, 1)``.
        h: head indices, shape ``(1, Hg, 1, 1)``.
        q: query positions (row index + ``lk - lq``), shape ``(1, 1, Tq, 1)``.
        k: key indices, shape ``(1, 1, 1, Tk)``.
        lq: full query length of the attention call.
        lk: full key length of the attention call.
        dtype: the dtype the scores are computed in, when the caller knows it (a bias may
            compute in it: ALiBi's float64 slopes for float64 scores); None otherwise.

    Example:
        >>> g = Grid.full(lq=2, lk=3)
        >>> g.q.flatten().tolist(), g.k.flatten().tolist()
        ([1, 2], [0, 1, 2])
    """

    b: Tensor
    h: Tensor
    q: Tensor
    k: Tensor
    lq: int
    lk: int
    dtype: torch.dtype | None = None

    @property
    def offset(self) -> int:
        """The bottom-right alignment offset ``lk - lq`` (position = row + offset)."""
        return self.lk - self.lq

    @property
    def rows(self) -> Tensor:
        """Query row indices (positions minus the offset), shape ``(1, 1, Tq, 1)``."""
        return self.q - self.offset

    @staticmethod
    def full(
        lq: int,
        lk: int,
        *,
        batch: int = 1,
        heads: int = 1,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> Grid:
        """The grid of a whole ``(batch, heads, lq, lk)`` score tensor."""
        return Grid.tile(
            torch.arange(lq, device=device),
            torch.arange(lk, device=device),
            lq=lq,
            lk=lk,
            batch=batch,
            heads=heads,
            dtype=dtype,
        )

    @staticmethod
    def tile(
        rows: Tensor,
        keys: Tensor,
        *,
        lq: int,
        lk: int,
        batch: int = 1,
        heads: int = 1,
        dtype: torch.dtype | None = None,
    ) -> Grid:
        """The grid of the given query ``rows`` (not positions) and ``keys`` (1-D each)."""
        device = rows.device
        return Grid(
            b=torch.arange(batch, device=device).view(-1, 1, 1, 1),
            h=torch.arange(heads, device=device).view(1, -1, 1, 1),
            q=(rows + (lk - lq)).view(1, 1, -1, 1),
            k=keys.view(1, 1, 1, -1),
            lq=lq,
            lk=lk,
            dtype=dtype,
        )

    def restrict(self, *, batch: bool, heads: bool) -> Grid:
        """This grid with the batch and/or head axis collapsed to index 0 (size 1)."""
        return Grid(
            b=self.b if batch else self.b[:1],
            h=self.h if heads else self.h[:, :1],
            q=self.q,
            k=self.k,
            lq=self.lq,
            lk=self.lk,
            dtype=self.dtype,
        )

    def gather(self, t: Tensor) -> Tensor:
        """Index a dense ``(Bt, Ht, lq, lk)`` tensor at this grid (size-1 dims broadcast).

        Returns a tensor of shape ``(Bg or 1, Hg or 1, Tq or 1, Tk or 1)``, 0-dim where every
        dim of ``t`` broadcasts (as FlexAttention's ``score_mod`` takes it: made 4-D, its
        vmapped output grew four dims); gradients flow into ``t``.
        """
        # a broadcast dim is selected at 0, not indexed by a tensor: under FlexAttention's
        # nested vmap a tensor index made from one coordinate would be batched over that
        # coordinate; nor by a Python 0 among the tensor indices, which torch 2.9's dynamo
        # could not trace ("Could not extract specialized integer")
        coords = (self.b, self.h, self.rows, self.k)
        wide = [d for d in range(4) if t.shape[d] != 1]  # (an empty dim is indexed)
        for d in (3, 2, 1, 0):
            t = t if d in wide else t.select(d, 0)
        return t[tuple(coords[d] for d in wide)]

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """The broadcast shape ``(Bg, Hg, Tq, Tk)`` of a value evaluated on this grid."""
        return (self.b.shape[0], self.h.shape[1], self.q.shape[2], self.k.shape[3])


def moved(
    t: Tensor, device: torch.device | str | None, name: str, copies: DeviceCopies | None = None
) -> Tensor:
    """``t`` (a mask's or bias's own tensor) on ``device``, where it is read: the copy
    ``copies`` keeps there while ``t`` is unchanged, if given (else a new copy); a
    ValueError naming ``name`` for a ``t`` on the meta device read elsewhere (it holds
    shapes only: torch raised "Cannot copy out of meta tensor; no data!").

    Example:
        >>> moved(torch.ones(2, device="meta"), "cpu", "mask tensor")
        Traceback (most recent call last):
        ValueError: mask tensor is on the meta device, which holds no values to read on cpu; ...
    """
    to = None if device is None else torch.device(device)
    if t.is_meta and to is not None and to.type != "meta":
        raise ValueError(
            f"{name} is on the meta device, which holds no values to read on {to}; "
            "put it on q's device"
        )
    return t.to(to) if copies is None or to is None else copies.on(name, t, to)
