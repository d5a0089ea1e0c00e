"""Approximate engines at the edges their first tests missed: float16 sums past float16's
range, Performer's one-scale fast path with barely overlapping features, and redrawn
features shared by every block of heads."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

import attnlab
from attnlab import masks as M
from attnlab.engines import approximate as approx_mod


def _linear_fp64(q: Tensor, k: Tensor, v: Tensor, causal: bool) -> Tensor:
    """Katharopoulos et al.'s linear attention, quadratic form, float64."""
    qf, kf = F.elu(q.double()) + 1, F.elu(k.double()) + 1
    a = qf @ kf.transpose(-1, -2)  # (B, H, L, L)
    if causal:
        a = a.tril()
    return (a / a.sum(-1, keepdim=True)) @ v.double()


@pytest.mark.parametrize("causal", [False, True])
def test_linear_float16_past_a_thousand_keys(causal: bool) -> None:
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 1, 2, 1536, 32).unbind(0)
    mask = M.causal() if causal else None
    want = _linear_fp64(q, k, v, causal)
    got = attnlab.attention(q.half(), k.half(), v.half(), mask=mask, engine="linear")
    assert got.dtype == torch.float16
    err16 = ((got.double() - want).norm() / want.norm()).item()
    # float16 rounding of the inputs alone: the same computed from the rounded inputs
    rounded = _linear_fp64(q.half(), k.half(), v.half(), causal)
    floor = ((rounded.half().double() - want).norm() / want.norm()).item()
    assert err16 <= 2 * floor + 1e-3, (err16, floor)  # it was 1.0: every row 0
    assert got.abs().amax(-1).min() > 0


def test_performer_fast_path_keeps_a_row_whose_features_barely_overlap() -> None:
    """Row 0 reads key 0 only: its output is v[0] whatever keys come later (they gave 0)."""
    torch.manual_seed(0)
    u = torch.randn(16, dtype=torch.float64)
    u /= u.norm()
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 1, 1, 8, 16, dtype=torch.float64).unbind(0)
    k[0, 0, 0], q[0, 0, 0] = -25 * u, 17 * u  # scales within the fast path's spread
    q, k, v = q.float(), k.float(), v.float()
    opts = {"num_features": 64, "seed": 0}
    for weights in (False, True):
        out = attnlab.attention(
            q, k, v, mask=M.causal(), engine="performer", engine_options=opts,
            return_weights=weights,
        )  # fmt: skip
        row = (out.out if weights else out)[0, 0, 0]
        torch.testing.assert_close(row, v[0, 0, 0], rtol=1e-5, atol=1e-5)


def test_performer_redraw_is_one_draw_per_call(monkeypatch: pytest.MonkeyPatch) -> None:
    """With redraw=True every block of heads uses the call's features: identical heads
    give identical rows, and the weights' call draws the same."""
    x = torch.randn(1, 1, 64, 16).expand(1, 8, 64, 16)
    opts = {"num_features": 32, "redraw": True}
    monkeypatch.setattr(approx_mod, "HEAD_BLOCK_ELEMENTS", 1)  # one head a block
    torch.manual_seed(0)
    out = attnlab.attention(x, x, x, engine="performer", engine_options=opts)
    for h in range(1, 8):
        assert torch.equal(out[0, h], out[0, 0])
    torch.manual_seed(0)
    with_w = attnlab.attention(
        x, x, x, engine="performer", engine_options=opts, return_weights=True
    )
    torch.testing.assert_close(with_w.out, out, rtol=1e-5, atol=1e-6)
