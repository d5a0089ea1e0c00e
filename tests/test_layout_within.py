"""Block layouts of masks with only an outer bound per row: a dilated window (its window),
and an ``&`` of an interval with a part that has none (``window & block_random``).

Their tiles were evaluated over every key for every query block, ``O(Lq Lk)``: a dilated
window's layout at 32768 queries took 33 s for 1.9% of the tiles, ``window(256) &
block_random(64, 3)`` 12-16 s for 0.03%. Only the key tiles inside the bound are evaluated
now; the layouts must still equal the tile states of the dense mask.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from attnlab import masks
from attnlab._grid import Grid
from attnlab.masks import Mask, TileState
from attnlab.masks.intervals import Dilated
from attnlab.masks.sparse import BlockRandom, GlobalTokens

SIZES = [(1, 1), (7, 33), (33, 33), (40, 17), (64, 100), (130, 130)]
TILES = [(1, 1), (4, 8), (16, 16), (64, 64)]


def dense_states(m: Mask, lq: int, lk: int, bq: int, bk: int, batch: int | None) -> Tensor:
    """Tile states ``(Bm, Hm, nQ, nK)`` read off the dense mask."""
    d = m.dense(lq, lk, batch=batch)
    bm, hm = d.shape[:2]
    nq, nk = math.ceil(lq / bq), math.ceil(lk / bk)
    pads = (0, nk * bk - lk, 0, nq * bq - lq)
    some = torch.nn.functional.pad(d, pads, value=False).view(bm, hm, nq, bq, nk, bk)
    every = torch.nn.functional.pad(d, pads, value=True).view(bm, hm, nq, bq, nk, bk)
    some, every = some.any(5).any(3), every.all(5).all(3)
    return torch.where(every, 2, torch.where(some, 1, 0))


MASKS = {
    "dilated(5, 2)": lambda: masks.dilated(5, 2),
    "dilated(40, 3)": lambda: masks.dilated(40, 3),
    "dilated(0, 4)": lambda: masks.dilated(0, 4),
    "window & random": lambda: masks.window(8) & masks.block_random(4, 2, seed=1),
    "window2 & random": lambda: masks.window(20, 3) & masks.block_random(16, 3),
    "causal & dilated": lambda: masks.causal() & masks.dilated(9, 2),
    "window & global": lambda: masks.window(6, 6) & masks.global_tokens([0, 5]),
    "padding & dilated": lambda: masks.padding([30, 17]) & masks.dilated(6, 3),
    "three parts": lambda: masks.window(4) & masks.block_random(8, 1) & masks.causal(),
    "~dilated": lambda: ~masks.dilated(5, 2),
    "dilated | window": lambda: masks.dilated(5, 2) | masks.window(3),
    "diagonal & random": lambda: masks.window(0) & masks.block_random(2, 1),
}


@pytest.mark.parametrize("name", sorted(MASKS))
@pytest.mark.parametrize(("lq", "lk"), SIZES)
def test_layout_inside_an_outer_bound_equals_the_dense_tiles(name: str, lq: int, lk: int) -> None:
    m = MASKS[name]()
    if name == "padding & dilated":  # lengths are counts of the call's keys: at most lk
        m = masks.padding([min(30, lk), min(17, lk)]) & masks.dilated(6, 3)
    batch = 2 if m.per_batch else None
    for bq, bk in TILES:
        got = m.block_layout(lq, lk, bq, bk, batch=batch)
        want = dense_states(m, lq, lk, bq, bk, batch)
        assert torch.equal(got.states.long(), want), (name, lq, lk, bq, bk)
        assert got.count(TileState.EMPTY) == int((want == 0).sum())


def test_outer_bounds_are_reported_but_not_exact() -> None:
    b = masks.dilated(3, 2).row_bounds(4, 6)
    assert b is not None and not b.exact
    assert b.lo.tolist() == [[-1, 0, 1, 2]] and b.hi.tolist() == [[5, 6, 7, 8]]
    both = (masks.window(2) & masks.block_random(2, 1)).row_bounds(3, 3)
    assert both is not None and not both.exact and both.lo.tolist() == [[-2, -1, 0]]
    assert masks.dilated(3, 1).row_bounds(4, 4).exact  # dilation 1: a window
    assert (masks.global_tokens([0]) & masks.block_random(2, 1)).row_bounds(3, 3) is None


class _Counted:
    """Counts the (query, key) values a mask is evaluated on."""

    seen = 0

    def evaluate(self, grid: Grid) -> Tensor:
        _Counted.seen += grid.q.numel() * grid.k.numel()
        return super().evaluate(grid)  # type: ignore[misc]


class CountedDilated(_Counted, Dilated):
    """A dilated window that counts its evaluations."""


class CountedRandom(_Counted, BlockRandom):
    """Random key blocks that count their evaluations."""


@pytest.mark.parametrize(
    "make",
    [
        lambda: CountedDilated(32, 2),
        lambda: masks.window(32) & CountedRandom(64, 3, 0),
        lambda: CountedDilated(32, 3) & masks.causal(),
    ],
)
def test_layout_evaluates_only_the_tiles_inside_the_bound(make: object) -> None:
    lq = lk = 4096  # every pair: 16.8 million; the tiles of the bound: about 1.5 million
    _Counted.seen = 0
    layout = make().block_layout(lq, lk, 64, 64)  # type: ignore[operator]
    assert _Counted.seen <= 8 * 64 * lq, _Counted.seen  # O(Lq w), not O(Lq Lk)
    assert layout.computed_fraction < 0.05


class CountedGlobal(_Counted, GlobalTokens):
    """Global tokens that count their evaluations."""


@pytest.mark.parametrize("indices", [[0], [0, 5, 5], [3, 40, 100, 129], list(range(16))])
@pytest.mark.parametrize(("lq", "lk"), [*SIZES, (0, 4), (4, 0), (5, 70)])
def test_global_tokens_layout_equals_the_dense_tiles(indices: list[int], lq: int, lk: int) -> None:
    m = masks.global_tokens(indices)
    for bq, bk in [*TILES, (2, 3)]:
        got = m.block_layout(lq, lk, bq, bk).states.long()
        assert torch.equal(got, dense_states(m, lq, lk, bq, bk, None)), (lq, lk, bq, bk)


def test_global_tokens_layout_evaluates_no_pair() -> None:
    _Counted.seen = 0  # window | global_tokens took 4.8 s at 32768 queries, every pair
    m = masks.window(64, 64) | CountedGlobal([0, 1, 2, 3])
    layout = m.block_layout(4096, 4096, 64, 64)
    assert _Counted.seen == 0
    assert torch.equal(layout.states.long(), dense_states(m, 4096, 4096, 64, 64, None))
