"""How much of a mask is visible, counted over every batch item and head it varies by
(private to ``masks``; :meth:`Mask.visible_fraction` is the public door)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from attnlab._grid import Grid
from attnlab._validate import nonnegative_int

if TYPE_CHECKING:
    from attnlab.masks.base import Mask


def own_heads(mask: Mask) -> int | None:
    """The head count a mask was built with: a tensor mask's ``H``, the largest of a
    combination's parts; 1 for a mask the same in every head, None for a function of the
    head (no count of its own)."""
    from attnlab.masks.tensor import TensorMask

    if not mask.per_head:
        return 1
    if isinstance(mask, TensorMask):
        return int(mask.t.shape[1])
    parts = getattr(mask, "parts", None) or [getattr(mask, "inner", None)]
    counts = [own_heads(p) for p in parts if p is not None]
    return None if not counts or None in counts else max(c for c in counts if c is not None)


def visible_fraction(mask: Mask, lq: int, lk: int, batch: int | None, heads: int | None) -> float:
    """Fraction of allowed ``(query, key)`` pairs over ``(Bm, Hm, lq, lk)``, in row chunks
    of 512 (so a long sequence never builds ``lq x lk`` at once)."""
    lq, lk = nonnegative_int("lq", lq), nonnegative_int("lk", lk)
    batch = None if batch is None else nonnegative_int("batch", batch)
    if heads is None:
        heads = own_heads(mask)
        if heads is None:
            raise ValueError(
                f"heads: mask {mask.spec()} varies by head and has no head count of its own; "
                "pass heads=H"
            )
    batch, heads, lq, lk = mask._check_sizes(batch, heads, lq, lk)  # (dense()'s ValueError)
    bm, hm = mask._sizes(batch, heads)
    total, allowed = 0, 0
    for start in range(0, lq, 512):
        rows = torch.arange(start, min(lq, start + 512))
        grid = Grid.tile(rows, torch.arange(lk), lq=lq, lk=lk, batch=bm, heads=hm)
        vals = torch.broadcast_to(mask.evaluate(grid), (bm, hm, len(rows), lk))
        allowed += int(vals.sum())
        total += vals.numel()
    return allowed / total if total else 0.0
