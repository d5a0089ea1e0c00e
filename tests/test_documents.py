"""The classification task: one deciding sentence, hierarchical attention, its scores."""

from __future__ import annotations

import datetime as dt
import re
from pathlib import Path

import pytest
import torch

pytest.importorskip("num2words")
pytest.importorskip("babel")

from attnlab.tasks import classification as D
from attnlab.train import TrainConfig, Trainer
from tests.conftest import check_and_control

# Written independently of the task's templates: where the customer lives now.
LIVES_NOW = re.compile(
    r"^the customer (?:lives in|has lived in|moved to) (?P<c>.+?)(?: since .+| on .+)?$"
)


@pytest.fixture(scope="module")
def task() -> D.DocumentTask:
    return D.DocumentTask(
        train_size=800, test_size=100, embed_dim=16, word_hidden=16, sentence_hidden=16
    )


def _currency_of(country: str) -> str:
    """The country's currency straight from Babel's territory data."""
    from babel import Locale
    from babel.numbers import get_territory_currencies

    code = {v: k for k, v in Locale("en").territories.items() if len(k) == 2}[country]
    return get_territory_currencies(code, start_date=dt.date(2024, 1, 1), tender=True)[0]


def test_documents_are_deterministic_and_held_out_is_disjoint(task: D.DocumentTask) -> None:
    assert D.make_documents(50, seed=3) == D.make_documents(50, seed=3)
    assert D.make_documents(50, seed=3) != D.make_documents(50, seed=4)
    train = {d.sentences for d in task.train_docs}
    assert not train & {d.sentences for d in task.test_docs}
    assert len(train) == 800


@pytest.mark.parametrize(
    ("kw", "exc", "match"),
    [  # min > max raised random's bare "empty range for randrange()"; the others were taken
        ({"min_sentences": 5, "max_sentences": 2}, ValueError,
         r"min_sentences=5 must be at most max_sentences=2"),
        ({"min_sentences": 0}, ValueError, "min_sentences must be a positive int, got 0"),
        ({"max_sentences": 2.5}, TypeError, "max_sentences must be a positive int"),
        ({"n": -1}, ValueError, "n must be an int >= 0, got -1"),
    ],
)  # fmt: skip
def test_make_documents_names_bad_sizes(kw: dict, exc: type[Exception], match: str) -> None:
    with pytest.raises(exc, match=match):
        D.make_documents(**{"n": 3, "seed": 0, **kw})
    docs = D.make_documents(3, seed=0, min_sentences=2, max_sentences=2)  # the control
    assert [len(d.sentences) for d in docs] == [2, 2, 2]


def test_exactly_one_sentence_decides_the_label() -> None:
    docs = D.make_documents(400, seed=1)
    for doc in docs:
        hits = [i for i, s in enumerate(doc.sentences) if LIVES_NOW.match(s)]
        assert hits == [doc.deciding], doc.sentences
        country = LIVES_NOW.match(doc.sentences[doc.deciding])["c"]  # type: ignore[index]
        assert _currency_of(country) == D.CURRENCIES[doc.label]
        assert 4 <= len(doc.sentences) <= 8
    # every class and every position occurs; the distractors mention other countries too
    assert {d.label for d in docs} == set(range(len(D.CURRENCIES)))
    assert {d.deciding for d in docs} == set(range(8))


# Written independently of the templates too: a sentence about the customer that is not
# where the customer lives now names the country it is about.
ABOUT_CUSTOMER = re.compile(
    r"^the customer (?:does not live in|never moved to|lived in|visited) (?P<c>.+?)"
    r"(?: until .+| on .+)?$"
)


def test_no_distractor_contradicts_the_deciding_sentence() -> None:
    """The data of `attnlab train classification` (21,000 documents, seed 1234): "the
    customer does not live in Burkina Faso" beside "the customer lives in Burkina Faso"
    was in 181 documents (10 in the test split), and 533 sentences about the customer
    named the deciding country; other people may live there."""
    docs = D.make_documents(21_000, seed=1234)
    others_there = 0
    for doc in docs:
        country = LIVES_NOW.match(doc.sentences[doc.deciding])["c"]  # type: ignore[index]
        for s in doc.sentences[: doc.deciding] + doc.sentences[doc.deciding + 1 :]:
            if not s.startswith("the customer "):
                others_there += f" {country} " in f" {s} "
                continue
            about = ABOUT_CUSTOMER.match(s)
            assert about is not None, s  # every sentence about the customer is parsed
            assert about["c"] != country, doc.sentences
    assert others_there > 100  # the sister, the parcel...: any country (about 500)


