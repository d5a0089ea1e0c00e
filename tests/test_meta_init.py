"""Build on the meta device, ``to_empty``, then ``reset_parameters()`` on every module (the
pattern of large-model and FSDP initialization): every parameter is drawn again, and
every computed buffer is made again. attnlab's own parameters (attention projections,
relative-position tables, learned positions, Linformer's projections, pooling's context
vector, ViT's class token, SAGAN's gate) had no ``reset_parameters`` and kept whatever
memory ``to_empty`` gave them; the language model's embeddings came back ``N(0, 1)``
instead of ``N(0, 0.02**2)``. (Spectral-normalized layers are left out: torch's
``reset_parameters`` does not reach a parametrization's original weight.)"""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import attnlab
from attnlab import bias as B
from attnlab import masks
from attnlab import models as M
from attnlab import nn as anm
from attnlab.models import gan
from attnlab.positional import LearnedPositional, RotaryEmbedding
from attnlab.rl.policy import AttentionPolicy

LAYER = anm.LayerConfig(32, 4, 64, num_kv_heads=2, dropout=0.0, rope=RotaryEmbedding(8))
BUILDS: dict[str, Callable[[], nn.Module]] = {
    "mha_kdim": lambda: anm.MultiHeadAttention(32, 4, kdim=12, vdim=20),
    "decoder_only": lambda: anm.DecoderOnly(LAYER, 2),
    "transformer": lambda: anm.Transformer(LAYER, 1, 1),
    "linformer": lambda: anm.LinformerAttention(32, 4, 64, 16, sharing="none"),
    "pooling": lambda: anm.AttentionPooling(32, 16),
    "bahdanau": lambda: anm.BahdanauAttention(16, 24, 32),
    "hierarchical": lambda: anm.HierarchicalAttention(16, 12, 12),
    "t5_buckets": lambda: B.relative_buckets(4),
    "learned_relative": lambda: B.learned_relative(4, 8),
    "learned_positions": lambda: LearnedPositional(16, 8),
    "lm": lambda: M.LanguageModel(M.LMConfig(50, 32, num_layers=1)),
    "seq2seq": lambda: M.Seq2Seq(M.Seq2SeqConfig(40, 50, 32, encoder_layers=1, decoder_layers=1)),
    "vit": lambda: M.ViT(M.ViTConfig(layers=1, d_model=32)),
    "captioner": lambda: M.Captioner(M.CaptionerConfig(50, image_size=32, encoder_layers=1)),
    "rnn_seq2seq": lambda: M.RNNSeq2Seq(M.RNNSeq2SeqConfig(40, 50, 16, 16, 32, 16)),
    "classifier": lambda: M.DocumentClassifier(50, 3, embed_dim=16),
    "sagan_attention": lambda: gan.SelfAttention2d(16, 2, spectral=False),
    "rl_policy": lambda: AttentionPolicy(4, 2, d_model=32, max_steps=64),
}


def _own_params(m: nn.Module) -> list[nn.Parameter]:
    return [p for p in m._parameters.values() if p is not None]


@pytest.mark.parametrize("name", sorted(BUILDS))
def test_meta_build_then_reset_parameters_draws_every_parameter(name: str) -> None:
    torch.manual_seed(0)
    fresh = BUILDS[name]()
    with torch.device("meta"):
        meta = BUILDS[name]()
    model = meta.to_empty(device="cpu")
    missing = [
        f"{n or '<root>'} ({type(m).__name__})"
        for n, m in model.named_modules()
        if _own_params(m) and not hasattr(m, "reset_parameters")
    ]
    assert not missing, f"modules with parameters but no reset_parameters: {missing}"
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(math.nan)  # what to_empty may leave
    torch.manual_seed(1)
    for m in model.modules():
        if _own_params(m):
            m.reset_parameters()  # type: ignore[operator]
    for (n, p), q in zip(model.named_parameters(), fresh.parameters(), strict=True):
        p, q = p.detach(), q.detach()
        assert torch.isfinite(p).all(), f"{name}: {n} was not drawn again"
        if q.numel() > 64 and q.std() > 0:  # same family of initialization as a normal build
            assert 0.7 < float(p.std() / q.std()) < 1.4, f"{name}: {n} std {p.std()} vs {q.std()}"
        elif q.numel() and not q.any():  # out_proj's bias: its Linear drew it again
            assert not p.any(), f"{name}: {n} is zero when built, not after reset"
    for (n, b), c in zip(model.named_buffers(), fresh.buffers(), strict=True):
        assert torch.equal(b, c), f"{name}: buffer {n} was not made again"


