"""attnlab's interpretability on transformers models through the backend: the real
all-MiniLM-L6-v2 explained through transformers equals attnlab's own encoder of the same
weights, and ``attnlab explain --hf-model DIR`` on a tiny decoder explains the
log-probability that transformers' eager model gives."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from attnlab.cli import main  # noqa: E402
from attnlab.cli.explain import text_model  # noqa: E402
from attnlab.integrations.hf_text import hf_text_model, load_hf  # noqa: E402
from attnlab.interpret import captured_attentions, gradient_relevance  # noqa: E402
from attnlab.interpret.text import explain_text  # noqa: E402
from attnlab.models import SentenceEncoder, minilm_path  # noqa: E402
from tests.conftest import max_err  # noqa: E402

WORDS = ["<pad>", "<unk>", "the", "cat", "sat", "on", "a", "mat", "and", "dog", "ran", "to"]
WORDS += ["house", "it", "was", "red", "big"]


def test_minilm_through_transformers_explains_like_attnlabs_own_encoder() -> None:
    model, tok = load_hf(minilm_path())
    ours = hf_text_model(model, tok)
    own = text_model(SentenceEncoder.from_pretrained())
    text = "The cat sat on the mat."
    ids = torch.tensor([list(ours.tokenize(text))])
    assert ids.tolist() == [list(own.tokenize(text))]
    got, want = captured_attentions(ours, ids), captured_attentions(own, ids)
    assert len(got) == len(want) == 6
    with torch.no_grad():  # and transformers' own eager weights, independent of attnlab
        eager = transformers.AutoModel.from_pretrained(minilm_path(), attn_implementation="eager")
        ref = eager.eval()(input_ids=ids, output_attentions=True).attentions
    for g, w, r in zip(got, want, ref, strict=True):
        assert max_err(g, w) < 1e-5 and max_err(g, r[0]) < 1e-5
    assert max_err(ours.embed(ids), own.embed(ids)) < 1e-5
    rel = gradient_relevance(model, lambda: ours.pooled(ids).sum())
    rel_own = gradient_relevance(own.network, lambda: own.pooled(ids).sum())
    assert max_err(rel, rel_own) < 1e-4


def _save_word_tokenizer(path: Path) -> None:
    """A word-level tokenizer of :data:`WORDS`, saved to ``path``."""
    vocab = {w: i for i, w in enumerate(WORDS)}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>"
    )
    fast.save_pretrained(path)


def _decoder_folder(path: Path) -> Path:
    """A tiny random GPT-2 with a word-level tokenizer, saved to ``path``."""
    _save_word_tokenizer(path)
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=len(WORDS), n_embd=32, n_head=4, n_layer=2)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(path)
    return path


@pytest.mark.parametrize("continuation", [None, "ran to the house"])
def test_explain_hf_model_decoder_explains_eagers_log_probability(
    tmp_path: Path, continuation: str | None, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = _decoder_folder(tmp_path / "gpt2")
    text = "the big dog sat on a red mat"
    model, tok = load_hf(folder)
    tm = hf_text_model(model, tok, text=text, continuation=continuation)
    ids = torch.tensor([list(tm.tokenize(text))])
    eager = transformers.AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager")
    with torch.no_grad():
        logp = torch.log_softmax(eager.eval()(input_ids=ids).logits[0], -1)  # (n, V)
    n_text = len(text.split())
    m = ids.shape[1] - n_text
    assert m == (1 if continuation is None else len(continuation.split()))
    if continuation is None:
        assert int(ids[0, -1]) == int(logp[n_text - 1].argmax())  # the greedy next token
    want = sum(float(logp[i - 1, int(ids[0, i])]) for i in range(n_text, ids.shape[1]))
    with torch.no_grad():
        assert abs(float(tm.pooled(ids)) - want) < 1e-5

    args = ["explain", text, "--hf-model", str(folder), "--out", str(tmp_path / "r.html")]
    args += ["--steps", "4"] + ([] if continuation is None else ["--continuation", continuation])
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "most important tokens" in out and (tmp_path / "r.html").is_file()
    assert (tmp_path / "r_heads.png").is_file()
    # completeness: the attributions sum to f(text) - f(baseline), the baseline keeping the
    # scored tokens (it padded all but the last: with a continuation the sum was -0.163
    # and the reported difference 0.774, a log-probability of padding)
    ex = explain_text(tm, text, tmp_path / "c.html", steps=32, log=lambda s: None)
    ig = sum(ex.saliency["integrated gradients"])
    assert abs(ig - (ex.score - ex.baseline_score)) < 0.02 * max(1.0, abs(ig))
    assert ex.saliency["integrated gradients"][n_text:] == [0.0] * m  # scored, kept
    # rollout pooled over the rows the log-probabilities are read from (rows n_text - 1 ..
    # n - 2; the mean of every row showed the causal mask, the scored token included)
    with torch.no_grad():
        atts = eager(input_ids=ids, output_attentions=True).attentions  # (1, H, n, n) each
    n, eye = ids.shape[1], torch.eye(ids.shape[1], dtype=torch.float64)
    flow = eye
    for a in atts:
        fused = 0.5 * a[0].double().mean(0) + 0.5 * eye
        flow = (fused / fused.sum(-1, keepdim=True)) @ flow
    want_rollout = flow[n_text - 1 : n - 1].mean(0)
    assert max_err(torch.tensor(ex.saliency["rollout"], dtype=torch.float64), want_rollout) < 1e-5


def test_explain_hf_model_names_a_folder_that_is_not_a_model(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = ["explain", "a text", "--hf-model", str(tmp_path), "--out", str(tmp_path / "r.html")]
    assert main(bad) != 0
    err = capsys.readouterr().err
    assert "--hf-model:" in err and "holds no config.json" in err
    with pytest.raises(ValueError, match=r"--hf-model: .* holds no config.json"):
        load_hf(tmp_path)
    assert load_hf(_decoder_folder(tmp_path / "ok"))[0] is not None  # positive control


def test_explain_hf_model_refuses_what_it_cannot_explain(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A folder without tokenizer files (transformers 5 made a tokenizer of the special
    tokens alone: GPT-2 failed on an empty tensor, BERT explained [UNK]s), ``--against``
    with a decoder (a log-probability has no similarity: every explanation was 0), and
    ``--model`` beside ``--hf-model`` (it went unread): one line each, exit 2."""
    folder = _decoder_folder(tmp_path / "gpt2")
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        (bare / name).write_bytes((folder / name).read_bytes())
    out = ["--out", str(tmp_path / "r.html")]
    capsys.readouterr()  # what saving the folder printed
    cases = [
        (["--hf-model", str(bare)], "--hf-model: no tokenizer in .* holds no tokenizer files"),
        (["--hf-model", str(folder), "--against", "a dog"], "--against: needs an encoder"),
        (["--hf-model", str(folder), "--model", str(tmp_path)], "--model: and --hf-model"),
    ]
    for extra, match in cases:
        assert main(["explain", "the cat sat", *extra, *out]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and re.search(match, err), err
    # longer than GPT-2's 1024 positions: "The expanded size of the tensor", exit 1
    assert main(["explain", "the cat sat " * 400, "--hf-model", str(folder), *out]) == 2
    err = capsys.readouterr().err.strip()
    want = "argument TEXT: has 1201 tokens with the 1 it scores after it; gpt2 reads at most 1024"
    assert want in err, err
    assert not (tmp_path / "r.html").exists()
    assert main(["explain", "the cat sat", "--hf-model", str(folder), *out, "--steps", "2"]) == 0


def test_explain_hf_model_refuses_a_long_text_before_the_weights_load(
    tmp_path: Path, capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """TEXT or ``--against`` longer than the model reads is one line, exit 2, with no
    weights loaded (it came after "Loading weights" and transformers' own long-sequence
    warning); the positive control loads them once."""
    folder = _decoder_folder(tmp_path / "gpt2")
    loads: list[str] = []

    def spy(auto: type) -> None:
        real = auto.from_pretrained

        def counted(*args: object, **kwargs: object) -> object:
            loads.append(auto.__name__)
            return real(*args, **kwargs)

        monkeypatch.setattr(auto, "from_pretrained", counted)

    spy(transformers.AutoModel)
    spy(transformers.AutoModelForCausalLM)
    out = ["--out", str(tmp_path / "r.html"), "--steps", "2"]
    capfd.readouterr()
    cases = [
        (["the cat sat " * 400, "--hf-model", str(folder)], "TEXT: has 1201 tokens"),
        (["cats", "--hf-model", str(minilm_path()), "--against", "word " * 600], "--against:"),
    ]
    for args, words in cases:
        assert main(["explain", *args, *out]) == 2
        err = capfd.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and words in err and "reads at most" in err, err
    assert loads == []
    assert main(["explain", "the cat sat", "--hf-model", str(folder), *out]) == 0
    assert loads == ["AutoModelForCausalLM"]


def test_explain_hf_model_names_corrupt_weights_and_keeps_its_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A truncated model.safetensors (safetensors' own error: exit 1 naming no argument),
    and ``--out`` naming the folder's config.json (the report replaced it, exit 0)."""
    folder = _decoder_folder(tmp_path / "gpt2")
    capsys.readouterr()
    config = (folder / "config.json").read_bytes()
    out = ["--out", str(folder / "config.json"), "--steps", "2"]
    assert main(["explain", "the cat sat", "--hf-model", str(folder), *out]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "argument --out:" in err and "is an input" in err, err
    assert (folder / "config.json").read_bytes() == config
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:30])
    out = ["--out", str(tmp_path / "r.html"), "--steps", "2"]
    assert main(["explain", "the cat sat", "--hf-model", str(folder), *out]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "argument --hf-model:" in err, err
    assert "weights cannot be read" in err and not (tmp_path / "r.html").exists()


def test_byte_level_tokens_are_named_by_their_text() -> None:
    """A GPT-2-style tokenizer's vocabulary strings are bytes spelled as characters: the
    pictures and reports showed "ĠcafÃ©" for " café" and "æĿ±äº¬" for " 東京"."""
    from attnlab.integrations.hf_text import token_text

    bpe = tokenizers.ByteLevelBPETokenizer()
    corpus = ["the café in Zürich", "東京 and 大阪 are cities", "hello 👍🏽"] * 20
    bpe.train_from_iterator(corpus, vocab_size=300, min_frequency=1, special_tokens=["<eos>"])
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<eos>")
    ids = tok("the café in 東京")["input_ids"]
    names = [token_text(tok, i) for i in ids]
    assert "".join(names).replace("␣", " ") == "the café in 東京"
    assert all("Ã" not in n and "Ġ" not in n for n in names)


def test_explain_hf_model_never_unpickles_and_never_explains_random_weights(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """(A folder with only pytorch_model.bin was unpickled by transformers and explained,
    exit 0; one with no weights at all explained a randomly initialized model.)"""
    folder = _decoder_folder(tmp_path / "gpt2")
    model = load_hf(folder)[0]
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    for f in folder.iterdir():
        if f.name != "model.safetensors":
            (pickled / f.name).write_bytes(f.read_bytes())
    empty = tmp_path / "empty"
    empty.mkdir()
    for f in pickled.iterdir():
        (empty / f.name).write_bytes(f.read_bytes())
    torch.save(model.state_dict(), pickled / "pytorch_model.bin")
    capsys.readouterr()
    out = ["--out", str(tmp_path / "r.html"), "--steps", "2"]
    for path, match in (
        (pickled, "holds no model.safetensors; pytorch_model.bin is there, but attnlab never"),
        (empty, "holds no model.safetensors$"),
    ):
        assert main(["explain", "the cat sat", "--hf-model", str(path), *out]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and re.search(match, err), err
        with pytest.raises(ValueError, match=match.replace("$", "")):
            load_hf(path)
    assert not (tmp_path / "r.html").exists()
    assert main(["explain", "the cat sat", "--hf-model", str(folder), *out]) == 0  # control


def test_decoder_without_bos_attributes_its_first_word(tmp_path: Path) -> None:
    """GPT-2's tokenizer puts no BOS first: its first token is a word of the text, which
    the baseline kept as if it were [CLS], so that word's integrated gradient was always
    exactly 0. The baseline pads it now; the attributions equal a hand integral."""
    from attnlab.interpret.text import explained_score

    folder = _decoder_folder(tmp_path / "gpt2")
    model, tok = load_hf(folder)
    text = "dog sat on a red mat"
    tm = hf_text_model(model, tok, text=text, continuation="ran to the house")
    ex = explain_text(tm, text, tmp_path / "r.html", steps=32, log=lambda s: None)
    got = torch.tensor(ex.saliency["integrated gradients"])
    assert got[0] != 0, got  # the first word "dog" (was 0.0)
    ids = torch.tensor([list(tm.tokenize(text))])  # (1, 10): 6 words, 4 scored
    base = ids.clone()
    base[0, :6] = tok.pad_token_id
    score = explained_score(tm, ids)
    with torch.no_grad():
        assert abs(ex.baseline_score - float(score(base))) < 1e-6
    # by hand: trapezoid over 256 steps on the straight path between the word embeddings
    wte = model.get_input_embeddings()
    with torch.no_grad():
        e_x, e_b = wte(ids), wte(base)  # (1, n, D)
    alpha = torch.linspace(0, 1, 257)[:, None, None]
    path = (e_b + alpha * (e_x - e_b)).requires_grad_(True)  # (257, n, D)
    hook = wte.register_forward_hook(lambda m, i, o: path)
    try:
        (grad,) = torch.autograd.grad(score(ids.expand(257, -1)).sum(), path)
    finally:
        hook.remove()
    w = torch.full((257, 1, 1), 1 / 256)
    w[0] = w[-1] = 1 / 512
    want = ((grad * w).sum(0) * (e_x - e_b)[0]).sum(-1)  # (n,)
    assert abs(float(want[0])) > 1e-3
    assert max_err(got, want) < 1e-4, (got, want)
    assert abs(float(got.sum()) - (ex.score - ex.baseline_score)) < 1e-4  # completeness
    from attnlab.integrations.hf_text import _special_ends

    minilm = transformers.AutoTokenizer.from_pretrained(minilm_path())
    assert _special_ends(minilm) == (True, True)  # [CLS] and [SEP] kept


def test_encoder_without_a_last_special_token_attributes_its_last_word(tmp_path: Path) -> None:
    """The encoder path kept the last token in the baseline as if it were [SEP]: with a
    tokenizer that ends on a word, that word's integrated gradient was always 0."""
    model, tok = load_hf(minilm_path())

    class NoSep:  # MiniLM's tokenizer without its [SEP]
        def __getattr__(self, name: str) -> object:
            return getattr(tok, name)

        def __call__(self, s: str, add_special_tokens: bool = True) -> dict:
            ids = tok(s, add_special_tokens=add_special_tokens)["input_ids"]
            return {"input_ids": ids[:-1] if add_special_tokens else ids}

    assert hf_text_model(model, tok).keep_last == 1
    tm = hf_text_model(model, NoSep())
    assert (tm.keep_first, tm.keep_last) == (True, 0)
    ex = explain_text(tm, "cats purr loudly", tmp_path / "r.html", steps=64, log=lambda s: None)
    assert ex.tokens[-1] == "loudly"
    got = ex.saliency["integrated gradients"]
    assert got[0] == 0 and got[-1] != 0, got  # [CLS] kept, the last word attributed
    assert abs(sum(got) - (ex.score - ex.baseline_score)) < 0.02  # completeness, 64 steps


def test_a_decoder_named_for_conditional_generation_is_explained_as_one(tmp_path: Path) -> None:
    """Gemma 3's architecture, ``Gemma3ForConditionalGeneration``, is transformers' causal
    LM for its type; read by the name alone it was an encoder: ``--continuation`` was
    refused ("needs a decoder --hf-model; ... is an encoder (gemma3)") and a text was
    explained as a mean-pooled embedding."""
    _save_word_tokenizer(tmp_path)
    n = len(WORDS)
    text = {"vocab_size": n + 4, "hidden_size": 32, "intermediate_size": 64, "head_dim": 8}
    text |= {"num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2}
    vision = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1}
    vision |= {"num_attention_heads": 2, "image_size": 28, "patch_size": 14}
    cfg = transformers.Gemma3Config(
        text_config=text | {"sliding_window": 4},
        vision_config=vision,
        mm_tokens_per_image=4,
        image_token_index=n + 1,
        boi_token_index=n + 2,
        eoi_token_index=n + 3,
        architectures=["Gemma3ForConditionalGeneration"],
    )
    torch.manual_seed(0)
    transformers.Gemma3ForConditionalGeneration(cfg).save_pretrained(tmp_path)
    model, tk = load_hf(tmp_path)
    tm = hf_text_model(model, tk, text="the big dog sat", continuation="on a mat")
    ids = torch.tensor([list(tm.tokenize("the big dog sat"))])
    eager = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager")
    with torch.no_grad():
        logp = torch.log_softmax(eager.eval()(input_ids=ids).logits[0].double(), -1)  # (n, V)
        want = sum(float(logp[i - 1, int(ids[0, i])]) for i in range(4, ids.shape[1]))
        assert ids.shape[1] == 7 and abs(float(tm.pooled(ids)) - want) < 1e-5
