"""Transformer layers and stacks against torch.nn's, and cached seq2seq decoding."""

from __future__ import annotations

import copy
from collections.abc import Callable

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from attnlab import masks
from attnlab.nn import (
    Decoder,
    DecoderLayer,
    DecoderOnly,
    Encoder,
    EncoderLayer,
    FeedForward,
    LayerConfig,
    Transformer,
)
from attnlab.positional import RotaryEmbedding
from tests.conftest import assert_2x_rule, check_and_control, max_err

D, H, FF = 48, 4, 96


def _jitter(m: nn.Module) -> nn.Module:
    """Random norm gains and biases, so a swapped or missing one shows."""
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "norm" in n or "bias" in n:
                p.normal_()
    return m


@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_encoder_layer_matches_torch(norm_first: bool, activation: str) -> None:
    ref = _jitter(
        nn.TransformerEncoderLayer(
            D, H, FF, dropout=0.0, activation=activation, norm_first=norm_first, batch_first=True
        )
    )
    ref64 = copy.deepcopy(ref).double()
    ours = EncoderLayer.from_torch(ref)
    x = torch.randn(3, 10, D)
    lengths = torch.tensor([10, 7, 3])
    kpm = torch.arange(10)[None] >= lengths[:, None]
    for train in (True, False):  # eval mode takes torch's fused fast path
        ref.train(train), ref64.train(train), ours.train(train)
        with torch.inference_mode(not train):
            want = ref(x, src_key_padding_mask=kpm)
            want64 = ref64(x.double(), src_key_padding_mask=kpm)
            got = ours(x, mask=masks.padding(lengths))
        real = ~kpm[..., None]  # torch's fast path zeroes padded rows; compare real ones
        assert_2x_rule(got * real, want * real, want64 * real, f"train={train}")


def test_encoder_layer_gradients_match_torch() -> None:
    ref = _jitter(nn.TransformerEncoderLayer(D, H, FF, dropout=0.0, batch_first=True)).double()
    ours = EncoderLayer.from_torch(ref)
    x = torch.randn(2, 9, D, dtype=torch.float64)
    g = torch.randn(2, 9, D, dtype=torch.float64)
    (ref(x) * g).sum().backward()
    (ours(x) * g).sum().backward()
    ref_grads = {n.replace("linear", "ff.linear"): p.grad for n, p in ref.named_parameters()}
    for n, p in ours.named_parameters():
        assert max_err(p.grad, ref_grads[n]) < 1e-10, n


@pytest.mark.parametrize("norm_first", [False, True])
def test_decoder_layer_matches_torch(norm_first: bool) -> None:
    ref = _jitter(
        nn.TransformerDecoderLayer(D, H, FF, dropout=0.0, norm_first=norm_first, batch_first=True)
    ).double()
    ours = DecoderLayer.from_torch(ref)
    tgt, mem = torch.randn(2, 7, D).double(), torch.randn(2, 11, D).double()
    lengths = torch.tensor([11, 4])
    kpm = torch.arange(11)[None] >= lengths[:, None]
    causal = nn.Transformer.generate_square_subsequent_mask(7, dtype=torch.float64)
    want = ref(tgt, mem, tgt_mask=causal, memory_key_padding_mask=kpm)
    got = ours(tgt, mem, memory_mask=masks.padding(lengths))
    assert max_err(got, want) < 1e-12


def test_seq2seq_transformer_matches_torch() -> None:
    ref = nn.Transformer(D, H, 2, 2, FF, dropout=0.0, norm_first=True, batch_first=True)
    ref = _jitter(ref).double().eval()
    ours = Transformer.from_torch(ref).eval()
    src, tgt = torch.randn(2, 9, D).double(), torch.randn(2, 6, D).double()
    causal = nn.Transformer.generate_square_subsequent_mask(6, dtype=torch.float64)
    want = ref(src, tgt, tgt_mask=causal)
    assert max_err(ours(src, tgt), want) < 1e-12
    post = nn.Transformer(D, H, 1, 1, FF, batch_first=True)  # its stacks end with a norm
    with pytest.raises(ValueError, match=r"model: .*norm_first=True, got a post-norm"):
        Transformer.from_torch(post)


