"""What a transformers decoder's explanation scores, against transformers' eager model in
float64: the text as the model continues it (no EOS before the continuation)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from attnlab.cli import main  # noqa: E402
from attnlab.integrations.hf_text import hf_text_model, load_hf  # noqa: E402

WORDS = ["<pad>", "<unk>", "<s>", "</s>", "the", "cat", "sat", "on", "a", "mat"]


def _eos_llama(path: Path, positions: int = 64) -> Path:
    """A tiny random Llama whose word-level tokenizer writes ``<s> text </s>``."""
    tok = tokenizers.Tokenizer(
        tokenizers.models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>")
    )
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.post_processor = tokenizers.processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", 2), ("</s>", 3)]
    )
    special = {"unk_token": "<unk>", "pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>"}
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, **special).save_pretrained(path)
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=len(WORDS), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, bos_token_id=2, eos_token_id=3,
        pad_token_id=0, max_position_embeddings=positions,
    )  # fmt: skip
    transformers.LlamaForCausalLM(cfg).save_pretrained(path)
    return path


def _eager_log_probs(folder: Path, ids: list[int], impl: str = "eager") -> torch.Tensor:
    """``(n, V)`` float64 log-probabilities of transformers' ``impl`` attention on ``ids``."""
    eager = transformers.AutoModelForCausalLM.from_pretrained(
        folder, attn_implementation=impl, dtype=torch.float64
    )
    with torch.no_grad():
        return torch.log_softmax(eager.eval()(input_ids=torch.tensor([ids])).logits[0], -1)


def test_a_decoder_whose_tokenizer_appends_eos_is_scored_after_the_text(tmp_path: Path) -> None:
    """``<s> the cat sat on </s> a mat`` was scored: log p(a mat | text </s>) -4.75931 where
    eager fp64 on ``<s> the cat sat on a mat`` gives -4.79963; the greedy next token was
    also predicted after ``</s>``, and the CLI counted the EOS in TEXT's length."""
    folder = _eos_llama(tmp_path / "llama")
    model, tok = load_hf(folder)
    tm = hf_text_model(model, tok, text="the cat sat on", continuation="a mat")
    ids = list(tm.tokenize("the cat sat on"))
    assert ids == [2, 4, 5, 6, 7, 8, 9]  # <s> the cat sat on a mat
    logp = _eager_log_probs(folder, ids)
    want = float(logp[4, 8] + logp[5, 9])
    with torch.no_grad():
        assert abs(float(tm.pooled(torch.tensor([ids]))) - want) < 1e-5
    greedy = hf_text_model(model, tok, text="the cat sat on")
    ids = list(greedy.tokenize("the cat sat on"))
    assert ids[:5] == [2, 4, 5, 6, 7] and len(ids) == 6
    assert ids[5] == int(_eager_log_probs(folder, ids[:5])[4].argmax())
    # <s> + 6 words + the greedy token fill 8 positions exactly (with </s>: 9, refused)
    small = _eos_llama(tmp_path / "small", positions=8)
    out = ["--out", str(tmp_path / "r.html"), "--steps", "2"]
    assert main(["explain", "the cat sat on a mat", "--hf-model", str(small), *out]) == 0


def test_a_float64_decoder_is_scored_in_float64(tmp_path: Path) -> None:
    """The log-probability was taken after ``.float()``: a float64 model's score was
    1.1e-6 from torch's float64 attention's; it keeps the logits' precision now (fp16 and
    bf16 still go up to float32). (Eager's softmax is float32 even in a float64 model:
    2.6e-8 off, so the reference is transformers' sdpa attention.)"""
    from attnlab.integrations.transformers import register

    folder = _eos_llama(tmp_path / "llama")
    _, tok = load_hf(folder)
    m64 = transformers.AutoModelForCausalLM.from_pretrained(
        folder, attn_implementation=register(), dtype=torch.float64
    )
    tm = hf_text_model(m64.eval(), tok, text="the cat sat", continuation="on a mat the cat")
    ids = list(tm.tokenize("the cat sat"))
    logp = _eager_log_probs(folder, ids, impl="sdpa")
    want = sum(float(logp[i - 1, ids[i]]) for i in range(4, len(ids)))
    with torch.no_grad():
        got = tm.pooled(torch.tensor([ids]))
    assert got.dtype == torch.float64 and abs(float(got) - want) < 1e-9, float(got) - want


@pytest.mark.parametrize("continuation", ["a mat", None])
def test_a_decoders_report_names_the_log_probability_it_explains(
    tmp_path: Path, continuation: str | None
) -> None:
    """The note said "(score: the embedding along its own direction)" for a decoder, whose
    score is -log p(continuation | text); it names that, and the scored tokens."""
    import html
    import re

    from attnlab.interpret.text import explain_text

    model, tok = load_hf(_eos_llama(tmp_path / "llama"))
    tm = hf_text_model(model, tok, text="the cat sat on", continuation=continuation)
    ex = explain_text(tm, "the cat sat on", tmp_path / "r.html", steps=2, log=lambda s: None)
    notes = re.findall(r"\(score: (?:[^()]|\([^()]*\))*\)", html.unescape(ex.files[0].read_text()))
    scored = continuation or ex.tokens[-1]  # the greedy next token
    assert notes == [f'(score: -log p("{scored}" | text))'], notes
    ids = torch.tensor([list(tm.tokenize("the cat sat on"))])
    with torch.no_grad():
        assert abs(ex.score + float(tm.pooled(ids))) < 1e-6  # the score is -log p
