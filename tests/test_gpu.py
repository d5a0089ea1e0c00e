"""attnlab on a CUDA device: every engine, mask and dtype, the score options, returned
weights and logsumexp, layers, transformers models through the backend, and the GPU
benchmark, each against an fp64 run on the same device (flash-attn's 2x rule).

Skipped without CUDA (CI has none). ``ATTNLAB_TEST_DEVICE=cpu`` runs the same tests on
the CPU, which is how they are debugged on a machine without a GPU.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
from collections.abc import Callable

import pytest
import torch
from torch import Tensor

import attnlab
from attnlab import bias as B
from attnlab import masks as M
from attnlab.engines import get_engine
from attnlab.engines._dense_cache import DenseCache
from tests.conftest import assert_2x_rule, max_err, naive_attention

DEV = torch.device(os.environ.get("ATTNLAB_TEST_DEVICE", "cuda"))
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        DEV.type == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA device"
    ),
]

BATCH, HQ, HKV, L, E = 2, 4, 2, 300, 32  # L: not a multiple of the 128-row blocks
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
MASKS: dict[str, Callable[[], M.Mask | None]] = {
    "none": lambda: None,
    "causal": M.causal,
    "window": lambda: M.causal() & M.window(40),
    "documents": lambda: M.documents(torch.arange(L) * 5 // L),
    "padding": lambda: M.padding([L, 170]),
    "prefix": lambda: M.prefix(50),
    "global": lambda: M.global_tokens([0, 7]) | (M.causal() & M.window(16)),
    "dilated": lambda: M.causal() & M.dilated(64, 2),
    "random_blocks": lambda: M.block_random(32, 2),
}


def _inputs(dtype: torch.dtype, lq: int = L) -> list[Tensor]:
    """q (B, Hq, Lq, E), k, v (B, Hkv, L, E) and an output gradient, seeded, in float64
    on the device (cast by the caller)."""
    g = torch.Generator().manual_seed(0)
    shapes = [(BATCH, HQ, lq, E), (BATCH, HKV, L, E), (BATCH, HKV, L, E), (BATCH, HQ, lq, E)]
    return [torch.randn(s, generator=g, dtype=torch.float64).to(DEV) for s in shapes]


def _run(fn: Callable[..., Tensor], ts: list[Tensor], dtype: torch.dtype) -> list[Tensor]:
    """The output of ``fn(q, k, v)`` in ``dtype`` and the gradients of q, k, v."""
    q, k, v = (t.to(dtype).clone().requires_grad_() for t in ts[:3])
    out = fn(q, k, v)
    out.backward(ts[3].to(dtype))
    return [out.detach(), *(t.grad for t in (q, k, v))]  # type: ignore[list-item]


def _check(ours: list[Tensor], plain: list[Tensor], ref: list[Tensor], what: str) -> None:
    assert ours[0].device.type == DEV.type, f"{what}: the output left the device"
    for name, a, b, c in zip(("out", "dq", "dk", "dv"), ours, plain, ref, strict=True):
        assert torch.isfinite(a).all(), f"{what} {name}: not finite"
        assert_2x_rule(a, b, c, f"{what} {name}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mask_name", list(MASKS))
@pytest.mark.parametrize("engine", ["auto", "blocked", "flex", "sdpa", "reference"])
def test_engines_follow_fp64_by_the_2x_rule(
    engine: str, mask_name: str, dtype: torch.dtype
) -> None:
    ts, mask = _inputs(dtype), MASKS[mask_name]()
    allowed = None if mask is None else mask.dense(L, L, batch=BATCH, heads=HQ, device=DEV)

    def naive(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return naive_attention(q, k, v, allowed=allowed)[0]

    def ours(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return attnlab.attention(q, k, v, mask=mask, engine=engine)  # type: ignore[return-value]

    if engine == "flex" and DEV.type != "cuda":
        pytest.skip("FlexAttention has no CPU backward")
    ref = _run(naive, ts, torch.float64)
    _check(_run(ours, ts, dtype), _run(naive, ts, dtype), ref, f"{engine} {mask_name}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    ("engine", "with_sinks"),
    [
        ("auto", True),
        ("blocked", True),
        ("reference", True),
        ("flex", True),
        ("auto", False),
        ("flex", False),
    ],
)
def test_softcap_alibi_and_sinks_follow_fp64(
    engine: str, with_sinks: bool, dtype: torch.dtype
) -> None:
    if engine == "flex" and DEV.type != "cuda":
        pytest.skip("FlexAttention has no CPU backward")
    ts, mask, alibi = _inputs(dtype, lq=L), M.causal() & M.window(64), B.alibi(HQ)
    allowed = mask.dense(L, L, device=DEV)
    bias = alibi.dense(L, L, heads=HQ, device=DEV, dtype=torch.float64)
    sinks64 = torch.randn(HQ, generator=torch.Generator().manual_seed(3), dtype=torch.float64)

    def naive(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        sinks = sinks64.to(DEV, q.dtype) if with_sinks else None
        kw = {"allowed": allowed, "bias": bias.to(q.dtype), "softcap": 5.0, "sinks": sinks}
        return naive_attention(q, k, v, **kw)[0]  # type: ignore[arg-type]

    def ours(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        sinks = sinks64.to(DEV, q.dtype) if with_sinks else None
        out = attnlab.attention(
            q, k, v, mask=mask, bias=alibi, softcap=5.0, sinks=sinks, engine=engine
        )
        return out  # type: ignore[return-value]

    ref = _run(naive, ts, torch.float64)
    _check(_run(ours, ts, dtype), _run(naive, ts, dtype), ref, f"{engine} options")


@pytest.mark.parametrize("engine", ["blocked", "reference", "flex"])
def test_weights_and_logsumexp_on_the_device_equal_fp64(engine: str) -> None:
    q, k, v, _ = _inputs(torch.float32)
    mask = M.causal() & M.window(40)
    allowed = mask.dense(L, L, device=DEV)
    with torch.no_grad():
        res = attnlab.attention(
            q.float(),
            k.float(),
            v.float(),
            mask=mask,
            engine=engine,
            return_weights=engine != "flex",  # flex: the logsumexp only
            return_lse=True,
            engine_options={"compile": False} if engine == "flex" and DEV.type == "cpu" else None,
        )
    out64, w64 = naive_attention(q, k, v, allowed=allowed)
    s = torch.einsum("bhqe,bhke->bhqk", q, k.repeat_interleave(HQ // HKV, dim=1)) * E**-0.5
    lse64 = s.masked_fill(~allowed, float("-inf")).logsumexp(-1)
    assert res.lse is not None and res.out.device.type == DEV.type
    assert max_err(res.out, out64) < 1e-5 and max_err(res.lse, lse64) < 1e-5
    if engine != "flex":
        assert res.weights is not None and max_err(res.weights, w64) < 1e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("engine", ["blocked", "reference", "flex"])
def test_the_logsumexp_has_a_gradient_on_the_device(engine: str, dtype: torch.dtype) -> None:
    """A loss on the returned logsumexp reaches q and k (flex: FlexAttention's own lse
    gradient), against fp64, with a row that sees no key."""
    if engine == "flex" and DEV.type != "cuda":
        pytest.skip("FlexAttention has no CPU backward")
    ts, mask = _inputs(dtype), M.causal() & M.window(40) & M.padding([L, L], [L, 250])
    allowed = mask.dense(L, L, batch=BATCH, heads=HQ, device=DEV)
    dl = torch.randn(BATCH, HQ, L, generator=torch.Generator().manual_seed(6)).to(DEV)

    def naive(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        s = torch.einsum("bhqe,bhke->bhqk", q, k.repeat_interleave(HQ // HKV, dim=1)) * E**-0.5
        lse = s.masked_fill(~allowed, float("-inf")).logsumexp(-1)
        lse = lse.masked_fill(~allowed.any(-1), 0.0)  # no key: no gradient
        return naive_attention(q, k, v, allowed=allowed)[0] + (lse * dl.to(q.dtype))[..., None]

    def ours(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        r = attnlab.attention(q, k, v, mask=mask, engine=engine, return_lse=True)
        lse = r.lse.masked_fill(~allowed.any(-1), 0.0)  # type: ignore[union-attr]
        return r.out + (lse * dl.to(q.dtype))[..., None]

    ref = _run(naive, ts, torch.float64)
    _check(_run(ours, ts, dtype), _run(naive, ts, dtype), ref, f"{engine} lse")


@pytest.mark.parametrize("engine", ["auto", "flex"])
@pytest.mark.parametrize("mask_name", ["none", "window", "padding"])
def test_decoding_steps_on_the_device_follow_fp64(mask_name: str, engine: str) -> None:
    """Single query rows over a long cache, grouped-query, as a model's decoding step."""
    g = torch.Generator().manual_seed(4)
    q = torch.randn(BATCH, 8, 1, 64, generator=g, dtype=torch.float64).to(DEV)
    k, v = (torch.randn(BATCH, 2, 700, 64, generator=g, dtype=torch.float64).to(DEV) for _ in "kv")
    mask = {"none": None, "window": M.causal() & M.window(128), "padding": M.padding([700, 333])}
    m = mask[mask_name]
    allowed = None if m is None else m.dense(1, 700, batch=BATCH, heads=8, device=DEV)
    ref = naive_attention(q, k, v, allowed=allowed)[0]
    plain = naive_attention(q.float(), k.float(), v.float(), allowed=allowed)[0]
    with torch.no_grad():
        ours = attnlab.attention(q.float(), k.float(), v.float(), mask=m, engine=engine)
    assert_2x_rule(ours, plain, ref, f"decode {mask_name}")  # type: ignore[arg-type]


