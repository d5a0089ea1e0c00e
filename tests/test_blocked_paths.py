"""The blocked engine off its compiled kernel: biases other than ALiBi, gathered key sets
(global tokens, random blocks) and learnable biases run each query block through torch's
fused CPU flash forward and an eager backward, float64 and NaN inputs through eager
PyTorch both ways.

* Gradients keep flash-attn's 2x rule there: torch's fused CPU flash backward, which these
  paths used, carried 3.6-7.0x plain PyTorch's float32 error in dV and up to 4.2x in dK
  (a tensor bias), 3.0-3.7x in dQ (window | global tokens) here.
* A bias that broadcasts over the query rows or keys (a transformers-style key bias
  ``(B, 1, 1, Lk)``, a row bias, a scalar, a custom bias of the keys only or a number)
  raised "output with shape [2, 1, 1, 128] doesn't match the broadcast shape" where a
  partial tile's mask was written into it, and a learnable scalar raised in backward.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import Tensor

import attnlab
from attnlab import bias as B
from attnlab import masks as M
from attnlab.engines import blocked_autograd as blocked_mod
from tests.conftest import assert_2x_rule, max_err, naive_attention

L, E = 600, 32
PATHS = {  # (mask, whether a dense (1, 2, L, L) bias is added): no path through the kernel
    "tensor bias": (M.window(100), True),
    "window | global tokens": (M.window(100) | M.global_tokens([0, 1]), False),
}


def _grads(fn: Callable[..., Tensor], x: list[Tensor], dout: Tensor, dtype: torch.dtype) -> list:
    q, k, v = (t.to(dtype, copy=True).requires_grad_() for t in x)
    fn(q, k, v).backward(dout.to(dtype))
    return [q.grad, k.grad, v.grad]


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("case", list(PATHS))
def test_float32_gradients_off_the_kernel_keep_the_2x_rule(case: str, seed: int) -> None:
    mask, with_bias = PATHS[case]
    g = torch.Generator().manual_seed(seed)
    x = [torch.randn(1, 2, L, E, generator=g) * 2 for _ in range(3)]  # large scores
    dout = torch.randn(1, 2, L, E, generator=g)
    dense = torch.randn(1, 2, L, L, generator=g) if with_bias else None
    allowed = mask.dense(L, L)

    def naive(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        bias = None if dense is None else dense.to(q.dtype)
        return naive_attention(q, k, v, allowed=allowed, bias=bias)[0]

    def ours(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return torch.as_tensor(attnlab.attention(q, k, v, mask=mask, bias=dense, engine="blocked"))

    want, plain = _grads(naive, x, dout, torch.float64), _grads(naive, x, dout, torch.float32)
    blocked_mod.STATS.clear()
    got = _grads(ours, x, dout, torch.float32)
    assert "scores" not in blocked_mod.STATS  # off the kernel
    for name, o, p, w in zip(["dq", "dk", "dv"], got, plain, want, strict=True):
        assert_2x_rule(o, p, w, f"{case} {name}")


BROADCAST = {  # a bias broadcast over rows or keys: (bias, its dense (1 or 2, 1, L, L) form)
    "(B, 1, 1, Lk) key bias": lambda t: (t[:, :, :1], t[:, :, :1]),
    "(1, Lk) key bias": lambda t: (t[0, 0, :1], t[:1, :, :1]),
    "(Lq, 1) row bias": lambda t: (t[0, 0, :, :1], t[:1, :, :, :1]),
    "(1, 1) scalar": lambda t: (t[0, 0, :1, :1], t[:1, :, :1, :1]),
}


@pytest.mark.parametrize("learnable", [False, True], ids=["fused forward", "eager"])
@pytest.mark.parametrize("case", list(BROADCAST))
def test_a_broadcast_bias_under_a_partial_mask(case: str, learnable: bool) -> None:
    """Forward and every gradient, the bias learnable (float64: the eager path) or not
    (float32: torch's fused forward), against plain PyTorch in float64."""
    g = torch.Generator().manual_seed(0)
    full = torch.randn(2, 1, L, L, generator=g, dtype=torch.float64)
    bias, dense = BROADCAST[case](full)
    dtype = torch.float64 if learnable else torch.float32
    x = [torch.randn(2, 2, L, 16, generator=g, dtype=torch.float64) for _ in range(3)]
    mask = M.causal() & M.window(64)
    leaf = bias.to(dtype).clone().requires_grad_(learnable)
    q, k, v = (t.to(dtype, copy=True).requires_grad_() for t in x)
    out = attnlab.attention(q, k, v, mask=mask, bias=leaf, engine="blocked")
    qr, kr, vr, br = (t.detach().clone().requires_grad_() for t in (*x, dense))
    want, _ = naive_attention(qr, kr, vr, allowed=mask.dense(L, L), bias=br)
    tol = 1e-10 if learnable else 1e-5
    assert max_err(out, want) < tol
    dout = torch.randn(want.shape, generator=g, dtype=torch.float64)
    (out * dout.to(dtype)).sum().backward()
    (want * dout).sum().backward()
    for name, a, b in (("dq", q, qr), ("dk", k, kr), ("dv", v, vr)):
        assert max_err(a.grad, b.grad) < tol, name
    if learnable:
        assert max_err(leaf.grad, br.grad.sum_to_size(dense.shape).view(bias.shape)) < 1e-9


@pytest.mark.parametrize(
    "fn", [lambda h, p, k: 0.01 * k.float(), lambda h, p, k: 0.5], ids=["keys only", "number"]
)
def test_a_custom_bias_of_fewer_dims_under_a_partial_mask(fn: Callable) -> None:
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, L, 16, generator=g) for _ in range(3))
    bias = B.custom(fn, per_head=False)
    got = attnlab.attention(q, k, v, mask=M.causal(), bias=bias, engine="blocked")
    dense = bias.dense(L, L).double()
    want, _ = naive_attention(
        *(t.double() for t in (q, k, v)), allowed=M.causal().dense(L, L), bias=dense
    )
    plain, _ = naive_attention(q, k, v, allowed=M.causal().dense(L, L), bias=dense.float())
    assert_2x_rule(torch.as_tensor(got), plain, want, "custom bias")


