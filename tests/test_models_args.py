"""Argument checks of the models: bad ids, lengths and settings get a ValueError or
TypeError naming the argument (never an IndexError from deep inside ``nn.Embedding``),
and sampling follows the model's device and dtype. Every error test has a positive
control."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from attnlab.models import DocumentClassifier
from attnlab.models.bert import BertConfig, BertEncoder
from attnlab.models.gan import GAN, GANConfig, Generator, SelfAttention2d, draw_latents
from attnlab.models.lm import LanguageModel, LMConfig
from attnlab.models.sentence_folder import SentenceDense
from attnlab.models.seq2seq import Seq2Seq, Seq2SeqConfig
from attnlab.models.vae import VAE, VAEConfig, VAEOutput, vae_loss
from attnlab.tasks.captioning import CaptioningTask
from attnlab.tasks.classification import DocumentTask, make_documents
from attnlab.tasks.dates import DatesTask
from attnlab.tasks.generation import GenerationTask, make_sentences
from attnlab.tasks.translation import TranslationTask
from attnlab.tasks.vision import DigitsTask
from tests.conftest import check_and_control


def _bert() -> BertEncoder:
    cfg = BertConfig(
        vocab_size=50,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=4,
        intermediate_size=64,
    )
    return BertEncoder(cfg).eval()


@pytest.mark.parametrize(
    ("kw", "exc", "match"),
    [
        (
            {"token_type_ids": torch.full((2, 7), 5)},
            ValueError,
            r"token_type_ids must lie in \[0, type_vocab_size=2\), got values in \[5, 5\]",
        ),
        (
            {"token_type_ids": torch.full((2, 7), -1)},
            ValueError,
            r"token_type_ids must lie in \[0, type_vocab_size=2\), got values in \[-1, -1\]",
        ),
        (
            {"token_type_ids": torch.ones(2, 7)},
            TypeError,
            r"token_type_ids must hold int64 or int32 ids, got dtype torch\.float32",
        ),
        (
            {"positions": torch.tensor([-1, 0, 1, 2, 3, 4, 5])},
            ValueError,
            r"positions must lie in \[0, max_position_embeddings=512\), got values in \[-1, 5\]",
        ),
        (
            {"positions": torch.arange(7.0)},
            TypeError,
            r"positions must hold int64 or int32 ids, got dtype torch\.float32",
        ),
    ],
)
def test_bert_rejects_token_types_and_positions_outside_the_tables(
    kw: dict[str, torch.Tensor], exc: type[Exception], match: str
) -> None:
    bert, ids = _bert(), torch.randint(1, 50, (2, 7))
    ok = {"token_type_ids": torch.ones(2, 7, dtype=torch.long), "positions": torch.arange(7)}
    check_and_control(lambda: bert(ids, **kw), lambda: bert(ids, **ok), exc, match)


@pytest.mark.parametrize("dtype", [torch.int16, torch.uint8])
@pytest.mark.parametrize("name", ["input_ids", "token_type_ids", "positions"])
def test_bert_names_ids_of_dtypes_an_embedding_cannot_index(name: str, dtype: torch.dtype) -> None:
    """(int16 and uint8 ids passed BertEncoder's checks, then failed inside
    ``nn.Embedding`` with a RuntimeError naming 'argument #1 indices'.)"""
    bert = _bert()
    ok = {
        "input_ids": torch.randint(1, 50, (2, 7)),
        "token_type_ids": torch.ones(2, 7, dtype=torch.long),
        "positions": torch.arange(7),
    }
    what = "token ids" if name == "input_ids" else "ids"
    want = rf"{name} must hold int64 or int32 {what}, got dtype {re.escape(str(dtype))}"
    bad = {**ok, name: ok[name].to(dtype)}
    good = {**ok, name: ok[name].int()}
    check_and_control(lambda: bert(**bad), lambda: bert(**good), TypeError, want)


def test_bert_valid_token_types_and_positions_match_the_embedding_tables() -> None:
    bert, ids = _bert(), torch.randint(1, 50, (2, 7))
    types, pos = torch.ones(2, 7, dtype=torch.long), torch.tensor([6, 5, 4, 3, 2, 1, 0])
    emb = bert.embeddings
    want = emb.norm(
        emb.word_embeddings(ids) + emb.position_embeddings(pos) + emb.token_type_embeddings(types)
    )
    got = bert.layers[0](want)
    torch.testing.assert_close(bert(ids, types, positions=pos).hidden, got)


def _seq2seq() -> Seq2Seq:
    return Seq2Seq(Seq2SeqConfig(src_vocab=10, tgt_vocab=12, d_model=16, num_heads=2)).eval()


SRC = torch.tensor([[4, 5, 6]])
TGT = torch.tensor([[1, 7, 11]])
L3 = torch.tensor([3])


@pytest.mark.parametrize(
    ("call", "exc", "match"),
    [
        (
            lambda m: m.generate(SRC, torch.tensor([5])),
            ValueError,
            r"lengths must lie in \[1, Ls=3\]",
        ),
        (lambda m: m.generate(SRC, torch.tensor([0])), ValueError, r"got \[0\]"),
        (lambda m: m.generate(SRC, torch.tensor([3, 3])), ValueError, r"shape \(B,\) = \(1,\)"),
        (lambda m: m.generate(SRC, L3, max_len=-1), ValueError, r"max_len must be a positive int"),
        (lambda m: m.generate(SRC, L3, max_len=0), ValueError, r"max_len must be a positive int"),
        (lambda m: m.generate(SRC, L3, beam=True), TypeError, r"beam must be a positive int"),
        (lambda m: m.generate(SRC, L3, beam=0), ValueError, r"beam must be a positive int, got 0"),
        (
            lambda m: m.generate(torch.tensor([[4, 40, 6]]), L3),
            ValueError,
            r"src must lie in \[0, src_vocab=10\), got values in \[4, 40\]",
        ),
        (
            lambda m: m.generate(SRC.float(), L3),
            ValueError,
            r"src must be an integer tensor of token ids \(B, L\) .* dtype torch\.float32",
        ),
        (lambda m: m(SRC, torch.tensor([5]), TGT), ValueError, r"lengths must lie in \[1, Ls=3\]"),
        (
            lambda m: m(SRC, L3, torch.tensor([[1, 12]])),
            ValueError,
            r"tgt_in must lie in \[0, tgt_vocab=12\), got values in \[1, 12\]",
        ),
        (lambda m: m(SRC, L3, TGT[0]), ValueError, r"tgt_in must be an integer tensor"),
    ],
)
def test_seq2seq_checks_arguments_as_rnn_seq2seq_does(
    call: Callable[[Seq2Seq], object], exc: type[Exception], match: str
) -> None:
    m = _seq2seq()

    def ok() -> None:
        assert tuple(m(SRC, L3, TGT).shape) == (1, 3, 12)
        out = m.generate(torch.tensor([[4, 5, 6], [7, 0, 0]]), torch.tensor([3, 1]), beam=2)
        assert len(out) == 2 and all(len(o) <= 32 for o in out)

    check_and_control(lambda: call(m), ok, exc, match)


def _lm() -> LanguageModel:
    return LanguageModel(LMConfig(vocab_size=13, d_model=16, num_heads=2)).eval()


@pytest.mark.parametrize(
    ("eos_id", "exc", "match"),
    [
        (20, ValueError, r"eos_id must be an int in \[0, 13\), got 20"),
        (13, ValueError, r"eos_id must be an int in \[0, 13\), got 13"),
        (-1, ValueError, r"eos_id must be an int in \[0, 13\), got -1"),
        (1.5, TypeError, r"eos_id must be an int in \[0, 13\) or None, got 1\.5 \(float\)"),
        ("x", TypeError, r"eos_id must be an int in \[0, 13\) or None, got 'x' \(str\)"),
        (True, TypeError, r"eos_id must be an int in \[0, 13\) or None, got True \(bool\)"),
    ],
)
def test_lm_generate_checks_eos_id(eos_id: object, exc: type[Exception], match: str) -> None:
    lm, prompt = _lm(), torch.tensor([[1, 2]])
    greedy = lm.generate(prompt, 4, temperature=0.0)
    eos = int(greedy[0, 2])  # the first generated token: generation stops right after it

    def ok() -> None:
        for good in (eos, np.int64(eos)):
            out = lm.generate(prompt, 4, temperature=0.0, eos_id=good)  # type: ignore[arg-type]
            assert out.tolist() == [[1, 2, eos]]
        assert torch.equal(lm.generate(prompt, 4, temperature=0.0, eos_id=None), greedy)

    check_and_control(
        lambda: lm.generate(prompt, 4, temperature=0.0, eos_id=eos_id),  # type: ignore[arg-type]
        ok,
        exc,
        match,
    )


def _generative(kind: str) -> VAE | GAN:
    if kind == "vae":
        return VAE(VAEConfig(latent_dim=4, channels=8, attention=False))
    return GAN(GANConfig(latent_dim=4, channels=8, attention=False))


@pytest.mark.parametrize("kind", ["vae", "gan"])
@pytest.mark.parametrize("seeded", [False, True])
def test_sample_follows_the_model_device(kind: str, seeded: bool) -> None:
    # meta: a device other than the CPU that every machine has (the attention engines
    # read values, so the attention-free configs run there)
    model = _generative(kind).to("meta")
    gen = torch.Generator().manual_seed(0) if seeded else None
    out = model.sample(3, gen)
    assert out.device.type == "meta" and tuple(out.shape) == (3, 1, 8, 8)


@pytest.mark.parametrize("kind", ["vae", "gan"])
def test_sample_follows_the_model_dtype(kind: str) -> None:
    model = _generative(kind).double()
    out = model.sample(3, torch.Generator().manual_seed(0))
    assert out.dtype == torch.float64 and tuple(out.shape) == (3, 1, 8, 8)


@pytest.mark.parametrize("kind", ["vae", "gan"])
def test_seeded_cpu_samples_decode_the_generators_latents(kind: str) -> None:
    model = _generative(kind).eval()
    z = torch.randn(5, 4, generator=torch.Generator().manual_seed(7))  # the old draw
    decode = model.decode if isinstance(model, VAE) else model.generator
    want = decode(z)
    got = model.sample(5, torch.Generator().manual_seed(7))
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_draw_latents_checks_its_arguments() -> None:
    lin = nn.Linear(4, 1)
    check_and_control(
        lambda: draw_latents(2, 4, lin, 0),  # type: ignore[arg-type]
        lambda: draw_latents(2, 4, lin, torch.Generator()),
        TypeError,
        r"generator must be a torch\.Generator or None, got int",
    )
    check_and_control(
        lambda: draw_latents(0, 4, lin),
        lambda: draw_latents(1, 4, lin),
        ValueError,
        r"n must be a positive int, got 0",
    )


def _small_models() -> dict[str, tuple[nn.Module, Callable[..., object], tuple]]:
    """The models whose ids met a bare ``nn.Embedding`` (IndexError): each with a call and
    its valid arguments."""
    from attnlab.models import Captioner, CaptionerConfig, DocumentClassifier
    from attnlab.models.rnn import RNNSeq2Seq, RNNSeq2SeqConfig

    rnn = RNNSeq2Seq(RNNSeq2SeqConfig(5, 6, embed_dim=4, hidden=4, decoder_hidden=4, attn_dim=4))
    cap = Captioner(CaptionerConfig(5, image_size=8, d_model=8, num_heads=2, embed_dim=4,
                                    hidden_dim=4, attention_dim=4))  # fmt: skip
    doc = DocumentClassifier(5, 3, embed_dim=4, word_hidden=2, sentence_hidden=2)
    img, two = torch.rand(1, 3, 8, 8), torch.tensor([3, 2])
    return {
        "src": (rnn, lambda s: rnn(s, two, torch.ones(2, 2, dtype=torch.long)),
                (torch.tensor([[4, 1, 2], [3, 1, 0]]),)),
        "tgt_in": (rnn, lambda t: rnn(torch.tensor([[4, 1, 2], [3, 1, 0]]), two, t),
                   (torch.tensor([[1, 5], [1, 2]]),)),
        "words": (cap, lambda w: cap(img, w), (torch.tensor([[1, 4]]),)),
        "ids": (doc, lambda i: doc(i), (torch.tensor([[[4, 1]]]),)),
    }  # fmt: skip


@pytest.mark.parametrize(
    ("name", "bad", "match"),
    [
        ("src", torch.tensor([[4, 7, 2], [3, 1, 0]]), r"src must lie in \[0, src_vocab=5\)"),
        ("tgt_in", torch.tensor([[1, 6], [1, 2]]), r"tgt_in must lie in \[0, tgt_vocab=6\)"),
        ("words", torch.tensor([[1, 9]]), r"words must lie in \[0, vocab_size=5\), got .*\[1, 9\]"),
        ("ids", torch.tensor([[[7, 1]]]), r"ids must lie in \[0, vocab_size=5\), got .*\[1, 7\]"),
        ("ids", torch.tensor([[[-1, 1]]]), r"ids must lie in \[0, vocab_size=5\), got .*\[-1, 1\]"),
    ],
)
def test_ids_outside_the_vocabulary_are_named(name: str, bad: torch.Tensor, match: str) -> None:
    model, call, good = _small_models()[name]
    model.eval()
    check_and_control(lambda: call(bad), lambda: call(*good), ValueError, match)


@pytest.mark.parametrize("dtype", [torch.int16, torch.uint8, torch.bool])
@pytest.mark.parametrize("name", ["src", "tgt_in", "words", "ids"])
def test_ids_of_dtypes_an_embedding_cannot_index_are_named(name: str, dtype: torch.dtype) -> None:
    """(int16, uint8 and bool ids passed the checks of RNNSeq2Seq, Seq2Seq, Captioner and
    DocumentClassifier, then failed inside ``nn.Embedding`` with a RuntimeError naming
    'argument #1 indices'.)"""
    model, call, (good,) = _small_models()[name]
    model.eval()
    want = rf"{name} must hold int64 or int32 token ids, got dtype {re.escape(str(dtype))}"
    check_and_control(lambda: call(good.to(dtype)), lambda: call(good.int()), TypeError, want)
    if name in ("src", "tgt_in"):  # the transformer Seq2Seq shares the check
        s, src, tgt = _seq2seq(), SRC, TGT
        bad = (src.to(dtype), L3, tgt) if name == "src" else (src, L3, tgt.to(dtype))
        check_and_control(lambda: s(*bad), lambda: s(src, L3, tgt), TypeError, want)


def test_seq2seq_generate_and_captioner_name_inputs_that_are_not_tensors() -> None:
    """(``Seq2Seq.generate(src=[[4, 5]])`` or ``src=None`` and ``Captioner(images=<list>,
    words)`` raised AttributeError: 'list' object has no attribute 'shape'.)"""
    from attnlab.models import Captioner

    s = _seq2seq()
    for src in ([[4, 5, 6]], None):
        check_and_control(
            lambda x=src: s.generate(x, L3),  # type: ignore[arg-type]
            lambda: s.generate(SRC, L3, max_len=2),
            TypeError,
            r"src must be a torch\.Tensor of token ids \(B, L\), got <class '(list|NoneType)'>",
        )
    cap, call, (words,) = _small_models()["words"]
    assert isinstance(cap, Captioner)
    check_and_control(
        lambda: cap([[0.0]], words),  # type: ignore[arg-type]
        lambda: call(words),
        TypeError,
        r"images must be a torch\.Tensor \(B, C, H, W\), got list",
    )


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: Seq2SeqConfig(10, 5, d_model=8, num_heads=2, eos=7), r"eos must be a token id "
         r"in \[0, tgt_vocab=5\), got 7"),
        (lambda: Seq2SeqConfig(0, 5, d_model=8, num_heads=2), "src_vocab must be a positive int"),
        (lambda: Seq2SeqConfig(10, 5, d_model=0, num_heads=2), "d_model must be a positive int, "
         "got 0"),
        (lambda: Seq2SeqConfig(10, 5, d_model=8, num_heads=2, encoder_layers=0),
         "encoder_layers must be a positive int, got 0"),
        (lambda: Seq2SeqConfig(10, 5, d_model=8, num_heads=2, decoder_layers=0),
         "decoder_layers must be a positive int, got 0"),
        (lambda: _rnn_cfg(bos=9), r"bos must be a token id in \[0, tgt_vocab=5\), got 9"),
        (lambda: _rnn_cfg(attn_dim=0), "attn_dim must be a positive int, got 0"),
        (lambda: _cap_cfg(eos=-1), r"eos must be a token id in \[0, vocab_size=5\), got -1"),
        (lambda: LMConfig(vocab_size=5, d_model=8, num_heads=2, dim_feedforward=0),
         "dim_feedforward must be a positive int, got 0"),
    ],
)  # fmt: skip
def test_configs_outside_their_ranges_are_refused_when_built(
    make: Callable[[], object], match: str
) -> None:
    """(A BOS or EOS outside the vocabulary failed at decoding with an IndexError; an
    ``attn_dim`` of 0 was named ``hidden_dim``; ``dim_feedforward=0`` became 4 * d_model;
    Seq2Seq's ``d_model=0`` was named ``dim``, its encoder/decoder_layers ``num_layers``.)"""
    from attnlab.models import Captioner, CaptionerConfig
    from attnlab.models.rnn import RNNSeq2Seq, RNNSeq2SeqConfig

    kinds = {Seq2SeqConfig: Seq2Seq, RNNSeq2SeqConfig: RNNSeq2Seq, CaptionerConfig: Captioner,
             LMConfig: LanguageModel}  # fmt: skip
    cfg = make()
    with pytest.raises(ValueError, match=match):
        kinds[type(cfg)](cfg)  # type: ignore[index]
    kinds[type(cfg)](_good(cfg))  # type: ignore[index]  # the control


def _rnn_cfg(**kw: int) -> object:
    from attnlab.models.rnn import RNNSeq2SeqConfig

    base = {"embed_dim": 4, "hidden": 4, "decoder_hidden": 4, "attn_dim": 4}
    return RNNSeq2SeqConfig(10, 5, **{**base, **kw})


def _cap_cfg(**kw: int) -> object:
    from attnlab.models import CaptionerConfig

    base = {"image_size": 8, "d_model": 8, "num_heads": 2, "embed_dim": 4, "hidden_dim": 4}
    return CaptionerConfig(5, **{**base, "attention_dim": 4, **kw})


def _good(cfg: object) -> object:
    """``cfg`` with its defaults where the bad value was."""
    import dataclasses

    names = ("bos", "eos", "attn_dim", "dim_feedforward")
    over = {f.name: f.default for f in dataclasses.fields(cfg) if f.name in names}  # type: ignore[arg-type]
    sizes = {"src_vocab": 10, "d_model": 8, "encoder_layers": 1, "decoder_layers": 1}
    zeros = {n: v for n, v in sizes.items() if getattr(cfg, n, 1) == 0}
    return dataclasses.replace(cfg, **over, **zeros)  # type: ignore[type-var]


def _vae_out() -> VAEOutput:
    return VAEOutput(torch.zeros(1, 1, 8, 8), torch.zeros(1, 2), torch.zeros(1, 2))


@pytest.mark.parametrize(
    ("call", "exc", "match"),
    [  # each was accepted (or failed later inside torch, naming nothing)
        (lambda: GANConfig(attention="no"), TypeError, "attention must be a bool, got str"),
        (lambda: VAEConfig(attention=1), TypeError, "attention must be a bool, got int"),
        (lambda: VAEConfig(sigma=float("inf")), ValueError, "sigma must be a finite number > 0"),
        (lambda: VAEConfig(sigma="1"), TypeError, "sigma must be a number, got str"),
        (lambda: draw_latents(2, 0, nn.Linear(2, 1)), ValueError, "latent_dim must be a positive"),
        (lambda: vae_loss(_vae_out(), torch.zeros(1, 1, 8, 8), 0.0), ValueError,
         "sigma must be a finite"),
    ],
)  # fmt: skip
def test_generative_configs_check_their_flags_and_scales(
    call: Callable[[], object], exc: type[Exception], match: str
) -> None:
    with pytest.raises(exc, match=match):
        call()
    assert GANConfig(attention=False).attention is False  # the control
    assert VAEConfig(sigma=0.25).sigma == 0.25


@pytest.mark.parametrize(
    ("flag", "value"), [("normalize", "no"), ("lowercase", 1), ("lowercase", None)]
)
def test_sentence_config_flags_must_be_bools(flag: str, value: object) -> None:
    """(normalize="no" normalized and lowercase=1 lowercased: any truthy value passed.)"""
    import numpy as np

    from attnlab.models import SentenceConfig

    with pytest.raises(TypeError, match=f"^{flag} must be a bool, got {type(value).__name__}$"):
        SentenceConfig(**{flag: value})  # type: ignore[arg-type]
    cfg = SentenceConfig(**{flag: np.bool_(True)})  # the control: numpy's bool, as a bool
    assert getattr(cfg, flag) is True


@pytest.mark.parametrize(
    ("make", "exc", "match"),
    [
        (lambda: DigitsTask(100, label_smoothing=2.0), ValueError,
         r"label_smoothing must be a number in \[0, 1\)"),
        (lambda: DigitsTask(100, label_smoothing=-0.1), ValueError,
         "label_smoothing must be a number in"),
        (lambda: DigitsTask(100, seed=-1), ValueError, "seed must be"),
        (lambda: TranslationTask(150, 5, seed="a"), TypeError, "seed must be"),
        (lambda: DatesTask(20, 5, seed=None, locales=("de_DE",)), TypeError, "seed must be"),
        (lambda: GenerationTask(60, 10, seed=-7, d_model=16, num_heads=2), ValueError,
         "seed must be an int >= 0, got -7"),
        (lambda: GenerationTask(60, 10, seed="abc", d_model=16, num_heads=2), TypeError,
         "seed must be an int >= 0, got 'abc'"),
        (lambda: GenerationTask(60, 10, seed=None, d_model=16, num_heads=2), TypeError,
         "seed must be an int >= 0, got None"),
        (lambda: make_sentences(5, seed=-1), ValueError, "seed must be an int >= 0, got -1"),
        (lambda: make_sentences(-1, seed=0), ValueError, "n must be an int >= 0, got -1"),
        (lambda: make_sentences("5", seed=0), TypeError, "n must be an int >= 0, got '5'"),
        (lambda: DocumentClassifier(9, 2, dropout=2.0), ValueError,
         r"dropout must be in \[0, 1\), got 2.0"),
        (lambda: DocumentClassifier(9, 2, embed_dim=2.0), TypeError,  # (failed in nn.Embedding)
         r"^embed_dim must be a positive int, got 2.0 \(float\)"),
        (lambda: DocumentClassifier(9, 2, word_hidden=2.0), TypeError,
         r"^word_hidden must be a positive int, got 2.0 \(float\)"),
        (lambda: DocumentTask(40, 8, seed=-7), ValueError, "seed must be an int >= 0, got -7"),
        (lambda: DocumentTask(40, 8, seed="x"), TypeError, "seed must be an int >= 0, got 'x'"),
        (lambda: make_documents(3, seed=-1), ValueError, "seed must be an int >= 0, got -1"),
        (lambda: CaptioningTask(20, 4, seed=-7), ValueError, "seed must be an int >= 0, got -7"),
        (lambda: CaptioningTask(20, 4, seed=2.0), TypeError, "seed must be an int >= 0, got 2.0"),
    ],
)  # fmt: skip
def test_tasks_name_bad_seeds_and_label_smoothing(
    make: Callable[[], object], exc: type[Exception], match: str
) -> None:
    """(label_smoothing=2.0 failed at the first step, -0.1 trained; a seed of None or "a"
    failed inside torch's manual_seed. Python's random.Random, which draws the generation,
    classification and captioning data, takes abs(seed): seed=-7 gave seed=7's data, and
    "abc" or None were taken as seeds.)"""
    with pytest.raises(exc, match=match):
        make()


def test_a_good_seed_still_draws_the_data() -> None:
    """The control of the seed checks: 0 and numpy's ints are seeds."""
    assert make_sentences(3, seed=np.int64(7)) == make_sentences(3, seed=7)
    assert len(make_documents(3, seed=0)) == 3
    assert CaptioningTask(4, 2, seed=0).num_train() == 4


@pytest.mark.parametrize(
    ("make", "exc", "match"),
    [  # '5' and 2.5 failed inside split_dates ("'<' not supported", "slice indices"), True
       # was a test_size of 1; '0.2' failed at "'<' not supported between float and str"
        (lambda: DatesTask(20, "5", locales=("de_DE",)), TypeError,
         r"test_size must be a positive int, got '5' \(str\)"),
        (lambda: DatesTask(20, 2.5, locales=("de_DE",)), TypeError,
         r"test_size must be a positive int, got 2.5 \(float\)"),
        (lambda: DatesTask(20, True, locales=("de_DE",)), TypeError,
         r"test_size must be a positive int, got True \(bool\)"),
        (lambda: CaptioningTask(20, 4, held_out="0.2"), TypeError,
         r"held_out must be a number in \(0, 1\), got str '0.2'"),
        (lambda: DigitsTask(100, test_fraction="0.2"), TypeError,
         r"test_fraction must be a number in \(0, 1\), got str '0.2'"),
        (lambda: DigitsTask(100, test_fraction=0.0), ValueError,
         r"test_fraction must be a number in \(0, 1\), got 0.0"),
    ],
)  # fmt: skip
def test_tasks_name_split_sizes_of_the_wrong_type(
    make: Callable[[], object], exc: type[Exception], match: str
) -> None:
    with pytest.raises(exc, match=match):
        make()


def test_good_split_sizes_pass() -> None:
    """The control of the split size checks."""
    assert len(DatesTask(20, 5, locales=("de_DE",)).test) == 5
    assert CaptioningTask(4, 2, held_out=0.5).num_train() == 4
    assert len(DigitsTask(100, test_fraction=0.25).test_y) == 450


def _decoders() -> tuple[Seq2Seq, object, object]:
    from attnlab.models.captioner import Captioner, CaptionerConfig
    from attnlab.models.rnn import RNNSeq2Seq, RNNSeq2SeqConfig

    torch.manual_seed(0)
    s = Seq2Seq(Seq2SeqConfig(9, 4, 16, 2, dim_feedforward=32, dropout=0.0)).eval()
    r = RNNSeq2Seq(RNNSeq2SeqConfig(9, 7, 8, 8, 16, 8)).eval()
    c = Captioner(CaptionerConfig(7, image_size=8, d_model=8, num_heads=2, embed_dim=8,
                                  hidden_dim=8, attention_dim=8)).eval()  # fmt: skip
    return s, r, c


def test_an_empty_batch_decodes_to_nothing() -> None:
    """B = 0 crashed: the fused linear's residual reshape (Seq2Seq, under no_grad) and
    packing (RNNSeq2Seq); the language model and the captioner already gave []."""
    s, r, c = _decoders()
    src, lengths = torch.zeros(0, 3, dtype=torch.long), torch.zeros(0, dtype=torch.long)
    assert s.generate(src, lengths, max_len=3) == [] == s.generate(src, lengths, beam=2)
    assert r.generate(src, lengths, max_len=3) == []  # type: ignore[attr-defined]
    assert c.generate(torch.rand(0, 3, 8, 8), max_len=3) == []  # type: ignore[attr-defined]
    with torch.no_grad():
        assert s.encode(src, lengths).shape == (0, 3, 16)
    assert len(s.generate(torch.tensor([[3, 4, 5]]), torch.tensor([3]), max_len=3)) == 1


def test_an_empty_batch_gets_empty_teacher_forced_logits() -> None:
    """(RNNSeq2Seq.forward with B = 0 raised 'Cannot pack empty tensors.' from its
    encoder; Seq2Seq and the captioner already gave (0, Lt, V).)"""
    s, r, c = _decoders()
    src, lengths = torch.zeros(0, 3, dtype=torch.long), torch.zeros(0, dtype=torch.long)
    tgt = torch.ones(0, 2, dtype=torch.long)
    assert tuple(s(src, lengths, tgt).shape) == (0, 2, 4)
    assert tuple(r(src, lengths, tgt).shape) == (0, 2, 7)  # type: ignore[operator]
    assert tuple(c(torch.rand(0, 3, 8, 8), tgt).shape) == (0, 2, 7)  # type: ignore[operator]
    memory, state = r.encode(src, lengths)  # type: ignore[attr-defined]
    assert memory.states.shape == (0, 3, 16) and memory.keep.shape == (0, 3)
    assert state.shape == (0, 16)
    one = (torch.tensor([[3, 4, 0]]), torch.tensor([2]), torch.tensor([[1, 5]]))
    pair = (torch.tensor([[3, 4, 0], [5, 6, 7]]), torch.tensor([2, 3]), torch.ones(2, 2).long())
    pair[2][0] = one[2][0]
    torch.testing.assert_close(r(*one)[0], r(*pair)[0])  # type: ignore[operator]  # control


def test_lengths_and_caption_words_are_checked_by_name() -> None:
    """Float lengths were read two ways by RNNSeq2Seq (packing cut 1.5 to 1, the mask
    kept 2) and named an internal ``key_lengths`` in Seq2Seq; float caption words or
    none reached torch's own errors."""
    s, r, c = _decoders()
    src, tgt = torch.tensor([[3, 4, 5]]), torch.tensor([[1, 2]])
    for model in (s, r):
        check_and_control(
            lambda m=model: m(src, torch.tensor([1.5]), tgt),  # type: ignore[operator]
            lambda m=model: m(src, torch.tensor([2]), tgt),  # type: ignore[operator]
            TypeError,
            "lengths must hold integers",
        )
    images = torch.rand(1, 3, 8, 8)
    ok = lambda: c(images, torch.tensor([[1, 2]]))  # type: ignore[operator]  # noqa: E731
    for words in (torch.tensor([[1.0, 2.0]]), torch.zeros(1, 0, dtype=torch.long)):
        check_and_control(lambda w=words: c(images, w), ok, ValueError, "words must be an integer")  # type: ignore[operator]


def _vae_batch(b: int, mu_b: int | None = None) -> VAEOutput:
    m = b if mu_b is None else mu_b
    return VAEOutput(torch.zeros(b, 1, 8, 8), torch.zeros(m, 2), torch.zeros(m, 2))


def test_vae_loss_checks_batches_and_sigma() -> None:
    """A batch of 4 outputs against 1 image broadcast (4 images' error summed, over 1), an
    empty batch gave NaN and sigma="0.5" failed comparing a str with 0."""
    ok = lambda: vae_loss(_vae_batch(2), torch.ones(2, 1, 8, 8), 1.0)  # noqa: E731
    shapes = r"out.recon and images must have the same shape \(B, 1, 8, 8\), got out.recon "
    cases = [
        (lambda: vae_loss(_vae_batch(4), torch.ones(1, 1, 8, 8), 1.0), ValueError,
         shapes + r"\(4, 1, 8, 8\) and images \(1, 1, 8, 8\)"),
        (lambda: vae_loss(_vae_batch(1), torch.ones(4, 1, 8, 8), 1.0), ValueError,
         shapes + r"\(1, 1, 8, 8\) and images \(4, 1, 8, 8\)"),
        (lambda: vae_loss(_vae_batch(2, 1), torch.ones(2, 1, 8, 8), 1.0), ValueError,
         r"out.mu and out.logvar must have shape \(B, latent_dim\) with images' B = 2, got "
         r"out.mu \(1, 2\) and out.logvar \(1, 2\)"),
        (lambda: vae_loss(_vae_batch(0), torch.zeros(0, 1, 8, 8), 1.0), ValueError,
         r"images must hold at least 1 image, got shape \(0, 1, 8, 8\)"),
        (lambda: vae_loss(_vae_batch(2), torch.ones(2, 1, 8, 8), "0.5"), TypeError,
         "sigma must be a number, got str '0.5'"),
    ]  # fmt: skip
    for call, exc, match in cases:
        check_and_control(call, ok, exc, match)
    assert [float(t) for t in ok()] == [32.0, 32.0, 0.0]  # 64 / 2 per image, / 2 images


def test_vae_loss_names_an_output_or_images_of_the_wrong_type() -> None:
    """(out a tuple or None, or images a list, failed with a bare AttributeError on
    ``.recon`` or ``.shape``.)"""
    out, x = _vae_batch(2), torch.ones(2, 1, 8, 8)
    ok = lambda: vae_loss(out, x, 1.0)  # noqa: E731
    cases = [
        ((out.recon, out.mu, out.logvar), x, "out must be a VAEOutput (what VAE returns), "
                                             "got tuple"),
        (None, x, "out must be a VAEOutput (what VAE returns), got NoneType"),
        (out, x.tolist(), "images must be a tensor (B, 1, 8, 8), got list"),
    ]  # fmt: skip
    for o, images, message in cases:
        check_and_control(
            lambda o=o, i=images: vae_loss(o, i, 1.0), ok, TypeError, f"^{re.escape(message)}$"
        )


def test_gan_layers_name_bad_inputs() -> None:
    """A 3-D map failed unpacking its shape, one of the wrong channels inside a conv, an
    integer z inside a linear layer; spectral="no" was truthy: spectral norm on."""
    torch.manual_seed(0)
    att, x = SelfAttention2d(8), torch.zeros(1, 8, 4, 4)
    shape = r"x must have shape \(B, C, H, W\) with C = channels = 8, got "
    for bad in (torch.zeros(8, 4, 4), torch.zeros(1, 4, 4, 4)):
        want = shape + re.escape(str(tuple(bad.shape)))
        check_and_control(lambda b=bad: att(b), lambda: att(x), ValueError, want)
        check_and_control(lambda b=bad: att.weights(b), lambda: att.weights(x), ValueError, want)
    check_and_control(
        lambda: att(x.long()), lambda: att(x), TypeError, r"x must be a floating-point tensor"
    )
    z = torch.zeros(2, 2)
    g, vae = Generator(GANConfig(latent_dim=2, channels=8)), VAE(VAEConfig(2, channels=8))
    for run in (g, vae.decode):
        check_and_control(
            lambda r=run: r(z.long()),
            lambda r=run: r(z),
            TypeError,
            r"z must be a floating-point tensor \(torch.float32, the model's dtype\), got "
            r"dtype torch.int64",
        )
    check_and_control(
        lambda: SelfAttention2d(8, spectral="no"),  # type: ignore[arg-type]
        lambda: SelfAttention2d(8, spectral=False),
        TypeError,
        "spectral must be a bool, got str",
    )
    assert not hasattr(SelfAttention2d(8, spectral=False).query, "parametrizations")


def test_self_attention_2d_names_an_input_of_another_dtype() -> None:
    """(float64 into a float32 layer failed in a conv as "expected scalar type Double but
    found Float"; the check reads gamma's dtype, so the spectral norm's u is not stepped.)"""
    torch.manual_seed(0)
    att = SelfAttention2d(8).train()
    x = torch.randn(1, 8, 4, 4, dtype=torch.float64)
    u = att.query.parametrizations.weight[0]._u.clone()
    want = r"^x must be of the model's dtype torch.float32, got torch.float64$"
    for call in (att, att.weights):
        with pytest.raises(TypeError, match=want):
            call(x)
    assert torch.equal(att.query.parametrizations.weight[0]._u, u)  # no power step
    att64 = SelfAttention2d(8, spectral=False).double()  # control: a float64 layer
    assert att64.weights(x).dtype == torch.float64 and torch.equal(att64(x), x)  # gamma = 0


def _small_task(name: str) -> object:
    from attnlab.tasks.captioning import CaptioningTask
    from attnlab.tasks.generation import GenerationTask

    return {
        "translation": lambda: TranslationTask(150, 4, d_model=16, num_heads=2, layers=1),
        "dates": lambda: DatesTask(8, 4, embed_dim=8, hidden=8, decoder_hidden=8, attn_dim=8),
        "captioning": lambda: CaptioningTask(8, 4, d_model=16, hidden_dim=16),
        "generation": lambda: GenerationTask(60, 4, d_model=16, num_heads=2),
    }[name]()


@pytest.mark.parametrize("name", ["translation", "dates", "captioning", "generation"])
def test_evaluate_limit_is_checked(name: str) -> None:
    """``limit or eval_size``: 0 meant the default, -1 scored all but the last example,
    2.5 failed slicing (a bare TypeError)."""
    task = _small_task(name)
    torch.manual_seed(0)
    model = task.build_model().eval()  # type: ignore[attr-defined]
    for bad, exc in ((0, ValueError), (-1, ValueError), (2.5, TypeError), (True, TypeError)):
        with pytest.raises(exc, match=re.escape(f"limit must be a positive int, got {bad}")):
            task.evaluate(model, limit=bad)  # type: ignore[attr-defined]
    assert task.evaluate(model, limit=1)["score"] >= 0  # type: ignore[attr-defined]
    if name == "generation":
        with pytest.raises(ValueError, match="limit must be a positive int, got 0"):
            task.perplexity(model, limit=0)  # type: ignore[attr-defined]


def _outputs(name: str, task: object, model: object, batch_size: object) -> list[str]:
    """The task's decoding method on 3 held-out inputs, ``batch_size`` at a time."""
    t: Any = task
    if name == "translation":
        return t.translate(model, [s for s, _ in t.test_pairs[:3]], batch_size=batch_size)
    if name == "dates":
        return t.convert(model, t.test[:3], batch_size=batch_size)
    return t.caption(model, t.test_images[:3], batch_size=batch_size)


@pytest.mark.parametrize("name", ["translation", "dates", "captioning"])
def test_decoding_batch_size_is_checked(name: str) -> None:
    """(translate and convert with batch_size=-1 returned [] for 3 inputs, with 0 raised
    'range() arg 3 must not be zero'; caption with 0 or -1 raised a RuntimeError from
    torch's split.)"""
    task = _small_task(name)
    torch.manual_seed(0)
    model = task.build_model().eval()  # type: ignore[attr-defined]
    for bad, exc in ((-1, ValueError), (0, ValueError), (2.5, TypeError), (True, TypeError)):
        with pytest.raises(exc, match=re.escape(f"batch_size must be a positive int, got {bad}")):
            _outputs(name, task, model, bad)
    # the control: one output per input at any batch size (translate's max_len follows its
    # batch's longest sentence, so only whole-batch outputs are compared)
    assert [len(_outputs(name, task, model, b)) for b in (1, 2)] == [3, 3]
    assert _outputs(name, task, model, 3) == _outputs(name, task, model, 500)


def test_inputs_of_another_dtype_than_the_model_are_named() -> None:
    """(float64 inputs into float32 layers raised torch's bare "mat1 and mat2 must have the
    same dtype" or "Input type (double) and bias type (float)"; linformer_attention took a
    list as proj_k (AttributeError) and blamed k and v for projections of two sizes.) Under
    ``torch.autocast`` the layers cast for themselves, and the check stands aside."""
    from attnlab.models.captioner import Captioner, CaptionerConfig
    from attnlab.models.vit import ViT, ViTConfig
    from attnlab.nn import (
        AttentionPooling,
        HierarchicalAttention,
        LinformerAttention,
        MultiHeadAttention,
    )
    from attnlab.nn.linformer import linformer_attention

    x64 = torch.randn(1, 4, 8, dtype=torch.float64)
    vit = ViT(ViTConfig(d_model=16, num_heads=2, layers=1))
    cap = Captioner(CaptionerConfig(12))
    q = k = v = torch.randn(1, 2, 6, 4)
    p = torch.randn(3, 8)
    for call, error, match in (
        (lambda: MultiHeadAttention(8, 2)(x64), TypeError, "query must be of the model's dtype"),
        (lambda: MultiHeadAttention(8, 2)(x64.float(), x64), TypeError, "key must be of the mod"),
        (lambda: LinformerAttention(8, 2, max_len=6, proj_dim=3)(x64), TypeError, "query must"),
        (lambda: AttentionPooling(8)(x64), TypeError, "h must be of the model's dtype"),
        (lambda: HierarchicalAttention(8, 4, 3)(x64[None]), TypeError, "words must be of the"),
        (lambda: vit(torch.rand(2, 1, 8, 8).double()), TypeError, "images must be of the mod"),
        (lambda: cap.generate(torch.rand(2, 3, 32, 32).double()), TypeError, "images must be"),
        (lambda: linformer_attention(q, k, v, p.tolist(), p), TypeError, "proj_k must be a Tensor"),
        (lambda: linformer_attention(q, k, v, p.double(), p), TypeError, "proj_k must be of k's"),
        (lambda: linformer_attention(q, k[0], v[0], p, p), ValueError, r"k must be \(B, H, L, E\)"),
        (lambda: linformer_attention(q, k, v, p, torch.randn(5, 8)), ValueError, "P=3 and P=5"),
        (lambda: linformer_attention(q, k, v.double(), p, p), TypeError,
         r"^v must be of k's dtype torch.float32, got torch.float64$"),  # (torch's "expected
    ):  # scalar type Float but found Double")  # fmt: skip
        with pytest.raises(error, match=match):
            call()
    mha = MultiHeadAttention(8, 2)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the control: autocast casts itself
        assert mha(x64.float().bfloat16()).dtype == torch.bfloat16
    assert vit(torch.rand(2, 1, 8, 8)).shape == (2, 10)


def _bert_cfg(**kw: Any) -> BertConfig:
    return BertConfig(vocab_size=30, hidden_size=16, num_attention_heads=2, **kw)


# (the call with the bad option, the same call fixed, error, message)
OPTION_CASES: list[tuple[Callable[[], object], Callable[[], object], type, str]] = [
    (lambda: SentenceDense(4, 4, use_residual="False"),
     lambda: SentenceDense(4, 4, use_residual=np.bool_(False)), TypeError,
     r"^use_residual must be a bool, got str"),
    (lambda: SentenceDense(4, 4, bias=None), lambda: SentenceDense(4, 4, bias=False), TypeError,
     r"^bias must be a bool, got NoneType"),
    (lambda: SentenceDense(4, 4, bias=0), lambda: SentenceDense(4, 4, bias=True), TypeError,
     r"^bias must be a bool, got int"),
    (lambda: SentenceDense(4, 4, activation=["Tanh"]),
     lambda: SentenceDense(4, 4, activation="Tanh"), TypeError,
     r"^activation must be one of \(.*\), got list \['Tanh'\]"),
    (lambda: _bert_cfg(hidden_act=["gelu"]), lambda: _bert_cfg(hidden_act="gelu"), TypeError,
     r"^BertConfig.hidden_act must be one of \(.*\), got list"),
]  # fmt: skip


@pytest.mark.parametrize(("bad", "ok", "exc", "match"), OPTION_CASES)
def test_flags_and_choices_are_named(
    bad: Callable[[], object], ok: Callable[[], object], exc: type, match: str
) -> None:
    """SentenceDense's flags are checked (use_residual="False" turned the residual on, bias
    None, 0 or a tensor were taken) and a list for a choice is a named TypeError (it raised
    "unhashable type: 'list'")."""
    check_and_control(bad, ok, exc, match)


@pytest.mark.parametrize(
    ("bad", "ok", "exc", "match"),
    [
        (lambda: LanguageModel(LMConfig(50, d_model=32, rope_base=-1.0)),
         lambda: LanguageModel(LMConfig(50, d_model=32, rope_base=500.0)), ValueError,
         r"^rope_base must be a finite number > 0, got -1.0"),
        (lambda: LanguageModel(LMConfig(50, d_model=36, num_heads=4)),
         lambda: LanguageModel(LMConfig(50, d_model=40, num_heads=4)), ValueError,
         r"^d_model=36 must be a multiple of num_heads=4 with an even head dim .*, got 9$"),
        (lambda: _bert_cfg(layer_norm_eps=0.0), lambda: _bert_cfg(layer_norm_eps=1e-6),
         ValueError, r"^BertConfig.layer_norm_eps must be a finite number > 0, got 0.0"),
    ],
)  # fmt: skip
def test_config_errors_name_the_config_field(
    bad: Callable[[], object], ok: Callable[[], object], exc: type, match: str
) -> None:
    """An LMConfig's rope_base was named base and an odd head dim said "pass rotary_dim=8"
    (RotaryEmbedding's words: LMConfig has no rotary_dim); BertConfig took layer_norm_eps=0.0,
    refused only by BertEncoder as norm_eps."""
    with pytest.raises(exc, match=match):
        bad()
    ok()
