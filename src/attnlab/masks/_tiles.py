"""Tile runs: the non-empty tiles of a block layout as intervals along the key axis.

A run is a row ``(group, k0, k1, state)`` of an ``(R, 4)`` int64 tensor: key tiles
``k0 .. k1 - 1`` of query-block group ``group`` are all in ``state`` (partial or full).
Built from row bounds they take ``O(Bm Lq + R)`` time and memory, never an ``(nQ, nK)``
table (a window over a million queries kept 24 thousand of 67 million tiles, and building
all of them took 3-4 s and 1.7 GB).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import Tensor
from torch.nn.functional import pad

if TYPE_CHECKING:
    from attnlab.masks.layout import RowBounds

__all__ = ["runs_from_bounds", "runs_from_states", "states_from_runs"]


def runs_from_bounds(b: RowBounds, lq: int, lk: int, bq: int, bk: int, union: bool) -> Tensor:
    """Exact runs of the tiles that rows' intervals touch; group ``b * nQ + qb`` (or
    ``qb`` with ``union``, over every batch row).

    Each row touches key tiles ``lo // bk .. hi // bk``; per group these intervals are
    sorted and merged. A tile is full when every row of its group covers it: the tiles
    from the group's largest ``lo`` to its smallest ``hi``, inside one merged run, which
    is cut there into up to three runs.
    """
    nq, nk, bm = math.ceil(lq / bq), math.ceil(lk / bk), b.lo.shape[0]
    lo, hi = b.lo.clamp(min=0), b.hi.clamp(max=lk - 1)  # (Bm, Lq)
    group = (torch.arange(lq, device=lo.device) // bq).expand(bm, lq)
    if not union:
        group = group + nq * torch.arange(bm, device=lo.device)[:, None]
    some, width = lo <= hi, nk + 1  # rows that allow any key; keys of groups g * width
    start = group[some] * width + lo[some] // bk
    order = start.argsort()
    start = start[order]
    end = (group[some] * width + hi[some] // bk + 1)[order].cummax(0).values
    new = torch.ones_like(start, dtype=torch.bool)  # a merged run starts here
    new[1:] = start[1:] > end[:-1]  # (a new group starts past the last group's ends)
    first = new.nonzero().squeeze(1)
    last = torch.cat([first[1:] - 1, first.new_full((min(1, len(first)),), len(start) - 1)])
    g, k0 = start[first] // width, start[first] % width
    k1 = end[last] - g * width
    fa, fb = _full_tiles(b, lo, hi, lq, lk, bq, bk, union)
    a, c = fa[g], fb[g]
    pieces = torch.stack(
        [
            torch.stack([g, k0, torch.minimum(k1, a), torch.ones_like(g)], 1),
            torch.stack([g, torch.maximum(k0, a), torch.minimum(k1, c), torch.full_like(g, 2)], 1),
            torch.stack([g, torch.maximum(k0, c), k1, torch.ones_like(g)], 1),
        ],
        1,
    ).view(-1, 4)  # each merged run's pieces in key order
    return pieces[pieces[:, 1] < pieces[:, 2]]


def _full_tiles(
    b: RowBounds, lo: Tensor, hi: Tensor, lq: int, lk: int, bq: int, bk: int, union: bool
) -> tuple[Tensor, Tensor]:
    """Per group, the full key tiles ``fa .. fb - 1`` (``fa = fb = nK`` for none)."""
    nq, nk, bm = math.ceil(lq / bq), math.ceil(lk / bk), lo.shape[0]
    extra = nq * bq - lq  # explicit bm: a view(-1, 0, ...) fails at lq=0
    lo_max = pad(lo, (0, extra), value=0).view(bm, nq, bq).amax(-1)  # (Bm, nQ)
    hi_min = pad(hi, (0, extra), value=lk - 1).view(bm, nq, bq).amin(-1)
    if union:
        lo_max, hi_min = lo_max.amax(0), hi_min.amin(0)
    lo_max, hi_min = lo_max.flatten(), hi_min.flatten()
    fa = -(-lo_max // bk)  # the first tile that starts at or after every row's lo
    fb = torch.where(hi_min >= lk - 1, nk, (hi_min + 1) // bk)  # one past the last
    none = (fa >= fb) | (not b.exact)
    return torch.where(none, nk, fa), torch.where(none, nk, fb)


def runs_from_states(states: Tensor, union: bool) -> Tensor:
    """The runs of dense tile states ``(Bm, Hm, nQ, nK)``: equal neighbours in one run."""
    nk = states.shape[-1]
    if states.numel() == 0:  # torch before 2.10 refuses to pad a size-0 dim
        return torch.zeros(0, 4, dtype=torch.long, device=states.device)
    s = states.flatten(0, 1).long()  # (Bm*Hm, nQ, nK)
    if union:
        some, every = (s != 0).any(0), (s == 2).all(0)
        s = torch.where(every, 2, some.long())[None]
    x = s.reshape(-1, nk)  # (groups, nK)
    edge = pad(x[:, 1:] != x[:, :-1], (1, 1), value=True)  # (groups, nK + 1): a change
    first = (edge[:, :-1] & (x != 0)).nonzero()  # [group, k0]
    after = (edge[:, 1:] & (x != 0)).nonzero()  # [group, k1 - 1]
    state = x[first[:, 0], first[:, 1]]
    return torch.stack([first[:, 0], first[:, 1], after[:, 1] + 1, state], 1)


def states_from_runs(runs: Tensor, shape: tuple[int, int, int, int]) -> Tensor:
    """Dense int8 tile states of ``shape`` ``(Bm, Hm, nQ, nK)`` from runs (groups over
    ``Bm * Hm * nQ``); the only ``(nQ, nK)`` table, made when a caller asks for it."""
    out = torch.zeros(math.prod(shape), dtype=torch.int8, device=runs.device)
    length = runs[:, 2] - runs[:, 1]
    which = torch.repeat_interleave(torch.arange(len(runs), device=runs.device), length)
    offset = torch.arange(len(which), device=runs.device) - (length.cumsum(0) - length)[which]
    out[runs[which, 0] * shape[3] + runs[which, 1] + offset] = runs[which, 3].to(torch.int8)
    return out.view(shape)
