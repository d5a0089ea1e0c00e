"""The dates study's character edits never make a written date mean another date: two
edits could turn one month name into another (``"Jun"`` -> ``"Ju"`` -> ``"Jul"``), and
the attack then counted the model's right reading of the new date as an error."""

from __future__ import annotations

import datetime as dt
import random
import unicodedata
from functools import cache, partial

import pytest
import torch
from babel.dates import get_month_names

import attnlab.robust.study_dates as study
from attnlab.robust.attacks import CharEditAttack, word_edits
from attnlab.tasks.dates import FORMATS, LOCALES, DatesTask, render

JUNE = render(dt.date(2001, 6, 3), "en_US", "medium")  # "Jun 3, 2001"


def _letters(word: str) -> str:
    """The oracle's reading of a word: its letters, case-folded, accents dropped."""
    decomposed = unicodedata.normalize("NFD", word.casefold())
    return "".join(c for c in decomposed if c.isalpha())


@cache
def _names(locale: str) -> dict[int, set[str]]:
    """Babel's month names of ``locale``, every width and form, read as ``_letters``."""
    names: dict[int, set[str]] = {m: set() for m in range(1, 13)}
    for width in ("abbreviated", "wide", "narrow"):
        for context in ("format", "stand-alone"):
            for m, name in get_month_names(width, context, locale=locale).items():
                names[m].add(_letters(name))
    return names


@cache
def _forbidden(locale: str, month: int | None) -> set[str]:
    """The readings a word of month ``month`` (None: no month) must not take."""
    return {n for m, ns in _names(locale).items() if m != month for n in ns} - {""}


def _to_july(index: list[int], texts: list[str]) -> torch.Tensor:
    """A "model" whose score of 2001-06-03 drops as "Jun" becomes "Ju", then "Jul"."""
    return -torch.tensor([t.startswith("Ju ") + 2.0 * t.startswith("Jul ") for t in texts])


def _reads_july(index: list[int], texts: list[str]) -> list[bool]:
    """It reads "Jul 3, 2001" as 2001-07-03, as a correct reader would."""
    return [t.startswith("Jul ") for t in texts]


def test_attack_dates_no_longer_turns_jun_into_jul(monkeypatch: pytest.MonkeyPatch) -> None:
    # the audit's repro, through attack_dates with _to_july and _reads_july as the model
    task = DatesTask(train_size=300, test_size=2, locales=("en_US",), formats=("medium",))
    assert "l" in study.letters(task)  # the insert that makes "Jul" is available

    def text(row: torch.Tensor, n: int) -> str:
        return "".join(task.src_vocab.tokens[i] for i in row[1:n].tolist())

    def log_prob(model: object, b: object) -> torch.Tensor:
        texts = [text(r, int(n)) for r, n in zip(b.src, b.lengths, strict=True)]  # type: ignore[attr-defined]
        return _to_july([], texts)

    def convert(model: object, examples: list) -> list[str]:  # type: ignore[type-arg]
        july = _reads_july([], [e.text for e in examples])
        return ["2001-07-03" if j else e.target for j, e in zip(july, examples, strict=True)]

    monkeypatch.setattr(study, "_log_prob", log_prob)
    monkeypatch.setattr(task, "convert", convert)
    acc, texts = study.attack_dates(task, None, [JUNE], 2, max_candidates=10_000)  # type: ignore[arg-type]
    assert acc == 100.0  # the reading stays 2001-06-03: the attack did not win
    assert _letters(texts[0].split(" ")[0]) not in _forbidden("en_US", 6), texts
    # control: the same attack without the month rule reaches "Jul 3, 2001" and "wins"
    att = CharEditAttack(2, study.letters(task), protect=str.isdigit, max_candidates=10_000)
    free = att.attack([JUNE.text], _to_july, _reads_july)[0]
    assert (free.text, free.success) == ("Jul 3, 2001", True)
    rule = lambda i, w, e: study.keeps_month("en_US")(w, e)  # noqa: E731
    kept = att.attack([JUNE.text], _to_july, _reads_july, rule)
    assert not kept[0].success and not kept[0].text.startswith("Jul ")


def test_two_edits_never_make_another_month_in_any_locale_or_width() -> None:
    # every word of a date in each locale x width, closed under two edits as the attack
    # makes them (the second judged against the word as it was): none reads as a month
    # other than the word's own. Inserting the letters of the locale's month names is
    # enough: a letter inserted and not dropped again stays in the final word.
    days = (dt.date(2001, 6, 5), dt.date(1999, 3, 9), dt.date(2026, 7, 21))  # Tuesdays
    for a, locale in enumerate(LOCALES):
        names = _names(locale)
        alphabet = "".join(sorted({c for ns in names.values() for n in ns for c in n}))
        allowed = study.keeps_month(locale)
        for b, width in enumerate(FORMATS):
            ex = render(days[(a + b) % 3], locale, width)
            s0 = ex.spans["month"][0]
            start = 0
            for word in ex.text.split(" "):
                month = ex.date.month if start <= s0 < start + len(word) + 1 else None
                start += len(word) + 1
                if not any(c.isalpha() for c in word):
                    continue
                keep = partial(allowed, word)
                one = word_edits(word, str.isdigit, alphabet, allowed=keep)
                two = {w for x in one for w in word_edits(x, str.isdigit, alphabet, allowed=keep)}
                bad = {w for w in {*one, *two} if _letters(w) in _forbidden(locale, month)}
                assert not bad, (locale, width, ex.text, word, sorted(bad)[:5])
    # control: without the rule, two edits take "Jun" to "Jul" and fr_FR "mardi" to "mai"
    for word, other in [("Jun", "Jul"), ("mardi", "mai"), ("Juni", "Juli")]:
        one = word_edits(word, str.isdigit, "lu")
        assert other in {w for x in one for w in word_edits(x, str.isdigit, "lu")}


def test_training_edits_never_name_another_month() -> None:
    # one training edit per word: es_ES/pt_BR "de" -> "d" names December (narrow "D"),
    # "de" -> "e" January in es_ES: a source that no longer names only its target's month
    torch.manual_seed(0)
    task = study.AdversarialEditsTask(
        train_size=60, test_size=2, locales=("es_ES", "pt_BR"), formats=("long",), k=4, rate=1.0
    )
    task.alphabet = "xyz"  # few inserts: the drops that make "d" and "e" come up often
    batch = task.batch(torch.arange(60))
    checked = 0
    for texts in batch.texts:
        for e, t in zip(batch.examples, texts, strict=True):
            for w0, w1 in zip(e.text.split(" "), t.split(" "), strict=True):
                month = e.date.month if _letters(w0) in _names(e.locale)[e.date.month] else None
                assert _letters(w1) not in _forbidden(e.locale, month), (e.text, t)
                checked += w0 == "de"
    assert checked == 60 * 4 * 2  # every "de" was edited
    # control: the same draws without the rule do name December
    de = "3 de junio de 2001"
    rng = random.Random(0)
    assert "d" in {study.random_edits(de, 1.0, "xyz", rng).split(" ")[1] for _ in range(200)}
    rng = random.Random(0)
    kept = {study.random_edits(de, 1.0, "xyz", rng, locale="es_ES") for _ in range(200)}
    assert not any(t.split(" ")[1] in ("d", "e") for t in kept)
