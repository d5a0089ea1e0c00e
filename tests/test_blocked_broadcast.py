"""The blocked engine reads a broadcast K and V once: a batch of 1 in k and v (a shared
cache) folds into the query heads, and heads expanded with stride 0 count as one; making
the broadcast views contiguous copied K and V B times (auditor helper-268: q (32, 8, 128,
64), k and v (1, 8, 4096, 64), window(256): +541 MiB where SDPA took 20 MiB)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import Tensor

import attnlab
from attnlab import bias as B
from attnlab import masks as M
from attnlab.engines import blocked as blocked_mod
from attnlab.engines.base import AttentionRequest
from tests.conftest import assert_2x_rule

BATCH, HEADS, KV_HEADS, L = 3, 4, 2, 40

CASES: dict[str, Callable[[], tuple[M.Mask, B.Bias | None]]] = {
    "window": lambda: (M.window(5), None),
    "causal": lambda: (M.causal(), None),
    "documents": lambda: (M.documents(torch.tensor([0] * 15 + [1] * 25)), None),
    "padding": lambda: (M.padding([10, 20, 40]), None),  # per batch item: not folded
    "alibi": lambda: (M.causal(), B.alibi(HEADS)),  # per head: not folded
}


def _spy(monkeypatch: pytest.MonkeyPatch) -> list[AttentionRequest]:
    """The requests the blocked engine computes (its ``blocked_attention``'s)."""
    seen: list[AttentionRequest] = []
    inner = blocked_mod.blocked_attention

    def spy(req: AttentionRequest, *args: object) -> tuple[Tensor, Tensor]:
        seen.append(req)
        return inner(req, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(blocked_mod, "blocked_attention", spy)
    return seen


def _run(
    engine: str, dtype: torch.dtype, qkv: list[Tensor], case: str, heads_expanded: bool
) -> list[Tensor]:
    """Output and the gradients of q, k and v (k and v of batch 1) of one call."""
    mask, bias = CASES[case]()
    q, k, v = (t.to(dtype).requires_grad_() for t in qkv)
    kk, vv = (k, v)
    if heads_expanded:  # one key/value head, expanded by the caller
        kk, vv = (t[:, :1].expand(-1, HEADS, -1, -1) for t in (k, v))
    out = attnlab.attention(q, kk, vv, mask=mask, bias=bias, engine=engine)
    weights = torch.arange(out.numel(), dtype=dtype).reshape(out.shape).sin()
    (out * weights).sum().backward()
    return [out.detach(), *(t.grad for t in (q, k, v) if t.grad is not None)]


@pytest.mark.parametrize("heads_expanded", [False, True])
@pytest.mark.parametrize("case", list(CASES))
def test_broadcast_kv_is_read_once(
    case: str, heads_expanded: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    torch.manual_seed(0)
    qkv = [torch.randn(BATCH, HEADS, L, 8, dtype=torch.float64)]
    qkv += [torch.randn(1, KV_HEADS, L, 8, dtype=torch.float64) for _ in range(2)]
    seen = _spy(monkeypatch)
    got = _run("blocked", torch.float32, qkv, case, heads_expanded)
    plain = _run("reference", torch.float32, qkv, case, heads_expanded)
    ref = _run("reference", torch.float64, qkv, case, heads_expanded)
    for what, ours, pt, r in zip(("out", "dq", "dk", "dv"), got, plain, ref, strict=True):
        assert ours.shape == r.shape, what
        assert_2x_rule(ours, pt, r, f"{case} {what}")
    (req,) = seen
    folded = case not in ("padding", "alibi")  # the batch attnlab broadcast, gradients too
    assert req.k.shape[0] == req.v.shape[0] == (1 if folded else BATCH)
    assert req.q.shape[:2] == ((1, HEADS * BATCH) if folded else (BATCH, HEADS))
    if heads_expanded:  # the caller's expand: per-head gradients asked of it, not folded
        assert req.k.shape[1] == req.v.shape[1] == HEADS


def test_broadcast_kv_lse_and_no_grad() -> None:
    """The logsumexp unfolds as the output does; without gradients the same numbers."""
    torch.manual_seed(0)
    q, k, v = torch.randn(BATCH, HEADS, L, 8), torch.randn(1, 2, L, 8), torch.randn(1, 2, L, 8)
    with torch.no_grad():
        got = attnlab.attention(q, k, v, mask=M.window(5), engine="blocked", return_lse=True)
    ref = attnlab.attention(q, k, v, mask=M.window(5), engine="reference", return_lse=True)
    torch.testing.assert_close(got.out, ref.out)
    torch.testing.assert_close(got.lse, ref.lse)


def test_expanded_heads_fold_without_grad(monkeypatch: pytest.MonkeyPatch) -> None:
    """Heads a caller expanded are read once where no gradient is wanted."""
    torch.manual_seed(0)
    q, k, v = torch.randn(BATCH, HEADS, L, 8), torch.randn(1, 1, L, 8), torch.randn(1, 1, L, 8)
    kk, vv = (t.expand(-1, HEADS, -1, -1) for t in (k, v))
    seen = _spy(monkeypatch)
    got = attnlab.attention(q, kk, vv, mask=M.causal(), engine="blocked")
    ref = attnlab.attention(q, kk, vv, mask=M.causal(), engine="reference")
    torch.testing.assert_close(got, ref)
    (req,) = seen
    assert req.k.shape[:2] == req.v.shape[:2] == (1, 1)


def _stride0_grads(engine: str, shape: tuple[int, ...], how: str) -> list[Tensor]:
    """The gradients of a stride-0 ``k`` and ``v`` of ``shape`` (one ``(1, 1, 64, 16)``
    tensor expanded) that a caller asks for per index, ``how``: a leaf (both the same one,
    or two), ``autograd.grad`` of the expanded views, or their ``retain_grad``; fp64."""
    torch.manual_seed(0)
    q = torch.randn(2, 4, 64, 16, dtype=torch.float64)
    base = torch.randn(1, 1, 64, 16, dtype=torch.float64, requires_grad=how != "leaf")
    k = base.expand(shape)
    v = base.detach().expand(shape) if how != "same leaf" else k
    if how in ("leaf", "same leaf"):
        k.requires_grad_()
    if how == "retain_grad":
        v = base.flip(2).expand(shape)
        k.retain_grad(), v.retain_grad()
    out = attnlab.attention(q, k, v, mask=M.causal(), engine=engine)
    loss = (out * torch.arange(out.numel()).reshape(out.shape).sin()).sum()
    if how == "retain_grad":
        loss.backward()
        return [k.grad, v.grad]  # type: ignore[list-item]
    wanted = (k,) if how == "same leaf" else (k, v) if v.requires_grad else (k,)
    return list(torch.autograd.grad(loss, wanted))


@pytest.mark.parametrize("how", ["leaf", "same leaf", "autograd.grad", "retain_grad"])
@pytest.mark.parametrize("shape", [(2, 2, 64, 16), (1, 2, 64, 16), (2, 1, 64, 16)])
def test_a_stride0_kv_gets_its_gradient_per_index(shape: tuple[int, ...], how: str) -> None:
    """A stride-0 k or v whose own gradient is asked for got the whole sum at index 0 and
    zeros elsewhere (audit A4: dk[0, 0, 0, 0] 5.1786 and dk[1, 1, 0, 0] 0.0 where the
    reference has 0.6818 and 1.7152): the folded K's gradient put there for an expand's
    backward to sum. Per index as the reference engine's, in fp64."""
    got = _stride0_grads("blocked", shape, how)
    ref = _stride0_grads("reference", shape, how)
    for ours, r in zip(got, ref, strict=True):
        assert ours.shape == r.shape
        torch.testing.assert_close(ours, r, rtol=1e-10, atol=1e-10)
