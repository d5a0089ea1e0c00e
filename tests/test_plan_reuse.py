"""The blocked engine keeps the plan of the last mask object it saw (README, "Masks are
values"): every ``attention()`` call makes a new request, and a dilated window's plan at
4096 x 4096 was made again on each (340 ms of a 383 ms call). A mask whose tensors change
in place, or another mask object, gets a new plan.
"""

from __future__ import annotations

import gc
import weakref
from collections.abc import Callable

import pytest
import torch
from torch import Tensor

import attnlab
from attnlab import masks
from attnlab.engines import blocked_plan, flex
from attnlab.engines.base import AttentionRequest
from attnlab.engines.blocked import BlockedEngine
from attnlab.engines.blocked_plan import make_plan
from attnlab.masks import Mask
from attnlab.nn import DecoderOnly, LayerConfig
from attnlab.nn.layers import _with_causal
from attnlab.positional import RotaryEmbedding
from tests.conftest import max_err


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


def _stack(engine: str) -> DecoderOnly:
    """A 4-layer pre-norm RoPE decoder with grouped-query heads on ``engine``."""
    torch.manual_seed(0)
    cfg = LayerConfig(
        64, 4, 128, num_kv_heads=2, dropout=0.0, norm_first=True, rope=RotaryEmbedding(16),
        engine=engine,
    )  # fmt: skip
    return DecoderOnly(cfg, 4).eval()


def _counted(monkeypatch: pytest.MonkeyPatch, module: object, name: str) -> list[int]:
    """A list that grows by one at each call of ``module.name``."""
    calls: list[int] = []
    real = getattr(module, name)

    def spy(*args: object, **kwargs: object) -> object:
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, spy)
    return calls


