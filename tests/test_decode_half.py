"""The compiled decoding kernel in half precision: bfloat16 and float16 keys and values read
in place a chunk at a time, summed in float32 (``engines.blocked_decode``). Checked
against fp64 (the reference engine on float64 copies) under flash-attn's 2x rule against
plain PyTorch in the same dtype (torch's SDPA; a definition-written softmax where SDPA
has no soft-cap or sinks), and where ``auto`` sends a half-precision decoding step."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

import attnlab
from attnlab import functional
from attnlab import masks as M
from attnlab._cpu import cpu_info
from attnlab.engines import base
from attnlab.engines import blocked as blocked_engine
from tests.conftest import assert_2x_rule, naive_attention

HALF = [torch.bfloat16, torch.float16]


def _qkv(
    hq: int, hk: int, lq: int, lk: int, e: int = 64, seed: int = 0
) -> tuple[Tensor, Tensor, Tensor]:
    """q (2, hq, lq, e), k and v (2, hk, lk, e) in float64."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, hq, lq, e, generator=g, dtype=torch.float64)
    k, v = (torch.randn(2, hk, lk, e, generator=g, dtype=torch.float64) for _ in "kv")
    return q, k, v


def _sdpa(q: Tensor, k: Tensor, v: Tensor, allowed: Tensor | None) -> Tensor:
    """Plain PyTorch: torch's SDPA in q's dtype, key/value heads repeated."""
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)


def _check(
    q: Tensor, k: Tensor, v: Tensor, dtype: torch.dtype, decodes: list[int], what: str,
    mask: M.Mask | None = None, softcap: float | None = None, sinks: Tensor | None = None,
) -> Tensor:  # fmt: skip
    """The blocked engine's output on ``q, k, v`` (float64) cast to ``dtype``, from the
    decoding kernel, within 2x plain PyTorch's error in ``dtype`` against fp64."""
    qh, kh, vh = (t.to(dtype) for t in (q, k, v))
    decodes.clear()
    with torch.no_grad():
        out = attnlab.attention(qh, kh, vh, mask=mask, softcap=softcap, sinks=sinks,
                                engine="blocked")  # fmt: skip
        ref64 = attnlab.attention(*(t.to(dtype).double() for t in (q, k, v)), mask=mask,
                                  softcap=softcap, sinks=sinks, engine="reference")  # fmt: skip
    assert isinstance(out, Tensor) and isinstance(ref64, Tensor)
    assert len(decodes) == 1 and out.dtype == dtype, what
    allowed = (
        None if mask is None else mask.dense(q.shape[2], k.shape[2], batch=2, heads=q.shape[1])
    )
    if softcap is None and sinks is None:
        plain = _sdpa(qh, kh, vh, allowed)
    else:
        plain, _ = naive_attention(qh, kh, vh, allowed=allowed, softcap=softcap, sinks=sinks)
    assert_2x_rule(out, plain, ref64, what)
    return out


