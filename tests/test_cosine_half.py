"""Cosine scores in float16 on the engines that make them from unit vectors (blocked,
flex). The unit vectors were made in float16, where ``F.normalize``'s eps of 1e-12 rounds
to 0 and a norm past 65504 to inf: a zero query gave a NaN row, one zero key NaN in every
row, and vectors of larger norm became 0 (the reference engine widens half inputs
first)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import Tensor

import attnlab
from tests.conftest import assert_2x_rule

ENGINES = {"blocked": {}, "flex": {"compile": False}}


def _inputs(case: str) -> list[Tensor]:
    """q, k, v (1, 2, 64, 16) and an upstream gradient in float64, with the case's
    vectors: a zero query, a zero key, or entries of +-3e4."""
    g = torch.Generator().manual_seed(0)
    q, k, v, dout = (torch.randn(1, 2, 64, 16, generator=g, dtype=torch.float64) for _ in "qkvd")
    if case == "zero query":
        q[0, 0, 5] = 0
    elif case == "zero key":
        k[0, 1, 7] = 0
    else:  # norms of 1.2e5, past float16's largest
        q, k = q.sign() * 3e4, k.sign() * 3e4
    return [q, k, v, dout]


def _run(
    fn: Callable[..., Tensor], x: list[Tensor], dtype: torch.dtype, grad: bool
) -> list[Tensor]:
    """``fn(q, k, v)`` in ``dtype`` and, with ``grad``, the gradients of q, k, v."""
    q, k, v = (t.detach().to(dtype).clone().requires_grad_(grad) for t in x[:3])
    out = fn(q, k, v)
    if not grad:
        return [out.detach()]
    out.backward(x[3].to(dtype))
    return [out.detach(), *(t.grad for t in (q, k, v))]  # type: ignore[list-item]


def _plain(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """The formula in the inputs' dtype, the unit vectors made in float32 at least (in
    float16 the eps is 0)."""
    wide = torch.promote_types(q.dtype, torch.float32)
    qn = q.to(wide) / q.to(wide).norm(dim=-1, keepdim=True).clamp_min(1e-12)
    kn = k.to(wide) / k.to(wide).norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return torch.softmax(10.0 * qn.to(q.dtype) @ kn.to(q.dtype).mT, -1) @ v


@pytest.mark.parametrize("case", ["zero query", "zero key", "entries of 3e4"])
@pytest.mark.parametrize("engine", list(ENGINES))
def test_half_cosine_follows_fp64(engine: str, case: str) -> None:
    """Forward in float16 and float32; gradients in float32 where the engine has them on
    the CPU (float16's are F.normalize's own 1/eps at a zero vector: inf for any code)."""
    x = _inputs(case)
    opts = ENGINES[engine] or None

    def ours(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return attnlab.attention(
            q, k, v, score="cosine", scale=10.0, engine=engine, engine_options=opts
        )

    for dtype in (torch.float16, torch.float32):
        grad = engine == "blocked" and dtype == torch.float32
        ref = _run(_plain, x, torch.float64, grad)
        got, control = _run(ours, x, dtype, grad), _run(_plain, x, dtype, grad)
        assert torch.isfinite(got[0]).all(), f"{engine}, {case}, {dtype}: not finite"
        for name, a, c, r in zip(("out", "dq", "dk", "dv"), got, control, ref, strict=False):
            assert_2x_rule(a, c, r, f"{engine} {case} {dtype} {name}")


@pytest.mark.parametrize("engine", ["reference", "blocked", "auto"])
def test_half_cosine_gradient_at_a_zero_vector_is_fp64_rounded(engine: str) -> None:
    """A zero query's and key's float16 gradients are float64's rounded to float16: inf
    where float64's passes 65504 (1/eps = 1e12 times the upstream part: 5e11 here), finite
    elsewhere (torch's F.normalize in float16 gives NaN: its eps rounds to 0). A zero
    vector under padding, which no loss term reads, gets gradient 0."""
    x = _inputs("zero query")
    x[1][0, 1, 7] = 0  # and a zero key

    def ours(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return attnlab.attention(q, k, v, score="cosine", scale=10.0, engine=engine)

    ref = _run(ours, x, torch.float64, True)
    got = _run(ours, x, torch.float16, True)
    for name, a, r in zip(("dq", "dk"), got[1:3], ref[1:3], strict=True):
        big = r.abs() > torch.finfo(torch.float16).max
        assert big.any() and torch.equal(torch.isinf(a), big), f"{engine} {name}"
        assert not torch.isnan(a).any(), f"{engine} {name}"
        assert torch.equal(a[big].sign(), r[big].sign().to(a.dtype)), f"{engine} {name}"
    q, k, v, dout = (t.clone() for t in x)
    q[0, :, 60:], k[0, :, 60:] = 0, 0  # padded tail: masked keys, rows the loss skips
    dout[0, :, 60:] = 0
    padded = attnlab.masks.padding(torch.tensor([60]))

    def masked(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return attnlab.attention(q, k, v, score="cosine", mask=padded, engine=engine)

    g = _run(masked, [q, k, v, dout], torch.float16, True)
    assert all(torch.equal(t[0, :, 60:], torch.zeros_like(t[0, :, 60:])) for t in g[1:3])