@pytest.mark.parametrize("where", ["meta", "cpu"])
def test_rope_tables_built_before_to_empty_are_made_again(where: str) -> None:
    """RoPE's cos/sin tables built before ``to_empty`` (a forward probing shapes under
    ``torch.device("meta")``, or an ordinary one) kept their device and dtype but not
    their values: the outputs were inf or NaN."""
    torch.manual_seed(0)
    with torch.device(where):
        rope = RotaryEmbedding(8)
        rope(torch.zeros(1, 2, 5, 8))  # builds the tables
    rope = rope.to_empty(device="cpu")
    x = torch.randn(1, 2, 5, 8)
    torch.testing.assert_close(rope(x), RotaryEmbedding(8)(x), rtol=0, atol=0)


META_CALLS: dict[str, dict[str, object]] = {
    "plain": {},
    "causal": {"mask": masks.causal()},
    "window": {"mask": masks.window(3)},
    "bool tensor": {"mask": torch.ones(8, 12, dtype=torch.bool, device="meta")},
    "alibi": {"bias": B.alibi(4), "mask": masks.causal()},
    "float bias": {"bias": torch.zeros(4, 8, 12, device="meta")},
}


@pytest.mark.parametrize("engine", ["auto", "reference"])
@pytest.mark.parametrize("call", sorted(META_CALLS))
def test_attention_on_meta_gives_the_shapes_torch_sdpa_gives(engine: str, call: str) -> None:
    """Shape inference on the meta device, as torch SDPA and nn.MultiheadAttention do it:
    attnlab failed reading a value ("Tensor.item() cannot be called on meta tensors")."""
    q = torch.randn(2, 4, 8, 16, device="meta")
    k, v = torch.randn(2, 2, 12, 16, device="meta"), torch.randn(2, 2, 12, 24, device="meta")
    want = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    got = attnlab.attention(q, k, v, engine=engine, **META_CALLS[call])  # type: ignore[arg-type]
    assert isinstance(got, torch.Tensor) and got.is_meta and got.shape == want.shape
    weights = attnlab.attention_weights(q, k, v, **META_CALLS[call])  # type: ignore[arg-type]
    assert weights.is_meta and weights.shape == (2, 4, 8, 12)


def test_softmax_and_a_layer_built_on_meta_run_there() -> None:
    scores = torch.randn(2, 3, 5, device="meta")
    got = attnlab.normalize.softmax(scores)
    assert got.is_meta and got.shape == torch.softmax(scores, -1).shape
    with torch.device("meta"):
        mha = anm.MultiHeadAttention(16, 4)
        ref = nn.MultiheadAttention(16, 4, batch_first=True)
        x = torch.randn(2, 5, 16)
        out = mha(x)
        assert out.is_meta and out.shape == ref(x, x, x)[0].shape == (2, 5, 16)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"mask": torch.ones(8, 8, dtype=torch.bool, device="meta")}, "mask tensor"),
        ({"bias": torch.zeros(8, 8, device="meta")}, "bias tensor"),
    ],
)
def test_a_meta_mask_or_bias_beside_real_tensors_is_named(
    kwargs: dict[str, torch.Tensor], match: str
) -> None:
    """torch raised NotImplementedError "Cannot copy out of meta tensor; no data!"."""
    q = torch.randn(1, 2, 8, 16)
    for engine in ("auto", "reference", "blocked"):
        with pytest.raises(ValueError, match=f"{match} is on the meta device, which holds no "
                           "values to read on cpu; put it on q's device"):  # fmt: skip
            attnlab.attention(q, q, q, engine=engine, **kwargs)  # type: ignore[arg-type]
        on_cpu = {name: torch.ones_like(t, device="cpu") for name, t in kwargs.items()}
        assert attnlab.attention(q, q, q, engine=engine, **on_cpu).shape == q.shape  # type: ignore[arg-type, union-attr]
