"""What ``engine="auto"`` gives the blocked engine (``attnlab.engines.blocked_choice``).

Each pick below was timed by ``benchmarks/bench_auto.py`` (README, "What auto picks"):
these pin the rules, on both sides of each threshold, so a change to them shows here.
"""

from __future__ import annotations

import itertools

import pytest
import torch

import attnlab
from attnlab import bias as B
from attnlab import masks as M
from attnlab._cpu import CpuInfo
from attnlab.engines import (
    AttentionRequest,
    blocked_autograd,
    blocked_choice,
    blocked_decode,
    select_engine,
)
from attnlab.functional import _request
from tests.conftest import assert_2x_rule, naive_attention


@pytest.fixture(autouse=True)
def _kernel(request: pytest.FixtureRequest) -> None:
    """These rules are the compiled kernel's; without one only the long ones hold."""
    if "without_the_kernel" not in request.node.name and blocked_autograd.kernel() is None:
        pytest.skip(f"attnlab's CPU kernel could not be built: {blocked_autograd.kernel_error()}")


def _pick(
    lq: int,
    lk: int,
    mask: M.Mask | None = None,
    bias: B.Bias | None = None,
    *,
    heads: tuple[int, int] = (8, 8),
    batch: int = 1,
    dtype: torch.dtype = torch.float32,
    lse: bool = False,
    weights: bool = False,
    grad: bool = False,
    score: str = "dot",
    softcap: float | None = None,
    sinks: bool = False,
) -> str:
    q = torch.randn(batch, heads[0], lq, 16, dtype=dtype, requires_grad=grad)
    k, v = (torch.randn(batch, heads[1], lk, 16, dtype=dtype, requires_grad=grad) for _ in "kv")
    sink = torch.randn(heads[0], dtype=dtype) if sinks else None
    req: AttentionRequest = _request(
        q, k, v, mask, bias, None, score, "softmax", 0.0, weights, lse, softcap=softcap, sinks=sink
    )
    return select_engine("auto", req).name


def test_what_sdpa_cannot_compute_goes_to_blocked_from_128_squared() -> None:
    causal = M.causal()
    assert _pick(128, 128, causal, lse=True) == "blocked"
    assert _pick(128, 128, causal, lse=True, grad=True) == "blocked"
    assert _pick(64, 64, causal, lse=True) == "reference"  # one small matmul wins
    assert _pick(256, 256, None, lse=True, dtype=torch.bfloat16) == "blocked"
    assert _pick(128, 128, None, lse=True, dtype=torch.bfloat16) == "reference"
    assert _pick(256, 256, None, lse=True, dtype=torch.float64) == "reference"  # no kernel


def test_weights_go_to_blocked_where_its_forward_writes_them() -> None:
    assert _pick(128, 128, M.causal(), weights=True) == "blocked"
    assert _pick(256, 256, M.window(32), weights=True) == "blocked"
    assert _pick(512, 512, None, weights=True) == "reference"  # recomputed per block
    assert _pick(512, 512, M.causal(), B.alibi(8), weights=True) == "reference"
    assert _pick(1024, 1024, None, weights=True) == "blocked"
    assert _pick(256, 256, M.causal(), weights=True, dtype=torch.bfloat16) == "reference"
    assert _pick(256, 256, M.causal(), weights=True, grad=True) == "reference"  # refused


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_weights_with_what_sdpa_cannot_compute_keep_the_weights_rule(dtype: torch.dtype) -> None:
    """Weights with soft-capping, sinks, the logsumexp or cosine scores went to blocked
    from 512 x 512 in every dtype, float64 included, where blocked took 0.7-2.2x the
    reference engine's time at 512 x 512 (slower in 22 of 24 calls: E=64, 8 heads, one
    thread, AVX512 and AVX2) and in float64 0.6-2.1x up to 2048 x 2048 (slower in 9 of 12)."""
    for extra in ({"softcap": 30.0}, {"sinks": True}, {"lse": True}, {"score": "cosine"}):
        assert _pick(512, 512, weights=True, dtype=dtype, **extra) == "reference", extra
        fused = "blocked" if dtype == torch.float32 else "reference"  # written beside the output
        assert _pick(512, 512, M.causal(), weights=True, dtype=dtype, **extra) == fused, extra
        no_kernel = "reference" if dtype == torch.float64 else "blocked"  # else from 2**20
        assert _pick(1024, 1024, weights=True, dtype=dtype, **extra) == no_kernel, extra
        assert _pick(1024, 1024, M.window(128), weights=True, dtype=dtype, **extra) == "blocked"
        assert _pick(512, 512, dtype=dtype, **extra) == "blocked", extra  # no weights


