"""Logit soft-capping (``softcap * tanh(s / softcap)``, Gemma 2) in the core: the
reference and blocked engines against plain PyTorch written from the definition, forward
and backward; engines that cannot soft-cap say so; bad values are named."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import attnlab
from attnlab import masks
from attnlab.engines import blocked_autograd
from tests.conftest import assert_2x_rule, check_and_control, max_err, naive_attention

CAP = 4.0


def naive_capped(q, k, v, allowed, bias, scale, cap):  # type: ignore[no-untyped-def]
    """Soft-capped attention from the definition (fully masked rows give 0)."""
    return naive_attention(q, k, v, allowed=allowed, bias=bias, scale=scale, softcap=cap)


def _inputs(dtype: torch.dtype, lq: int = 97, e: int = 40) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, lq, e, generator=g) * 2  # large scores, so the cap matters
    k = torch.randn(2, 2, lq, e, generator=g) * 2
    v = torch.randn(2, 2, lq, e, generator=g)
    bias = torch.randn(1, 4, lq, lq, generator=g) * 0.5
    return [t.to(dtype).requires_grad_() for t in (q, k, v, bias)]


def _allowed(lq: int) -> torch.Tensor:
    m = (masks.causal() & masks.window(30)).dense(lq, lq)  # (1, 1, L, L)
    m = m.clone()
    m[..., 5, :] = False  # one fully masked row
    return m


@pytest.mark.parametrize("engine", ["reference", "blocked"])
def test_softcap_follows_the_definition_by_the_2x_rule(engine: str) -> None:
    lq = 97
    allowed = _allowed(lq)
    scale = 40**-0.5

    def run(fn, dtype):  # type: ignore[no-untyped-def]
        ts = _inputs(dtype, lq)
        out = fn(*ts)
        out.square().sum().backward()
        return [out.detach(), *(t.grad for t in ts)]

    ref64 = run(lambda q, k, v, b: naive_capped(q, k, v, allowed, b, scale, CAP)[0], torch.float64)
    plain = run(lambda q, k, v, b: naive_capped(q, k, v, allowed, b, scale, CAP)[0], torch.float32)
    ours = run(
        lambda q, k, v, b: attnlab.attention(
            q, k, v, mask=allowed, bias=b, softcap=CAP, engine=engine
        ),
        torch.float32,
    )
    for what, o, p, r in zip(["out", "dq", "dk", "dv", "dbias"], ours, plain, ref64, strict=True):
        assert_2x_rule(o, p, r, f"{engine} {what}")
    assert float(ours[0][:, :, 5].abs().max()) == 0.0  # the fully masked row gives 0
    uncapped = attnlab.attention(*_inputs(torch.float32, lq)[:3], mask=allowed, engine=engine)
    assert max_err(uncapped, ours[0]) > 1e-2  # positive control: the cap changes the result


@pytest.mark.parametrize("engine", ["reference", "blocked"])
def test_softcap_weights_are_exact(engine: str) -> None:
    q, k, v, b = (t.detach().double() for t in _inputs(torch.float64, 64, 16))
    allowed = _allowed(64)
    r = attnlab.attention(
        q, k, v, mask=allowed, bias=b, softcap=CAP, engine=engine, return_weights=True
    )
    _, w = naive_capped(q, k, v, allowed, b, 16**-0.5, CAP)
    assert max_err(r.weights, w) < 1e-12  # type: ignore[union-attr]
    w2 = attnlab.attention_weights(q, k, v, mask=allowed, bias=b, softcap=CAP, heads=[1])
    assert max_err(w2, w[:, [1]]) < 1e-12


# an interval mask with rows that see no key (the spans alone mask it), and a mask of
# partial tiles with ALiBi (the tiles' mask, the slopes evaluated in the kernel)
KERNEL_CASES = {
    "interval": lambda: (
        masks.causal() & masks.window(70) & masks.padding([300, 250], [300, 250]),
        None,
    ),
    "tiles+alibi": lambda: (masks.causal() & masks.dilated(120, 2), attnlab.bias.alibi(4)),
}


@pytest.mark.parametrize("case", list(KERNEL_CASES))
def test_kernel_softcaps_by_the_2x_rule(case: str) -> None:
    """The compiled kernel caps the scores itself (before ALiBi and the mask), forward and
    backward, under the 2x rule against fp64; with weights written in the same pass."""
    from attnlab.engines import blocked as blocked_mod

    if blocked_mod.kernel() is None:
        pytest.skip(f"attnlab's CPU kernel could not be built: {blocked_mod.kernel_error()}")
    n, scale = 300, 40**-0.5
    mask, bias = KERNEL_CASES[case]()
    allowed = mask.dense(n, n, batch=2, heads=4).expand(2, 4, n, n)
    dense_bias = torch.zeros(1) if bias is None else bias.dense(n, n, batch=1, heads=4)

    def run(fn, dtype):  # type: ignore[no-untyped-def]
        ts = _inputs(dtype, n)[:3]
        out = fn(*ts)
        out.square().sum().backward()
        return [out.detach(), *(t.grad for t in ts)]

    def naive(q, k, v):  # type: ignore[no-untyped-def]
        return naive_capped(q, k, v, allowed, dense_bias.to(q.dtype), scale, CAP)[0]

    ref64, plain = run(naive, torch.float64), run(naive, torch.float32)
    blocked_autograd.STATS.clear()
    ours = run(
        lambda q, k, v: attnlab.attention(
            q, k, v, mask=mask, bias=bias, softcap=CAP, engine="blocked"
        ),
        torch.float32,
    )
    assert blocked_autograd.STATS.get("scores", 0) > 0  # the kernel ran
    for what, o, p, r in zip(["out", "dq", "dk", "dv"], ours, plain, ref64, strict=True):
        assert_2x_rule(o, p, r, f"kernel {case} {what}")
    q, k, v = (t.detach() for t in _inputs(torch.float32, n)[:3])
    r = attnlab.attention(
        q, k, v, mask=mask, bias=bias, softcap=CAP, engine="blocked", return_weights=True
    )
    w64 = naive_capped(*(t.double() for t in (q, k, v)), allowed, dense_bias.double(), scale, CAP)[
        1
    ]
    w32 = naive_capped(q, k, v, allowed, dense_bias, scale, CAP)[1]
    assert_2x_rule(r.weights, w32, w64, f"kernel {case} weights")  # type: ignore[union-attr]


@pytest.mark.parametrize("engine", ["sdpa", "performer", "nystrom", "linear"])
def test_engines_that_cannot_softcap_decline_with_a_reason(engine: str) -> None:
    q = k = v = torch.randn(1, 2, 16, 8)
    check_and_control(
        lambda: attnlab.attention(q, k, v, softcap=CAP, engine=engine),
        lambda: attnlab.attention(q, k, v, engine=engine),
        ValueError,
        f"engine='{engine}' cannot compute this request: .*soft-?cap",
    )
    assert attnlab.attention(q, k, v, softcap=CAP).shape == q.shape  # auto finds one


@pytest.mark.parametrize(
    ("value", "exc", "match"),
    [(0.0, ValueError, "softcap must be a positive finite float or None, got 0.0"),
     (float("inf"), ValueError, "softcap must be a positive finite"),
     ("30", TypeError, "softcap must be a positive float or None, got str")],
)  # fmt: skip
def test_bad_softcap_is_named(value: object, exc: type[Exception], match: str) -> None:
    q = torch.randn(1, 1, 4, 8)
    check_and_control(
        lambda: attnlab.attention(q, q, q, softcap=value),  # type: ignore[arg-type]
        lambda: attnlab.attention(q, q, q, softcap=30),
        exc,
        match,
    )
    want = attnlab.attention(q, q, q, softcap=30.0, scale=0.5)
    for real in (np.float32(30.0), np.int64(30)):  # numpy's numbers, as scale takes them
        got = attnlab.attention(q, q, q, softcap=real, scale=np.float32(0.5))  # type: ignore[arg-type]
        assert torch.equal(got, want)  # type: ignore[arg-type]
