"""MultiHeadAttention against torch.nn.MultiheadAttention, and cached decoding."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from attnlab import bias as B
from attnlab import masks
from attnlab.nn import KVCache, MultiHeadAttention
from attnlab.positional import RotaryEmbedding
from tests.conftest import assert_2x_rule, check_and_control, max_err

ENGINES = ["reference", "sdpa", "blocked", "auto"]


def _torch_pair(
    d: int, h: int, **kw: object
) -> tuple[nn.MultiheadAttention, nn.MultiheadAttention]:
    ref = nn.MultiheadAttention(d, h, batch_first=True, **kw).eval()  # type: ignore[arg-type]
    with torch.no_grad():  # non-zero biases so they are checked too
        for n, p in ref.named_parameters():
            if "bias" in n:
                p.normal_()
    return ref, copy.deepcopy(ref).double()


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("case", ["plain", "padding", "causal", "cross"])
def test_matches_torch_outputs_and_averaged_weights(engine: str, case: str) -> None:
    d, h, lq = 48, 6, 13
    lk = 17 if case == "cross" else lq
    ref, ref64 = _torch_pair(d, h)
    ours = MultiHeadAttention.from_torch(ref).eval()
    ours.engine = engine
    x, mem = torch.randn(3, lq, d), torch.randn(3, lk, d)
    lengths = torch.tensor([lk, 5, 1])
    kpm = torch.arange(lk)[None] >= lengths[:, None]  # torch: True = ignore
    tmask = torch.triu(torch.ones(lq, lk, dtype=torch.bool), 1) if case == "causal" else None
    kw = {"key_padding_mask": kpm if case == "padding" else None, "attn_mask": tmask}
    mask = {"padding": masks.padding(lengths), "causal": masks.causal()}.get(case)
    key = mem if case == "cross" else x
    want, want_w = ref(x, key, key, **kw)
    want64, want64_w = ref64(x.double(), key.double(), key.double(), **kw)
    got, got_w = ours(x, key, key, mask=mask, need_weights=True, average_weights=True)
    assert_2x_rule(got, want, want64, f"{engine}/{case} out")
    assert_2x_rule(got_w, want_w, want64_w, f"{engine}/{case} weights")


def test_per_head_weights_and_gradients_match_torch() -> None:
    ref, ref64 = _torch_pair(32, 4)
    ours = MultiHeadAttention.from_torch(ref)
    x = torch.randn(2, 9, 32, requires_grad=True)
    x64 = x.detach().double().requires_grad_()
    out, w = ours(x, need_weights=True)
    want64, w64 = ref64(x64, x64, x64, average_attn_weights=False)
    assert w.shape == (2, 4, 9, 9) and max_err(w, w64) < 1e-5
    g = torch.randn_like(out)
    (out * g).sum().backward()
    (want64 * g.double()).sum().backward()
    assert max_err(x.grad, x64.grad) < 1e-4
    for (n, p), (_, p64) in zip(ours.named_parameters(), ref64.named_parameters(), strict=True):
        assert max_err(p.grad, p64.grad) < 1e-4, n


@pytest.mark.parametrize("bias", [True, False])
def test_kdim_vdim_and_no_bias_load_from_torch(bias: bool) -> None:
    ref = nn.MultiheadAttention(24, 3, kdim=10, vdim=7, bias=bias, batch_first=True).eval()
    ours = MultiHeadAttention.from_torch(ref)
    assert (ours.in_proj_bias is None) == (not bias)
    x, k, v = torch.randn(2, 5, 24), torch.randn(2, 8, 10), torch.randn(2, 8, 7)
    assert max_err(ours(x, k, v), ref(x, k, v)[0]) < 1e-5


def test_a_float64_torch_layer_is_copied_exactly_in_its_mode() -> None:
    """Made in float32 and loaded before moving, float64 weights were rounded (1.2e-7
    off), and an eval layer's copy trained (dropout on)."""
    ref = nn.MultiheadAttention(16, 4, dropout=0.5, batch_first=True, dtype=torch.float64)
    with torch.no_grad():
        ref.in_proj_weight.normal_()  # float64 values that float32 cannot hold
    ours = MultiHeadAttention.from_torch(ref.eval())
    assert not ours.training and max_err(ours.in_proj_weight, ref.in_proj_weight) == 0
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    assert max_err(ours(x), ref(x, x, x)[0]) < 1e-12
    assert MultiHeadAttention.from_torch(ref.train()).training


