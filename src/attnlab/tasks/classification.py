"""Classification with hierarchical attention: which currency does the customer pay in?

Each document is a few English sentences about a customer, built with Babel (country
names, dates) and num2words (numbers, years). Exactly one sentence says where the customer
lives now; the label is that country's currency (Babel's territory currencies). The other
sentences are distractors made of the same words: other countries, negations ("does not
live in"), the past ("lived in ... until"), other people ("the sister of the customer
lives in"); those about the customer never name the deciding country::

    the warehouse in Chad counted six hundred and twelve boxes
    the customer does not live in Niue
    the customer has lived in Grenada since nineteen ninety-one      <- deciding sentence
    the sister of the customer lives in Austria
    label: East Caribbean Dollar

The model is :class:`attnlab.models.DocumentClassifier` (word GRU + attention pooling,
sentence GRU + attention pooling, a linear classifier). Scores: test accuracy, and how
often the sentence-level attention's largest weight is on the deciding sentence.
"""

from __future__ import annotations

import datetime as dt
import json
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnlab._validate import nonnegative_int, positive_int
from attnlab.models.document import DocumentClassifier
from attnlab.tasks.options import DataOptions
from attnlab.tasks.registry import TaskSpec
from attnlab.tasks.report import Section, write_html
from attnlab.tasks.text import Vocab

__all__ = [
    "CURRENCIES",
    "SPEC",
    "Document",
    "DocumentTask",
    "attention_picture",
    "country_currency",
    "currency_name",
    "finish",
    "make_documents",
    "sentence_ids",
    "split_sentences",
]

# The classes: currencies that several countries pay in (ISO 4217 codes).
CURRENCIES = ("EUR", "USD", "XCD", "AUD", "XOF", "XAF", "GBP", "NZD")
_NOT_COUNTRIES = ("EU", "EZ")  # European Union, Eurozone
_ON = dt.date(2024, 1, 1)


def _libs() -> tuple[Any, Any]:
    try:
        import babel
        from num2words import num2words
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "the classification task needs num2words and Babel: pip install 'attnlab[tasks]'"
        ) from e
    return num2words, babel


@cache
def country_currency() -> dict[str, str]:
    """English country name -> its only legal tender on 2024-01-01, for :data:`CURRENCIES`.

    Example:
        >>> country_currency()["Senegal"], country_currency()["Jersey"]
        ('XOF', 'GBP')
    """
    _, babel = _libs()
    from babel.numbers import get_territory_currencies

    out = {}
    for code, name in babel.Locale("en").territories.items():
        if len(code) != 2 or not code.isalpha() or code in _NOT_COUNTRIES:
            continue
        tender = get_territory_currencies(code, start_date=_ON, tender=True)
        if len(tender) == 1 and tender[0] in CURRENCIES:
            out[name] = tender[0]
    return out


def currency_name(code: str) -> str:
    """English name of a currency (``"XOF"`` -> ``"West African CFA Franc"``)."""
    from babel.numbers import get_currency_name

    return str(get_currency_name(code, locale="en"))