def test_a_decoder_stack_plans_its_mask_once_per_forward(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each layer combined ``causal() & mask`` anew, so the blocked engine planned the
    same mask in every layer (4 plans per forward of a 4-layer stack); an in-place change
    of the mask's lengths is still seen."""
    lm, ref = _stack("blocked"), _stack("reference").double()
    x = torch.randn(2, 300, 64)
    lengths = torch.tensor([300, 250])
    pad = masks.padding(lengths)
    plans = _counted(monkeypatch, blocked_plan, "make_plan")
    for mask in (masks.window(40), pad, None):
        with torch.no_grad():
            for _ in range(2):
                plans.clear()
                out = lm(x, mask=mask)
                assert len(plans) <= 1, mask  # (none again: the causal mask is kept)
            want = ref(x.double(), mask=mask)
        assert max_err(out[:, :250], want[:, :250]) < 1e-4  # (padded rows: any output)
    lengths[0] = 120  # in place: a new plan, with the new length
    with torch.no_grad():
        plans.clear()
        out, want = lm(x, mask=pad), ref(x.double(), mask=pad)
    assert len(plans) == 1 and max_err(out[:, :120], want[:, :120]) < 1e-4


@pytest.mark.skipif(not flex.flex_available(), reason="this torch has no FlexAttention")
def test_a_decoder_stack_on_flex_keeps_its_block_mask(monkeypatch: pytest.MonkeyPatch) -> None:
    """The flex engine's block mask (on CUDA: tile planning and copies to the device)
    was built in every layer of every forward: 8 in 2 forwards of a 4-layer stack."""
    lm, ref = _stack("flex"), _stack("reference").double()
    x, w = torch.randn(1, 256, 64), masks.window(64)
    built = _counted(monkeypatch, flex, "block_mask")
    with torch.no_grad():
        lm(x, mask=w)
        assert len(built) == 1
        out = lm(x, mask=w)
        assert len(built) == 1  # the same mask object: the same block mask
        assert max_err(out, ref(x.double(), mask=w)) < 1e-4


_KINDS: dict[str, Callable[[], Mask]] = {
    "padding": lambda: masks.padding([256, 200], query_lengths=[256, 150]),
    "documents": lambda: masks.documents([0] * 100 + [1] * 156),
    "global_tokens": lambda: masks.window(16) | masks.global_tokens([0, 5]),
    "block_random": lambda: masks.block_random(32, 2),
    "prefix": lambda: masks.prefix(40),
    "tensor": lambda: masks.tensor(torch.ones(256, 256, dtype=torch.bool).tril()),
}


def _flex_request(mask: Mask, device: str = "cpu") -> AttentionRequest:
    """A new request of 2 x 2 heads x 256 queries and keys under ``mask`` on ``device``."""
    q = torch.zeros(2, 2, 256, 16, device=device)
    return AttentionRequest(q, q, q, mask, None, 1.0, "dot", "softmax", 0.0, False, False)


@pytest.mark.skipif(not flex.flex_available(), reason="this torch has no FlexAttention")
@pytest.mark.parametrize("kind", sorted(_KINDS))
def test_flex_builds_one_block_mask_in_three_calls(
    monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    """The block mask's key took the mask's tensors' versions before building it, and
    block_random draws its table for the length while building: its first key never
    matched again (2 builds in 3 calls)."""
    engine, m = flex.FlexEngine(), masks.causal() & _KINDS[kind]()
    built = _counted(monkeypatch, flex, "block_mask")
    first = engine._block_mask(_flex_request(m))
    for _ in range(2):
        assert engine._block_mask(_flex_request(m)) is first
    assert len(built) == 1


@pytest.mark.skipif(not flex.flex_available(), reason="this torch has no FlexAttention")
@pytest.mark.parametrize("kind", ["padding", "documents", "tensor"])
def test_flex_keeps_a_decoder_stacks_mask_between_forwards(
    monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    """A stack's ``causal() & mask`` lives through its forward (held weakly by
    ``_with_causal``). On a device other than its tensors' (CUDA; meta here) the block
    mask holds a moved copy, and the engine held the mask weakly: it died after each
    forward and the next built again (on an H200, 2 host-device syncs per forward of a
    DecoderOnly with a padding mask; one build per call here)."""
    engine, m = flex.FlexEngine(), _KINDS[kind]()
    built = _counted(monkeypatch, flex, "block_mask")
    for _ in range(3):  # (the combined mask is dropped after each call)
        engine._block_mask(_flex_request(_with_causal(m), "meta"))
    assert len(built) == 1


@pytest.mark.parametrize("kind", ["or", "and"])
def test_row_bounds_asked_once_per_mask_object(monkeypatch: pytest.MonkeyPatch, kind: str) -> None:
    """``|`` and ``&`` combine their parts' row bounds on each ask: a new mask's plan asked
    twice (the layout of a combination, then the base layout) and the kernel's spans once
    more on every call, the plan kept or not (3 asks, then 1 per call). The spans are kept
    with the plan; an in-place change of the mask's lengths is still seen."""
    lengths = torch.tensor([300, 200])
    if kind == "or":
        m = masks.causal() | masks.groups(torch.arange(300) // 70)
    else:
        m = masks.causal() & masks.window(40) & masks.padding(lengths)
    asked: list[int] = []
    real = type(m).row_bounds

    def spy(self: Mask, *args: object, **kwargs: object) -> object:
        asked.append(self is m)  # the whole mask's asks, not its parts'
        return real(self, *args, **kwargs)

    monkeypatch.setattr(type(m), "row_bounds", spy)
    engine, q = BlockedEngine(block=64), torch.randn(2, 2, 300, 8)
    new = lambda: AttentionRequest(q, q, q, m, None, 1.0, "dot", "softmax", 0.0, False, False)  # noqa: E731
    for _ in range(3):
        out, _, _ = engine.forward(new())
    assert sum(asked) == 1
    lengths.fill_(150)  # in place: a new plan, and new spans for the kernel
    out, _, _ = engine.forward(new())
    assert sum(asked) == (1 if kind == "or" else 2)
    want = attnlab.attention(*(q.double(),) * 3, mask=m, scale=1.0, engine="reference")
    assert max_err(out, want) < 1e-5


def _counting_mask() -> tuple[Mask, list[int]]:
    """A custom mask (no exact row bounds: its partial tiles are evaluated) and the list
    that grows by one at each evaluation."""
    calls: list[int] = []

    def fn(b: Tensor, h: Tensor, q: Tensor, k: Tensor) -> Tensor:
        calls.append(1)
        return (q >= k) & ((q - k) % 3 == 0)

    return masks.custom(fn, per_batch=False, per_head=False), calls


def _check_three_calls(m: Mask, calls: list[int]) -> int:
    """Three blocked calls under ``m`` against fp64 reference; the mask's evaluations in
    the second and third."""
    engine, q = BlockedEngine(block=64), torch.randn(1, 2, 256, 16)
    want = attnlab.attention(*(q.double(),) * 3, mask=m, engine="reference")
    engine.forward(request_of(q, m))
    calls.clear()
    for _ in range(2):
        out, _, _ = engine.forward(request_of(q, m))
        assert max_err(out, want) < 1e-5
    return len(calls)


def request_of(q: Tensor, mask: Mask) -> AttentionRequest:
    """A new request of ``q`` as queries, keys and values under ``mask``."""
    scale = q.shape[-1] ** -0.5
    return AttentionRequest(q, q, q, mask, None, scale, "dot", "softmax", 0.0, False, False)


def test_kernel_tiles_are_kept_with_the_plan() -> None:
    # the partial tiles were evaluated again on every call (8.1 ms of 37 at 1024 tokens)
    m, calls = _counting_mask()
    assert _check_three_calls(m, calls) == 0


def test_kernel_tiles_over_the_cap_are_not_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(blocked_plan, "KEPT_MAX", 64 * 64)  # smaller than one call's tiles
    m, calls = _counting_mask()
    assert _check_three_calls(m, calls) > 0


def test_kernel_tiles_follow_an_in_place_change_and_free_the_mask() -> None:
    ids = torch.arange(256) % 7
    engine, m, q = (
        BlockedEngine(block=64),
        masks.causal() | masks.groups(ids),
        torch.randn(1, 2, 256, 16),
    )
    engine.forward(request_of(q, m))
    ids.remainder_(5)  # in place: the tiles are evaluated again
    out, _, _ = engine.forward(request_of(q, m))
    want = attnlab.attention(*(q.double(),) * 3, mask=m, engine="reference")
    assert max_err(out, want) < 1e-5
    gone = weakref.ref(m)
    del m
    gc.collect()
    assert gone() is None  # the engine keeps the tiles, not the mask
