"""BERT-family encoders built from :mod:`attnlab.nn`, loaded from Hugging Face folders.

:class:`BertEncoder` is word, position and token-type embeddings, then post-norm
:class:`~attnlab.nn.EncoderLayer` s. :meth:`BertEncoder.from_pretrained` reads a folder in
the Hugging Face layout (``config.json`` + ``model.safetensors``); loading is a key
mapping (query, key and value rows are concatenated into ``in_proj_weight``), and a
checkpoint that does not fit gets an error listing every missing, unexpected and
mis-shaped tensor.

Example:
    >>> import torch
    >>> from attnlab import masks
    >>> config = BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2,
    ...                     num_attention_heads=4, intermediate_size=64)
    >>> bert = BertEncoder(config).eval()
    >>> ids = torch.tensor([[2, 7, 9, 3], [2, 5, 3, 0]])
    >>> out = bert(ids, mask=masks.padding([4, 3]), need_weights=True)
    >>> tuple(out.hidden.shape), len(out.attentions), tuple(out.attentions[0].shape)
    ((2, 4, 32), 2, (2, 4, 4, 4))
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from attnlab._scalars import choice, plain_fields, positive_int, positive_real
from attnlab._validate import instance_of, nonnegative_int, validate_dropout, validate_flag
from attnlab.masks import Mask
from attnlab.models._checkpoint import check_state, read_safetensors
from attnlab.models._ids import check_id_dtype
from attnlab.nn import EncoderLayer, LayerConfig

__all__ = ["BertConfig", "BertEmbeddings", "BertEncoder", "BertOutput", "bert_state_dict"]

# Hugging Face activation names -> attnlab FeedForward activations
_ACTIVATIONS = {
    "gelu": "gelu",
    "relu": "relu",
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
}
# checkpoint prefixes that may be present and are not used by the encoder
_OPTIONAL = ("pooler.", "cls.", "embeddings.position_ids")
# per-layer Hugging Face module names -> attnlab EncoderLayer module names (documented in
# attnlab.nn.layers; the query, key and value rows go into self_attn.in_proj_*)
_LAYER_NAMES = {
    "attention.output.dense": "self_attn.out_proj",
    "attention.output.LayerNorm": "norm1",
    "intermediate.dense": "ff.linear1",
    "output.dense": "ff.linear2",
    "output.LayerNorm": "norm2",
}


@dataclass(frozen=True)
class BertConfig:
    """Sizes and options of a BERT encoder, named as in Hugging Face's ``config.json``.

    Example:
        >>> BertConfig.from_dict({"hidden_size": 384, "num_attention_heads": 12,
        ...                       "model_type": "bert"}).hidden_size
        384
    """

    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    pad_token_id: int | None = 0
    position_embedding_type: str = "absolute"

    def __post_init__(self) -> None:
        plain_fields(self)  # numpy scalars as Python's: the config stays JSON-able
        sizes = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads")
        for name in (*sizes, "intermediate_size", "max_position_embeddings", "type_vocab_size"):
            positive_int(f"BertConfig.{name}", getattr(self, name))  # (numpy's taken)
        positive_real("BertConfig.layer_norm_eps", self.layer_norm_eps)  # (BertEncoder: norm_eps)
        for name in ("hidden_dropout_prob", "attention_probs_dropout_prob"):
            validate_dropout(getattr(self, name), f"BertConfig.{name}")
        pad = self.pad_token_id  # (100 failed inside nn.Embedding, "0" in a comparison)
        if pad is not None and nonnegative_int("BertConfig.pad_token_id", pad) >= self.vocab_size:
            raise ValueError(
                f"BertConfig.pad_token_id must be None or an id in [0, vocab_size="
                f"{self.vocab_size}), got {pad}"
            )
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"BertConfig.hidden_size={self.hidden_size} is not divisible by "
                f"num_attention_heads={self.num_attention_heads}"
            )
        choice("BertConfig.hidden_act", self.hidden_act, _ACTIVATIONS)  # ([...]: unhashable)
        if self.position_embedding_type != "absolute":
            raise ValueError(
                "BertConfig.position_embedding_type must be 'absolute', got "
                f"{self.position_embedding_type!r}"
            )

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> BertConfig:
        """A config from Hugging Face's keys (unknown keys are ignored)."""
        instance_of("raw", raw, Mapping, "a mapping of config.json's keys")  # type: ignore[type-abstract]
        kind = raw.get("model_type", "bert")
        if kind != "bert":
            raise ValueError(f"config model_type={kind!r} is not 'bert'")
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in names})

    @classmethod
    def from_json(cls, path: str | Path) -> BertConfig:
        """Read a Hugging Face ``config.json``."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file {path} does not exist")
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as err:
            raise ValueError(f"config file {path} is not valid JSON: {err}") from err
        if not isinstance(raw, dict):
            raise ValueError(
                f"config file {path} must hold a JSON object, got {type(raw).__name__}"
            )
        return cls.from_dict(raw)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


class BertOutput(NamedTuple):
    """What :class:`BertEncoder` returns.

    Attributes:
        hidden: the last layer's hidden states ``(B, L, D)``.
        attentions: per layer, the attention weights ``(B, H, L, L)``; None unless asked.

    Example:
        >>> bert = BertEncoder(BertConfig(vocab_size=10, hidden_size=8, num_hidden_layers=2,
        ...                               num_attention_heads=2, intermediate_size=16)).eval()
        >>> hidden, attentions = bert(torch.tensor([[1, 2, 3]]))  # a NamedTuple: it unpacks
        >>> tuple(hidden.shape), attentions  # need_weights=True fills attentions
        ((1, 3, 8), None)
    """

    hidden: Tensor
    attentions: tuple[Tensor, ...] | None


class BertEmbeddings(nn.Module):
    """Word + position + token-type embeddings, then LayerNorm and dropout.

    Example:
        >>> import torch
        >>> emb = BertEmbeddings(BertConfig(vocab_size=10, hidden_size=8, num_attention_heads=2))
        >>> tuple(emb(torch.tensor([[1, 2, 3]])).shape)
        (1, 3, 8)
    """

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        d = config.hidden_size
        self.word_embeddings = nn.Embedding(config.vocab_size, d, padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, d)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, d)
        self.norm = nn.LayerNorm(d, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(
        self,
        input_ids: Tensor,
        token_type_ids: Tensor | None = None,
        positions: Tensor | None = None,
    ) -> Tensor:
        """``input_ids (B, L)`` -> ``(B, L, D)``.

        ``token_type_ids`` default to 0; ``positions (L,)`` or ``(B, L)`` to ``0..L-1``.
        """
        if positions is None:
            positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        types = (
            self.token_type_embeddings.weight[0]  # (D,): the usual all-zero token types
            if token_type_ids is None
            else self.token_type_embeddings(token_type_ids)
        )
        x = self.word_embeddings(input_ids) + self.position_embeddings(positions) + types
        return self.dropout(self.norm(x))  # (B, L, D)


class BertEncoder(nn.Module):
    """A BERT encoder: :class:`BertEmbeddings` and ``num_hidden_layers`` post-norm GELU
    :class:`~attnlab.nn.EncoderLayer` s (``layers``), without the pooler.

    Padded batches take ``mask=masks.padding(lengths)``; packed batches (several texts in
    one row) take ``mask=masks.documents(doc_ids)`` with ``positions`` restarting at 0 for
    each text, so the blocked engine skips the pairs across texts.

    Args:
        config: a :class:`BertConfig`.
        engine: the attention engine of every layer (``"auto"`` picks per call).

    Example:
        >>> import torch
        >>> from attnlab import masks
        >>> bert = BertEncoder(BertConfig(vocab_size=30, hidden_size=16, num_hidden_layers=1,
        ...                               num_attention_heads=2, intermediate_size=32)).eval()
        >>> ids = torch.tensor([[2, 5, 7, 3, 2, 9, 3]])  # two texts packed in one row
        >>> doc, pos = torch.tensor([0, 0, 0, 0, 1, 1, 1]), torch.tensor([0, 1, 2, 3, 0, 1, 2])
        >>> packed = bert(ids, mask=masks.documents(doc), positions=pos).hidden
        >>> alone = bert(ids[:, 4:]).hidden
        >>> torch.allclose(packed[:, 4:], alone, atol=1e-5)
        True
    """

    def __init__(self, config: BertConfig, *, engine: str = "auto") -> None:
        super().__init__()
        self.config = config
        self.embeddings = BertEmbeddings(config)
        layer = LayerConfig(
            config.hidden_size,
            config.num_attention_heads,
            config.intermediate_size,
            dropout=config.hidden_dropout_prob,
            attention_dropout=config.attention_probs_dropout_prob,
            activation=_ACTIVATIONS[config.hidden_act],
            norm_eps=config.layer_norm_eps,
            engine=engine,
        )
        self.layers = nn.ModuleList(EncoderLayer(layer) for _ in range(config.num_hidden_layers))

    def forward(
        self,
        input_ids: Tensor,
        token_type_ids: Tensor | None = None,
        *,
        mask: Mask | Tensor | None = None,
        positions: Tensor | None = None,
        need_weights: bool = False,
    ) -> BertOutput:
        """Encode token ids.

        Args:
            input_ids: ``(B, L)`` integer token ids.
            token_type_ids: ``(B, L)`` segment ids, or a shape that broadcasts to it such
                as ``(L,)`` (default all 0).
            mask: an :mod:`attnlab.masks` mask or bool tensor broadcastable to
                ``(B, H, L, L)`` (True = may attend), e.g. ``masks.padding(lengths)``.
            positions: ``(L,)`` or ``(B, L)`` position ids, or a shape that broadcasts to
                ``(B, L)`` (default ``0..L-1``); any other shape is a ValueError.
            need_weights: also return every layer's attention weights ``(B, H, L, L)``.

        Returns:
            a :class:`BertOutput` ``(hidden (B, L, D), attentions or None)``.
        """
        self._check_ids(input_ids, token_type_ids, positions)
        need_weights = validate_flag("need_weights", need_weights)
        x = self.embeddings(input_ids, token_type_ids, positions)  # (B, L, D)
        weights: list[Tensor] = []
        for layer in self.layers:
            if need_weights:
                x, w = layer(x, mask=mask, need_weights=True)  # w: (B, H, L, L)
                weights.append(w)
            else:
                x = layer(x, mask=mask)
        return BertOutput(x, tuple(weights) if need_weights else None)

    def _check_ids(self, input_ids: object, token_type_ids: object, positions: object) -> None:
        """Validate ``input_ids (B, L)``, their token types and the positions they get (ids
        outside the embedding tables would otherwise fail deep inside ``nn.Embedding``)."""
        if not isinstance(input_ids, Tensor) or input_ids.dim() != 2:
            seen = tuple(input_ids.shape) if isinstance(input_ids, Tensor) else type(input_ids)
            raise TypeError(f"input_ids must be an integer Tensor (B, L), got {seen}")
        check_id_dtype("input_ids", input_ids)  # int16, uint8: failed inside nn.Embedding
        c = self.config
        _check_rows("input_ids", input_ids, "vocab_size", c)
        for name, ids in (("token_type_ids", token_type_ids), ("positions", positions)):
            if isinstance(ids, Tensor):  # (anything else: a TypeError below)
                _check_shape(name, ids, input_ids.shape)
        if token_type_ids is not None:
            _check_rows("token_type_ids", token_type_ids, "type_vocab_size", c)
        top = input_ids.shape[1] - 1
        if positions is not None:
            lo, top = _id_range("positions", positions)
            if lo < 0:
                raise _out_of_table("positions", lo, top, "max_position_embeddings", c)
        if top >= c.max_position_embeddings:
            raise ValueError(
                f"position {top} >= max_position_embeddings={c.max_position_embeddings}; "
                "truncate the input"
            )

    @classmethod
    def from_pretrained(cls, path: str | Path, *, engine: str = "auto") -> BertEncoder:
        """Load a Hugging Face BERT folder (``config.json`` + ``model.safetensors``).

        Keys may carry a ``bert.`` prefix; ``pooler.*`` and ``cls.*`` heads are ignored.

        Raises:
            FileNotFoundError: the folder or one of its two files is absent.
            ValueError: the config is invalid, the weights file is corrupt, or its
                tensors do not fit the config (every mismatch is listed).

        Example:
            >>> from attnlab.models import minilm_path
            >>> bert = BertEncoder.from_pretrained(minilm_path())  # needs attnlab[pretrained]
            >>> bert.config.hidden_size, len(bert.layers)
            (384, 6)
        """
        folder = Path(path)
        if not folder.is_dir():
            raise FileNotFoundError(
                f"model folder {folder} does not exist (expected a Hugging Face folder with "
                "config.json and model.safetensors)"
            )
        config = BertConfig.from_json(folder / "config.json")
        weights = folder / "model.safetensors"
        state = bert_state_dict(read_safetensors(weights), config, where=str(weights))
        model = cls(config, engine=engine)
        model.load_state_dict(state)
        return model.eval()


def _id_range(name: str, ids: object) -> tuple[int, int]:
    """``(min, max)`` of the integer tensor ``ids`` (``(0, -1)`` when empty)."""
    if not isinstance(ids, Tensor):
        raise TypeError(f"{name} must be an integer Tensor or None, got {type(ids).__name__}")
    check_id_dtype(name, ids, "ids")
    if not ids.numel():
        return 0, -1
    lo, hi = torch.aminmax(ids)
    return int(lo), int(hi)


def _check_shape(name: str, ids: Tensor, want: torch.Size) -> None:
    """``ids`` must broadcast to ``want``, input_ids' ``(B, L)``, without growing it:
    ``(L,)``, ``(1, L)`` and ``(B, 1)`` do (the embedding sum broadcasts them)."""
    try:
        fits = ids.dim() <= 2 and torch.broadcast_shapes(ids.shape, want) == want
    except RuntimeError:  # the shapes do not broadcast at all
        fits = False
    if not fits:
        raise ValueError(
            f"{name} must have input_ids' shape (B, L) = {tuple(want)} or one that "
            f"broadcasts to it, such as (L,) = ({want[1]},); got {tuple(ids.shape)}"
        )


def _check_rows(name: str, ids: object, table: str, c: BertConfig) -> None:
    """``ids`` must be integer rows of the embedding table of size ``c.<table>``."""
    lo, hi = _id_range(name, ids)
    if lo < 0 or hi >= getattr(c, table):
        raise _out_of_table(name, lo, hi, table, c)


def _out_of_table(name: str, lo: int, hi: int, table: str, c: BertConfig) -> ValueError:
    """The error for ids in ``[lo, hi]`` outside ``[0, c.<table>)``."""
    return ValueError(
        f"{name} must lie in [0, {table}={getattr(c, table)}), got values in [{lo}, {hi}]"
    )


def _hf_shapes(c: BertConfig) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the tensors of a Hugging Face ``BertModel`` checkpoint."""
    d, f = c.hidden_size, c.intermediate_size
    shapes: dict[str, tuple[int, ...]] = {
        "embeddings.word_embeddings.weight": (c.vocab_size, d),
        "embeddings.position_embeddings.weight": (c.max_position_embeddings, d),
        "embeddings.token_type_embeddings.weight": (c.type_vocab_size, d),
        "embeddings.LayerNorm.weight": (d,),
        "embeddings.LayerNorm.bias": (d,),
    }
    per_layer: dict[str, tuple[int, ...]] = {
        f"attention.self.{n}": (d, d) for n in ("query", "key", "value")
    }
    per_layer |= {"attention.output.dense": (d, d), "intermediate.dense": (f, d)}
    per_layer |= {"output.dense": (d, f), "attention.output.LayerNorm": (d,)}
    per_layer |= {"output.LayerNorm": (d,)}
    for i in range(c.num_hidden_layers):
        for name, shape in per_layer.items():
            shapes[f"encoder.layer.{i}.{name}.weight"] = shape
            shapes[f"encoder.layer.{i}.{name}.bias"] = shape[:1]
    return shapes