def test_distractors_name_countries_of_every_class() -> None:
    """A bag of country names cannot give the label: distractors name the others."""
    table = D.country_currency()
    misleading = 0
    for doc in D.make_documents(200, seed=2):
        others = [s for i, s in enumerate(doc.sentences) if i != doc.deciding]
        named = {table[c] for c in table for s in others if f" {c} " in f" {s} "}
        misleading += any(cur != D.CURRENCIES[doc.label] for cur in named)
    assert misleading > 150


def test_padding_does_not_change_the_prediction(task: D.DocumentTask) -> None:
    torch.manual_seed(0)
    model = task.build_model().eval()
    docs = task.test_docs[:6]
    alone = [model(task.encode([d]).ids).logits for d in docs]
    together = model(task.encode(docs).ids).logits
    torch.testing.assert_close(torch.cat(alone), together, atol=1e-5, rtol=1e-5)


def test_loss_goes_down_and_evaluate_works(task: D.DocumentTask, tmp_path: Path) -> None:
    cfg = TrainConfig(steps=120, batch_size=32, lr=1e-2, warmup=4, eval_every=120, progress=False)
    tr = Trainer(task, cfg)
    losses = [tr.train_step() for _ in range(120)]
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5
    model = tr.model.eval()
    scores = task.evaluate(model)
    pred, weights = task.predict(model, task.test_docs)
    truth = torch.tensor([d.label for d in task.test_docs])
    assert scores["accuracy"] == pytest.approx(100 * float((pred == truth).float().mean()))
    hits = sum(int(weights[i].argmax()) == d.deciding for i, d in enumerate(task.test_docs))
    assert scores["attention_on_deciding"] == pytest.approx(hits)  # 100 documents
    assert scores["score"] == pytest.approx(min(scores["accuracy"], hits) / 100)
    assert hits > 50  # chance is about 1 in 6: the attention has found the deciding sentence
    sums = weights.sum(-1)
    torch.testing.assert_close(sums, torch.ones_like(sums))
    final = D.finish(task, model, tmp_path)
    assert final["accuracy"] == scores["accuracy"]
    assert (tmp_path / "report.html").exists() and (tmp_path / "sentence_attention_0.png").exists()


def test_bad_input_errors(task: D.DocumentTask) -> None:
    model = task.build_model()
    ids = task.encode(task.test_docs[:2]).ids
    check_and_control(lambda: model(ids.float()), lambda: model(ids), TypeError, r"\(B, S, W\)")
    check_and_control(lambda: model(ids[0]), lambda: model(ids), TypeError, r"\(B, S, W\)")


def test_an_empty_batch_or_a_document_with_no_sentence_gives_zero_size_ids(
    task: D.DocumentTask,
) -> None:
    """(sentence_ids(vocab, []) and a document of blank text, [[]], failed with "max() arg
    is an empty sequence"; now S and W are 0 and the model reads them as padding.)"""
    v = task.vocab
    control = D.sentence_ids(v, [[], ["the customer"]])  # one document with a sentence
    assert control.tolist() == [[[0, 0]], [v.encode("the customer")]]
    assert D.split_sentences("  \n ") == []
    for docs, shape in (([], (0, 0, 0)), ([[]], (1, 0, 0)), ([[], []], (2, 0, 0))):
        ids = D.sentence_ids(v, docs)
        assert ids.shape == shape and ids.dtype == torch.long
    model = task.build_model().eval()
    with torch.no_grad():
        assert model(D.sentence_ids(v, [])).logits.shape == (0, len(D.CURRENCIES))
        padding_only = model(torch.zeros(1, 1, 1, dtype=torch.long)).logits
        torch.testing.assert_close(model(D.sentence_ids(v, [[]])).logits, padding_only)