def test_alibi_goes_to_blocked_whatever_the_mask() -> None:
    for make in (lambda n: None, lambda n: M.padding([n * 45 // 64]), lambda n: M.prefix(256)):
        assert _pick(512, 512, make(512), B.alibi(8)) == "blocked", make(512)
        assert _pick(256, 256, make(256), B.alibi(8)) == "sdpa", make(256)  # 2**16 pairs
    assert _pick(64, 4096, None, B.alibi(8)) == "blocked"
    assert _pick(512, 512, None, B.alibi(8), dtype=torch.bfloat16) == "sdpa"
    assert _pick(1024, 1024, None, B.alibi(8), dtype=torch.bfloat16) == "blocked"
    assert _pick(512, 512, M.padding([360]), B.alibi(8), dtype=torch.bfloat16) == "blocked"
    assert _pick(512, 512, None, B.alibi(8), dtype=torch.float64) == "sdpa"


def test_a_few_rows_under_a_narrow_interval_mask_go_to_blocked() -> None:
    window, gqa = M.causal() & M.window(128), (32, 8)
    assert _pick(16, 4096, window, heads=gqa) == "blocked"
    assert _pick(1, 4096, window, B.alibi(32), heads=gqa) == "blocked"
    assert _pick(32, 2048, M.documents(torch.arange(2048) // 512)) == "blocked"
    assert _pick(16, 4096, M.padding([2900]), heads=gqa) == "sdpa"  # most keys allowed
    assert _pick(16, 4096, window, heads=gqa, dtype=torch.bfloat16) == "blocked"
    assert _pick(16, 4096, M.block_random(64, 4), heads=gqa) == "sdpa"  # gathered keys
    assert _pick(1, 4096, None, B.alibi(32), heads=gqa) == "sdpa"
    assert _pick(16, 384, window, heads=gqa) == "sdpa"  # three key tiles


HALF = [torch.bfloat16, torch.float16]


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_half_precision_decoding_under_a_narrow_interval_mask_goes_to_blocked(
    dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    # SDPA read the whole cache: 7-390x the blocked engine's time at 4096-131072 keys
    _on(monkeypatch, "AVX512")  # (bfloat16 with AMX: below)
    window, gqa = M.causal() & M.window(256), (8, 2)
    for lk in (4096, 32768, 131072):
        assert _pick(1, lk, window, heads=gqa, dtype=dtype) == "blocked", lk
        assert _pick(1, lk, window, dtype=dtype) == "blocked", lk
    assert _pick(16, 4096, window, heads=gqa, dtype=dtype) == "blocked"
    assert _pick(1, 32768, M.documents(torch.arange(32768) // 1024), dtype=dtype) == "blocked"
    assert _pick(1, 4096, window, B.alibi(8), dtype=dtype) == "blocked"
    for heads in (gqa, (8, 8)):  # dense decoding, and one row that sees every key: the
        # decoding kernel reads half precision in place (engines.blocked_decode.kernel_wins)
        assert _pick(1, 4096, None, heads=heads, dtype=dtype) == "blocked"
        assert _pick(1, 4096, M.causal(), heads=heads, dtype=dtype) == "blocked"
    # 8 rows of one query head per key/value head over every key: a tie in bfloat16
    tie = "sdpa" if dtype == torch.bfloat16 else "blocked"
    assert _pick(8, 4096, M.causal(), dtype=dtype) == tie
    assert _pick(8, 4096, window, dtype=dtype) == "blocked"  # 264 keys of 4096
    assert _pick(16, 4096, M.padding([2900]), heads=gqa, dtype=dtype) == "sdpa"
    # with AMX, SDPA runs bfloat16 on the tiles: one row of 8 heads on 8 over every key
    # took the kernel 1.4-2.0x SDPA's time, 4 rows 1.1x; grouped heads and windows stay
    _on(monkeypatch, "AVX512", amx=True)
    amx = "sdpa" if dtype == torch.bfloat16 else "blocked"
    for rows in (1, 4):
        assert _pick(rows, 4096, M.causal(), dtype=dtype) == amx, rows
        assert _pick(rows, 4096, None, dtype=dtype) == amx, rows
        assert _pick(rows, 4096, window, dtype=dtype) == "blocked", rows
    assert _pick(1, 4096, M.causal(), heads=gqa, dtype=dtype) == "blocked"
    assert _pick(1, 4096, M.causal() & M.window(2047), dtype=dtype) == "blocked"  # half


def test_bfloat16_keeps_sdpa_on_short_caches_where_its_kernel_is_faster() -> None:
    window, bf16 = M.causal() & M.window(128), torch.bfloat16
    assert _pick(2, 2048, window, dtype=bf16) == "blocked"  # a decoding step: its kernel
    assert _pick(16, 2048, window, heads=(8, 2), dtype=bf16) == "sdpa"  # 64 rows per head
    assert _pick(2, 4096, window, dtype=bf16) == "blocked"
    assert _pick(16, 1024, window, dtype=torch.float16) == "blocked"  # SDPA: slow float16


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("heads", [(8, 2, 1), (8, 8, 1), (4, 1, 16)], ids=str)
@pytest.mark.parametrize("mask", ["window", "documents"])
def test_half_precision_few_rows_auto_gives_blocked_keep_the_2x_rule(
    dtype: torch.dtype, heads: tuple[int, int, int], mask: str
) -> None:
    hq, hk, lq = heads
    lk = 4096
    g = torch.Generator().manual_seed(hq + lq)
    q = torch.randn(2, hq, lq, 64, generator=g, dtype=torch.float64)
    k, v = (torch.randn(2, hk, lk, 64, generator=g, dtype=torch.float64) for _ in "kv")
    docs = M.documents(torch.arange(lk) // 1000)
    m = M.causal() & M.window(256) if mask == "window" else docs
    qh, kh, vh = (t.to(dtype) for t in (q, k, v))
    req = _request(qh, kh, vh, m, None, None, "dot", "softmax", 0.0, False, False)
    assert select_engine("auto", req).name == "blocked"
    out = attnlab.attention(qh, kh, vh, mask=m)
    assert isinstance(out, torch.Tensor) and out.dtype == dtype
    allowed = m.dense(lq, lk, batch=2, heads=hq)
    ref64, _ = naive_attention(q, k, v, allowed=allowed)
    plain, _ = naive_attention(qh, kh, vh, allowed=allowed)
    assert_2x_rule(out, plain, ref64, f"{dtype} {mask} {heads}")


def test_other_biases_go_to_blocked_when_no_gradient_is_wanted() -> None:
    pad = M.padding([716])
    with torch.no_grad():
        assert _pick(1024, 1024, pad, B.relative_buckets(8)) == "blocked"
        assert _pick(512, 512, M.padding([358]), B.relative_buckets(8)) == "sdpa"
        assert _pick(1024, 1024, None, B.relative_buckets(8)) == "sdpa"
    assert _pick(1024, 1024, pad, B.relative_buckets(8)) == "sdpa"  # its table wants one


def _keeps_2x_rule(
    shape: tuple[int, int, int, int], mask: M.Mask | None, dtype: torch.dtype, what: str
) -> None:
    """``auto`` gives the call (with gradients) to blocked, within 2x plain PyTorch's error
    against float64, output and gradients."""
    b, hq, hk, lq = shape
    g = torch.Generator().manual_seed(lq + hk)
    t64 = [torch.randn(b, h, lq, 32, generator=g, dtype=torch.float64) for h in (hq, hk, hk)]
    low = [t.to(dtype).requires_grad_() for t in t64]
    req = _request(*low, mask, None, None, "dot", "softmax", 0.0, False, False)
    assert select_engine("auto", req).name == "blocked", what
    allowed = None if mask is None else mask.dense(lq, lq, batch=b, heads=hq)
    grad = torch.randn(b, hq, lq, 32, generator=g, dtype=torch.float64)
    runs = []
    for ins, fn in ((low, "auto"), ([t.detach().requires_grad_() for t in low], "plain"),
                    ([t.clone().requires_grad_() for t in t64], "plain")):  # fmt: skip
        if fn == "auto":
            out = attnlab.attention(*ins, mask=mask)
            assert isinstance(out, torch.Tensor)
        else:
            kv = [t.repeat_interleave(hq // hk, 1) for t in ins[1:]]
            out = naive_attention(ins[0], *kv, allowed=allowed)[0]
        out.backward(grad.to(out.dtype))
        runs.append([out.detach(), *(t.grad for t in ins)])
    for name, ours, plain, ref64 in zip("oqkv", *runs, strict=True):
        assert ours is not None and plain is not None and ref64 is not None
        assert_2x_rule(ours, plain, ref64, f"{what} {name}")


def test_padding_goes_to_blocked_while_its_items_leave_tiles_empty(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # SDPA reads padding as a dense mask: 1.3-1.9x the kernel's time at 2048 x 2048
    # (AVX512; 1.0-1.6x AVX2), even where one full-length item makes every tile needed
    n, bf16 = 2048, torch.bfloat16
    _on(monkeypatch, "AVX512")
    for keep in (6, 7, 9):
        assert _pick(n, n, M.padding([n * keep // 10]), heads=(4, 4)) == "blocked", keep
    assert _pick(n, n, M.padding([n * 7 // 10]), heads=(4, 4), dtype=bf16) == "blocked"
    assert _pick(n, n, M.padding([n * 7 // 10]), heads=(4, 4), grad=True) == "blocked"
    assert _pick(n, n, M.padding([n, n * 4 // 10]), heads=(4, 4), batch=2) == "blocked"
    assert _pick(512, 512, M.padding([358])) == "blocked"
    assert _pick(n, n, M.window(768, 768), heads=(4, 4)) == "blocked"
    assert _pick(n, n, M.padding([n - 100]), heads=(4, 4)) == "sdpa"  # every tile needed
    assert _pick(n, n, M.padding([n, n]), heads=(4, 4), batch=2) == "sdpa"
    assert _pick(256, 256, M.padding([180])) == "sdpa"  # 2**16 pairs
    # bfloat16 on AMX (Intel Xeon): SDPA's time over the kernel's 0.65-0.72x forward at
    # 70% and 0.88-0.95x forward and backward, 0.89-1.15x forward at 50%, 1.2-1.36x
    # forward and backward at 50%
    _on(monkeypatch, "AVX512", amx=True)
    assert _pick(n, n, M.padding([n * 7 // 10]), dtype=bf16) == "sdpa"
    assert _pick(n, n, M.padding([n * 7 // 10]), dtype=bf16, grad=True) == "sdpa"
    assert _pick(n, n, M.padding([n * 85 // 100]), dtype=bf16) == "sdpa"
    assert _pick(n, n, M.padding([n // 2]), dtype=bf16) == "blocked"
    assert _pick(n, n, M.padding([n // 2]), dtype=bf16, grad=True) == "blocked"
    assert _pick(n, n, M.documents(torch.arange(n) // 512), dtype=bf16) == "blocked"
    assert _pick(n, n, M.padding([n * 7 // 10])) == "blocked"  # float32: no AMX


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_padding_auto_gives_blocked_keeps_the_2x_rule(
    dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    _on(monkeypatch, "AVX512")  # (bfloat16 on AMX keeps SDPA for these)
    _keeps_2x_rule((2, 4, 4, 512), M.padding([512, 200]), dtype, f"padding {dtype}")
    _keeps_2x_rule((1, 4, 2, 512), M.padding([300]), dtype, f"padding GQA {dtype}")


def test_causal_calls_that_want_a_gradient_go_to_blocked(monkeypatch: pytest.MonkeyPatch) -> None:
    # torch's causal flash backward on the CPU: 1.3-2.0x the kernel's time at 512-4096
    # (AVX512; 1.1-1.8x AVX2), grouped heads or not; bfloat16 on AMX: below
    causal = M.causal()
    _on(monkeypatch, "AVX512")
    for heads in ((8, 1), (8, 2), (8, 8)):
        assert _pick(512, 512, causal, heads=heads, grad=True) == "blocked", heads
    assert _pick(1024, 1024, causal, heads=(8, 2), grad=True, dtype=torch.bfloat16) == "blocked"
    assert _pick(256, 256, causal, grad=True) == "sdpa"  # 2**16 pairs
    assert _pick(1024, 1024, None, heads=(8, 2), grad=True) == "sdpa"


def _on(
    monkeypatch: pytest.MonkeyPatch,
    cap: str,
    amx: bool = False,
    fp16: bool = False,
    amx_fp16: bool = False,
) -> None:
    """The rules as they run on a CPU of torch's ``cap``, with or without AMX tiles,
    oneDNN float16 products and AMX float16 tiles."""
    info = CpuInfo(cap, amx, amx, threads=2, amx=amx, onednn_fp16=fp16, amx_fp16=amx_fp16)
    monkeypatch.setattr(blocked_choice, "cpu_info", lambda: info)
    monkeypatch.setattr(blocked_decode, "cpu_info", lambda: info)


def test_causal_forward_follows_the_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    # SDPA's causal forward: 1.2-1.5x the kernel's time in float32 and bfloat16 (AVX512,
    # 1024-8192); AVX2 1.05-1.2x to 2048, 0.94-1.0x from 4096; bfloat16 on AMX: SDPA
    causal, bf16 = M.causal(), torch.bfloat16
    _on(monkeypatch, "AVX512")
    for n, heads in itertools.product((512, 4096), ((8, 1), (8, 2), (8, 8))):
        assert _pick(n, n, causal, heads=heads) == "blocked", (n, heads)
        assert _pick(n, n, causal, heads=heads, dtype=bf16) == "blocked", (n, heads)
    assert _pick(256, 256, causal) == "sdpa"  # 2**16 pairs
    assert _pick(1024, 1024, None) == "sdpa"  # dense: level
    assert _pick(1024, 1024, causal, B.alibi(8)) == "blocked"  # (its own rule)
    _on(monkeypatch, "AVX512", amx=True)
    assert _pick(1024, 1024, causal, dtype=bf16) == "sdpa"
    assert _pick(1024, 1024, causal) == "blocked"
    # with a gradient on AMX (Intel Xeon): bfloat16 SDPA 0.89-0.97x the kernel's time at
    # 1024, 0.60x at 2048, 1.20x at 512; float32 1.08-1.51x
    assert _pick(512, 512, causal, dtype=bf16, grad=True) == "blocked"
    assert _pick(1024, 1024, causal, dtype=bf16, grad=True, heads=(8, 2)) == "sdpa"
    assert _pick(2048, 2048, causal, grad=True) == "blocked"
    _on(monkeypatch, "AVX512")
    assert _pick(2048, 2048, causal, dtype=bf16, grad=True) == "blocked"
    _on(monkeypatch, "AVX512", amx=True)
    _on(monkeypatch, "AVX2")
    assert _pick(2048, 2048, causal) == _pick(2048, 2048, causal, dtype=bf16) == "blocked"
    assert _pick(4096, 4096, causal) == _pick(4096, 4096, causal, dtype=bf16) == "sdpa"
    _on(monkeypatch, "DEFAULT")
    assert _pick(1024, 1024, causal) == "blocked"
    assert _pick(1024, 1024, causal, dtype=torch.float64) == "sdpa"  # no kernel in float64


def test_float16_goes_to_blocked_without_float16_products(monkeypatch: pytest.MonkeyPatch) -> None:
    # SDPA in float16 on a CPU without AVX512-FP16 / AMX-FP16: 1.5-3.7x the kernel's time
    # forward (dense, causal), 8x dense forward and backward
    f16, causal, t5 = torch.float16, M.causal(), B.relative_buckets(8)
    for cap in ("AVX512", "AVX2"):
        _on(monkeypatch, cap)
        for grad in (False, True):
            assert _pick(512, 512, None, dtype=f16, grad=grad) == "blocked", (cap, grad)
            assert _pick(4096, 4096, causal, dtype=f16, grad=grad) == "blocked", (cap, grad)
        assert _pick(1024, 1024, None, t5, dtype=f16, grad=True) == "sdpa"  # 0.86x
        assert _pick(256, 256, None, dtype=f16) == "sdpa"  # 2**16 pairs
    # with AVX512-FP16 (Intel Xeon): dense level (0.95-1.0x), causal forward 1.2-1.6x
    # the kernel's time, 0.6-0.8x with AVX2 forced; AMX-FP16 left to SDPA
    _on(monkeypatch, "AVX512", fp16=True)
    assert _pick(1024, 1024, None, dtype=f16) == "sdpa"
    assert _pick(1024, 1024, causal, dtype=f16) == "blocked"
    assert _pick(1024, 1024, causal, dtype=f16, grad=True) == "blocked"
    _on(monkeypatch, "AVX2", fp16=True)
    assert _pick(1024, 1024, causal, dtype=f16) == "sdpa"
    _on(monkeypatch, "AVX512", amx=True, fp16=True, amx_fp16=True)
    assert _pick(1024, 1024, causal, dtype=f16) == "sdpa"


def test_float16_auto_gives_blocked_keeps_the_2x_rule(monkeypatch: pytest.MonkeyPatch) -> None:
    _on(monkeypatch, "AVX512")
    _keeps_2x_rule((1, 4, 2, 512), None, torch.float16, "dense float16")
    _keeps_2x_rule((1, 4, 2, 512), M.causal(), torch.float16, "causal float16")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("heads", [(8, 2), (4, 4)], ids=str)
def test_causal_gradients_auto_gives_blocked_keep_the_2x_rule(
    dtype: torch.dtype, heads: tuple[int, int]
) -> None:
    _keeps_2x_rule((1, *heads, 512), M.causal(), dtype, f"causal {heads} {dtype}")


def test_half_precision_with_a_gradient_under_an_interval_mask_goes_to_blocked() -> None:
    # SDPA forward and backward: 1.5-3.0x the kernel's time in bfloat16 at 256 x 256, 9.6x
    # in float16 (AVX512 and AVX2)
    bf16, docs = torch.bfloat16, M.documents(torch.arange(256) // 64)
    for mask in (docs, M.causal() & M.window(64), M.causal(), M.padding([180])):
        assert _pick(256, 256, mask, dtype=bf16, grad=True) == "blocked", mask
    assert _pick(256, 256, docs, heads=(8, 2), dtype=bf16, grad=True) == "blocked"
    assert _pick(256, 256, docs, dtype=torch.float16, grad=True) == "blocked"
    assert _pick(256, 256, docs, dtype=bf16) == "sdpa"  # no gradient
    assert _pick(256, 256, docs, grad=True) == "sdpa"  # float32
    assert _pick(256, 256, None, dtype=bf16, grad=True) == "sdpa"
    assert _pick(256, 256, M.block_random(64, 2), dtype=bf16, grad=True) == "sdpa"
    assert _pick(128, 128, M.causal() & M.window(64), dtype=bf16, grad=True) == "sdpa"  # 2**14


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("mask", ["documents", "window"])
def test_half_precision_gradients_auto_gives_blocked_keep_the_2x_rule(
    dtype: torch.dtype, mask: str
) -> None:
    m = M.documents(torch.arange(256) // 64) if mask == "documents" else M.causal() & M.window(64)
    _keeps_2x_rule((1, 8, 2, 256), m, dtype, f"{mask} {dtype}")


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_one_half_precision_row_under_a_window_goes_to_blocked_from_1024_keys(
    dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    _on(monkeypatch, "AVX512")  # (bfloat16 with AMX: above)
    # SDPA's one-row path: 1.0-1.4x the kernel's time in bfloat16, 2.0-4.3x in float16
    window = M.causal() & M.window(64)
    for lk in (1024, 2048):
        for heads in ((8, 2), (8, 8)):
            assert _pick(1, lk, window, heads=heads, dtype=dtype) == "blocked", (lk, heads)
    # decoding steps all (engines.blocked_decode.kernel_wins): the decoding kernel
    assert _pick(1, 512, window, dtype=dtype) == "blocked"
    assert _pick(1, 2048, None, heads=(8, 2), dtype=dtype) == "blocked"
    assert _pick(1, 2048, M.causal(), dtype=dtype) == "blocked"  # every key
    assert _pick(2, 2048, window, dtype=torch.bfloat16) == "blocked"
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 8, 1, 64, generator=g, dtype=torch.float64)
    k, v = (torch.randn(2, 2, 2048, 64, generator=g, dtype=torch.float64) for _ in "kv")
    out = attnlab.attention(*(t.to(dtype) for t in (q, k, v)), mask=window)
    assert isinstance(out, torch.Tensor)
    kv = [t.repeat_interleave(4, 1) for t in (k, v)]
    allowed = window.dense(1, 2048, batch=2, heads=8)
    ref64, _ = naive_attention(q, *kv, allowed=allowed)
    plain, _ = naive_attention(q.to(dtype), *(t.to(dtype) for t in kv), allowed=allowed)
    assert_2x_rule(out, plain, ref64, f"one row {dtype}")


def test_without_the_kernel_only_the_long_rules_hold(monkeypatch: pytest.MonkeyPatch) -> None:
    # cosine scores, which SDPA cannot compute, went to the reference engine's dense scores
    assert _pick(2048, 2048, None, dtype=torch.float64, score="cosine") == "blocked"
    assert _pick(256, 256, None, dtype=torch.float64, score="cosine") == "reference"  # short
    monkeypatch.setattr(blocked_autograd, "USE_KERNEL", False)
    assert _pick(256, 256, M.causal(), lse=True) == "reference"
    assert _pick(512, 512, M.causal(), lse=True) == "blocked"
    assert _pick(1024, 1024, None, B.alibi(8)) == "sdpa"
    assert _pick(16, 4096, M.causal() & M.window(128), heads=(32, 8)) == "sdpa"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_what_blocked_declines_by_its_sizes_it_would_not_prefer(dtype: torch.dtype) -> None:
    """``declines`` skips ``unsupported`` and ``prefers`` for small calls: it must never
    pass by a call ``prefers`` takes (decoding steps, one half-precision row of a long
    cache), on both sides of each size it reads."""
    blocked = attnlab.engines.get_engine("blocked")
    masks = [None, M.causal(), M.window(4), M.padding([5]), M.causal() & M.window(64)]
    seen = set()
    for lq, lk, heads, mask in itertools.product(
        [1, 2, 8, 9, 16, 63, 64], [8, 15, 16, 63, 64, 1023, 1024, 4096], [(8, 8), (8, 1)], masks
    ):
        q = torch.randn(1, heads[0], lq, 8, dtype=dtype)
        kv = torch.randn(1, heads[1], lk, 8, dtype=dtype)
        req = _request(q, kv, kv, mask, None, None, "dot", "softmax", 0.0, False, False)
        if blocked.declines(req):
            seen.add((lq, lk))
            assert not blocked.prefers(req), (lq, lk, heads, mask)
    assert (16, 16) in seen and (1, 8) in seen  # it does pass small calls by
