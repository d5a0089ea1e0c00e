"""Layers after ``torch.ao.quantization.quantize_dynamic(m, {nn.Linear})``: a dynamically
quantized ``Linear`` has a method, not a tensor, as ``weight``, and layers that read
``linear.weight.dtype`` (or sliced the weight) raised instead of calling the module."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnlab.models import LanguageModel, LMConfig
from attnlab.nn import (
    EncoderLayer,
    FeedForward,
    LayerConfig,
    LinformerAttention,
    LuongAttention,
    MultiHeadAttention,
)
from attnlab.rl.policy import MLPPolicy
from tests.conftest import max_err

_AO = getattr(torch.ao, "quantization", None)  # deprecated; slated for removal
pytestmark = [
    pytest.mark.skipif(not hasattr(_AO, "quantize_dynamic"), reason="no quantize_dynamic"),
    pytest.mark.filterwarnings("ignore:torch.ao.quantization is deprecated:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:torch.quantize_per_tensor:UserWarning"),
]


def quantized(m: nn.Module) -> nn.Module:
    """``m`` in eval mode with every ``nn.Linear`` dynamically quantized to qint8."""
    q = _AO.quantize_dynamic(m.eval(), {nn.Linear}, dtype=torch.qint8)
    assert any(isinstance(s, torch.ao.nn.quantized.dynamic.Linear) for s in q.modules())
    return q


def by_hand(ff: nn.Module, x: Tensor, activation: str) -> Tensor:
    """The feed-forward as its (quantized) linears called in sequence."""
    h = ff.linear1(x)
    if activation == "swiglu":
        gate, value = h.chunk(2, dim=-1)
        return ff.linear2(F.silu(gate) * value)
    return ff.linear2(F.relu(h) if activation == "relu" else F.gelu(h))


@pytest.mark.parametrize("activation", ["relu", "gelu", "swiglu"])
@pytest.mark.parametrize("with_residual", [False, True])
def test_quantized_feed_forward_is_its_linears_in_sequence(
    activation: str, with_residual: bool
) -> None:
    """Was "AttributeError: 'function' object has no attribute 'dtype'" (layers.py)."""
    ff, x = quantized(FeedForward(32, 64, activation=activation)), torch.randn(2, 7, 32)
    res = torch.randn(2, 7, 32) if with_residual else None
    with torch.no_grad():
        out = ff(x) if res is None else ff(x, residual=res)
        want = by_hand(ff, x, activation) + (0 if res is None else res)
    assert max_err(out, want) < 1e-6


@pytest.mark.parametrize("norm_first", [False, True])
def test_quantized_encoder_layer_is_its_sublayers_in_sequence(norm_first: bool) -> None:
    cfg = LayerConfig(32, 4, 64, dropout=0.0, norm_first=norm_first)
    layer, x = quantized(EncoderLayer(cfg)), torch.randn(2, 7, 32)
    with torch.no_grad():
        out = layer(x)
        if norm_first:
            h = x + layer.self_attn(layer.norm1(x))
            want = h + by_hand(layer.ff, layer.norm2(h), "relu")
        else:
            h = layer.norm1(x + layer.self_attn(x))
            want = layer.norm2(h + by_hand(layer.ff, h, "relu"))
    assert max_err(out, want) < 1e-6


def test_attention_with_a_quantized_output_projection_swapped_in() -> None:
    """``quantize_dynamic`` leaves the ``Linear`` subclass ``out_proj`` alone, but one
    swapped in by hand (or any module without a weight tensor) is called as it is."""
    mha, x = MultiHeadAttention(32, 4).eval(), torch.randn(2, 7, 32)
    plain = nn.Linear(32, 32)
    plain.load_state_dict(mha.out_proj.state_dict())
    inner = copy.deepcopy(mha)
    inner.out_proj = nn.Identity()  # the heads' concatenated output (B, L, D)
    mha.out_proj = quantized(nn.Sequential(plain))[0]
    with torch.no_grad():
        assert max_err(mha(x), mha.out_proj(inner(x))) < 1e-6


def test_quantized_luong_concat_calls_its_projection_on_each_half() -> None:
    """The concat score sliced ``proj.weight`` ("'method' object is not subscriptable");
    a quantized ``proj`` now runs on each half padded with zeros."""
    attn, q, k = (
        quantized(LuongAttention(8, 6, method="concat")),
        torch.randn(2, 3, 8),
        torch.randn(2, 5, 6),
    )
    with torch.no_grad():
        _, weights = attn(q, k)
        pq = attn.proj(torch.cat((q, torch.zeros(2, 3, 6)), -1))  # (B, Lq, hidden)
        pk = attn.proj(torch.cat((torch.zeros(2, 5, 8), k), -1))  # (B, Lk, hidden)
        scores = attn.v(torch.tanh(pq[:, :, None] + pk[:, None])).squeeze(-1)  # (B, Lq, Lk)
    assert max_err(weights, scores.softmax(-1)) < 1e-6


def within_quantization_error(model: nn.Module, *inputs: Tensor) -> None:
    """A quantized copy of ``model`` runs, and is near the float original (not equal)."""
    q = quantized(copy.deepcopy(model))
    with torch.no_grad():
        want, got = model(*inputs), q(*inputs)
    want, got = (t[0] if isinstance(t, tuple) else t for t in (want, got))
    assert 0 < max_err(got, want) < 0.05 * want.abs().max().item()


def test_quantized_linformer_untied_lm_and_policy_run() -> None:
    """Linformer's and the policy's dtype checks read ``weight.dtype``, the untied LM head
    passed ``head.weight`` to ``F.linear``: each raised on a quantized model."""
    x = torch.randn(2, 7, 16)
    within_quantization_error(LinformerAttention(16, 4, max_len=8), x)
    cfg = LMConfig(vocab_size=50, d_model=32, num_heads=4, num_layers=1, tie_weights=False)
    within_quantization_error(LanguageModel(cfg), torch.randint(0, 50, (2, 7)))
    within_quantization_error(
        MLPPolicy(5, 3, d_model=16), torch.rand(2, 4, 5), torch.zeros(2, 4, dtype=torch.bool)
    )
