"""See inside: capture attention weights from any engine (explanations and pictures build
on it), and explain a text encoder end to end (:func:`explain_text`).

Example:
    >>> import torch
    >>> from attnlab.nn import MultiHeadAttention
    >>> from attnlab.interpret import capture
    >>> mha = MultiHeadAttention(16, 2, engine="sdpa")
    >>> with capture(mha) as cap:
    ...     _ = mha(torch.randn(1, 5, 16))
    >>> cap.records[0].engine, tuple(cap.records[0].weights.shape)
    ('sdpa', (1, 2, 5, 5))
"""

from __future__ import annotations

from attnlab.interpret.capture import Captured, capture
from attnlab.interpret.explain import (
    Attribution,
    fuse_heads,
    gradient_relevance,
    integrated_gradients,
    relevance,
    residual_attention,
    rollout,
)
from attnlab.interpret.flow import attention_flow
from attnlab.interpret.text import (
    Explanation,
    TextModel,
    captured_attentions,
    explain_text,
    explained_score,
    write_explanation,
)

__all__ = [
    "Attribution",
    "Captured",
    "Explanation",
    "TextModel",
    "attention_flow",
    "capture",
    "captured_attentions",
    "explain_text",
    "explained_score",
    "fuse_heads",
    "gradient_relevance",
    "integrated_gradients",
    "relevance",
    "residual_attention",
    "rollout",
    "write_explanation",
]
