"""Every engine against an fp64 eager reference, with flash-attn's 2x error rule."""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

import attnlab
from attnlab import bias as B
from attnlab import masks as M
from attnlab.engines import available_engines
from attnlab.engines import blocked_autograd as blocked_mod
from tests.conftest import assert_2x_rule, check_and_control, max_err, naive_attention

# flex: FlexAttention has no CPU backward, and these tests take gradients (forward on the
# CPU: tests/test_flex.py; forward and backward on CUDA: tests/test_gpu.py).
EXACT = [name for name, eng in available_engines().items() if eng.exact and name != "flex"]
# approximations: tests/test_approximate.py
ENGINES = ["auto", *EXACT, "blocked-torch", "blocked-eager"]


@pytest.fixture(params=ENGINES)
def engine(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every engine. "blocked" runs attnlab's compiled kernel where it can; "blocked-torch"
    is the blocked engine on torch's fused kernel per block, "blocked-eager" on neither."""
    if request.param in ("blocked-torch", "blocked-eager"):
        monkeypatch.setattr(blocked_mod, "USE_KERNEL", False)
        monkeypatch.setattr(blocked_mod, "USE_FUSED", request.param == "blocked-torch")
        return "blocked"
    if request.param == "blocked" and blocked_mod.kernel() is None:
        pytest.skip(f"attnlab's CPU kernel could not be built: {blocked_mod.kernel_error()}")
    return str(request.param)


def _doc_ids(n: int) -> Tensor:
    return torch.arange(n) * 5 // max(n, 1)  # 5 contiguous documents


def _mask_cases() -> dict[str, Callable[[int, int, int], M.Mask]]:
    """name -> factory(batch, lq, lk)."""
    return {
        "causal": lambda b, lq, lk: M.causal(),
        "window": lambda b, lq, lk: M.window(16) & M.causal(),
        "window_bidir": lambda b, lq, lk: M.window(8, 8),
        "padding": lambda b, lq, lk: M.padding([lk // 2 + 1] + [lk] * (b - 1)),
        "query_padding": lambda b, lq, lk: M.padding([lk] * b, [max(lq - 3, 0)] * b),
        "documents": lambda b, lq, lk: M.documents(_doc_ids(lk)),
        "documents_causal": lambda b, lq, lk: M.documents(_doc_ids(lk)) & M.causal(),
        "prefix": lambda b, lq, lk: M.prefix(20),
        "global_window": lambda b, lq, lk: M.global_tokens([0, 5]) | M.window(4, 4),
        "dilated": lambda b, lq, lk: M.dilated(12, 3),
        "block_random": lambda b, lq, lk: M.block_random(16, 2, seed=1) & M.causal(),
        "custom": lambda b, lq, lk: M.custom(lambda bb, h, q, k: (q + k + h) % 3 != 0),
        "not_window": lambda b, lq, lk: ~M.window(3, 3),
        "tensor": lambda b, lq, lk: M.tensor(torch.rand(lq, lk) > 0.3),
    }


MASKS = _mask_cases()
MASK_SIZES = [(1, 1, 40), (1, 97, 59), (97, 97, 64), (127, 130, 111)]


def _qkv(
    b: int, hq: int, hkv: int, lq: int, lk: int, e: int, dtype: torch.dtype, ev: int | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    q = torch.randn(b, hq, lq, e, dtype=dtype)
    k = torch.randn(b, hkv, lk, e, dtype=dtype)
    v = torch.randn(b, hkv, lk, ev or e, dtype=dtype)
    return q, k, v


def _leaf(*ts: Tensor) -> list[Tensor]:
    return [t.detach().clone().requires_grad_() for t in ts]


def _check_engine(
    engine: str,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    mask: M.Mask | None = None,
    bias: B.Bias | None = None,
    normalize: str = "softmax",
    grads: bool = True,
) -> None:
    """Compare engine output and gradients with plain PyTorch under the 2x rule."""
    b, hq, lq, _ = q.shape
    lk, dtype = k.shape[2], q.dtype
    allowed = None if mask is None else mask.dense(lq, lk, batch=b, heads=hq)
    bias64 = None if bias is None else copy.deepcopy(bias).double()
    runs = {}
    for tag, dt, bmod in (
        ("ours", dtype, bias),
        ("plain", dtype, bias),
        ("ref", torch.float64, bias64),
    ):
        qq, kk, vv = _leaf(q.to(dt), k.to(dt), v.to(dt))
        if tag == "ours":
            out = attnlab.attention(
                qq, kk, vv, mask=mask, bias=bmod, normalize=normalize, engine=engine
            )
        else:
            dense_bias = None if bmod is None else bmod.dense(lq, lk, batch=b, heads=hq)
            out, _ = naive_attention(
                qq, kk, vv, allowed=allowed, bias=dense_bias, normalizer=normalize
            )
        assert isinstance(out, Tensor)
        params = list(bmod.parameters()) if bmod is not None else []
        tensors = [out]
        if grads and out.numel():
            for p_ in params:
                p_.grad = None
            gout = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(dt)
            out.backward(gout)
            tensors += [qq.grad, kk.grad, vv.grad, *[p_.grad for p_ in params]]
        runs[tag] = tensors
    names = ["out", "dq", "dk", "dv", "dbias", "dbias2"]
    for i, (o, p, r) in enumerate(zip(runs["ours"], runs["plain"], runs["ref"], strict=True)):
        assert o is not None and p is not None and r is not None, names[i]
        assert not torch.isnan(o).any(), f"{names[i]} has NaN"
        assert_2x_rule(o, p, r, f"{engine} {names[i]}")


@pytest.mark.parametrize("mask_name", list(MASKS))
@pytest.mark.parametrize("lq,lk,e", MASK_SIZES)
def test_masks_every_engine(engine: str, mask_name: str, lq: int, lk: int, e: int) -> None:
    if mask_name.startswith("documents") and lq > lk:
        pytest.skip("documents need Lq <= Lk")
    q, k, v = _qkv(2, 4, 2, lq, lk, e, torch.float32)
    _check_engine(engine, q, k, v, mask=MASKS[mask_name](2, lq, lk))


def _bias_cases(h: int, lq: int, lk: int) -> dict[str, B.Bias]:
    table = torch.randn(h, lq, lk, requires_grad=True)
    return {
        "alibi": B.alibi(h),
        "t5": B.relative_buckets(h, num_buckets=16, max_distance=64),
        "learned": B.learned_relative(h, max_distance=20),
        "custom": B.custom(lambda hh, q, k: torch.sin(0.1 * (q - k) + hh)),
        "tensor": B.tensor(table),
        "alibi+t5": B.alibi(h) + B.relative_buckets(h, num_buckets=8, max_distance=32),
    }


@pytest.mark.parametrize("bias_name", list(_bias_cases(4, 2, 2)))
@pytest.mark.parametrize("masked", [False, True])
def test_biases_every_engine(engine: str, bias_name: str, masked: bool) -> None:
    lq, lk = 97, 127
    bias = _bias_cases(4, lq, lk)[bias_name]
    for p in bias.parameters():  # learned tables start random so gradients are not trivial
        torch.nn.init.normal_(p)
    q, k, v = _qkv(2, 4, 1, lq, lk, 64, torch.float32)
    _check_engine(engine, q, k, v, mask=M.causal() if masked else None, bias=bias)


AWKWARD = [(1, 1), (1, 1025), (97, 127), (127, 97), (1023, 1025), (1025, 1023)]


@pytest.mark.parametrize("lq,lk", AWKWARD)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("causal", [False, True])
def test_awkward_sizes(engine: str, lq: int, lk: int, dtype: torch.dtype, causal: bool) -> None:
    e = {1: 40, 97: 59, 127: 111, 1023: 64, 1025: 64}[lq]
    q, k, v = _qkv(1, 2, 1, lq, lk, e, dtype)
    _check_engine(engine, q, k, v, mask=M.causal() if causal else None, grads=lq * lk < 2e5)


def test_autocast_runs_in_its_dtype_as_torch_sdpa_does(engine: str) -> None:
    """Under ``torch.autocast`` q, k and v of mixed float32 / bfloat16 (RoPE'd q and k, a
    projected v) run in bfloat16, as torch SDPA takes them: same dtype out, and the 2x
    rule against fp64 next to plain PyTorch in bfloat16, gradients back in float32."""
    q64, k64, v64 = _qkv(2, 4, 2, 200, 200, 32, torch.float64)
    mask = M.causal() & M.window(50)
    ref, _ = naive_attention(q64, k64, v64, allowed=mask.dense(200, 200))
    bf = [t.bfloat16() for t in (q64, k64, v64)]
    plain, _ = naive_attention(*bf, allowed=mask.dense(200, 200))
    q, k = (t.float().requires_grad_() for t in (q64, k64))
    v = v64.bfloat16().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = attnlab.attention(q, k, v, mask=mask, engine=engine)
        kk, vv = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
        want = F.scaled_dot_product_attention(q, kk, vv, attn_mask=mask.dense(200, 200))
    assert isinstance(out, Tensor) and out.dtype == want.dtype == torch.bfloat16
    assert_2x_rule(out, plain, ref, f"{engine} under autocast")
    out.float().sum().backward()
    assert q.grad is not None and q.grad.dtype == torch.float32 and torch.isfinite(q.grad).all()


@pytest.mark.parametrize("normalize", ["softmax", "sparsemax"])
def test_autocast_leaves_bfloat16_inputs_as_they_run_without_it(normalize: str) -> None:
    """(Under autocast the reference engine's float32 steps ran as bfloat16 matmuls again:
    4.7x torch SDPA's error on bfloat16 q, k, v with no mask, and so for every call auto
    gives it: weights below 1024 keys, sparsemax.) Inputs already in autocast's dtype give
    what they give without it, bit for bit; torch SDPA is the control."""
    q, k, v = (t.bfloat16() for t in _qkv(2, 4, 4, 300, 300, 32, torch.float32))
    out = attnlab.attention(q, k, v, normalize=normalize, return_weights=True)
    want_sdpa = F.scaled_dot_product_attention(q, k, v)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = attnlab.attention(q, k, v, normalize=normalize, return_weights=True)
        assert torch.equal(F.scaled_dot_product_attention(q, k, v), want_sdpa)
    assert torch.equal(got.out, out.out) and torch.equal(got.weights, out.weights)


def test_a_callable_score_runs_under_the_callers_autocast() -> None:
    """A score with a float32 Linear under autocast: the reference engine's float32 steps
    turn autocast off, and the score still runs under it (a float32 Linear met bfloat16 q:
    "expected m1 and m2 to have the same dtype"); 2x rule next to the same steps in torch."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(16, 16, bias=False)
    q, k, v = _qkv(2, 2, 2, 40, 40, 16, torch.float32)
    with torch.no_grad():  # fp64: the score's own steps, then softmax and sum
        s64 = (q.double() @ lin.weight.double().T) @ k.double().transpose(-1, -2)
        ref = s64.softmax(-1) @ v.double()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = attnlab.attention(q, k, v, score=lambda a, b: lin(a) @ b.transpose(-1, -2))
        plain = (lin(q.bfloat16()) @ k.bfloat16().transpose(-1, -2)).softmax(-1) @ v.bfloat16()
    assert out.dtype == torch.bfloat16
    assert_2x_rule(out, plain, ref, "a callable score under autocast")


@pytest.mark.parametrize("normalize", ["sparsemax", "entmax15"])
@pytest.mark.parametrize("mask_name", ["causal", "padding", "documents", "global_window"])
def test_sparse_normalizers_against_entmax(normalize: str, mask_name: str) -> None:
    q, k, v = _qkv(2, 4, 2, 33, 40, 16, torch.float32)
    q = q * 3  # peaky scores so the supports are small
    _check_engine("auto", q, k, v, mask=MASKS[mask_name](2, 33, 40), normalize=normalize)


@pytest.mark.parametrize("ratio", [(4, 2), (4, 1), (3, 3)])
def test_gqa_equals_repeated_heads(ratio: tuple[int, int]) -> None:
    hq, hkv = ratio
    q, k, v = _qkv(2, hq, hkv, 9, 11, 8, torch.float64)
    g = hq // hkv
    for engine in EXACT:
        ours = attnlab.attention(q, k, v, mask=M.causal(), engine=engine)
        full = attnlab.attention(
            q,
            k.repeat_interleave(g, 1),
            v.repeat_interleave(g, 1),
            mask=M.causal(),
            engine="reference",
        )
        assert isinstance(ours, Tensor) and isinstance(full, Tensor)
        assert max_err(ours, full) < 1e-12


def test_weights_and_lse_match_plain_pytorch() -> None:
    q, k, v = _qkv(2, 4, 2, 37, 50, 16, torch.float64)
    mask = M.window(5, 2) & M.padding([50, 20])
    bias = B.alibi(4)
    r = attnlab.attention(q, k, v, mask=mask, bias=bias, return_weights=True, return_lse=True)
    assert isinstance(r, attnlab.AttentionOutput)
    allowed = mask.dense(37, 50, batch=2, heads=4)
    dense_bias = bias.dense(37, 50, heads=4).double()
    out, w = naive_attention(q, k, v, allowed=allowed, bias=dense_bias)
    s = torch.einsum("bhqe,bhke->bhqk", q, k.repeat_interleave(2, 1)) / 4 + dense_bias
    lse = torch.logsumexp(s.masked_fill(~allowed, float("-inf")), dim=-1)
    assert r.weights is not None and r.lse is not None
    assert max_err(r.out, out) < 1e-12 and max_err(r.weights, w) < 1e-12
    assert max_err(r.lse, lse) < 1e-12


@pytest.mark.parametrize("normalize", ["softmax", "sparsemax", "entmax15"])
def test_gradcheck_reference(normalize: str) -> None:
    q, k, v = (t.requires_grad_() for t in _qkv(1, 2, 1, 5, 6, 4, torch.float64))
    table = torch.randn(2, 5, 6, dtype=torch.float64, requires_grad=True)
    mask = M.causal() & M.padding([5])

    def fn(q: Tensor, k: Tensor, v: Tensor, t: Tensor) -> Tensor:
        out = attnlab.attention(q, k, v, mask=mask, bias=t, normalize=normalize, engine="reference")
        assert isinstance(out, Tensor)
        return out

    assert torch.autograd.gradcheck(fn, (q * 2, k, v, table))


@pytest.mark.parametrize("engine", ["sdpa", "reference", "blocked"])
def test_gradcheck_learnable_bias(engine: str) -> None:
    q, k, v = (t.requires_grad_() for t in _qkv(1, 2, 2, 4, 6, 4, torch.float64))
    t5 = B.relative_buckets(2, num_buckets=8, max_distance=8).double()
    torch.nn.init.normal_(t5.table)
    (table,) = t5.parameters()

    def fn(q: Tensor, k: Tensor, v: Tensor, _: Tensor) -> Tensor:
        out = attnlab.attention(q, k, v, mask=M.window(2, 1), bias=t5, engine=engine)
        assert isinstance(out, Tensor)
        return out

    assert torch.autograd.gradcheck(fn, (q, k, v, table))


@pytest.mark.parametrize("normalize", ["softmax", "sparsemax", "entmax15"])
def test_fully_masked_rows_give_zero_and_finite_grads(engine: str, normalize: str) -> None:
    if engine in ("sdpa", "blocked") and normalize != "softmax":
        pytest.skip(f"{engine} is softmax only")
    q, k, v = _leaf(*_qkv(2, 2, 2, 6, 6, 8, torch.float32))
    mask = M.padding([0, 6], [6, 3]) & M.causal()  # batch 0: no keys; batch 1: 3 query rows
    out = attnlab.attention(q, k, v, mask=mask, normalize=normalize, engine=engine)
    assert isinstance(out, Tensor)
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    assert torch.equal(out[1, :, 3:], torch.zeros_like(out[1, :, 3:]))
    out.sum().backward()
    for g in (q.grad, k.grad, v.grad):
        assert g is not None and torch.isfinite(g).all()
    assert q.grad is not None and torch.equal(q.grad[0], torch.zeros_like(q.grad[0]))
    assert torch.equal(q.grad[1, :, 3:], torch.zeros_like(q.grad[1, :, 3:]))


@pytest.mark.parametrize("scale", [0.0, -0.5])
def test_a_scale_of_zero_or_below_follows_fp64(engine: str, scale: float) -> None:
    """Scale 0 (uniform weights over the allowed keys) and a negative scale, square causal
    included, where torch SDPA's ``is_causal`` kernel gives NaN rows."""
    q, k, v = _qkv(1, 2, 2, 40, 40, 8, torch.float64)
    for mask in (M.causal(), M.causal() & M.window(8)):
        ref, _ = naive_attention(q, k, v, allowed=mask.dense(40, 40), scale=scale)
        out = attnlab.attention(q.float(), k.float(), v.float(), mask=mask, scale=scale,
                                engine=engine)  # fmt: skip
        assert max_err(out, ref) < 1e-5, mask.spec()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_the_reference_engine_in_half_precision_keeps_torch_sdpas_error(
    dtype: torch.dtype,
) -> None:
    """Half-precision inputs are computed in float32 (``auto`` sends weights requests
    there): the error stays within 2x of torch SDPA's in the same dtype at peaky scores
    (std 16), where bfloat16 scores were 19x, and float16's unscaled q k^T (> 65504)
    no longer overflows."""
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 4, 64, 64, generator=g, dtype=torch.float64) for _ in "qkv")
    q, k = q * 4, k * 4  # scaled scores of std 16
    ref, _ = naive_attention(q, k, v)
    low = [t.to(dtype) for t in (q, k, v)]
    anchor = F.scaled_dot_product_attention(*low)
    r = attnlab.attention(*low, engine="reference", return_weights=True)
    assert r.out.dtype == r.weights.dtype == dtype  # type: ignore[union-attr]
    assert_2x_rule(r.out, anchor, ref, f"reference {dtype}")
    _, w_rounded = naive_attention(*(t.double() for t in low))  # the same inputs in fp64
    assert max_err(r.weights, w_rounded) <= torch.finfo(dtype).eps  # type: ignore[arg-type]
    big = torch.randn(1, 1, 4, 128, generator=g, dtype=torch.float64) * 24
    out = attnlab.attention(big.half(), big.half(), v[:, :1, :4, :].half().repeat(1, 1, 1, 2),
                            engine="reference")  # fmt: skip
    want, _ = naive_attention(big, big, v[:, :1, :4, :].repeat(1, 1, 1, 2))
    assert isinstance(out, Tensor) and max_err(out, want) < 1e-2


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_a_score_layer_in_half_precision_gets_q_and_k_in_its_dtype(dtype: torch.dtype) -> None:
    """Luong's "general" score as a half-precision ``nn.Linear``: it was called with the
    float32 copies the engine computes in, and raised torch's bare "expected m1 and m2 to
    have the same dtype". Output and gradients keep the 2x rule against plain PyTorch."""
    g = torch.Generator().manual_seed(5)
    layer = torch.nn.Linear(16, 16, bias=False)
    q, k, v = (torch.randn(1, 2, 40, 16, generator=g, dtype=torch.float64) for _ in "qkv")

    def run(dt: torch.dtype, attend: Callable[..., Tensor]) -> tuple[Tensor, ...]:
        w = layer.to(dt)
        w.zero_grad()
        xs = [t.detach().to(dt).requires_grad_() for t in (q, k, v)]
        out = attend(*xs, lambda a, b: a @ w(b).mT)
        out.backward(torch.ones_like(out))
        return (out.detach(), *(x.grad for x in xs), w.weight.grad)  # type: ignore[return-value]

    def plain(a: Tensor, b: Tensor, c: Tensor, score: Callable) -> Tensor:
        return torch.softmax(score(a, b).float(), -1).to(a.dtype) @ c

    ref = run(torch.float64, plain)
    anchor = run(dtype, plain)
    got = run(dtype, lambda a, b, c, score: attnlab.attention(a, b, c, score=score))
    assert got[0].dtype == dtype
    for name, x, y, z in zip(("out", "dq", "dk", "dv", "dW"), got, anchor, ref, strict=True):
        assert_2x_rule(x, y, z, f"{name} {dtype}")


def test_fully_masked_rows_weights_and_lse() -> None:
    q, k, v = _qkv(1, 1, 1, 4, 3, 8, torch.float32)  # Lq > Lk: the first row sees nothing
    r = attnlab.attention(q, k, v, mask=M.causal(), return_weights=True, return_lse=True)
    assert isinstance(r, attnlab.AttentionOutput) and r.weights is not None
    assert r.lse is not None and r.lse[0, 0, 0] == float("-inf")
    assert torch.equal(r.weights[0, 0, 0], torch.zeros(3)) and torch.equal(
        r.out[0, 0, 0], torch.zeros(8)
    )


def test_nan_input_stays_nan(engine: str) -> None:
    q, k, v = _qkv(1, 2, 2, 5, 5, 8, torch.float32)
    q[0, 0, 2, 0] = float("nan")
    if engine == "sdpa":  # its fused kernels zero NaN rows, so it declines such input
        with pytest.raises(ValueError, match=r"NaN.*Engines that can: 'reference'"):
            attnlab.attention(q, k, v, engine=engine)
        return
    out = attnlab.attention(q, k, v, engine=engine)
    assert isinstance(out, Tensor)
    assert torch.isnan(out[0, 0, 2]).all() and not torch.isnan(out[0, 1]).any()


@pytest.mark.parametrize("which", ["k", "v"])
def test_nan_in_a_hidden_key_or_value_reaches_only_the_rows_that_see_it(
    engine: str, which: str
) -> None:
    """NaN in a key/value the mask hides (an uninitialized cache slot, say) stays out of
    the rows that do not see it and out of fully masked rows; the rows that see it get
    NaN, as an fp64 computation without a mask gives them. (sdpa screens for it on the
    CPU from 16 query rows on, and declines: not in decoding steps or on a GPU.)"""
    q, k, v = (t.double() for t in _qkv(1, 2, 1, 20, 40, 8, torch.float32))
    {"k": k, "v": v}[which][0, 0, 30, 3] = float("nan")
    allowed = torch.zeros(1, 1, 20, 40, dtype=torch.bool)
    allowed[..., :18, :25] = True  # rows 18 and 19: no key
    allowed[..., :2, 30] = True  # rows 0 and 1 see key 30
    mask = M.tensor(allowed)
    if engine == "sdpa":  # it spreads a hidden key's NaN: it declines
        with pytest.raises(ValueError, match="spreads to rows the mask hides it from"):
            attnlab.attention(q.float(), k.float(), v.float(), mask=mask, engine=engine)
        return
    ref, _ = naive_attention(q, k.nan_to_num(0.0), v.nan_to_num(0.0), allowed=allowed)
    out = attnlab.attention(q.float(), k.float(), v.float(), mask=mask, engine=engine)
    sees = allowed[0, 0, :, 30]  # (Lq,): the rows that read key 30
    assert isinstance(out, Tensor) and bool(out[:, :, sees].isnan().any(-1).all())
    assert max_err(out[:, :, ~sees], ref[:, :, ~sees]) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("lq,lk", [(1, 16), (1, 2049), (3, 40), (40, 40)])
def test_sdpa_keeps_nan_from_16_keys(lq: int, lk: int, dtype: torch.dtype) -> None:
    """The sdpa engine skips its NaN screen from 16 keys on (the decoding step's cost):
    this pins that torch's kernels then pass every NaN on to the rows that read it, as
    an fp64 computation does; below 16 keys it still declines NaN input."""
    masks = [None, M.causal(), M.padding([lk - 3, lk])] if lq > 1 else [None]
    for mask, which, pos in itertools.product(masks, range(3), (0, lk // 2, lk - 1)):
        qkv = list(_qkv(2, 4, 2, lq, lk, 64, dtype))
        qkv[which][1, 1, min(pos, qkv[which].shape[2] - 1), 5] = float("nan")
        if mask is not None and which > 0 and lq >= 16:  # a hidden NaN would spread
            with pytest.raises(ValueError, match="spreads to rows the mask hides it from"):
                attnlab.attention(*qkv, mask=mask, engine="sdpa")
            continue
        out = attnlab.attention(*qkv, mask=mask, engine="sdpa")
        want = attnlab.attention(*(t.double() for t in qkv), mask=mask, engine="reference")
        assert isinstance(out, Tensor) and isinstance(want, Tensor)
        assert want.isnan().any() and not (want.isnan() & ~out.isnan()).any()
    q, k, v = _qkv(1, 2, 2, 4, 15, 8, dtype)
    k[0, 0, 3, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        attnlab.attention(q, k, v, engine="sdpa")


@pytest.mark.parametrize("b,lq,lk", [(0, 4, 4), (2, 0, 4), (2, 4, 0)])
def test_empty_inputs(b: int, lq: int, lk: int) -> None:
    q, k, v = _leaf(*_qkv(b, 2, 1, lq, lk, 8, torch.float32, ev=6))
    r = attnlab.attention(q, k, v, mask=M.causal(), return_weights=True, return_lse=True)
    assert isinstance(r, attnlab.AttentionOutput) and r.weights is not None
    assert r.out.shape == (b, 2, lq, 6) and r.weights.shape == (b, 2, lq, lk)
    assert torch.equal(r.out, torch.zeros_like(r.out))
    r.out.sum().backward()
    assert q.grad is not None and torch.equal(q.grad, torch.zeros_like(q.grad))


@pytest.mark.parametrize("engine", ["auto", "reference"])  # sdpa and blocked decline B = 0
def test_an_empty_batch_with_a_bool_mask_tensor(engine: str) -> None:
    """(A ``(0, 1, Lq, Lk)`` bool tensor was taken for a batch of 1 and broadcast to it:
    "The expanded size of the tensor (1) must match the existing size (0)".)"""
    q, k, v = _leaf(*_qkv(0, 2, 2, 3, 5, 8, torch.float32))
    keep = torch.ones(0, 1, 3, 5, dtype=torch.bool)
    out = attnlab.attention(q, k, v, mask=keep, engine=engine)
    assert isinstance(out, Tensor) and out.shape == (0, 2, 3, 8)
    out.sum().backward()
    assert q.grad is not None and q.grad.shape == q.shape
    scores = torch.randn(0, 1, 3, 5)
    assert attnlab.attend(scores, torch.randn(0, 1, 5, 4), mask=keep).shape == (0, 1, 3, 4)
    with pytest.raises(ValueError, match=r"does not broadcast to \(B, H, Lq, Lk\) = \(2, "):
        attnlab.attention(*_qkv(2, 2, 2, 3, 5, 8, torch.float32), mask=keep)  # 0 is not 1
    # combined with another mask, it is read on the grid: its empty batch was taken for a
    # broadcast one and indexed at 0 (IndexError); so was an empty query axis
    for mask in (M.causal() & keep, M.tensor(keep) | M.prefix(2), ~M.tensor(keep)):
        assert attnlab.attention(q, k, v, mask=mask, engine=engine).shape == (0, 2, 3, 8)
    rows = M.global_tokens([1]) | torch.ones(1, 1, 0, 5, dtype=torch.bool)
    q0, k1 = torch.randn(1, 2, 0, 8), torch.randn(1, 2, 5, 8)
    assert attnlab.attention(q0, k1, k1, mask=rows, engine=engine).shape == (1, 2, 0, 8)


def test_batch_of_one_broadcasts() -> None:
    q, k, v = _qkv(3, 2, 2, 5, 7, 8, torch.float64)
    out = attnlab.attention(q, k[:1], v[:1], mask=M.padding([7, 3, 1]))
    full = attnlab.attention(
        q,
        k[:1].expand(3, -1, -1, -1),
        v[:1].expand(3, -1, -1, -1),
        mask=M.padding([7, 3, 1]),
        engine="reference",
    )
    assert isinstance(out, Tensor) and isinstance(full, Tensor)
    assert out.shape == (3, 2, 5, 8) and max_err(out, full) < 1e-12


def test_cosine_and_callable_scores() -> None:
    q, k, v = _qkv(1, 2, 2, 5, 7, 8, torch.float64)
    qn, kn = torch.nn.functional.normalize(q, dim=-1), torch.nn.functional.normalize(k, dim=-1)
    want, _ = naive_attention(qn, kn, v, scale=10.0)
    got = attnlab.attention(q, k, v, score="cosine", scale=10.0)
    assert isinstance(got, Tensor) and max_err(got, want) < 1e-12
    w = torch.randn(8, 8, dtype=torch.float64)  # Luong's "general" score q W k^T

    def general(qq: Tensor, kk: Tensor) -> Tensor:
        return qq @ w @ kk.transpose(-1, -2)

    got = attnlab.attention(q, k, v, score=general, mask=M.causal())
    want, _ = naive_attention(q @ w, k, v, scale=1.0, allowed=M.causal().dense(5, 7))
    assert isinstance(got, Tensor) and max_err(got, want) < 1e-12
    with pytest.raises(
        ValueError, match=r"score: .* shape \(B, Hq, Lq, Lk\) = \(1, 2, 5, 7\), got \(1, 2, 1, 7\)"
    ):
        attnlab.attention(q, k, v, score=lambda a, b: general(a, b)[:, :, :1])
    with pytest.raises(TypeError, match="score: the callable must return a tensor"):
        attnlab.attention(q, k, v, score=lambda a, b: None)


@pytest.mark.parametrize("name", ["dot", "cosine"])
@pytest.mark.parametrize(("bq", "bk"), [(1, 2), (2, 1)])
def test_public_scores_broadcast_a_batch_of_one_under_gqa(name: str, bq: int, bk: int) -> None:
    """``attnlab.scores.dot`` / ``cosine`` with 4 query heads over 2 key heads and a batch
    of 1 on one side, against the keys repeated per group (fp64)."""
    from attnlab import scores

    q = torch.randn(bq, 4, 5, 8, dtype=torch.float64)
    k = torch.randn(bk, 2, 7, 8, dtype=torch.float64)
    qq, kk = q, k.repeat_interleave(2, dim=1)
    if name == "cosine":
        qq, kk = F.normalize(qq, dim=-1), F.normalize(kk, dim=-1)
    got = scores.SCORES[name](q, k)
    assert got.shape == (2, 4, 5, 7)
    assert max_err(got, qq @ kk.transpose(-1, -2)) < 1e-12


def test_public_scores_and_expand_kv_name_shapes_that_do_not_fit() -> None:
    """``expand_kv(x, 0)`` gave an empty head dim and ``expand_kv(x, -2)`` torch's error;
    ``dot`` / ``cosine`` with head dims 4 and 5 failed in bmm, with 3-D inputs in "not
    enough values to unpack". Now a ValueError naming the function, q and k and the shapes;
    the controls against the keys repeated by hand (fp64)."""
    from attnlab.scores import cosine, dot, expand_kv

    x = torch.randn(1, 2, 3, 4, dtype=torch.float64)
    for heads in (0, -2, 3):
        with pytest.raises(ValueError, match=rf"^expand_kv: heads={heads} must be a multiple "):
            expand_kv(x, heads)
    assert torch.equal(expand_kv(x, 4), x.repeat_interleave(2, dim=1))
    q, k = (
        torch.randn(2, 4, 3, 4, dtype=torch.float64),
        torch.randn(2, 2, 5, 4, dtype=torch.float64),
    )
    for fn in (dot, cosine):
        name = fn.__name__
        bad = (
            (
                q,
                torch.randn(2, 2, 5, 5),
                r"q and k must have the same head dim E; got q \(2, 4, 3, 4\) and k \(2, 2, 5, 5\)",
            ),
            (
                q[0],
                k[0],
                r"q and k must have rank 4, q \(B, Hq, Lq, E\) and k .*; got q \(4, 3, 4\)",
            ),
            (
                q[:, :3],
                k,
                r"q and k heads: query heads Hq=3 must be a multiple of key/value heads Hkv=2",
            ),
            (
                torch.randn(3, 4, 3, 4),
                k,
                r"q and k must have batch sizes that are equal or 1; got q \(3,",
            ),
        )
        for qq, kk, match in bad:
            with pytest.raises(ValueError, match=f"^{name}: {match}"):
                fn(qq, kk)
        with pytest.raises(TypeError, match=f"^{name}: k must be a torch.Tensor, got list"):
            fn(q, [[1.0]])  # type: ignore[arg-type]
        qq, kk = q, k.repeat_interleave(2, dim=1)
        if name == "cosine":
            qq, kk = F.normalize(qq, dim=-1), F.normalize(kk, dim=-1)
        assert max_err(fn(q, k), qq @ kk.transpose(-1, -2)) < 1e-12


def test_attend_precomputed_scores() -> None:
    q, k, v = _qkv(2, 4, 2, 6, 9, 8, torch.float64)
    scores = torch.einsum("bhqe,bhke->bhqk", q, k.repeat_interleave(2, 1)) * 0.3
    allowed = M.window(2).dense(6, 9)
    r = attnlab.attend(scores, v, mask=allowed, return_weights=True)
    want, w = naive_attention(q, k, v, scale=0.3, allowed=allowed)
    assert isinstance(r, attnlab.AttentionOutput) and r.weights is not None
    assert max_err(r.out, want) < 1e-12 and max_err(r.weights, w) < 1e-12


@pytest.mark.parametrize("grad", [False, True])
def test_the_reference_engine_writes_only_into_scores_it_made(grad: bool) -> None:
    """It scales, caps, biases and masks its own scores in place: gradients of q, k, v
    and a tensor bias still follow fp64 autograd, and scores a callable or ``attend`` was
    given are left as they were."""
    q, k, v = (t.requires_grad_(grad) for t in _qkv(2, 4, 2, 6, 9, 8, torch.float64))
    bias = torch.randn(1, 4, 6, 9, dtype=torch.float64, requires_grad=grad)
    kw = {"softcap": 2.0, "scale": 0.7, "mask": M.causal()}
    got = attnlab.attention(q, k, v, bias=bias, engine="reference", **kw)
    want, _ = naive_attention(
        q, k, v, bias=bias, softcap=2.0, scale=0.7, allowed=M.causal().dense(6, 9)
    )
    assert isinstance(got, Tensor) and max_err(got, want) < 1e-12
    if grad:
        dout = torch.randn_like(want)
        ours = torch.autograd.grad(got, (q, k, v, bias), dout)
        ref = torch.autograd.grad(want, (q, k, v, bias), dout)
        assert all(max_err(a, b) < 1e-12 for a, b in zip(ours, ref, strict=True))
    kept = torch.randn(2, 4, 6, 9, dtype=torch.float64)
    before = kept.clone()
    attnlab.attention(q, k, v, score=lambda a, b: kept, engine="reference", **kw)
    attnlab.attend(kept, v, mask=M.causal())
    assert torch.equal(kept, before)
    biases = torch.randn(3, 1, 4, 6, 9, dtype=torch.float64)  # vmapped alone: the scores
    with torch.no_grad():  # are not, and cannot take a batched bias or mask in place
        got = torch.func.vmap(
            lambda b: attnlab.attention(q, k, v, bias=b, engine="reference", **kw)
        )(biases)
        want = torch.stack([attnlab.attention(q, k, v, bias=b, **kw) for b in biases])
    assert max_err(got, want) < 1e-12


@pytest.mark.parametrize("engine", ["reference", "sdpa"])
def test_dropout_reproducible_and_unbiased(engine: str) -> None:
    q, k, v = _qkv(1, 2, 2, 16, 16, 8, torch.float64)

    def run(seed: int) -> Tensor:
        torch.manual_seed(seed)
        out = attnlab.attention(q, k, v, mask=M.causal(), dropout_p=0.3, engine=engine)
        assert isinstance(out, Tensor)
        return out

    assert torch.equal(run(1), run(1)) and not torch.equal(run(1), run(2))
    mean = torch.stack([run(s) for s in range(400)]).mean(0)
    exact = attnlab.attention(q, k, v, mask=M.causal())
    assert isinstance(exact, Tensor)
    assert max_err(mean, exact) < 0.25  # 400 draws: the mean approaches the exact output


def test_reference_dropout_is_dropout_of_weights() -> None:
    q, k, v = _qkv(1, 2, 2, 8, 8, 4, torch.float64)
    torch.manual_seed(7)
    got = attnlab.attention(q, k, v, dropout_p=0.5, engine="reference")
    _, w = naive_attention(q, k, v)
    torch.manual_seed(7)
    want = torch.nn.functional.dropout(w, 0.5) @ v
    assert isinstance(got, Tensor) and max_err(got, want) < 1e-12


def test_auto_picks_an_engine_that_can() -> None:
    from attnlab.engines import AttentionRequest, select_engine

    q, k, v = _qkv(1, 2, 2, 4, 4, 8, torch.float32)

    def req(**kw: object) -> AttentionRequest:
        base: dict[str, object] = dict(
            q=q,
            k=k,
            v=v,
            mask=None,
            bias=None,
            scale=1.0,
            score="dot",
            normalize="softmax",
            dropout_p=0.0,
            return_weights=False,
            return_lse=False,
        )
        base.update(kw)
        return AttentionRequest(**base)  # type: ignore[arg-type]

    assert select_engine("auto", req()).name == "sdpa"
    assert select_engine("auto", req(return_weights=True)).name == "reference"
    assert select_engine("auto", req(normalize="entmax15")).name == "reference"
    with pytest.raises(ValueError, match=r"engine='sdpa' cannot compute.*weights.*'reference'"):
        select_engine("sdpa", req(return_weights=True))


def test_attend_scores_callables_and_dense_masks_check_what_torch_failed_on() -> None:
    """(torch's own errors: "The size of tensor a (3) must match ..." for a scores batch
    that does not fit v's, "expected scalar type Float but found Double" for a score
    callable of float64, an ``arange`` error for ``Mask.dense(-1, 4)``.)"""
    q, k, v = _qkv(2, 4, 2, 5, 6, 8, torch.float32)
    check_and_control(
        lambda: attnlab.attend(torch.randn(3, 4, 5, 6), v),
        lambda: attnlab.attend(torch.randn(1, 4, 5, 6), v),  # a batch of 1 broadcasts
        ValueError,
        r"scores \(B, Hq, Lq, Lk\) \(3, 4, 5, 6\) do not fit v .* batches that are equal or 1",
    )
    plain = attnlab.attention(q, k, v, score=lambda a, b: a @ b.mT, engine="reference")
    wide = attnlab.attention(q, k, v, score=lambda a, b: (a @ b.mT).double(), engine="reference")
    assert isinstance(wide, Tensor) and wide.dtype == torch.float32
    assert torch.equal(wide, plain)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="score: the callable must return float scores"):
        attnlab.attention(q, k, v, score=lambda a, b: (a @ b.mT).long())
    for bad in ((-1, 4), (4, -1)):
        with pytest.raises(ValueError, match=r"must be a nonnegative int|must be an int >= 0"):
            M.causal().dense(*bad)
    assert M.causal().dense(0, 4).shape == (1, 1, 0, 4)


def test_a_built_request_is_the_dataclass_its_init_makes() -> None:
    """``build_request`` fills the frozen request's fields without its ``__init__``: every
    field is given, and the object compares, hashes, replaces and refuses changes alike."""
    import dataclasses

    from attnlab._request import build_request
    from attnlab.engines import AttentionRequest

    q = torch.randn(1, 2, 3, 4)
    sinks = torch.zeros(2)
    req = build_request(
        q, q, q, M.causal(), None, 0.5, "dot", "softmax", 0.1, True, True,
        engine_options={"chunk": 2}, approximate=True, softcap=30.0, sinks=sinks,
    )  # fmt: skip
    names = [f.name for f in dataclasses.fields(AttentionRequest)]
    assert sorted(vars(req)) == sorted(names)
    made = AttentionRequest(**{n: getattr(req, n) for n in names})
    assert req == made and hash(req) == hash(made)
    assert dataclasses.replace(req, scale=1.0) == dataclasses.replace(made, scale=1.0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        req.scale = 1.0  # type: ignore[misc]
