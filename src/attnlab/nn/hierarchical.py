"""Hierarchical attention networks (Yang et al., 2016): words -> sentences -> document.

Word level: a bidirectional GRU reads the words of each sentence and
:class:`~attnlab.nn.classic.AttentionPooling` turns them into a sentence vector. Sentence
level: a bidirectional GRU reads the sentence vectors and a second pooling turns them into
a document vector.

Padding never changes the result for real items: each GRU reads only the unmasked items
of a row, in order (a packed sequence), and sentences with no real word are masked at the
sentence level.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from attnlab._validate import positive_int, same_dtype
from attnlab.nn.classic import AttentionPooling

__all__ = ["HierarchicalAttention", "HierarchicalOutput"]

ENCODERS = ("gru", None)


class HierarchicalOutput(NamedTuple):
    """What :class:`HierarchicalAttention` returns.

    Attributes:
        document: ``(B, Dd)`` document vectors.
        sentences: ``(B, S, Ds)`` sentence vectors (the word-level pooling's output; 0 for
            sentences with no real word).
        word_weights: ``(B, S, W)`` word attention, summing to 1 over the real words of
            each sentence (0 on padding and on empty sentences).
        sentence_weights: ``(B, S)`` sentence attention, summing to 1 over the non-empty
            sentences of each document.

    Example:
        >>> import torch
        >>> han = HierarchicalAttention(4, 2, 2, encoder=None)
        >>> keep = torch.tensor([[[True, True, False], [True, False, False]]])  # (B, S, W)
        >>> out = han(torch.randn(1, 2, 3, 4), keep)
        >>> [tuple(x.shape) for x in out]  # document, sentences, word and sentence weights
        [(1, 4), (1, 2, 4), (1, 2, 3), (1, 2)]
        >>> out.word_weights[0, 1].tolist()  # sentence 1's only real word takes it all
        [1.0, 0.0, 0.0]
    """

    document: Tensor
    sentences: Tensor
    word_weights: Tensor
    sentence_weights: Tensor


def _encode_masked(rnn: nn.GRU, x: Tensor, keep: Tensor | None) -> Tensor:
    """Run a batch-first RNN over the kept items of each row, in order; others give 0.

    The kept items are moved to the front, packed (rows with none are skipped: packing
    forbids length 0), encoded, and scattered back to their positions.

    Args:
        rnn: a ``batch_first`` recurrent module.
        x: ``(N, L, D)`` inputs.
        keep: bool ``(N, L)``, True = a real item; None = all real.

    Returns:
        ``(N, L, Dout)`` outputs; 0 at the items that are not kept.

    Example:
        >>> import torch
        >>> rnn = torch.nn.GRU(3, 2, batch_first=True, bidirectional=True)
        >>> x, keep = torch.randn(2, 4, 3), torch.tensor([[True, True, False, True], [False] * 4])
        >>> y = _encode_masked(rnn, x, keep)
        >>> torch.allclose(y[0, [0, 1, 3]], rnn(x[:1, [0, 1, 3]])[0][0]), y[0, 2].tolist()
        (True, [0.0, 0.0, 0.0, 0.0])
    """
    n, length, _ = x.shape
    out_dim = rnn.hidden_size * (2 if rnn.bidirectional else 1)
    if not n or not length:  # torch's RNNs refuse length 0 (and B = 0 with a length)
        return x.new_zeros(n, length, out_dim)
    if keep is None or bool(keep.all()):
        return rnn(x)[0]
    order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)  # (N, L) kept first
    front = x.gather(1, order[..., None].expand_as(x))  # (N, L, D)
    lengths = keep.sum(dim=1)  # (N,)
    rows = torch.nonzero(lengths > 0).squeeze(1)  # (N',)
    out = x.new_zeros(n, length, out_dim)  # (N, L, Dout)
    if rows.numel():
        packed = pack_padded_sequence(
            front[rows], lengths[rows].cpu(), batch_first=True, enforce_sorted=False
        )
        y, _ = pad_packed_sequence(rnn(packed)[0], batch_first=True, total_length=length)
        out = out.index_copy(0, rows, y)  # (N, L, Dout), zeros past each length
    back = torch.argsort(order, dim=1)  # (N, L) inverse permutation
    return out.gather(1, back[..., None].expand_as(out))


class HierarchicalAttention(nn.Module):
    """Hierarchical attention network (Yang et al., 2016) over word embeddings.

    Args:
        embed_dim: ``E``, size of a word embedding.
        word_hidden: hidden size of the word GRU (each direction): ``Ds = 2 * word_hidden``.
        sentence_hidden: hidden size of the sentence GRU: ``Dd = 2 * sentence_hidden``.
        encoder: ``"gru"`` (bidirectional GRUs at both levels) or ``None`` (no recurrent
            layer: the poolings read the inputs directly, ``Ds = Dd = E``, and
            ``word_hidden``/``sentence_hidden`` are unused).
        attn_dim: size of the attention layer of both poolings; default their input size.

    Attributes:
        word_encoder, sentence_encoder: the GRUs (None when ``encoder=None``).
        word_attention, sentence_attention: the :class:`AttentionPooling` layers.
        sentence_dim, document_dim: ``Ds`` and ``Dd``.

    Example:
        >>> import torch
        >>> han = HierarchicalAttention(embed_dim=8, word_hidden=5, sentence_hidden=3)
        >>> words = torch.randn(2, 4, 6, 8)               # (B, S, W, E)
        >>> keep = torch.ones(2, 4, 6, dtype=torch.bool)
        >>> keep[1, 2:] = False                            # document 1 has 2 sentences
        >>> r = han(words, keep)
        >>> r.document.shape, r.sentences.shape, r.sentence_weights[1, 2:].tolist()
        (torch.Size([2, 6]), torch.Size([2, 4, 10]), [0.0, 0.0])
    """

    def __init__(
        self,
        embed_dim: int,
        word_hidden: int,
        sentence_hidden: int,
        *,
        encoder: str | None = "gru",
        attn_dim: int | None = None,
    ) -> None:
        super().__init__()
        embed_dim, word_hidden, sentence_hidden = _validate_sizes(
            embed_dim=embed_dim, word_hidden=word_hidden, sentence_hidden=sentence_hidden
        )
        if encoder not in ENCODERS:
            raise ValueError(f"encoder={encoder!r} is not supported; expected 'gru' or None")
        self.embed_dim = embed_dim
        self.word_encoder = _bigru(embed_dim, word_hidden) if encoder else None
        self.sentence_dim = 2 * word_hidden if encoder else embed_dim
        self.sentence_encoder = _bigru(self.sentence_dim, sentence_hidden) if encoder else None
        self.document_dim = 2 * sentence_hidden if encoder else embed_dim
        self.word_attention = AttentionPooling(self.sentence_dim, attn_dim)
        self.sentence_attention = AttentionPooling(self.document_dim, attn_dim)

    def forward(self, words: Tensor, word_mask: Tensor | None = None) -> HierarchicalOutput:
        """Encode a batch of documents.

        Args:
            words: ``(B, S, W, E)`` word embeddings: B documents of S sentences of W words.
            word_mask: bool ``(B, S, W)``, True = a real word; None = all real. Any pattern
                is allowed (the GRUs read the real items in order).

        Returns:
            A :class:`HierarchicalOutput`. Documents with no real word give 0s.
        """
        x, keep = _validate_words(words, word_mask, self.embed_dim)
        same_dtype("words", x, self.word_attention.context.dtype)  # (a bare torch error)
        b, s, w, e = x.shape
        if keep is None and not w:  # sentences without words: none is real
            keep = torch.zeros(b, s, 0, dtype=torch.bool, device=x.device)
        flat_keep = None if keep is None else keep.reshape(b * s, w)  # (B*S, W)
        hw = self._encode(self.word_encoder, x.reshape(b * s, w, e), flat_keep)
        sent, word_w = self.word_attention(hw, flat_keep)  # (B*S, Ds), (B*S, W)
        sent_keep = None if keep is None else keep.any(dim=-1)  # (B, S)
        sentences = sent.reshape(b, s, self.sentence_dim)  # (B, S, Ds); B or S may be 0
        hs = self._encode(self.sentence_encoder, sentences, sent_keep)  # (B, S, Dd)
        doc, sent_w = self.sentence_attention(hs, sent_keep)  # (B, Dd), (B, S)
        return HierarchicalOutput(doc, sentences, word_w.reshape(b, s, w), sent_w)

    @staticmethod
    def _encode(rnn: nn.GRU | None, x: Tensor, keep: Tensor | None) -> Tensor:
        """The GRU over the kept items, or the identity without an encoder."""
        return x if rnn is None else _encode_masked(rnn, x, keep)


def _bigru(input_dim: int, hidden: int) -> nn.GRU:
    """A batch-first bidirectional GRU: ``(N, L, input_dim) -> (N, L, 2 * hidden)``."""
    return nn.GRU(input_dim, hidden, batch_first=True, bidirectional=True)


def _validate_sizes(**sizes: object) -> list[int]:
    """Every size as a plain positive ``int`` (numpy's taken: nn.GRU refuses them)."""
    return [positive_int(name, value) for name, value in sizes.items()]


def _validate_words(
    words: object, word_mask: object, embed_dim: int
) -> tuple[Tensor, Tensor | None]:
    """``words (B, S, W, E)`` floating point and ``word_mask`` bool ``(B, S, W)`` or None."""
    if not isinstance(words, Tensor):
        raise TypeError(f"words must be a torch.Tensor (B, S, W, E), got {type(words).__name__}")
    if not words.is_floating_point():
        raise TypeError(f"words must be floating-point embeddings, got dtype {words.dtype}")
    if words.dim() != 4 or words.shape[-1] != embed_dim:
        raise ValueError(
            f"words must have shape (B, S, W, E) with E=embed_dim={embed_dim}, got shape "
            f"{tuple(words.shape)}"
        )
    if word_mask is None:
        return words, None
    if not isinstance(word_mask, Tensor) or word_mask.dtype != torch.bool:
        seen = word_mask.dtype if isinstance(word_mask, Tensor) else type(word_mask).__name__
        raise TypeError(f"word_mask must be a bool tensor (B, S, W) or None, got {seen}")
    if word_mask.shape != words.shape[:3]:
        raise ValueError(
            f"word_mask must have shape (B, S, W) = {tuple(words.shape[:3])} as in words, "
            f"got shape {tuple(word_mask.shape)}"
        )
    return words, word_mask.to(words.device)
