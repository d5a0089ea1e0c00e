"""Tests for attnlab.masks: every dense form and block layout is checked against references.

The references are written from the documented semantics with Python scalars and loops over
``(b, h, i, j)``, using the bottom-right query position ``p = i + Lk - Lq``; they share no
code with the implementation. Block layouts are checked tile by tile against those dense
references: ``EMPTY`` tiles hold no allowed pair, ``FULL`` tiles only allowed pairs, and for
primitive masks (and their negations) ``PARTIAL`` tiles hold both.
"""

from __future__ import annotations

import copy
import math
import pickle
import re
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import Tensor

import attnlab
from attnlab import masks
from attnlab.masks import BlockLayout, Mask, TileState
from tests.conftest import check_and_control

# --------------------------------------------------------------------------- references

Pred = Callable[[int, int, int, int, int], bool]  # (b, h, i, p, j) -> may attend


def build(pred: Pred, lq: int, lk: int, batch: int = 1, heads: int = 1) -> np.ndarray:
    """Dense bool ``(batch, heads, lq, lk)`` from a predicate, with plain loops."""
    out = np.zeros((batch, heads, lq, lk), dtype=bool)
    for b in range(batch):
        for h in range(heads):
            for i in range(lq):
                p = i + lk - lq
                for j in range(lk):
                    out[b, h, i, j] = bool(pred(b, h, i, p, j))
    return out


def ref_causal() -> Pred:
    return lambda b, h, i, p, j: j <= p


def ref_window(left: int, right: int = 0) -> Pred:
    return lambda b, h, i, p, j: p - left <= j <= p + right


def ref_prefix(n: int) -> Pred:
    return lambda b, h, i, p, j: j < n or j <= p


def ref_padding(key_lengths: Sequence[int], query_lengths: Sequence[int] | None = None) -> Pred:
    def pred(b: int, h: int, i: int, p: int, j: int) -> bool:
        ok = j < key_lengths[b]
        if query_lengths is not None:
            ok = ok and i < query_lengths[b]
        return ok

    return pred


def ref_documents(ids: Sequence[int] | Sequence[Sequence[int]]) -> Pred:
    rows = [list(r) for r in ids] if isinstance(ids[0], (list, tuple)) else [list(ids)]

    def pred(b: int, h: int, i: int, p: int, j: int) -> bool:
        row = rows[b] if len(rows) > 1 else rows[0]
        return row[p] == row[j]

    return pred


def ref_global(indices: Sequence[int]) -> Pred:
    idx = set(indices)
    return lambda b, h, i, p, j: p in idx or j in idx


def ref_dilated(window: int, dilation: int) -> Pred:
    return lambda b, h, i, p, j: abs(p - j) <= window and (p - j) % dilation == 0


def ref_tensor(t: np.ndarray) -> Pred:
    """A dense bool array of rank 2, 3 or 4, broadcast over size-1 dims."""
    t4 = t.reshape((1,) * (4 - t.ndim) + t.shape)

    def pred(b: int, h: int, i: int, p: int, j: int) -> bool:
        bb, hh, ii, jj = (x if s > 1 else 0 for x, s in zip((b, h, i, j), t4.shape, strict=True))
        return bool(t4[bb, hh, ii, jj])

    return pred


def to_np(t: Tensor) -> np.ndarray:
    return t.cpu().numpy().astype(bool)


def expected_states(dense: np.ndarray, bq: int, bk: int) -> np.ndarray:
    """Exact tile states ``(B, H, nQ, nK)`` of a dense bool array, by slicing."""
    bsz, hsz, lq, lk = dense.shape
    nq, nk = math.ceil(lq / bq), math.ceil(lk / bk)
    out = np.zeros((bsz, hsz, nq, nk), dtype=np.int64)
    for qi in range(nq):
        for ki in range(nk):
            tile = dense[:, :, qi * bq : (qi + 1) * bq, ki * bk : (ki + 1) * bk]
            anyv = tile.any(axis=(2, 3))
            allv = tile.all(axis=(2, 3))
            out[:, :, qi, ki] = np.where(~anyv, 0, np.where(allv, 2, 1))
    return out


def check_layout(layout: BlockLayout, dense: np.ndarray, bq: int, bk: int, *, exact: bool) -> None:
    """The layout is consistent with ``dense`` (``(Bm, Hm, lq, lk)``); exact if asked."""
    bm, hm, lq, lk = dense.shape
    nq, nk = math.ceil(lq / bq), math.ceil(lk / bk)
    assert layout.states.dtype == torch.int8
    assert tuple(layout.states.shape) == (bm, hm, nq, nk)
    assert (layout.lq, layout.lk, layout.block_q, layout.block_k) == (lq, lk, bq, bk)
    got = layout.states.cpu().numpy().astype(np.int64)
    assert set(np.unique(got).tolist()) <= {0, 1, 2}
    want = expected_states(dense, bq, bk)
    if exact:
        np.testing.assert_array_equal(got, want)
    else:
        # EMPTY => no True in the tile; FULL => all True.
        assert not ((got == 0) & (want != 0)).any(), "EMPTY tile holds an allowed pair"
        assert not ((got == 2) & (want != 2)).any(), "FULL tile holds a hidden pair"


# Length pairs: Lq == Lk, Lq < Lk and Lq > Lk, with sizes 1, 7, 33.
SIZES = [(1, 1), (7, 7), (33, 33), (1, 7), (7, 33), (1, 33), (7, 1), (33, 7), (33, 1)]
SIZES_LQ_LE_LK = [(lq, lk) for lq, lk in SIZES if lq <= lk]
# Awkward tile sizes: 1, 3, 8, mixed, and larger than every length.
BLOCKS = [(1, 1), (3, 3), (8, 8), (3, 8), (8, 1), (5, 7), (64, 64)]


def assert_mask(
    mask: Mask,
    pred: Pred,
    lq: int,
    lk: int,
    shape_bh: tuple[int, int],
    *,
    batch: int | None = None,
    heads: int = 1,
    exact: bool = True,
) -> np.ndarray:
    """Dense form equals the reference with shape ``(Bm, Hm, lq, lk)``; layouts agree."""
    bm, hm = shape_bh
    want = build(pred, lq, lk, bm, hm)
    got = mask.dense(lq, lk, batch=batch, heads=heads)
    assert got.dtype == torch.bool
    assert tuple(got.shape) == (bm, hm, lq, lk)
    np.testing.assert_array_equal(to_np(got), want)
    for bq, bk in BLOCKS:
        layout = mask.block_layout(lq, lk, bq, bk, batch=batch, heads=heads)
        check_layout(layout, want, bq, bk, exact=exact)
        # The negation's layout is exact too.
        neg = (~mask).block_layout(lq, lk, bq, bk, batch=batch, heads=heads)
        check_layout(neg, ~want, bq, bk, exact=exact)
    np.testing.assert_array_equal(to_np((~mask).dense(lq, lk, batch=batch, heads=heads)), ~want)
    return want


# --------------------------------------------------------------------------- primitives


@pytest.mark.parametrize(("lq", "lk"), SIZES)
def test_causal(lq: int, lk: int) -> None:
    assert_mask(masks.causal(), ref_causal(), lq, lk, (1, 1))


def test_causal_literal() -> None:
    got = masks.causal().dense(2, 4)[0, 0].int().tolist()
    assert got == [[1, 1, 1, 0], [1, 1, 1, 1]]
    got = masks.causal().dense(3, 2)[0, 0].int().tolist()  # the first row sits at -1
    assert got == [[0, 0], [1, 0], [1, 1]]


@pytest.mark.parametrize(("lq", "lk"), SIZES)
@pytest.mark.parametrize(("left", "right"), [(0, 0), (1, 0), (2, 3), (0, 5), (40, 0)])
def test_window(lq: int, lk: int, left: int, right: int) -> None:
    assert_mask(masks.window(left, right), ref_window(left, right), lq, lk, (1, 1))


def test_window_default_right_is_zero() -> None:
    got = masks.window(1).dense(3, 3)[0, 0].int().tolist()
    assert got == [[1, 0, 0], [1, 1, 0], [0, 1, 1]]