@pytest.mark.parametrize("beam", [False, True])
def test_cached_seq2seq_decoding_equals_full_pass(beam: bool) -> None:
    model = Transformer(LayerConfig(32, 4, 64, dropout=0.0, num_kv_heads=2), 2, 2)
    model = model.double().eval()
    src, tgt = torch.randn(3, 8, 32).double(), torch.randn(3, 6, 32).double()
    pad = masks.padding(torch.tensor([8, 5, 2]))
    memory = model.encode(src, mask=pad)
    cache = model.new_cache()
    outs = [model.decode(tgt[:, :2], memory, memory_mask=pad, cache=cache)]
    index = torch.tensor([2, 2, 0]) if beam else torch.arange(3)
    cache.reorder(index)
    for i in range(2, 6):  # after the first step, memory comes from the cross cache
        outs.append(
            model.decode(tgt[index, i : i + 1], None, memory_mask=pad_of(index), cache=cache)
        )
    full = model.decode(tgt[index], memory[index], memory_mask=pad_of(index))
    assert max_err(torch.cat(outs[1:], 1), full[:, 2:]) < 1e-12
    assert max_err(outs[0][index], full[:, :2]) < 1e-12


def pad_of(index: torch.Tensor) -> masks.Mask:
    return masks.padding(torch.tensor([8, 5, 2])[index])


def test_decoder_only_cache_with_rope_and_gqa_equals_full_pass() -> None:
    rope = RotaryEmbedding(8, base=500.0)
    config = LayerConfig(  # DecoderOnly's former defaults: pre-norm GELU, no dropout
        32,
        4,
        128,
        num_kv_heads=1,
        dropout=0.0,
        activation="gelu",
        norm_first=True,
        qk_norm=True,
        rope=rope,
    )
    lm = DecoderOnly(config, 3).double().eval()
    x = torch.randn(2, 9, 32).double()
    cache = lm.new_cache()
    steps = [lm(x[:, :5], cache=cache)] + [lm(x[:, i : i + 1], cache=cache) for i in range(5, 9)]
    assert max_err(torch.cat(steps, 1), lm(x)) < 1e-12
    assert cache.length == 9 and cache.cross_attn is None


def test_decoder_only_is_causal() -> None:
    config = LayerConfig(16, 2, 64, dropout=0.0, activation="gelu", norm_first=True)
    lm = DecoderOnly(config, 2).eval()
    x = torch.randn(1, 6, 16)
    y = x.clone()
    y[:, 4:] = torch.randn(1, 2, 16)  # changing the future must not change the past
    assert max_err(lm(x)[:, :4], lm(y)[:, :4]) < 1e-6
    assert max_err(lm(x)[:, 4:], lm(y)[:, 4:]) > 1e-3


def test_swiglu_feed_forward_formula() -> None:
    ff = FeedForward(8, 16, activation="swiglu", bias=False).double()
    x = torch.randn(2, 3, 8).double()
    w1, w2 = ff.linear1.weight, ff.linear2.weight
    gate, up = (x @ w1.T).chunk(2, -1)
    want = (gate * torch.sigmoid(gate) * up) @ w2.T
    assert max_err(ff(x), want) < 1e-12
    tanh = FeedForward(8, 16, activation="gelu_tanh").double()
    want_t = F.gelu(tanh.linear1(x), approximate="tanh") @ tanh.linear2.weight.T
    assert max_err(tanh(x), want_t + tanh.linear2.bias) < 1e-12