@pytest.mark.parametrize(
    ("dtype", "with_bias"), [(torch.float32, True), (torch.float64, False)], ids=["f32", "f64"]
)
def test_inputs_whose_last_dim_is_strided(dtype: torch.dtype, with_bias: bool) -> None:
    """q, k and v as transposed views (stride of the last dim = L): torch's fused CPU
    forward, which these paths run per query block, read them wrongly (off by 1.5-2 in
    float64; 4.5e33 in float32 under ``auto``)."""
    torch.manual_seed(0)
    n, mask = 512, M.causal() & M.window(64)
    dense = torch.randn(n, n) if with_bias else None
    bias = None if dense is None else B.tensor(dense)
    x = [torch.randn(1, 2, E, n, dtype=dtype).transpose(-1, -2) for _ in range(3)]
    assert x[0].stride(-1) != 1
    dout = torch.randn(1, 2, n, E, dtype=torch.float64)
    allowed = mask.dense(n, n)
    wide = None if dense is None else dense.double()

    def naive(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return naive_attention(q, k, v, allowed=allowed, bias=wide)[0]

    ref = _grads(naive, x, dout, torch.float64)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    for engine in ("auto", "blocked"):
        q, k, v = (t.detach().requires_grad_() for t in x)  # the strided views themselves
        out = attnlab.attention(q, k, v, mask=mask, bias=bias, engine=engine)
        assert isinstance(out, Tensor)
        assert max_err(out, naive(*(t.double() for t in x))) < tol, engine
        out.backward(dout.to(dtype))
        for got, r in zip((q.grad, k.grad, v.grad), ref, strict=True):
            assert got is not None and max_err(got, r) < 100 * tol, engine


@pytest.mark.parametrize(("where", "softcap"), [("k", None), ("v", None), ("k", 20.0)])
def test_a_hidden_nan_key_or_value_leaves_the_eager_backward_clean(
    where: str, softcap: float | None
) -> None:
    """(The eager backward made dp = dout v^T with the hidden NaN value, and 0 * NaN put
    NaN into every row's dq and dk; a hidden NaN key did the same through dq = ds k, and
    with soft-capping through the cap's derivative 1 - (s / c)^2.) The gradients equal
    those of the same call with the hidden slot finite, the slot's own 0."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 300, 16, dtype=torch.float64) for _ in range(3))
    mask = M.padding([290]) & M.window(64)
    dout = torch.randn(1, 2, 300, 16, dtype=torch.float64)

    def att(a: Tensor, b: Tensor, c: Tensor, engine: str = "reference") -> Tensor:
        return attnlab.attention(a, b, c, mask=mask, softcap=softcap, engine=engine)  # type: ignore[return-value]

    clean = _grads(att, [q, k, v], dout, torch.float64)
    poisoned = [q, k.clone(), v.clone()]
    poisoned[1 if where == "k" else 2][:, :, 295] = float("nan")  # past every row's padding
    for engine in ("blocked", "reference"):  # the reference engine's dq too, for a key
        got = _grads(lambda a, b, c, e=engine: att(a, b, c, e), poisoned, dout, torch.float64)
        for g, want in zip(got, clean, strict=True):
            assert not g.isnan().any() and max_err(g, want) < 1e-12, engine


def test_a_row_a_bias_hides_whole_has_logsumexp_minus_infinity() -> None:
    """(Without a mask every block is full, and torch's fused forward gave a row of -inf
    bias a logsumexp of 0: with sinks, 0.97 instead of 0.5, and d lse / d sinks 0.62.)"""
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 600, 16) for _ in range(3))
    dense = torch.zeros(600, 600)
    dense[5] = float("-inf")
    sinks = torch.tensor([0.5, -1.0], requires_grad=True)
    for engine in ("reference", "blocked", "auto"):
        r = attnlab.attention(q, k, v, bias=B.tensor(dense), engine=engine, return_lse=True)
        assert isinstance(r, attnlab.AttentionOutput) and r.lse is not None
        assert torch.isneginf(r.lse[0, :, 5]).all(), engine
        s = attnlab.attention(q, k, v, bias=B.tensor(dense), sinks=sinks, engine=engine,
                              return_lse=True)  # fmt: skip
        assert isinstance(s, attnlab.AttentionOutput) and s.lse is not None
        assert torch.allclose(s.lse[0, :, 5], sinks.detach()), engine
        (g,) = torch.autograd.grad(s.lse[0, :, 5].sum(), sinks)
        assert torch.allclose(g, torch.ones(2)), engine


@pytest.mark.parametrize("lk", [8, 15, 40])
def test_a_row_with_a_score_of_plus_infinity_has_the_logsumexp_fp64_gives(lk: int) -> None:
    """A bias of +inf gives its row NaN, as torch's SDPA does, in every engine; its lse is
    +inf, as float64's reference engine and ``torch.logsumexp`` give (torch's fused forward
    gave NaN below 16 keys, so the blocked engine's lse was NaN at 8 keys, +inf at 300)."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, lk, 16) for _ in range(3))
    dense = torch.zeros(1, 2, lk, lk)
    dense[0, 0, 3, 5] = float("inf")
    want = attnlab.attention(*(t.double() for t in (q, k, v)), bias=dense.double(),
                             engine="reference", return_lse=True)  # fmt: skip
    assert isinstance(want, attnlab.AttentionOutput) and want.lse is not None
    assert torch.isposinf(want.lse[0, 0, 3]) and torch.isnan(want.out[0, 0, 3]).all()
    rows = torch.isnan(want.out).any(-1)
    plain = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=dense)
    assert torch.equal(torch.isnan(plain).any(-1), rows)
    for engine in ("blocked", "auto"):
        got = attnlab.attention(q, k, v, bias=dense, engine=engine, return_lse=True)
        assert isinstance(got, attnlab.AttentionOutput) and got.lse is not None
        assert torch.equal(torch.isnan(got.out).any(-1), rows), engine
        assert torch.equal(torch.isposinf(got.lse), torch.isposinf(want.lse)), engine
        assert max_err(got.out[~rows], want.out[~rows]) < 1e-5, engine
        assert max_err(got.lse[~rows], want.lse[~rows]) < 1e-5, engine


