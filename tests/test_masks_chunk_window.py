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