def test_a_decoder_stack_on_the_device_follows_its_fp64_run() -> None:
    """attnlab.nn with RoPE, grouped-query heads and a window: positions, masks and
    caches are built on the inputs' device."""
    from attnlab.nn import DecoderOnly, LayerConfig
    from attnlab.positional import RotaryEmbedding

    def stack(engine: str) -> DecoderOnly:
        torch.manual_seed(0)
        cfg = LayerConfig(
            64,
            4,
            128,
            num_kv_heads=2,
            dropout=0.0,
            norm_first=True,
            rope=RotaryEmbedding(16),
            engine=engine,
        )
        return DecoderOnly(cfg, 2).eval().to(DEV)

    x = torch.randn(2, 600, 64, generator=torch.Generator().manual_seed(5)).to(DEV)
    mask = M.window(50)  # with the decoder's causal mask: 600 x 600 goes to blocked
    with torch.no_grad():
        ref = stack("reference").double()(x.double(), mask=mask)
        plain = stack("reference")(x, mask=mask)
        ours = stack("auto")(x, mask=mask)
    assert ours.device.type == DEV.type
    assert_2x_rule(ours, plain, ref, "DecoderOnly")
    model = stack("auto")  # then decoding: a prefill of 560 tokens, 40 steps of one
    cache = model.new_cache()
    with torch.no_grad():
        model(x[:, :560], mask=mask, cache=cache)
        steps = torch.cat(
            [model(x[:, i : i + 1], mask=mask, cache=cache) for i in range(560, 600)], 1
        )
    assert_2x_rule(steps, plain[:, 560:], ref[:, 560:], "DecoderOnly, cached steps")


