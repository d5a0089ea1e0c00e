"""The engines' memo of the last mask object (``engines._memo.LastMask``): the flex
engine's block mask, the blocked engine's plan and decoding row bounds and the sdpa
engine's dense mask each kept their own copy of it, and the blocked engine's row bounds
took the mask's tensors' versions before computing them (one extra computation for a
mask that keeps tensors it makes then).
"""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from torch import Tensor

from attnlab import masks
from attnlab._grid import Grid
from attnlab.engines import blocked
from attnlab.engines._memo import LastMask
from attnlab.engines.base import AttentionRequest
from attnlab.engines.blocked import BlockedEngine
from attnlab.masks import Mask, RowBounds
from attnlab.masks.layout import Device


class _Counter:
    """A build that counts its calls and returns a new object each time."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self) -> object:
        self.calls += 1
        return object()


def test_the_same_mask_object_and_key_hit() -> None:
    memo, build, m = LastMask[object](), _Counter(), masks.causal()
    first = memo.get(m, (4, 4), build)
    assert memo.get(m, (4, 4), build) is first and build.calls == 1
    assert memo.get(m, (4, 8), build) is not first and build.calls == 2  # another key


def test_a_new_mask_object_misses() -> None:
    memo, build = LastMask[object](), _Counter()
    first = memo.get(masks.window(2), (4, 4), build)
    assert memo.get(masks.window(2), (4, 4), build) is not first  # equal, not the same
    assert build.calls == 2


def test_an_in_place_change_of_a_mask_tensor_misses() -> None:
    lengths = torch.tensor([3, 2])
    memo, build, m = LastMask[object](), _Counter(), masks.padding(lengths)
    first = memo.get(m, (4, 4), build)
    lengths.fill_(1)  # the tensor's version changes
    second = memo.get(m, (4, 4), build)
    assert second is not first and memo.get(m, (4, 4), build) is second
    assert build.calls == 2


@pytest.mark.parametrize("strong", [False, True])
def test_a_weak_hold_frees_a_dropped_mask_and_a_strong_one_keeps_it(strong: bool) -> None:
    memo, m = LastMask[object](strong=strong), masks.padding([3, 2])
    memo.get(m, (4, 4), _Counter())
    gone = weakref.ref(m)
    del m
    gc.collect()
    assert (gone() is not None) is strong


def test_keep_false_returns_the_value_but_keeps_none() -> None:
    memo, build, m = LastMask[object](keep=lambda v: False), _Counter(), masks.causal()
    memo.get(m, (4, 4), build)
    memo.get(m, (4, 4), build)
    assert build.calls == 2


class _KeepsBounds(Mask):
    """A causal mask that keeps the row bounds it computes as tensors of its own (as
    block_random keeps the table it draws): its tensors change on the first build."""

    def __init__(self) -> None:
        self.kept: dict[tuple[int, int], Tensor] = {}

    def evaluate(self, grid: Grid) -> Tensor:
        return grid.k <= grid.q

    def row_bounds(self, lq: int, lk: int, batch: int = 1, device: Device = None) -> RowBounds:
        hi = self.kept.get((lq, lk))
        if hi is None:
            hi = self.kept[(lq, lk)] = torch.arange(lk - lq, lk).view(1, lq)  # (1, Lq)
        return RowBounds(torch.zeros_like(hi), hi, exact=True)

    def spec(self) -> str:
        return "keeps_bounds()"


def test_the_key_is_taken_after_a_build_that_adds_a_tensor() -> None:
    memo, m = LastMask[object](), _KeepsBounds()
    calls = []

    def build() -> object:
        calls.append(1)
        return m.row_bounds(1, 8)

    first = memo.get(m, (1, 8), build)
    assert memo.get(m, (1, 8), build) is first and len(calls) == 1


def _decode_request(mask: Mask) -> AttentionRequest:
    """A new float32 decoding request: 1 query, 2 heads, 32 keys under ``mask``."""
    q, k = torch.randn(1, 2, 1, 8), torch.randn(1, 2, 32, 8)
    return AttentionRequest(q, k, k, mask, None, 1.0, "dot", "softmax", 0.0, False, False)


def test_decode_bounds_are_computed_once_in_three_calls(monkeypatch: pytest.MonkeyPatch) -> None:
    """The blocked engine keyed the last mask's row bounds on its tensors' versions read
    before computing them: a mask that keeps tensors it makes then (no built-in mask
    accepted for decoding does; a user's Mask subclass may) was computed twice in three
    decoding steps."""
    calls: list[int] = []
    exact = blocked._exact_bounds

    def counted(mask: Mask, req: AttentionRequest) -> RowBounds | None:
        calls.append(1)
        return exact(mask, req)

    monkeypatch.setattr(blocked, "_exact_bounds", counted)
    engine, m = BlockedEngine(), _KeepsBounds()
    for _ in range(3):  # a new request per step, as each attention() call makes
        assert engine.intervals(_decode_request(m))
    assert len(calls) == 1
    bounds = engine._decode_bounds(_decode_request(m))
    want = masks.causal().row_bounds(1, 32)  # the same rows
    assert bounds is not None and torch.equal(bounds.hi, want.hi)


@pytest.mark.parametrize("container", [dict, list])
def test_a_mask_that_is_a_container_has_its_items_walked(container: type) -> None:
    """A user's mask that is also a dict or a list, holding its tensor as an item: the
    walk took a mask's attributes only, so an in-place change of that tensor was not seen
    (the item is what 728100f's walk found)."""
    from attnlab.engines._versions import held_tensors, versions

    class Held(Mask, container):  # type: ignore[misc, valid-type]
        def evaluate(self, grid: Grid) -> Tensor:
            return grid.k < 3

    t = torch.zeros(2)
    m = Held()
    if isinstance(m, dict):
        m["x"] = t
    else:
        m.append(t)
    assert any(h is t for h in held_tensors(m))
    before = versions(m)
    t.add_(1)
    assert versions(m) != before