class _Words:
    """Draws of the filler words: countries, dates, years and counts in English."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.countries = sorted(country_currency())
        self.n2w, babel = _libs()
        self.fmt = babel.dates.format_date

    def country(self) -> str:
        return self.rng.choice(self.countries)

    def date(self) -> str:
        d = dt.date(1990, 1, 1) + dt.timedelta(days=self.rng.randrange(35 * 365))
        return str(self.fmt(d, "long", locale="en"))

    def year(self) -> str:
        return str(self.n2w(self.rng.randrange(1950, 2024), to="year"))

    def count(self) -> str:
        return str(self.n2w(self.rng.randrange(2, 1000), lang="en"))


# Each template: words -> a sentence about country c. The deciding ones say where the
# customer lives now; the distractors use the same words and say something else. Those
# about the customer (True) never name the deciding country: there, "does not live in",
# "never moved to" and "lived in ... until" would contradict the deciding sentence.
_Template = Callable[[_Words, str], str]
DECIDING: tuple[_Template, ...] = (
    lambda w, c: f"the customer lives in {c}",
    lambda w, c: f"the customer has lived in {c} since {w.year()}",
    lambda w, c: f"the customer moved to {c} on {w.date()}",
)
DISTRACTORS: tuple[tuple[_Template, bool], ...] = (
    (lambda w, c: f"the customer does not live in {c}", True),
    (lambda w, c: f"the sister of the customer lives in {c}", False),
    (lambda w, c: f"the customer lived in {c} until {w.year()}", True),
    (lambda w, c: f"the customer never moved to {c}", True),
    (lambda w, c: f"the customer visited {c} on {w.date()}", True),
    (lambda w, c: f"the parcel was shipped from {c} on {w.date()}", False),
    (lambda w, c: f"the warehouse in {c} counted {w.count()} boxes", False),
    (lambda w, c: f"{w.count()} people in {c} ordered the same book", False),
)


def _distractor(words: _Words, redraw: random.Random, deciding_country: str) -> str:
    """A distractor drawn with ``words.rng``; one about the customer that drew the deciding
    country draws again from ``redraw`` (a stream of its own: the other sentences and
    documents stay those of ``words.rng``), so its country is uniform over the others."""
    template, about_customer = words.rng.choice(DISTRACTORS)
    country = words.country()
    while about_customer and country == deciding_country:
        country = redraw.choice(words.countries)
    return template(words, country)


@dataclass(frozen=True)
class Document:
    """Sentences, the index of the one that decides the label, and the label (an index
    into :data:`CURRENCIES`)."""

    sentences: tuple[str, ...]
    deciding: int
    label: int


def make_documents(
    n: int, seed: int, *, min_sentences: int = 4, max_sentences: int = 8
) -> list[Document]:
    """``n`` distinct documents drawn from ``seed``: the class uniformly, then a country
    paying in it, then ``min_sentences - 1 .. max_sentences - 1`` distractors about any
    countries (``1 <= min_sentences <= max_sentences``; those about the customer never
    name the deciding country), the deciding sentence at a uniform position.

    Example:
        >>> doc = make_documents(1, seed=0)[0]
        >>> len(doc.sentences) >= 4, doc.sentences[doc.deciding].startswith("the customer")
        (True, True)
    """
    rng = random.Random(nonnegative_int("seed", seed))  # (it takes abs(seed))
    nonnegative_int("n", n)
    low = positive_int("min_sentences", min_sentences)
    if low > positive_int("max_sentences", max_sentences):  # (randrange's "empty range")
        raise ValueError(
            f"min_sentences={min_sentences} must be at most max_sentences={max_sentences}"
        )
    words, table = _Words(rng), country_currency()
    redraw = random.Random(f"make_documents redraw {seed}")
    by_class = {c: sorted(k for k, v in table.items() if v == c) for c in CURRENCIES}
    out: list[Document] = []
    seen: set[tuple[str, ...]] = set()
    while len(out) < n:
        label = rng.randrange(len(CURRENCIES))
        template = rng.choice(DECIDING)
        country = rng.choice(by_class[CURRENCIES[label]])
        deciding = template(words, country)
        others = [
            _distractor(words, redraw, country)
            for _ in range(rng.randint(min_sentences, max_sentences) - 1)
        ]
        pos = rng.randint(0, len(others))
        sentences = (*others[:pos], deciding, *others[pos:])
        if sentences not in seen:
            seen.add(sentences)
            out.append(Document(sentences, pos, label))
    return out


def split_sentences(text: str) -> list[str]:
    """The sentences of a document written as text, one per line (``"\\n".join(doc.sentences)``),
    stripped; blank lines are skipped. Nothing else ends a sentence: the task's words hold
    full stops ("St. Lucia", "U.S. Virgin Islands").

    Example:
        >>> split_sentences("the customer lives in St. Lucia\\n\\n the customer visited Chad ")
        ['the customer lives in St. Lucia', 'the customer visited Chad']
    """
    return [s.strip() for s in text.splitlines() if s.strip()]


def sentence_ids(vocab: Vocab, docs: Sequence[Sequence[str]]) -> Tensor:
    """Word ids of each document's sentences, padded with 0 to ``(B, S, W)`` (S, W: the
    longest document and sentence; 0 where there are none, as for ``[]`` or ``[[]]``).

    Example:
        >>> v = Vocab.build(["the customer lives in St. Lucia"])
        >>> sentence_ids(v, [["the customer", "lives in St. Lucia"]])
        tensor([[[4, 5, 0, 0],
                 [6, 7, 8, 9]]])
    """
    rows = [[vocab.encode(s) for s in d] for d in docs]
    s = max((len(r) for r in rows), default=0)
    w = max((len(x) for r in rows for x in r), default=0)
    ids = torch.zeros(len(rows), s, w, dtype=torch.long)
    for i, r in enumerate(rows):
        for j, x in enumerate(r):
            ids[i, j, : len(x)] = torch.tensor(x)
    return ids


@dataclass
class DocumentBatch:
    ids: Tensor  # (B, S, W) word ids, 0 = padding
    labels: Tensor  # (B,)
    deciding: Tensor  # (B,)


class DocumentTask(DataOptions):
    """Which currency does the customer pay in: one deciding sentence among distractors.

    Args:
        train_size, test_size: distinct documents in each split (disjoint).
        seed: draws the documents (the model's seed is the trainer's).
        embed_dim, word_hidden, sentence_hidden: model size.

    Example:
        >>> task = DocumentTask(train_size=40, test_size=8)
        >>> b = task.batch(torch.arange(3))
        >>> b.ids.dim(), b.labels.shape, task.num_train()
        (3, torch.Size([3]), 40)
    """

    name = "classification"

    def __init__(
        self,
        train_size: int = 20_000,
        test_size: int = 1000,
        *,
        seed: int = 1234,
        embed_dim: int = 64,
        word_hidden: int = 64,
        sentence_hidden: int = 64,
    ) -> None:
        seed = nonnegative_int("seed", seed)  # (random.Random gave -7 seed 7's documents)
        positive_int("train_size", train_size)
        test_size = positive_int("test_size", test_size)
        sizes = {
            "embed_dim": embed_dim,
            "word_hidden": word_hidden,
            "sentence_hidden": sentence_hidden,
        }
        for name, size in sizes.items():  # (checked in build_model, after drawing the data)
            positive_int(name, size)
        docs = make_documents(train_size + test_size, seed)
        self.test_docs, self.train_docs = docs[:test_size], docs[test_size:]
        self.vocab = Vocab.build(s for d in self.train_docs for s in d.sentences)
        self.data_options = {"test_size": test_size, "seed": seed}
        self.model_cfg = {
            "vocab_size": len(self.vocab),
            "num_classes": len(CURRENCIES),
            **sizes,
        }

    def build_model(self) -> nn.Module:
        return DocumentClassifier(**self.model_cfg)

    def config(self) -> dict[str, Any]:
        return {
            "task": self.name,
            "model": self.model_cfg,
            "classes": list(CURRENCIES),
            "vocab": self.vocab.tokens,
            "data": self.data_options,
        }

    def num_train(self) -> int:
        return len(self.train_docs)

    def encode(self, docs: Sequence[Document]) -> DocumentBatch:
        """Pad word ids to ``(B, S, W)`` (S, W: the longest document and sentence)."""
        ids = sentence_ids(self.vocab, [d.sentences for d in docs])  # (B, S, W)
        labels = torch.tensor([d.label for d in docs])
        return DocumentBatch(ids, labels, torch.tensor([d.deciding for d in docs]))

    def batch(self, indices: Tensor) -> DocumentBatch:
        return self.encode([self.train_docs[i] for i in indices.tolist()])

    def loss(self, model: nn.Module, batch: DocumentBatch) -> Tensor:
        return F.cross_entropy(model(batch.ids).logits, batch.labels)

    @torch.no_grad()
    def predict(self, model: nn.Module, docs: Sequence[Document]) -> tuple[Tensor, Tensor]:
        """``(predicted labels (N,), sentence attention (N, S))`` (S padded with 0s)."""
        labels, weights = [], []
        for i in range(0, len(docs), 250):
            out = model(self.encode(docs[i : i + 250]).ids)
            labels.append(out.logits.argmax(-1))
            weights.append(out.han.sentence_weights)
        s = max(w.shape[1] for w in weights)
        return torch.cat(labels), torch.cat([F.pad(w, (0, s - w.shape[1])) for w in weights])

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """Test accuracy (%) and deciding-sentence attention (%: documents whose largest
        sentence weight is on the deciding sentence); ``score`` is the smaller, / 100."""
        pred, weights = self.predict(model, self.test_docs)
        truth = torch.tensor([d.label for d in self.test_docs])
        deciding = torch.tensor([d.deciding for d in self.test_docs])
        n = max(1, len(self.test_docs))  # counts, not float32 means: 9 of 10 read 0.8999999761
        acc, hit = int((pred == truth).sum()), int((weights.argmax(-1) == deciding).sum())
        return {
            "accuracy": round(100 * acc / n, 2),
            "attention_on_deciding": round(100 * hit / n, 2),
            "score": min(acc, hit) / n,
        }


def attention_picture(doc: Document, weights: Tensor, predicted: int, path: Path) -> Path:
    """A bar per sentence of its attention weight; the deciding sentence in orange."""
    from attnlab.interpret.plot import pyplot, save_figure

    plt = pyplot()
    w = weights[: len(doc.sentences)].tolist()
    colors = ["tab:orange" if i == doc.deciding else "tab:blue" for i in range(len(w))]
    fig, ax = plt.subplots(figsize=(9, 0.5 + 0.42 * len(w)))
    ax.barh(range(len(w)), w, color=colors)
    ax.set_yticks(range(len(w)), list(doc.sentences), fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("sentence attention")
    truth, guess = currency_name(CURRENCIES[doc.label]), currency_name(CURRENCIES[predicted])
    ax.set_title(f"label: {truth}   predicted: {guess}   (orange: deciding sentence)", fontsize=9)
    return save_figure(fig, path, dpi=100)


def finish(task: DocumentTask, model: nn.Module, folder: Path) -> dict[str, float]:
    """Final scores on every test document, a few documents printed with their sentence
    attention, their pictures and the report."""
    scores = task.evaluate(model)
    print(f"held-out scores ({len(task.test_docs)} documents):", json.dumps(scores))
    pred, weights = task.predict(model, task.test_docs[:4])
    sections = []
    for i, doc in enumerate(task.test_docs[:4]):
        p = int(pred[i])
        truth, guess = currency_name(CURRENCIES[doc.label]), currency_name(CURRENCIES[p])
        print(f"  label {truth}, predicted {guess}")
        for j, s in enumerate(doc.sentences):
            print(f"    {float(weights[i, j]):.2f} {'*' if j == doc.deciding else ' '} {s}")
        png = attention_picture(doc, weights[i], p, folder / f"sentence_attention_{i}.png")
        sections.append(
            Section(f"document {i}", f"label {currency_name(CURRENCIES[doc.label])}", [png])
        )
    title = "Hierarchical attention: which currency does the customer pay in?"
    write_html(folder / "report.html", title, scores, sections)
    return scores


SPEC = TaskSpec(
    summary="hierarchical attention on generated documents; one sentence decides the label",
    build=lambda n: DocumentTask(20_000 if n is None else n),
    defaults={
        "steps": 400,
        "batch_size": 64,
        "lr": 3e-3,
        "warmup": 50,
        "eval_every": 100,
        "threads": 1,
    },
    finish=finish,
    score_range=(0.0, 1.0),
)
