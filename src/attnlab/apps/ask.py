"""Answer a question from documents: the sentence that answers it, in its context.

Every sentence of the documents is scored for the question by four signals, each in
``[0, 1]`` or a cosine, and ranked by their weighted sum (:class:`Weights`):

* ``cosine``: MiniLM cosine between the question and the sentence (the index's vectors);
* ``context``: cosine to the sentence with its neighbours in the same paragraph (the
  normalized sum of the three unit vectors: a sentence that continues a relevant one);
* ``title``: cosine to the sentence's document name and section heading;
* ``lexical``: BM25 over the sentences' words, divided by the question's best BM25 score.

The best ``Weights.candidates`` (20) sentences are then re-ranked with a fifth signal,
``tokens``: for each question word piece (special tokens and stop words left out), the
largest cosine between its final MiniLM state and any of the sentence's token states,
averaged over the question (late interaction, "MaxSim"). It is the word-to-word match
that :mod:`attnlab.apps.match` shows, used as a score. The pool is fixed, so the first
answers do not depend on how many are asked for: past it (``top`` > 20), answers follow in
the order of the four signals, scored by them alone (no ``tokens`` signal). A sentence that
appears word for word in several documents is answered once (its best-ranked copy).

The weights were chosen on the dev half of the question set that ships in
``attnlab/apps/data/questions.jsonl`` (``benchmarks/bench_ask.py`` reports the test half
separately). :func:`ask` can also explain each answer: which question words matched which
passage words (:mod:`attnlab.apps.match`).

Example:
    >>> import tempfile
    >>> from pathlib import Path
    >>> docs = Path(tempfile.mkdtemp())
    >>> _ = (docs / "a.txt").write_text("A break statement ends a loop. Cats purr.")
    >>> _ = (docs / "b.txt").write_text("The nonlocal statement rebinds an outer variable.")
    >>> answers = ask("How do I change a variable of the enclosing function?", docs,
    ...               top=1, explain=False)  # needs attnlab[pretrained,apps]
    >>> answers[0].sentence.text
    'The nonlocal statement rebinds an outer variable.'

With ``docs="pydoc"`` (the default) the index of the whole reference is built once
(about a minute on two cores) under ``~/.cache/attnlab`` and reused.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from attnlab._io import decode_text
from attnlab._validate import (
    callable_or_none,
    instance_of,
    nonnegative_int,
    positive_int,
    real_where,
    validate_flag,
)
from attnlab._warnings import passed_on, quiet, warn, warn_again
from attnlab.apps.corpus import Document, Sentence, check_prose
from attnlab.apps.documents import load_documents
from attnlab.apps.index import (
    Index,
    Progress,
    build_index,
    check_cache,
    default_cache,
    index_folder,
    saved_sentences,
    unit,
)
from attnlab.apps.lexical import BM25, words
from attnlab.apps.match import WordMatch, match_words, maxsim
from attnlab.models import SentenceEncoder, TruncationWarning

__all__ = ["MAX_QUESTION_WORDS", "Answer", "Asker", "Weights", "ask", "check_question"]

MAX_QUESTION_WORDS = 200


@dataclass(frozen=True)
class Weights:
    """The ranking's weights on its four signals (see the module docstring).

    Example:
        >>> w = Weights(tokens=0.0)  # no MaxSim re-ranking: the four signals alone
        >>> w.cosine, w.lexical, w.tokens, w.candidates
        (1.0, 0.25, 0.0, 20)
    """

    cosine: float = 1.0
    context: float = 0.5
    title: float = 0.25
    lexical: float = 0.25
    tokens: float = 4.0
    candidates: int = 20

    def __post_init__(self) -> None:  # (NaN gave NaN scores, -1 dropped a candidate)
        for name in ("cosine", "context", "title", "lexical", "tokens"):
            real_where(f"Weights.{name}", getattr(self, name), math.isfinite, "a finite number")
        nonnegative_int("Weights.candidates", self.candidates)


@dataclass
class Answer:
    """One ranked sentence.

    Attributes:
        sentence: the answering sentence.
        score: its ranking score; ``signals``: the four signals behind it.
        context: the paragraph's sentences around it (previous, it, next).
        matches: which question words matched which passage words (None unless asked).

    Example:
        >>> a = Answer(Sentence("Dogs bark.", "pets.txt", "", 0), 0.5, {"lexical": 1.0})
        >>> a.sentence.doc, a.context, a.matches is None
        ('pets.txt', [], True)
    """

    sentence: Sentence
    score: float
    signals: dict[str, float]
    context: list[str] = field(default_factory=list)
    matches: WordMatch | None = None


def check_question(question: object) -> str:
    """``question`` stripped; a non-str, blank or over-long one is a Type/ValueError.

    Example:
        >>> check_question("  What is a coroutine? ")
        'What is a coroutine?'
    """
    if not isinstance(question, str):
        raise TypeError(f"question must be a str, got {type(question).__name__}")
    n = len(question.split())
    if n == 0:
        raise ValueError("question must be a non-empty str, got an empty or blank one")
    if not any(c.isalnum() for c in question):  # "?" alone: nothing to match or explain
        raise ValueError(f"question must hold a word, got only punctuation: {question.strip()!r}")
    if n > MAX_QUESTION_WORDS:
        raise ValueError(
            f"question has {n} words; at most {MAX_QUESTION_WORDS} are allowed (MiniLM reads "
            "256 tokens): ask a shorter question"
        )
    return question.strip()


class Asker:
    """Ranks an index's sentences for questions (build once, ask many times).

    Args:
        index: the sentence index (:func:`attnlab.apps.index.build_index`).
        enc: the encoder that built it.
        weights: the ranking weights.

    Example:
        >>> from attnlab.models.sentence import _toy_encoder
        >>> enc = _toy_encoder()  # untrained; needs attnlab[pretrained]; use from_pretrained()
        >>> from attnlab.apps.corpus import Document
        >>> ix = build_index([Document("a", "Cats purr. Dogs bark.")], enc, None)
        >>> lexical = Weights(cosine=0.0, context=0.0, title=0.0, tokens=0.0)  # BM25 alone
        >>> [(a.sentence.text, a.score) for a in Asker(ix, enc, lexical).rank("Why do dogs bark?")]
        [('Dogs bark.', 0.25), ('Cats purr.', 0.0)]
    """

    def __init__(self, index: Index, enc: SentenceEncoder, weights: Weights | None = None) -> None:
        instance_of("index", index, Index, "an attnlab.apps Index (build_index)")
        instance_of("enc", enc, SentenceEncoder, "a SentenceEncoder")
        if weights is not None:
            instance_of("weights", weights, Weights, "a Weights")
        if not index.sentences:  # (rank raised torch's "max(): Expected reduction dim")
            raise ValueError("index holds no sentences (its documents had no prose)")
        self.index, self.enc, self.weights = index, enc, weights or Weights()
        self.bm25 = BM25([words(s.text) for s in index.sentences])
        self.context = _context_vectors(index)  # (N, D)
        # a name from a file name that is not UTF-8 holds surrogates: read them as U+FFFD
        heads = [decode_text(f"{s.doc}: {s.section}")[0] for s in index.sentences]
        unique = sorted(set(heads))
        vecs = unit(enc.encode(unique)) if unique else torch.empty(0, enc.dim)  # (T, D)
        vecs = vecs.to(index.vectors.dtype)  # (a .double() encoder: float32 vectors)
        where = {h: i for i, h in enumerate(unique)}
        self.titles = vecs[torch.tensor([where[h] for h in heads], dtype=torch.long)]  # (N, D)

    def signals(self, question: str) -> dict[str, Tensor]:
        """The four ``(N,)`` signals of every sentence for ``question``."""
        q = unit(self.enc.encode([check_question(question)]))[0]  # (D,)
        q = q.to(self.index.vectors.dtype)
        lex = self.bm25.scores(words(question))
        return {
            "cosine": self.index.vectors @ q,
            "context": self.context @ q,
            "title": self.titles @ q,
            "lexical": lex / lex.max().clamp_min(1e-9),
        }

    def rank(self, question: str, top: int = 5) -> list[Answer]:
        """The ``top`` best sentences for ``question``, best first: the best
        ``weights.candidates`` re-ranked with the ``tokens`` signal, then (``top`` larger)
        the next ones by the four signals alone."""
        top = positive_int("top", top)
        w = self.weights
        with quiet(TruncationWarning):  # said once below, naming what was cut
            sig = self.signals(question)
            first = sum(getattr(w, name) * s for name, s in sig.items())
            assert isinstance(first, Tensor)
            pool = self._candidates(first, max(w.candidates, top))  # (K,)
            cand, rest = pool[: w.candidates], pool[w.candidates :]
            texts = [self.index.sentences[i].text for i in cand.tolist()]
            tok = maxsim(self.enc, question, texts) if w.tokens else torch.zeros(len(cand))
        _warn_cut(self.enc, question, texts)
        total = first[cand] + w.tokens * tok  # (K,)
        ranked = [
            (int(cand[r]), float(total[r]), float(tok[r]))
            for r in total.argsort(descending=True).tolist()
        ] + [(int(i), float(first[i]), None) for i in rest]
        out: list[Answer] = []
        for i, score, t in ranked[:top]:
            signals = {k: float(v[i]) for k, v in sig.items()}
            signals |= {} if t is None else {"tokens": t}
            out.append(Answer(self.index.sentences[i], score, signals, self._context(i)))
        return out

    def _candidates(self, first: Tensor, k: int) -> Tensor:
        """The ``k`` best sentences by ``first`` whose texts differ ``(K,)``: a text that
        stands in several documents counts once, at its best (the language reference
        repeats 807 of its 3,602 sentences, and ``--top 50`` gave 27 answers)."""
        seen: set[str] = set()
        picked: list[int] = []
        for i in first.argsort(descending=True).tolist():
            text = self.index.sentences[i].text
            if text not in seen:
                seen.add(text)
                picked.append(i)
                if len(picked) == k:
                    break
        return torch.tensor(picked, dtype=torch.long)

    def _context(self, i: int) -> list[str]:
        s = self.index.sentences
        near = [j for j in (i - 1, i, i + 1) if 0 <= j < len(s) and _same_para(s[i], s[j])]
        return [s[j].text for j in near]


def _same_para(a: Sentence, b: Sentence) -> bool:
    return a.doc == b.doc and a.para == b.para


def _context_vectors(index: Index) -> Tensor:
    """``(N, D)``: each sentence's unit vector plus its same-paragraph neighbours',
    normalized."""
    v, s = index.vectors, index.sentences
    same = torch.tensor([_same_para(a, b) for a, b in pairwise(s)])  # (N-1,)
    out = v.clone()  # (N, D)
    out[1:] += v[:-1] * same[:, None]  # the previous sentence of the same paragraph
    out[:-1] += v[1:] * same[:, None]  # the next one
    return F.normalize(out, dim=-1)


CANDIDATES_CUT = (
    "some candidate sentences are past the encoder's {limit}-token limit; they are "
    "compared by their first {limit} tokens"
)
QUESTION_CUT = (
    "the question ({words} words) reaches the encoder's {limit}-token limit; only its "
    "first {limit} tokens are read: ask a shorter question"
)


def _warn_cut(enc: SentenceEncoder, question: str, texts: list[str]) -> None:
    """A warning if ``question`` is past the encoder's token limit, and one if any of the
    candidate ``texts`` is (a long question was reported as long candidates; one of
    exactly the limit, which is read whole, was reported as cut)."""
    limit = enc.config.max_seq_length
    cut = enc.truncated([question, *texts])
    if cut[0]:
        words_ = len(question.split())
        warn(QUESTION_CUT.format(words=words_, limit=limit), stacklevel=3)
    if any(cut[1:]):
        warn(CANDIDATES_CUT.format(limit=limit), stacklevel=3)


def ask(
    question: str,
    docs: str | Path | Sequence[str | Path] = "pydoc",
    *,
    top: int = 3,
    encoder: SentenceEncoder | None = None,
    cache: str | Path | bool | None = None,
    explain: bool = True,
    progress: Progress | None = None,
    split: Mapping[Document, Sequence[Sentence]] | None = None,
) -> list[Answer]:
    """Answer ``question`` from ``docs`` (``"pydoc"``, files or folders).

    Args:
        question: at most :data:`MAX_QUESTION_WORDS` words.
        docs: what :func:`attnlab.apps.documents.load_documents` reads.
        top: how many answers, best first.
        encoder: the sentence encoder (default: all-MiniLM-L6-v2).
        cache: the index folder (default :func:`attnlab.apps.index.default_cache`);
            ``False``: build it in memory and keep nothing.
        explain: compute each answer's word matches (:func:`attnlab.apps.match.match_words`).
        progress: ``progress(done, total)`` while sentences are embedded.
        split: the documents' sentences known already (as
            :func:`~attnlab.apps.corpus.check_prose` returns them), so that a caller who
            checked the documents does not wait for them again; default: those the saved
            index holds (a document is split once, and not at all while the index is current).

    Returns:
        ``top`` :class:`Answer` objects, best first.

    Example:
        >>> import tempfile
        >>> from attnlab.models.sentence import _toy_encoder
        >>> enc = _toy_encoder()  # untrained; needs attnlab[pretrained]; use from_pretrained()
        >>> with tempfile.TemporaryDirectory() as d:
        ...     _ = (Path(d) / "pets.txt").write_text("Cats purr. Dogs bark.")
        ...     answers = ask("Why do dogs bark?", d, top=2, encoder=enc, cache=False,
        ...                   explain=False)  # explain=True: each answer's word matches
        >>> sorted(a.sentence.text for a in answers), answers[0].score >= answers[1].score
        (['Cats purr.', 'Dogs bark.'], True)
        >>> answers[0].context  # the paragraph around the answer
        ['Cats purr.', 'Dogs bark.']
        >>> ask("Why?", d, top=0)
        Traceback (most recent call last):
        ...
        ValueError: top must be a positive int, got 0
    """
    question = check_question(question)
    top = positive_int("top", top)
    explain = validate_flag("explain", explain)  # (a truthy "no" explained)
    callable_or_none("progress", progress, "progress(done, total)")
    documents = load_documents(docs)
    folder = _cache_folder(cache, docs)
    given = saved_sentences(documents, folder) if split is None else split
    known = check_prose(documents, given)  # before the model loads
    if encoder is not None:  # (a str: "'str' object has no attribute 'config'")
        instance_of("encoder", encoder, SentenceEncoder, "a SentenceEncoder or None")
    enc = encoder or SentenceEncoder.from_pretrained()
    with _one_truncation_warning(enc.config.max_seq_length):
        index = build_index(documents, enc, folder, progress=progress, split=known)
        answers = Asker(index, enc).rank(question, top)
        with quiet(TruncationWarning):  # the question and the answers: rank said it
            for a in answers if explain else []:
                a.matches = match_words(enc, question, a.sentence.text)
    return answers


def _cache_folder(cache: object, docs: str | Path | Sequence[str | Path]) -> Path | None:
    """The index folder that ``ask(cache=...)`` means (None: in memory); ``""`` (which
    would be the current folder, where the index files landed) and what is no path are
    errors naming ``cache``."""
    if cache is None or cache is True:
        return check_cache(default_cache(docs), "cache")
    if cache is False:
        return None
    if not isinstance(cache, str | os.PathLike):
        raise TypeError(
            "cache must be a folder (str or Path), None or True for the default, or False "
            f"for none, got {type(cache).__name__} {cache!r}"
        )
    if not str(cache):
        raise ValueError(
            "cache must be a folder, got an empty path (the current folder); give a folder, "
            "or cache=False to keep the index in memory"
        )
    return check_cache(index_folder(cache, "cache"), "cache")  # a user's own index.json


def _one_truncation_warning(limit: int) -> AbstractContextManager[None]:
    """Pass on attnlab's warnings inside as they come, but at most one about texts past
    the encoder's ``limit`` tokens: the index's (how many sentences), or one about the
    answers (an index read from the cache). Ranking and explaining read the same long
    sentences again, which made up to three such lines, two naming the encoder's internal
    ``texts[i]``. Only this thread's: see :mod:`attnlab._warnings`."""
    said = False

    def reissue(w: warnings.WarningMessage) -> None:
        nonlocal said
        text = str(w.message)
        encoder_cut = "exceed max_seq_length" in text  # the encoder's, per call
        question = text.startswith(QUESTION_CUT.split("(")[0])  # always said
        cut = not question and (encoder_cut or "-token limit;" in text)  # or the index's
        if cut and said:
            return
        said = said or cut
        warn_again(w, UserWarning(CANDIDATES_CUT.format(limit=limit)) if encoder_cut else None)

    return passed_on(reissue)