def test_a_value_without_a_key_is_refused() -> None:
    """It attended over the queries' own values, the value given unread."""
    mha, x = MultiHeadAttention(8, 2), torch.randn(1, 3, 8)
    check_and_control(
        lambda: mha(x, value=torch.randn(1, 3, 8)),
        lambda: mha(x, x, torch.randn(1, 3, 8)),
        ValueError,
        "value: given without key; pass key as well",
    )


def test_rope_that_is_not_a_rotary_embedding_is_named_when_built() -> None:
    check_and_control(
        lambda: MultiHeadAttention(16, 4, rope=4),  # type: ignore[arg-type]
        lambda: MultiHeadAttention(16, 4, rope=RotaryEmbedding(4)),
        TypeError,
        "rope must be an attnlab.positional.RotaryEmbedding or None, got int",
    )


def test_need_weights_with_an_engine_that_returns_none() -> None:
    mha = MultiHeadAttention(32, 4, engine="sdpa").eval()
    x = torch.randn(2, 11, 32)
    out, w = mha(x, mask=masks.window(3), bias=B.alibi(4), need_weights=True)
    mha.engine = "reference"
    out_ref, w_ref = mha(x, mask=masks.window(3), bias=B.alibi(4), need_weights=True)
    assert max_err(out, out_ref) < 1e-5 and max_err(w, w_ref) < 1e-6