def test_the_benchmark_runs_on_the_device_with_flexattention() -> None:
    """``attnlab bench --device``: on a GPU FlexAttention is timed forward and backward."""
    from attnlab.bench import BenchConfig, records

    # on the CPU (debugging only) no FlexAttention: after the flex engine's compiled
    # kernels in one process, inductor failed to build the benchmark's (torch 2.13)
    cfg = BenchConfig(device=str(DEV), flex=DEV.type == "cuda").smoke()
    recs = list(records(cfg, ["window", "documents"]))
    assert [(r["case"], r["mode"]) for r in recs] == [
        ("window", "fwd"),
        ("window", "fwd+bwd"),
        ("documents", "fwd"),
        ("documents", "fwd+bwd"),
    ]
    for r in recs:
        assert r["device"] == str(DEV) and r["ours_ms"] > 0 and r["sdpa_ms"] > 0
        assert ("flex_ms" in r) == (DEV.type == "cuda"), r


# -- transformers models through the backend, on the device ------------------------------


def _hf() -> object:
    transformers = pytest.importorskip("transformers")
    from attnlab.integrations.transformers import register

    register()
    return transformers


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("family", ["llama", "mistral", "gemma2", "gpt_oss", "llama4", "bert"])
def test_transformers_models_follow_eager_on_the_device(family: str, dtype: torch.dtype) -> None:
    """Logits and parameter gradients of tiny models, against fp64 eager on the device."""
    _hf()
    from tests.test_hf_models import _ids, _out, tiny

    ids = _ids().to(DEV)
    runs = []
    for impl, dt in (("eager", torch.float64), ("eager", dtype), ("attnlab", dtype)):
        model = tiny(family, impl).to(DEV, dt)
        out = _out(model, input_ids=ids)
        out.float().square().mean().backward()
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        runs.append([out.detach(), *grads])
    for i, (ours, plain, ref) in enumerate(zip(*reversed(runs), strict=True)):
        assert_2x_rule(ours, plain, ref, f"{family} {'logits' if i == 0 else f'grad {i}'}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_a_long_windowed_model_with_padding_follows_eager_on_the_device(dtype: torch.dtype) -> None:
    """Mistral with a window of 64 over 600 tokens, left-padded: the blocked engine's
    device path under transformers, forward and backward. The fp64 run is SDPA's: eager
    in float64 adds the padding and window masks' ``finfo.min`` into ``-inf`` and gives NaN
    rows (transformers 5.24), which its values then carry into every row."""
    transformers = _hf()
    from tests.test_hf_models import GQA

    ids = torch.randint(1, 64, (2, 600), generator=torch.Generator().manual_seed(1)).to(DEV)
    am = torch.ones_like(ids)
    am[1, :100] = 0
    runs = []
    for impl, dt in (("sdpa", torch.float64), ("eager", dtype), ("attnlab", dtype)):
        torch.manual_seed(0)
        cfg = transformers.MistralConfig(**GQA, sliding_window=64)  # type: ignore[attr-defined]
        model = transformers.AutoModelForCausalLM.from_config(  # type: ignore[attr-defined]
            cfg, attn_implementation=impl
        ).to(DEV, dt)
        logits = model(input_ids=ids, attention_mask=am).logits
        logits[am.bool()].float().square().mean().backward()
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        runs.append([logits[am.bool()].detach(), *grads])
    for i, (ours, plain, ref) in enumerate(zip(*reversed(runs), strict=True)):
        assert_2x_rule(ours, plain, ref, f"mistral 600 {'logits' if i == 0 else f'grad {i}'}")


@pytest.mark.parametrize("family", ["llama", "mistral", "gemma2", "gpt_oss"])
def test_generate_on_the_device_gives_eagers_greedy_tokens(family: str) -> None:
    _hf()
    from tests.test_hf_models import _ids, tiny

    ids, am = _ids(2, 8).to(DEV), torch.ones(2, 8, dtype=torch.long, device=DEV)
    am[0, :3] = 0  # left padding
    kw = {"attention_mask": am, "max_new_tokens": 48, "min_new_tokens": 48, "do_sample": False}
    want = tiny(family, "eager").to(DEV).generate(ids, **kw)
    got = tiny(family, "attnlab").to(DEV).generate(ids, **kw)
    assert got.device.type == DEV.type and want.shape == (2, 56)
    assert torch.equal(got, want)


def test_auto_picks_flex_for_sparse_masks_and_sdpa_for_dense_on_cuda() -> None:
    """On CUDA the blocked engine's eager blocks are slower than SDPA (measured 0.03x at
    16384 tokens on an H200): ``auto`` gives masked calls to flex, dense ones to SDPA."""
    from attnlab.engines import AttentionRequest, select_engine

    if DEV.type != "cuda":
        pytest.skip("the CUDA choice")
    q = torch.randn(1, 4, 1024, 64, device=DEV)

    def pick(mask: M.Mask | None, **kw: object) -> str:
        req = AttentionRequest(q, q, q, mask, None, 0.125, "dot", "softmax", 0.0, False, False)
        return select_engine("auto", dataclasses.replace(req, **kw)).name

    assert pick(M.causal() & M.window(64)) == "flex"
    assert pick(M.documents(torch.arange(1024) // 64)) == "flex"
    assert pick(None) == "sdpa" and pick(M.causal()) == "sdpa"
    assert pick(M.causal(), softcap=30.0) == "flex"
    assert pick(M.causal(), sinks=torch.zeros(4, device=DEV)) == "flex"
    assert pick(None, return_lse=True) == "flex"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("lk", [1, 3, 15, 16, 64])
def test_sdpa_passes_every_nan_on_without_a_screen(lk: int, dtype: torch.dtype) -> None:
    """On CUDA the sdpa engine runs NaN input without its NaN screen (a host-device sync
    on every call): this pins that torch's kernels pass every NaN on to the rows that read
    it, as fp64 does (the CPU's from 16 keys; ``tests/test_attention.py`` pins the rest)."""
    if DEV.type == "cpu" and lk < 16:
        pytest.skip("the CPU's kernels lose NaN below 16 keys: the engine screens there")
    g = torch.Generator().manual_seed(lk)
    cases = [(1, None), (4, None), (lk, M.causal()), (lk, M.padding([lk, max(1, lk - 2)]))]
    reached = 0  # the cases whose NaN some row reads (padding hides key lk - 1 of item 1)
    for (lq, mask), which, pos in itertools.product(cases, range(3), (0, lk - 1)):
        if DEV.type == "cpu" and mask is not None and which > 0 and lq >= 16:
            continue  # the CPU screens k and v for a NaN its kernels spread to hidden rows
        shapes = [(2, 4, lq, 32), (2, 2, lk, 32), (2, 2, lk, 32)]
        qkv = [torch.randn(s, generator=g, dtype=torch.float64).to(DEV, dtype) for s in shapes]
        qkv[which][1, 1, min(pos, qkv[which].shape[2] - 1), 5] = float("nan")
        out = attnlab.attention(*qkv, mask=mask, engine="sdpa")
        want = attnlab.attention(*(t.double() for t in qkv), mask=mask, engine="reference")
        assert isinstance(out, Tensor) and isinstance(want, Tensor)
        lost = want.isnan() & ~out.isnan()
        assert not lost.any(), f"lq={lq} {mask} qkv[{which}] at {pos}: NaN rows came out numbers"
        reached += int(want.isnan().any())
    assert reached >= 16  # of 24 cases; those checked on the CPU too


def test_common_calls_make_no_host_sync_on_cuda() -> None:
    """A host-device sync stalls the CPU until the GPU is idle (a 128-token call took
    380 us to return on an H200 against bare SDPA's 48 us, its NaN screen's sync): dense,
    causal and decoding calls and the flex engine's masked and ALiBi calls make none,
    forward and backward, once their block masks are built."""
    if DEV.type != "cuda":
        pytest.skip("torch.cuda.set_sync_debug_mode is CUDA's")
    g = torch.Generator().manual_seed(5)
    window, causal, slopes = M.causal() & M.window(128), M.causal(), B.alibi(8)
    for dtype in (torch.bfloat16, torch.float32):
        q, k, v = (torch.randn(1, 8, 1024, 64, generator=g).to(DEV, dtype) for _ in "qkv")
        step = q[:, :, -1:].clone()
        calls: dict[str, tuple[Tensor, dict[str, object]]] = {
            "dense": (q, {}),
            "causal": (q, {"mask": causal}),
            "decode": (step, {}),
            "window": (q, {"mask": window}),
            "alibi": (q, {"mask": causal, "bias": slopes}),
        }
        for (name, (query, kw)), grad in itertools.product(calls.items(), (False, True)):
            for t in (q, k, v, step):
                t.requires_grad_(grad)
            for mode in ("default", "error"):  # the first call builds block masks
                torch.cuda.synchronize()
                torch.cuda.set_sync_debug_mode(mode)
                try:
                    out = attnlab.attention(query, k, v, **kw)  # type: ignore[call-overload]
                    assert isinstance(out, Tensor)
                    if grad:
                        out.backward(torch.ones_like(out))
                except RuntimeError as e:
                    raise AssertionError(f"{name} {dtype} grad={grad}: {e}") from e
                finally:
                    torch.cuda.set_sync_debug_mode("default")


SYNC_FREE: dict[str, Callable[[], tuple[M.Mask, B.Bias | None, bool]]] = {
    "window": lambda: (M.causal() & M.window(128), None, False),
    "padding": lambda: (M.padding([1024, 700], query_lengths=[1024, 600]), None, False),
    "causal_alibi": lambda: (M.causal(), B.alibi(8), False),
    "causal_alibi_backward": lambda: (M.causal(), B.alibi(8), True),
    "window_backward": lambda: (M.causal() & M.window(128), None, True),
    "padding_backward": lambda: (M.padding([1024, 700], query_lengths=[1024, 600]), None, True),
}


@pytest.mark.parametrize("case", list(SYNC_FREE))
def test_sdpa_masked_calls_make_no_host_device_sync(
    case: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The sdpa engine's masked calls read nothing back from the device: masks with exact
    row bounds answer which rows see no key or one key on the CPU, ALiBi keeps its slopes'
    copy on the device. Each sync stalled the CPU until the GPU queue drained (an H200,
    bf16 1x8x1024x64, ``causal() & window(128)``: 380-510 us to return, bare SDPA 48 us).
    The first call (allocators, pinned memory, the slopes' copy) runs outside the check;
    the checked ones build the dense mask again (the engine's memo emptied), then reuse it."""
    if DEV.type != "cuda":
        pytest.skip("torch.cuda.set_sync_debug_mode is CUDA's")
    mask, bias, grad = SYNC_FREE[case]()
    g = torch.Generator().manual_seed(0)
    shape = (2, 8, 1024, 64)  # (B, H, L, E)
    q, k, v, do = (torch.randn(shape, generator=g).to(DEV, torch.bfloat16) for _ in "qkvo")
    q, k, v = (t.requires_grad_(grad) for t in (q, k, v))

    def call() -> list[Tensor]:
        out = attnlab.attention(q, k, v, mask=mask, bias=bias, engine="sdpa")
        return [out, *torch.autograd.grad(out, (q, k, v), do)] if grad else [out]

    want = call()
    monkeypatch.setattr(get_engine("sdpa"), "_masks", DenseCache())
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        got, again = call(), call()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for a, b, c in zip(got, want, again, strict=True):  # (backward kernels may add atomically)
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2)
        torch.testing.assert_close(c, b, rtol=2e-2, atol=2e-2)
    if case.startswith("padding"):  # item 1's rows from 600 on see nothing: 0
        assert got[0][1, :, 600:].abs().max().item() == 0.0


def test_padding_lengths_on_the_device_changed_in_place_are_checked() -> None:
    """Lengths held on the device are read with the construction's check; changed in
    place there they were taken unchecked (a length past ``Lk`` passed): read again,
    once per change."""
    lengths = torch.tensor([3, 2], device=DEV)
    mask = M.padding(lengths)
    q = torch.randn(2, 1, 3, 8, device=DEV)
    attnlab.attention(q, q, q, mask=mask)
    lengths[0] = 5
    with pytest.raises(ValueError, match=r"key_lengths=\[5, 2\] but the call has Lk=3"):
        attnlab.attention(q, q, q, mask=mask)
    assert mask.natural_length == 5
    lengths[0] = 1
    attnlab.attention(q, q, q, mask=mask)
