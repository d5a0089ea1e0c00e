"""Data of the dates task: written dates in several locales (Babel) and their split.

Data. Each example is a date between 1900-01-01 and 2099-12-31 written by
:func:`babel.dates.format_date` in one locale and one CLDR width (short, medium, long,
full). The short widths of some locales have two-digit years (``11/21/26``), which cannot
name a year of a 200-year range, so every pattern's ``yy`` is widened to a full year.

Split. By the date itself: the test dates are drawn first and no training example is
written from any of them, in any locale or width; each test date appears once, in a
random locale and width. So every held-out score is on days the model never saw.
"""

from __future__ import annotations

import datetime as dt
import re
import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from types import MappingProxyType
from typing import Any

import torch

__all__ = [
    "FIRST",
    "FORMATS",
    "LAST",
    "LOCALES",
    "DateExample",
    "date_pattern",
    "draw_examples",
    "month_key",
    "month_names",
    "render",
    "split_dates",
    "writing_styles",
]

LOCALES = (
    "en_US",
    "en_GB",
    "fr_FR",
    "de_DE",
    "es_ES",
    "it_IT",
    "pt_BR",
    "nl_NL",
    "pl_PL",
    "tr_TR",
)
FORMATS = ("short", "medium", "long", "full")
FIRST, LAST = dt.date(1900, 1, 1), dt.date(2099, 12, 31)
# which date field each CLDR pattern letter writes
_FIELDS = {"y": "year", "Y": "year", "u": "year", "M": "month", "L": "month", "d": "day"}


def _babel() -> Any:
    try:
        import babel.dates
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("the dates task needs Babel: pip install 'attnlab[tasks]'") from e
    return babel.dates


@cache
def date_pattern(locale: str, width: str) -> str:
    """The CLDR date pattern of ``locale`` at ``width``, with two-digit years widened.

    Example:
        >>> date_pattern("en_US", "short"), date_pattern("fr_FR", "long")
        ('M/d/y', 'd MMMM y')
    """
    if width not in FORMATS:
        raise ValueError(f"width must be one of {FORMATS}, got {width!r}")
    pattern = str(_babel().get_date_format(width, locale=locale).pattern)
    return re.sub(r"(?<!y)yy(?!y)", "y", pattern)


@dataclass(frozen=True)
class DateExample:
    """One written date.

    Attributes:
        date: the day.
        locale, width: how it is written (a Babel locale, a CLDR width).
        text: the written date, equal to ``format_date(date, date_pattern(locale, width),
            locale=locale)``.
        spans: ``{"year" | "month" | "day": (start, end)}`` character spans in ``text``.
    """

    date: dt.date
    locale: str
    width: str
    text: str
    spans: dict[str, tuple[int, int]] = field(compare=False)

    @property
    def target(self) -> str:
        """The ISO date ``YYYY-MM-DD``."""
        return self.date.isoformat()


def render(day: dt.date, locale: str, width: str) -> DateExample:
    """Write ``day`` as Babel does, field by field, remembering where each field went.

    Example:
        >>> ex = render(dt.date(2026, 11, 21), "fr_FR", "long")
        >>> ex.text, ex.target, ex.text[slice(*ex.spans["month"])]
        ('21 novembre 2026', '2026-11-21', 'novembre')
    """
    bd = _babel()
    fmt = bd.DateTimeFormat(day, _locale(locale))
    text, spans = "", {}
    for kind, value in bd.tokenize_pattern(date_pattern(locale, width)):
        piece = fmt[value[0] * value[1]] if kind == "field" else value
        if kind == "field" and value[0] in _FIELDS:
            spans[_FIELDS[value[0]]] = (len(text), len(text) + len(piece))
        text += piece
    return DateExample(day, locale, width, text, spans)


def month_key(word: str) -> str:
    """How a word reads as a month name: its letters, case-folded, accents dropped (the
    digits and punctuation of ``"3.Juni,"`` are not part of the name; ``"fevr"`` reads
    as ``"févr."``).

    Example:
        >>> month_key("Févr."), month_key("3.Juni,"), month_key("2001")
        ('fevr', 'juni', '')
    """
    folded = word.casefold()
    if not folded.isascii():  # (the common case skips the normalization)
        folded = unicodedata.normalize("NFKD", folded)
    return "".join(filter(str.isalpha, folded))


@cache
def month_names(locale: str) -> Mapping[str, frozenset[int]]:
    """Every month name of ``locale`` (CLDR: abbreviated, wide and narrow, format and
    stand-alone forms) as :func:`month_key` reads it, with the months it names (a narrow
    ``"J"`` names three).

    Example:
        >>> names = month_names("en_US")
        >>> sorted(names["jun"]), sorted(names["j"]), "ju" in names
        ([6], [1, 6, 7], False)
    """
    bd, names = _babel(), dict[str, frozenset[int]]()
    for width in ("abbreviated", "wide", "narrow"):
        for context in ("format", "stand-alone"):
            for month, name in bd.get_month_names(width, context, locale=locale).items():
                key = month_key(str(name))
                names[key] = names.get(key, frozenset()) | {int(month)}
    names.pop("", None)  # a name without letters (digits): digits are another matter
    return MappingProxyType(names)  # (cached: read-only)


@cache
def _locale(name: str) -> Any:
    from babel import Locale

    return Locale.parse(name)


def split_dates(test_size: int, seed: int) -> tuple[list[dt.date], list[dt.date]]:
    """Every day of 1900-2099 split at random into ``(train days, test days)``.

    Example:
        >>> train, test = split_dates(10, seed=0)
        >>> len(train) + len(test), len(set(train) & set(test))
        (73049, 0)
    """
    n = (LAST - FIRST).days + 1
    if not 0 < test_size < n:
        raise ValueError(f"test_size must be in [1, {n - 1}] (days in 1900-2099), got {test_size}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    days = [FIRST + dt.timedelta(days=i) for i in perm]
    return days[test_size:], days[:test_size]


def draw_examples(
    days: Sequence[dt.date], count: int, styles: Sequence[tuple[str, str]], g: torch.Generator
) -> list[DateExample]:
    """``count`` examples: days drawn with replacement (or all of them, in order, when
    ``count == len(days)``), each in a random (locale, width)."""
    pick = (
        torch.arange(len(days))
        if count == len(days)
        else torch.randint(len(days), (count,), generator=g)
    )
    style = torch.randint(len(styles), (count,), generator=g)
    return [render(days[d], *styles[s]) for d, s in zip(pick.tolist(), style.tolist(), strict=True)]


def writing_styles(locales: Sequence[str], formats: Sequence[str]) -> list[tuple[str, str]]:
    """Every (locale, width), validated against Babel."""
    if isinstance(locales, str) or not locales:
        raise ValueError(f"locales must be a non-empty sequence of Babel locales, got {locales!r}")
    bad = [f for f in formats if f not in FORMATS]
    if isinstance(formats, str) or not formats or bad:
        raise ValueError(
            f"formats must be a non-empty sequence drawn from {FORMATS}, got {formats!r}"
        )
    _babel()  # without Babel: the error that names the extra
    from babel.core import UnknownLocaleError

    for loc in locales:
        try:
            _locale(loc)
        except (ValueError, TypeError, UnknownLocaleError) as e:
            raise ValueError(f"locales: {loc!r} is not a Babel locale ({e})") from e
    return [(loc, f) for loc in locales for f in formats]