@pytest.mark.parametrize("hkv", [4, 2, 1])
def test_gqa_equals_mha_with_repeated_kv_weights(hkv: int) -> None:
    """A GQA layer is an MHA layer whose k/v projection rows repeat per group."""
    d, h, e = 32, 4, 8
    gqa = MultiHeadAttention(d, h, num_kv_heads=hkv)
    mha = MultiHeadAttention(d, h)
    wq, wk, wv = gqa.in_proj_weight.split([h * e, hkv * e, hkv * e])
    bq, bk, bv = gqa.in_proj_bias.split([h * e, hkv * e, hkv * e])  # type: ignore[union-attr]

    def rep(t: torch.Tensor) -> torch.Tensor:
        return t.view(hkv, e, *t.shape[1:]).repeat_interleave(h // hkv, 0).flatten(0, 1)

    with torch.no_grad():
        mha.in_proj_weight.copy_(torch.cat([wq, rep(wk), rep(wv)]))
        mha.in_proj_bias.copy_(torch.cat([bq, rep(bk), rep(bv)]))  # type: ignore[union-attr]
        mha.out_proj.load_state_dict(gqa.out_proj.state_dict())
    x = torch.randn(2, 7, d)
    assert max_err(gqa(x, mask=masks.causal()), mha(x, mask=masks.causal())) < 1e-5


def _layer(hkv: int, rope: bool, qk_norm: bool) -> MultiHeadAttention:
    r = RotaryEmbedding(16, rotary_dim=8) if rope else None
    return MultiHeadAttention(64, 4, num_kv_heads=hkv, rope=r, qk_norm=qk_norm).eval()


@pytest.mark.parametrize(
    ("hkv", "rope", "qk_norm"), [(4, False, False), (2, True, True), (1, True, False)]
)
def test_cached_self_attention_equals_full_causal_pass(hkv: int, rope: bool, qk_norm: bool) -> None:
    mha = _layer(hkv, rope, qk_norm)
    x = torch.randn(2, 11, 64, dtype=torch.float64)
    mha = mha.double()
    full = mha(x, mask=masks.causal())
    cache = KVCache()
    chunks = [x[:, :4], x[:, 4:5], x[:, 5:9], x[:, 9:10], x[:, 10:]]  # prefill, then steps
    steps = [mha(c, mask=masks.causal(), cache=cache) for c in chunks]
    assert cache.length == 11
    assert max_err(torch.cat(steps, 1), full) < 1e-12


def test_cached_cross_attention_projects_memory_once() -> None:
    mha = MultiHeadAttention(32, 4, num_kv_heads=2).double().eval()
    x, mem = torch.randn(2, 6, 32).double(), torch.randn(2, 9, 32).double()
    pad = masks.padding(torch.tensor([9, 4]))
    full = mha(x, mem, mask=pad)
    cache = KVCache()
    steps = [
        mha(x[:, i : i + 1], mem if i == 0 else mem[:, :0], mask=pad, cache=cache) for i in range(6)
    ]
    assert max_err(torch.cat(steps, 1), full) < 1e-12


def test_beam_reorder_and_crop() -> None:
    mha = _layer(2, True, False).double()
    x = torch.randn(3, 8, 64).double()
    cache = KVCache()
    mha(x[:, :5], mask=masks.causal(), cache=cache)
    beams = torch.tensor([2, 0, 0, 1])  # beams survive, one of them twice
    cache.reorder(beams)
    step = mha(x[beams, 5:8], mask=masks.causal(), cache=cache)
    full = mha(x[beams], mask=masks.causal())
    assert max_err(step, full[:, 5:8]) < 1e-12
    cache.crop(6)  # drop two positions and decode them again
    again = mha(x[beams, 6:8], mask=masks.causal(), cache=cache)
    assert max_err(again, full[:, 6:8]) < 1e-12 and cache.length == 8


def test_a_cache_emptied_by_crop_takes_a_new_batch_and_refuses_a_new_head_size() -> None:
    """After ``crop(0)`` the next prompt may have another batch (it was broadcast over the
    old buffers); a step whose head size differs from the cached keys is named."""
    mha = _layer(2, True, False).double()
    x = torch.randn(3, 8, 64).double()
    cache = KVCache()
    mha(x[:2, :5], mask=masks.causal(), cache=cache)
    for batch in (x[:1], x):  # smaller, then larger than the cached batch of 2
        cache.crop(0)
        step = mha(batch[:, :4], mask=masks.causal(), cache=cache)
        assert step.shape == (len(batch), 4, 64) and cache.batch_size == len(batch)
        assert max_err(step, mha(batch[:, :4], mask=masks.causal())) < 1e-12
    k, v = cache.keys, cache.values
    assert k is not None and v is not None
    with pytest.raises(ValueError, match=r"keys of size E=\d+ .* new step has E=3"):
        cache.append(k[..., :3], v)


def test_rope_positions_argument_equals_cache_offset() -> None:
    mha = _layer(4, True, False).double()
    x = torch.randn(1, 6, 64).double()
    cache = KVCache()
    mha(x[:, :3], mask=masks.causal(), cache=cache)
    a = mha(x[:, 3:], mask=masks.causal(), cache=cache)
    cache2 = KVCache()
    mha(x[:, :3], mask=masks.causal(), cache=cache2, positions=torch.arange(3))
    b = mha(x[:, 3:], mask=masks.causal(), cache=cache2, positions=torch.arange(3, 6))
    assert max_err(a, b) < 1e-12


def test_positions_without_rope_are_refused_not_ignored() -> None:
    """``positions`` place RoPE's rotations only: a layer without RoPE, or a cross-attention
    call, would compute the same output whatever positions it is given."""
    x, mem = torch.randn(1, 5, 64), torch.randn(1, 7, 64)
    plain = _layer(4, False, False)
    with pytest.raises(ValueError, match=r"positions: given, but this layer has no RoPE"):
        plain(x, positions=torch.arange(10, 15))
    rotary = _layer(4, True, False)
    with pytest.raises(ValueError, match=r"positions: given to cross-attention"):
        rotary(x, mem, positions=torch.arange(5))
    spread = rotary(x, positions=torch.tensor([0, 2, 4, 6, 8]))  # self-attention takes them
    assert max_err(spread, rotary(x)) > 1e-4


def test_dropout_only_in_training() -> None:
    mha = MultiHeadAttention(16, 2, dropout=0.5)
    x = torch.randn(1, 20, 16)
    torch.manual_seed(0)
    a = mha(x)
    mha.eval()
    b, c = mha(x), mha(x)
    assert max_err(b, c) == 0 and max_err(a, b) > 1e-3


def test_sparse_normalizer_passes_through() -> None:
    import entmax

    mha = MultiHeadAttention(16, 2, normalize="sparsemax").double()
    x = torch.randn(1, 5, 16).double()
    _, w = mha(x, need_weights=True)
    q, k, _ = mha._project_self(x)
    s = q @ k.transpose(-1, -2) / 8**0.5
    assert max_err(w, entmax.sparsemax(s, dim=-1)) < 1e-12


def test_numpy_int_heads_are_taken_and_stored_as_int() -> None:
    """numpy ints pass as sizes (the num_kv_heads default, np.int64(num_heads), was refused
    in a message blaming num_kv_heads), a float num_kv_heads is a TypeError naming it, and
    the sizes are kept as plain ints."""
    from attnlab.nn import LayerConfig

    mha = MultiHeadAttention(np.int64(16), np.int64(4), head_dim=np.int64(4))
    gqa = MultiHeadAttention(16, 4, num_kv_heads=np.int64(2))
    sizes = (mha.embed_dim, mha.num_heads, mha.num_kv_heads, mha.head_dim, gqa.num_kv_heads)
    assert sizes == (16, 4, 4, 4, 2) and all(type(n) is int for n in sizes)
    cfg = LayerConfig(np.int64(32), np.int64(4), num_kv_heads=np.int64(2))
    assert all(type(n) is int for n in (cfg.d_model, cfg.num_heads, cfg.num_kv_heads))
    check_and_control(
        lambda: MultiHeadAttention(16, 4, num_kv_heads=2.0),  # type: ignore[arg-type]
        lambda: MultiHeadAttention(16, 4, num_kv_heads=2),
        TypeError,
        r"num_kv_heads must be a positive int, got 2\.0 \(float\)",
    )


def test_errors_name_the_argument() -> None:
    mha = MultiHeadAttention(16, 4)
    check_and_control(
        lambda: mha(torch.randn(2, 3, 15)),
        lambda: mha(torch.randn(2, 3, 16)),
        ValueError,
        r"query must be \(B, L, 16\), got \(2, 3, 15\)",
    )
    check_and_control(
        lambda: MultiHeadAttention(16, 4, num_kv_heads=3),
        lambda: MultiHeadAttention(16, 4, num_kv_heads=2),
        ValueError,
        "num_kv_heads=3 must be a positive int dividing num_heads=4",
    )
    check_and_control(
        lambda: MultiHeadAttention(10, 4),
        lambda: MultiHeadAttention(10, 4, head_dim=3),
        ValueError,
        "not divisible by num_heads=4; pass head_dim",
    )
    check_and_control(
        lambda: KVCache().crop(1),
        lambda: KVCache().crop(0),
        ValueError,
        r"crop length must be an int in \[0, 0\]",
    )
    with pytest.raises(TypeError, match=r"torch\.nn\.MultiheadAttention"):
        MultiHeadAttention.from_torch(nn.Linear(2, 2))  # type: ignore[arg-type]


def test_key_is_query_with_another_value_attends_over_that_value() -> None:
    """``mha(x, x, y)`` takes its values from ``y``, as torch's layer does (it used to
    take the self-attention path and project values from ``x``)."""
    torch.manual_seed(0)
    ref = nn.MultiheadAttention(16, 4, batch_first=True).double().eval()
    ours = MultiHeadAttention.from_torch(ref).eval()
    x, y = torch.randn(2, 5, 16, dtype=torch.float64), torch.randn(2, 5, 16, dtype=torch.float64)
    assert max_err(ours(x, x, y), ref(x, x, y)[0]) < 1e-12
    assert max_err(ours(x, x, x), ref(x, x, x)[0]) < 1e-12
    narrow, xf, yf = MultiHeadAttention(16, 4, vdim=8), x.float(), y.float()
    check_and_control(
        lambda: narrow(xf, xf, torch.randn(2, 5, 16)),
        lambda: narrow(xf, xf, torch.randn(2, 5, 8)),
        ValueError,
        r"value must be \(B, L, 8\), got \(2, 5, 16\)",
    )
    roped = MultiHeadAttention(16, 4, rope=RotaryEmbedding(4))
    check_and_control(
        lambda: roped(xf, xf, yf),
        lambda: roped(xf, xf, xf),
        ValueError,
        "value: with key=query and RoPE or a cache",
    )


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"head_dim": -4}, ValueError, "head_dim must be a positive int, got -4"),
        ({"head_dim": 0}, ValueError, "head_dim must be a positive int, got 0"),
        ({"head_dim": 3.5}, TypeError, r"head_dim must be a positive int, got 3\.5"),
        ({"kdim": 0}, ValueError, "kdim must be a positive int, got 0"),
        ({"vdim": -1}, ValueError, "vdim must be a positive int, got -1"),
        ({"dropout": 1.5}, ValueError, r"dropout must be in \[0, 1\), got 1\.5"),
        ({"normalize": "max"}, ValueError, "normalize='max' is not a known normalizer"),
        ({"engine": "fast"}, ValueError, "engine='fast' is not a known engine"),
        ({"score": "dots"}, ValueError, "score='dots' is not a known score"),
    ],
)
def test_constructor_arguments_are_named_when_built(
    kwargs: dict[str, object], exc: type[Exception], match: str
) -> None:
    check_and_control(
        lambda: MultiHeadAttention(8, 2, **kwargs),  # type: ignore[arg-type]
        lambda: MultiHeadAttention(8, 2),
        exc,
        match,
    )


