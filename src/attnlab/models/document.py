"""Document classification with hierarchical attention: word embeddings,
:class:`~attnlab.nn.HierarchicalAttention` (word GRU + attention pooling, sentence GRU +
attention pooling) and a linear classifier. The ``classification`` task
(:mod:`attnlab.tasks.classification`) trains it.
"""

from __future__ import annotations

from typing import NamedTuple

from torch import Tensor, nn

from attnlab._validate import positive_int, validate_dropout
from attnlab.models._ids import check_id_dtype, check_vocab
from attnlab.nn import HierarchicalAttention
from attnlab.nn.hierarchical import HierarchicalOutput

__all__ = ["ClassifierOutput", "DocumentClassifier"]


class ClassifierOutput(NamedTuple):
    """``logits (B, C)`` and the hierarchical attention's output (weights included).

    Example:
        >>> import torch
        >>> m = DocumentClassifier(20, 3, embed_dim=8, word_hidden=4, sentence_hidden=4)
        >>> logits, han = m(torch.tensor([[[5, 6, 0], [7, 0, 0]]]))  # (B, S, W): it unpacks
        >>> tuple(logits.shape), tuple(han.sentence_weights.shape)
        ((1, 3), (1, 2))
        >>> han.word_weights[0, 1].tolist()  # sentence 1 has one word: it takes all the weight
        [1.0, 0.0, 0.0]
    """

    logits: Tensor
    han: HierarchicalOutput


class DocumentClassifier(nn.Module):
    """Word embeddings, :class:`~attnlab.nn.HierarchicalAttention` and a linear classifier.

    Args:
        vocab_size, num_classes: ``V`` and ``C``; word id 0 is padding.
        embed_dim, word_hidden, sentence_hidden: the hierarchical network's sizes.
        dropout: on the document vector.

    Example:
        >>> import torch
        >>> m = DocumentClassifier(20, 3, embed_dim=8, word_hidden=4, sentence_hidden=4)
        >>> out = m(torch.tensor([[[5, 6, 0], [7, 0, 0], [0, 0, 0]]]))  # (B, S, W)
        >>> tuple(out.logits.shape), out.han.sentence_weights[0, 2].item()
        ((1, 3), 0.0)
    """

    def __init__(
        self,
        vocab_size: int,
        num_classes: int,
        *,
        embed_dim: int = 64,
        word_hidden: int = 64,
        sentence_hidden: int = 64,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        positive_int("num_classes", num_classes)
        d = positive_int("embed_dim", embed_dim)  # (2.0 failed inside nn.Embedding)
        self.embed = nn.Embedding(positive_int("vocab_size", vocab_size), d, padding_idx=0)
        self.han = HierarchicalAttention(d, word_hidden, sentence_hidden)  # checks the others
        self.dropout = nn.Dropout(validate_dropout(dropout, "dropout"))  # (torch's own error)
        self.head = nn.Linear(self.han.document_dim, num_classes)

    def forward(self, ids: Tensor) -> ClassifierOutput:
        """``ids (B, S, W)`` word ids (0 = padding) -> logits ``(B, C)`` and attention."""
        if not isinstance(ids, Tensor) or ids.dim() != 3 or ids.is_floating_point():
            seen = f"{ids.dtype} {tuple(ids.shape)}" if isinstance(ids, Tensor) else type(ids)
            raise TypeError(f"ids must be an integer tensor (B, S, W), got {seen}")
        check_id_dtype("ids", ids)  # int16, uint8, bool failed inside nn.Embedding
        check_vocab("ids", ids, "vocab_size", self.embed.num_embeddings)
        han = self.han(self.embed(ids), ids != 0)  # document (B, Dd), weights ...
        return ClassifierOutput(self.head(self.dropout(han.document)), han)
