"""Approximate engines (linear, performer, nystrom) and Linformer, each against an
independent formulation: the quadratic form of its own kernel, or exact softmax attention
where the approximation becomes exact."""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

import attnlab
from attnlab import bias as B
from attnlab import masks as M
from attnlab.engines import AttentionRequest, available_engines, select_engine
from attnlab.engines import approximate as approx_mod
from attnlab.engines.performer import orthogonal_features
from attnlab.nn import LinformerAttention
from attnlab.nn.linformer import linformer_attention
from tests.conftest import assert_2x_rule, check_and_control, max_err, naive_attention

APPROX = ["linear", "performer", "nystrom"]
SIZES = [(37, 37), (20, 45), (45, 20), (130, 130), (1, 1)]


def _qkv(
    b: int, hq: int, hkv: int, lq: int, lk: int, e: int = 8, ev: int = 5, amp: float = 1.0
) -> tuple[Tensor, Tensor, Tensor]:
    q = amp * torch.randn(b, hq, lq, e, dtype=torch.float64)
    k = amp * torch.randn(b, hkv, lk, e, dtype=torch.float64)
    return q, k, torch.randn(b, hkv, lk, ev, dtype=torch.float64)


def _kernel_quadratic(
    qf: Tensor, kf: Tensor, v: Tensor, causal: bool, key_lengths: list[int] | None = None
) -> Tensor:
    """Materialize phi(Q) phi(K)^T, mask it, normalize rows, multiply V."""
    g = qf.shape[1] // kf.shape[1]
    kf, v = kf.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    a = torch.einsum("bhqf,bhkf->bhqk", qf, kf)
    lq, lk = a.shape[-2:]
    rows, cols = torch.arange(lq)[:, None], torch.arange(lk)[None, :]
    if causal:
        a = a * (cols <= rows + lk - lq)
    if key_lengths is not None:
        a = a * (cols < torch.tensor(key_lengths)[:, None, None, None])
    den = a.sum(-1, keepdim=True)
    return torch.where(den > 0, a / den.where(den > 0, 1.0), 0.0) @ v


def _out(*args: Tensor, **kw: Any) -> Tensor:
    out = attnlab.attention(*args, **kw)
    assert isinstance(out, Tensor)
    return out


# -- linear attention -----------------------------------------------------------------


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("sizes", SIZES)
@pytest.mark.parametrize("chunk", [1, 7, 64])
def test_linear_equals_its_quadratic_form(causal: bool, sizes: tuple[int, int], chunk: int) -> None:
    q, k, v = _qkv(2, 4, 2, *sizes)
    ours = _out(
        q,
        k,
        v,
        mask=M.causal() if causal else None,
        engine="linear",
        engine_options={"chunk_size": chunk},
    )
    ref = _kernel_quadratic(F.elu(q) + 1, F.elu(k) + 1, v, causal)
    assert max_err(ours, ref) < 1e-10


def test_linear_padding_equals_quadratic_form_and_zeroes_padded_rows() -> None:
    q, k, v = _qkv(3, 2, 2, 30, 30)
    lengths = [30, 11, 0]
    mask = M.causal() & M.padding(lengths, [30, 11, 0])
    ours = _out(q, k, v, mask=mask, engine="linear", engine_options={"chunk_size": 8})
    ref = _kernel_quadratic(F.elu(q) + 1, F.elu(k) + 1, v, True, lengths)
    assert max_err(ours[:2, :, :11], ref[:2, :, :11]) < 1e-10
    assert max_err(ours[0], ref[0]) < 1e-10
    assert ours[1, :, 11:].abs().max() == 0 and ours[2].abs().max() == 0


# -- Performer ------------------------------------------------------------------------


def test_performer_approaches_softmax_as_features_grow() -> None:
    """Mean relative error over 6 feature draws at F = 64, 256, 1024 against fp64
    softmax attention: it falls about like 1/sqrt(F) (x0.5 per 4x features)."""
    q, k, v = _qkv(1, 2, 2, 128, 128, e=16, amp=0.5)
    exact, _ = naive_attention(q, k, v)
    errs = []
    for f in (64, 256, 1024):
        draws = [
            _out(q, k, v, engine="performer", engine_options={"num_features": f, "seed": s})
            for s in range(6)
        ]
        errs.append(sum(float((d - exact).norm() / exact.norm()) for d in draws) / 6)
    assert errs[1] < 0.8 * errs[0] and errs[2] < 0.8 * errs[1], errs
    assert errs[2] < 0.15, errs


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("sizes", [(37, 37), (20, 45), (45, 20)])
def test_performer_equals_its_quadratic_form(causal: bool, sizes: tuple[int, int]) -> None:
    """Same features, no stabilizer, dense: phi(x) = exp(W x - |x|^2 / 2) / sqrt(F)."""
    q, k, v = _qkv(2, 4, 2, *sizes, amp=0.7)
    w = orthogonal_features(32, 8, generator=torch.Generator().manual_seed(3))
    opts = {"num_features": 32, "seed": 3, "chunk_size": 8}
    ours = _out(q, k, v, mask=M.causal() if causal else None, engine="performer", **_opts(opts))

    def phi(x: Tensor) -> Tensor:
        x = x * 8**-0.25  # sqrt(scale) on each side
        return torch.exp(x @ w.T - x.square().sum(-1, keepdim=True) / 2) / math.sqrt(32)

    assert max_err(ours, _kernel_quadratic(phi(q), phi(k), v, causal)) < 1e-10


