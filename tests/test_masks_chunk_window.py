"""``masks.chunk_window`` (positions in chunks of ``size``, a query seeing its own chunk
and ``back`` chunks before: NeMo's ``chunked_limited`` attention) against a plain-loop
reference, its exact row intervals and block layouts included."""

from __future__ import annotations

import sys

import pytest
import torch

import attnlab
from attnlab import masks
from tests.conftest import assert_2x_rule, check_and_control
from tests.test_masks import SIZES, Pred, assert_mask


def ref_chunk_window(size: int, back: int, start: int) -> Pred:
    def pred(b: int, h: int, i: int, p: int, j: int) -> bool:
        behind = (p + start) // size - (j + start) // size
        return 0 <= behind <= back

    return pred


@pytest.mark.parametrize(("lq", "lk"), SIZES)
@pytest.mark.parametrize(
    ("size", "back", "start"), [(1, 0, 0), (3, 0, 0), (3, 2, 0), (4, 1, 5), (14, 5, 3), (2, 99, 1)]
)
def test_chunk_window(lq: int, lk: int, size: int, back: int, start: int) -> None:
    mask = masks.chunk_window(size, back, start)
    assert_mask(mask, ref_chunk_window(size, back, start), lq, lk, (1, 1))
    assert mask.row_bounds(lq, lk).exact


def test_chunk_window_of_one_chunk_is_documents_of_the_chunks() -> None:
    ids = [[(p + 2) // 3 for p in range(10)]]
    got = masks.chunk_window(3, 0, 2).dense(10, 10)
    assert (got == masks.documents(ids).dense(10, 10)).all()


def test_chunk_window_refuses_a_chunk_of_no_positions() -> None:
    check_and_control(
        lambda: masks.chunk_window(0), lambda: masks.chunk_window(1), ValueError, "size"
    )


@pytest.mark.parametrize("back", [2**62, sys.maxsize])
def test_an_unlimited_look_back_keeps_every_earlier_chunk(back: int) -> None:
    """``back`` past the first chunk (``sys.maxsize`` for "all"): row bounds from it
    wrapped round int64 (lo 60 for a row that sees keys 0-63), and the decoding kernel
    that trusts them gave 1.84 off float64."""
    mask = masks.chunk_window(4, back=back)
    for lq, lk in [(1, 64), (6, 6), (3, 9)]:
        b = mask.row_bounds(lq, lk)
        keys = torch.arange(lk)
        claimed = (keys >= b.lo[..., None]) & (keys <= b.hi[..., None])  # (1, Lq, Lk)
        assert torch.equal(claimed, mask.dense(lq, lk).reshape(1, lq, lk))
    q, kv = torch.randn(1, 8, 1, 16), torch.randn(1, 2, 64, 16)
    ref64 = attnlab.attention(q.double(), kv.double(), kv.double(), mask=mask, engine="reference")
    plain = attnlab.attention(q, kv, kv, mask=mask, engine="reference")
    assert_2x_rule(attnlab.attention(q, kv, kv, mask=mask), plain, ref64)  # auto: decoding


HUGE = [
    (2, 0, 2**62 + 1),  # 600 of 300 x 300 visible, 598 exact
    (5, 0, 2**63 - 3),  # 1492 visible, 1500 exact
    (5, 2, 2**70 + 3),
    (3 * 2**61, 1, 3 * 2**61 - 7),  # a size past the cap: its one boundary at 7
    (2**62, 2**62, 2**62 - 1),
    (2**64, 0, 2**64 - 5),
]


@pytest.mark.parametrize(("size", "back", "start"), HUGE)
def test_a_huge_start_places_the_chunks_by_start_mod_size(size: int, back: int, start: int) -> None:
    """``start`` was clamped to 2**62 as a window size is, which moved the chunks: only
    ``start % size`` places them (the reference reads the chunks with Python's ints)."""
    mask = masks.chunk_window(size, back, start)
    for lq, lk in SIZES:
        want = assert_mask(mask, ref_chunk_window(size, back, start), lq, lk, (1, 1))
        b = mask.row_bounds(lq, lk)  # exact, and within int64
        keys = torch.arange(lk)
        claimed = (keys >= b.lo[..., None]) & (keys <= b.hi[..., None])  # (1, Lq, Lk)
        assert b.exact and torch.equal(claimed, torch.from_numpy(want).reshape(1, lq, lk))
    if size <= 2**62:
        assert mask.spec() == masks.chunk_window(size, back, start % size).spec()


@pytest.mark.parametrize("engine", ["reference", "sdpa", "blocked"])
def test_engines_follow_a_huge_start(engine: str) -> None:
    """Every engine followed the clamped start's chunks; against float64 softmax over the
    Python-int chunks."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 33, 8, dtype=torch.float64) for _ in range(3))
    pred = ref_chunk_window(5, 0, 2**63 - 3)
    allowed = torch.tensor([[pred(0, 0, i, i, j) for j in range(33)] for i in range(33)])
    scores = (q @ k.transpose(-1, -2) / 8**0.5).masked_fill(~allowed, float("-inf"))
    want = scores.softmax(-1) @ v  # (1, 2, 33, 8)
    got = attnlab.attention(q, k, v, mask=masks.chunk_window(5, 0, 2**63 - 3), engine=engine)
    assert (got - want).abs().max() < 1e-12
