"""Mask arguments and sizes the earlier tests missed: an empty batch of document ids,
arguments that are not lists of ints, ``block_layout``'s sizes, ``custom``'s flags and a
bool tensor on the left of ``&`` / ``|``."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch

import attnlab
from attnlab import masks as M


def test_documents_of_an_empty_batch() -> None:
    """(0, L) ids are a batch of 0, as a (0, 1, Lq, Lk) tensor mask is (IndexError)."""
    ids = torch.zeros(0, 4, dtype=torch.long)
    q = torch.randn(0, 2, 4, 8)
    assert M.documents(ids).batch_size == 0
    assert M.documents(ids).dense(4, 4, batch=0).shape == (0, 1, 4, 4)
    assert attnlab.attention(q, q, q, mask=M.documents(ids) & M.causal()).shape == (0, 2, 4, 8)
    two = torch.randn(2, 2, 4, 8)
    with pytest.raises(ValueError, match="doc_ids for 0 batch items but the batch size is 2"):
        attnlab.attention(two, two, two, mask=M.documents(ids))


@pytest.mark.parametrize(
    ("make", "name"),
    [
        (lambda x: M.padding(x), "key_lengths"),
        (lambda x: M.padding([3], x if x is not None else "q"), "query_lengths"),
        (lambda x: M.documents(x), "doc_ids"),
        (lambda x: M.global_tokens(x), "indices"),
    ],
)
@pytest.mark.parametrize("bad", [None, "ab", [[1, 2], [3]], {"a": 1}])
def test_arguments_that_are_not_lists_of_ints_are_named(make, name: str, bad: object) -> None:
    with pytest.raises(TypeError, match=rf"{name} must be a tensor or a list of ints"):
        make(bad)


def test_block_layout_checks_its_sizes() -> None:
    m = M.causal()
    with pytest.raises(ValueError, match="lq must be an int >= 0, got -1"):
        m.block_layout(-1, 4, 2, 2)
    with pytest.raises(TypeError, match=r"block_q must be a positive int, got 2\.5"):
        m.block_layout(8, 8, 2.5, 2)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="heads must be a positive int, got 0"):
        m.block_layout(8, 8, 2, 2, heads=0)
    with pytest.raises(ValueError, match="block_k must be a positive int, got 0"):
        m.block_layout(8, 8, 2, 0)
    assert m.block_layout(4, 4, 2, 2).states[0, 0].tolist() == [[1, 0], [2, 1]]


def test_custom_flags_must_be_bools() -> None:
    with pytest.raises(TypeError, match="per_head must be a bool, got str"):
        M.custom(lambda b, h, q, k: q >= k, per_head="no")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="per_batch must be a bool, got int"):
        M.custom(lambda b, h, q, k: q >= k, per_batch=0)  # type: ignore[arg-type]


def test_a_bool_tensor_on_the_left_of_and_or() -> None:
    t = torch.rand(5, 5) > 0.5
    for got, want in (
        (t & M.causal(), M.causal() & t),
        (t | M.window(1), M.window(1) | t),
    ):
        assert torch.equal(got.dense(5, 5), want.dense(5, 5))
    expected = t & torch.ones(5, 5, dtype=torch.bool).tril()
    assert torch.equal((t & M.causal()).dense(5, 5)[0, 0], expected)


@pytest.mark.parametrize(
    ("kw", "error", "match"),
    [
        ({"heads": 0}, ValueError, "heads must be a positive int, got 0"),
        ({"heads": -1}, ValueError, "heads must be a positive int, got -1"),
        ({"heads": 2.5}, TypeError, r"heads must be a positive int, got 2\.5"),
        ({"batch": -1}, ValueError, "batch must be an int >= 0, got -1"),
        ({"lq": 2.0}, TypeError, r"lq must be an int >= 0, got 2\.0"),
    ],
)
def test_tensor_mask_dense_checks_its_sizes_as_every_mask(
    kw: dict, error: type, match: str
) -> None:
    """(A tensor mask took heads=0, -1 and 2.5 and batch=-1; lq=2.0 a raw TypeError.)"""
    rows = torch.tensor([[True, False], [True, True]])
    a = {"lq": 2, "batch": None, "heads": 1, **kw}
    for mask in (M.tensor(rows), M.causal()):  # (the causal mask: the rule all others keep)
        with pytest.raises(error, match=match):
            mask.dense(a["lq"], 2, batch=a["batch"], heads=a["heads"])
        assert torch.equal(mask.dense(2, 2, batch=2, heads=3)[0, 0], rows)  # the control


@pytest.mark.parametrize(
    ("make", "spec"),
    [
        (lambda n: M.window(n), "window(left=4, right=0)"),
        (lambda n: M.window(1, n), "window(left=1, right=4)"),
        (lambda n: M.prefix(n), "prefix(4)"),
        (lambda n: M.dilated(n, 2), "dilated(window=4, dilation=2)"),
        (
            lambda n: M.block_random(n, 1, seed=n),
            "block_random(block_size=4, num_blocks=1, seed=4)",
        ),
    ],
)
def test_mask_sizes_take_numpy_ints(make, spec: str) -> None:
    """(window(np.int64(4)) and the others raised "must be an int, got int64", where every
    other size in attnlab takes numpy's ints.)"""
    for n in (np.int64(4), np.int32(4), 4):
        mask = make(n)
        assert mask.spec() == spec
        assert torch.equal(mask.dense(6, 6), make(4).dense(6, 6))
    with pytest.raises(TypeError, match="must be an int, got float64"):
        make(np.float64(4.0))
    with pytest.raises(TypeError, match="must be an int, got bool"):
        make(np.bool_(True))


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: M.chunk_window(-2), r"^size must be a positive int, got -2$"),
        (lambda: M.chunk_window(0), r"^size must be a positive int, got 0$"),
        (lambda: M.block_random(-2, 1), r"^block_size must be a positive int, got -2$"),
    ],
)
def test_a_negative_size_that_must_be_positive_is_told_so(
    make: Callable[[], object], match: str
) -> None:
    """A size that must be >= 1 given as -2 was told "must be a non-negative int"."""
    with pytest.raises(ValueError, match=match):
        make()