def _opts(opts: dict[str, object]) -> dict[str, Any]:
    return {"engine_options": opts}


def test_performer_features_are_orthogonal_and_seeded() -> None:
    w = orthogonal_features(20, 8, generator=torch.Generator().manual_seed(0))
    for block in (w[:8], w[8:16]):
        unit = block / block.norm(dim=1, keepdim=True)
        assert max_err(unit @ unit.T, torch.eye(8, dtype=torch.float64)) < 1e-12
    again = orthogonal_features(20, 8, generator=torch.Generator().manual_seed(0))
    assert torch.equal(w, again)


def test_performer_seed_and_redraw() -> None:
    q, k, v = _qkv(1, 2, 2, 16, 16)

    def run(**opts: object) -> Tensor:
        return _out(q, k, v, engine="performer", engine_options={"num_features": 16, **opts})

    assert torch.equal(run(seed=1), run(seed=1))
    assert not torch.equal(run(seed=1), run(seed=2))
    assert not torch.equal(run(redraw=True), run(redraw=True))
    torch.manual_seed(5)
    first = run(redraw=True)
    torch.manual_seed(5)
    assert torch.equal(first, run(redraw=True))


def test_performer_padding_equals_truncated_keys() -> None:
    q, k, v = _qkv(2, 2, 1, 12, 20)
    opts = {"num_features": 16, "seed": 0}
    padded = _out(q, k, v, mask=M.padding([20, 9]), engine="performer", engine_options=opts)
    for b, n in enumerate([20, 9]):
        alone = _out(q[b : b + 1], k[b : b + 1, :, :n], v[b : b + 1, :, :n], **_perf(opts))
        assert max_err(padded[b : b + 1], alone) < 1e-12


def _perf(opts: dict[str, object]) -> dict[str, Any]:
    return {"engine": "performer", "engine_options": opts}


# -- Nystromformer --------------------------------------------------------------------


@pytest.mark.parametrize("n", [16, 64, 97])
def test_nystrom_with_a_landmark_per_token_is_exact(n: int) -> None:
    """Landmarks = tokens makes F = A = B the softmax matrix; 40 iterations of the
    pseudo-inverse converge to fp64 precision at these sizes (6, the paper's default,
    leave ~3e-2)."""
    q, k, v = _qkv(2, 4, 2, n, n, e=16)
    ours = _out(q, k, v, engine="nystrom", engine_options=_landmarks(n, 40))
    assert max_err(ours, naive_attention(q, k, v)[0]) < 1e-8


def _landmarks(m: int, iterations: int) -> dict[str, object]:
    return {"num_landmarks": m, "pinv_iterations": iterations}


def test_nystrom_padding_with_a_landmark_per_token_is_exact() -> None:
    q, k, v = _qkv(3, 2, 2, 24, 24)
    mask = M.padding([24, 10, 0], [24, 7, 0])
    ours = _out(q, k, v, mask=mask, engine="nystrom", engine_options=_landmarks(24, 40))
    allowed = mask.dense(24, 24, batch=3)
    assert max_err(ours, naive_attention(q, k, v, allowed=allowed)[0]) < 1e-8


def test_nystrom_matches_the_papers_formula() -> None:
    """m < N landmarks: segment means, three softmaxes and torch's exact pinv."""
    q, k, v = _qkv(1, 2, 2, 48, 48)
    ours = _out(q, k, v, engine="nystrom", engine_options=_landmarks(8, 60))
    ql, kl = (x.view(1, 2, 8, 6, 8).mean(3) for x in (q, k))
    s = 8**-0.5
    f = torch.softmax(q @ kl.transpose(-1, -2) * s, -1)
    a = torch.softmax(ql @ kl.transpose(-1, -2) * s, -1)
    b = torch.softmax(ql @ k.transpose(-1, -2) * s, -1)
    assert max_err(ours, f @ torch.linalg.pinv(a) @ (b @ v)) < 1e-8


# -- all approximate engines ----------------------------------------------------------


@pytest.mark.parametrize("engine", APPROX)
def test_weights_are_the_implied_matrix(engine: str) -> None:
    q, k, v = _qkv(2, 4, 2, 20, 20)
    mask = M.padding([20, 13]) if engine == "nystrom" else M.causal() & M.padding([20, 13])
    r = attnlab.attention(q, k, v, mask=mask, engine=engine, return_weights=True)
    assert isinstance(r, attnlab.AttentionOutput) and r.weights is not None
    assert max_err(r.out, _out(q, k, v, mask=mask, engine=engine)) < 1e-10
    w = r.weights
    assert max_err(r.out, w @ v.repeat_interleave(2, 1)) < 1e-10
    rows_err = max_err(w.sum(-1), torch.ones_like(w[..., 0]))
    assert rows_err < (1e-2 if engine == "nystrom" else 1e-10)  # F A^+ B: rows sum to ~1
    assert w[1, :, :, 13:].abs().max() < 1e-12


