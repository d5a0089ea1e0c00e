"""interpret.explain: rollout, gradient relevance and integrated gradients against
independent references (numpy formulas, an eager re-implementation, a Riemann sum)."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from attnlab.interpret import (
    capture,
    gradient_relevance,
    integrated_gradients,
    relevance,
    rollout,
)
from attnlab.interpret.explain import HEAD_FUSIONS, IG_METHODS
from attnlab.models import BertConfig, BertEncoder
from attnlab.nn import Encoder, EncoderLayer, LayerConfig
from tests.conftest import check_and_control


def _random_attn(layers: int, b: int, h: int, n: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randn(b, h, n, n, generator=g, dtype=torch.float64).softmax(-1) for _ in range(layers)
    ]


def _numpy_rollout(attns: list[np.ndarray], fusion: str, residual: bool) -> np.ndarray:
    """The paper's formula, one example at a time, in plain numpy."""
    fuse = {"mean": np.mean, "max": np.max, "min": np.min}[fusion]
    n = attns[0].shape[-1]
    joint = np.eye(n)
    for a in attns:  # (H, n, n)
        m = fuse(a, axis=0)
        if residual:
            m = 0.5 * m + 0.5 * np.eye(n)
            m = m / m.sum(-1, keepdims=True)
        joint = m @ joint
    return joint


@pytest.mark.parametrize("fusion", ["mean", "max", "min"])
@pytest.mark.parametrize("residual", [True, False])
def test_rollout_equals_numpy_formula(fusion: str, residual: bool) -> None:
    attns = _random_attn(4, 2, 3, 7, seed=1)
    got = rollout(attns, head_fusion=fusion, residual=residual)
    for b in range(2):
        want = _numpy_rollout([a[b].numpy() for a in attns], fusion, residual)
        np.testing.assert_allclose(got[b].numpy(), want, rtol=1e-12, atol=1e-12)
    if fusion == "mean":  # rows of a product of row-stochastic matrices sum to 1
        assert torch.allclose(got.sum(-1), torch.ones(2, 7, dtype=torch.float64))


def test_rollout_and_relevance_errors() -> None:
    a = torch.rand(1, 2, 4, 4)
    ok = lambda: rollout([a, a])  # noqa: E731
    check_and_control(lambda: rollout([]), ok, ValueError, "non-empty list")
    check_and_control(lambda: rollout([torch.rand(1, 2, 4, 5)]), ok, ValueError, "square")
    check_and_control(lambda: rollout([a, torch.rand(1, 2, 5, 5)]), ok, ValueError, "same B and n")
    from attnlab.interpret import attention_flow

    none = [torch.ones(1, 0, 4, 4)]  # (zero heads: rollout's mean was NaN, its max IndexError)
    for fusion in HEAD_FUSIONS:
        for f in (rollout, attention_flow):
            check_and_control(
                lambda f=f, h=fusion: f(none, head_fusion=h),
                lambda f=f, h=fusion: f([a], head_fusion=h),
                ValueError,
                r"H >= 1 heads\), got \(1, 0, 4, 4\)",
            )
    check_and_control(
        lambda: rollout([a], head_fusion="median"),
        lambda: rollout([a], head_fusion="max"),
        ValueError,
        "head_fusion must be one of",
    )
    check_and_control(
        lambda: relevance([a, a], [a]), lambda: relevance([a], [a]), ValueError, "gradients has 1"
    )
    check_and_control(lambda: rollout([a.numpy()]), ok, TypeError, "must be a Tensor")
    check_and_control(  # "no" was taken as True
        lambda: rollout([a], residual="no"),  # type: ignore[arg-type]
        lambda: rollout([a], residual=False),
        TypeError,
        "residual must be a bool, got str",
    )
    # NaN or negative weights were taken as given: one NaN weight made every row NaN
    nan, neg = a.clone(), a.clone()
    nan[0, 1, 2, 3], neg[0, 0, 1, 1] = float("nan"), -0.5
    for bad in (nan, neg, a.clone().fill_(float("inf"))):
        check_and_control(
            lambda b=bad: rollout([a, b]), ok, ValueError, r"attentions\[1\] must be finite"
        )
        check_and_control(
            lambda b=bad: relevance([b], [a]),
            lambda: relevance([a], [-a]),
            ValueError,
            "finite and >= 0",
        )
    check_and_control(lambda: rollout(torch.stack([a, a])), ok, TypeError, "pass list")


def _encoder(engine: str) -> Encoder:
    torch.manual_seed(0)
    return (
        Encoder(EncoderLayer(LayerConfig(16, 4, 32, dropout=0.0, engine=engine)), 3).double().eval()
    )