@pytest.mark.parametrize(("lq", "lk"), SIZES)
@pytest.mark.parametrize("n", [0, 1, 3, 7, 50])
def test_prefix(lq: int, lk: int, n: int) -> None:
    assert_mask(masks.prefix(n), ref_prefix(n), lq, lk, (1, 1))


@pytest.mark.parametrize(("lq", "lk"), SIZES)
@pytest.mark.parametrize(
    ("key_lengths", "query_lengths"),
    [([0, 3], None), ([5, 40], None), ([1], [1]), ([4, 0, 33], [2, 7, 0]), ([7, 2], [40, 3])],
)
def test_padding(lq: int, lk: int, key_lengths: list[int], query_lengths: list[int] | None) -> None:
    key_lengths = [min(n, lk) for n in key_lengths]  # counts of the call's keys and queries
    query_lengths = None if query_lengths is None else [min(n, lq) for n in query_lengths]
    m = masks.padding(key_lengths, query_lengths)
    n = len(key_lengths)
    assert m.batch_size == n and m.per_batch
    assert_mask(m, ref_padding(key_lengths, query_lengths), lq, lk, (n, 1))
    # The batch size may also be given explicitly (it must match).
    got = m.dense(lq, lk, batch=n, heads=4)
    assert tuple(got.shape) == (n, 1, lq, lk)


def test_padding_accepts_tensors() -> None:
    m = masks.padding(torch.tensor([2, 3]), torch.tensor([1, 2]))
    want = build(ref_padding([2, 3], [1, 2]), 2, 3, 2, 1)
    np.testing.assert_array_equal(to_np(m.dense(2, 3)), want)


CONTIGUOUS_7 = [0, 0, 0, 1, 1, 2, 2]
NONCONTIG_7 = [0, 1, 0, 1, 2, 2, 0]


def _random_ids(n: int, seed: int, contiguous: bool) -> list[int]:
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, 4, size=n).tolist()
    return sorted(ids) if contiguous else ids


DOC_CASES = [
    ([0, 1, 0, 1, 2, 2], [(6, 6), (1, 6), (4, 6)]),
    (CONTIGUOUS_7, [(7, 7), (1, 7), (5, 7)]),
    (NONCONTIG_7, [(7, 7), (1, 7), (3, 7)]),
    ([[0, 0, 1, 1, 1, 2, 2], [0, 1, 1, 1, 1, 1, 1]], [(7, 7), (2, 7)]),  # (B, L) contiguous
    ([[0, 0, 1, 1, 1, 2, 2], [0, 1, 0, 1, 0, 1, 0]], [(7, 7), (2, 7)]),  # one row not
    ([5], [(1, 1)]),
    (_random_ids(33, 0, True), [(33, 33), (7, 33), (1, 33)]),
    (_random_ids(33, 1, False), [(33, 33), (7, 33), (1, 33)]),
    ([_random_ids(33, 2, True), _random_ids(33, 3, False)], [(33, 33), (7, 33)]),
]


@pytest.mark.parametrize(
    ("ids", "lq", "lk"), [(ids, lq, lk) for ids, sizes in DOC_CASES for lq, lk in sizes]
)
def test_documents(ids: list, lq: int, lk: int) -> None:
    m = masks.documents(ids)
    two_d = isinstance(ids[0], list)
    bm = len(ids) if two_d and len(ids) > 1 else 1
    assert m.batch_size == (bm if bm > 1 else None)
    assert_mask(m, ref_documents(ids), lq, lk, (bm, 1))


def test_documents_literal_noncontiguous() -> None:
    got = masks.documents([0, 1, 0, 1, 2, 2]).dense(6, 6)[0, 0].int().tolist()
    assert got == [
        [1, 0, 1, 0, 0, 0],
        [0, 1, 0, 1, 0, 0],
        [1, 0, 1, 0, 0, 0],
        [0, 1, 0, 1, 0, 0],
        [0, 0, 0, 0, 1, 1],
        [0, 0, 0, 0, 1, 1],
    ]


def test_documents_tensor_ids_and_one_row_batch() -> None:
    ids = torch.tensor([[0, 0, 1, 1, 1]])  # (1, L): not tied to a batch size
    m = masks.documents(ids)
    assert m.batch_size is None
    got = m.dense(3, 5, batch=4)
    assert tuple(got.shape) == (1, 1, 3, 5)
    np.testing.assert_array_equal(to_np(got), build(ref_documents([0, 0, 1, 1, 1]), 3, 5))