def test_bool_heads_and_a_wrong_cache_are_named() -> None:
    with pytest.raises(TypeError, match=r"num_heads must be a positive int, got True \(bool\)"):
        MultiHeadAttention(8, True)
    mha, x = MultiHeadAttention(8, 2), torch.randn(1, 3, 8)
    check_and_control(
        lambda: mha(x, cache={}),  # type: ignore[arg-type]
        lambda: mha(x, cache=KVCache()),
        TypeError,
        "cache must be an attnlab.nn.KVCache, got dict",
    )


def test_gradients_flow_through_cached_steps_as_through_torchs_causal_pass() -> None:
    """Training through a cache (three steps) gives torch's gradients of one causal pass;
    appending used to write into storage earlier steps had saved for their backward."""
    torch.manual_seed(0)
    ref = nn.MultiheadAttention(32, 4, batch_first=True).double()
    ours, cache = MultiHeadAttention.from_torch(ref), KVCache()
    x = torch.randn(2, 6, 32, dtype=torch.float64, requires_grad=True)
    steps = [ours(x[:, a:b], mask=masks.causal(), cache=cache) for a, b in ((0, 3), (3, 4), (4, 6))]
    g = torch.randn(2, 6, 32, dtype=torch.float64)
    (torch.cat(steps, 1) * g).sum().backward()
    got, x.grad = x.grad, None
    causal = torch.ones(6, 6, dtype=torch.bool).triu(1)  # torch: True = may not attend
    (ref(x, x, x, attn_mask=causal, need_weights=False)[0] * g).sum().backward()
    assert max_err(got, x.grad) < 1e-12
    with torch.no_grad():  # decoding after training steps goes on in the storage
        nxt = ours(torch.randn(2, 1, 32, dtype=torch.float64), mask=masks.causal(), cache=cache)
    assert cache.length == 7 and nxt.shape == (2, 1, 32)


