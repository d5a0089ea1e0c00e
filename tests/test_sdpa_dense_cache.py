"""The sdpa engine keeps the dense form of the last mask object: a model's layers share
one mask per forward, and each call built it again (on an H200, bf16 1x8x128x64 with
``padding([100])``: 577 us per call against 77 us for torch SDPA with the bool mask).
It builds again after an in-place change of the mask's tensors, for a new mask object,
other sizes or other flags; the outputs equal torch SDPA's with the mask's dense form."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

import attnlab
from attnlab import masks as M
from attnlab.engines import sdpa

B, H, L, E = 2, 4, 24, 8


def _qkv(grad: bool = False) -> list[Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(B, H, L, E, generator=g).requires_grad_(grad) for _ in "qkv"]


def _counted(monkeypatch: pytest.MonkeyPatch, name: str) -> list[int]:
    """Count the calls of ``sdpa.<name>`` (a builder of the mask's dense parts)."""
    built: list[int] = []
    fn: Callable[..., Any] = getattr(sdpa, name)

    def counted(*args: Any) -> Any:
        built.append(1)
        return fn(*args)

    monkeypatch.setattr(sdpa, name, counted)
    return built


def _torch(q: Tensor, k: Tensor, v: Tensor, mask: M.Mask) -> Tensor:
    """torch SDPA with the mask's dense form (every row here sees a key)."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask.dense(L, L, batch=B, heads=H))


def test_one_build_serves_calls_with_the_same_mask_until_it_changes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    built = _counted(monkeypatch, "_mask_by_evaluation")
    q, k, v = _qkv()
    lengths = torch.tensor([L, 17])
    mask = M.causal() & M.padding(lengths)
    outs = [attnlab.attention(q, k, v, mask=mask, engine="sdpa") for _ in range(4)]
    assert len(built) == 1, f"{len(built)} builds for four calls with one mask"
    for out in outs:
        torch.testing.assert_close(out, outs[0], rtol=0, atol=0)
    torch.testing.assert_close(outs[0], _torch(q, k, v, mask))
    lengths.add_(-7)  # in place: item 1 now sees 10 keys
    changed = attnlab.attention(q, k, v, mask=mask, engine="sdpa")
    assert len(built) == 2
    torch.testing.assert_close(changed, _torch(q, k, v, mask))
    assert not torch.equal(changed, outs[0])
    twin = M.causal() & M.padding(lengths.clone())  # a new object, the same mask
    torch.testing.assert_close(attnlab.attention(q, k, v, mask=twin, engine="sdpa"), changed)
    assert len(built) == 3
    short = [t[:, :, :20] for t in (q, k, v)]  # other sizes
    attnlab.attention(*short, mask=twin, engine="sdpa")
    assert len(built) == 4


def test_the_bounds_path_is_kept_too(monkeypatch: pytest.MonkeyPatch) -> None:
    """The off-CPU path (bounds on the CPU), taken here on purpose."""
    monkeypatch.setattr(sdpa, "_host_bounds", sdpa._exact_bounds)
    built = _counted(monkeypatch, "_mask_by_bounds")
    q, k, v = _qkv()
    lengths = torch.tensor([L - 3, 5])
    mask = M.padding(lengths)
    outs = [attnlab.attention(q, k, v, mask=mask, engine="sdpa") for _ in range(3)]
    assert len(built) == 1
    torch.testing.assert_close(outs[-1], _torch(q, k, v, mask), rtol=0, atol=0)
    lengths.add_(3)
    torch.testing.assert_close(
        attnlab.attention(q, k, v, mask=mask, engine="sdpa"), _torch(q, k, v, mask)
    )
    assert len(built) == 2


def test_gradients_and_inference_mode_get_their_own_build(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A call with gradients needs the rows of one key (exact zero dQ, dK), which a call
    without does not make; a mask built under ``torch.inference_mode`` cannot be saved
    for a later call's backward. Each builds anew; the gradients match a fresh engine's."""
    built = _counted(monkeypatch, "_mask_by_evaluation")
    mask = M.padding([L, 1])  # item 1 sees one key: its dQ and dK are exactly 0
    q, k, v = _qkv(grad=True)
    with torch.inference_mode():
        attnlab.attention(*(t.detach() for t in (q, k, v)), mask=mask, engine="sdpa")
    with torch.no_grad():
        attnlab.attention(q, k, v, mask=mask, engine="sdpa")
    assert len(built) == 2
    got = []
    for _ in range(2):
        out = attnlab.attention(q, k, v, mask=mask, engine="sdpa")
        got.append([out, *torch.autograd.grad(out.sum(), (q, k, v))])
    assert len(built) == 3
    fresh = sdpa.SdpaEngine()  # its own, empty memo
    monkeypatch.setattr(attnlab.engines.get_engine("sdpa"), "_masks", fresh._masks)
    out = attnlab.attention(q, k, v, mask=mask, engine="sdpa")
    want = [out, *torch.autograd.grad(out.sum(), (q, k, v))]
    assert len(built) == 4
    for a, b, w in zip(got[0], got[1], want, strict=True):
        torch.testing.assert_close(a, w, rtol=0, atol=0)
        torch.testing.assert_close(b, w, rtol=0, atol=0)
    assert got[0][1][1].abs().max().item() == 0.0  # dQ of item 1


def test_a_dense_mask_over_the_limit_is_built_per_call_not_held(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The engine is one object for the process: a kept dense mask stays allocated after
    the call (1 GiB of bool at 32768 tokens), so one above ``KEPT_MAX`` is not kept."""
    from attnlab.engines import _dense_cache

    built = _counted(monkeypatch, "_mask_by_evaluation")
    monkeypatch.setattr(_dense_cache, "KEPT_MAX", L * L - 1)  # causal(): (1, 1, L, L)
    q, k, v = _qkv()
    mask = M.causal() & M.window(4)
    outs = [attnlab.attention(q, k, v, mask=mask, engine="sdpa") for _ in range(2)]
    assert len(built) == 2, "a mask above KEPT_MAX was kept"
    torch.testing.assert_close(outs[1], _torch(q, k, v, mask))
    monkeypatch.setattr(_dense_cache, "KEPT_MAX", L * L)
    attnlab.attention(q, k, v, mask=mask, engine="sdpa")
    attnlab.attention(q, k, v, mask=mask, engine="sdpa")
    assert len(built) == 3
