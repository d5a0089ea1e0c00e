"""The generation task: num2words/Babel sentences, n-gram baselines, LM training."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import pytest
import torch

pytest.importorskip("num2words")
pytest.importorskip("babel")

from attnlab.models.lm import LanguageModel
from attnlab.tasks import generation as G
from attnlab.train import TrainConfig, Trainer


@pytest.fixture(scope="module")
def task() -> G.GenerationTask:
    return G.GenerationTask(
        train_size=600, test_size=60, eval_size=60, d_model=32, num_heads=2, dim_feedforward=64
    )


def test_sentences_are_deterministic_and_distinct() -> None:
    a, b = G.make_sentences(200, seed=5), G.make_sentences(200, seed=5)
    assert a == b and len(set(a)) == 200
    assert G.make_sentences(200, seed=6) != a


def test_held_out_sentences_never_occur_in_training(task: G.GenerationTask) -> None:
    train = {G._text(p) for p in task.train_pairs}
    assert not train & {G._text(p) for p in task.test_pairs}
    assert len(task.test_pairs) == 60 and task.num_train() == 600


_UNITS = [
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "eleven",
    "twelve",
    "thirteen",
    "fourteen",
    "fifteen",
    "sixteen",
    "seventeen",
    "eighteen",
    "nineteen",
]
_TENS = ["twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]


def _words_to_int(text: str) -> int:
    """English number words below a million, read back by hand."""
    total = cur = 0
    for w in text.replace(",", " ").replace("-", " ").split():
        if w in _UNITS:
            cur += _UNITS.index(w)
        elif w in _TENS:
            cur += 20 + 10 * _TENS.index(w)
        elif w == "hundred":
            cur *= 100
        elif w == "thousand":
            total, cur = total + cur * 1000, 0
        else:
            assert w == "and", w
    return total + cur


def test_sentences_state_true_facts() -> None:
    """Each family's completion, recomputed from its prompt with num2words / Babel / datetime."""
    import datetime as dt

    from babel.dates import format_date
    from num2words import num2words

    months = {format_date(dt.date(2000, m, 1), "MMMM", locale="en"): m for m in range(1, 13)}

    def parse_en(text: str) -> dt.date:  # "November 21, 2026"
        month, day, year = text.replace(",", "").split()
        return dt.date(int(year), months[month], int(day))

    english = {v: k for k, v in G.LOCALES.items()}
    for prompt, done in G.make_sentences(300, seed=2):
        words = prompt.split()
        if prompt.startswith("we count"):
            first = prompt[len("we count ") : -1]
            n = _words_to_int(first)
            assert num2words(n, lang="en") == first
            assert done == ", ".join(num2words(n + i, lang="en") for i in (1, 2))
        elif prompt.endswith("is written"):
            assert _words_to_int(prompt[: -len(" is written")]) == int(done.replace(" ", ""))
        elif prompt.startswith("the day after"):
            d = parse_en(prompt[len("the day after ") : -len(" is")])
            assert parse_en(done) - d == dt.timedelta(days=1)
        elif prompt.startswith("the year"):
            assert done == num2words(int("".join(words[2:6])), to="year")
        else:
            loc, d = english[words[1]], parse_en(" ".join(words[2:5]))
            assert done == format_date(d, "long", locale=loc)


def test_ngram_baseline_against_direct_counts() -> None:
    train, test = [[4, 5, 6], [4, 5], [6, 4]], [[4, 5, 6, 6]]
    base = G.NgramBaseline(train, vocab_size=7)
    # tokens predicted in training: 4,5,6,eos, 4,5,eos, 6,4,eos -> 10; add-one over V-2 = 5
    uni = {4: 4 / 15, 5: 3 / 15, 6: 3 / 15, 2: 4 / 15}
    seq = [1, 4, 5, 6, 6, 2]
    assert base.perplexity(test, order=1) == pytest.approx(
        math.exp(-sum(math.log(uni[w]) for w in seq[1:]) / 5)
    )
    bi = {(1, 4): 2 / 3, (4, 5): 2 / 3, (5, 6): 1 / 2, (6, 6): 0.0, (6, 2): 1 / 2}
    lam = 0.8
    nll = -sum(math.log(lam * bi[v, w] + (1 - lam) * uni[w]) for v, w in itertools.pairwise(seq))
    assert base.perplexity(test, lam=lam) == pytest.approx(math.exp(nll / 5))