def test_a_step_after_crop_leaves_what_backward_saved() -> None:
    """Steps under autograd, ``crop`` (a rejected draft), a step without grad: it wrote into
    the keys the first steps had saved ("modified by an inplace operation" in backward)."""
    torch.manual_seed(0)
    mha, cache = MultiHeadAttention(8, 2).double(), KVCache()
    x = torch.randn(1, 5, 8, dtype=torch.float64, requires_grad=True)
    out = mha(x[:, :4], mask=masks.causal(), cache=cache)
    cache.crop(2)
    with torch.no_grad():
        step = mha(x[:, 4:5], mask=masks.causal(), cache=cache)
    out.sum().backward()
    got, x.grad = x.grad, None
    mha(x[:, :4], mask=masks.causal()).sum().backward()
    assert max_err(got, x.grad) < 1e-12
    want = mha(torch.cat([x[:, :2], x[:, 4:5]], 1), mask=masks.causal())[:, -1:]
    assert max_err(step, want) < 1e-12  # the step saw the two kept positions


@pytest.mark.parametrize("then", ["no_grad", "grad"])
def test_a_prefill_under_inference_mode_continues_outside_it(then: str) -> None:
    """A cache prefilled under ``torch.inference_mode`` holds inference tensors; the next
    step under ``no_grad`` wrote into them ("Inplace update to inference tensor outside
    InferenceMode"). It now copies them to storage of its own."""
    torch.manual_seed(0)
    mha, cache = _layer(2, True, False).double(), KVCache()
    x = torch.randn(2, 11, 64, dtype=torch.float64)
    with torch.inference_mode():
        first = mha(x[:, :8], mask=masks.causal(), cache=cache)
    with torch.enable_grad() if then == "grad" else torch.no_grad():
        steps = [mha(x[:, i : i + 1], mask=masks.causal(), cache=cache) for i in (8, 9, 10)]
    with torch.no_grad():
        full = mha(x, mask=masks.causal())
    assert cache.length == 11 and not cache.keys.is_inference()  # type: ignore[union-attr]
    assert max_err(torch.cat([first.clone(), *steps], 1), full) < 1e-12