CASES = {
    "none": {},
    "window": {"mask": M.causal() & M.window(100)},
    "padding": {"mask": M.padding([1025, 400])},
    "softcap": {"softcap": 5.0},
    "sinks": {"sinks": torch.linspace(-1.0, 2.0, 8)},
}


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("heads", [(8, 2, 1), (8, 1, 1), (8, 8, 2)], ids=str)
def test_half_precision_decoding_meets_the_2x_rule(
    dtype: torch.dtype, case: str, heads: tuple[int, int, int], decodes: list[int]
) -> None:
    """GQA, MQA and one query head per key/value head (two rows), each with no mask, a
    causal window, padding, soft-capping and sinks."""
    hq, hk, lq = heads
    q, k, v = _qkv(hq, hk, lq, 1025, seed=hk + lq)
    _check(q * 2, k, v, dtype, decodes, f"{case} {heads} {dtype}", **CASES[case])


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("e", [40, 59, 64, 111, 128])
@pytest.mark.parametrize("lk", [16, 17, 97, 1025, 4099])
def test_awkward_sizes(dtype: torch.dtype, e: int, lk: int, decodes: list[int]) -> None:
    """Head sizes that are not whole vectors, key counts that are not whole chunks or parts."""
    q, k, v = _qkv(8, 2, 1, lk, e=e, seed=e + lk)
    _check(q, k, v, dtype, decodes, f"E={e} Lk={lk} {dtype}", mask=M.padding([lk, lk // 2 + 1]))


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_a_view_of_a_larger_cache_is_read_in_place(dtype: torch.dtype, decodes: list[int]) -> None:
    """k and v as views of a (B, L, H, E) cache longer than the keys: the last dimension
    contiguous, the key stride H * E. The same result as from contiguous copies."""
    q, k, v = _qkv(8, 2, 1, 3000, seed=3)
    cache = torch.zeros(2, 2, 4000, 2, 64, dtype=dtype)  # (k or v, B, L, H, E)
    cache[0, :, :3000] = k.transpose(1, 2).to(dtype)
    cache[1, :, :3000] = v.transpose(1, 2).to(dtype)
    kv = cache[:, :, :3000].transpose(2, 3)  # (2, B, H, L, E)
    assert kv[0].stride(-1) == 1 and kv[0].stride(2) == 128 and not kv[0].is_contiguous()
    with torch.no_grad():
        out = attnlab.attention(q.to(dtype), kv[0], kv[1], engine="blocked")
    dense = _check(q, k, v, dtype, decodes, f"view {dtype}")
    assert isinstance(out, Tensor) and torch.equal(out, dense)


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_empty_rows_give_zero_and_masked_nan_stays_out(
    dtype: torch.dtype, decodes: list[int]
) -> None:
    """A row with no key gives 0, never NaN; a NaN value outside a row's window stays out of
    it (a NaN in a value the row sees reaches it, as in fp64): the rows a NaN reached
    through the 0 weight of a key they do not see are computed again from half precision."""
    q, k, v = _qkv(8, 2, 1, 1000, seed=5)
    qh, kh, vh = (t.to(dtype) for t in (q, k, v))
    vh[0, 0, 10] = float("nan")  # outside the window of the last 100 keys
    vh[1, 1, 950] = float("nan")  # inside, key/value head 1 of batch 1
    mask = M.window(99) & M.padding([1000, 1000])
    empty = M.window(99) & M.padding([1000, 0])  # batch 1: no key at all
    with torch.no_grad():
        out = attnlab.attention(qh, kh, vh, mask=mask, engine="blocked")
        none = attnlab.attention(qh, kh, vh, mask=empty, engine="blocked")
        ref64 = attnlab.attention(qh.double(), kh.double(), vh.double(), mask=mask,
                                  engine="reference")  # fmt: skip
    assert isinstance(out, Tensor) and isinstance(none, Tensor) and isinstance(ref64, Tensor)
    assert len(decodes) == 2
    assert torch.equal(none[1], torch.zeros_like(none[1])) and not none[0].isnan().any()
    assert torch.equal(out.isnan(), ref64.isnan()) and out[1, 4:].isnan().all()
    assert not out[0].isnan().any() and not out[1, :4].isnan().any()
    fin = ~ref64.isnan()
    tol = 2 * torch.finfo(dtype).eps
    torch.testing.assert_close(out[fin].double(), ref64[fin], atol=tol, rtol=0)


def _request(q: Tensor, k: Tensor, mask: M.Mask | None) -> base.AttentionRequest:
    return functional._request(q, k, k, mask, None, None, "dot", "softmax", 0.0, False, False)


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_auto_gives_half_precision_decoding_steps_to_the_kernel(
    dtype: torch.dtype, decodes: list[int]
) -> None:
    """A bfloat16 or float16 decoding step goes to the kernel (SDPA read the cache once per
    query head and its float16 is slow on the CPU), a plain one without a request too;
    eight rows of one query head per key/value head over every key stay on SDPA in
    bfloat16 (a tie), and on AMX from one row (blocked_decode.kernel_wins)."""
    q, k, v = (t.to(dtype) for t in _qkv(8, 2, 1, 4096))
    with torch.no_grad():
        assert base.select_engine("auto", _request(q, k, None)).name == "blocked"
        window = _request(q, k, M.causal() & M.window(256))
        assert base.select_engine("auto", window).name == "blocked"
        out = attnlab.attention(q, k, v)  # the plain path: no request
    assert isinstance(out, Tensor) and out.dtype == dtype and len(decodes) == 1
    q8, k8 = (t.to(dtype) for t in _qkv(8, 8, 8, 4096)[:2])
    tie = "sdpa" if dtype == torch.bfloat16 else "blocked"
    assert base.select_engine("auto", _request(q8, k8, M.causal())).name == tie
    amx = dtype == torch.bfloat16 and cpu_info().amx  # SDPA on the tiles: 4 rows too
    four = "sdpa" if amx else "blocked"
    assert base.select_engine("auto", _request(q8[:, :, :4], k8, None)).name == four


def test_the_op_takes_one_dtype() -> None:
    if blocked_engine.kernel() is None:
        pytest.skip(f"attnlab's CPU kernel could not be built: {blocked_engine.kernel_error()}")
    q, k, v = (t.bfloat16() for t in _qkv(8, 2, 1, 64))
    op = blocked_engine.ops().decode
    assert op(q, k, v, None, None, 0.125).dtype == torch.bfloat16
    with pytest.raises(RuntimeError, match="share one dtype"):
        op(q, k.half(), v.half(), None, None, 0.125)
