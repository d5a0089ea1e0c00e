"""Whole models built from :mod:`attnlab.nn`: BERT encoders, sentence embedders, seq2seq
(transformer and Bahdanau-attention GRU), a decoder LM, ViT, a captioner and a
hierarchical-attention document classifier.

Example:
    >>> import torch
    >>> from attnlab.models import BertConfig, BertEncoder
    >>> bert = BertEncoder(BertConfig(vocab_size=20, hidden_size=16, num_hidden_layers=1,
    ...                               num_attention_heads=2, intermediate_size=32))
    >>> tuple(bert(torch.tensor([[1, 2, 3]])).hidden.shape)
    (1, 3, 16)
"""

from __future__ import annotations

from attnlab.models.bert import BertConfig, BertEmbeddings, BertEncoder, BertOutput, bert_state_dict
from attnlab.models.captioner import Captioner, CaptionerConfig
from attnlab.models.document import ClassifierOutput, DocumentClassifier
from attnlab.models.lm import LanguageModel, LMConfig, sample_logits
from attnlab.models.pretrained import minilm_path
from attnlab.models.rnn import RNNSeq2Seq, RNNSeq2SeqConfig
from attnlab.models.sentence import (
    SentenceConfig,
    SentenceEncoder,
    TruncationWarning,
    load_tokenizer,
)
from attnlab.models.sentence_folder import SentenceDense
from attnlab.models.seq2seq import Seq2Seq, Seq2SeqConfig
from attnlab.models.vit import PatchEmbedding, ViT, ViTConfig

__all__ = [
    "BertConfig",
    "BertEmbeddings",
    "BertEncoder",
    "BertOutput",
    "Captioner",
    "CaptionerConfig",
    "ClassifierOutput",
    "DocumentClassifier",
    "LMConfig",
    "LanguageModel",
    "PatchEmbedding",
    "RNNSeq2Seq",
    "RNNSeq2SeqConfig",
    "SentenceConfig",
    "SentenceDense",
    "SentenceEncoder",
    "Seq2Seq",
    "Seq2SeqConfig",
    "TruncationWarning",
    "ViT",
    "ViTConfig",
    "bert_state_dict",
    "load_tokenizer",
    "minilm_path",
    "sample_logits",
]
