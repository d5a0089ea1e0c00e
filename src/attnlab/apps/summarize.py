"""Extractive summarization by embedding centrality (LexRank on MiniLM embeddings).

The document's prose sentences (:func:`attnlab.apps.corpus.split_document`) are embedded;
the graph whose edge weights are the positive cosines between different sentences is
normalized by rows into a random walk ``P``, and a sentence's **salience** is its
personalized PageRank: the stationary distribution of a walk that follows ``P`` with
probability ``damping`` and otherwise restarts at sentence ``i`` with probability
proportional to ``1 / (i + 1) ** position`` (``position=0``: uniform restarts, plain
LexRank; the default 1.0, which favours the opening sentences that state a topic, was
chosen on the dev half of ``attnlab/apps/data/summaries.jsonl``). Salience is
non-negative and **sums to 1**. The summary takes sentences by salience, skipping one
whose cosine to a sentence already taken exceeds ``redundancy``, and prints them in the
document's order.

Example:
    >>> s = summarize("Cats purr. Cats purr when content. Taxes rose in May.", sentences=1)
    >>> s.chosen, round(sum(s.salience), 6)  # needs attnlab[pretrained,apps]
    ([0], 1.0)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from attnlab._validate import instance_of, plain, real_where
from attnlab.apps.corpus import Document, Sentence, split_document
from attnlab.apps.embedding import Progress, embed
from attnlab.models import SentenceEncoder

__all__ = ["Summary", "centrality", "summarize"]


@dataclass
class Summary:
    """A summary: every sentence with its salience, and the ones chosen (in order).

    Example:
        >>> Summary(["Cats purr.", "Dogs bark.", "Rain falls."], [0.5, 0.2, 0.3], [0, 2]).text
        'Cats purr. Rain falls.'
    """

    sentences: list[str]
    salience: list[float]
    chosen: list[int]

    @property
    def text(self) -> str:
        return " ".join(self.sentences[i] for i in self.chosen)


def centrality(vectors: Tensor, damping: float = 0.85, position: float = 0.0) -> Tensor:
    """PageRank ``(n,)`` (sums to 1) over the positive cosines of unit ``vectors (n, D)``,
    restarting at sentence ``i`` with probability proportional to ``(i + 1) ** -position``;
    a sentence with no positive cosine to another restarts the same way (networkx's
    ``pagerank`` convention: it was spread uniformly, 0.525 / 0.475 where networkx
    gives 0.667 / 0.333).

    Example:
        >>> v = torch.nn.functional.normalize(torch.tensor([[1.0, 0], [1, 0.1], [0, 1]]), dim=1)
        >>> [round(x, 3) for x in centrality(v).tolist()]
        [0.426, 0.486, 0.088]
    """
    if not isinstance(vectors, Tensor) or vectors.dim() != 2 or not vectors.is_floating_point():
        seen = tuple(vectors.shape) if isinstance(vectors, Tensor) else type(vectors).__name__
        raise TypeError(f"vectors must be a float tensor (n, D), got {seen}")
    # (damping 1 made the system singular: NaN; summarize checked position, this did not)
    damping = real_where("damping", damping, lambda d: 0 < d < 1, "a number in (0, 1)")
    position = real_where("position", position, lambda p: 0 <= p < math.inf, "a number >= 0")
    n = vectors.shape[0]
    sim = (vectors @ vectors.T).clamp_min(0).double()  # (n, n)
    sim.fill_diagonal_(0)
    rows = sim.sum(1, keepdim=True)
    restart = torch.arange(1, n + 1, dtype=torch.float64) ** -position  # (n,)
    restart = restart / restart.sum()
    walk = torch.where(rows > 0, sim / rows.clamp_min(1e-12), restart.expand(n, n))
    # r = (1 - d) restart + d P^T r  <=>  (I - d P^T) r = (1 - d) restart
    system = torch.eye(n, dtype=torch.float64) - damping * walk.T
    r = torch.linalg.solve(system, (1 - damping) * restart)
    return (r / r.sum()).float()


def _pick(vectors: Tensor, salience: Tensor, k: int, redundancy: float) -> list[int]:
    """Up to ``k`` indices by salience, none too close to one already taken."""
    taken: list[int] = []
    for i in salience.argsort(descending=True).tolist():
        if len(taken) == k:
            break
        if taken and float((vectors[taken] @ vectors[i]).max()) > redundancy:
            continue
        taken.append(i)
    return sorted(taken)


MAX_SENTENCES = 5000  # the sentence graph is n x n, solved densely: 1 GB at 5000


def check_length(n: int) -> None:
    """A ValueError for more than :data:`MAX_SENTENCES` sentences (8,000 took 2.8 GB and
    16,000 ran out of memory, after every sentence was embedded)."""
    if n > MAX_SENTENCES:
        raise ValueError(
            f"text has {n} prose sentences; summarize reads at most {MAX_SENTENCES} (its "
            "sentence graph is n x n): summarize a part, e.g. a chapter"
        )


def summarize(
    text: str | Document,
    sentences: int = 3,
    *,
    encoder: SentenceEncoder | None = None,
    damping: float = 0.85,
    position: float = 1.0,
    redundancy: float = 0.9,
    progress: Progress | None = None,
    split: Sequence[Sentence] | None = None,
) -> Summary:
    """The ``sentences`` most central sentences of ``text`` (see the module docstring).

    Args:
        text: the document (prose; headings and code blocks are left out).
        sentences: how many sentences the summary has (fewer if the text has fewer).
        encoder: the sentence encoder (default: all-MiniLM-L6-v2).
        damping: PageRank's damping factor, in ``(0, 1)``.
        position: how strongly restarts favour early sentences (0: not at all).
        redundancy: the largest cosine allowed between two chosen sentences.
        progress: ``progress(done, total)`` while sentences are embedded.
        split: ``text``'s sentences as :func:`~attnlab.apps.split_document` gave them, so
            that a caller who split the text already does not wait for it twice.

    Example:
        >>> from attnlab.models.sentence import _toy_encoder
        >>> enc = _toy_encoder()  # untrained; needs attnlab[pretrained]; use from_pretrained()
        >>> s = summarize("Cats purr. Cats purr when content. Taxes rose.", 2, encoder=enc)
        >>> s.sentences, round(sum(s.salience), 6), s.chosen == sorted(s.chosen)
        (['Cats purr.', 'Cats purr when content.', 'Taxes rose.'], 1.0, True)
        >>> summarize("Cats purr.", sentences=0)
        Traceback (most recent call last):
        ...
        ValueError: sentences must be a positive int, got 0
    """
    count = plain(sentences)  # (np.int64 was refused)
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"sentences must be a positive int, got {sentences!r}")
    damping = real_where("damping", damping, lambda d: 0 < d < 1, "a number in (0, 1)")
    position = real_where("position", position, lambda p: 0 <= p < math.inf, "a number >= 0")
    redundancy = real_where(
        "redundancy", redundancy, lambda r: not math.isnan(r), "a number (a cosine), not NaN"
    )
    if not isinstance(text, str | Document):
        raise TypeError(f"text must be a str or Document, got {type(text).__name__}")
    doc = text if isinstance(text, Document) else Document("text", text)
    if split is not None and not all(isinstance(x, Sentence) for x in split):
        raise TypeError("split must be the Sentence list split_document(text) returns")
    sents = [s.text for s in (split_document(doc) if split is None else split)]
    if not sents:
        raise ValueError("text has no prose sentences to summarize (empty, or only code)")
    check_length(len(sents))
    if encoder is not None:  # (a str: "'str' object has no attribute 'dim'")
        instance_of("encoder", encoder, SentenceEncoder, "a SentenceEncoder or None")
    enc = encoder or SentenceEncoder.from_pretrained()
    vecs = embed(enc, sents, progress)  # (n, D)
    sal = centrality(vecs, damping, position)
    return Summary(sents, sal.tolist(), _pick(vecs, sal, count, redundancy))
