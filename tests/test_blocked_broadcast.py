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
    folded = case not in ("padding", "alibi")
    assert req.k.shape[0] == req.v.shape[0] == (1 if folded else BATCH)
    assert req.q.shape[:2] == ((1, HEADS * BATCH) if folded else (BATCH, HEADS))
    if heads_expanded:
        assert req.k.shape[1] == req.v.shape[1] == 1


def test_broadcast_kv_lse_and_no_grad() -> None:
    """The logsumexp unfolds as the output does; without gradients the same numbers."""
    torch.manual_seed(0)
    q, k, v = torch.randn(BATCH, HEADS, L, 8), torch.randn(1, 2, L, 8), torch.randn(1, 2, L, 8)
    with torch.no_grad():
        got = attnlab.attention(q, k, v, mask=M.window(5), engine="blocked", return_lse=True)
    ref = attnlab.attention(q, k, v, mask=M.window(5), engine="reference", return_lse=True)
    torch.testing.assert_close(got.out, ref.out)
    torch.testing.assert_close(got.lse, ref.lse)
