"""Which question words matched which passage words, and how much each word mattered.

Two quantities, both from the real encoder's attention stack, each with a stated sum:

* **pair contributions** ``pairs[i, j]`` between question word ``i`` and passage word
  ``j``. With mean pooling the sentence embedding is the unit vector of
  ``m = (1/n) sum_t h_t`` over the final hidden states ``h_t`` (the output of the last
  attention layer, special tokens included), so the cosine of question ``q`` and passage
  ``p`` splits exactly over token pairs:
  ``cos(q, p) = sum_{i,j} <h_i, h_j> / (n_q n_p |m_q| |m_p|)``. A word's row/column is the
  sum over its word pieces; **the whole matrix, [CLS] and [SEP] included, sums to the
  cosine** that the index ranks by.
* **integrated gradients** of that cosine (``attnlab.interpret.explained_score`` with
  ``against=``, the other text's embedding held fixed) from a baseline of [PAD] tokens
  between [CLS] and [SEP], through every attention layer to the word embeddings
  (``attnlab.interpret.integrated_gradients``): ``question_ig`` over the question's
  tokens, ``passage_ig`` over the passage's. **Each sums to cos(text, other) -
  cos(baseline, other)**, up to the path integral's convergence ``delta`` (reported).

Example:
    >>> from attnlab.models import SentenceEncoder
    >>> enc = SentenceEncoder.from_pretrained()  # needs attnlab[pretrained]
    >>> m = match_words(enc, "When is a finally clause run?",
    ...                 "The finally clause is always executed on the way out.", steps=8)
    >>> q, p, v = m.top_pairs(1)[0]
    >>> q, p
    ('finally', 'finally')
    >>> abs(float(m.pairs.sum()) - m.cosine) < 1e-4
    True
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from attnlab import masks
from attnlab._validate import instance_of
from attnlab.interpret import TextModel, explained_score, integrated_gradients
from attnlab.models import SentenceEncoder
from attnlab.models.sentence_folder import tokenizer_input
from attnlab.tasks.encoder import text_model

__all__ = ["WordMatch", "match_words", "maxsim", "token_states"]

_SPECIAL = ("[CLS]", "[SEP]")


@dataclass
class WordMatch:
    """The explanation of one question/passage pair (see the module docstring).

    Attributes:
        question, passage: the words (word pieces merged; [CLS]/[SEP] kept, first/last).
        pairs: ``(len(question), len(passage))`` contributions; they sum to ``cosine``.
        cosine: the cosine of the two embeddings.
        question_ig, passage_ig: integrated gradients per word (sums: see the module).
        ig_expected: ``(question, passage)`` values of ``f(text) - f(baseline)``.
        ig_delta: ``(question, passage)`` convergence gaps of the path integrals.

    Example:
        >>> pairs = torch.tensor([[0.125, 0, 0, 0], [0, 0.5, 0.25, 0], [0, 0, 0, 0.125]])
        >>> m = WordMatch(["[CLS]", "cats", "[SEP]"], ["[CLS]", "cats", "purr", "[SEP]"],
        ...               pairs, 1.0, [0, 1, 0], [0, 0.6, 0.4, 0], (1.0, 1.0), (0.0, 0.0))
        >>> m.top_pairs(2)  # [CLS] and [SEP] left out
        [('cats', 'cats', 0.5), ('cats', 'purr', 0.25)]
    """

    question: list[str]
    passage: list[str]
    pairs: Tensor
    cosine: float
    question_ig: list[float]
    passage_ig: list[float]
    ig_expected: tuple[float, float]
    ig_delta: tuple[float, float]

    def top_pairs(self, k: int = 5) -> list[tuple[str, str, float]]:
        """The ``k`` largest ``(question word, passage word, contribution)``, special tokens
        and stop words left out, each pair of word strings once (its largest term)."""
        from attnlab.apps.lexical import words

        keep_q = [bool(words(w)) and w not in _SPECIAL for w in self.question]
        keep_p = [bool(words(w)) and w not in _SPECIAL for w in self.passage]
        mask = torch.tensor(keep_q)[:, None] & torch.tensor(keep_p)[None, :]
        vals = self.pairs.masked_fill(~mask, float("-inf")).flatten()
        cols, out = self.pairs.shape[1], list[tuple[str, str, float]]()
        seen: set[tuple[str, str]] = set()
        for i in vals.argsort(descending=True)[: int(mask.sum())].tolist():
            pair = (self.question[i // cols], self.passage[i % cols])
            if pair not in seen and len(out) < k:
                seen.add(pair)
                out.append((*pair, float(vals[i])))
        return out


def _words(
    tokens: list[str], text: str | None = None, offsets: list[tuple[int, int]] | None = None
) -> tuple[list[str], Tensor]:
    """Word pieces merged into words, and the ``(W, T)`` 0/1 matrix of which token is in
    which word. With the tokens' ``offsets`` in ``text``, a word is the text it covers
    (the vocabulary's pieces are lowercased and stripped of accents: "食べました" showed as
    "へました", an emoji as "[UNK]")."""
    names: list[str] = []
    owner: list[int] = []
    spans: list[list[int]] = []
    for j, t in enumerate(tokens):
        at = list(offsets[j]) if offsets is not None else [0, 0]
        if t.startswith("##") and names and names[-1] not in _SPECIAL:
            names[-1] += t[2:]
            spans[-1][1] = at[1]
        else:
            names.append(t)
            spans.append(at)
        owner.append(len(names) - 1)
    if text is not None:
        names = [
            text[a:b] if b > a and n not in _SPECIAL else n
            for n, (a, b) in zip(names, spans, strict=True)
        ]
    member = torch.zeros(len(names), len(tokens))
    member[torch.tensor(owner), torch.arange(len(tokens))] = 1.0
    return names, member


def _offsets(enc: SentenceEncoder, text: str, ids: list[int]) -> tuple[str | None, list | None]:
    """``text`` and its tokens' character offsets, from the encoder's tokenizer (None,
    None where it gives none, or other ids than ``ids``)."""
    src = tokenizer_input([text], enc.config.lowercase)[0]  # as enc.tokenize reads it
    try:
        e = enc.tokenizer.encode(src)
    except (AttributeError, TypeError, ValueError):
        return None, None
    if list(e.ids) != ids:
        return None, None
    return (text if len(text) == len(src) else src), list(e.offsets)  # ("İ" lowercased: 2)


def _check_texts(enc: object, **texts: object) -> None:
    """A TypeError naming the argument unless ``enc`` is a SentenceEncoder and each of
    ``texts`` a str (the tokenizer's own error named ``texts[0]``, None's ``.config``)."""
    instance_of("enc", enc, SentenceEncoder, "a SentenceEncoder")
    for name, text in texts.items():
        instance_of(name, text, str, "a str")


def _states(enc: SentenceEncoder, ids: Tensor) -> Tensor:
    """Final hidden states ``(n, D)`` of ids ``(1, n)``."""
    with torch.no_grad():
        return enc.bert(ids).hidden[0]


def token_states(enc: SentenceEncoder, texts: list[str]) -> list[Tensor]:
    """Each text's final hidden states ``(n_i, D)``, one padded batch (keys masked)."""
    ids = enc.tokenize(texts, stacklevel=3)  # a warning blames token_states' caller
    width = max(len(x) for x in ids)
    batch = torch.full((len(ids), width), enc.bert.config.pad_token_id or 0)  # (B, L)
    for r, x in enumerate(ids):
        batch[r, : len(x)] = torch.tensor(x)
    with torch.inference_mode():
        hidden = enc.bert(batch, mask=masks.padding([len(x) for x in ids])).hidden  # (B, L, D)
    return [hidden[r, : len(x)] for r, x in enumerate(ids)]