def _canonical(key: str) -> str:
    """Strip a ``bert.`` prefix; old checkpoints call LayerNorm's weight/bias gamma/beta."""
    key = key.removeprefix("bert.")
    if ".LayerNorm." in key:
        key = key.replace(".LayerNorm.gamma", ".LayerNorm.weight")
        key = key.replace(".LayerNorm.beta", ".LayerNorm.bias")
    return key


def bert_state_dict(
    state: Mapping[str, Tensor], config: BertConfig, *, where: str = "checkpoint"
) -> dict[str, Tensor]:
    """Map a Hugging Face BERT state dict onto :class:`BertEncoder`'s parameter names.

    Args:
        state: tensors by Hugging Face name (``bert.`` prefixes allowed).
        config: the model's config; every tensor's shape is checked against it.
        where: what ``state`` came from, for the error message.

    Returns:
        a state dict that :class:`BertEncoder(config)` loads strictly.

    Raises:
        ValueError: listing missing, unexpected, mis-shaped and integer tensors.

    Example:
        >>> c = BertConfig(vocab_size=10, hidden_size=8, num_hidden_layers=1,
        ...                num_attention_heads=2, intermediate_size=16)
        >>> bert_state_dict({}, c)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: checkpoint does not fit the model: the config has num_hidden_layers=1, the...
    """
    hf = {_canonical(k): v for k, v in state.items()}
    shapes = lambda: _hf_shapes(config)  # noqa: E731  (after the layer count is checked)
    check_state(where, hf, shapes, _OPTIONAL, ("encoder.layer.", config.num_hidden_layers))
    out = {
        "embeddings.word_embeddings.weight": hf["embeddings.word_embeddings.weight"],
        "embeddings.position_embeddings.weight": hf["embeddings.position_embeddings.weight"],
        "embeddings.token_type_embeddings.weight": hf["embeddings.token_type_embeddings.weight"],
        "embeddings.norm.weight": hf["embeddings.LayerNorm.weight"],
        "embeddings.norm.bias": hf["embeddings.LayerNorm.bias"],
    }
    for i in range(config.num_hidden_layers):
        src, dst = f"encoder.layer.{i}.", f"layers.{i}."
        for part in ("weight", "bias"):
            qkv = [hf[f"{src}attention.self.{n}.{part}"] for n in ("query", "key", "value")]
            out[f"{dst}self_attn.in_proj_{part}"] = torch.cat(qkv)  # q, k, v rows
            for hf_name, ours in _LAYER_NAMES.items():
                out[f"{dst}{ours}.{part}"] = hf[f"{src}{hf_name}.{part}"]
    return out
