"""transformers models whose sparse attention picks each query's keys, on the attnlab
backend: DeepSeek-V3.2's DSA and the models built on it, Qwen4-Exp's QSA, Doge's dynamic
mask, MiniMax M3's key blocks. Under any implementation but eager and sdpa, the DSA models
pass the kept keys as ``indices`` (MiniMax M3 as ``block_indices``) for the attention
function to apply, and all but MiniMax M3 read their mask as a tensor before their
attention runs. Each model keeps 4 of 12 keys a query, so a backend that
ignored the selection would fail; the logits follow an fp64 eager run by the 2x rule.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

transformers = pytest.importorskip("transformers")

from attnlab.integrations import hf_masks  # noqa: E402
from attnlab.integrations.hf_args import with_block_indices, with_indices  # noqa: E402
from attnlab.integrations.transformers import build_mask, register  # noqa: E402
from attnlab.masks import Mask, causal  # noqa: E402
from tests.conftest import assert_2x_rule, attnlab_calls, max_err  # noqa: E402
from tests.test_hf_families import SIZES, V  # noqa: E402

MLA = {"v_head_dim": 8, "head_dim": 8, "num_key_value_heads": 4}
DSA = {**MLA, "index_topk": 4, "index_head_dim": 16, "index_n_heads": 2}
QSA = {"indexer_n_heads": 2, "indexer_kv_heads": 1, "indexer_head_dim": 16,
       "indexer_budget": 4, "indexer_compress_ratio": 2}  # fmt: skip
MODELS = {
    "deepseek_v32": DSA,
    "glm_moe_dsa": DSA,
    "mistral_large4_text": DSA,
    "hy_v4": DSA,
    "axk2": DSA,
    "qwen4_exp_text": {"layer_types": ["linear_attention", "indexed_attention"], **QSA},
    "doge": {"keep_window_size": 4},
    # compressed keys appended after the mask was built, with their own additive bias
    "deepseek_v4": {"layer_types": ["compressed_sparse_attention", "heavily_compressed_attention"],
                    "compress_rates": {"compressed_sparse_attention": 2,
                                       "heavily_compressed_attention": 4},
                    "sliding_window": 4, "index_topk": 2, "index_n_heads": 2,
                    "index_head_dim": 16},
    # blocks of 2 keys: the 2 best and the one before the query's own (per indexer head)
    "minimax_m3_vl_text": {"layer_types": ["full_attention", "minimax_m3_sparse"],
                           "index_n_heads": 2, "index_head_dim": 16, "index_block_size": 2,
                           "index_topk_blocks": 2, "index_local_blocks": 1},
}  # fmt: skip
# the option that makes each model keep every key (the control)
KEEP_ALL = {"index_topk": 64, "indexer_budget": 64, "keep_window_size": 64, "index_topk_blocks": 64}


@pytest.fixture(scope="module", autouse=True)
def _registered() -> None:
    register()


def _config(family: str, **extra: Any) -> Any:
    cfg = transformers.AutoConfig.for_model(family)
    for key, value in {**SIZES, **MODELS[family], **extra}.items():
        if hasattr(cfg, key):
            setattr(cfg, key, value)
    return cfg


def _model(family: str, impl: str, dtype: torch.dtype = torch.float32, **extra: Any) -> Any:
    torch.manual_seed(0)
    cfg = _config(family, **extra)
    auto = transformers.AutoModel
    model = auto.from_config(cfg, attn_implementation=impl, experts_implementation="eager")
    return model.eval().to(dtype)


def _ids() -> torch.Tensor:
    return torch.randint(3, V, (2, 12), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("family", list(MODELS))
def test_a_sparse_attention_model_follows_eager_by_the_2x_rule(
    family: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    ids = _ids()
    with torch.no_grad():
        ref64 = _model(family, "eager", torch.float64)(input_ids=ids).last_hidden_state
        plain = _model(family, "eager")(input_ids=ids).last_hidden_state
        calls = attnlab_calls(monkeypatch)  # the mask of each call
        got = _model(family, "attnlab")(input_ids=ids).last_hidden_state
        every = _model(family, "eager", **KEEP_ALL)(input_ids=ids).last_hidden_state
    assert calls, f"{family}: attnlab never ran"
    if family in hf_masks.TENSOR_MASK_MODELS:
        assert all(isinstance(m, torch.Tensor) for m in calls), "the model reads a tensor mask"
    assert_2x_rule(got, plain, ref64, f"{family} hidden states")
    # the control: keeping every key changes the model, so the selection was applied
    assert max_err(every, plain) > 1e-3, f"{family}: its selection made no difference"


@pytest.mark.parametrize("family", ["deepseek_v32", "minimax_m3_vl_text"])
def test_generate_with_sparse_attention_gives_eagers_greedy_tokens(family: str) -> None:
    """Decoding steps: one query, the keys (or key blocks) it keeps among the cached ones."""
    ids = _ids()[:, :8]
    kw = {"max_new_tokens": 24, "min_new_tokens": 24, "do_sample": False}
    torch.manual_seed(0)
    cfg = _config(family)
    lm = transformers.AutoModelForCausalLM
    want = lm.from_config(cfg, attn_implementation="eager").eval().generate(ids, **kw)
    torch.manual_seed(0)
    got = lm.from_config(cfg, attn_implementation="attnlab").eval().generate(ids, **kw)
    assert want.shape == (2, 32)
    assert torch.equal(got, want)


def test_only_a_model_that_reads_its_mask_gets_a_tensor() -> None:
    from transformers.masking_utils import causal_mask_function as fn

    def built(model_type: str) -> object:
        cfg = type("Config", (), {"model_type": model_type})()
        return build_mask(2, 5, 5, mask_function=fn, config=cfg)

    assert isinstance(built("llama"), Mask)
    dense = built("deepseek_v32")
    assert isinstance(dense, torch.Tensor) and dense.dtype == torch.bool
    assert torch.equal(dense, causal().dense(5, 5).expand(2, 1, 5, 5))
    assert "deepseek_v32" in hf_masks.TENSOR_MASK_MODELS


def test_indices_narrow_every_kind_of_mask() -> None:
    idx = torch.tensor([[[0, 0], [1, 0], [2, 0]], [[0, 1], [1, 2], [2, 2]]])  # (B, Lq, 2)
    kept = torch.zeros(2, 1, 3, 3, dtype=torch.bool)
    for b in range(2):
        for q in range(3):
            kept[b, 0, q, idx[b, q]] = True
    lower = causal().dense(3, 3)
    assert torch.equal(with_indices(None, idx, 3).dense(3, 3, batch=2), kept)
    assert torch.equal(with_indices(causal(), idx, 3).dense(3, 3, batch=2), kept & lower)
    assert torch.equal(with_indices(lower, idx, 3), kept & lower)
    assert with_indices(causal(), None, 3).spec() == "causal()"
    with pytest.raises(TypeError, match=r"indices: .* integer tensor"):
        with_indices(None, torch.zeros(2, 3, 2), 3)
    # key blocks of 2, per indexer head; -1 keeps nothing
    blocks = torch.tensor([[[[0], [1]], [[-1], [0]]]])  # (B=1, Hi=2, Lq=2, 1)
    got = with_block_indices(None, blocks, 2, 4, 4).dense(2, 4, batch=1, heads=4)
    rows = {0: [[1, 1, 0, 0], [0, 0, 1, 1]], 1: [[0, 0, 0, 0], [1, 1, 0, 0]]}
    for h in range(4):  # query heads 0, 1 follow indexer head 0; 2, 3 head 1
        assert got[0, h].int().tolist() == rows[h // 2], h
    with pytest.raises(TypeError, match=r"block_indices: .* block_size None"):
        with_block_indices(None, blocks, None, 4, 4)


def test_keys_added_after_the_mask_was_built_are_refused_by_name(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """DeepSeek-V4 appends compressed keys (and their bias) to a tensor mask; given an
    attnlab mask instead, the keys outgrow it: an error, not a shifted mask."""
    monkeypatch.delitem(hf_masks.TENSOR_MASK_MODELS, "deepseek_v4")
    with pytest.raises(ValueError, match=r"attention_mask: built for 12 keys, but Deepseek"):
        _model("deepseek_v4", "attnlab")(input_ids=_ids())


def test_bigbird_pegasus_encoder_gets_eagers_float_mask(monkeypatch: pytest.MonkeyPatch) -> None:
    """BigBird-Pegasus's encoder adds its mask to the scores of its own attention (as it
    does under sdpa); given eager's float mask it runs, and its decoder's self- and
    cross-attention go through attnlab."""
    cfg = transformers.AutoConfig.for_model("bigbird_pegasus")
    for key, value in SIZES.items():
        if hasattr(cfg, key):
            setattr(cfg, key, value)
    ids, am = _ids(), torch.ones(2, 12, dtype=torch.long)
    am[1, -4:] = 0
    kw = {"input_ids": ids, "attention_mask": am, "decoder_input_ids": ids[:, :5]}
    calls = attnlab_calls(monkeypatch)
    out = {}
    for impl, dtype in (("eager", torch.float64), ("eager", torch.float32), ("attnlab", None)):
        torch.manual_seed(0)
        model = transformers.AutoModel.from_config(cfg, attn_implementation=impl).eval()
        with torch.no_grad():
            out[impl, dtype] = model.to(dtype or torch.float32)(**kw).last_hidden_state
    got, plain, ref64 = (
        out["attnlab", None],
        out["eager", torch.float32],
        out["eager", torch.float64],
    )
    assert_2x_rule(got, plain, ref64, "bigbird_pegasus decoder states")
    assert len(calls) == 2 * cfg.decoder_layers  # the decoder's self- and cross-attention
