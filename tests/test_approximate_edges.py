"""Approximate engines at the edges their first tests missed: float16 sums past float16's
range, Performer's one-scale fast path with barely overlapping features, and redrawn
features shared by every block of heads."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

import attnlab
from attnlab import masks as M
from attnlab.engines import approximate as approx_mod
from tests.conftest import max_err


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


def _favor_fp64(q: Tensor, k: Tensor, v: Tensor, scale: float, causal: bool) -> Tensor:
    """FAVOR+ with the engine's features (seed 0), in log space over the features and
    keys in float64: nothing underflows, whatever the norms."""
    from attnlab.engines.performer import orthogonal_features

    w = orthogonal_features(64, q.shape[-1], generator=torch.Generator().manual_seed(0))
    x, y = q.double() * scale**0.5, k.double() * scale**0.5
    phi_q = x @ w.T - x.square().sum(-1, keepdim=True) / 2  # (B, H, Lq, F), log features
    phi_k = y @ w.T - y.square().sum(-1, keepdim=True) / 2
    log_a = torch.logsumexp(phi_q.unsqueeze(-2) + phi_k.unsqueeze(-3), -1)  # (B, H, Lq, Lk)
    if causal:
        log_a = log_a.masked_fill(~torch.ones_like(log_a, dtype=torch.bool).tril(), -torch.inf)
    return torch.softmax(log_a, -1) @ v.double()


@pytest.mark.parametrize("causal", [False, True])
def test_performer_rows_whose_features_barely_overlap_keep_their_value(causal: bool) -> None:
    """Queries and keys of large norm (scale 1e4: log-features 600 apart) gave rows of 0
    in float32: 3 of 4 rows (non-causal) and 2 of 4 (causal), and row 0 with key 0 of
    norm 60 against a query of 40 gave 0 (not v[0]) even with each key its own scale."""
    torch.manual_seed(0)
    q, v = torch.randn(1, 1, 4, 8), torch.randn(1, 1, 4, 3)
    opts = {"num_features": 64, "seed": 0}
    mask = M.causal() if causal else None
    for weights in (False, True):
        res = attnlab.attention(q, q, v, scale=1e4, mask=mask, engine="performer",
                                engine_options=opts, return_weights=weights)  # fmt: skip
        out = res.out if weights else res
        want = _favor_fp64(q, q, v, 1e4, causal)
        torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)
    u = torch.randn(16, dtype=torch.float64)
    u /= u.norm()
    q, k, v = torch.randn(3, 1, 1, 8, 16, dtype=torch.float64).unbind(0)
    k[0, 0, 0], q[0, 0, 0] = -60 * u, 40 * u
    out = attnlab.attention(q.float(), k.float(), v.float(), mask=mask, engine="performer",
                            engine_options=opts)  # fmt: skip
    want = _favor_fp64(q, k, v, 16**-0.5, causal)  # the default scale
    torch.testing.assert_close(out.double(), want, rtol=1e-4, atol=1e-4)


def test_performer_of_head_dim_0_is_uniform() -> None:
    """(E = 0 raised ZeroDivisionError drawing the features; q . k = 0: the mean of v.)"""
    q = torch.zeros(1, 1, 3, 0)
    v = torch.arange(9.0).view(1, 1, 3, 3)
    for mask in (None, M.causal()):
        out = attnlab.attention(q, q, v, mask=mask, engine="performer")
        want = attnlab.attention(q, q, v, mask=mask, engine="reference")
        torch.testing.assert_close(out, want)


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


def _performer_grad(q: Tensor, opts: dict[str, int]) -> Tensor:
    leaf = q.clone().requires_grad_()
    attnlab.attention(leaf, leaf, leaf, engine="performer", engine_options=opts).sum().backward()
    assert leaf.grad is not None
    return leaf.grad


def test_performer_features_cached_under_inference_mode_serve_a_backward() -> None:
    """Features first built in a call under ``torch.inference_mode`` are cached; a later
    call with gradients saves them for backward, and gets the uncached gradient."""
    from attnlab.engines.performer import _seeded_features

    q, opts = torch.randn(1, 2, 16, 8), {"num_features": 64, "seed": 12345}
    _seeded_features.cache_clear()
    want = _performer_grad(q, opts)
    _seeded_features.cache_clear()
    with torch.inference_mode():
        attnlab.attention(q, q, q, engine="performer", engine_options=opts)
    torch.testing.assert_close(_performer_grad(q, opts), want, rtol=0, atol=0)


def _nystrom(*qkv: Tensor, iterations: int, weights: bool = False) -> Tensor:
    opts = {"num_landmarks": 64, "pinv_iterations": iterations}
    res = attnlab.attention(*qkv, engine="nystrom", engine_options=opts, return_weights=weights)
    return res.out if isinstance(res, attnlab.AttentionOutput) else res


def test_nystrom_float16_pseudo_inverse_past_float16s_range() -> None:
    """Queries and keys ~ 0.2 N(0, 1), 30 iterations: the float32 pseudo-inverse, entries
    up to 6.4e5, was cast to float16 (max 65504): every output entry inf or NaN, where
    float32 is finite."""
    torch.manual_seed(0)
    q, k, v = (0.2 * torch.randn(3, 1, 2, 256, 32)).unbind(0)
    assert torch.isfinite(_nystrom(q, k, v, iterations=30)).all()  # the positive control
    for weights in (False, True):
        out = _nystrom(q.half(), k.half(), v.half(), iterations=30, weights=weights)
        bad = int((~torch.isfinite(out)).sum())
        assert out.dtype == torch.float16 and bad == 0, f"{bad} of {out.numel()} not finite"


@pytest.mark.parametrize(("dtype", "factor"), [(torch.float16, 2), (torch.bfloat16, 8)])
def test_nystrom_half_precision_is_near_its_rounding_floor(dtype: torch.dtype, factor: int) -> None:
    """Against the engine in float64: at most ``factor`` x the error of the float64 engine
    run on the rounded inputs and rounded once (bfloat16's softmaxes run in bfloat16).
    The pseudo-inverse's float32 entries, rounded to half precision, cancel: 115x it in
    float16 (8.7e-3) and 167x in bfloat16 (9.3e-2) at 15 iterations."""
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 1, 2, 256, 32, dtype=torch.float64).unbind(0)
    q, k = 0.1 * q, 0.1 * k
    ref = _nystrom(q, k, v, iterations=15)
    low = [t.to(dtype) for t in (q, k, v)]
    floor = max_err(_nystrom(*[t.double() for t in low], iterations=15).to(dtype), ref)
    for weights in (False, True):
        err = max_err(_nystrom(*low, iterations=15, weights=weights), ref)
        assert err <= factor * floor, f"error {err:.3g}, floor {floor:.3g} (weights={weights})"


def _nan_inputs(seed: int, lq: int, lk: int) -> tuple[Tensor, Tensor, Tensor]:
    """q (2, 4, lq, 4), k (2, 2, lk, 4), v (2, 2, lk, 3) with a NaN in some of them."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = torch.randn(2, 4, lq, 4, generator=g), *torch.randn(2, 2, 2, lk, 4, generator=g)
    v = v[..., :3]
    for t in (q, k, v):
        if torch.rand(1, generator=g).item() < 0.6:
            b, pos = (int(torch.randint(0, n, (1,), generator=g)) for n in (2, t.shape[2]))
            t[b, :, pos, int(torch.randint(0, t.shape[3], (1,), generator=g))] = float("nan")
    return q, k, v


@pytest.mark.parametrize("engine", ["linear", "performer", "nystrom"])
def test_nan_reaches_exactly_the_rows_that_read_it(engine: str) -> None:
    """README: NaN in the inputs stays NaN in the rows that read it, and a NaN the mask
    hides stays out of the others (it was 0, or spread through 0 * NaN to every row; with
    return_weights=True a causal call's later NaN value reached every row)."""
    checked = 0
    for seed, weights in itertools.product(range(16), (False, True)):
        lq, lk = ((9, 9), (5, 9), (12, 12))[seed % 3]
        q, k, v = _nan_inputs(seed, lq, lk)
        masks = [None, M.padding([lk, lk - 3])]
        if engine != "nystrom":
            masks += [M.causal(), M.causal() & M.padding([lk, lk - 4])]
        if lq == lk:
            masks.append(M.padding([lk, lk - 2], [lq, lq - 3]))
        for mask in masks:
            if engine == "nystrom" and q.isnan().any():
                continue  # its query landmarks mix every query: a NaN query reaches all rows
            want = attnlab.attention(q.double(), k.double(), v.double(), mask=mask)
            opts = {"num_landmarks": 3} if engine == "nystrom" else {"chunk_size": 4}
            got = attnlab.attention(
                q, k, v, mask=mask, engine=engine, engine_options=opts, return_weights=weights
            )
            out = got.out if isinstance(got, attnlab.AttentionOutput) else got
            wrong = int((out.isnan() != want.isnan()).sum())  # entries NaN in one only
            assert wrong == 0, f"{wrong} entries, seed {seed}, {mask}, weights={weights}"
            checked += 1
    assert checked > (20 if engine == "nystrom" else 80)


@pytest.mark.parametrize("engine", ["linear", "performer", "nystrom"])
def test_a_hidden_nan_changes_nothing(engine: str) -> None:
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 2, 2, 10, 4).unbind(0)
    mask = M.padding([10, 6], [10, 7])
    kn, vn, qn = k.clone(), v.clone(), q.clone()
    kn[1, :, 6:], vn[1, :, 6:], qn[1, :, 7:] = float("nan"), float("nan"), float("nan")
    for weights in (False, True):
        clean = attnlab.attention(q, k, v, mask=mask, engine=engine, return_weights=weights)
        hidden = attnlab.attention(qn, kn, vn, mask=mask, engine=engine, return_weights=weights)
        for a, b in zip(clean, hidden, strict=True) if weights else [(clean, hidden)]:
            if a is not None:
                torch.testing.assert_close(b, a, rtol=0, atol=0)


@pytest.mark.parametrize("engine", ["performer", "linear"])
@pytest.mark.parametrize("causal", [True, False])
def test_a_meta_call_infers_the_shapes_of_the_cpu_call(engine: str, causal: bool) -> None:
    """(A causal performer call on the meta device read its keys' scales:
    "Tensor.item() cannot be called on meta tensors".)"""
    mask = M.causal() if causal else M.padding([30, 40])
    shapes = [(2, 4, 40, 16), (2, 2, 40, 16), (2, 2, 40, 8)]
    cpu = [torch.randn(s, requires_grad=True) for s in shapes]
    meta = [torch.empty(s, device="meta", requires_grad=True) for s in shapes]
    want = attnlab.attention(*cpu, mask=mask, engine=engine)
    got = attnlab.attention(*meta, mask=mask, engine=engine)
    assert got.is_meta and got.shape == want.shape and got.dtype == want.dtype
    grads = torch.autograd.grad(got.sum(), meta)
    assert [g.shape for g in grads] == [t.shape for t in meta]