def test_rms_norm_layer_and_errors() -> None:
    layer = EncoderLayer(LayerConfig(16, 2, 32, norm="rms", activation="swiglu", dropout=0.0))
    assert isinstance(layer.norm1, nn.RMSNorm)
    check_and_control(
        lambda: EncoderLayer(LayerConfig(16, 2, norm="batch")),
        lambda: EncoderLayer(LayerConfig(16, 2, norm="layer")),
        ValueError,
        r"norm='batch' is not one of \('layer', 'rms'\)",
    )
    check_and_control(
        lambda: FeedForward(4, 8, activation="tanh"),
        lambda: FeedForward(4, 8, activation="gelu"),
        ValueError,
        "activation='tanh' is not one of",
    )
    dec = Decoder(DecoderLayer(LayerConfig(16, 2, 32)), 2)
    check_and_control(
        lambda: dec(torch.randn(1, 2, 16)),
        lambda: dec(torch.randn(1, 2, 16), torch.randn(1, 3, 16)),
        ValueError,
        "memory .* is required unless cross_cache is already filled",
    )
    check_and_control(
        lambda: Decoder(DecoderLayer(LayerConfig(16, 2, 32)), 0),
        lambda: Decoder(DecoderLayer(LayerConfig(16, 2, 32)), 1),
        ValueError,
        "num_layers must be a positive int, got 0",
    )


@pytest.mark.parametrize("norm_first", [False, True])
def test_layer_need_weights_returns_its_self_attention_weights(norm_first: bool) -> None:
    layer = EncoderLayer(LayerConfig(16, 2, 32, dropout=0.0, norm_first=norm_first))
    layer = _jitter(layer).double().eval()
    x = torch.randn(2, 5, 16).double()
    pad = masks.padding(torch.tensor([5, 3]))
    out, w = layer(x, mask=pad, need_weights=True)
    assert max_err(out, layer(x, mask=pad)) < 1e-12  # the engine may differ
    h = layer.norm1(x) if norm_first else x  # the oracle: softmax(q k^T / sqrt(E)) by hand
    q, k, _ = (h @ layer.self_attn.in_proj_weight.T + layer.self_attn.in_proj_bias).chunk(3, -1)
    q, k = (t.view(2, 5, 2, 8).transpose(1, 2) for t in (q, k))  # (B, H, L, E)
    keep = torch.arange(5) < torch.tensor([5, 3])[:, None]  # (B, L) real keys
    scores = (q @ k.transpose(-1, -2) / 8**0.5).masked_fill(~keep[:, None, None], -torch.inf)
    assert max_err(w, scores.softmax(-1)) < 1e-12
    dec = DecoderLayer(LayerConfig(16, 2, 32, dropout=0.0), cross_attention=False).eval()
    _, causal_w = dec(x.float(), need_weights=True)
    assert bool((causal_w.triu(1) == 0).all()) and bool((causal_w.diagonal(0, -2, -1) > 0).all())
    assert max_err(causal_w.sum(-1), torch.ones(2, 2, 5)) < 1e-6


def test_layer_config_errors() -> None:
    check_and_control(
        lambda: LayerConfig(16, 0),
        lambda: LayerConfig(16, 2),
        ValueError,
        "num_heads must be a positive int, got 0",
    )
    check_and_control(
        lambda: LayerConfig(16, 2, activation="tanh"),
        lambda: LayerConfig(16, 2, activation="gelu_tanh"),
        ValueError,
        r"activation='tanh' is not one of \('relu', 'gelu', 'gelu_tanh', 'swiglu'\)",
    )


@pytest.mark.parametrize(
    ("args", "kwargs", "match"),
    [
        ((30, 4), {}, "d_model=30 must be divisible by num_heads=4"),
        ((32, 4), {"num_kv_heads": 3}, "num_kv_heads=3 must be a positive int dividing"),
        ((32, 4), {"dropout": -0.1}, r"dropout must be in \[0, 1\), got -0\.1"),
        ((32, 4), {"attention_dropout": 1.0}, r"^attention_dropout must be in \[0, 1\), got 1"),
        ((32, 4), {"engine": "nope"}, "engine='nope' is not a known engine"),
        ((32, 4), {"normalize": "hard"}, "normalize='hard' is not a known normalizer"),
        ((32, 4), {"norm_eps": -1.0}, "norm_eps must be a positive float, got -1.0"),
        ((32, 4), {"norm_eps": "a"}, "norm_eps must be a positive float, got str"),
        ((32, 4), {"rope": "yes"}, "rope must be an attnlab.positional.RotaryEmbedding"),
    ],
)
def test_layer_config_names_a_bad_argument_when_made(
    args: tuple[int, int], kwargs: dict[str, object], match: str
) -> None:
    """A config is checked when it is made, not when its first layer is built (a negative
    ``norm_eps`` gave NaN outputs; a str one and a ``rope`` that is not one failed at the
    first call, naming neither)."""
    check_and_control(
        lambda: LayerConfig(*args, **kwargs),  # type: ignore[arg-type]
        lambda: LayerConfig(32, 4, num_kv_heads=2, dropout=0.0),
        (ValueError, TypeError),
        match,
    )


