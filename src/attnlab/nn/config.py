"""One configuration for every transformer layer and stack of :mod:`attnlab.nn`.

:class:`LayerConfig` holds a layer's sizes and options once; :class:`~attnlab.nn.EncoderLayer`,
:class:`~attnlab.nn.DecoderLayer`, :class:`~attnlab.nn.DecoderOnly` and
:class:`~attnlab.nn.Transformer` take it instead of repeating the keywords.
"""

from __future__ import annotations

from dataclasses import KW_ONLY, dataclass
from typing import TYPE_CHECKING

from torch import nn

from attnlab._validate import (
    plain_fields,
    positive_int,
    validate_dropout,
    validate_flag,
    validate_normalize,
)
from attnlab.engines import get_engine

if TYPE_CHECKING:
    from attnlab.positional import RotaryEmbedding

__all__ = ["LayerConfig"]

ACTIVATIONS = ("relu", "gelu", "gelu_tanh", "swiglu")
NORMS = ("layer", "rms")


def check_heads(d: int, h: int, hkv: int | None, e: int | None) -> tuple[int, int, int, int]:
    """Check a layer's width ``d``, heads ``h``, key/value heads ``hkv`` (default ``h``)
    and head size ``e`` (default ``d // h``); returns ``(d, h, hkv, e)`` as plain ints
    (numpy ints are taken, as :func:`positive_int` takes them)."""
    d, h = positive_int("embed_dim", d), positive_int("num_heads", h)
    hkv = h if hkv is None else positive_int("num_kv_heads", hkv)
    if h % hkv:
        raise ValueError(f"num_kv_heads={hkv} must be a positive int dividing num_heads={h}")
    if e is not None:
        return d, h, hkv, positive_int("head_dim", e)
    if d % h:
        raise ValueError(f"embed_dim={d} is not divisible by num_heads={h}; pass head_dim")
    return d, h, hkv, d // h


def check_rope(rope: object, head_dim: int) -> None:
    """``rope`` is None or a :class:`~attnlab.positional.RotaryEmbedding` of the layer's
    ``head_dim`` (another value failed at the first call: "'int' object is not callable",
    another size with "x must have shape (B, H, L, E) with E = head_dim")."""
    from attnlab.positional import RotaryEmbedding

    if rope is not None and not isinstance(rope, RotaryEmbedding):
        raise TypeError(
            f"rope must be an attnlab.positional.RotaryEmbedding or None, got {type(rope).__name__}"
        )
    if rope is not None and rope.head_dim != head_dim:
        raise ValueError(
            f"rope must rotate heads of the layer's head_dim={head_dim}, got a "
            f"RotaryEmbedding of head_dim={rope.head_dim}"
        )


def check_attention_options(dropout: object, normalize: object, engine: object) -> None:
    """The attention options a module keeps for its calls, checked when it is built
    rather than at its first forward."""
    validate_dropout(dropout, "dropout")
    validate_normalize(normalize, False)
    if engine != "auto":
        get_engine(engine)  # type: ignore[arg-type]  # a TypeError/ValueError naming it


