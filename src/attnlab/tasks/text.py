"""Word-level vocabularies and padding for the generated-language tasks."""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor

__all__ = ["SPECIALS", "Vocab", "pad_batch"]

SPECIALS = ("<pad>", "<bos>", "<eos>", "<unk>")
_TOKEN = re.compile(r"[^\s,\-/]+|[,\-/]")


class Vocab:
    """Tokens <-> ids; ids 0-3 are ``<pad> <bos> <eos> <unk>``.

    Words split on spaces; ``,``, ``-`` and ``/`` are tokens of their own, and
    :meth:`decode` puts them back without spaces, so ``decode(encode(s)) == s`` for
    text written that way.

    Example:
        >>> v = Vocab.build(["ninety-seven thousand, three"])
        >>> v.encode("ninety-seven thousand, three")
        [4, 5, 6, 7, 8, 9]
        >>> v.decode(v.encode("ninety-seven thousand, three"))
        'ninety-seven thousand, three'
    """

    def __init__(self, tokens: Sequence[str]) -> None:
        if tuple(tokens[: len(SPECIALS)]) != SPECIALS:
            raise ValueError(f"tokens must start with {SPECIALS}, got {tuple(tokens[:4])}")
        self.tokens = list(tokens)
        self.index = {t: i for i, t in enumerate(self.tokens)}

    @classmethod
    def build(cls, texts: Iterable[str]) -> Vocab:
        """The vocabulary of ``texts``, in order of first appearance."""
        seen = dict.fromkeys(SPECIALS)
        for text in texts:
            seen.update(dict.fromkeys(_TOKEN.findall(text)))
        return cls(list(seen))

    def __len__(self) -> int:
        return len(self.tokens)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (unknown words -> 3)."""
        return [self.index.get(t, 3) for t in _TOKEN.findall(text)]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids``, skipping special tokens."""
        words = [self.tokens[i] for i in ids if i >= len(SPECIALS) and i < len(self.tokens)]
        text = " ".join(words)
        return text.replace(" - ", "-").replace(" / ", "/").replace(" ,", ",")


def pad_batch(rows: Sequence[Sequence[int]]) -> tuple[Tensor, Tensor]:
    """Right-pad id lists with 0: ``(ids (B, L), lengths (B,))``.

    Example:
        >>> pad_batch([[5, 6, 7], [8]])
        (tensor([[5, 6, 7],
                [8, 0, 0]]), tensor([3, 1]))
    """
    lengths = torch.tensor([len(r) for r in rows])
    ids = torch.zeros(len(rows), int(lengths.max()) if len(rows) else 0, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
    return ids, lengths