def test_sizes_of_a_feed_forward_and_a_stack_are_named() -> None:
    check_and_control(
        lambda: FeedForward(16, 0), lambda: FeedForward(16, 8), ValueError,
        "dim_feedforward must be a positive int, got 0",
    )  # fmt: skip
    layer = EncoderLayer(LayerConfig(16, 4, 32))
    check_and_control(
        lambda: Encoder(layer, True),  # type: ignore[arg-type]
        lambda: Encoder(layer, 1),
        TypeError,
        "num_layers must be a positive int, got True",
    )


def test_copies_of_float64_torch_layers_are_exact_and_keep_eval_mode() -> None:
    """Made in float32 and loaded before moving, float64 weights were rounded (4e-8 off);
    an eval layer's copy trained, so torch's default dropout of 0.1 was on (0.55 off)."""
    torch.manual_seed(0)
    ref = nn.TransformerEncoderLayer(16, 4, 32, batch_first=True, dtype=torch.float64).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0, 0.3)  # float64 values that float32 cannot hold
    ours = EncoderLayer.from_torch(ref)
    assert not ours.training
    assert max_err(ours.ff.linear1.weight, ref.linear1.weight) == 0
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    with torch.no_grad():
        assert max_err(ours(x), ref(x)) < 1e-12


_CFG = LayerConfig(16, 4, 32)
# (the call with the bad argument, the call with numpy's int in its place, error, message)
STACK_CASES: list[tuple[Callable[[], object], Callable[[], object], type[Exception], str]] = [
    (lambda: Encoder(EncoderLayer(_CFG), 2.0), lambda: Encoder(EncoderLayer(_CFG), np.int64(2)),
     TypeError, r"^num_layers must be a positive int, got 2.0 \(float\)"),
    (lambda: Decoder(DecoderLayer(_CFG), None), lambda: Decoder(DecoderLayer(_CFG), np.int64(2)),
     TypeError, r"^num_layers must be a positive int, got None"),
    (lambda: DecoderOnly(_CFG, "2"), lambda: DecoderOnly(_CFG, np.int64(2)),
     TypeError, r"^num_layers must be a positive int, got '2'"),
    (lambda: Transformer(_CFG, 0, 1), lambda: Transformer(_CFG, np.int64(2), 1),
     ValueError, r"^num_encoder_layers must be a positive int, got 0"),
    (lambda: Transformer(_CFG, 1, -1), lambda: Transformer(_CFG, 1, np.int64(2)),
     ValueError, r"^num_decoder_layers must be a positive int, got -1"),
    (lambda: Encoder(DecoderLayer(_CFG), 1), lambda: Encoder(EncoderLayer(_CFG), 1),
     TypeError, r"^layer must be an attnlab.nn.EncoderLayer, got DecoderLayer"),
]  # fmt: skip


@pytest.mark.parametrize(("bad", "ok", "exc", "match"), STACK_CASES)
def test_stack_depths_and_layers_are_named(
    bad: Callable[[], object], ok: Callable[[], object], exc: type[Exception], match: str
) -> None:
    """A depth of the wrong type is a TypeError (2.0 and None were ValueErrors), the
    Transformer names its own argument, numpy's ints are taken (np.int64(2) was refused),
    and an Encoder refuses a DecoderLayer (its forward asked for memory)."""
    check_and_control(bad, ok, exc, match)
