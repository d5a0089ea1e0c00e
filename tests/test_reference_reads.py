"""The reference engine on a device where reading a value stalls the host (a GPU), shown
on the CPU by forcing :func:`attnlab._devices.reads_stall`: its NaN screens and its
finite-row check read nothing there (on an H200 each was a host-device sync: 67 in eight
decoding steps of a tiny Gemma 2), and the branch-free forms it takes there give the
CPU branches' outputs and gradients bit for bit."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from attnlab import _devices
from attnlab import masks as M
from attnlab.engines import AttentionRequest
from attnlab.engines.base import weighted_values
from attnlab.engines.reference import request_scores
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