def maxsim(enc: SentenceEncoder, question: str, passages: list[str]) -> Tensor:
    """``(P,)``: for each passage, the mean over the question's content word pieces of
    their largest cosine to any passage token (late interaction on final states).

    Example:
        >>> from attnlab.models import SentenceEncoder
        >>> enc = SentenceEncoder.from_pretrained()  # needs attnlab[pretrained]
        >>> s = maxsim(enc, "When does finally run?", ["Finally runs on exit.", "Cats purr."])
        >>> bool(s[0] > s[1])
        True
    """
    from attnlab.apps.lexical import words

    _check_texts(enc, question=question)
    if isinstance(passages, str) or not isinstance(passages, Iterable):
        seen = "str (one passage: give [passage])" if isinstance(passages, str) else None
        raise TypeError(f"passages must be a list of str, got {seen or type(passages).__name__}")
    passages = list(passages)
    for i, p in enumerate(passages):
        instance_of(f"passages[{i}]", p, str, "a str")
    if not passages:
        return torch.zeros(0)
    states = [F.normalize(h, dim=-1) for h in token_states(enc, [question, *passages])]
    names = [enc.tokenizer.id_to_token(i) or "" for i in enc.tokenize([question])[0]]
    keep = [i for i, n in enumerate(names) if n not in _SPECIAL and words(n.lstrip("#"))]
    q = states[0][keep] if keep else states[0]  # (nq, D)
    return torch.stack([(q @ h.T).max(1).values.mean() for h in states[1:]])