def check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    """A ValueError naming ``name`` unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not one of {choices}")


@dataclass(frozen=True)
class LayerConfig:
    """Sizes and options of a transformer layer (encoder, decoder or decoder-only).

    The defaults are those of the original transformer and ``torch.nn.Transformer``
    (post-norm, ReLU, dropout 0.1); a GPT-style stack sets ``norm_first=True``,
    ``activation="gelu"`` and ``dropout=0.0``.

    Args:
        d_model: model width ``D`` of the layer's input and output ``(B, L, D)``.
        num_heads: query heads ``H`` (``D % H == 0``).
        dim_feedforward: the feed-forward's hidden width.
        num_kv_heads: key/value heads (GQA / MQA); default ``num_heads``.
        dropout: after each sub-layer and inside the feed-forward, and on the attention
            weights unless ``attention_dropout`` is given.
        attention_dropout: on the attention weights (BERT's
            ``attention_probs_dropout_prob``); default None: ``dropout``.
        activation: ``"relu"``, ``"gelu"``, ``"gelu_tanh"`` or ``"swiglu"``.
        norm_first: pre-norm (True) or post-norm (False, the original transformer).
            Stacks of pre-norm layers end with a final norm.
        norm: ``"layer"`` (LayerNorm) or ``"rms"`` (RMSNorm).
        norm_eps: the norms' epsilon.
        bias: biases in the projections, feed-forward and LayerNorms.
        qk_norm: RMS-normalize queries and keys per head (see
            :class:`~attnlab.nn.MultiHeadAttention`).
        rope: a :class:`~attnlab.positional.RotaryEmbedding` for self-attention.
        normalize: the attention normalizer (``"softmax"``, ``"sparsemax"``, ...).
        engine: the attention engine (``"auto"`` picks per call).

    Raises:
        TypeError, ValueError: a size that is not a positive int, ``d_model`` not
            divisible by ``num_heads``, ``num_kv_heads`` not dividing it, a dropout
            outside ``[0, 1)``, an unknown ``activation``, ``norm``, ``normalize`` or
            ``engine``, a ``norm_eps`` that is not a positive float, a ``rope`` that is
            not a :class:`~attnlab.positional.RotaryEmbedding`.

    Example:
        >>> config = LayerConfig(32, 4, 64, dropout=0.0, norm_first=True)
        >>> config.d_model, config.activation, type(config.norm_layer()).__name__
        (32, 'relu', 'LayerNorm')
        >>> LayerConfig(32, 4, norm="batch")
        Traceback (most recent call last):
        ...
        ValueError: norm='batch' is not one of ('layer', 'rms')
    """

    d_model: int
    num_heads: int
    dim_feedforward: int = 2048
    _: KW_ONLY
    num_kv_heads: int | None = None
    dropout: float = 0.1
    attention_dropout: float | None = None
    activation: str = "relu"
    norm_first: bool = False
    norm: str = "layer"
    norm_eps: float = 1e-5
    bias: bool = True
    qk_norm: bool = False
    rope: RotaryEmbedding | None = None
    normalize: str = "softmax"
    engine: str = "auto"

    def __post_init__(self) -> None:
        plain_fields(self)  # numpy scalars as Python's: the config stays JSON-able
        for name in ("d_model", "num_heads", "dim_feedforward"):  # stored as plain ints
            object.__setattr__(self, name, positive_int(name, getattr(self, name)))
        if self.d_model % self.num_heads:
            raise ValueError(
                f"d_model={self.d_model} must be divisible by num_heads={self.num_heads}"
            )
        _, _, hkv, _ = check_heads(self.d_model, self.num_heads, self.num_kv_heads, None)
        if self.num_kv_heads is not None:
            object.__setattr__(self, "num_kv_heads", hkv)
        check_attention_options(self.dropout, self.normalize, self.engine)
        if self.attention_dropout is not None:
            validate_dropout(self.attention_dropout, "attention_dropout")
        check_choice("activation", self.activation, ACTIVATIONS)
        check_choice("norm", self.norm, NORMS)
        check_rope(self.rope, self.d_model // self.num_heads)
        for flag in ("norm_first", "bias", "qk_norm"):  # ("False" is truthy: pre-norm)
            object.__setattr__(self, flag, validate_flag(flag, getattr(self, flag)))
        eps = self.norm_eps  # a negative one gave NaN outputs, a str failed at the first call
        if isinstance(eps, bool) or not isinstance(eps, (int, float)):
            raise TypeError(f"norm_eps must be a positive float, got {type(eps).__name__}")
        if not 0 < eps < float("inf"):
            raise ValueError(f"norm_eps must be a positive float, got {eps!r}")

    @property
    def attention_p(self) -> float:
        """The dropout on the attention weights: ``attention_dropout``, or ``dropout``."""
        return self.dropout if self.attention_dropout is None else self.attention_dropout

    def norm_layer(self) -> nn.Module:
        """A new norm of this config's kind, width ``d_model`` and epsilon."""
        if self.norm == "rms":
            return nn.RMSNorm(self.d_model, eps=self.norm_eps)
        return nn.LayerNorm(self.d_model, eps=self.norm_eps, bias=self.bias)