def _eager_relevance(enc: Encoder, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The same encoder written out by hand, with softmax weights kept for autograd, and
    Chefer et al.'s rule applied in a plain loop."""
    attns: list[torch.Tensor] = []
    h = x
    for layer in enc.layers:
        mha = layer.self_attn
        b, n, d = h.shape
        heads = mha.num_heads
        qkv = F.linear(h, mha.in_proj_weight, mha.in_proj_bias)  # (B, n, 3D)
        q, k, v = (t.view(b, n, heads, d // heads).transpose(1, 2) for t in qkv.chunk(3, -1))
        a = (q @ k.transpose(-1, -2) / math.sqrt(d // heads)).softmax(-1)  # (B, H, n, n)
        attns.append(a)
        o = (a @ v).transpose(1, 2).reshape(b, n, d)
        h = layer.norm1(h + mha.out_proj(o))
        h = layer.norm2(h + layer.ff(h))
    score = (h[:, 0] @ w).sum()
    grads = torch.autograd.grad(score, attns)
    r = torch.eye(x.shape[1], dtype=x.dtype).repeat(x.shape[0], 1, 1)
    for a, g in zip(attns, grads, strict=True):
        cam = torch.clamp(g * a, min=0).mean(1)
        r = r + torch.bmm(cam, r)
    return r


@pytest.mark.parametrize("engine", ["reference", "sdpa", "blocked"])
def test_gradient_relevance_equals_eager_computation(engine: str) -> None:
    enc = _encoder(engine)
    x = torch.randn(2, 9, 16, dtype=torch.float64)
    w = torch.randn(16, dtype=torch.float64)
    got = gradient_relevance(enc, lambda: enc(x)[:, 0] @ w)
    want = _eager_relevance(enc, x, w)
    assert got.shape == (2, 9, 9)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    assert (got - torch.eye(9)).abs().max() > 1e-3  # the gradients did contribute


def test_gradient_relevance_leaves_model_and_engines_as_they_were() -> None:
    enc = _encoder("sdpa")
    x = torch.randn(1, 6, 16, dtype=torch.float64)
    gradient_relevance(enc, lambda: enc(x)[:, 0].sum())
    with capture(enc) as cap:
        enc(x)
    assert {c.engine for c in cap} == {"sdpa"}  # the reference override ended with the block
    check_and_control(
        lambda: gradient_relevance(enc, lambda: enc(x)),
        lambda: gradient_relevance(enc, lambda: enc(x).sum()),
        ValueError,
        r"scalar or \(B,\)",
    )
    check_and_control(
        lambda: gradient_relevance(enc, lambda: enc(x).sum(), layers=["nothing"]),
        lambda: gradient_relevance(enc, lambda: enc(x).sum(), layers=["*self_attn"]),
        ValueError,
        "no attention call",
    )
    check_and_control(
        lambda: capture(enc, heads=[0], grad=True),
        lambda: capture(enc, grad=True),
        ValueError,
        r"heads=\[0\]",
    )


def _riemann_ig(f, x: torch.Tensor, base: torch.Tensor, steps: int = 4000) -> torch.Tensor:  # type: ignore[no-untyped-def]
    """Midpoint-rule integrated gradients, written out directly."""
    total = torch.zeros_like(x)
    for i in range(steps):
        alpha = (i + 0.5) / steps
        p = (base + alpha * (x - base)).requires_grad_(True)
        (g,) = torch.autograd.grad(f(p).sum(), p)
        total += g
    return (x - base) * total / steps


def test_integrated_gradients_complete_and_equal_a_riemann_sum() -> None:
    enc = _encoder("auto")
    w = torch.randn(16, dtype=torch.float64)

    def f(e: torch.Tensor) -> torch.Tensor:
        return enc(e)[:, 0] @ w  # (B,)

    x = torch.randn(2, 5, 16, dtype=torch.float64)
    # not zeros: LayerNorm of a near-zero vector is ill-conditioned, so the path would not be
    # smooth enough for any quadrature to converge
    base = torch.randn(2, 5, 16, dtype=torch.float64)
    ig = integrated_gradients(f, x, base, steps=64)
    gap = (f(x) - f(base)).detach()
    assert ig.attributions.shape == x.shape
    torch.testing.assert_close(ig.attributions.sum((1, 2)), gap, rtol=0.01, atol=0)
    assert (ig.delta.abs() <= 0.01 * gap.abs()).all()
    fine = integrated_gradients(f, x, base, steps=256).attributions
    want = _riemann_ig(f, x, base, steps=300)
    torch.testing.assert_close(fine, want, rtol=0, atol=3e-3 * want.abs().max().item())


@pytest.mark.parametrize("method", IG_METHODS)
def test_every_path_rule_integrates_a_linear_and_a_quadratic_score_exactly(method: str) -> None:
    """A linear score's attributions are ``(x - b) * w`` exactly under every rule, and a
    quadratic's ``x**2 - b**2`` under all but the one-sided Riemann sums. (captum's trapezoid
    rule weighed points ``1/(n-1)`` apart as ``1/n``: 3/4 of the integral at 4 steps.)"""
    x = torch.tensor([[1.0, 2.0, 3.0]], dtype=torch.float64)
    b = torch.tensor([[0.5, -1.0, 0.0]], dtype=torch.float64)
    w = torch.tensor([2.0, -3.0, 0.5], dtype=torch.float64)
    lin = integrated_gradients(lambda t: t @ w, x, b, steps=4, method=method)
    torch.testing.assert_close(lin.attributions, (x - b) * w, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lin.delta, torch.zeros(1, dtype=torch.float64), atol=1e-12, rtol=0)
    if method in ("riemann_left", "riemann_right"):
        return
    quad = integrated_gradients(lambda t: (t**2).sum(-1), x, b, steps=400, method=method)
    torch.testing.assert_close(quad.attributions, x**2 - b**2, rtol=1e-5, atol=1e-5)
    assert quad.delta.abs().item() < 1e-4


def _rule(method: str, n: int) -> tuple[np.ndarray, np.ndarray]:
    """captum's rule ``method`` at ``n`` points, written here in float64: (points, weights)."""
    if method == "gausslegendre":
        nodes, weights = np.polynomial.legendre.leggauss(n)
        return (nodes + 1) / 2, weights / 2
    k = np.arange(n)
    if method == "riemann_middle":
        return (k + 0.5) / n, np.full(n, 1 / n)
    assert method == "riemann_trapezoid"
    return k / (n - 1), np.r_[0.5, np.ones(n - 2), 0.5] / (n - 1)


def _path_ig(
    f: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    b: torch.Tensor,
    rule: tuple[np.ndarray, np.ndarray],
) -> torch.Tensor:
    """Integrated gradients by hand: the path's points and weights of ``rule``."""
    total = torch.zeros_like(x)
    for a, w in zip(*rule, strict=True):
        p = (b + float(a) * (x - b)).requires_grad_(True)
        (g,) = torch.autograd.grad(f(p).sum(), p)
        total += float(w) * g
    return total * (x - b)


@pytest.mark.parametrize("layer", [False, True])
@pytest.mark.parametrize("chunk", [None, 4])
@pytest.mark.parametrize("method", ["gausslegendre", "riemann_middle", "riemann_trapezoid"])
def test_float64_integrated_gradients_are_float64_accurate(
    layer: bool, chunk: int | None, method: str
) -> None:
    """captum weighs each step by its size cast to float32: 64 float64 steps were 6.6e-9
    off a 300-node float64 integral (the float32 weights' error) where 1e-14 is reachable;
    over a layer, 4.8e-9 where 9e-12 is. Its Riemann points were float32 too: 50-step
    riemann_middle and riemann_trapezoid were 7e-8 to 1.3e-7 off the same rules in float64,
    now at most 1.1e-15. float32 inputs keep captum's result bit for bit."""
    torch.manual_seed(0)
    w = torch.randn(5, 3, dtype=torch.float64)

    def f(t: torch.Tensor) -> torch.Tensor:  # (..., 5) -> (...)
        return torch.tanh(t @ w.to(t.dtype)).pow(2).sum(-1) + torch.sin(t).sum(-1)

    gauss = method == "gausslegendre"  # against the integral; the others against their rule
    steps = 64 if gauss else 50  # (64 Riemann points, k/128, are exact in float32)
    rule = _rule(method, 300 if gauss else steps)
    emb = torch.nn.Embedding(10, 5).double()
    ids, base_ids = torch.tensor([[1, 2, 3], [4, 5, 6]]), torch.tensor([[0, 0, 0]])
    if layer:
        x, b = emb(ids).detach(), emb(base_ids).detach().expand(2, 3, 5)
        want = _path_ig(lambda t: f(t.sum(1)), x, b, rule)
        got = integrated_gradients(
            lambda t: f(emb(t).sum(1)), ids, base_ids, layer=emb, steps=steps,
            internal_batch_size=chunk, method=method,
        )  # fmt: skip
        tol = 1e-10 if gauss else 1e-13  # the 64-node rule's own error: 9e-12
    else:
        x, b = torch.randn(3, 5, dtype=torch.float64), torch.randn(1, 5, dtype=torch.float64)
        want = _path_ig(f, x, b.expand(3, 5), rule)
        got = integrated_gradients(f, x, b, steps=steps, internal_batch_size=chunk, method=method)
        tol = 1e-13  # 9.8e-15
    assert got.attributions.dtype == torch.float64
    err = (got.attributions - want).abs().max().item()
    assert err < tol, err
    gap = f(x.sum(1) if layer else x) - f(b.sum(1) if layer else b)
    torch.testing.assert_close(got.delta, got.attributions.flatten(1).sum(1) - gap.detach())
    if not layer and method != "riemann_trapezoid":  # float32: what captum computes, unchanged
        from captum.attr import IntegratedGradients  # (the trapezoid's weights are fixed)

        x32, b32 = x.float(), b.float()
        plain = IntegratedGradients(f).attribute(x32, b32, n_steps=8, method=method)
        ours = integrated_gradients(f, x32, b32, steps=8, method=method)
        assert torch.equal(ours.attributions, plain)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"method": "bogus"}, "method='bogus' is not one of"),
        ({"internal_batch_size": 0}, "internal_batch_size must be an int >= 1, got 0"),
        # captum's AssertionError (another batch) and IndexError (an empty one)
        ({"baselines": torch.zeros(5, 3)}, r"baselines must have the inputs' shape \(1, 3\)"),
        ({"baselines": "zero"}, "baselines must be a Tensor, a number or None, got str"),
    ],
)
def test_integrated_gradients_names_a_bad_path_rule(kwargs: dict[str, object], match: str) -> None:
    """Named here, not by captum's AssertionError (method) or its warning (batch size)."""
    x = torch.tensor([[1.0, 2.0, 3.0]])
    exc = TypeError if isinstance(kwargs.get("baselines"), str) else ValueError
    with pytest.raises(exc, match=match):
        integrated_gradients(lambda t: (t**2).sum(-1), x, **kwargs)  # type: ignore[arg-type]
    ok = integrated_gradients(lambda t: (t**2).sum(-1), x, method="riemann_middle")
    assert torch.allclose(ok.attributions, x**2, atol=1e-4)  # the control: x_i^2 each
    with pytest.raises(ValueError, match=r"inputs must hold at least one input \(B >= 1\)"):
        integrated_gradients(lambda t: (t**2).sum(-1), x[:0])


def test_integrated_gradients_names_a_forward_without_one_score_per_input() -> None:
    """(captum raised a bare AssertionError.) ``(B, 1)`` is one score per input too."""
    x = torch.tensor([[1.0, 2.0, 3.0]])
    with pytest.raises(ValueError, match=r"forward must return one score per input, \(B,\); got"):
        integrated_gradients(lambda t: t * 2, x)
    col = integrated_gradients(lambda t: (t**2).sum(-1, keepdim=True), x)
    assert torch.allclose(col.attributions, x**2, atol=1e-4)


def test_layer_integrated_gradients_on_token_ids() -> None:
    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=30,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        hidden_dropout_prob=0.0,
    )
    bert = BertEncoder(cfg).double().eval()
    ids = torch.tensor([[2, 7, 9, 11, 3]])
    base = torch.tensor([[2, 0, 0, 0, 3]])  # keep [CLS]/[SEP], pad the words

    w = torch.randn(16, dtype=torch.float64)

    def f(t: torch.Tensor) -> torch.Tensor:
        return bert(t).hidden[:, 0] @ w  # (B,)

    ig = integrated_gradients(f, ids, base, layer=bert.embeddings.word_embeddings, steps=64)
    gap = (f(ids) - f(base)).detach()
    assert ig.attributions.shape == (1, 5, 16) and ig.per_token().shape == (1, 5)
    torch.testing.assert_close(ig.per_token().sum(-1), gap, rtol=0.01, atol=0)
    assert ig.per_token()[0, [0, 4]].abs().max() < 1e-12  # unchanged tokens get nothing
    check_and_control(
        lambda: integrated_gradients(f, ids, base, layer=bert.embeddings.word_embeddings, steps=1),
        lambda: integrated_gradients(f, ids, base, layer=bert.embeddings.word_embeddings, steps=2),
        ValueError,
        "steps must be an int >= 2",
    )
    emb = torch.nn.Embedding(30, 4)  # float baselines of ids: torch's embedding error,
    # "Expected tensor for argument #1 'indices' ...", naming neither

    def g(t: torch.Tensor) -> torch.Tensor:
        return emb(t).sum((1, 2))

    check_and_control(
        lambda: integrated_gradients(g, ids, base.double(), layer=emb, steps=2),
        lambda: integrated_gradients(g, ids, base.int(), layer=emb, steps=2),
        TypeError,
        r"baselines must be integer like the inputs \(torch.int64\), got torch.float64",
    )