def _ig(model: TextModel, ids: Tensor, against: str, steps: int) -> tuple[Tensor, float, float]:
    """Per-token IG ``(n,)`` of the cosine to ``against``, ``f(x) - f(base)`` and delta."""
    score = explained_score(model, ids, against=against)
    base = ids.clone()
    base[:, 1:-1] = model.pad_id
    ig = integrated_gradients(score, ids, base, layer=model.input_embeddings, steps=steps)
    with torch.no_grad():
        expected = float(score(ids) - score(base))
    return ig.per_token()[0], expected, float(ig.delta[0])


def match_words(enc: SentenceEncoder, question: str, passage: str, *, steps: int = 16) -> WordMatch:
    """Explain the match of ``question`` and ``passage`` under ``enc`` (see the module).

    Args:
        enc: a mean-pooling sentence encoder (all-MiniLM-L6-v2).
        question, passage: the two texts.
        steps: integrated-gradients steps (Gauss-Legendre).

    Example:
        >>> from attnlab.models.sentence import _toy_encoder
        >>> enc = _toy_encoder()  # untrained; needs attnlab[pretrained]; use from_pretrained()
        >>> m = match_words(enc, "Why do cats purr?", "Cats purr when content.", steps=4)
        >>> m.question  # word pieces merged: "pu", "##rr" -> "purr", as written
        ['[CLS]', 'Why', 'do', 'cats', 'purr', '?', '[SEP]']
        >>> m.passage, tuple(m.pairs.shape)
        (['[CLS]', 'Cats', 'purr', 'when', 'content', '.', '[SEP]'], (7, 7))
        >>> abs(float(m.pairs.sum()) - m.cosine) < 1e-5  # the pairs split the cosine
        True
        >>> abs(sum(m.question_ig) - m.ig_expected[0]) < 1e-4  # IG is complete
        True
    """
    _check_texts(enc, question=question, passage=passage)
    if enc.config.pooling != "mean":
        raise ValueError(f"enc must pool by mean, got pooling={enc.config.pooling!r}")
    model = text_model(enc)
    qi = torch.tensor([list(model.tokenize(question))])  # (1, nq)
    pi = torch.tensor([list(model.tokenize(passage))])  # (1, np)
    hq, hp = _states(enc, qi), _states(enc, pi)  # (nq, D), (np, D)
    mq, mp = hq.mean(0), hp.mean(0)  # (D,)
    tok = (hq @ hp.T) / (len(hq) * len(hp) * mq.norm() * mp.norm())  # (nq, np)
    qw, qm = _words(
        [model.token_name(int(i)) for i in qi[0]], *_offsets(enc, question, qi[0].tolist())
    )
    pw, pm = _words(
        [model.token_name(int(i)) for i in pi[0]], *_offsets(enc, passage, pi[0].tolist())
    )
    q_ig, q_exp, q_delta = _ig(model, qi, passage, steps)
    p_ig, p_exp, p_delta = _ig(model, pi, question, steps)
    return WordMatch(
        question=qw,
        passage=pw,
        pairs=qm @ tok @ pm.T,  # (Wq, Wp)
        cosine=float(mq @ mp / (mq.norm() * mp.norm())),
        question_ig=(qm @ q_ig).tolist(),
        passage_ig=(pm @ p_ig).tolist(),
        ig_expected=(q_exp, p_exp),
        ig_delta=(q_delta, p_delta),
    )