def test_a_tensor_bias_that_wants_grad_keeps_the_weights_in_the_graph() -> None:
    """(needs_grad read the bias's parameters only: a plain tensor bias is a buffer, and
    the blocked engine returned its weights cut off from autograd: b.grad 0.29 off.)"""
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 600, 16) for _ in range(3))
    grads, base = [], torch.randn(600, 600)
    for engine in ("reference", "auto"):
        b = base.clone().requires_grad_()
        r = attnlab.attention(q, k, v, mask=M.window(64), bias=B.tensor(b), engine=engine,
                              return_weights=True)  # fmt: skip
        assert isinstance(r, attnlab.AttentionOutput) and r.weights is not None
        (r.out.sum() + r.weights.square().sum()).backward()
        grads.append(b.grad)
    assert grads[0] is not None and grads[1] is not None and max_err(grads[1], grads[0]) < 1e-4


def test_an_empty_grouped_query_call_without_grad() -> None:
    """(B = 0 reached the decoding kernel, which divided by 0 heads: SIGFPE; Lq = 0 raised
    "at most 64 rows per key/value head".)"""
    k = torch.randn(2, 2, 100, 64)
    with torch.no_grad():
        for q in (torch.randn(0, 8, 1, 64), torch.randn(2, 8, 0, 64)):
            out = attnlab.attention(q, k[: q.shape[0]], k[: q.shape[0]])
            assert isinstance(out, Tensor) and out.shape == q.shape
