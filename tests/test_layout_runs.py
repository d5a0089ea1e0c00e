"""Block layouts and blocked-engine plans of interval masks, built as runs of key tiles.

The references below are the earlier dense constructions (an ``(Bm, nQ, nK + 1)``
difference table from the row bounds, and a plan read off every ``(nQ, nK)`` tile); the
runs must give the same tile states and the same plans, and make no ``(nQ, nK)`` table
(that table made ``(causal() & window(256)).block_layout`` at a million queries take 3-4 s
and 1.7 GB, and a blocked call 2 GB, for 24 thousand kept tiles).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

from attnlab import masks
from attnlab.engines.base import AttentionRequest
from attnlab.engines.blocked_plan import Block, Plan, make_plan
from attnlab.masks import Mask, RowBounds, TileState

# --------------------------------------------------------------------------- references


def dense_layout_from_bounds(bounds: RowBounds, lq: int, lk: int, bq: int, bk: int) -> Tensor:
    """The earlier construction: tile states ``(Bm, 1, nQ, nK)`` through a dense table."""
    nq, nk = math.ceil(lq / bq), math.ceil(lk / bk)
    pad, bm = nq * bq - lq, bounds.lo.shape[0]
    lo, hi = bounds.lo.clamp(min=0), bounds.hi.clamp(max=lk - 1)
    some = lo <= hi
    first = torch.where(some, lo // bk, nk)
    after = torch.where(some, hi // bk + 1, nk)
    block = (torch.arange(lq) // bq).expand(bm, lq)
    diff = torch.zeros(bm, nq, nk + 1, dtype=torch.int32)
    ones = torch.ones_like(first, dtype=torch.int32)
    diff.view(bm, -1).scatter_add_(1, block * (nk + 1) + first, ones)
    diff.view(bm, -1).scatter_add_(1, block * (nk + 1) + after, -ones)
    touched = diff.cumsum(-1)[..., :nk] > 0
    lo_max = torch.nn.functional.pad(lo, (0, pad), value=0).view(bm, nq, bq).amax(-1)
    hi_min = torch.nn.functional.pad(hi, (0, pad), value=lk - 1).view(bm, nq, bq).amin(-1)
    ks = torch.arange(nk) * bk
    ke = torch.clamp(ks + bk, max=lk) - 1
    full = (lo_max[..., None] <= ks) & (hi_min[..., None] >= ke) & bounds.exact & touched
    return torch.where(touched, torch.where(full, 2, 1), 0).unsqueeze(1)


def dense_plan(states: Tensor, lq: int, lk: int, block: int) -> list[tuple[Any, ...]]:
    """The earlier plan, block by block ``(rows, keys, masked, has_full)``, read off every
    tile of ``states`` ``(Bm, Hm, nQ, nK)``."""
    s = states.flatten(0, 1)
    needed, full = (s != 0).any(0), (s == 2).all(0)
    out = []
    for qb in range(needed.shape[0]):
        kbs = needed[qb].nonzero().flatten().tolist()
        if not kbs:
            continue
        spans = [(kb * block, min((kb + 1) * block, lk)) for kb in kbs]
        keys: Any = (spans[0][0], spans[-1][1])
        if kbs[-1] - kbs[0] + 1 != len(kbs):
            keys = torch.cat([torch.arange(a, b) for a, b in spans]).tolist()
        masked: list[tuple[int, int]] = []
        col = 0
        for kb, (a, b) in zip(kbs, spans, strict=True):
            if not full[qb, kb]:
                if masked and masked[-1][1] == col:
                    masked[-1] = (masked[-1][0], col + b - a)
                else:
                    masked.append((col, col + b - a))
            col += b - a
        rows = (qb * block, min((qb + 1) * block, lq))
        out.append((rows, keys, tuple(masked), bool(full[qb, kbs].any())))
    return out


def plan_rows(plan: Plan) -> list[tuple[Any, ...]]:
    """``plan`` in the reference's terms (a slice as ``(start, stop)``, a gather as a list)."""

    def keys(b: Block) -> Any:
        k = b.keys
        return (k.start, k.stop) if isinstance(k, slice) else k.tolist()

    return [(b.rows, keys(b), b.masked, b.has_full) for b in plan.blocks]


def request(mask: Mask, lq: int, lk: int, batch: int = 2, heads: int = 3) -> AttentionRequest:
    """A request of these sizes (head size 1) for ``mask``."""
    q, k = torch.zeros(batch, heads, lq, 1), torch.zeros(batch, heads, lk, 1)
    return AttentionRequest(q, k, k, mask, None, 1.0, "dot", "softmax", 0.0, False, False)


# --------------------------------------------------------------------------- the sweep

