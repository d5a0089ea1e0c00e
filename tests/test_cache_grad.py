"""Gradients through cached decoding when only the queries or a bias need them, and the
in-place (zero-copy) appends of decoding in every grad mode."""

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


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode", "frozen", "q_norm", "k_norm"])
def test_decoding_writes_in_place_unless_the_keys_need_a_gradient(mode: str) -> None:
    """Under ``no_grad``, ``inference_mode``, grad mode with nothing trainable or with a
    trainable query norm, each step writes into the cache's storage (one buffer for 12
    positions, no copy per step); the control, a trainable key norm, concatenates."""
    mha, _, leaf = _layer("q_norm")
    leaf.requires_grad_(mode == "q_norm")
    mha.k_norm.weight.requires_grad_(mode == "k_norm")  # type: ignore[union-attr]
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
    assert len(set(seen)) == (len(seen) if mode == "k_norm" else 1)


@pytest.mark.parametrize("mode", ["grad", "no_grad"])
def test_a_bare_cache_writes_past_the_keys_it_handed_out_leaving_them_as_they_were(
    mode: str,
) -> None:
    """Used directly, the cache cannot see the queries: the next append writes into the
    same storage past the keys it returned, which keep their values and their version
    counter (that a backward which saved them checks)."""
    cache, one = KVCache(), torch.ones(1, 1, 1, 2)
    with _mode(mode):
        k, _ = cache.append(one, one)
        k2, _ = cache.append(2 * one, 2 * one)
    assert k2.data_ptr() == k.data_ptr() and k._version == 0
    assert k[0, 0, :, 0].tolist() == [1.0] and k2[0, 0, :, 0].tolist() == [1.0, 2.0]


def _attend_steps(q: Tensor, k: Tensor, v: Tensor, cache: KVCache, engine: str) -> Tensor:
    """One query per step over ``cache`` after appending that step's ``k``, ``v``:
    ``(B, H, L, E)``."""
    outs = []
    for i in range(q.shape[2]):
        kk, vv = cache.append(k[:, :, i : i + 1], v[:, :, i : i + 1])
        outs.append(attnlab.attention(q[:, :, i : i + 1], kk, vv, engine=engine))
    return torch.cat(outs, 2)


def test_a_bare_cache_under_grad_mode_copies_only_when_it_doubles() -> None:
    """300 appends under grad mode, each step's keys saved for the queries' gradient:
    storage is allocated 16, 32, ..., 512 positions long (6 storages), not once per step
    (main made 300: 2048 appends of (1, 8, 1, 128) took 9.8 s against 0.06 s)."""
    torch.manual_seed(0)
    q = torch.randn(1, 2, 300, 4, dtype=torch.float64, requires_grad=True)
    k, v = torch.randn(2, 1, 2, 300, 4, dtype=torch.float64)
    cache, seen = KVCache(), set()
    append = cache.append

    def counted(kk: Tensor, vv: Tensor) -> tuple[Tensor, Tensor]:
        out = append(kk, vv)
        seen.add(out[0].untyped_storage().data_ptr())
        return out

    cache.append = counted  # type: ignore[method-assign]
    _loss(_attend_steps(q, k, v, cache, "reference")).backward()
    got, q.grad = q.grad, None
    _loss(attnlab.attention(q, k, v, mask=masks.causal(), engine="reference")).backward()
    assert got is not None and q.grad is not None and max_err(got, q.grad) < 1e-12
    assert len(seen) <= 6, f"{len(seen)} storages for 300 appends"


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("mode", ["grad", "no_grad"])
def test_a_crop_then_new_steps_leave_the_earlier_steps_gradient(engine: str, mode: str) -> None:
    """Five steps under grad mode, then crop(3) and two other steps (under grad mode or
    ``no_grad``): they go to new storage (the old keys were saved for the first steps'
    backward, which writing over them would change), and both passes' query gradients
    equal the uncached ones in float64."""
    torch.manual_seed(0)
    q = torch.randn(2, 2, 7, 8, dtype=torch.float64, requires_grad=True)
    k, v = torch.randn(2, 2, 2, 7, 8, dtype=torch.float64)
    cache = KVCache()
    first = _attend_steps(q[:, :, :5], k[:, :, :5], v[:, :, :5], cache, engine)
    old = cache.keys
    cache.crop(3)
    with _mode(mode):
        second = _attend_steps(q[:, :, 5:], k[:, :, 5:], v[:, :, 5:], cache, engine)
    assert old is not None and old.data_ptr() != cache.keys.data_ptr()  # type: ignore[union-attr]
    _loss(torch.cat([first, second], 2)).backward()
    got, q.grad = q.grad, None
    kept = [*range(3), 5, 6]  # the positions the last steps attend to
    ref_first = attnlab.attention(q[:, :, :5], k[:, :, :5], v[:, :, :5], mask=masks.causal())
    k2, v2 = k[:, :, kept], v[:, :, kept]
    ref_second = attnlab.attention(q[:, :, 5:], k2, v2, mask=masks.causal())
    if mode == "no_grad":
        ref_second = ref_second.detach()
    ref = torch.cat([ref_first, ref_second], 2)
    assert max_err(torch.cat([first, second], 2), ref) < 1e-12
    _loss(ref).backward()
    assert got is not None and q.grad is not None and max_err(got, q.grad) < 1e-12


