"""A sentence encoder as the explanations see it: :func:`text_model`.

``attnlab explain``, ``attnlab serve`` and the apps (ask, summarize) hand the shipped
all-MiniLM-L6-v2 (or any sentence-transformers folder) to :mod:`attnlab.interpret`
through this one adapter.
"""

from __future__ import annotations

from attnlab.interpret import TextModel
from attnlab.models import SentenceEncoder

__all__ = ["text_model"]


def text_model(enc: SentenceEncoder) -> TextModel:
    """``enc`` as the explanations see it: its BERT, tokenizer, pooling and word embeddings.

    Example:
        >>> import tempfile
        >>> from attnlab.interpret import explain_text
        >>> enc = SentenceEncoder.from_pretrained()  # needs attnlab[pretrained]
        >>> ex = explain_text(text_model(enc), "Cats purr.", tempfile.mkdtemp() + "/r.html",
        ...                   steps=4, log=lambda s: None)
        >>> ex.tokens, [p.suffix for p in ex.files][:2]
        (['[CLS]', 'cats', 'pu', '##rr', '.', '[SEP]'], ['.html', '.png'])
    """
    if not isinstance(enc, SentenceEncoder):
        raise TypeError(f"enc must be a SentenceEncoder, got {type(enc).__name__}")
    return TextModel(
        network=enc.bert,
        tokenize=lambda text: enc.tokenize([text])[0],
        token_name=lambda i: enc.tokenizer.id_to_token(i) or "?",
        pooled=lambda ids: enc.embed_rows(ids, normalize=False),
        embed=lambda ids: enc.embed_rows(ids),
        input_embeddings=enc.bert.embeddings.word_embeddings,
        pad_id=enc.bert.config.pad_token_id or 0,  # (None: [PAD] is 0 in BERT vocabularies)
        pooling=enc.config.pooling,
    )
