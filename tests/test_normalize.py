"""Tests for attnlab.normalize: softmax, sparsemax, entmax15 and the normalizer registry.

References are independent of the code under test: the ``entmax`` package, ``torch.softmax``
/ ``torch.logsumexp``, and numpy bisections for the simplex projections.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable

import numpy as np
import pytest
import torch
from entmax import entmax15 as ref_entmax15
from entmax import sparsemax as ref_sparsemax
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor

from attnlab.normalize import (
    NORMALIZERS,
    entmax15,
    get_normalizer,
    softmax,
    softmax_with_lse,
    sparsemax,
)

Fn = Callable[[Tensor], Tensor]
NEG_INF = -math.inf

ALL: dict[str, Fn] = {"softmax": softmax, "sparsemax": sparsemax, "entmax15": entmax15}
SPARSE: dict[str, Fn] = {"sparsemax": sparsemax, "entmax15": entmax15}


def _ref_sparsemax(x: Tensor) -> Tensor:
    return ref_sparsemax(x, dim=-1)


def _ref_entmax15(x: Tensor) -> Tensor:
    return ref_entmax15(x, dim=-1)


def _ref_softmax(x: Tensor) -> Tensor:
    return torch.softmax(x, dim=-1)


REF: dict[str, Fn] = {
    "softmax": _ref_softmax,
    "sparsemax": _ref_sparsemax,
    "entmax15": _ref_entmax15,
}


def _randn(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float64) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen, dtype=dtype)


def _value_and_grad(fn: Fn, x: Tensor, g: Tensor) -> tuple[Tensor, Tensor]:
    """fn(x) and the gradient of sum(fn(x) * g) w.r.t. x."""
    leaf = x.detach().clone().requires_grad_(True)
    out = fn(leaf)
    (grad,) = torch.autograd.grad((out * g).sum(), leaf)
    return out.detach(), grad


def _tol(dtype: torch.dtype) -> dict[str, float]:
    return {"atol": 1e-10, "rtol": 1e-8} if dtype == torch.float64 else {"atol": 2e-5, "rtol": 1e-4}


def _masked_input(seed: int = 1) -> tuple[Tensor, Tensor]:
    """(6, 10) fp64 scores with -inf at random places, each row keeping 1..10 entries."""
    x = _randn(6, 10, seed=seed) * 2
    gen = torch.Generator().manual_seed(seed + 100)
    keep = torch.rand(6, 10, generator=gen) < 0.6
    keep[:, 0] = True  # at least one unmasked per row
    keep[5] = False
    keep[5, 3] = True  # a row with a single unmasked entry
    return x.masked_fill(~keep, NEG_INF), keep


# --------------------------------------------------------------------------- vs references


@pytest.mark.parametrize("name", ["sparsemax", "entmax15"])
@pytest.mark.parametrize("shape", [(7,), (4, 1), (3, 11), (2, 3, 4, 9)])
@pytest.mark.parametrize("scale", [0.1, 1.0, 10.0])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_matches_entmax_package(
    name: str, shape: tuple[int, ...], scale: float, dtype: torch.dtype
) -> None:
    x = (_randn(*shape, seed=len(shape) + int(scale * 10)) * scale).to(dtype)
    g = _randn(*shape, seed=99).to(dtype)
    out, grad = _value_and_grad(SPARSE[name], x, g)
    ref_out, ref_grad = _value_and_grad(REF[name], x, g)
    assert out.dtype == dtype and grad.dtype == dtype
    torch.testing.assert_close(out, ref_out, **_tol(dtype))
    torch.testing.assert_close(grad, ref_grad, **_tol(dtype))


@pytest.mark.parametrize("name", ["sparsemax", "entmax15"])
def test_large_offset_is_shift_invariant(name: str) -> None:
    x = _randn(5, 8, seed=3) * 2
    out, _ = _value_and_grad(SPARSE[name], x + 1e4, torch.ones_like(x))
    torch.testing.assert_close(out, REF[name](x), atol=1e-9, rtol=0)


@pytest.mark.parametrize("shape", [(5,), (3, 11), (2, 3, 4, 9)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_softmax_matches_torch(shape: tuple[int, ...], dtype: torch.dtype) -> None:
    x = (_randn(*shape, seed=5) * 4).to(dtype)
    g = _randn(*shape, seed=6).to(dtype)
    out, grad = _value_and_grad(softmax, x, g)
    ref_out, ref_grad = _value_and_grad(_ref_softmax, x, g)
    torch.testing.assert_close(out, ref_out, **_tol(dtype))
    torch.testing.assert_close(grad, ref_grad, **_tol(dtype))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_softmax_with_lse_matches_torch(dtype: torch.dtype) -> None:
    x = (_randn(2, 3, 4, 6, seed=7) * 5 + 50).to(dtype)
    p, lse = softmax_with_lse(x)
    assert lse.shape == (2, 3, 4) and lse.dtype == dtype
    torch.testing.assert_close(p, torch.softmax(x, dim=-1), **_tol(dtype))
    torch.testing.assert_close(lse, torch.logsumexp(x, dim=-1), **_tol(dtype))
    g = _randn(2, 3, 4, seed=8).to(dtype)
    _, grad = _value_and_grad(lambda t: softmax_with_lse(t)[1], x, g)
    _, ref_grad = _value_and_grad(lambda t: torch.logsumexp(t, dim=-1), x, g)
    torch.testing.assert_close(grad, ref_grad, **_tol(dtype))


# --------------------------------------------------------------------------- masks


@pytest.mark.parametrize("name", ["softmax", "sparsemax", "entmax15"])
def test_masked_entries_match_reference_on_unmasked_subvector(name: str) -> None:
    x, keep = _masked_input()
    g = _randn(6, 10, seed=11)
    out, grad = _value_and_grad(ALL[name], x, g)
    assert torch.all(out[~keep] == 0)
    assert torch.all(grad[~keep] == 0)
    for row in range(x.shape[0]):
        sub = x[row, keep[row]]  # (n_keep,)
        ref_out, ref_grad = _value_and_grad(REF[name], sub, g[row, keep[row]])
        torch.testing.assert_close(out[row, keep[row]], ref_out, atol=1e-10, rtol=1e-8)
        torch.testing.assert_close(grad[row, keep[row]], ref_grad, atol=1e-10, rtol=1e-8)
    assert out[5, 3] == 1.0


@pytest.mark.parametrize("name", ["softmax", "sparsemax", "entmax15"])
def test_fully_masked_rows_give_zeros_and_zero_grads(name: str) -> None:
    x = _randn(2, 3, 4, 5, seed=12)
    x[0, 1, 2] = NEG_INF
    x[1, :, 0] = NEG_INF
    x[1, 2, 3, :2] = NEG_INF  # a partly masked row too
    g = _randn(2, 3, 4, 5, seed=13)
    out, grad = _value_and_grad(ALL[name], x, g)
    full = torch.isneginf(x).all(dim=-1)  # (2, 3, 4)
    assert not torch.isnan(out).any() and not torch.isnan(grad).any()
    assert torch.all(out[full] == 0) and torch.all(grad[full] == 0)
    torch.testing.assert_close(out[~full].sum(-1), torch.ones(int((~full).sum()), dtype=x.dtype))
    assert torch.all(out[1, 2, 3, :2] == 0) and torch.all(grad[1, 2, 3, :2] == 0)


def test_softmax_with_lse_fully_masked_rows() -> None:
    x = _randn(3, 4, seed=14)
    x[1] = NEG_INF
    x[2, :2] = NEG_INF
    p, lse = softmax_with_lse(x)
    assert torch.all(p[1] == 0) and lse[1].item() == NEG_INF
    torch.testing.assert_close(lse[[0, 2]], torch.logsumexp(x[[0, 2]], dim=-1))

    g = _randn(3, 4, seed=15)
    _, grad_out_only = _value_and_grad(lambda t: softmax_with_lse(t)[0], x, g)
    assert torch.isfinite(grad_out_only).all() and torch.all(grad_out_only[1] == 0)

    def lse_live_rows(t: Tensor) -> Tensor:
        out, lse = softmax_with_lse(t)
        return lse[[0, 2]].sum() + 0 * out.sum()

    leaf = x.clone().requires_grad_(True)
    lse_live_rows(leaf).backward()
    assert leaf.grad is not None
    assert torch.isfinite(leaf.grad).all() and torch.all(leaf.grad[1] == 0)
    torch.testing.assert_close(leaf.grad[[0, 2]], torch.softmax(x[[0, 2]], dim=-1))


def test_softmax_with_lse_backprop_through_all_rows_is_finite() -> None:
    x = _randn(3, 4, seed=16)
    x[0] = NEG_INF
    leaf = x.clone().requires_grad_(True)
    _, lse = softmax_with_lse(leaf)
    (lse * _randn(3, seed=17)).sum().backward()
    assert leaf.grad is not None and torch.isfinite(leaf.grad).all()
    assert torch.all(leaf.grad[0] == 0)


# --------------------------------------------------------------------------- gradcheck


@pytest.mark.parametrize("name", ["softmax", "sparsemax", "entmax15"])
@pytest.mark.parametrize("masked", [False, True])
def test_gradcheck(name: str, masked: bool) -> None:
    x = _randn(3, 6, seed=21) * 3
    if masked:
        x[0, 1] = NEG_INF
        x[1, [0, 4]] = NEG_INF
        x[2] = NEG_INF
    assert torch.autograd.gradcheck(ALL[name], (x.requires_grad_(True),))


# --------------------------------------------------------------------------- NaN, sums, zeros


@pytest.mark.parametrize("name", ["softmax", "sparsemax", "entmax15"])
def test_nan_row_gives_nan_row(name: str) -> None:
    x = _randn(4, 6, seed=31)
    x[1, 2] = math.nan
    x[2, 0] = NEG_INF
    x[3, :5] = NEG_INF
    x[3, 5] = math.nan  # NaN next to a masked remainder
    out = ALL[name](x)
    assert torch.isnan(out[1]).all() and torch.isnan(out[3]).all()
    torch.testing.assert_close(out[[0, 2]], ALL[name](x[[0, 2]]))
    assert not torch.isnan(out[[0, 2]]).any()


def test_softmax_with_lse_nan_row() -> None:
    x = _randn(2, 5, seed=32)
    x[0, 4] = math.nan
    p, lse = softmax_with_lse(x)
    assert torch.isnan(p[0]).all() and torch.isnan(lse[0])
    assert torch.isfinite(p[1]).all() and torch.isfinite(lse[1])


@pytest.mark.parametrize("name", ["softmax", "sparsemax", "entmax15"])
def test_rows_sum_to_one_where_any_unmasked(name: str) -> None:
    x, _ = _masked_input(seed=41)
    x = torch.cat([x, torch.full((1, 10), NEG_INF, dtype=x.dtype)])  # one fully masked row
    out = ALL[name](x)
    assert (out >= 0).all()
    expected = torch.tensor([1.0] * 6 + [0.0], dtype=x.dtype)
    torch.testing.assert_close(out.sum(-1), expected, atol=1e-12, rtol=0)


@pytest.mark.parametrize("name", ["sparsemax", "entmax15"])
def test_sparse_normalizers_give_exact_zeros(name: str) -> None:
    x = torch.tensor([[2.0, 1.9, -100.0, -1e4], [0.0, -3.0, -50.0, 1.0]])
    out = SPARSE[name](x)
    assert torch.all(out[0, 2:] == 0) and torch.all(out[1, 2] == 0)
    assert torch.all(out[0, :2] > 0)


@pytest.mark.parametrize("name", ["softmax", "sparsemax", "entmax15"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_low_precision_dtypes(name: str, dtype: torch.dtype) -> None:
    x, _ = _masked_input(seed=51)
    x = torch.cat([x, torch.full((1, 10), NEG_INF, dtype=x.dtype)]).to(dtype)
    ref = ALL[name](x.double()).to(dtype)  # exact result, rounded once
    leaf = x.clone().requires_grad_(True)
    out = ALL[name](leaf)
    out.sum().backward()
    assert out.dtype == dtype and leaf.grad is not None and leaf.grad.dtype == dtype
    assert torch.isfinite(leaf.grad.float()).all()
    torch.testing.assert_close(out, ref)  # dtype-default tolerances (about 1 ulp)


# --------------------------------------------------------------------------- properties


def _bisect(excess: Callable[[float], float], lo: float, hi: float) -> float:
    """Root of a decreasing function on [lo, hi] by bisection."""
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if excess(mid) > 0:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def _np_sparsemax(z: np.ndarray) -> np.ndarray:
    """Euclidean projection onto the simplex: max(z - tau, 0) with sum 1."""
    tau = _bisect(lambda t: float(np.maximum(z - t, 0).sum()) - 1, z.max() - 1, z.max())
    return np.maximum(z - tau, 0)


def _np_entmax15(z: np.ndarray) -> np.ndarray:
    """1.5-entmax: max(z / 2 - tau, 0) ** 2 with sum 1."""
    y = z / 2
    tau = _bisect(lambda t: float((np.maximum(y - t, 0) ** 2).sum()) - 1, y.max() - 1, y.max())
    return np.maximum(y - tau, 0) ** 2


NP_REF: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "sparsemax": _np_sparsemax,
    "entmax15": _np_entmax15,
}

finite_rows = st.lists(
    st.floats(-100, 100, allow_nan=False, allow_infinity=False, width=64), min_size=1, max_size=8
)


@settings(max_examples=60, deadline=None)
@given(values=finite_rows)
def test_property_simplex_and_projection(values: list[float]) -> None:
    x = torch.tensor(values, dtype=torch.float64)
    for name, fn in ALL.items():
        out = fn(x)
        assert (out >= 0).all(), name
        assert abs(out.sum().item() - 1.0) < 1e-9, name
    z = np.asarray(values, dtype=np.float64)
    for name, ref in NP_REF.items():
        np.testing.assert_allclose(SPARSE[name](x).numpy(), ref(z), atol=1e-9, err_msg=name)


masked_rows = st.lists(
    st.one_of(st.floats(-20, 20, allow_nan=False, allow_infinity=False), st.just(NEG_INF)),
    min_size=1,
    max_size=8,
).filter(lambda v: any(math.isfinite(e) for e in v))


@settings(max_examples=40, deadline=None)
@given(values=masked_rows)
def test_property_masked_projection(values: list[float]) -> None:
    x = torch.tensor(values, dtype=torch.float64)
    z = np.asarray(values, dtype=np.float64)
    live = np.isfinite(z)
    for name, ref in NP_REF.items():
        expected = np.zeros_like(z)
        expected[live] = ref(z[live])
        np.testing.assert_allclose(SPARSE[name](x).numpy(), expected, atol=1e-9, err_msg=name)


# --------------------------------------------------------------------------- registry


def test_registry_contents() -> None:
    assert list(NORMALIZERS) == ["softmax", "sparsemax", "entmax15"]
    assert NORMALIZERS == ALL


@pytest.mark.parametrize("name", ["softmax", "sparsemax", "entmax15"])
def test_get_normalizer_valid_name(name: str) -> None:
    fn = get_normalizer(name)
    assert fn is ALL[name]
    out = fn(torch.tensor([[1.0, 2.0, NEG_INF]]))
    torch.testing.assert_close(out.sum(-1), torch.ones(1))
    assert out[0, 2] == 0


VALID = "expected one of 'softmax', 'sparsemax', 'entmax15'"


def test_get_normalizer_unknown_name_message() -> None:
    msg = f"normalize='foo' is not a known normalizer; {VALID}"
    with pytest.raises(ValueError, match=f"^{re.escape(msg)}$"):
        get_normalizer("foo")


@pytest.mark.parametrize("bad", ["Softmax", "", "entmax"])
def test_get_normalizer_unknown_names(bad: str) -> None:
    with pytest.raises(ValueError, match=re.escape(f"normalize={bad!r} is not a known")):
        get_normalizer(bad)


@pytest.mark.parametrize("bad", [None, 3, b"softmax", softmax])
def test_get_normalizer_non_str(bad: object) -> None:
    with pytest.raises(TypeError, match=re.escape(f"normalize={bad!r}")) as info:
        get_normalizer(bad)
    assert VALID in str(info.value)


# --------------------------------------------------------------------------- shapes, input checks


@pytest.mark.parametrize("name", ["softmax", "sparsemax", "entmax15"])
@pytest.mark.parametrize("shape", [(0,), (2, 3, 0), (0, 4)])
def test_empty_shapes(name: str, shape: tuple[int, ...]) -> None:
    x = torch.zeros(shape)
    out = ALL[name](x)
    assert out.shape == shape and out.dtype == x.dtype and out.numel() == 0


@pytest.mark.parametrize("shape", [(0,), (2, 3, 0)])
def test_softmax_with_lse_empty_last_dim(shape: tuple[int, ...]) -> None:
    p, lse = softmax_with_lse(torch.zeros(shape))
    assert p.shape == shape and lse.shape == shape[:-1]
    assert torch.all(torch.isneginf(lse))
    torch.testing.assert_close(lse, torch.logsumexp(torch.zeros(shape), dim=-1))


@pytest.mark.parametrize("name", ["softmax", "sparsemax", "entmax15"])
def test_input_checks(name: str) -> None:
    with pytest.raises(ValueError, match="at least one dimension"):
        ALL[name](torch.tensor(1.0))
    with pytest.raises(TypeError, match="floating-point"):
        ALL[name](torch.tensor([1, 2]))


@pytest.mark.parametrize("fn", [softmax, sparsemax, entmax15])
def test_normalizers_name_scores_that_are_not_float_tensors(fn: Callable[[Tensor], Tensor]) -> None:
    with pytest.raises(TypeError, match=r"scores must be a torch\.Tensor, got list"):
        fn([1.0, 2.0])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="scores must be a floating-point tensor"):
        fn(torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="scores must have at least one dimension"):
        fn(torch.tensor(1.0))


@pytest.mark.parametrize("name", list(SPARSE))
def test_forward_mode_equals_finite_differences(name: str) -> None:
    """``torch.func.jvp`` and ``forward_ad`` dual tensors: they raised torch's "You must
    implement the jvp function for custom autograd.Function"; a masked entry stays fixed."""
    fn = SPARSE[name]
    g = torch.Generator().manual_seed(0)
    x, t = (torch.randn(4, 7, dtype=torch.float64, generator=g) for _ in range(2))
    x[0, 2] = NEG_INF
    eps = 1e-6
    want = (fn(x + eps * t) - fn(x - eps * t)) / (2 * eps)
    assert want.abs().max() > 0.1  # the control: the tangent is not trivially 0
    assert (torch.func.jvp(fn, (x,), (t,))[1] - want).abs().max() < 1e-8
    with torch.autograd.forward_ad.dual_level():
        dual = fn(torch.autograd.forward_ad.make_dual(x, t))
        got = torch.autograd.forward_ad.unpack_dual(dual).tangent
    assert (got - want).abs().max() < 1e-8
