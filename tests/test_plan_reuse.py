"""The blocked engine keeps the plan of the last mask object it saw (README, "Masks are
values"): every ``attention()`` call makes a new request, and a dilated window's plan at
4096 x 4096 was made again on each (340 ms of a 383 ms call). A mask whose tensors change
in place, or another mask object, gets a new plan.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from attnlab import masks
from attnlab.engines.base import AttentionRequest
from attnlab.engines.blocked import BlockedEngine
from attnlab.engines.blocked_plan import make_plan
from attnlab.masks import Mask


def request(mask: Mask, lq: int = 256, heads: int = 2) -> AttentionRequest:
    """A new float32 request of ``lq`` queries and keys under ``mask``."""
    q = torch.randn(1, heads, lq, 8)
    return AttentionRequest(q, q, q, mask, None, 1.0, "dot", "softmax", 0.0, False, False)


@pytest.mark.parametrize("make", [lambda: masks.dilated(32, 2), lambda: masks.block_random(32, 2)])
def test_plan_is_kept_for_the_same_mask_object_across_requests(make: Callable[[], Mask]) -> None:
    engine, m = BlockedEngine(block=64), make()
    first = engine.plan(request(m))  # (block_random draws its table for this length here)
    assert engine.plan(request(m)) is first  # a new request, the same mask object
    assert engine.plan(request(make())) is not first  # another object
    assert engine.plan(request(m, lq=320)) is not first  # other sizes
    assert engine.plan(request(m, heads=3)) is not first


def test_plan_is_made_again_when_the_mask_tensor_changes_in_place() -> None:
    t = torch.ones(256, 256, dtype=torch.bool).tril()
    engine, m = BlockedEngine(block=64), masks.tensor(t)
    first = engine.plan(request(m))
    t[:, 128:] = False  # in place: the mask's tensor's version changes
    second = engine.plan(request(m))
    want = make_plan(m, request(m), 64)
    assert second is not first
    assert second.blocks == want.blocks and second.computed_fraction == want.computed_fraction
    lengths = torch.tensor([200])
    pad = masks.padding(lengths)
    before = engine.plan(request(pad))
    lengths.fill_(100)
    assert engine.plan(request(pad)).computed_fraction < before.computed_fraction


def test_kept_plan_gives_the_same_output() -> None:
    engine, m = BlockedEngine(block=64), masks.window(16) & masks.block_random(32, 2)
    req = request(m)
    out, _, _ = engine.forward(req)
    again, _, _ = engine.forward(request(m).__class__(*_fields(req)))
    assert torch.equal(out, again)


def _fields(req: AttentionRequest) -> tuple:
    """``req``'s fields, to make an equal request that is another object."""
    return tuple(getattr(req, f) for f in req.__dataclass_fields__)