def test_a_beam_reorder_under_grad_mode_keeps_the_earlier_steps_gradient() -> None:
    """Three steps, reorder the beams by ``[1, 1, 0]``, three more steps, all under grad
    mode: the query gradient equals the one from keys gathered by hand (float64)."""
    torch.manual_seed(0)
    q = torch.randn(2, 2, 3, 8, dtype=torch.float64, requires_grad=True)
    q2 = torch.randn(3, 2, 3, 8, dtype=torch.float64, requires_grad=True)
    k, v = torch.randn(2, 2, 2, 3, 8, dtype=torch.float64)
    k2, v2 = torch.randn(2, 3, 2, 3, 8, dtype=torch.float64)
    idx = torch.tensor([1, 1, 0])
    cache = KVCache()
    first = _attend_steps(q, k, v, cache, "reference")
    second = _attend_steps(q2, k2, v2, cache.reorder(idx), "reference")
    _loss(first).backward(retain_graph=True)
    _loss(second).backward()
    got, got2, q.grad, q2.grad = q.grad, q2.grad, None, None
    kk, vv = torch.cat([k[idx], k2], 2), torch.cat([v[idx], v2], 2)  # (3, 2, 6, 8)
    _loss(attnlab.attention(q, k, v, mask=masks.causal())).backward()
    _loss(attnlab.attention(q2, kk, vv, mask=masks.causal())).backward()
    assert got is not None and q.grad is not None and max_err(got, q.grad) < 1e-12
    assert got2 is not None and q2.grad is not None and max_err(got2, q2.grad) < 1e-12


def test_a_compiled_layer_decodes_under_grad_mode_with_the_uncached_gradient() -> None:
    """torch.compile writes into a graph input by copying back into all of it, which
    bumps the version counter the saved keys share: a compiled step writes eagerly."""
    mha, _, leaf = _layer("q_norm")
    compiled = torch.compile(mha, backend="aot_eager")
    x = torch.randn(2, 6, 16, dtype=torch.float64)
    _loss(_layer_steps(compiled, x)).backward()  # type: ignore[arg-type]
    got, leaf.grad = leaf.grad, None
    _loss(mha(x, mask=masks.causal())).backward()
    assert got is not None and leaf.grad is not None and max_err(got, leaf.grad) < 1e-12


def test_an_unsaved_step_after_a_saved_one_leaves_the_saved_keys() -> None:
    """A step with a graph (trainable query norm), then one without (frozen): the second
    writes past the first step's keys, which its backward saved, and leaves them."""
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
