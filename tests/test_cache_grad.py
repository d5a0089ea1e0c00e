"""Gradients through cached decoding when only the queries or a bias need them, and the
in-place (zero-copy) appends of decoding that builds no graph."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext

import pytest
import torch
from torch import Tensor

import attnlab
from attnlab import bias as B
from attnlab import masks
from attnlab.nn import KVCache, MultiHeadAttention
from attnlab.positional import RotaryEmbedding
from tests.conftest import max_err

ENGINES = ["reference", "sdpa", "blocked"]


def _decode(step: Callable[[int, int, KVCache], Tensor], length: int, dim: int) -> Tensor:
    """A prefill of 3 positions, then one position per step; the steps' outputs joined
    along ``dim``."""
    cache = KVCache()
    spans = [(0, 3), *((i, i + 1) for i in range(3, length))]
    return torch.cat([step(a, b, cache) for a, b in spans], dim)


def _layer_steps(mha: MultiHeadAttention, x: Tensor, bias: B.Bias | None = None) -> Tensor:
    """``mha``'s cached decoding of ``x (B, L, D)``: ``(B, L, D)``."""

    def step(a: int, b: int, cache: KVCache) -> Tensor:
        return mha(x[:, a:b], mask=masks.causal(), bias=bias, cache=cache)

    return _decode(step, x.shape[1], 1)


def _loss(out: Tensor) -> Tensor:
    w = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view(out.shape)
    return (out * w).sum()


def _layer(grad: str) -> tuple[MultiHeadAttention, B.Bias | None, Tensor]:
    """A frozen layer whose only trainable tensor is ``grad``'s: the query-side qk-norm
    gain, or a T5 relative-bucket table (fine-tuning the bias alone)."""
    torch.manual_seed(0)
    mha = MultiHeadAttention(16, 2, num_kv_heads=1, qk_norm=True, rope=RotaryEmbedding(8))
    mha = mha.double().requires_grad_(False)
    with torch.no_grad():
        mha.q_norm.weight.uniform_(0.5, 1.5)  # type: ignore[union-attr]
    if grad == "q_norm":
        leaf = mha.q_norm.weight  # type: ignore[union-attr]
        return mha, None, leaf.requires_grad_(True)
    t5 = B.relative_buckets(2, bidirectional=False).double()
    return mha, t5, t5.table


@pytest.mark.parametrize("engine", ENGINES)
def test_queries_alone_get_their_gradient_through_cached_steps(engine: str) -> None:
    """Keys and values that need no gradient, queries that do (attribution to queries):
    the second append wrote into the keys the first step saved ("modified by an inplace
    operation" in backward)."""
    torch.manual_seed(0)
    q = torch.randn(2, 2, 8, 8, dtype=torch.float64, requires_grad=True)
    k, v = torch.randn(2, 2, 8, 8, dtype=torch.float64), torch.randn(2, 2, 8, 8).double()

    def step(a: int, b: int, cache: KVCache) -> Tensor:
        kk, vv = cache.append(k[:, :, a:b], v[:, :, a:b])  # (B, H, b, E)
        return attnlab.attention(q[:, :, a:b], kk, vv, mask=masks.causal(), engine=engine)

    _loss(_decode(step, 8, 2)).backward()
    got, q.grad = q.grad, None
    full = attnlab.attention(q, k, v, mask=masks.causal(), engine="reference")
    _loss(full).backward()
    assert got is not None and q.grad is not None and q.grad.abs().max() > 0.1
    assert max_err(got, q.grad) < 1e-12


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("grad", ["q_norm", "bias"])
def test_a_frozen_layer_trains_its_query_norm_or_bias_through_cached_steps(
    engine: str, grad: str
) -> None:
    """Only the qk-norm gain or the T5 table trains (GQA, RoPE): every cached step's
    backward saved the cache's storage, which the next append wrote into."""
    mha, t5, leaf = _layer(grad)
    mha.engine = engine
    x = torch.randn(2, 9, 16, dtype=torch.float64)
    _loss(_layer_steps(mha, x, t5)).backward()
    got, leaf.grad = leaf.grad, None
    mha.engine = "reference"
    _loss(mha(x, mask=masks.causal(), bias=t5)).backward()
    assert got is not None and leaf.grad is not None and leaf.grad.abs().max() > 0.1
    assert max_err(got, leaf.grad) < 1e-12


def _mode(mode: str) -> AbstractContextManager[object]:
    return {"no_grad": torch.no_grad(), "inference_mode": torch.inference_mode()}.get(
        mode, nullcontext()
    )


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode", "frozen", "q_norm"])
def test_decoding_without_a_graph_writes_in_place(mode: str) -> None:
    """Under ``no_grad``, ``inference_mode`` or grad mode with nothing trainable, each
    step writes into the cache's storage (one buffer for 12 positions, no copy per step);
    the control, a trainable query norm, gets new keys every step."""
    mha, _, leaf = _layer("q_norm")
    leaf.requires_grad_(mode == "q_norm")
    x = torch.randn(2, 12, 16, dtype=torch.float64)
    seen: list[int] = []

    def step(a: int, b: int, cache: KVCache) -> Tensor:
        out = mha(x[:, a:b], mask=masks.causal(), cache=cache)
        seen.append(cache.keys.data_ptr())  # type: ignore[union-attr]
        return out

    with _mode(mode):
        steps = _decode(step, x.shape[1], 1)
        full = mha(x, mask=masks.causal())
    assert max_err(steps, full) < 1e-12
    assert len(set(seen)) == (len(seen) if mode == "q_norm" else 1)


def test_a_bare_cache_under_grad_mode_hands_out_keys_it_never_writes_into() -> None:
    """Used directly, the cache cannot see the queries: under grad mode it leaves the
    keys it returned as they were (the control: under ``no_grad`` they are views)."""
    for ctx, same in ((nullcontext(), False), (torch.no_grad(), True)):
        cache, one = KVCache(), torch.ones(1, 1, 1, 2)
        with ctx:
            k, _ = cache.append(one, one)
            k2, _ = cache.append(2 * one, 2 * one)
        assert (k2.data_ptr() == k.data_ptr()) is same
        assert k[0, 0, :, 0].tolist() == [1.0] and k2[0, 0, :, 0].tolist() == [1.0, 2.0]


def test_an_unsaved_step_after_a_saved_one_leaves_the_saved_keys() -> None:
    """A step with a graph (trainable query norm), then one without (frozen): the second
    writes into fresh storage, so the first step's backward still holds its keys."""
    mha, _, leaf = _layer("q_norm")
    x = torch.randn(1, 5, 16, dtype=torch.float64)
    cache = KVCache()
    first = mha(x[:, :4], mask=masks.causal(), cache=cache)
    leaf.requires_grad_(False)
    mha(x[:, 4:], mask=masks.causal(), cache=cache)
    leaf.requires_grad_(True)
    _loss(first).backward()
    got, leaf.grad = leaf.grad, None
    _loss(mha(x[:, :4], mask=masks.causal())).backward()
    assert got is not None and leaf.grad is not None and max_err(got, leaf.grad) < 1e-12
