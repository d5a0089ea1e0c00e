"""Sentences to unit vectors: what the index stores and summarize compares, and the
name of the encoder that made them (the index's key to its vectors).

Example:
    >>> unit(torch.tensor([[0.0, 2.0]])).tolist()
    [[0.0, 1.0]]
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable

import torch
from torch import Tensor

from attnlab._validate import callable_or_none, positive_int
from attnlab._warnings import quiet, warn
from attnlab.models import SentenceEncoder, TruncationWarning
from attnlab.models.sentence import _check_texts

__all__ = ["Progress", "embed", "model_name", "unit"]

Progress = Callable[[int, int], None]


def unit(x: Tensor) -> Tensor:
    """Rows of ``x (N, D)`` scaled to length 1: what the apps' cosines assume, also for a
    ``--model`` folder without a Normalize module (its dot products of vectors of length
    2-7 read as cosines: summarize kept 1 of 3 sentences).

    Example:
        >>> unit(torch.tensor([[3.0, 4.0]])).tolist()
        [[0.6000000238418579, 0.800000011920929]]
    """
    return torch.nn.functional.normalize(x, dim=-1)


def embed(
    enc: SentenceEncoder, texts: list[str], progress: Progress | None = None, batch: int = 256
) -> Tensor:
    """``(len(texts), D)`` float32 unit vectors (also from a ``.double()`` encoder: the
    index keeps float32, and float64 rows were rebuilt on every run), reporting
    ``progress(done, total)`` after each batch; one warning names how many texts were
    longer than the encoder reads (their first tokens count), one how many were not valid
    UTF-8. The index and :func:`attnlab.apps.summarize.summarize` embed with it.
    ``batch``: texts per call of the encoder (a positive int)."""
    batch = positive_int("batch", batch)  # 0 raised range()'s error, -1 embedded nothing
    callable_or_none("progress", progress, "progress(done, total)")
    texts = _check_texts(texts, 4)  # decoded once: the encoder warned per batch, and again
    parts = [torch.empty(0, enc.dim)]
    with quiet(TruncationWarning):  # (this thread's only: not the process's filters)
        for start in range(0, len(texts), batch):
            parts.append(unit(enc.encode(texts[start : start + batch])).float())  # (.double())
            if progress is not None:
                progress(min(start + batch, len(texts)), len(texts))
    long, limit = sum(enc.truncated(texts)), enc.config.max_seq_length  # (not == limit)
    if long:
        warn(
            f"{long} of {len(texts)} sentences reach the encoder's {limit}-token limit; "
            f"only their first {limit} tokens are embedded",
            stacklevel=3,
        )
    return torch.cat(parts)


def model_name(enc: SentenceEncoder) -> str:
    """The encoder's shape and a digest of all it embeds with: its weights (BERT's and the
    Dense layers'), the Dense layers' activations, its settings (pooling, normalization,
    length limit, lowercasing) and its tokenizer. A fine-tuned copy of the same shape, or
    the same BERT with other layers after it, is another model, whose vectors the index
    must not reuse (the digest read BERT's weights only)."""
    c = enc.bert.config
    h = hashlib.sha256()
    for name, t in sorted(enc.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    h.update(repr((dataclasses.asdict(enc.config), list(enc.dense), enc.precision)).encode())
    h.update(enc.tokenizer.to_str().encode())
    shape = f"{enc.config.pooling}-{c.hidden_size}x{c.num_hidden_layers}-{c.vocab_size}"
    return f"{shape}-{h.hexdigest()[:16]}"
