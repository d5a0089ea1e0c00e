"""Every accuracy-like task's ``score`` is its count of hits over the count of examples,
as a Python float, so ``--target`` reads the fraction a user writes. (Vision and
classification took a float32 mean: 324 of 360 digits read 0.8999999761581421 and
``--target 0.9`` never stopped; the others divided a percentage by 100: 2 of 3 read
0.6666666666666667.) The reference is scikit-learn's ``accuracy_score``."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from sklearn.metrics import accuracy_score

from tests.task_runs import tiny_task


def _wrong_first(right: list[Any], wrong: Any) -> list[Any]:
    return [wrong, *right[1:]]


def test_vision_and_classification_count_their_hits(monkeypatch: pytest.MonkeyPatch) -> None:
    task: Any = tiny_task("vision")
    truth = task.test_y.clone()
    pred = truth.clone()
    pred[: len(truth) // 10] = (pred[: len(truth) // 10] + 1) % 10
    monkeypatch.setattr(task, "predict", lambda model, images: pred)
    res = task.evaluate(task.build_model())
    assert res["score"] == accuracy_score(truth.numpy(), pred.numpy())
    docs: Any = tiny_task("classification")
    labels = torch.tensor([d.label for d in docs.test_docs])
    deciding = torch.tensor([d.deciding for d in docs.test_docs])
    guess = labels.clone()
    guess[0] = 1 - guess[0]  # one of 8 wrong
    weights = torch.nn.functional.one_hot(deciding, 16).float()
    monkeypatch.setattr(docs, "predict", lambda model, d: (guess, weights))
    res = docs.evaluate(docs.build_model())
    assert res["score"] == accuracy_score(labels.numpy(), guess.numpy()) == 7 / 8
    assert res["attention_on_deciding"] == 100.0


@pytest.mark.parametrize("name", ["dates", "translation", "captioning"])
def test_exact_match_tasks_count_their_hits(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    task: Any = tiny_task(name)
    if name == "dates":
        refs = [e.target for e in task.test[:3]]
        monkeypatch.setattr(task, "convert", lambda model, ex: _wrong_first(refs, "x"))
    elif name == "translation":
        refs = [t for _, t in task.test_pairs[:3]]
        monkeypatch.setattr(task, "translate", lambda model, s, **kw: _wrong_first(refs, "x"))
    else:
        refs = task.test_captions[:3]
        monkeypatch.setattr(task, "caption", lambda model, images: _wrong_first(refs, "x"))
    res = task.evaluate(task.build_model(), limit=3)
    assert res["score"] == accuracy_score(refs, _wrong_first(refs, "x")) == 2 / 3
    assert res["exact"] == 66.67


def test_helpers_name_an_empty_sentence_and_a_locale_the_task_lacks() -> None:
    """(translate([""]) named the model's src and lengths, which nobody passed; convert of
    a date in a locale the task was not built with was a bare KeyError '<fr_FR>'.)"""
    import datetime

    from attnlab.tasks.dates import DatesTask
    from attnlab.tasks.dates_data import draw_examples, writing_styles

    task: Any = tiny_task("translation")
    model = task.build_model()
    for sentences, where in (([""], 0), (["deux cent un", "  "], 1)):
        with pytest.raises(ValueError, match=rf"sentences\[{where}\] is empty"):
            task.translate(model, sentences)
    dates = DatesTask(20, 5, locales=("de_DE",))
    day = [datetime.date(2020, 1, 2)]
    (french,) = draw_examples(day, 1, writing_styles(("fr_FR",), ("long",)), torch.Generator())
    with pytest.raises(ValueError, match="in locale 'fr_FR', which this task was not built"):
        dates.convert(dates.build_model(), [french])
    assert len(dates.convert(dates.build_model(), dates.test[:2])) == 2  # the control
