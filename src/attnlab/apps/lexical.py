"""Words and Okapi BM25: the lexical half of the hybrid ranking in :mod:`attnlab.apps.ask`.

:func:`words` lowercases, keeps runs of letters, digits and ``_`` (so ``__enter__`` and
``str`` stay whole) and drops a short list of English stop words (not Python's keywords:
``with``, ``for``, ``in``, ``is``, ``not`` ... stay). :class:`BM25` is Robertson's Okapi
BM25 with ``k1 = 1.5``, ``b = 0.75`` and the idf ``log((N - n + 0.5) / (n + 0.5) + 1)``
(never negative).

Example:
    >>> bm = BM25([words("The with statement"), words("A for loop"), words("with, for")])
    >>> [round(x, 3) for x in bm.scores(words("what does with do?")).tolist()]
    [0.47, 0.0, 0.47]
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections import Counter
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["BM25", "STOP_WORDS", "words"]

STOP_WORDS = frozenset(
    """a an the of to on at by are was were be been being it its this that these those there
    here what which who whom whose when where why how do does did can could should would
    will may might must i you he she we they me my your our their them his her then than so
    no yes into out up about over under again also just only very any all some each other
    such own same too s t get got use used using""".split()  # noqa: SIM905
)
_WORD = re.compile(r"\w+")  # letters of any script, digits, "_" ([a-z0-9_] lost "é", Cyrillic)


def words(text: str) -> list[str]:
    """Lowercased word tokens of ``text`` without stop words.

    Example:
        >>> words("What does __enter__() return, and why?")
        ['__enter__', 'return', 'and']
        >>> words("Müller café, Где кошка?")
        ['müller', 'café', 'где', 'кошка']
        >>> words("Zu\u0308rich") == words("Zürich") == ["zürich"]
        True
    """
    text = unicodedata.normalize("NFC", text)  # "e" + U+0301 is one letter, as "é" is
    return [w for w in _WORD.findall(text.lower()) if w not in STOP_WORDS]


class BM25:
    """Okapi BM25 over a fixed list of tokenized texts (see the module docstring)."""

    def __init__(self, texts: Sequence[Sequence[str]], k1: float = 1.5, b: float = 0.75) -> None:
        self.k1, self.b, self.n = k1, b, len(texts)
        self.lengths = torch.tensor([len(t) for t in texts], dtype=torch.float32)  # (N,)
        self.avg = float(self.lengths.mean()) if self.n else 0.0
        self.postings: dict[str, list[tuple[int, int]]] = {}
        for i, t in enumerate(texts):
            for w, c in Counter(t).items():
                self.postings.setdefault(w, []).append((i, c))

    def idf(self, word: str) -> float:
        df = len(self.postings.get(word, ()))
        return math.log((self.n - df + 0.5) / (df + 0.5) + 1.0)

    def scores(self, query: Sequence[str]) -> Tensor:
        """``(N,)`` BM25 scores of every text for the query's words."""
        out = torch.zeros(self.n)
        norm = self.k1 * (1 - self.b + self.b * self.lengths / max(self.avg, 1e-9))  # (N,)
        for w in query:
            post = self.postings.get(w)
            if not post:
                continue
            rows = torch.tensor([i for i, _ in post])
            tf = torch.tensor([float(c) for _, c in post])
            out[rows] += self.idf(w) * tf * (self.k1 + 1) / (tf + norm[rows])
        return out