@pytest.mark.filterwarnings("ignore:enable_nested_tensor")  # torch's, for norm_first
def test_module_arguments_the_audit_found_unchecked_are_named() -> None:
    """(LinformerAttention mixed 5 keys with 6 values without a word; EncoderLayer /
    DecoderLayer / Transformer.from_torch of another module raised AttributeError
    'has no attribute self_attn'; DecoderCache(-1) was accepted and a cache of 1 layer for
    a 2-layer decoder failed with IndexError; KVCache.crop(True) set the length to True.)"""
    from attnlab.nn import (
        DecoderCache,
        DecoderLayer,
        DecoderOnly,
        EncoderLayer,
        LayerConfig,
        LinformerAttention,
        Transformer,
    )

    lin, x = LinformerAttention(8, 2, max_len=8, proj_dim=4), torch.randn(2, 4, 8)
    check_and_control(
        lambda: lin(x, torch.randn(2, 5, 8), torch.randn(2, 6, 8)),
        lambda: lin(x, torch.randn(2, 5, 8), torch.randn(2, 5, 8)),
        ValueError,
        r"key and value must have the same batch and length \(B, Lk, \.\), got key "
        r"\(2, 5, 8\) and value \(2, 6, 8\)",
    )
    enc = torch.nn.TransformerEncoderLayer(8, 2, 16, batch_first=True)
    dec = torch.nn.TransformerDecoderLayer(8, 2, 16, batch_first=True)
    for ours, good, bad in ((EncoderLayer, enc, dec), (DecoderLayer, dec, enc)):
        check_and_control(
            lambda o=ours, b=bad: o.from_torch(b),
            lambda o=ours, g=good: o.from_torch(g),
            TypeError,
            rf"layer must be a torch\.nn\.{type(good).__name__}, got {type(bad).__name__}",
        )
    full = torch.nn.Transformer(8, 2, 1, 1, 16, batch_first=True, norm_first=True)
    check_and_control(
        lambda: Transformer.from_torch(enc),  # type: ignore[arg-type]
        lambda: Transformer.from_torch(full),
        TypeError,
        r"model must be a torch\.nn\.Transformer, got TransformerEncoderLayer",
    )
    for n in (-1, 0):
        with pytest.raises(ValueError, match=f"num_layers must be a positive int, got {n}"):
            DecoderCache(n)
    lm, x3 = DecoderOnly(LayerConfig(8, 2, 16), 2).eval(), torch.randn(1, 3, 8)
    check_and_control(
        lambda: lm(x3, cache=DecoderCache(1)),
        lambda: lm(x3, cache=DecoderCache(2)),
        ValueError,
        r"cache has 1 layers but this decoder has 2: make it with DecoderCache\(num_layers=2\)",
    )
    cache = DecoderCache(1).self_attn[0]
    with pytest.raises(TypeError, match=r"length must be an int >= 0, got True \(bool\)"):
        cache.crop(True)  # type: ignore[arg-type]
    assert cache.crop(0).length == 0  # the control
    full = KVCache()
    full.append(torch.ones(1, 1, 3, 2), torch.ones(1, 1, 3, 2))
    assert full.crop(np.int64(2)).length == 2  # (numpy's ints were refused as out of range)
    with pytest.raises(ValueError, match="length must be an int >= 0, got -1"):
        full.crop(-1)


