"""The SDPA engine's masked path off the CPU: a mask with exact row bounds answers which
rows see no key or one key from bounds made on the CPU, so a GPU call reads no device
value back (a host-device sync per call on an H200). Run here on the CPU by taking that
path on purpose; each call's output and gradients must equal the CPU path's and follow
the float64 reference engine. ``tests/test_gpu.py`` checks that the GPU call makes no
sync."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import attnlab
from attnlab import bias as B
from attnlab import masks as M
from attnlab.engines import AttentionRequest, get_engine, sdpa
from attnlab.engines._dense_cache import DenseCache

BATCH, HQ, HKV, LK, E = 3, 4, 2, 40, 8

MASKS: dict[str, Callable[[], M.Mask]] = {
    "window(0)": lambda: M.window(0),  # every row sees one key
    "causal&window": lambda: M.causal() & M.window(6),
    "padding": lambda: M.padding([LK, 1, 0]),  # item 2: no key; item 1: one key
    "query_padding": lambda: M.padding([LK, 9, 30], query_lengths=[3, 0, 17]),
    "documents": lambda: M.documents(torch.arange(LK) * 3 // LK),
    "prefix": lambda: M.prefix(5),
    "causal&padding": lambda: M.causal() & M.padding([LK, 12, 0]),
    "dilated": lambda: M.causal() & M.dilated(8, 2),  # gaps: no exact bounds
    "custom": lambda: M.custom(lambda b, h, q, k: (k <= q) & ((k + b) % 3 != 1)),
}


def _inputs(lq: int) -> list[Tensor]:
    """float64 q (B, Hq, Lq, E), k, v (B, Hkv, Lk, E) and an output gradient."""
    g = torch.Generator().manual_seed(0)
    shapes = [(BATCH, HQ, lq, E), (BATCH, HKV, LK, E), (BATCH, HKV, LK, E), (BATCH, HQ, lq, E)]
    return [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]


def _run(ts: list[Tensor], engine: str, dtype: torch.dtype, **kw: object) -> list[Tensor]:
    """The output and the gradients of q, k, v of one call in ``dtype``."""
    q, k, v = (t.to(dtype).requires_grad_() for t in ts[:3])
    out = attnlab.attention(q, k, v, engine=engine, **kw)  # type: ignore[arg-type]
    grads = torch.autograd.grad(out, (q, k, v), ts[3].to(dtype))
    return [out.detach(), *grads]


def _by_bounds(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Make the engine take the off-CPU path (bounds on the CPU) here; the list counts
    the calls that took it. The engine's memo of the last mask starts empty (it would
    give an earlier CPU-path call's dense mask, as the path follows the device there)."""
    taken: list[int] = []
    monkeypatch.setattr(get_engine("sdpa"), "_masks", DenseCache())

    def host_bounds(req: object) -> tuple[Tensor, Tensor] | None:
        got = sdpa._exact_bounds(req)  # type: ignore[arg-type]
        taken.extend([] if got is None else [1])
        return got

    monkeypatch.setattr(sdpa, "_host_bounds", host_bounds)
    return taken


