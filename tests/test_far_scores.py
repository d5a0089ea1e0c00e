"""Scores far from 0: torch SDPA's CPU backward recomputes the weights as ``exp(s - lse)``
from a stored logsumexp that rounds by ``|lse| * eps``, as for a bias far from 0
(``test_far_bias_rows.py``). Past ``score_limit`` on the bound ``|scale| * max ||q_i|| *
max ||k_j||`` its gradients passed 2x plain PyTorch's error (scale 1000: dQ 3e-3 where
plain PyTorch's is 1e-9; scale 1e8: inf), so ``auto`` gives such calls with gradients to
another engine; realistic calls and calls without gradients stay with SDPA.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

import attnlab
from attnlab import masks as M
from attnlab.engines import blocked_autograd, get_engine, select_engine
from attnlab.engines._far import score_limit
from attnlab.functional import _request
from tests.conftest import assert_2x_rule, check_and_control


def _plain(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
    """Plain PyTorch causal attention in the inputs' dtype."""
    allowed = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool).tril()
    s = (q @ k.mT * scale).masked_fill(~allowed, float("-inf"))
    return torch.softmax(s, -1) @ v


def _grads(fn: object, x: list[Tensor], dtype: torch.dtype) -> list[Tensor]:
    """The output of ``fn(q, k, v)`` in ``dtype`` and the gradients for upstream ``x[3]``."""
    q, k, v = (t.to(dtype).clone().requires_grad_() for t in x[:3])
    out = fn(q, k, v)  # type: ignore[operator]
    out.backward(x[3].to(dtype))
    return [out.detach(), *(t.grad for t in (q, k, v))]  # type: ignore[list-item]


@pytest.mark.parametrize("scale", [1e3, 1e6, 1e8])
def test_auto_gradients_at_huge_scores_follow_fp64(scale: float) -> None:
    """B=1, H=2, L=40, E=16, causal (the audit's call). Before, ``auto`` ran torch SDPA:
    dQ 3e-3 off at scale 1e3 (plain PyTorch 1e-9), 1e1 at 1e6, inf/NaN at 1e8."""
    g = torch.Generator().manual_seed(0)
    x = [torch.randn(1, 2, 40, 16, generator=g).double() for _ in "qkvo"]
    ref = _grads(lambda q, k, v: _plain(q, k, v, scale), x, torch.float64)
    plain = _grads(lambda q, k, v: _plain(q, k, v, scale), x, torch.float32)
    ours = _grads(
        lambda q, k, v: attnlab.attention(q, k, v, mask=M.causal(), scale=scale), x, torch.float32
    )
    for what, o, p, r in zip(("out", "dq", "dk", "dv"), ours, plain, ref, strict=True):
        assert_2x_rule(o, p, r, f"{what}, scale {scale:g}")


def _pick(q: Tensor, k: Tensor, scale: float | None = None, *, grad: bool = True) -> str:
    """The engine ``auto`` gives a call without a mask (causal ones with gradients go to
    the blocked engine from 256 rows on, whatever their scores)."""
    q, k = q.clone().requires_grad_(grad), k.clone().requires_grad_(grad)
    req = _request(q, k, k, None, None, scale, "dot", "softmax", 0.0, False, False)
    return select_engine("auto", req).name


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_the_bound_decides_and_only_with_gradients(dtype: torch.dtype) -> None:
    """Rows of ones in E=16 (``||q_i|| = 4``): scores ``16 * scale``, the bound itself.
    From the limit on, calls with gradients leave SDPA; below it, or without gradients,
    SDPA keeps them."""
    limit = score_limit(dtype)
    assert limit is not None
    q = torch.ones(1, 2, 64, 16, dtype=dtype)
    assert _pick(q, q, limit / 16 * 0.99) == "sdpa"
    assert _pick(q, q, limit / 16) != "sdpa"
    assert _pick(q, q, -limit / 16) != "sdpa"  # |scale|
    assert _pick(q, q, limit / 16, grad=False) == "sdpa"


@pytest.mark.parametrize("e", [64, 128])
def test_realistic_calls_with_gradients_stay_with_sdpa(e: int) -> None:
    """Unit-variance queries and keys at the default scale (bound 14-17 at 1024 rows)."""
    g = torch.Generator().manual_seed(1)
    q, k = (torch.randn(1, 8, 1024, e, generator=g) for _ in "qk")
    assert _pick(q, k) == "sdpa"


def test_the_sdpa_engine_named_refuses_them_by_name() -> None:
    q, k, v = (torch.randn(1, 2, 40, 16, requires_grad=True) for _ in "qkv")
    check_and_control(
        lambda: attnlab.attention(q, k, v, mask=M.causal(), scale=1e3, engine="sdpa"),
        lambda: attnlab.attention(q, k, v, mask=M.causal(), engine="sdpa"),
        ValueError,
        r"torch SDPA's backward recomputes the weights from a logsumexp .* scores may reach "
        r"\S+ \(\|scale\| \* max \|\|q_i\|\| \* max \|\|k_j\|\| >= 32 in float32\)",
    )


def test_long_calls_sdpa_declines_go_to_the_kernel_not_dense_scores() -> None:
    """Past the limit a long call would otherwise fall to the reference engine's dense
    ``Lq x Lk`` scores; the kernel takes it (from ``2**14`` pairs in float32), in 2x."""
    if blocked_autograd.kernel() is None:
        pytest.skip(f"attnlab's CPU kernel could not be built: {blocked_autograd.kernel_error()}")
    g = torch.Generator().manual_seed(2)
    x = [torch.randn(1, 2, 256, 16, generator=g).double() for _ in "qkvo"]
    q, k = x[0].float(), x[1].float()
    assert _pick(q, k, 4.0) == "blocked" and _pick(q, k) == "sdpa"  # bound ~100 vs ~8
    assert _pick(q[:, :, :64], k[:, :, :64], 4.0) == "reference"  # 2**12 pairs

    def dense(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return torch.softmax(q @ k.mT * 4.0, -1) @ v

    ref, plain = (_grads(dense, x, dt) for dt in (torch.float64, torch.float32))
    ours = _grads(lambda q, k, v: attnlab.attention(q, k, v, scale=4.0), x, torch.float32)
    for what, o, p, r in zip(("out", "dq", "dk", "dv"), ours, plain, ref, strict=True):
        assert_2x_rule(o, p, r, what)


def test_plain_calls_take_the_same_way(monkeypatch: pytest.MonkeyPatch) -> None:
    """A call of q, k, v and a scale skips the request (``attention_plain``): SDPA passes
    such calls on when their scores are too far (and float16 the kernel takes), so the
    request path decides as for any other call."""
    if blocked_autograd.kernel() is None:
        pytest.skip(f"attnlab's CPU kernel could not be built: {blocked_autograd.kernel_error()}")
    ran: list[str] = []
    for name in ("blocked", "sdpa", "reference"):
        engine = get_engine(name)
        monkeypatch.setattr(engine, "forward", _spy(engine.forward, name, ran), raising=False)
    q = torch.randn(1, 2, 256, 16, requires_grad=True)
    attnlab.attention(q, q, q, scale=4.0)
    attnlab.attention(q.detach(), q.detach(), q.detach(), scale=4.0)  # no gradient: SDPA
    assert ran == ["blocked"]


def _spy(fn: object, name: str, ran: list[str]) -> object:
    def spy(req: object) -> object:
        ran.append(name)
        return fn(req)  # type: ignore[operator]

    return spy