def test_ngram_bigram_backs_off_to_the_unigram_after_an_unseen_context() -> None:
    """<unk> (3) never occurs in training: ``p(w | <unk>)`` was ``(1 - lam) P_uni(w)``, a
    distribution summing to ``1 - lam`` (perplexity 49.50 instead of 15.65 here)."""
    base = G.NgramBaseline([[4, 5]], vocab_size=6)
    uni = base.p_unigram
    assert sum(uni(w) for w in range(2, 6)) == pytest.approx(1.0)
    for lam in (0.5, 0.9):
        # <bos> -> <unk>: a seen context, interpolated; <unk> -> <eos>: the unigram alone
        want = math.exp(-(math.log((1 - lam) * uni(3)) + math.log(uni(2))) / 2)
        assert base.perplexity([[3]], lam=lam) == pytest.approx(want)
    assert base.perplexity([[3]], lam=0.9) == pytest.approx(15.6525, rel=1e-4)


def _direct_perplexity(task: G.GenerationTask, lm: torch.nn.Module) -> float:
    """Perplexity sentence by sentence, in the model's own dtype."""
    nll, n = 0.0, 0
    with torch.no_grad():
        for row in task._test:
            ids = torch.tensor([[1, *row]])
            logp = lm(ids)[0].log_softmax(-1)  # (L, V)
            for i, w in enumerate([*row, 2]):
                nll -= float(logp[i, w])
                n += 1
    return math.exp(nll / n)


def test_perplexity_matches_a_direct_computation(task: G.GenerationTask) -> None:
    torch.manual_seed(0)
    lm = task.build_model().eval()
    assert task.perplexity(lm) == pytest.approx(_direct_perplexity(task, lm), rel=1e-4)


def test_perplexity_of_a_float64_model_stays_float64(task: G.GenerationTask) -> None:
    """The logits were cast to float32 whatever the model's dtype: 1.9e-7 relative off."""
    torch.manual_seed(0)
    lm = task.build_model().eval().double()
    assert task.perplexity(lm) == pytest.approx(_direct_perplexity(task, lm), rel=1e-12)


def test_loss_goes_down_and_beats_the_unigram(task: G.GenerationTask, tmp_path: Path) -> None:
    cfg = TrainConfig(steps=60, batch_size=32, lr=5e-3, warmup=5, eval_every=60, progress=False)
    tr = Trainer(task, cfg)
    losses = [tr.train_step() for _ in range(60)]
    assert sum(losses[-5:]) / 5 < 0.6 * sum(losses[:5]) / 5
    model = tr.model.eval()
    scores = task.evaluate(model)
    assert scores["perplexity"] < task.baselines()["unigram_perplexity"]
    assert scores["score"] == pytest.approx(1 / scores["perplexity"], rel=1e-3)
    assert isinstance(model, LanguageModel)
    done = task.complete(model, ["we count", "the year"], temperature=0.8, top_k=5, top_p=0.9)
    assert len(done) == 2 and all(isinstance(s, str) for s in done)


def test_finish_writes_the_report(task: G.GenerationTask, tmp_path: Path) -> None:
    torch.manual_seed(0)
    scores = G.finish(task, task.build_model().eval(), tmp_path)
    assert {"perplexity", "bigram_perplexity", "exact_digits"} <= set(scores)
    assert (tmp_path / "report.html").stat().st_size > 1000
    assert (tmp_path / "attention_0.png").exists()


def test_completion_exact_scores_only_the_families_held_out(tmp_path: Path) -> None:
    """(test_size=4 holds out 2 of the 5 families: completion_exact and finish raised
    ZeroDivisionError; per_family=0 did too.)"""
    small = G.GenerationTask(60, 4, d_model=16, num_heads=2)
    torch.manual_seed(0)
    lm = small.build_model().eval()
    assert isinstance(lm, LanguageModel)
    held = {G.family(p) for p, _ in small.test_pairs}
    assert 0 < len(held) < len(G.FAMILIES)  # the case: some family has no test sentence
    scores = small.completion_exact(lm)
    assert set(scores) == {f"exact_{name}" for name in held}
    for name in held:  # the oracle: the same completions, counted here
        pairs = [(p, c) for p, c in small.test_pairs if G.family(p) == name]
        hyps = small.complete(lm, [p for p, _ in pairs], temperature=0.0)
        ref = [small.vocab.decode(small.vocab.encode(c)) for _, c in pairs]
        hits = sum(h == r for h, r in zip(hyps, ref, strict=True))
        assert scores[f"exact_{name}"] == round(100.0 * hits / len(pairs), 1)
    assert set(scores) <= set(G.finish(small, lm, tmp_path))
    with pytest.raises(ValueError, match="per_family must be a positive int, got 0"):
        small.completion_exact(lm, per_family=0)
    assert set(small.completion_exact(lm, per_family=1)) == set(scores)  # the control