def test_need_weights_and_residual_are_checked_not_broadcast_or_truthy() -> None:
    """(need_weights="no" is truthy: a pair came back; a (1, 1, D) residual was added to
    every row without a word and a wrong length failed inside torch's add.)"""
    from attnlab.models import BertConfig, BertEncoder
    from attnlab.nn import EncoderLayer, LayerConfig, LinformerAttention

    torch.manual_seed(0)
    mha, x = MultiHeadAttention(16, 4).eval(), torch.randn(1, 4, 16)
    layer = EncoderLayer(LayerConfig(16, 4, 32)).eval()
    lin = LinformerAttention(16, 4, max_len=8, proj_dim=4)
    bert = BertEncoder(
        BertConfig(20, 16, num_hidden_layers=1, num_attention_heads=4, intermediate_size=32)
    ).eval()
    ids = torch.tensor([[1, 2, 3]])
    for call in (
        lambda w: mha(x, need_weights=w),
        lambda w: layer(x, need_weights=w),
        lambda w: lin(x, need_weights=w),
        lambda w: bert(ids, need_weights=w),
    ):
        check_and_control(
            lambda c=call: c("no"),
            lambda c=call: c(False),
            TypeError,
            "need_weights must be a bool, got str",
        )
    with pytest.raises(TypeError, match="average_weights must be a bool, got int"):
        mha(x, need_weights=True, average_weights=1)  # type: ignore[arg-type]
    for ctx in (torch.no_grad, torch.enable_grad):  # the fused CPU epilogue and autograd's add
        for bad in (torch.randn(1, 3, 16), torch.randn(1, 1, 16)):
            with ctx():
                check_and_control(
                    lambda b=bad: mha(x, residual=b),
                    lambda: mha(x, residual=x),
                    ValueError,
                    rf"residual must be the output's shape \(B, Lq, D\) = \(1, 4, 16\), "
                    rf"got \({bad.shape[0]}, {bad.shape[1]}, 16\)",
                )
    with torch.no_grad():
        torch.testing.assert_close(mha(x, residual=x), x + mha(x))


