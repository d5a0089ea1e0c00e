"""The reference engine on a device where reading a value stalls the host (a GPU), shown
on the CPU by forcing :func:`attnlab._devices.reads_stall`: its NaN screens and its
finite-row check read nothing there (on an H200 each was a host-device sync: 67 in eight
decoding steps of a tiny Gemma 2), and the branch-free forms it takes there give the
CPU branches' outputs and gradients bit for bit."""

from __future__ import annotations

from typing import Any

import pytest
import torch

import attnlab
from attnlab import _devices
from attnlab import masks as M
from attnlab.engines import AttentionRequest
from attnlab.engines.base import weighted_values
from attnlab.engines.reference import request_scores
from attnlab.normalize import softmax_rows
from tests.test_host_reads import reads

NAN, INF = float("nan"), float("inf")
DTYPES = [torch.float32, torch.bfloat16, torch.float64]
_BITS = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float64: torch.int64}


def _stall(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every tensor taken for one on a device where a read stalls."""
    monkeypatch.setattr(_devices, "reads_stall", lambda t: True, raising=False)


def _bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """The same bits (a NaN's and a zero's sign included)."""
    return a.dtype == b.dtype and torch.equal(a.view(_BITS[a.dtype]), b.view(_BITS[b.dtype]))


def _both(fn: Any, monkeypatch: pytest.MonkeyPatch) -> tuple[Any, Any]:
    """``fn()`` with the CPU's branches, then with reads taken to stall."""
    want = fn()
    with monkeypatch.context() as m:
        _stall(m)
        return want, fn()


def _assert_bits(got: list[torch.Tensor], want: list[torch.Tensor]) -> None:
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        assert _bits_equal(g, w), (i, g, w)


def _values_case(nan: bool, masked: bool, dtype: torch.dtype) -> list[torch.Tensor | None]:
    """w ``(2, 4, 5, 6)``, v ``(2, 2, 6, 3)`` (GQA), allowed ``(2, 1, 5, 6)`` or None."""
    g = torch.Generator().manual_seed(1)
    allowed = torch.rand(2, 1, 5, 6, generator=g) > 0.4 if masked else None
    w = torch.rand(2, 4, 5, 6, generator=g, dtype=torch.float64)
    if allowed is not None:
        w = w * allowed
    v = torch.randn(2, 2, 6, 3, generator=g, dtype=torch.float64)
    if nan:
        v[0, 1, 2, 1] = NAN
        v[1, 0, 5, 0] = NAN
    return [w.to(dtype), v.to(dtype), allowed]


@pytest.mark.parametrize("masked", [False, True], ids=["every key", "allowed"])
@pytest.mark.parametrize("nan", [False, True], ids=["finite v", "NaN in v"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_weighted_values_without_reads_equals_the_branch(
    nan: bool, masked: bool, dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Output, dw and dv, bit for bit; and the float64 computation's within rounding."""
    w0, v0, allowed = _values_case(nan, masked, dtype)

    def run(w: torch.Tensor, v: torch.Tensor) -> list[torch.Tensor]:
        w, v = w.clone().requires_grad_(), v.clone().requires_grad_()
        out = weighted_values(w, v, allowed)
        up = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)
        return [out, *torch.autograd.grad((out * up).nan_to_num(0.0).sum(), [w, v])]

    want, got = _both(lambda: run(w0, v0), monkeypatch)
    _assert_bits(got, want)
    exact = run(w0.double(), v0.double())
    tol = 2e-2 if dtype is torch.bfloat16 else 1e-6
    for g, e in zip(got, exact, strict=True):
        torch.testing.assert_close(g.double(), e, rtol=tol, atol=tol, equal_nan=True)


@pytest.mark.parametrize("masked", [False, True], ids=["every key", "allowed"])
@pytest.mark.parametrize("nan", [False, True], ids=["finite v", "NaN in v"])
def test_weighted_values_reads_nothing_where_reads_stall(
    nan: bool, masked: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """(Its NaN screen read v's sum back: a sync per call on a GPU.)"""
    w, v, allowed = _values_case(nan, masked, torch.float32)
    _stall(monkeypatch)
    with reads(monkeypatch) as rec:
        weighted_values(w, v, allowed)
    assert sum(rec.by_file.values()) == 0, rec.by_file


def _scores_request(nan_key: bool, k: torch.Tensor | None = None) -> AttentionRequest:
    """A masked request ``(1, 4, 3, 8)`` against 5 keys on 2 heads, key 2 NaN or not."""
    g = torch.Generator().manual_seed(2)
    q = torch.randn(1, 4, 3, 8, generator=g)
    if k is None:
        k = torch.randn(1, 2, 5, 8, generator=g)
        if nan_key:
            k[0, 1, 2, 4] = NAN
    mask = torch.ones(3, 5, dtype=torch.bool)
    mask[:2, 2] = False  # the NaN key seen by the last row only
    return AttentionRequest(
        q, k, k, M.tensor(mask), None, 0.5, "dot", "softmax", 0.0,
        return_weights=False, return_lse=False,
    )  # fmt: skip


@pytest.mark.parametrize("nan_key", [False, True], ids=["finite keys", "a NaN key"])
def test_reference_scores_without_reads_equal_the_branch(
    nan_key: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The scores and their dq, dk, bit for bit: a NaN key's column NaN."""

    def run() -> list[torch.Tensor]:
        req = _scores_request(nan_key)
        q, k = req.q.requires_grad_(), req.k.requires_grad_()
        s = request_scores(AttentionRequest(**{**req.__dict__, "q": q, "k": k}))
        up = torch.linspace(-1, 1, s.numel()).view_as(s)
        return [s, *torch.autograd.grad((s * up).nan_to_num(0.0).sum(), [q, k])]

    want, got = _both(run, monkeypatch)
    _assert_bits(got, want)
    assert got[0].isnan().any(-2).sum().item() == (2 if nan_key else 0)  # heads 2, 3


@pytest.mark.parametrize("nan_key", [False, True], ids=["finite keys", "a NaN key"])
def test_reference_scores_read_nothing_where_reads_stall(
    nan_key: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """(The masked call's NaN screen of k read its sum back: a sync per call on a GPU.)"""
    req = _scores_request(nan_key)
    _stall(monkeypatch)
    with reads(monkeypatch) as rec:
        request_scores(req)
    assert sum(rec.by_file.values()) == 0, rec.by_file


def _rows(seed: int, dtype: torch.dtype) -> torch.Tensor:
    """Scores ``(3, 5, 17)`` of std 1, 30 or 200, some with -inf entries, fully masked
    rows, +inf or NaN."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 5, 17, generator=g) * [1, 30, 200][seed % 3]
    if seed % 4 == 1:
        x[torch.rand(3, 5, 17, generator=g) < 0.3] = -INF
    if seed % 4 == 2:
        x[0, 1] = -INF
    if seed % 8 == 3:
        x[1, 2, 3] = INF
    if seed % 8 == 7:
        x[2, 2, 3] = NAN
    return x.to(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_softmax_rows_without_reads_equals_the_branch(
    dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Weights, logsumexp and the scores' gradient, bit for bit (both forms' gradients
    summed with ``+0.0`` where not taken turned ``-0.0`` into ``+0.0``)."""
    for seed in range(24):
        x0 = _rows(seed, dtype)
        up = torch.randn(3, 5, 17, generator=torch.Generator().manual_seed(seed)).to(dtype)

        def run(x0: torch.Tensor = x0, up: torch.Tensor = up) -> list[torch.Tensor]:
            x = x0.clone().requires_grad_()
            p, lse = softmax_rows(x, want_lse=True)
            assert lse is not None
            loss = (p * up).sum() + (lse.nan_to_num(0.0, 0.0, 0.0) * up[..., 0]).sum()
            return [p, lse, *torch.autograd.grad(loss, x)]

        want, got = _both(run, monkeypatch)
        _assert_bits(got, want)
        with torch.no_grad():
            want, got = _both(lambda x0=x0: list(softmax_rows(x0, want_lse=True)), monkeypatch)
        _assert_bits(got, want)


def test_softmax_rows_reads_nothing_where_reads_stall(monkeypatch: pytest.MonkeyPatch) -> None:
    """(Its finite-row check read a flag back: a sync per call on a GPU.)"""
    _stall(monkeypatch)
    with reads(monkeypatch) as rec:
        for seed in range(4):
            softmax_rows(_rows(seed, torch.float32), want_lse=seed % 2 == 0)
    assert sum(rec.by_file.values()) == 0, rec.by_file


def _inputs(case: str, dtype: torch.dtype) -> dict[str, Any]:
    """q ``(2, 4, 6, 8)``, k, v ``(2, 2, 10, 8)`` (GQA) and a mask, bias or softcap."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 6, 8, generator=g, dtype=torch.float64)
    k, v = torch.randn(2, 2, 2, 10, 8, generator=g, dtype=torch.float64).unbind(0)
    mask = torch.rand(2, 1, 6, 10, generator=g) > 0.3
    mask[..., 0] = True
    kw: dict[str, Any] = {"mask": mask}
    bias = torch.zeros(1, 4, 6, 10, dtype=torch.float64)
    if case == "nan q":
        q[0, 1, 2, 3] = NAN
    elif case == "nan k":
        k[1, 0, 4, 5] = NAN
        mask[1, :, :, 4] = False
        mask[1, :, 5, 4] = True  # seen by one row
    elif case == "nan v":
        v[0, 1, 3, 2] = NAN
        mask[0, :, :2, 3] = False
    elif case == "fully masked rows":
        mask[0, :, 2] = False
    elif case == "-inf scores":
        bias[0, :, 1, :] = -INF  # a whole row
        bias[0, :, 3, 2:] = -INF
        kw["bias"] = bias
    elif case == "+inf scores":
        bias[0, 2, 4, 0] = INF
        kw["bias"] = bias
    elif case == "softcap":
        kw.update(softcap=2.5, scale=3.0)
    elif case == "no mask":
        kw.pop("mask")
    if "bias" in kw:
        kw["bias"] = kw["bias"].to(dtype)
    return {"q": q.to(dtype), "k": k.to(dtype), "v": v.to(dtype), **kw}


CASES = ["plain", "no mask", "nan q", "nan k", "nan v", "fully masked rows", "-inf scores"]
CASES += ["+inf scores", "softcap"]


def _attend(inputs: dict[str, Any], grad: bool) -> list[torch.Tensor]:
    """The reference engine's out, weights, lse and, with ``grad``, dq, dk, dv."""
    leaves = {n: t.clone().requires_grad_(grad) if n in "qkv" else t for n, t in inputs.items()}
    res = attnlab.attention(**leaves, engine="reference", return_weights=True, return_lse=True)
    got = [res.out, res.weights, res.lse]
    if grad:
        up = torch.linspace(-1, 1, res.out.shape[-1], dtype=res.out.dtype)
        loss = (res.out * up).sum() + (res.lse.nan_to_num(0.0, 0.0, 0.0) * 0.5).sum()
        got += list(torch.autograd.grad(loss, [leaves["q"], leaves["k"], leaves["v"]]))
    return got


@pytest.mark.parametrize("grad", [False, True], ids=["no grad", "grad"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES)
def test_reference_engine_without_reads_equals_the_branches(
    case: str, dtype: torch.dtype, grad: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Out, weights, lse, dq, dk and dv bit for bit; the float64 computation's within
    rounding (NaN where it is NaN)."""
    inputs = _inputs(case, dtype)
    want, got = _both(lambda: _attend(inputs, grad), monkeypatch)
    _assert_bits(got, want)
    exact = _attend(_inputs(case, torch.float64), grad)
    tol = {torch.float32: 1e-5, torch.bfloat16: 3e-2, torch.float64: 1e-12}[dtype]
    for g, e in zip(got, exact, strict=True):
        torch.testing.assert_close(g.double(), e, rtol=tol, atol=tol, equal_nan=True)


@pytest.mark.parametrize("case", ["plain", "nan k", "nan v", "fully masked rows", "softcap"])
@pytest.mark.parametrize("lq", [1, 6], ids=["decode", "prefill"])
def test_reference_forward_reads_nothing_where_reads_stall(
    case: str, lq: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """(A masked call read 3-4 values back: the NaN screens of k and v and the
    finite-row check, a sync each on a GPU; 67 in eight steps of a tiny Gemma 2.)"""
    inputs = _inputs(case, torch.float32)
    inputs["q"] = inputs["q"][:, :, -lq:]
    inputs["mask"] = inputs["mask"][:, :, -lq:]
    _stall(monkeypatch)
    with torch.no_grad(), reads(monkeypatch) as rec:
        attnlab.attention(**inputs, engine="reference", return_weights=True, return_lse=True)
    assert sum(rec.by_file.values()) == 0, rec.by_file


def _on_device(
    ts: list[torch.Tensor], kw: dict[str, Any], grad: bool, dev: str, dtype: torch.dtype
) -> list[torch.Tensor]:
    """The reference engine's out, weights, lse and, with ``grad``, dq, dk, dv on ``dev``."""
    leaves = [t.to(dev, dtype).requires_grad_(grad) for t in ts]
    res = attnlab.attention(*leaves, engine="reference", return_lse=True, **kw)
    got = [res.out, res.weights, res.lse]
    if grad:
        got += list(torch.autograd.grad(res.out.nan_to_num(0.0).sum(), leaves))
    return got


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_reference_calls_make_no_host_sync_on_cuda(dtype: torch.dtype, dev: str = "cuda") -> None:
    """On CUDA itself: masked, soft-capped, decoding calls with weights (a transformers
    model's under ``output_attentions`` or Gemma 2's soft-capping), NaN in v or not, make
    no host-device sync forward or backward, and equal the branches (which sync) bit for
    bit."""
    if dev == "cuda" and not torch.cuda.is_available():
        pytest.skip("torch.cuda.set_sync_debug_mode is CUDA's")
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 4, 64, 16, generator=g) for _ in "qkv")
    v[0, 1, 7, 3] = NAN
    mask = torch.rand(2, 1, 64, 64, generator=g) > 0.2
    mask[1, :, 5] = False  # a fully masked row
    for lq, grad, nan in [(64, False, False), (1, False, False), (64, True, True), (1, True, True)]:
        # on the device before the check: a copy from the host's pageable memory syncs
        ts = [t.to(dev) for t in (q[:, :, -lq:], k, v if nan else v.nan_to_num(0.0))]
        kw = {"mask": mask[:, :, -lq:].to(dev), "softcap": 20.0, "return_weights": True}
        _on_device(ts, kw, grad, dev, dtype)  # warm-up
        if dev == "cuda":
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
        try:
            got = _on_device(ts, kw, grad, dev, dtype)
        finally:
            if dev == "cuda":
                torch.cuda.set_sync_debug_mode("default")
        with pytest.MonkeyPatch.context() as m:
            m.setattr(_devices, "reads_stall", lambda t: dev == "cpu")
            _assert_bits(got, _on_device(ts, kw, grad, dev, dtype))