MASKS: dict[str, Callable[[], Mask]] = {
    "causal": masks.causal,
    "window": lambda: masks.window(3, 1),
    "causal&window": lambda: masks.causal() & masks.window(5),
    "documents": lambda: masks.documents([0] * 3 + [1] * 9 + [2] * 2 + [3] * 19 + [4] * 100),
    "documents&causal": lambda: masks.documents([0] * 40 + [1] * 50 + [2] * 43) & masks.causal(),
    "padding": lambda: masks.padding([133, 20]),
    "padding_q": lambda: masks.padding([133, 70], [9, 133]),
    "padding&window": lambda: masks.padding([5, 130]) & masks.window(6, 2),
    "prefix": lambda: masks.prefix(10),
    "prefix&causal&padding": lambda: masks.prefix(17) & masks.causal() & masks.padding([99, 3]),
    "window&global": lambda: masks.window(4) & masks.global_tokens([0]),  # an outer bound
    "not_causal": lambda: ~masks.causal(),
    "causal|window": lambda: masks.causal() | masks.window(2, 2),
}
SIZES = [(1, 1), (7, 7), (33, 33), (33, 7), (7, 33), (133, 133), (130, 70), (0, 5), (5, 0)]
BLOCKS = [(1, 1), (2, 3), (4, 4), (8, 5), (64, 64)]


@pytest.mark.parametrize("name", list(MASKS))
def test_layout_and_plan_equal_the_dense_construction(name: str) -> None:
    for lq, lk in SIZES:
        if name.startswith(("documents", "prefix", "padding")) and (lq, lk) != (133, 133):
            continue  # their documents and lengths are made for 133 positions
        mask = MASKS[name]()
        for bq, bk in BLOCKS:
            where = f"{name} {lq}x{lk} tiles {bq}x{bk}"
            layout = mask.block_layout(lq, lk, bq, bk, batch=2, heads=3)
            bounds = None if mask.per_head else mask.row_bounds(lq, lk, 2 if mask.per_batch else 1)
            if bounds is not None and bounds.exact:  # (else evaluated inside the bounds)
                want = dense_layout_from_bounds(bounds, lq, lk, bq, bk)
                assert torch.equal(layout.states.long(), want), where
            assert layout.states.dtype == torch.int8, where
            s = layout.states
            for state in TileState:
                assert layout.count(state) == int((s == int(state)).sum()), where
            if bq == bk:
                plan = make_plan(mask, request(mask, lq, lk), bq)
                assert plan_rows(plan) == dense_plan(s, lq, lk, bq), where
                total = s.shape[2] * s.shape[3]
                kept = int((s != 0).flatten(0, 1).any(0).sum())
                frac = kept / total if total else 0.0  # exact now; float32 before
                assert plan.computed_fraction == pytest.approx(frac, rel=1e-6), where


def test_tile_runs_in_key_order_and_union() -> None:
    layout = (masks.causal() & masks.padding([6, 2])).block_layout(8, 8, 2, 2, batch=2)
    runs = layout.tile_runs().tolist()  # (b * nQ + qb, k0, k1, state)
    assert runs[:4] == [[0, 0, 1, 1], [1, 0, 1, 2], [1, 1, 2, 1], [2, 0, 2, 2]]
    union = layout.tile_runs(union=True).tolist()  # full only where full in both items
    assert union == [[0, 0, 1, 1], [1, 0, 1, 2], [1, 1, 2, 1], [2, 0, 1, 2], [2, 1, 3, 1],
                     [3, 0, 1, 2], [3, 1, 3, 1]]  # fmt: skip


# ------------------------------------------------------------------ no (nQ, nK) table


class LargestTensor(TorchDispatchMode):
    """Records the largest tensor any torch operation returns."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, tuple | list) else (out,):
            if isinstance(t, Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize(
    "mask",
    [
        masks.causal() & masks.window(64),
        masks.documents(torch.arange(1 << 15) // 100),
        masks.padding([1 << 15, 9000]) & masks.window(40, 7),
    ],
    ids=["causal&window", "documents", "padding&window"],
)
def test_no_table_of_every_tile(mask: Mask) -> None:
    # 32768 queries and keys in 16 x 16 tiles: 4 million tiles, a few thousand kept
    n, bs = 1 << 15, 16
    tiles = (n // bs) ** 2
    with LargestTensor() as seen:
        layout = mask.block_layout(n, n, bs, bs, batch=2)
        fraction = layout.computed_fraction
        text = str(layout)
        plan = make_plan(mask, request(mask, n, n, 2, 1), bs)
    assert seen.largest <= 4 * n, f"a tensor of {seen.largest} elements for {tiles} tiles"
    assert 0 < fraction < 0.01 and "% of tiles computed" in text
    assert len(plan.blocks) == n // bs