def test_decoder_options_caches_and_inputs_the_audit_found_unchecked() -> None:
    """(A KVCache given to a decoder raised AttributeError 'no attribute self_attn'; a
    decoder without cross-attention ignored memory and memory_mask; "False" switched
    norm_first, causal, cross_attention and tie_weights on; a cross-attention cache called
    without key appended the query's keys to the encoder's; Linformer blamed proj_k for a
    long input; an int query failed inside torch's matmul.)"""
    from attnlab.models import LanguageModel, LMConfig
    from attnlab.nn import DecoderLayer, DecoderOnly, LayerConfig, LinformerAttention

    torch.manual_seed(0)
    dec, x = DecoderOnly(LayerConfig(16, 2, 32, dropout=0.0), 2).eval(), torch.randn(2, 3, 16)
    check_and_control(
        lambda: dec(x, cache=KVCache()),  # type: ignore[arg-type]
        lambda: dec(x, cache=dec.new_cache()),
        TypeError,
        "cache must be an attnlab.nn.DecoderCache, got KVCache",
    )
    never = torch.zeros(2, 1, 3, 7, dtype=torch.bool)
    for kw in ({"memory": torch.randn(2, 7, 16)}, {"memory_mask": never}):
        check_and_control(
            lambda k=kw: dec(x, **k), lambda: dec(x), ValueError,
            "memory, memory_mask and cross_cache must be None: this decoder layer has no cross",
        )  # fmt: skip
    for make, name in (
        (lambda v: LayerConfig(16, 2, 32, norm_first=v), "norm_first"),
        (lambda v: DecoderLayer(LayerConfig(16, 2, 32), causal=v), "causal"),
        (lambda v: DecoderLayer(LayerConfig(16, 2, 32), cross_attention=v), "cross_attention"),
        (lambda v: LanguageModel(LMConfig(11, 16, 2, tie_weights=v)), "tie_weights"),
    ):
        check_and_control(
            lambda m=make: m("False"), lambda m=make: m(False), TypeError,
            f"{name} must be a bool, got str",
        )  # fmt: skip
    mha, q, mem = MultiHeadAttention(16, 2).eval(), torch.randn(1, 1, 16), torch.randn(1, 5, 16)
    cross, own = KVCache(), KVCache()
    want = mha(q, mem, cache=cross)
    with pytest.raises(ValueError, match="cache holds cross-attention keys, but this is a self"):
        mha(q, cache=cross)
    assert cross.length == 5 and torch.equal(mha(q, mem, cache=cross), want)
    mha(q, cache=own)
    with pytest.raises(ValueError, match="cache holds self-attention keys, but this is a cross"):
        mha(q, mem, cache=own)
    lin = LinformerAttention(16, 2, max_len=8, proj_dim=4)
    check_and_control(
        lambda: lin(torch.randn(1, 9, 16)), lambda: lin(torch.randn(1, 8, 16)), ValueError,
        r"key has length 9, past this layer's max_len=8",
    )  # fmt: skip
    kv8 = MultiHeadAttention(16, 2, kdim=8, vdim=8)
    check_and_control(
        lambda: kv8(torch.randn(1, 3, 16)),
        lambda: kv8(torch.randn(1, 3, 16), torch.randn(1, 4, 8)),
        ValueError,
        "key: none given, so this is self-attention, which needs kdim = vdim = embed_dim=16",
    )
    ints = torch.ones(2, 5, 16, dtype=torch.long)
    for layer, name in ((mha, "query"), (lin, "query")):
        check_and_control(
            lambda m=layer: m(ints), lambda m=layer: m(ints.float()), TypeError,
            f"{name} must be a floating-point",
        )  # fmt: skip


def test_key_and_value_shapes_are_named_as_given() -> None:
    """A key and value of other lengths, or a key of another batch, were reported as the
    head-split ``k (2, 4, 7, 4)`` and ``v``, or as ``batch sizes of q, k, v``."""
    m, x = MultiHeadAttention(16, 4), torch.randn(2, 5, 16)
    with pytest.raises(ValueError, match=r"key and value .* got key \(2, 7, 16\) and value \(2, 6"):
        m(x, torch.randn(2, 7, 16), torch.randn(2, 6, 16))
    with pytest.raises(
        ValueError, match=r"key must have query's batch size 2 \(or 1\), got key \(3"
    ):
        m(x, torch.randn(3, 7, 16))
    for args, name in (((x, [[0.0] * 16]), "key"), ((x, x, [[0.0] * 16]), "value")):
        with pytest.raises(TypeError, match=rf"^{name} must be a Tensor \(B, L, D\), got list$"):
            m(*args)  # (a key that is a list was an AttributeError: no attribute 'dim')
    # the control: a key of batch 1 is broadcast, as the attention itself does
    mem = torch.randn(1, 7, 16)
    out, _ = m(x, mem)
    assert max_err(out, m(x, mem.expand(2, 7, 16).contiguous())[0]) < 1e-6
