"""More transformers families through the attnlab backend: each a tiny random model of
the family's own config class (sizes shrunk, seeded), a right-padded batch, logits under
the 2x rule against an fp64 eager run, and a count that attnlab's function was called for
every attention layer (a model that ran its own attention would pass the numbers without
attnlab). The families were picked for what their attention does differently; a sweep of
every causal-LM family of transformers 5.24 is in the README's transformers section.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

transformers = pytest.importorskip("transformers")

from attnlab.integrations.transformers import register  # noqa: E402
from tests.conftest import assert_2x_rule, attnlab_calls  # noqa: E402

V = 64
# the family, and what its attention call carries that the core families do not
FAMILIES = {
    "qwen3": {  # q/k norms, its window on (off by default) in one layer
        "use_sliding_window": True,
        "sliding_window": 5,
        "layer_types": ["full_attention", "sliding_attention"],
    },
    "phi3": {"sliding_window": 5},  # fused qkv, a window
    "gemma3_text": {"sliding_window": 5, "layer_types": ["sliding_attention", "full_attention"]},
    "cohere2": {"sliding_window": 5, "layer_types": ["sliding_attention", "full_attention"]},
    "olmo2": {},  # q/k norms over all heads
    "starcoder2": {"sliding_window": 5},  # biases, a window
    "gpt_neox": {"rotary_pct": 0.5},  # partial rotary, no GQA
    "stablelm": {"partial_rotary_factor": 0.5},
    "granite": {"attention_multiplier": 0.3},  # its own score scale
    "deepseek_v3": {"v_head_dim": 8, "head_dim": 8, "num_key_value_heads": 4},  # MLA: Ev < E
    "bart": {},  # encoder-decoder: bidirectional, causal and cross-attention
    # a hybrid: gated delta-net layers beside full attention (see tests/test_hf_sparse.py
    # for the models that read their mask as a tensor)
    "qwen3_next": {"layer_types": ["linear_attention", "full_attention"]},
}
# the layer types that do not call an attention function
RECURRENT = ("linear_attention", "conv", "mamba")
SIZES = {
    "hidden_size": 64, "intermediate_size": 64, "num_hidden_layers": 2, "vocab_size": V,
    "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
    "max_position_embeddings": 128, "d_model": 64, "encoder_layers": 2, "decoder_layers": 2,
    "encoder_attention_heads": 4, "decoder_attention_heads": 4, "encoder_ffn_dim": 64,
    "decoder_ffn_dim": 64, "moe_intermediate_size": 32, "n_routed_experts": 2,
    "num_experts_per_tok": 1, "first_k_dense_replace": 2, "n_group": 1, "topk_group": 1,
    "kv_lora_rank": 16, "q_lora_rank": 16, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8,
    "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, "decoder_start_token_id": 1,
    "attention_dropout": 0.0, "dropout": 0.0, "hidden_dropout": 0.0,
}  # fmt: skip


def _config(family: str) -> Any:
    """The family's config with every size it has shrunk, then the family's own options."""
    cfg = transformers.AutoConfig.for_model(family)
    for key, value in {**SIZES, **FAMILIES[family]}.items():
        if hasattr(cfg, key):
            setattr(cfg, key, value)
    return cfg


def _model(family: str, dtype: torch.dtype) -> torch.nn.Module:
    torch.manual_seed(0)
    model = transformers.AutoModel.from_config(
        _config(family), attn_implementation="eager", experts_implementation="eager"
    )  # eager experts: fp64 (a grouped matmul takes no float64)
    return model.eval().to(dtype)


def _inputs(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    ids = torch.randint(3, V, (2, 12), generator=torch.Generator().manual_seed(1))
    am = torch.ones(2, 12, dtype=torch.long)
    am[1, -4:] = 0  # right padding (left padding leaves rows without keys, NaN in fp64 eager)
    kw = {"input_ids": ids, "attention_mask": am}
    if model.config.is_encoder_decoder:
        kw["decoder_input_ids"] = ids[:, :7]
    return kw


@pytest.fixture(scope="module", autouse=True)
def _registered() -> None:
    register()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_follows_eager_by_the_2x_rule_through_attnlab(
    family: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    model64, plain, model = (
        _model(family, d) for d in (torch.float64, torch.float32, torch.float32)
    )
    kw = _inputs(model)
    keep = kw["attention_mask"].bool() if not model.config.is_encoder_decoder else slice(None)
    ref64 = model64(**kw).last_hidden_state[keep]
    want = plain(**kw).last_hidden_state[keep]
    calls = attnlab_calls(monkeypatch)
    model.set_attn_implementation("attnlab")
    got = model(**kw).last_hidden_state[keep]
    assert_2x_rule(got, want, ref64, f"{family} hidden states")
    kinds = getattr(model.config, "layer_types", None) or ()
    layers = model.config.num_hidden_layers - sum(k in RECURRENT for k in kinds)
    if model.config.is_encoder_decoder:  # encoder self, decoder self and cross
        layers = model.config.encoder_layers + 2 * model.config.decoder_layers
    assert len(calls) == layers, f"{family}: attnlab ran {len(calls)} of {layers} attentions"


def _shrunk(cfg: Any, depth: int = 0) -> Any:
    """``cfg`` and its sub-configs (encoder, decoder, text, vision) with :data:`SIZES`."""
    for key, value in SIZES.items():
        if getattr(cfg, key, None) is not None:
            try:
                setattr(cfg, key, value)
            except Exception:  # a derived, read-only size
                continue
    for part in ("encoder", "decoder", "text_config", "vision_config"):
        sub = getattr(cfg, part, None)
        if depth < 3 and sub is not None and hasattr(sub, "to_dict"):
            _shrunk(sub, depth + 1)
    return cfg


def test_t5gemma2_whose_decoder_joins_its_masks_as_tensors() -> None:
    """T5Gemma 2's decoder joins its self- and cross-attention masks with ``torch.cat``;
    handed attnlab's mask objects it failed inside transformers ("expected Tensor as
    element 0 in argument 0, but got Causal"). It gets dense bool masks now."""
    cfg = _shrunk(transformers.AutoConfig.for_model("t5gemma2"))
    ids = torch.randint(3, V, (2, 8), generator=torch.Generator().manual_seed(1))
    am = torch.ones(2, 8, dtype=torch.long)
    am[1, -3:] = 0  # right padding
    dec = ids[:, :5]
    out = {}
    for impl, dtype in (
        ("eager", torch.float64),
        ("eager", torch.float32),
        ("attnlab", torch.float32),
    ):
        torch.manual_seed(0)
        model = transformers.AutoModelForSeq2SeqLM.from_config(cfg, attn_implementation=impl)
        model = model.eval().to(dtype)
        with torch.no_grad():
            out[impl, dtype] = model(input_ids=ids, attention_mask=am, decoder_input_ids=dec).logits
    ref = out["eager", torch.float64]
    assert torch.isfinite(out["attnlab", torch.float32]).all()
    keep = torch.isfinite(ref)  # (eager's own padded row may be NaN)
    assert keep[0].all()
    got, plain = out["attnlab", torch.float32][keep], out["eager", torch.float32][keep]
    assert_2x_rule(got, plain, ref[keep], "t5gemma2")
