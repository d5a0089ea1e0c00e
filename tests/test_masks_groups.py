"""``masks.groups`` (a query sees its own group's keys, a query in no group none) and the
row intervals of an ``|`` of masks (their union, where it is one interval per row)."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np
import pytest
import torch

import attnlab
from attnlab import masks
from attnlab.masks import Mask
from tests.conftest import check_and_control
from tests.test_masks import Pred, assert_mask, build, ref_causal, to_np


def ref_groups(ids: Sequence[int] | Sequence[Sequence[int]]) -> Pred:
    rows = [list(r) for r in ids] if isinstance(ids[0], (list, tuple)) else [list(ids)]

    def pred(b: int, h: int, i: int, p: int, j: int) -> bool:
        row = rows[b] if len(rows) > 1 else rows[0]
        return row[p] >= 0 and row[p] == row[j]

    return pred


def _random_groups(n: int, seed: int, runs: bool) -> list[int]:
    """Ids in -1..3: each group one run (an image's tokens) or scattered."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(-1, 4, (n,), generator=g)
    return (ids.sort().values if runs else ids).tolist()


GROUP_CASES = [
    ([-1, 0, 0, -1, 1, 1, 1, -1], [(8, 8), (3, 8), (1, 8)]),
    ([0, 0, 0, -2, -2, 3], [(6, 6), (2, 6)]),  # any negative id: in no group
    ([-1, -1, -1], [(3, 3)]),  # no group at all
    ([[0, 0, -1, 1, 1], [-1, 2, 2, 2, -1]], [(5, 5), (2, 5)]),
    ([[0, -1, 0, -1, 1, 1], [0, 0, -1, -1, 1, 1]], [(6, 6)]),  # row 0's group 0 is split
    (_random_groups(37, 0, True), [(37, 37), (9, 37), (1, 37)]),
    (_random_groups(37, 1, False), [(37, 37), (9, 37)]),
]


@pytest.mark.parametrize(
    ("ids", "lq", "lk"), [(ids, lq, lk) for ids, sizes in GROUP_CASES for lq, lk in sizes]
)
def test_groups(ids: list, lq: int, lk: int) -> None:
    m = masks.groups(ids)
    bm = len(ids) if isinstance(ids[0], list) else 1
    want = assert_mask(m, ref_groups(ids), lq, lk, (bm, 1))
    _check_bounds(m, want, lq, lk, bm)
    _check_bounds(masks.causal() | m, want | build(ref_causal(), lq, lk, bm), lq, lk, bm)


def _check_bounds(m: Mask, want: np.ndarray, lq: int, lk: int, bm: int) -> None:
    """Exact row bounds, where given, allow exactly the dense mask's keys."""
    bounds = m.row_bounds(lq, lk, bm)
    if bounds is None:
        return
    assert bounds.exact
    keys = torch.arange(lk)
    from_bounds = (keys >= bounds.lo[..., None]) & (keys <= bounds.hi[..., None])
    np.testing.assert_array_equal(to_np(from_bounds.expand(bm, lq, lk)), want[:, 0])


def test_groups_of_one_run_each_keep_one_interval_per_row_beside_causal() -> None:
    m = masks.groups([[-1, 0, 0, 0, -1, 5, 5, -1], [3, 3, -1, -1, -1, -1, 4, 4]])
    assert m.spec() == "groups(2 rows of 2 groups, length 8)"
    assert m.row_bounds(8, 8, 2).hi[0].tolist() == [-1, 3, 3, 3, -1, 6, 6, -1]
    both = masks.causal() | m
    bounds = both.row_bounds(8, 8, 2)
    assert bounds is not None and bounds.exact
    assert bounds.hi.tolist() == [[0, 3, 3, 3, 4, 6, 6, 7], [1, 1, 2, 3, 4, 5, 7, 7]]


def test_groups_name_their_argument() -> None:
    check_and_control(
        lambda: masks.groups([0, 0, -1]).dense(5, 5),
        lambda: masks.groups([0, 0, -1]).dense(3, 3),
        ValueError,
        r"mask=groups\(...\) has group_ids of length 3 but the call has Lq=5, Lk=5",
    )


@pytest.mark.parametrize(
    ("bad", "error", "match"),
    [
        ([0.5, 1.0], TypeError, r"group_ids must hold integers"),
        (torch.zeros(1, 2, 3, dtype=torch.long), ValueError, r"group_ids must have rank 1 or 2"),
    ],
)
def test_groups_name_their_argument_when_made(bad: object, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        masks.groups(bad)
    with pytest.raises(error, match=match.replace("group_ids", "doc_ids")):
        masks.documents(bad)


OR_CASES = {
    "causal|documents": masks.causal() | masks.documents([0, 0, 0, 1, 1, 2, 2, 2, 2]),
    "window|groups": masks.window(1) | masks.groups([-1, 0, 0, 0, -1, -1, 1, 1, -1]),
    "prefix|window": masks.prefix(3) | masks.window(0, 2),
    "three parts": masks.window(0) | masks.window(2, 0) | masks.groups([0] * 4 + [-1] * 5),
    "per-batch": masks.causal()
    | masks.groups([[0, 0, 0, -1, -1, 1, 1, -1, -1], [-1, 2, 2, 2, 2, -1, -1, -1, 3]]),
}
GAPS = {  # a key interval apart from another: no one interval per row
    "window|padding": masks.window(0) | masks.padding([1, 2]),
    "causal|split documents": masks.causal() | masks.documents([0, 1, 0, 1, 0, 1, 0, 1, 0]),
    "window|global": masks.window(0) | masks.global_tokens([0]),
}


@pytest.mark.parametrize("name", [*OR_CASES, *GAPS])
@pytest.mark.parametrize(("lq", "lk"), [(9, 9), (4, 9), (1, 9)])
def test_an_or_has_one_exact_interval_per_row_where_its_parts_join(
    name: str, lq: int, lk: int
) -> None:
    m = OR_CASES.get(name) or GAPS[name]
    bm = 2 if m.per_batch else 1
    want = to_np(m.dense(lq, lk, batch=bm))
    union = np.zeros_like(want)
    for part in m.parts:  # type: ignore[attr-defined]
        union = union | to_np(part.dense(lq, lk, batch=bm))
    np.testing.assert_array_equal(want, union)
    bounds = m.row_bounds(lq, lk, bm)
    if name in GAPS:
        assert bounds is None or lq == 1, name  # (one query: its intervals may touch)
    else:
        assert bounds is not None and bounds.exact, name
    _check_bounds(m, want, lq, lk, bm)


@pytest.mark.parametrize("engine", ["blocked", "sdpa", "flex"])
def test_images_beside_causal_through_the_engines(engine: str) -> None:
    """``(causal | groups) & padding`` as a vision-language model's text layers ask it:
    each engine against fp64 reference attention."""
    if engine not in attnlab.available_engines():
        pytest.skip(f"{engine} is not available here")
    g = torch.Generator().manual_seed(0)
    ids = torch.full((2, 300), -1)
    ids[0, 0:64], ids[0, 100:164], ids[1, 37:101], ids[1, 250:290] = 0, 1, 0, 1
    mask = (masks.causal() | masks.groups(ids)) & masks.padding([300, 270])
    q, k, v = (torch.randn(2, 4, 300, 16, generator=g) for _ in range(3))
    got = attnlab.attention(q, k, v, mask=mask, engine=engine)
    want = attnlab.attention(q.double(), k.double(), v.double(), mask=mask, engine="reference")
    dense = attnlab.attention(q, k, v, mask=mask.dense(300, 300, batch=2), engine="reference")
    err, floor = (got.double() - want).abs().max(), (dense.double() - want).abs().max()
    assert err <= max(2 * floor, 1e-5), f"{engine}: {err} against the dense form's {floor}"


@pytest.mark.parametrize("order", list(itertools.permutations(range(3))))
def test_an_or_has_its_intervals_in_any_order_of_its_parts(order: tuple[int, ...]) -> None:
    parts = [masks.padding([2]), masks.window(0), masks.causal()]
    m = parts[order[0]] | parts[order[1]] | parts[order[2]]
    b = m.row_bounds(6, 6, 1)
    assert b is not None and b.exact  # padding's and the window's leave a gap causal fills
    k = torch.arange(6)
    claimed = (k >= b.lo[..., None]) & (k <= b.hi[..., None])  # (1, Lq, Lk)
    assert torch.equal(claimed, m.dense(6, 6).reshape(1, 6, 6))