@pytest.mark.parametrize("inference", [False, True])
@pytest.mark.parametrize("lq", [300, 1])  # a whole call, a decoding step
def test_documents_whose_ids_change_in_place_are_read_again(lq: int, inference: bool) -> None:
    """The runs of each document (the exact row bounds the blocked engine skips by) are
    found again after the ids change in place, as the engine's plan is: kept from the
    mask's making, they went stale (off by 0.91). Under ``torch.inference_mode`` the ids
    have no version counter, and the runs are found at every call."""
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 4, lq, 16, generator=g), torch.randn(2, 4, 300, 16, generator=g)
    with torch.inference_mode(inference):
        ids = torch.arange(300) // 100
        mask = masks.documents(ids)
        first = attnlab.attention(q, k, k, mask=mask, engine="blocked")
        ids[:] = torch.arange(300) // 7
        changed = attnlab.attention(q, k, k, mask=mask, engine="blocked")
        fresh = masks.documents(torch.arange(300) // 7)
        want = attnlab.attention(q.double(), k.double(), k.double(), mask=fresh,
                                 engine="reference")  # fmt: skip
    assert (changed.double() - want).abs().max() < 1e-5
    assert (first.double() - want).abs().max() > 0.1  # positive control: a real change


def test_documents_runs_found_at_a_call_leave_the_engines_cache_keys_alone() -> None:
    """The engines key their caches (decoding bounds, Flex block masks) on the tensors a
    mask holds; the runs found at the first call are derived, so the key stays the same
    and the second call reuses what the first made. The in-place change is the control."""
    from attnlab.engines._versions import versions as _versions

    ids = torch.arange(300) // 70
    mask = masks.documents(ids)
    before = _versions(mask)
    q = torch.randn(1, 2, 300, 16)
    attnlab.attention(q, q, q, mask=mask, engine="blocked")
    assert mask.row_bounds(300, 300) is not None and _versions(mask) == before
    ids.add_(1)
    assert _versions(mask) != before


class _Limits:
    """A callable object holding the tensor its mask reads."""

    def __init__(self) -> None:
        self.lim = torch.tensor([300, 300])

    def __call__(self, b: Tensor, h: Tensor, q: Tensor, k: Tensor) -> Tensor:
        return k < self.lim[b]

    def method(self, b: Tensor, h: Tensor, q: Tensor, k: Tensor) -> Tensor:
        return k < self.lim[b]


def _below(b: Tensor, h: Tensor, q: Tensor, k: Tensor, lim: Tensor) -> Tensor:
    return k < lim[b]


def _custom_masks() -> Iterator[tuple[str, masks.Mask, Tensor]]:
    """A custom mask's function reading a tensor each way one can (and that tensor)."""
    import functools
    import sys
    import types

    t = torch.tensor([300, 300])
    yield "closure", masks.custom(lambda b, h, q, k: k < t[b], per_head=False), t
    t2 = torch.tensor([300, 300])
    yield "partial", masks.custom(functools.partial(_below, lim=t2), per_head=False), t2
    t3 = torch.tensor([300, 300])
    yield "default", masks.custom(lambda b, h, q, k, lim=t3: k < lim[b], per_head=False), t3
    obj = _Limits()
    yield "callable object", masks.custom(obj, per_head=False), obj.lim
    obj2 = _Limits()
    yield "bound method", masks.custom(obj2.method, per_head=False), obj2.lim
    mod = types.ModuleType("_attnlab_test_limits")
    mod.lim = torch.tensor([300, 300])  # type: ignore[attr-defined]
    sys.modules[mod.__name__] = mod
    fn = eval("lambda b, h, q, k: k < mod.lim[b]", {"mod": mod})  # a module it names
    yield "module attribute", masks.custom(fn, per_head=False), mod.lim  # type: ignore[attr-defined]


def test_the_cache_key_follows_every_tensor_a_custom_mask_reads() -> None:
    """The flex and blocked engines key a mask's plan on the tensors it reads; through a
    ``functools.partial``, a default argument, a callable object, a bound method or a
    module's attribute they were missed, and compiled flex kept a stale layout after an
    in-place change (off by 1.34)."""
    from attnlab.engines._versions import versions as _versions

    for name, mask, t in _custom_masks():
        before = _versions(mask)
        assert _versions(mask) == before, name  # the same when nothing changed
        t.fill_(100)
        assert _versions(mask) != before, name
    vocab = {f"tok{i}": i for i in range(200_000)}  # a wide default argument: not searched
    wide = masks.custom(lambda b, h, q, k, _vocab=vocab: q >= k, per_head=False)
    assert _versions(wide) == ()  # (its entries were walked on every call: 50 ms each)


@pytest.mark.parametrize(("lq", "lk"), SIZES)
@pytest.mark.parametrize("indices", [[0], [3], [0, 6, 32], [], [100]])
def test_global_tokens(lq: int, lk: int, indices: list[int]) -> None:
    assert_mask(masks.global_tokens(indices), ref_global(indices), lq, lk, (1, 1))


@pytest.mark.parametrize(("lq", "lk"), SIZES)
@pytest.mark.parametrize(("w", "d"), [(0, 1), (2, 1), (2, 2), (5, 3), (40, 2), (3, 7)])
def test_dilated(lq: int, lk: int, w: int, d: int) -> None:
    assert_mask(masks.dilated(w, d), ref_dilated(w, d), lq, lk, (1, 1))


def test_dilated_layout_is_exact_small() -> None:
    # Every 1x1 tile is either fully allowed or fully hidden: no PARTIAL tile may appear.
    layout = masks.dilated(2, 2).block_layout(4, 4, 1, 1)
    want = build(ref_dilated(2, 2), 4, 4)[0, 0].astype(np.int64) * 2
    assert layout.states[0, 0].tolist() == want.tolist()
    assert layout.count(TileState.PARTIAL) == 0


@pytest.mark.parametrize(("lq", "lk"), SIZES)
@pytest.mark.parametrize(("bs", "nb", "seed"), [(1, 1, 0), (2, 1, 0), (3, 2, 5), (8, 3, 1)])
def test_block_random_structure(lq: int, lk: int, bs: int, nb: int, seed: int) -> None:
    m = masks.block_random(bs, nb, seed=seed)
    got = to_np(m.dense(lq, lk))
    assert got.shape == (1, 1, lq, lk)
    n_blocks = math.ceil(lk / bs)
    chosen: dict[int, set[int]] = {}
    for i in range(lq):
        p = i + lk - lq
        row = got[0, 0, i]
        if p < 0:
            assert not row.any(), f"row {i} at position {p} must see nothing"
            continue
        blocks = {j // bs for j in range(lk) if row[j]}
        assert len(blocks) == min(nb, n_blocks)
        # Whole key blocks are visible.
        for j in range(lk):
            assert row[j] == (j // bs in blocks)
        # Every row of one query block sees the same key blocks.
        assert chosen.setdefault(p // bs, blocks) == blocks
    # Same seed: same mask; the choice depends on positions, not rows.
    np.testing.assert_array_equal(to_np(masks.block_random(bs, nb, seed=seed).dense(lq, lk)), got)
    if lq <= lk:
        square = to_np(m.dense(lk, lk))
        np.testing.assert_array_equal(got, square[:, :, lk - lq :, :])
    for bq, bk in BLOCKS:
        check_layout(m.block_layout(lq, lk, bq, bk), got, bq, bk, exact=True)


def test_block_random_counts_literal() -> None:
    got = masks.block_random(2, 1, seed=0).dense(4, 4)
    assert int(got.sum()) == 8
    got = masks.block_random(1, 10, seed=0).dense(5, 5)  # more blocks than exist: all
    assert bool(got.all())
    got = masks.block_random(3, 0, seed=0).dense(5, 5)
    assert not bool(got.any())


def test_block_random_seeds_differ() -> None:
    dense = [to_np(masks.block_random(2, 2, seed=s).dense(32, 32)) for s in range(6)]
    assert any(not np.array_equal(dense[0], d) for d in dense[1:])
    assert np.array_equal(dense[3], to_np(masks.block_random(2, 2, seed=3).dense(32, 32)))


def test_block_random_depends_on_lk_and_a_sliced_table_decodes_as_one_pass() -> None:
    """block_random draws its table per key block count, as its docstring now says: one
    (position, key) pair is allowed at Lk=4 and hidden at Lk=5, so cached decoding
    differed from one pass (position 5: 1.54 apart). The documented recipe, one table
    sliced into masks.tensor per step, decodes as the pass does (fp64, by hand)."""
    m = masks.causal() & masks.block_random(2, 1, seed=0)
    assert m.dense(4, 4)[0, 0, 2, 2] and not m.dense(5, 5)[0, 0, 2, 2]
    full = m.dense(8, 8)  # (1, 1, 8, 8)
    q, k, v = (torch.randn(1, 1, 8, 16, dtype=torch.float64) for _ in range(3))
    s = (q @ k.transpose(-1, -2) / 4.0).masked_fill(~full, float("-inf"))
    want = torch.softmax(s, -1).nan_to_num(0.0) @ v  # rows that see nothing give 0
    for t in range(8):
        step = masks.tensor(full[..., t : t + 1, : t + 1])
        got = attnlab.attention(q[:, :, t : t + 1], k[:, :, : t + 1], v[:, :, : t + 1], mask=step)
        assert isinstance(got, Tensor)
        assert (got[:, :, 0] - want[:, :, t]).abs().max() < 1e-12, t


CUSTOMS: list[tuple[str, Callable, Pred, bool, bool]] = [
    (
        "bh",
        lambda b, h, q, k: (q + 2 * k + b + h) % 3 == 0,
        lambda b, h, i, p, j: (p + 2 * j + b + h) % 3 == 0,
        True,
        True,
    ),
    (
        "h",
        lambda b, h, q, k: k <= q + h,
        lambda b, h, i, p, j: j <= p + h,
        False,
        True,
    ),
    (
        "b",
        lambda b, h, q, k: (k + b) % 2 == 0,
        lambda b, h, i, p, j: (j + b) % 2 == 0,
        True,
        False,
    ),
    (
        "none",
        lambda b, h, q, k: (q - k).abs() % 4 == 1,
        lambda b, h, i, p, j: abs(p - j) % 4 == 1,
        False,
        False,
    ),
]


@pytest.mark.parametrize(("lq", "lk"), SIZES)
@pytest.mark.parametrize("case", CUSTOMS, ids=[c[0] for c in CUSTOMS])
def test_custom(lq: int, lk: int, case: tuple) -> None:
    _, fn, pred, per_batch, per_head = case
    m = masks.custom(fn, per_batch=per_batch, per_head=per_head)
    shape = (2 if per_batch else 1, 3 if per_head else 1)
    assert_mask(m, pred, lq, lk, shape, batch=2, heads=3)


def test_custom_per_head_dense_shape() -> None:
    m = masks.custom(lambda b, h, q, k: k <= q - h, per_batch=False, per_head=True)
    got = m.dense(4, 6, heads=3)
    assert tuple(got.shape) == (1, 3, 4, 6)
    np.testing.assert_array_equal(to_np(got), build(lambda b, h, i, p, j: j <= p - h, 4, 6, 1, 3))


def test_custom_receives_broadcast_index_tensors() -> None:
    seen: list[tuple] = []

    def fn(b: Tensor, h: Tensor, q: Tensor, k: Tensor) -> Tensor:
        seen.append((tuple(b.shape), tuple(h.shape), q.flatten().tolist(), k.flatten().tolist()))
        return k >= 0

    masks.custom(fn).dense(2, 3, batch=4, heads=5)
    assert seen[0] == ((4, 1, 1, 1), (1, 5, 1, 1), [1, 2], [0, 1, 2])


def test_custom_defaults_vary_with_batch_and_head() -> None:
    m = masks.custom(lambda b, h, q, k: (b + h + q + k) % 2 == 0)
    assert m.per_batch and m.per_head
    assert tuple(m.dense(3, 3, batch=2, heads=2).shape) == (2, 2, 3, 3)


@pytest.mark.parametrize(("lq", "lk"), SIZES)
@pytest.mark.parametrize("shape", ["2d", "3d", "4d", "4d_b", "row", "col"])
def test_tensor(lq: int, lk: int, shape: str) -> None:
    rng = np.random.default_rng(lq * 100 + lk)
    dims = {
        "2d": (lq, lk),
        "3d": (3, lq, lk),
        "4d": (2, 3, lq, lk),
        "4d_b": (2, 1, lq, lk),
        "row": (1, lk),  # broadcast over queries
        "col": (1, 1, lq, 1),  # broadcast over keys
    }[shape]
    arr = rng.random(dims) < 0.5
    arr4 = arr.reshape((1,) * (4 - arr.ndim) + arr.shape)
    bm, hm = arr4.shape[0], arr4.shape[1]
    t = torch.from_numpy(arr)
    for m in (masks.tensor(t), masks.as_mask(t)):
        assert isinstance(m, Mask)
        assert m.batch_size == (bm if bm > 1 else None)
        assert_mask(m, ref_tensor(arr), lq, lk, (bm, hm), heads=hm)


def test_tensor_operand_in_combination() -> None:
    t = torch.tensor([[True, False, True], [False, True, True]])
    got = (masks.causal() & t).dense(2, 3)[0, 0].int().tolist()
    assert got == [[1, 0, 0], [0, 1, 1]]
    got = (masks.causal() | t).dense(2, 3)[0, 0].int().tolist()
    assert got == [[1, 1, 1], [1, 1, 1]]


def test_as_mask_passthrough() -> None:
    m = masks.causal()
    assert masks.as_mask(m) is m
    assert masks.as_mask(None) is None


# --------------------------------------------------------------------------- combinators


def test_combination_literal() -> None:
    m = masks.causal() & masks.window(2)
    assert m.dense(4, 4)[0, 0].int().tolist() == [
        [1, 0, 0, 0],
        [1, 1, 0, 0],
        [1, 1, 1, 0],
        [0, 1, 1, 1],
    ]
    m = masks.window(0) | masks.global_tokens([0])
    assert m.dense(3, 3)[0, 0].int().tolist() == [[1, 1, 1], [1, 1, 0], [1, 0, 1]]
    m = ~masks.causal()
    assert m.dense(2, 2)[0, 0].int().tolist() == [[0, 1], [0, 0]]


@pytest.mark.parametrize(("lq", "lk"), [*SIZES_LQ_LE_LK, (9, 4)])
def test_combination_shapes_and_values(lq: int, lk: int) -> None:
    pad = masks.padding([lk, max(lk - 2, 0)], [lq, max(lq - 1, 0)])
    head = masks.custom(lambda b, h, q, k: k == q - h, per_batch=False, per_head=True)
    m = (masks.causal() | masks.global_tokens([1])) & pad & ~head
    assert m.per_batch and m.per_head and m.batch_size == 2
    pc, pg = ref_causal(), ref_global([1])
    pp = ref_padding([lk, max(lk - 2, 0)], [lq, max(lq - 1, 0)])

    def pred(b: int, h: int, i: int, p: int, j: int) -> bool:
        return (pc(b, h, i, p, j) or pg(b, h, i, p, j)) and pp(b, h, i, p, j) and j != p - h

    want = build(pred, lq, lk, 2, 3)
    got = m.dense(lq, lk, heads=3)
    assert tuple(got.shape) == (2, 3, lq, lk)
    np.testing.assert_array_equal(to_np(got), want)
    for bq, bk in BLOCKS:
        check_layout(m.block_layout(lq, lk, bq, bk, heads=3), want, bq, bk, exact=False)


def test_combination_layout_is_conservative_but_sound() -> None:
    # causal & ~causal is empty everywhere; evaluated inside causal's intervals (an outer
    # bound of the &), its layout is exact: every tile empty (the diagonal ones were
    # PARTIAL when the parts' layouts were combined tile by tile).
    m = masks.causal() & ~masks.causal()
    assert not bool(m.dense(8, 8).any())
    layout = m.block_layout(8, 8, 4, 4)
    assert layout.count(TileState.FULL) == 0
    assert layout.states[0, 0].tolist() == [[0, 0], [0, 0]]
    # causal | ~causal allows everything.
    m = masks.causal() | ~masks.causal()
    assert bool(m.dense(8, 8).all())
    assert m.block_layout(8, 8, 4, 4).count(TileState.EMPTY) == 0


def test_combinations_flatten_and_repr() -> None:
    m = masks.causal() & masks.window(3) & masks.prefix(2)
    assert repr(m).startswith("(causal() & window(left=3, right=0) & prefix(2))")
    assert repr(~masks.causal()).startswith("~causal()")


# --------------------------------------------------------------------------- layouts


def test_layout_docstring_example_and_str() -> None:
    layout = masks.causal().block_layout(256, 256, 64, 64)
    assert str(layout) == (
        "BlockLayout(256x256, tiles 64x64: 6 full, 4 partial, 6 empty; 62.5% of tiles computed)"
    )
    assert layout.computed_fraction == pytest.approx(10 / 16)


@pytest.mark.parametrize(
    "mask",
    [masks.window(3, 1), masks.documents(NONCONTIG_7 * 3), masks.padding([5, 21])],
    ids=["window", "documents", "padding"],
)
def test_layout_str_contains_counts(mask: Mask) -> None:
    layout = mask.block_layout(21, 21, 4, 3)
    s = layout.states
    full, part, empty = (int((s == v).sum()) for v in (2, 1, 0))
    assert full + part + empty == s.numel()
    assert layout.count(TileState.FULL) == full
    assert layout.count(TileState.PARTIAL) == part
    assert layout.count(TileState.EMPTY) == empty
    text = str(layout)
    assert f"{full} full, {part} partial, {empty} empty" in text
    assert f"{100 * (full + part) / s.numel():.1f}% of tiles computed" in text
    assert text.startswith("BlockLayout(21x21, tiles 4x3:")


def test_layout_default_block_sizes() -> None:
    layout = masks.causal().block_layout(130, 70)
    assert (layout.block_q, layout.block_k) == (64, 64)
    assert tuple(layout.states.shape) == (1, 1, 3, 2)
    check_layout(layout, build(ref_causal(), 130, 70), 64, 64, exact=True)


def test_layout_by_evaluation_in_several_chunks() -> None:
    # 4 x 4 batch/heads, 64-row tiles and 600 keys: the evaluation takes a few query blocks
    # at a time (2**22 values per chunk), so 21 query blocks need several chunks; the last
    # tile row and column are short.
    lq, lk, bq, bk, nb = 1300, 600, 64, 48, 4
    assert 4 * 4 * bq * lk * math.ceil(lq / bq) > 2 * 2**22
    m = masks.custom(lambda b, h, q, k: ((q // 50 + k // 70 + b + h) % 3 == 0) | (q == k))
    layout = m.block_layout(lq, lk, bq, bk, batch=nb, heads=nb)
    b = np.arange(nb).reshape(-1, 1, 1, 1)
    h = np.arange(nb).reshape(1, -1, 1, 1)
    q = (np.arange(lq) + lk - lq).reshape(1, 1, -1, 1)
    k = np.arange(lk).reshape(1, 1, 1, -1)
    want = ((q // 50 + k // 70 + b + h) % 3 == 0) | (q == k)
    check_layout(layout, want, bq, bk, exact=True)


ZERO_LENGTH_MASKS = {
    "causal": masks.causal(),
    "window": masks.window(1, 2),
    "prefix": masks.prefix(2),
    "padding": None,  # made for each call's sizes: lengths count its keys and queries
    "global": masks.global_tokens([0]),
    "dilated1": masks.dilated(1, 1),
    "dilated3": masks.dilated(4, 3),
    "random": masks.block_random(2, 1),
    "custom": masks.custom(lambda b, h, q, k: q >= k),
    "combined": None,
}


@pytest.mark.parametrize("name", list(ZERO_LENGTH_MASKS))
@pytest.mark.parametrize(("lq", "lk"), [(0, 5), (5, 0), (0, 0)])
def test_zero_lengths(name: str, lq: int, lk: int) -> None:
    m = ZERO_LENGTH_MASKS[name]
    if name == "padding":
        m = masks.padding([min(1, lk), 0], [0, min(1, lq)])
    elif name == "combined":
        m = masks.causal() & ~masks.padding([min(1, lk), 0]) | masks.window(1)
    assert m is not None
    dense = m.dense(lq, lk, batch=2)
    assert dense.shape[2:] == (lq, lk)
    layout = m.block_layout(lq, lk, 4, 3, batch=2)
    assert tuple(layout.states.shape) == (*dense.shape[:2], math.ceil(lq / 4), math.ceil(lk / 3))


def test_documents_zero_queries() -> None:
    m = masks.documents([0, 0, 1, 1, 1])
    assert tuple(m.dense(0, 5).shape) == (1, 1, 0, 5)
    assert tuple(m.block_layout(0, 5, 2, 2).states.shape) == (1, 1, 0, 3)


@pytest.mark.parametrize(
    ("mask", "pred", "lq", "lk"),
    [
        (masks.causal(), ref_causal(), 100, 100),
        (masks.window(5, 2), ref_window(5, 2), 40, 70),
        (masks.prefix(4), ref_prefix(4), 70, 40),
    ],
    ids=["causal", "window", "prefix"],
)
@pytest.mark.parametrize(("bq", "bk"), [(1, 64), (64, 1), (7, 9), (16, 16), (128, 3)])
def test_layout_exact_larger(mask: Mask, pred: Pred, lq: int, lk: int, bq: int, bk: int) -> None:
    check_layout(mask.block_layout(lq, lk, bq, bk), build(pred, lq, lk), bq, bk, exact=True)


# --------------------------------------------------------------------------- display


@pytest.mark.parametrize(
    ("mask", "pred", "n"),
    [
        (masks.causal(), ref_causal(), 256),
        (masks.window(4, 4), ref_window(4, 4), 256),
        (masks.global_tokens([0, 5]), ref_global([0, 5]), 256),
        (masks.documents(CONTIGUOUS_7), ref_documents(CONTIGUOUS_7), 7),
    ],
    ids=["causal", "window", "global", "documents"],
)
def test_repr_shows_visible_percentage(mask: Mask, pred: Pred, n: int) -> None:
    frac = build(pred, n, n).mean()
    text = repr(mask)
    assert "% visible" in text
    assert f"[{100 * frac:.1f}% visible at {n}x{n}]" in text


def test_repr_padding_uses_natural_length() -> None:
    # padding([2, 3]) at 3x3: batch 0 allows 6 of 9, batch 1 all 9: 15 / 18.
    assert repr(masks.padding([2, 3])) == "padding(key_lengths=[2, 3])  [83.3% visible at 3x3]"
    assert repr(masks.causal()) == "causal()  [50.2% visible at 256x256]"
    # past 2048 positions the spec alone: the fraction costs n x n (100,000 keys took 39 s)
    long = masks.padding([100_000])
    assert repr(long) == long.spec() == "padding(key_lengths=[100000])"


def test_repr_of_non_square_tensor_mask_does_not_raise() -> None:
    t = torch.ones(3, 5, dtype=torch.bool)
    text = repr(masks.tensor(t))
    assert text.startswith("tensor(shape=(1, 1, 3, 5))")
    text = repr(masks.documents([0, 0, 1]) & torch.ones(2, 2, dtype=torch.bool))
    assert "documents(2 documents, length 3)" in text


def test_documents_spec_counts_every_row() -> None:
    """(B, L) ids: each row's documents, counted by hand; it said row 0's "1 documents"."""
    rows = [[0, 0, 0, 0], [0, 1, 2, 3], [7, 7, 9, 9]]  # 1, 4 and 2 documents
    assert len({*rows[0]}) == 1 and len({*rows[1]}) == 4 and len({*rows[2]}) == 2
    assert masks.documents(rows).spec() == "documents(3 rows of 1-4 documents, length 4)"
    assert masks.documents(rows[:1] * 2).spec() == "documents(2 rows of 1 document, length 4)"
    assert masks.documents(rows[0]).spec() == "documents(1 document, length 4)"
    assert masks.documents(rows[2]).spec() == "documents(2 documents, length 4)"  # control
    empty = masks.documents(torch.zeros(0, 4, dtype=torch.long))
    assert empty.spec() == "documents(0 documents, length 4)"


@pytest.mark.parametrize(("lq", "lk"), [(1, 1), (7, 33), (33, 7), (600, 520)])
def test_visible_fraction(lq: int, lk: int) -> None:
    m = masks.window(9, 2) | masks.global_tokens([3])
    p = np.arange(lq).reshape(-1, 1) + lk - lq
    j = np.arange(lk).reshape(1, -1)
    want = ((j >= p - 9) & (j <= p + 2)) | (p == 3) | (j == 3)
    assert m.visible_fraction(lq, lk) == pytest.approx(want.mean())


@pytest.mark.parametrize(
    ("huge", "same"),
    [
        (lambda: masks.window(0, sys.maxsize), lambda: masks.window(0, 99)),
        (lambda: masks.window(2**64), lambda: masks.window(99)),
        (lambda: masks.prefix(2**64), lambda: masks.prefix(99)),
        (lambda: masks.dilated(sys.maxsize, 1), lambda: masks.dilated(99, 1)),
        (lambda: masks.dilated(3, 2**64), lambda: masks.dilated(3, 99)),
        (lambda: masks.block_random(2**64, 1), lambda: masks.block_random(99, 1)),
    ],
)
def test_sizes_past_int64_reach_the_keys_a_size_past_the_sequence_does(
    huge: Callable[[], masks.Mask], same: Callable[[], masks.Mask]
) -> None:
    """(window(0, sys.maxsize) wrapped around int64 and hid every key in the blocked
    engine; window(2**64) and prefix(2**64) raised OverflowError / int64_t errors.)"""
    q = torch.randn(1, 2, 7, 4, dtype=torch.float64)
    want = attnlab.attention(q, q, q, mask=same(), engine="reference")
    assert torch.equal(huge().dense(7, 7), same().dense(7, 7))
    for engine in ("reference", "blocked"):
        got = attnlab.attention(q, q, q, mask=huge(), engine=engine)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    with pytest.raises(
        ValueError, match=r"seed must be an int in \[0, 2\*\*64\), got 18446744073709551616"
    ):
        masks.block_random(2, 1, seed=2**64)


def test_visible_fraction_counts_every_head_and_names_wrong_sizes() -> None:
    """(Only head 0 was counted: a tensor mask whose head 1 is all True gave 0.0; a
    documents mask of length 3 at 5 x 5 raised a bare IndexError.)"""
    t = torch.rand(2, 3, 4, 6) < 0.4  # (B, H, Lq, Lk), every head different
    assert masks.tensor(t).visible_fraction(4, 6) == pytest.approx(t.double().mean().item())
    both = masks.tensor(t) & masks.causal()
    want = (t & masks.causal().dense(4, 6)).double().mean().item()
    assert both.visible_fraction(4, 6) == pytest.approx(want)
    fn = masks.custom(lambda b, h, q, k: (h == 0) & (k >= 0), per_head=True)
    with pytest.raises(ValueError, match="has no head count of its own; pass heads=H"):
        fn.visible_fraction(3, 3)
    assert fn.visible_fraction(3, 3, heads=4) == 0.25
    check_and_control(
        lambda: masks.documents([0, 0, 1]).visible_fraction(5, 5),
        lambda: masks.documents([0, 0, 1]).visible_fraction(3, 3),
        ValueError,
        "has doc_ids of length 3 but the call has Lq=5, Lk=5",
    )


# --------------------------------------------------------------------------- errors


def test_window_negative_left() -> None:
    check_and_control(
        lambda: masks.window(-1),
        lambda: masks.window(0),
        ValueError,
        "left must be a non-negative int, got -1",
    )
    check_and_control(
        lambda: masks.window(1, -2),
        lambda: masks.window(1, 0),
        ValueError,
        "right must be a non-negative int, got -2",
    )
    check_and_control(
        lambda: masks.window(1.5),
        lambda: masks.window(1),
        TypeError,
        r"left must be an int, got float 1\.5",
    )


def test_dilated_zero_dilation() -> None:
    check_and_control(
        lambda: masks.dilated(2, 0),
        lambda: masks.dilated(2, 1),
        ValueError,
        "dilation must be a positive int, got 0",
    )


def test_prefix_and_block_random_arguments() -> None:
    check_and_control(
        lambda: masks.prefix(-1), lambda: masks.prefix(0), ValueError, "n must be a non-negative"
    )
    check_and_control(
        lambda: masks.block_random(0, 1),
        lambda: masks.block_random(1, 1),
        ValueError,
        "block_size must be a positive int, got 0",
    )
    check_and_control(
        lambda: masks.block_random(2, -1),
        lambda: masks.block_random(2, 0),
        ValueError,
        "num_blocks must be a non-negative int, got -1",
    )


def test_padding_float_lengths() -> None:
    check_and_control(
        lambda: masks.padding([1.0, 2.0]),
        lambda: masks.padding([1, 2]),
        TypeError,
        "key_lengths must hold integers, got dtype torch.float32",
    )
    check_and_control(
        lambda: masks.padding([1, 2], [1.5, 2.0]),
        lambda: masks.padding([1, 2], [1, 2]),
        TypeError,
        "query_lengths must hold integers",
    )


def test_padding_lengths_shape_and_sign() -> None:
    check_and_control(
        lambda: masks.padding([1, 2], [1]),
        lambda: masks.padding([1, 2], [1, 1]),
        ValueError,
        r"query_lengths has shape \(1,\) but key_lengths has \(2,\)",
    )
    check_and_control(
        lambda: masks.padding([1, -2]),
        lambda: masks.padding([1, 2]),
        ValueError,
        r"key_lengths must be >= 0, got \[1, -2\]",
    )


def test_padding_batch_mismatch() -> None:
    m = masks.padding([2, 3])
    msg = "mask=padding\\(...\\) holds 2 lengths but the batch size is 3"
    check_and_control(
        lambda: m.check(batch=3, heads=1, lq=4, lk=4),
        lambda: m.check(batch=2, heads=1, lq=4, lk=4),
        ValueError,
        msg,
    )
    check_and_control(
        lambda: m.dense(4, 4, batch=3), lambda: m.dense(4, 4, batch=2), ValueError, msg
    )
    check_and_control(
        lambda: m.block_layout(4, 4, 2, 2, batch=3),
        lambda: m.block_layout(4, 4, 2, 2, batch=2),
        ValueError,
        msg,
    )


def test_padding_lengths_past_the_call_are_named() -> None:
    """A length counts the call's keys (queries): one past ``Lk`` (``Lq``) was taken as
    every key (row) valid, with no word; now a ValueError, through ``attention`` too."""
    m = masks.padding([2, 5], query_lengths=[3, 1])
    msg = r"key_lengths=\[2, 5\] but the call has Lk=4; expected key_lengths <= Lk"
    check_and_control(lambda: m.dense(3, 4), lambda: m.dense(3, 5), ValueError, msg)
    msg = r"query_lengths=\[3, 1\] but the call has Lq=2; expected query_lengths <= Lq"
    check_and_control(lambda: m.dense(2, 5), lambda: m.dense(3, 5), ValueError, msg)
    q, k = torch.randn(2, 1, 3, 8), torch.randn(2, 1, 4, 8)
    check_and_control(
        lambda: attnlab.attention(q, k, k, mask=masks.padding([2, 5])),
        lambda: attnlab.attention(q, k, k, mask=masks.padding([2, 4])),
        ValueError,
        r"mask=padding\(...\) has key_lengths=\[2, 5\] but the call has Lk=4",
    )
    both = masks.causal() & masks.padding(torch.tensor([4, 6]))
    with pytest.raises(ValueError, match="key_lengths=\\[4, 6\\] but the call has Lk=5"):
        both.dense(5, 5)


def test_padding_reads_its_lengths_once_and_again_after_a_change(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The largest length is read with the construction's check and kept while the
    lengths are unchanged (no read per call: a sync per layer where they live on a GPU);
    a change in place is seen."""
    lengths = torch.tensor([3, 2])
    m = masks.padding(lengths)

    def no_read(*args: object, **kwargs: object) -> None:
        raise AssertionError("the lengths were read again")

    with monkeypatch.context() as patch:
        patch.setattr(Tensor, "max", no_read)
        patch.setattr(Tensor, "tolist", no_read)
        for _ in range(3):
            m.check(batch=2, heads=1, lq=1, lk=3)
    lengths[0] = 4  # in place: read again
    with pytest.raises(ValueError, match=r"key_lengths=\[4, 2\] but the call has Lk=3"):
        m.check(batch=2, heads=1, lq=1, lk=3)
    lengths[0] = 1
    m.check(batch=2, heads=1, lq=1, lk=3)


def test_padding_keeps_its_longest_length_for_the_tensor_read() -> None:
    """The largest length kept with the check answered for any tensor at the same
    address and version: lengths set to another view of the same buffer ([2, 9] where
    [2, 3] was read) passed a call of Lk=4 that a fresh mask refuses. Copies share the
    kept values (flex's ``moved``) and cannot take each other's."""
    buf = torch.tensor([[2, 9], [3, 9]])
    m = masks.padding(buf[:, 0])  # [2, 3]
    m.kl = buf[0]  # [2, 9]: same storage, offset, version counter and dtype
    fresh = masks.padding(buf[0].clone())
    assert m.natural_length == fresh.natural_length == 9
    for mask in (fresh, m):
        with pytest.raises(ValueError, match=r"key_lengths=\[2, 9\] but the call has Lk=4"):
            mask.check(batch=2, heads=1, lq=1, lk=4)
    lengths = torch.tensor([2, 3])
    m = masks.padding(lengths)
    moved = copy.copy(m)  # (as flex's moved: a shallow copy, then its own lengths)
    moved.kl = buf[0]
    with pytest.raises(ValueError, match=r"key_lengths=\[2, 9\] but the call has Lk=4"):
        moved.check(batch=2, heads=1, lq=1, lk=4)
    m.check(batch=2, heads=1, lq=1, lk=3)  # the original's own, kept
    for again in (copy.deepcopy(m), pickle.loads(pickle.dumps(m))):  # (start empty)
        assert again.natural_length == 3
        again.check(batch=2, heads=1, lq=1, lk=3)


def test_documents_wrong_length() -> None:
    m = masks.documents([0, 0, 1])
    msg = r"doc_ids of length 3 but the call has Lq=4, Lk=4; expected Lk == 3 and Lq <= Lk"
    check_and_control(lambda: m.dense(4, 4), lambda: m.dense(3, 3), ValueError, msg)
    check_and_control(
        lambda: m.dense(4, 3),
        lambda: m.dense(2, 3),
        ValueError,
        r"Lq=4, Lk=3; expected Lk == 3 and Lq <= Lk",
    )
    check_and_control(
        lambda: m.block_layout(3, 5, 2, 2),
        lambda: m.block_layout(3, 3, 2, 2),
        ValueError,
        "doc_ids of length 3",
    )


def test_documents_batch_mismatch_and_types() -> None:
    m = masks.documents([[0, 1], [1, 1]])
    check_and_control(
        lambda: m.dense(2, 2, batch=3),
        lambda: m.dense(2, 2, batch=2),
        ValueError,
        "doc_ids for 2 batch items but the batch size is 3",
    )
    check_and_control(
        lambda: masks.documents([0.0, 1.0]),
        lambda: masks.documents([0, 1]),
        TypeError,
        "doc_ids must hold integers",
    )
    check_and_control(
        lambda: masks.documents([[[0]]]),
        lambda: masks.documents([[0]]),
        ValueError,
        r"doc_ids must have rank 1 or 2, got shape \(1, 1, 1\)",
    )


def test_float_tensor_mask() -> None:
    check_and_control(
        lambda: masks.as_mask(torch.zeros(2, 2)),
        lambda: masks.as_mask(torch.zeros(2, 2, dtype=torch.bool)),
        TypeError,
        "mask= got a tensor of dtype torch.float32.*Pass additive float tensors as bias=",
    )
    check_and_control(
        lambda: masks.causal() & torch.zeros(2, 2),
        lambda: masks.causal() & torch.zeros(2, 2, dtype=torch.bool),
        TypeError,
        "bias=",
    )
    check_and_control(
        lambda: masks.tensor(torch.zeros(2, 2)),
        lambda: masks.tensor(torch.zeros(2, 2, dtype=torch.bool)),
        TypeError,
        "mask tensor must be a bool tensor",
    )
    check_and_control(
        lambda: masks.as_mask([[True]]),
        lambda: masks.as_mask(torch.tensor([[True]])),
        TypeError,
        "mask= expects an attnlab.masks.Mask, a bool tensor or None, got list",
    )


def test_tensor_mask_shape_errors() -> None:
    check_and_control(
        lambda: masks.tensor(torch.ones(5, dtype=torch.bool)),
        lambda: masks.tensor(torch.ones(1, 5, dtype=torch.bool)),
        ValueError,
        r"mask tensor must have rank 2 .* got shape \(5,\)",
    )
    m = masks.tensor(torch.ones(3, 4, dtype=torch.bool))
    check_and_control(
        lambda: m.dense(3, 5),
        lambda: m.dense(3, 4),
        ValueError,
        r"mask tensor of shape \(1, 1, 3, 4\) does not broadcast to \(B, H, Lq, Lk\) = "
        r"\(1, 1, 3, 5\)",
    )


def test_combining_different_batch_sizes() -> None:
    msg = re.escape("cannot combine masks tied to different batch sizes [2, 3]")
    check_and_control(
        lambda: masks.padding([1, 2]) & masks.padding([1, 2, 3]),
        lambda: masks.padding([1, 2]) & masks.padding([3, 4]),
        ValueError,
        msg,
    )
    check_and_control(
        lambda: masks.padding([1, 2, 3]) | masks.documents([[0, 1], [1, 1]]),
        lambda: masks.padding([1, 2]) | masks.documents([[0, 1], [1, 1]]),
        ValueError,
        msg,
    )
    check_and_control(
        lambda: (masks.causal() & masks.padding([1, 2])) | ~masks.padding([1, 2, 3]),
        lambda: (masks.causal() & masks.padding([1, 2])) | ~masks.padding([1, 2]),
        ValueError,
        msg,
    )


@pytest.mark.parametrize(("bq", "bk"), [(0, 4), (4, 0), (-1, 4), (4, -3)])
def test_block_sizes_must_be_positive(bq: int, bk: int) -> None:
    check_and_control(
        lambda: masks.causal().block_layout(8, 8, bq, bk),
        lambda: masks.causal().block_layout(8, 8, 1, 1),
        ValueError,
        f"block_{'q' if bq < 1 else 'k'} must be a positive int, got {min(bq, bk)}",
    )


def test_custom_errors() -> None:
    check_and_control(
        lambda: masks.custom(3),  # type: ignore[arg-type]
        lambda: masks.custom(lambda b, h, q, k: q >= k),
        TypeError,
        "fn must be callable",
    )
    check_and_control(
        lambda: masks.custom(lambda b, h, q, k: (q - k).float()).dense(2, 2),
        lambda: masks.custom(lambda b, h, q, k: q >= k).dense(2, 2),
        TypeError,
        "custom mask fn must return a bool tensor, got torch.float32",
    )
    check_and_control(
        lambda: masks.custom(lambda b, h, q, k: None).dense(2, 2),  # type: ignore[arg-type,return-value]
        lambda: masks.custom(lambda b, h, q, k: q >= k).dense(2, 2),
        TypeError,
        r"mask=custom\(<lambda>\): custom mask fn must return a bool tensor, got NoneType",
    )
    # a result that does not broadcast to the grid: (3,) for 5 keys, or an extra batch
    for wrong in (torch.ones(3, dtype=torch.bool), torch.ones(2, 1, 1, 1, 1, dtype=torch.bool)):
        check_and_control(
            lambda wrong=wrong: masks.custom(lambda b, h, q, k: wrong).dense(4, 5, heads=2),
            lambda: masks.custom(lambda b, h, q, k: torch.ones(5, dtype=torch.bool)).dense(4, 5),
            ValueError,
            rf"mask=custom\(<lambda>\): fn returned shape {re.escape(str(tuple(wrong.shape)))}, "
            r"expected a bool tensor broadcastable to \(1, 2, 4, 5\) "
            r"\(batch, heads, queries, keys\)",
        )
    # in every engine that evaluates it: by tiles (blocked) and dense (reference)
    q = torch.randn(1, 1, 4, 8)
    bad = masks.custom(lambda b, h, qq, k: torch.ones(3, dtype=torch.bool))
    for engine in ("reference", "blocked", "sdpa"):
        with pytest.raises(ValueError, match=r"fn returned shape \(3,\)"):
            attnlab.attention(q, q, q, mask=bad, engine=engine)


def test_global_tokens_negative() -> None:
    check_and_control(
        lambda: masks.global_tokens([0, -1]),
        lambda: masks.global_tokens([0, 1]),
        ValueError,
        r"indices must be >= 0, got \[0, -1\]",
    )


# --------------------------------------------------------------------------- properties

B, H = 2, 2  # batch and head extent of every property example


@dataclass
class Expr:
    mask: Mask
    ref: np.ndarray  # bool (B, H, lq, lk)
    primitive: bool  # a primitive mask or the negation of one: its layout is exact
    text: str


def _bh(a: np.ndarray) -> np.ndarray:
    return np.broadcast_to(a, (B, H, *a.shape[2:]))


@st.composite
def primitives(draw: st.DrawFn, lq: int, lk: int, docs_ok: bool) -> Expr:
    kinds = ["causal", "window", "prefix", "padding", "global", "dilated", "random", "custom"]
    kinds += ["tensor"] + (["documents"] if docs_ok else [])
    kind = draw(st.sampled_from(kinds))
    small = st.integers(0, 6)
    if kind == "causal":
        mask, pred = masks.causal(), ref_causal()
    elif kind == "window":
        left, right = draw(small), draw(small)
        mask, pred = masks.window(left, right), ref_window(left, right)
    elif kind == "prefix":
        n = draw(st.integers(0, 45))
        mask, pred = masks.prefix(n), ref_prefix(n)
    elif kind == "padding":
        kl = draw(st.lists(st.integers(0, lk), min_size=B, max_size=B))  # (at most Lk, Lq)
        ql = draw(st.none() | st.lists(st.integers(0, lq), min_size=B, max_size=B))
        mask, pred = masks.padding(kl, ql), ref_padding(kl, ql)
    elif kind == "global":
        idx = draw(st.lists(st.integers(0, 45), max_size=3))
        mask, pred = masks.global_tokens(idx), ref_global(idx)
    elif kind == "dilated":
        w, d = draw(small), draw(st.integers(1, 3))
        mask, pred = masks.dilated(w, d), ref_dilated(w, d)
    elif kind == "random":
        bs, nb, seed = draw(st.integers(1, 6)), draw(st.integers(0, 4)), draw(st.integers(0, 3))
        mask = masks.block_random(bs, nb, seed=seed)
        # Checked structurally in test_block_random_structure; here its dense form is the
        # reference, and the property tests check the algebra and layouts around it.
        ref = _bh(to_np(mask.dense(lq, lk)))
        return Expr(mask, ref, True, f"block_random({bs}, {nb}, seed={seed})")
    elif kind == "custom":
        _, fn, pred, per_batch, per_head = draw(st.sampled_from(CUSTOMS))
        mask = masks.custom(fn, per_batch=per_batch, per_head=per_head)
    elif kind == "tensor":
        dims = draw(st.sampled_from([(lq, lk), (1, H, lq, lk), (B, 1, lq, lk), (1, lk)]))
        n = int(np.prod(dims))
        bits = draw(st.lists(st.booleans(), min_size=n, max_size=n))
        arr = np.array(bits, dtype=bool).reshape(dims)
        mask, pred = masks.tensor(torch.from_numpy(arr)), ref_tensor(arr)
    else:
        contiguous = draw(st.booleans())
        rows = draw(st.integers(1, B))
        ids = [draw(st.lists(st.integers(0, 3), min_size=lk, max_size=lk)) for _ in range(rows)]
        if contiguous:
            ids = [sorted(r) for r in ids]
        arg = ids if rows > 1 else ids[0]
        mask, pred = masks.documents(arg), ref_documents(arg)
    return Expr(mask, build(pred, lq, lk, B, H), True, mask.spec())


@st.composite
def expressions(draw: st.DrawFn, lq: int, lk: int, docs_ok: bool, depth: int = 3) -> Expr:
    if depth == 0 or draw(st.integers(0, 2)) == 0:
        return draw(primitives(lq, lk, docs_ok))
    op = draw(st.sampled_from(["&", "|", "~"]))
    a = draw(expressions(lq, lk, docs_ok, depth - 1))
    if op == "~":
        return Expr(~a.mask, ~a.ref, a.primitive, f"~{a.text}")
    b = draw(expressions(lq, lk, docs_ok, depth - 1))
    if op == "&":
        return Expr(a.mask & b.mask, a.ref & b.ref, False, f"({a.text} & {b.text})")
    return Expr(a.mask | b.mask, a.ref | b.ref, False, f"({a.text} | {b.text})")


@st.composite
def sizes(draw: st.DrawFn) -> tuple[int, int, bool]:
    lq, lk = draw(st.integers(1, 40)), draw(st.integers(1, 40))
    docs_ok = draw(st.booleans())
    if docs_ok:
        lq = min(lq, lk)
    return lq, lk, docs_ok


def dense_bh(e: Expr | Mask, lq: int, lk: int) -> np.ndarray:
    mask = e.mask if isinstance(e, Expr) else e
    got = mask.dense(lq, lk, batch=B, heads=H)
    assert got.dtype == torch.bool and got.shape[2:] == (lq, lk)
    assert got.shape[0] in (1, B) and got.shape[1] in (1, H)
    assert (got.shape[0] == B) == mask.per_batch
    assert (got.shape[1] == H) == mask.per_head
    return _bh(to_np(got))


PROPERTY_SETTINGS = settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@PROPERTY_SETTINGS
@given(data=st.data(), size=sizes())
def test_property_algebra(data: st.DataObject, size: tuple[int, int, bool]) -> None:
    lq, lk, docs_ok = size
    a = data.draw(expressions(lq, lk, docs_ok), label="a")
    b = data.draw(expressions(lq, lk, docs_ok), label="b")
    try:
        both, either = a.mask & b.mask, a.mask | b.mask
    except ValueError as err:  # two different batch sizes cannot happen here (all are B)
        raise AssertionError(f"{a.text} and {b.text} should combine") from err
    da, db = dense_bh(a, lq, lk), dense_bh(b, lq, lk)
    np.testing.assert_array_equal(da, a.ref, err_msg=a.text)
    np.testing.assert_array_equal(db, b.ref, err_msg=b.text)
    np.testing.assert_array_equal(dense_bh(both, lq, lk), da & db)
    np.testing.assert_array_equal(dense_bh(either, lq, lk), da | db)
    np.testing.assert_array_equal(dense_bh(~a.mask, lq, lk), ~da)


@PROPERTY_SETTINGS
@given(data=st.data(), size=sizes(), bq=st.integers(1, 9), bk=st.integers(1, 9))
def test_property_layout_consistent(
    data: st.DataObject, size: tuple[int, int, bool], bq: int, bk: int
) -> None:
    lq, lk, docs_ok = size
    e = data.draw(expressions(lq, lk, docs_ok), label="expr")
    dense = to_np(e.mask.dense(lq, lk, batch=B, heads=H))
    np.testing.assert_array_equal(_bh(dense), e.ref, err_msg=e.text)
    layout = e.mask.block_layout(lq, lk, bq, bk, batch=B, heads=H)
    check_layout(layout, dense, bq, bk, exact=e.primitive)


def test_tensor_mask_dense_is_a_broadcast_view_equal_to_the_gather() -> None:
    from attnlab._grid import Grid
    from attnlab.masks.tensor import TensorMask

    t = torch.rand(3, 1, 1, 7) > 0.3  # key padding
    m = TensorMask(t)
    dense = m.dense(5, 7, batch=3, heads=4)
    gathered = torch.broadcast_to(m.evaluate(Grid.full(5, 7, batch=3, heads=1)), (3, 1, 5, 7))
    assert dense.shape == (3, 1, 5, 7) and torch.equal(dense, gathered)
    assert dense.stride(2) == 0  # a view: nothing was copied
    from attnlab.engines.sdpa import _unbroadcast

    assert _unbroadcast(dense).shape == (3, 1, 1, 7)


def test_a_mask_read_as_a_tensor_says_what_to_do() -> None:
    """Code that takes an attnlab mask for a tensor (adds it to scores, reads its dtype:
    a transformers model that uses its mask outside the attention function) fails with
    the way out, not a bare ``unsupported operand`` or missing attribute."""
    m = masks.causal() & masks.window(3)
    scores = torch.zeros(1, 1, 4, 4)
    check_and_control(
        lambda: scores + m, lambda: scores + m.dense(4, 4), TypeError, r"And: .*mask\.dense"
    )
    check_and_control(lambda: m.dtype, lambda: m.dense(4, 4).dtype, AttributeError, "no 'dtype'")
    check_and_control(
        lambda: m[:, 0], lambda: m.dense(4, 4)[:, 0], TypeError, "cannot be indexed: .*mask.dense"
    )
    with pytest.raises(AttributeError, match=r"'And' object has no attribute 'nothing'$"):
        _ = m.nothing  # type: ignore[attr-defined]
    assert not hasattr(m, "size") and hasattr(m, "dense")


def test_row_bounds_of_another_integer_dtype_become_int64() -> None:
    """A custom mask whose row_bounds are int32 (the README's ``Band`` with int32
    positions) made the blocked kernel fail: "spans must be contiguous int64"."""
    from attnlab.masks import RowBounds

    class Band32(Mask):
        def evaluate(self, g):  # type: ignore[no-untyped-def]
            return (g.k <= g.q) & (g.k >= g.q - 37)

        def row_bounds(self, lq, lk, batch=1, device=None):  # type: ignore[no-untyped-def]
            p = torch.arange(lq, device=device, dtype=torch.int32) + (lk - lq)
            return RowBounds((p - 37)[None], p[None], exact=True)

        def spec(self) -> str:
            return "band32"

    b = Band32().row_bounds(5, 5)
    assert b.lo.dtype == b.hi.dtype == torch.int64
    q, k, v = (torch.randn(1, 2, 600, 16, dtype=torch.float64) for _ in range(3))
    want = attnlab.attention(q, k, v, mask=masks.causal() & masks.window(37), engine="reference")
    for engine in ("auto", "blocked"):
        got = attnlab.attention(q, k, v, mask=Band32(), engine=engine)
        assert (got - want).abs().max() < 1e-12, engine  # type: ignore[operator]
    for bad in (torch.zeros(1, 3), torch.zeros(1, 3, dtype=torch.bool)):
        with pytest.raises(TypeError, match="RowBounds lo must be an integer tensor"):
            RowBounds(bad, torch.zeros(1, 3, dtype=torch.long), exact=True)


def test_block_random_keeps_a_bounded_number_of_tables() -> None:
    """(One table per key length, forever: 4081 tables and 86 MiB after a decoding loop up
    to 4096 keys.) Tables depend on the block count only and are made again alike."""
    from attnlab.masks.sparse import TABLES

    m = masks.block_random(16, 2, seed=3)
    first = m.dense(100, 100)
    for lk in range(16, 4096, 16):
        m.table(lk)
    assert len(m._tables) == TABLES
    assert torch.equal(m.dense(100, 100), first)  # remade after it was dropped
    assert torch.equal(masks.block_random(16, 2, seed=3).dense(100, 100), first)
    assert m.table(97) is m.table(100)  # 7 blocks both


def test_grid_the_argument_of_a_new_mask_is_public() -> None:
    """(It was only in the private ``attnlab._grid``: a typed ``evaluate(self, grid: Grid)``
    of README's new-mask recipe had to import a private module.)"""
    from attnlab import bias
    from attnlab.masks import Grid

    assert "Grid" in masks.__all__ and "Grid" in bias.__all__ and bias.Grid is Grid

    class Band(Mask):
        def evaluate(self, grid: Grid) -> Tensor:
            return (grid.k <= grid.q) & (grid.k >= grid.q - 1)

        def spec(self) -> str:
            return "band(1)"

    want = masks.causal() & masks.window(1)
    assert torch.equal(Band().dense(5, 5), want.dense(5, 5))
