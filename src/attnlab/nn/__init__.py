"""Attention layers and transformer blocks, batch-first ``(B, L, D)`` in and out.

Example:
    >>> import torch
    >>> from attnlab.nn import MultiHeadAttention
    >>> tuple(MultiHeadAttention(32, 4)(torch.randn(2, 5, 32)).shape)
    (2, 5, 32)
"""

from __future__ import annotations

from attnlab.nn._fused import forget_packed
from attnlab.nn.attention import MultiHeadAttention
from attnlab.nn.cache import DecoderCache, KVCache
from attnlab.nn.classic import AttentionPooling, BahdanauAttention, LuongAttention
from attnlab.nn.config import LayerConfig
from attnlab.nn.hierarchical import HierarchicalAttention, HierarchicalOutput
from attnlab.nn.layers import DecoderLayer, EncoderLayer, FeedForward
from attnlab.nn.linformer import LinformerAttention
from attnlab.nn.transformer import Decoder, DecoderOnly, Encoder, Transformer

__all__ = [
    "AttentionPooling",
    "BahdanauAttention",
    "Decoder",
    "DecoderCache",
    "DecoderLayer",
    "DecoderOnly",
    "Encoder",
    "EncoderLayer",
    "FeedForward",
    "HierarchicalAttention",
    "HierarchicalOutput",
    "KVCache",
    "LayerConfig",
    "LinformerAttention",
    "LuongAttention",
    "MultiHeadAttention",
    "Transformer",
    "forget_packed",
]