@pytest.mark.parametrize("lq", [LK, 24])
@pytest.mark.parametrize("name", list(MASKS))
def test_the_bounds_path_gives_the_cpu_paths_output_and_gradients(
    name: str, lq: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    ts, mask = _inputs(lq), MASKS[name]()
    ref = _run(ts, "reference", torch.float64, mask=mask)
    on_cpu = _run(ts, "sdpa", torch.float32, mask=mask)
    taken = _by_bounds(monkeypatch)
    by_bounds = _run(ts, "sdpa", torch.float32, mask=mask)
    exact = name not in ("dilated", "custom")
    assert len(taken) == exact, f"{name}: the bounds path was taken {len(taken)} times"
    for what, ours, cpu, r in zip(("out", "dq", "dk", "dv"), by_bounds, on_cpu, ref, strict=True):
        torch.testing.assert_close(ours, cpu, rtol=0, atol=0, msg=f"{name} {what}")
        torch.testing.assert_close(ours.double(), r, rtol=1e-4, atol=1e-5, msg=f"{name} {what}")


def test_a_row_with_no_key_gives_zero_and_zero_gradients_by_bounds(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ts = _inputs(LK)
    taken = _by_bounds(monkeypatch)
    out, dq, dk, dv = _run(ts, "sdpa", torch.float32, mask=M.causal() & M.padding([LK, 12, 0]))
    assert taken == [1]
    assert out[2].abs().max().item() == 0.0 and dq[2].abs().max().item() == 0.0
    assert dk[2].abs().max().item() == 0.0 and dv[2].abs().max().item() == 0.0
    assert torch.isfinite(torch.cat([t.flatten() for t in (out, dq, dk, dv)])).all()


def test_rows_of_one_key_by_bounds_have_exactly_zero_dq_and_dk(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``window(0)``: every row's weight is 1, so dQ and dK are exactly 0."""
    ts = _inputs(LK)
    taken = _by_bounds(monkeypatch)
    out, dq, dk, _ = _run(ts, "sdpa", torch.float32, mask=M.window(0))
    assert taken == [1]
    assert dq.abs().max().item() == 0.0 and dk.abs().max().item() == 0.0
    v = ts[2].float().repeat_interleave(HQ // HKV, dim=1)  # (B, Hq, Lk, E)
    torch.testing.assert_close(out, v, rtol=0, atol=0)


@pytest.mark.parametrize("hide", [False, True])
def test_a_bias_by_bounds_follows_the_reference(
    hide: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ALiBi over a causal mask (row 0 sees one key), and a tensor bias that hides the one
    key of ``window(0)``'s odd rows with ``-inf`` (those rows see no key: output 0)."""
    ts = _inputs(LK)
    if hide:
        t = torch.zeros(HQ, LK, LK)
        t[:, 1::2, 1::2] = -math.inf  # the diagonal of the odd rows
        kw: dict[str, object] = {"mask": M.window(0), "bias": B.tensor(t)}
    else:
        kw = {"mask": M.causal(), "bias": B.alibi(HQ)}
    ref = _run(ts, "reference", torch.float64, **kw)
    on_cpu = _run(ts, "sdpa", torch.float32, **kw)
    taken = _by_bounds(monkeypatch)
    ours = _run(ts, "sdpa", torch.float32, **kw)
    assert taken == [1]
    if hide:
        assert ours[0][:, :, 1::2].abs().max().item() == 0.0
    for what, a, cpu, r in zip(("out", "dq", "dk", "dv"), ours, on_cpu, ref, strict=True):
        torch.testing.assert_close(a, cpu, rtol=0, atol=0, msg=what)
        torch.testing.assert_close(a.double(), r, rtol=1e-4, atol=1e-5, msg=what)


def test_a_key_padding_mask_by_bounds_stays_one_row_for_all() -> None:
    """Every row's interval the same: SDPA gets ``(B, 1, 1, Lk)``, as from the dense form."""
    lo = torch.zeros(2, 5, dtype=torch.long)
    hi = torch.tensor([[3], [1]]).expand(2, 5)
    allowed = sdpa._interval_mask(lo, hi, 6, torch.device("cpu"))
    dense = M.padding([4, 2]).dense(5, 6, batch=2)
    assert allowed.shape == (2, 1, 1, 6)
    assert torch.equal(allowed.expand(2, 1, 5, 6), dense)


def test_alibi_keeps_its_slopes_per_device_out_of_the_state_dict() -> None:
    """The slopes on another device than the module's are made once (on a GPU a copy per
    call was a host-device sync), and ``.to()``, ``to_empty``, deepcopy and the state dict
    are as before."""
    m = B.alibi(8)
    grid_dev = torch.device("meta")  # another device than the module's, with no GPU
    want = m.dense(3, 5, heads=8)  # (1, 8, 3, 5)
    assert m.state_dict() == {}
    wide = B.alibi(12).dense(1, 3, heads=12, dtype=torch.float64)  # (1, 12, 1, 3)
    assert wide[0, 11, 0, 0].item() == -2 * 2**-3.5  # float64 slopes, rounded from float64
    twin = copy.deepcopy(m)
    torch.testing.assert_close(twin.dense(3, 5, heads=8), want, rtol=0, atol=0)
    empty = B.alibi(8).to(grid_dev).to_empty(device="cpu")
    torch.testing.assert_close(empty.dense(3, 5, heads=8), want, rtol=0, atol=0)
    cpu = torch.device("cpu")
    kept = m._slopes_on(cpu, torch.float64, True)  # float64 slopes beside float32 ones
    assert m._slopes_on(cpu, torch.float64, True) is kept  # made once
    assert m.double().dense(3, 5, heads=8).dtype == torch.float64
    assert m._slopes_on(cpu, torch.float64, True) is not kept  # .to() dropped the copy
    assert m.state_dict() == {}


aten = torch.ops.aten
DEVICE_READS = {  # ops whose output's shape or value depends on the data
    aten.nonzero.default,
    aten._unique2.default,
    aten.unique_dim.default,
    aten.masked_select.default,
    aten._local_scalar_dense.default,
    aten.is_nonzero.default,
}


class _NoDeviceReads(TorchDispatchMode):
    """Raises on an op off the CPU whose output's shape or value depends on the data
    (``nonzero``, ``unique``, ``bool()``): on a GPU each is a host-device sync."""

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        found = [t.device for t in tree_leaves((args, kwargs)) if isinstance(t, Tensor)]
        if func in DEVICE_READS and any(d.type != "cpu" for d in found):
            raise AssertionError(f"{func} reads a value on {found}: a sync on a GPU")
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("case", ["window", "causal_alibi", "padding"])
def test_the_bounds_path_reads_no_device_value_for_rows_of_one_key(
    case: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The off-CPU path with gradients, run on the meta device: the rows that see one key
    are found on the CPU. On an H200 ``single`` was on the device and ``_one_key_rows``'s
    ``nonzero`` of it raised under ``torch.cuda.set_sync_debug_mode("error")``."""
    mask, bias = {
        "window": (M.causal() & M.window(6), None),
        "causal_alibi": (M.causal(), B.alibi(HQ)),
        "padding": (M.padding([LK, 1, 0]), None),
    }[case]

    def host_bounds(req: AttentionRequest) -> tuple[Tensor, Tensor]:
        bounds = mask.row_bounds(req.lq, req.lk, req.batch, "cpu")  # (meta is unreadable)
        assert bounds is not None and bounds.exact
        return bounds.lo, bounds.hi

    monkeypatch.setattr(sdpa, "_host_bounds", host_bounds)
    q = torch.empty(BATCH, HQ, LK, E, device="meta", requires_grad=True)
    k, v = (torch.empty(BATCH, HKV, LK, E, device="meta", requires_grad=True) for _ in "kv")
    req = AttentionRequest(q, k, v, mask, bias, 1.0, "dot", "softmax", 0.0, False, False)
    assert req.needs_grad
    with _NoDeviceReads():
        out = sdpa.SdpaEngine().forward(req)[0]
    assert out.shape == q.shape and out.is_meta
