"""Mistakes users make with the public API, each named by the argument it is about (an
audit found each one failing deep inside torch, or taken silently)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import attnlab
from attnlab.functional import attention_weights
from attnlab.nn import (
    Decoder,
    DecoderCache,
    DecoderLayer,
    Encoder,
    EncoderLayer,
    FeedForward,
    KVCache,
    LayerConfig,
    MultiHeadAttention,
)
from attnlab.positional import LearnedPositional, RotaryEmbedding


@pytest.mark.parametrize(
    ("kw", "error", "match"),
    [
        ({"heads": [1.5]}, TypeError, r"heads must be a list of query head indices \(ints\)"),
        ({"heads": 2}, TypeError, "heads must be a list"),  # 'int' object is not iterable
        ({"heads": [True]}, TypeError, "heads must be a list"),  # an IndexError
        ({"heads": [4]}, ValueError, r"heads=\[4\] must be query head indices in \[0, 4\)"),
        ({"rows": (1.0, 3.0)}, TypeError, r"rows must be a pair \(r0, r1\) of ints"),
        ({"rows": 3}, TypeError, "rows must be a pair"),
        ({"rows": (1, 2, 3)}, TypeError, "rows must be a pair"),  # too many values to unpack
        ({"rows": (3, 1)}, ValueError, "rows=.* must satisfy 0 <= r0 <= r1 <= Lq=10"),
    ],
)
def test_attention_weights_names_a_bad_selection(kw: dict, error: type, match: str) -> None:
    q = torch.randn(1, 4, 10, 8)
    with pytest.raises(error, match=match):
        attention_weights(q, q, q, **kw)
    # numpy's ints and floats are ints and floats (head 1.5 was taken as head 1)
    w = attention_weights(q, q, q, heads=[np.int64(1)], rows=(np.int32(0), 3))
    assert torch.equal(w, attention_weights(q, q, q, heads=[1], rows=(0, 3)))
    out = attnlab.attention(q, q, q, scale=np.float32(0.5))  # "got float32"
    assert torch.equal(out, attnlab.attention(q, q, q, scale=0.5))


def test_kv_cache_reorder_names_a_bad_index() -> None:
    cache = KVCache()
    with pytest.raises(TypeError, match="index must be a 1-D integer tensor, got list"):
        cache.reorder([0])  # type: ignore[arg-type]  # (taken while the cache was empty)
    cache.append(torch.randn(2, 1, 3, 4), torch.randn(2, 1, 3, 4))
    for bad in (torch.tensor([0, 5]), torch.tensor([-1, 0])):  # torch's IndexError
        with pytest.raises(ValueError, match=r"index must hold batch rows in \[0, 2\)"):
            cache.reorder(bad)
    with pytest.raises(TypeError, match="k and v must be tensors, got list, list"):
        cache.append([1.0], [2.0])  # type: ignore[arg-type]
    keys = cache.reorder(torch.tensor([1, 1])).keys
    assert keys is not None and torch.equal(keys[0], keys[1])  # positive control


def test_learned_positions_take_any_integer_dtype() -> None:
    """(int8, int16 and uint8 positions passed the check, then failed in F.embedding.)"""
    pos = LearnedPositional(16, 4)
    x, at = torch.randn(1, 3, 4), torch.tensor([[0, 5, 9]])
    for dtype in (torch.int8, torch.int16, torch.uint8, torch.int32):
        assert torch.equal(pos(x, positions=at.to(dtype)), pos(x, positions=at))


def test_layers_name_a_rope_or_an_input_of_another_size() -> None:
    with pytest.raises(ValueError, match="rope must rotate heads of the layer's head_dim=4, got"):
        MultiHeadAttention(16, 4, rope=RotaryEmbedding(8))  # (failed at the first call)
    with pytest.raises(ValueError, match="head_dim=8, got a RotaryEmbedding of head_dim=16"):
        LayerConfig(32, 4, 64, rope=RotaryEmbedding(16))
    assert MultiHeadAttention(16, 4, rope=RotaryEmbedding(4)) is not None  # positive control
    with pytest.raises(ValueError, match=r"x must be \(B, L, 16\), got \(2, 5, 12\)"):
        FeedForward(16, 32)(torch.randn(2, 5, 12))  # "mat1 and mat2 shapes cannot be ..."
    mha, x = MultiHeadAttention(16, 4), torch.randn(2, 5, 16)
    with pytest.raises(
        ValueError,
        match=r"residual must be the output's shape \(B, Lq, D\) = \(2, 5, 16\), got \(2, 5, 8\)",
    ):
        mha(x, residual=torch.randn(2, 5, 8))
    assert mha(x, residual=x).shape == (2, 5, 16)


@pytest.mark.parametrize(
    ("kw", "error", "match"),
    [
        ({"scale": "0.5"}, TypeError, "scale must be a finite float or None, got str"),
        ({"scale": float("nan")}, ValueError, "scale must be finite"),
        ({"bias": "no"}, TypeError, "bias must be a bool, got str"),  # taken as True
        ({"qk_norm": 1}, TypeError, "qk_norm must be a bool, got int"),
    ],
)
def test_multi_head_attention_checks_its_options_when_built(
    kw: dict, error: type, match: str
) -> None:
    with pytest.raises(error, match=match):
        MultiHeadAttention(16, 4, **kw)


def test_feed_forward_and_caches_name_a_bad_argument() -> None:
    """(float64 or int64 x gave torch's "mat1 and mat2 must have the same dtype", a list
    residual an AttributeError; bias="no" and cross="no" were taken as True; KVCache.set
    took 3-D keys, whose E became the length, and values of another length.)"""
    ff, x = FeedForward(16, 32), torch.randn(2, 3, 16)
    for bad in (x.double(), x.long()):
        with pytest.raises(TypeError, match=f"x must be of the model's dtype .*got {bad.dtype}"):
            ff(bad)
    with pytest.raises(TypeError, match=r"residual must be a Tensor .*got list"):
        ff(x, residual=[1])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="residual must be of the model's dtype"):
        ff(x, residual=x.double())
    torch.testing.assert_close(ff(x, residual=x), x + ff(x))  # positive control
    with pytest.raises(TypeError, match="bias must be a bool, got str"):
        FeedForward(16, 32, bias="no")  # type: ignore[arg-type]
    assert FeedForward(16, 32, bias=np.bool_(False)).linear1.bias is None
    with pytest.raises(TypeError, match="cross must be a bool, got str"):
        DecoderCache(2, cross="no")  # type: ignore[arg-type]
    assert DecoderCache(2, cross=True).cross_attn is not None
    k = torch.randn(1, 1, 5, 4)
    for bad_k, bad_v, error in (
        (torch.randn(2, 3, 4), torch.randn(2, 3, 4), ValueError),
        (k, torch.randn(1, 1, 3, 4), ValueError),
        ([1], [2], TypeError),
    ):
        with pytest.raises(error, match="k and v must be"):
            KVCache().set(bad_k, bad_v)  # type: ignore[arg-type]
    assert KVCache().set(k, k) is not None and KVCache().set(k, k)[0] is k


def test_stacks_name_a_bad_layer_norm_or_config() -> None:
    """(norm="layer" failed at the first forward, an EncoderLayer in a Decoder with an
    AttributeError about cross_attn, EncoderLayer(16) with one about norm_first.)"""
    layer = EncoderLayer(LayerConfig(16, 4, 32))
    with pytest.raises(TypeError, match=r"norm must be an nn.Module or None, got str"):
        Encoder(layer, 2, norm="layer")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"layer must be an attnlab.nn.DecoderLayer, got Enc"):
        Decoder(layer, 2)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"layer must be an attnlab.nn.EncoderLayer, got str"):
        Encoder("layer", 2)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"config must be an attnlab.nn.LayerConfig, got int"):
        EncoderLayer(16)  # type: ignore[arg-type]
    x = torch.randn(1, 3, 16)
    assert Encoder(layer, 2, norm=torch.nn.LayerNorm(16))(x).shape == x.shape  # controls
    assert Decoder(DecoderLayer(LayerConfig(16, 4, 32)), 2)(x, x).shape == x.shape
