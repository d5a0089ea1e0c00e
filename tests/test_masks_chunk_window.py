"""``masks.chunk_window`` (positions in chunks of ``size``, a query seeing its own chunk
and ``back`` chunks before: NeMo's ``chunked_limited`` attention) against a plain-loop
reference, its exact row intervals and block layouts included."""

from __future__ import annotations

import pytest

from attnlab import masks
from tests.conftest import check_and_control
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