@pytest.mark.parametrize("engine", APPROX)
def test_gradients_match_finite_differences(engine: str) -> None:
    q, k, v = (t.requires_grad_() for t in _qkv(1, 2, 1, 7, 9, e=4, ev=3, amp=0.7))
    mask = M.padding([6]) if engine == "nystrom" else M.causal() & M.padding([6])
    opts: dict[str, object] = {
        "linear": {"chunk_size": 3},
        "performer": {"num_features": 8, "seed": 0, "chunk_size": 3},
        "nystrom": {"num_landmarks": 3, "pinv_iterations": 4},
    }[engine]

    def fn(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return _out(q, k, v, mask=mask, engine=engine, engine_options=opts)

    assert torch.autograd.gradcheck(fn, (q, k, v))


def _features(engine: str, x: Tensor, w: Tensor) -> Tensor:
    """The kernel's feature map from its definition (Performer's without a stabilizer)."""
    if engine == "linear":
        return F.elu(x) + 1
    x = x * x.shape[-1] ** -0.25  # sqrt(scale) on each side
    return torch.exp(x @ w.T - x.square().sum(-1, keepdim=True) / 2)


@pytest.mark.parametrize("engine", ["linear", "performer"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("weights", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_an_item_without_keys_gets_zero_output_and_finite_zero_gradients(
    engine: str, causal: bool, weights: bool, dtype: torch.dtype
) -> None:
    """padding([0, 6]): item 0 has no key. Its output and gradients are 0 (not NaN),
    item 1's equal the fp64 quadratic form's, differentiated by autograd."""
    q, k, v = _qkv(2, 2, 1, 5, 6, e=4, ev=3)
    opts = {"num_features": 8, "seed": 0, "chunk_size": 2} if engine == "performer" else {}
    w = orthogonal_features(8, 4, generator=torch.Generator().manual_seed(0))
    mask = M.padding([0, 6])
    mask = M.causal() & mask if causal else mask
    ins = [t.to(dtype).requires_grad_() for t in (q, k, v)]
    r = attnlab.attention(
        *ins, mask=mask, engine=engine, engine_options=opts, return_weights=weights
    )
    assert isinstance(r, attnlab.AttentionOutput) or not weights
    out = r.out if isinstance(r, attnlab.AttentionOutput) else r
    cot = torch.randn(out.shape, dtype=torch.float64)  # nonzero on item 0's rows too
    grads = torch.autograd.grad((out * cot.to(dtype)).sum(), ins)
    refs = [t[1:].clone().requires_grad_() for t in (q, k, v)]
    phi_q, phi_k = (_features(engine, t, w) for t in refs[:2])
    ref = _kernel_quadratic(phi_q, phi_k, refs[2], causal)
    ref_grads = torch.autograd.grad((ref * cot[1:]).sum(), refs)
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    assert out[0].abs().max() == 0 and max_err(out[1:].double(), ref) < tol
    for g, ref_g in zip(grads, ref_grads, strict=True):
        assert torch.isfinite(g).all() and g[0].abs().max() == 0
        assert max_err(g[1:].double(), ref_g) < tol * 10


@pytest.mark.parametrize("engine", APPROX)
def test_blocks_of_heads_give_the_same_result(engine: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Long calls run over blocks of key/value heads (CPU cache); same output and grads."""
    q, k, v = (t.requires_grad_() for t in _qkv(2, 6, 3, 40, 40))
    mask = M.padding([40, 25]) if engine == "nystrom" else M.causal() & M.padding([40, 25])

    def run() -> list[Tensor]:
        out = _out(q, k, v, mask=mask, engine=engine)
        return [out, *torch.autograd.grad(out.square().sum(), (q, k, v))]

    whole = run()
    monkeypatch.setattr(approx_mod, "HEAD_BLOCK_ELEMENTS", 1)  # one key/value head a block
    for a, b in zip(whole, run(), strict=True):
        assert max_err(a, b) < 1e-12


@pytest.mark.parametrize("engine", APPROX)
def test_approximation_error_measures_against_exact(engine: str) -> None:
    q, k, v = _qkv(1, 2, 2, 32, 32)
    err = attnlab.approximation_error(q, k, v, engine=engine)
    diff = _out(q, k, v, engine=engine) - naive_attention(q, k, v)[0]
    assert err["max_abs"] == pytest.approx(diff.abs().max().item())
    assert err["mean_abs"] == pytest.approx(diff.abs().mean().item())
    assert err["relative_fro"] == pytest.approx(
        (diff.norm() / naive_attention(q, k, v)[0].norm()).item()
    )
    assert attnlab.approximation_error(q, k, v, engine="reference")["max_abs"] < 1e-12


# -- auto, options and unsupported requests -------------------------------------------


def _request(lq: int, lk: int, **kw: Any) -> AttentionRequest:
    q, k, v = (torch.zeros(1, 1, n, 4) for n in (lq, lk, lk))
    base: dict[str, Any] = dict(
        q=q,
        k=k,
        v=v,
        mask=None,
        bias=None,
        scale=0.5,
        score="dot",
        normalize="softmax",
        dropout_p=0.0,
        return_weights=False,
        return_lse=False,
    )
    return AttentionRequest(**(base | kw))


def test_auto_picks_an_approximation_only_when_asked() -> None:
    long, causal = (4096, 4096), M.causal()
    for kw in ({}, {"mask": causal}, {"mask": M.padding([4096])}, {"return_weights": True}):
        for sizes in (long, (64, 64)):
            assert select_engine("auto", _request(*sizes, **kw)).exact, (kw, sizes)

    def pick(lq: int, lk: int, **kw: Any) -> str:
        return select_engine("auto", _request(lq, lk, approximate=True, **kw)).name

    assert pick(*long) == "nystrom" and pick(2048, 2048) == "nystrom"
    assert pick(*long, mask=causal) == "performer"
    assert pick(2048, 2048, mask=causal) in ("sdpa", "blocked")  # exact: below its threshold
    assert pick(64, 64) == "sdpa"
    assert pick(*long, return_weights=True) == "blocked"  # exact; per block, not Lq x Lk
    assert pick(*long, mask=M.window(64) & causal) == "blocked"


def test_requests_with_options_stay_hashable_and_read_only() -> None:
    req = attnlab.functional._request(
        *_qkv(1, 1, 1, 2, 2),
        None,
        None,
        None,
        "dot",
        "softmax",
        0.0,
        False,
        False,
        engine_options={"seed": 1},
    )
    assert isinstance(hash(req), int) and dict(req.options) == {"seed": 1}
    with pytest.raises(TypeError):
        req.options["seed"] = 2  # type: ignore[index]


def test_engine_registry_marks_approximations_inexact() -> None:
    engines = available_engines()
    assert [n for n in APPROX if engines[n].exact] == []
    assert all(engines[n].exact for n in ("reference", "sdpa", "blocked"))


OPTION_ERRORS: list[tuple[str, dict[str, Any], dict[str, Any], type[Exception], str]] = [
    (
        "unknown",
        {"engine": "performer", "engine_options": {"features": 8}},
        {"engine": "performer", "engine_options": {"num_features": 8}},
        ValueError,
        r"engine_options: 'features' is not an option of engine 'performer'; it accepts "
        r"'num_features', 'seed', 'redraw', 'chunk_size'",
    ),
    (
        "exact_engine",
        {"engine": "sdpa", "engine_options": {"seed": 0}},
        {"engine": "sdpa", "engine_options": {}},
        ValueError,
        r"'seed' is not an option of engine 'sdpa'; it accepts none",
    ),
    (
        "type",
        {"engine": "nystrom", "engine_options": {"num_landmarks": 4.0}},
        {"engine": "nystrom", "engine_options": {"num_landmarks": 4}},
        TypeError,
        r"engine 'nystrom' option 'num_landmarks' must be int, got 4.0 \(float\)",
    ),
    (  # numpy's integers are ints here (they were refused: "must be int, got np.int64(4)")
        "numpy_float",
        {"engine": "nystrom", "engine_options": {"num_landmarks": np.float64(4.0)}},
        {"engine": "nystrom", "engine_options": {"num_landmarks": np.int64(4)}},
        TypeError,
        r"option 'num_landmarks' must be int, got (np\.float64\()?4\.0\)? \(float64\)",  # numpy 1|2
    ),
    (
        "bool_for_int",
        {"engine": "linear", "engine_options": {"chunk_size": True}},
        {"engine": "linear", "engine_options": {"chunk_size": 2}},
        TypeError,
        r"option 'chunk_size' must be int, got True \(bool\)",
    ),
    (
        "range",
        {"engine": "performer", "engine_options": {"num_features": 0}},
        {"engine": "performer", "engine_options": {"num_features": 1}},
        ValueError,
        r"engine 'performer' option 'num_features' must be >= 1, got 0",
    ),
    (  # torch raised "Overflow when unpacking long long", naming no option
        "seed_range",
        {"engine": "performer", "engine_options": {"seed": 2**64}},
        {"engine": "performer", "engine_options": {"seed": 2**64 - 1}},
        ValueError,
        rf"engine 'performer' option 'seed' must be <= {2**64 - 1}, got {2**64}",
    ),
    (
        "seed_and_redraw",
        {"engine": "performer", "engine_options": {"seed": 1, "redraw": True}},
        {"engine": "performer", "engine_options": {"redraw": True}},
        ValueError,
        r"takes either seed .* or redraw=True .*, not both",
    ),
    (
        "auto_with_options",
        {"engine_options": {"num_features": 8}},
        {"engine_options": None},
        ValueError,
        r"engine_options=\{'num_features': 8\} need a named engine",
    ),
    (
        "not_a_mapping",
        {"engine": "linear", "engine_options": [("chunk_size", 2)]},
        {"engine": "linear", "engine_options": dict([("chunk_size", 2)])},
        TypeError,
        r"engine_options must be a mapping of option names to values or None, got list",
    ),
    (
        "approximate_flag",
        {"approximate": 1},
        {"approximate": True},
        TypeError,
        r"approximate must be a bool, got int",
    ),
    (
        "nystrom_causal",
        {"engine": "nystrom", "mask": M.causal()},
        {"engine": "nystrom", "mask": M.padding([5, 3])},
        ValueError,
        r"engine='nystrom' cannot compute this request: nystrom has no causal form",
    ),
    (
        "window",
        {"engine": "performer", "mask": M.window(2)},
        {"engine": "performer", "mask": M.causal()},
        ValueError,
        r"performer supports masks.causal\(\), masks.padding\(...\) and their '&' only, "
        r"not mask=window\(left=2, right=0\)\. Engines that can: 'reference', 'sdpa', 'blocked'$",
    ),
    (
        "bias",
        {"engine": "linear", "bias": B.alibi(4)},
        {"engine": "linear"},
        ValueError,
        r"linear cannot add a bias to scores it never forms",
    ),
    (
        "normalizer",
        {"engine": "nystrom", "normalize": "sparsemax"},
        {"engine": "nystrom"},
        ValueError,
        r"nystrom approximates softmax only, not normalize='sparsemax'",
    ),
    (
        "lse",
        {"engine": "performer", "return_lse": True},
        {"engine": "performer"},
        ValueError,
        r"performer does not compute the logsumexp",
    ),
]


@pytest.mark.parametrize(
    ("bad", "good", "exc", "match"),
    [c[1:] for c in OPTION_ERRORS],
    ids=[c[0] for c in OPTION_ERRORS],
)
def test_bad_options_and_requests_raise(
    bad: dict[str, Any], good: dict[str, Any], exc: type[Exception], match: str
) -> None:
    q, k, v = torch.randn(2, 4, 5, 8), torch.randn(2, 2, 5, 8), torch.randn(2, 2, 5, 3)

    def call(kw: dict[str, Any]) -> Callable[[], object]:
        return lambda: attnlab.attention(q, k, v, **kw)

    check_and_control(call(bad), call(good), exc, match)


@pytest.mark.parametrize(
    ("engine", "options"),
    [
        ("performer", {"num_features": 16, "seed": 3, "chunk_size": 4}),
        ("nystrom", {"num_landmarks": 4, "pinv_iterations": 3}),
        ("linear", {"chunk_size": 4}),
    ],
)
def test_numpy_integer_options_are_their_ints(engine: str, options: dict[str, int]) -> None:
    """Every int option given as a numpy integer gives the result of the Python int."""
    q, k, v = torch.randn(3, 1, 2, 9, 8).unbind(0)
    mask = None if engine == "nystrom" else M.causal()  # (chunk_size: the causal sums')
    want = attnlab.attention(q, k, v, mask=mask, engine=engine, engine_options=options)
    for kind in (np.int64, np.int32, np.uint16):
        given = {name: kind(n) for name, n in options.items()}
        got = attnlab.attention(q, k, v, mask=mask, engine=engine, engine_options=given)
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_exact_engine_errors_do_not_suggest_approximations() -> None:
    q = torch.randn(1, 1, 4, 8)
    with pytest.raises(ValueError, match=r"Engines that can: 'reference', 'blocked'$"):
        attnlab.attention(q, q, q, engine="sdpa", return_weights=True)


# -- Linformer ------------------------------------------------------------------------


@pytest.mark.parametrize("sharing", ["headwise", "kv", "none"])
def test_linformer_with_identity_projections_equals_torch_mha(sharing: str) -> None:
    n, d, h = 12, 16, 4
    ref = torch.nn.MultiheadAttention(d, h, batch_first=True).double().eval()
    ours = LinformerAttention(d, h, max_len=n, proj_dim=n, sharing=sharing).double()
    with torch.no_grad():
        for i, lin in enumerate((ours.q_proj, ours.k_proj, ours.v_proj)):
            lin.weight.copy_(ref.in_proj_weight[i * d : (i + 1) * d])
            lin.bias.copy_(ref.in_proj_bias[i * d : (i + 1) * d])
        ours.out_proj.load_state_dict(ref.out_proj.state_dict())
        for p in (ours.proj_k, ours.proj_v):
            if p is not None:
                p.copy_(torch.eye(n, dtype=torch.float64).expand_as(p))
    x = torch.randn(2, n, d, dtype=torch.float64)
    assert max_err(ours(x), ref(x, x, x)[0]) < 1e-12


def test_linformer_projects_lengths_and_zeroes_padding() -> None:
    q, k, v = _qkv(2, 4, 2, 10, 10)
    pk, pv = torch.randn(2, 3, 16, dtype=torch.float64), torch.randn(3, 16, dtype=torch.float64)
    ours = linformer_attention(q, k, v, pk, pv, mask=M.padding([10, 6], [10, 4]))
    assert isinstance(ours, Tensor)
    kz, vz = k.clone(), v.clone()
    kz[1, :, 6:], vz[1, :, 6:] = 0, 0
    kp, vp = pk[:, :, :10] @ kz, pv[:, :10] @ vz
    ref, _ = naive_attention(q, kp, vp)
    ref[1, :, 4:] = 0
    assert max_err(ours, ref) < 1e-12


def test_linformer_errors() -> None:
    attn = LinformerAttention(8, 2, max_len=6, proj_dim=3)
    check_and_control(
        lambda: attn(torch.randn(1, 7, 8)),
        lambda: attn(torch.randn(1, 6, 8)),
        ValueError,
        r"key has length 7, past this layer's max_len=6 \(the projections' columns\)",
    )
    check_and_control(
        lambda: attn(torch.randn(1, 6, 8), mask=M.causal()),
        lambda: attn(torch.randn(1, 6, 8), mask=M.padding([4])),
        ValueError,
        r"Linformer takes mask=None or masks.padding\(...\) only, got causal\(\)",
    )
    check_and_control(
        lambda: LinformerAttention(8, 2, max_len=6, sharing="layer"),
        lambda: LinformerAttention(8, 2, max_len=6, sharing="kv"),
        ValueError,
        r"sharing='layer' is not one of \('none', 'headwise', 'kv'\)",
    )
    for bad, match in (({"dropout": 2.0}, "dropout must be in"), ({"engine": "x"}, "engine='x'")):
        check_and_control(  # checked when built, as MultiHeadAttention's (at the first call)
            lambda bad=bad: LinformerAttention(8, 2, max_len=6, **bad),  # type: ignore[arg-type]
            lambda: LinformerAttention(8, 2, max_len=6, dropout=0.5, engine="reference"),
            ValueError,
            match,
        )
    x = torch.randn(2, 6, 8)
    check_and_control(  # a bool tensor mask: an AttributeError on .lengths() before
        lambda: attn(x, mask=torch.ones(6, 6, dtype=torch.bool)),  # type: ignore[arg-type]
        lambda: attn(x, mask=M.padding([4, 6])),
        TypeError,
        r"Linformer takes mask=None or masks.padding\(...\) only, got Tensor",
    )
    check_and_control(  # one length for a batch of 2 was applied to both rows
        lambda: attn(x, mask=M.padding([4])),
        lambda: attn(x[:1], mask=M.padding([4])),
        ValueError,
        "mask=padding\\(...\\) holds 1 lengths but the batch size is 2",
    )
    with pytest.raises(TypeError, match="max_len must be a positive int, got True"):
        LinformerAttention(8, 2, max_len=True)  # type: ignore[arg-type]
    check_and_control(  # bias="False" was taken as True (biases were built)
        lambda: LinformerAttention(8, 2, max_len=6, bias="False"),  # type: ignore[arg-type]
        lambda: LinformerAttention(8, 2, max_len=6, bias=False),
        TypeError,
        "^bias must be a bool, got str$",
    )


def test_linformer_names_the_wrong_input_as_passed() -> None:
    """query, key and value were all "inputs must be (B, L, 8)" (a list a ValueError), a
    key and value of two lengths were named by the head-split ``k (2, 2, 5, 4)``, a key
    of another batch as ``batch sizes of q, k, v``."""
    attn, x = LinformerAttention(8, 2, max_len=6, proj_dim=3), torch.randn(2, 5, 8)
    cases = [
        ((torch.randn(2, 5, 4),), ValueError, r"^query must be \(B, L, 8\), got \(2, 5, 4\)$"),
        ((x, torch.randn(2, 5, 4)), ValueError, r"^key must be \(B, L, 8\), got \(2, 5, 4\)$"),
        ((x, x, torch.randn(2, 5, 4)), ValueError, r"^value must be \(B, L, 8\), got \(2, 5, 4"),
        ((x, [[0.0] * 8]), TypeError, r"^key must be a Tensor \(B, L, D\), got list$"),
        ((x, x, [[0.0] * 8]), TypeError, r"^value must be a Tensor \(B, L, D\), got list$"),
        ((x, x, torch.randn(2, 6, 8)), ValueError,
         r"^key and value must .* got key \(2, 5, 8\) and value \(2, 6, 8\)$"),
        ((x, torch.randn(3, 5, 8)), ValueError,
         r"^key must have query's batch size 2 \(or 1\), got key \(3, 5, 8\) for query"),
    ]  # fmt: skip
    for args, kind, match in cases:
        with pytest.raises(kind, match=match):
            attn(*args)
    # the control: right inputs run, and a key and value of batch 1 broadcast
    ref = attn(x, x[:1].expand(2, 5, 8).contiguous())
    assert max_err(attn(x, x[:1]), ref) < 1e-6


def test_linformer_runs_under_autocast_by_the_2x_rule() -> None:
    """Under CPU bfloat16 autocast the Linear layers give bfloat16 keys beside the float32
    projections: it raised "proj_k must be of k's dtype torch.bfloat16, got torch.float32"
    (MultiHeadAttention ran). Now the projections follow autocast: the 2x rule against
    the float64 module, next to the same layer written by hand in plain torch ops under
    autocast, and gradients reach the float32 projections."""
    torch.manual_seed(0)
    lin = LinformerAttention(32, 4, max_len=16, proj_dim=8).eval()
    x = torch.randn(2, 10, 32)
    ref = lin.double()(x.double()).detach()
    lin.float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = lin(x)
        heads = [  # (B, H, L, E)
            F.linear(x, m.weight, m.bias).view(2, 10, 4, 8).transpose(1, 2)
            for m in (lin.q_proj, lin.k_proj, lin.v_proj)
        ]
        kp, vp = lin.proj_k[:, :10] @ heads[1], lin.proj_v[:, :10] @ heads[2]  # (B, H, P, E)
        w = torch.softmax((heads[0] @ kp.transpose(-1, -2)) / math.sqrt(8), dim=-1)
        o = (w.to(vp.dtype) @ vp).transpose(1, 2).reshape(2, 10, 32)
        plain = F.linear(o, lin.out_proj.weight, lin.out_proj.bias)
    assert isinstance(out, Tensor) and out.dtype == plain.dtype == torch.bfloat16
    assert_2x_rule(out, plain, ref, "LinformerAttention under autocast")
    out.float().sum().backward()
    assert lin.proj_k.grad is not None and lin.proj_k.grad.dtype == torch.float32


@pytest.mark.parametrize(
    ("engine", "causal", "length"),
    [("linear", False, 2048), ("linear", True, 2048), ("performer", False, 1024),
     ("performer", True, 1024), ("nystrom", False, 256)],
)  # fmt: skip
def test_float16_autocast_runs_as_float16_inputs(engine: str, causal: bool, length: int) -> None:
    """Under CPU float16 autocast the engines' float32 steps (linear's and performer's
    sums, nystrom's pseudo-inverse) were cast back to float16 by autocast's matmuls:
    linear gave 0 on 2019 of 2048 rows (error 0.066 against 3.1e-5 for float16 inputs),
    performer 3x and nystrom 1.85x the error of float16 inputs. Now the same error as
    float16 inputs, against the same engine in float64, and no row of 0."""
    q, k, v = _qkv(1, 1, 1, length, length, 32, 32, amp=2.0 if engine == "performer" else 1.0)
    opts = {"seed": 0} if engine == "performer" else None
    kw: dict[str, Any] = {"mask": M.causal() if causal else None, "engine": engine}
    ref = _out(q, k, v, **kw, engine_options=opts)
    half = _out(q.half(), k.half(), v.half(), **kw, engine_options=opts)
    with torch.autocast("cpu", dtype=torch.float16):
        out = _out(q.float(), k.float(), v.float(), **kw, engine_options=opts)
    zero, err, half_err = int((out.abs().sum(-1) == 0).sum()), max_err(out, ref), max_err(half, ref)
    assert out.dtype == torch.float16 and zero == 0, f"{zero} rows of 0"
    assert err <= 1.25 * half_err, f"autocast's error {err:.3g}, float16 inputs' {half_err:.3g}"


# -- the ListOps generator of the accuracy benchmark ----------------------------------


def _listops() -> Any:
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "listops.py"
    spec = importlib.util.spec_from_file_location("listops", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _median(xs: list[int]) -> int:
    """LRA's MED: the median, rounded down."""
    s, n = sorted(xs), len(xs)
    return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) // 2


def _evaluate(tokens: list[str]) -> int:
    """An independent stack evaluator of a ListOps token sequence."""
    ops = {
        "[MAX": max,
        "[MIN": min,
        "[MED": _median,
        "[SM": lambda xs: sum(xs) % 10,
    }
    stack: list[list[Any]] = [[]]
    for tok in tokens:
        if tok in ops:
            stack.append([tok])
        elif tok == "]":
            op, *args = stack.pop()
            stack[-1].append(ops[op](args))
        else:
            stack[-1].append(int(tok))
    return int(stack[0][0])


def test_listops_labels_are_the_value_of_the_expression() -> None:
    listops = _listops()
    examples = listops.generate(200, max_len=64, seed=0)
    assert len(examples) == 200
    for tokens, label in examples:
        assert len(tokens) <= 64 and tokens[0].startswith("[")
        assert _evaluate(tokens) == label


def _favor_reference(q: Tensor, k: Tensor, v: Tensor, opts: dict, lq: int, lk: int) -> Tensor:
    """Causal FAVOR+ in float64 from the definition, unstabilized: ``phi(x) = exp(W x -
    |x|^2 / 2)`` of ``x = sqrt(scale) q`` (or ``k``), weights ``phi(q) . phi(k)``."""
    g = torch.Generator().manual_seed(opts["seed"])
    w = orthogonal_features(opts["num_features"], q.shape[-1], generator=g).double()
    r = math.sqrt(q.shape[-1] ** -0.5)

    def phi(x: Tensor) -> Tensor:
        x = x.double() * r
        return torch.exp(x @ w.T - x.square().sum(-1, keepdim=True) / 2)

    grp = q.shape[1] // k.shape[1]
    a = (phi(q) @ phi(k).repeat_interleave(grp, 1).transpose(-1, -2)).tril(lk - lq)
    den = a.sum(-1, keepdim=True)
    return torch.where(den > 0, a / den.clamp(min=1e-300), 0) @ v.double().repeat_interleave(grp, 1)


@pytest.mark.parametrize(
    ("lq", "lk", "chunk"), [(37, 37, 8), (5, 40, 16), (40, 30, 7), (1, 50, 128)]
)
@pytest.mark.parametrize("big", [False, True], ids=["narrow", "wide"])
def test_causal_performer_equals_favor_in_fp64_on_both_paths(
    lq: int, lk: int, chunk: int, big: bool
) -> None:
    """Keys whose scales spread past 60 (one key of large norm) take the per-key path
    (each key its own scale, a row's running maximum); others one shared scale."""
    torch.manual_seed(0)
    q = torch.randn(2, 4, lq, 8, dtype=torch.float64, requires_grad=True)
    k0 = torch.randn(2, 2, lk, 8, dtype=torch.float64)
    if big:
        k0[:, :, lk // 3] *= 12
    k = k0.requires_grad_()
    v = torch.randn(2, 2, lk, 8, dtype=torch.float64, requires_grad=True)
    opts = {"num_features": 32, "seed": 3, "chunk_size": chunk}
    out = attnlab.attention(q, k, v, mask=M.causal(), engine="performer", engine_options=opts)
    want = _favor_reference(q, k, v, opts, lq, lk)
    assert isinstance(out, Tensor) and max_err(out, want) < 1e-12
    g = torch.randn_like(want)
    got = torch.autograd.grad(out, (q, k, v), g)
    ref = torch.autograd.grad(want, (q, k, v), g)
    assert all(max_err(a, b) < 1e-10 for a, b in zip(got, ref, strict=True))
    weights = attnlab.attention(q, k, v, mask=M.causal(), engine="performer",
                                engine_options=opts, return_weights=True)  # fmt: skip
    assert max_err(weights.out, want) < 1e-12  # type: ignore[union-attr]


def test_causal_performer_rows_do_not_read_later_keys_in_fp32() -> None:
    """The later keys set the single scale of every key, and an earlier key of large norm
    (tiny features) underflowed: row 0, whose only key it is, gave 0 instead of its value
    (float32)."""
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 1, 1, 300, 16).unbind(0)
    k[:, :, 0] *= 8
    opts = {"num_features": 64, "seed": 0, "chunk_size": 32}
    whole = attnlab.attention(q, k, v, mask=M.causal(), engine="performer", engine_options=opts)
    first = attnlab.attention(q[:, :, :200], k[:, :, :200], v[:, :, :200], mask=M.causal(),
                              engine="performer", engine_options=opts)  # fmt: skip
    assert isinstance(whole, Tensor) and isinstance(first, Tensor)
    assert max_err(whole[:, :, :200], first) < 1e-5
    assert max_err(whole[:, :, 0], v[:, :, 0]) < 1e-6  # a row with one key: its value


def _favor_reference_log(q: Tensor, k: Tensor, v: Tensor, opts: dict) -> Tensor:
    """Causal FAVOR+ in float64 in log space: ``log(phi(q) . phi(k))`` as a logsumexp
    over the features, then each row's softmax over its keys; exact where the plain
    features underflow (a key of huge norm has ``phi(k) = exp(-1400)``)."""
    g = torch.Generator().manual_seed(opts["seed"])
    w = orthogonal_features(opts["num_features"], q.shape[-1], generator=g).double()
    r = math.sqrt(q.shape[-1] ** -0.5)

    def log_phi(x: Tensor) -> Tensor:  # (B, H, L, F)
        x = x.double() * r
        return x @ w.T - x.square().sum(-1, keepdim=True) / 2

    la = torch.logsumexp(log_phi(q)[:, :, :, None] + log_phi(k)[:, :, None], -1)  # (B,H,L,L)
    n = q.shape[2]
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    return torch.softmax(la.masked_fill(~causal, -math.inf), -1) @ v.double()


def test_causal_performer_keys_of_huge_norm_keep_every_row() -> None:
    """Keys whose scales spread past about 700: the float64 prefix sum's factors
    underflowed and 16 of 64 rows came out 0 (row 0, whose only key is of huge norm,
    included); the states are now carried chunk by chunk."""
    torch.manual_seed(1)
    q, k, v = (torch.randn(1, 1, 64, 16, dtype=torch.float64) for _ in range(3))
    k[:, :, :8] *= 30  # the first chunk's keys: a spread of the key scales of 2812
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    opts = {"num_features": 64, "seed": 0, "chunk_size": 8}
    out = attnlab.attention(q, k, v, mask=M.causal(), engine="performer", engine_options=opts)
    want = _favor_reference_log(q, k, v, opts)
    assert isinstance(out, Tensor) and max_err(out, want) < 1e-10
    assert max_err(out[0, 0, 0], v[0, 0, 0]) < 1e-12  # row 0 reads one key: its value
    g = torch.randn_like(want)
    got = torch.autograd.grad(out, (q, v), g)
    ref = torch.autograd.grad(want, (q, v), g)
    assert all(max_err(a, b) < 1e-8 for a, b in zip(got, ref, strict=True))


def test_causal_performer_in_float16_runs_in_float32() -> None:
    """float16's exp reaches only e^-9.7 (normal): the one-scale path, sized for float32,
    underflowed row 0's only key and gave 0 instead of its value."""
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 1, 1, 300, 16).unbind(0)
    k[:, :, 0] *= 4
    opts = {"num_features": 64, "seed": 0, "chunk_size": 32}
    runs = {
        dt: attnlab.attention(
            q.to(dt), k.to(dt), v.to(dt), mask=M.causal(), engine="performer", engine_options=opts
        )
        for dt in (torch.float32, torch.float16)
    }
    half = runs[torch.float16]
    assert isinstance(half, Tensor) and half.dtype == torch.float16
    assert max_err(half[0, 0, 0], v[0, 0, 0]) < 2e-3  # its one key's value, to float16
    assert max_err(half, runs[torch.float32]) < 2e-2
