"""Transformer blocks: feed-forward, encoder and decoder layers, stacks, seq2seq.

Layers follow ``torch.nn.TransformerEncoderLayer`` / ``TransformerDecoderLayer``
(post-norm by default, ``norm_first=True`` for pre-norm) with attnlab's attention inside,
so every mask, bias, normalizer, engine, GQA and RoPE option reaches them. Inputs are
batch-first ``(B, L, D)``. :meth:`EncoderLayer.from_torch` and
:meth:`DecoderLayer.from_torch` copy torch layers.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import torch.nn.functional as F
from torch import Tensor, nn

from attnlab import masks as M
from attnlab.bias import Bias
from attnlab.masks import Mask
from attnlab.nn._fused import module_linear
from attnlab.nn.attention import MultiHeadAttention
from attnlab.nn.cache import DecoderCache, KVCache

if TYPE_CHECKING:
    from attnlab.positional import RotaryEmbedding

__all__ = [
    "Decoder",
    "DecoderLayer",
    "DecoderOnly",
    "Encoder",
    "EncoderLayer",
    "FeedForward",
    "Transformer",
]

MaskLike = Mask | Tensor | None
_L = TypeVar("_L", bound="EncoderLayer")
_ACTIVATIONS = ("relu", "gelu", "gelu_tanh", "swiglu")


class FeedForward(nn.Module):
    """Position-wise feed-forward: ``linear2(dropout(act(linear1(x))))``.

    ``activation="swiglu"`` (Shazeer 2020) makes ``linear1`` produce gate and value halves
    and computes ``linear2(silu(gate) * value)``.

    Args:
        d_model: input and output width ``D``.
        dim_feedforward: hidden width.
        activation: ``"relu"``, ``"gelu"``, ``"gelu_tanh"`` or ``"swiglu"``.
        dropout: dropout after the activation.
        bias: whether the linear layers have biases.

    Example:
        >>> import torch
        >>> ff = FeedForward(16, 64, activation="swiglu")
        >>> tuple(ff(torch.randn(2, 3, 16)).shape), tuple(ff.linear1.weight.shape)
        ((2, 3, 16), (128, 16))
    """

    def __init__(
        self,
        d_model: int,
        dim_feedforward: int,
        *,
        activation: str = "relu",
        dropout: float = 0.0,
        bias: bool = True,
    ) -> None:
        super().__init__()
        if activation not in _ACTIVATIONS:
            raise ValueError(f"activation={activation!r} is not one of {_ACTIVATIONS}")
        width = 2 * dim_feedforward if activation == "swiglu" else dim_feedforward
        self.activation = activation
        self.linear1 = nn.Linear(d_model, width, bias=bias)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        """``x (B, L, D) -> (B, L, D)``."""
        if self.activation == "swiglu":
            gate, value = self.linear1(x).chunk(2, dim=-1)  # (B, L, F) each
            h = F.silu(gate) * value
        else:  # one fused matmul + bias + activation at CPU inference
            h = module_linear(self.linear1, x, self.activation)  # (B, L, F)
        return module_linear(self.linear2, self.dropout(h))


def _norm(kind: str, d: int, eps: float, bias: bool) -> nn.Module:
    if kind == "layer":
        return nn.LayerNorm(d, eps=eps, bias=bias)
    if kind == "rms":
        return nn.RMSNorm(d, eps=eps)
    raise ValueError(f"norm={kind!r} is not one of ('layer', 'rms')")


class EncoderLayer(nn.Module):
    """Self-attention and feed-forward with residuals: a transformer encoder layer.

    Args:
        d_model, num_heads, dim_feedforward: widths and query heads.
        num_kv_heads: key/value heads (GQA / MQA); default ``num_heads``.
        dropout: on attention weights, after each sub-layer and inside the feed-forward.
        activation: ``"relu"``, ``"gelu"``, ``"gelu_tanh"`` or ``"swiglu"``.
        norm_first: pre-norm (True) or post-norm (False, the original transformer).
        norm: ``"layer"`` (LayerNorm) or ``"rms"`` (RMSNorm); ``norm_eps`` its epsilon.
        bias: biases in the projections, feed-forward and LayerNorms.
        qk_norm, rope, normalize, engine: passed to :class:`MultiHeadAttention`.

    Example:
        >>> import torch
        >>> layer = EncoderLayer(32, 4, 64, dropout=0.0, norm_first=True)
        >>> tuple(layer(torch.randn(2, 7, 32)).shape)
        (2, 7, 32)
    """

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        dim_feedforward: int = 2048,
        *,
        num_kv_heads: int | None = None,
        dropout: float = 0.1,
        activation: str = "relu",
        norm_first: bool = False,
        norm: str = "layer",
        norm_eps: float = 1e-5,
        bias: bool = True,
        qk_norm: bool = False,
        rope: RotaryEmbedding | None = None,
        normalize: str = "softmax",
        engine: str = "auto",
    ) -> None:
        super().__init__()
        self.norm_first = norm_first
        self.self_attn = MultiHeadAttention(
            d_model,
            num_heads,
            num_kv_heads=num_kv_heads,
            bias=bias,
            dropout=dropout,
            qk_norm=qk_norm,
            rope=rope,
            normalize=normalize,
            engine=engine,
        )
        self.ff = FeedForward(
            d_model, dim_feedforward, activation=activation, dropout=dropout, bias=bias
        )
        self._add_norm(1, norm, d_model, norm_eps, bias, dropout)
        self._add_norm(2, norm, d_model, norm_eps, bias, dropout)

    def _add_norm(self, i: int, kind: str, d: int, eps: float, bias: bool, p: float) -> None:
        """Sub-layer ``i``'s norm and output dropout (``norm{i}``, ``dropout{i}``)."""
        setattr(self, f"norm{i}", _norm(kind, d, eps, bias))
        setattr(self, f"dropout{i}", nn.Dropout(p))

    def _residual(self, x: Tensor, i: int, fn: Callable[[Tensor], Tensor]) -> Tensor:
        """Pre-norm ``x + f(norm(x))`` or post-norm ``norm(x + f(x))`` for sub-layer ``i``."""
        norm, drop = getattr(self, f"norm{i}"), getattr(self, f"dropout{i}")
        if self.norm_first:
            return x + drop(fn(norm(x)))
        return norm(x + drop(fn(x)))

    def forward(
        self,
        x: Tensor,
        *,
        mask: MaskLike = None,
        bias: Bias | Tensor | None = None,
        positions: Tensor | None = None,
    ) -> Tensor:
        """``x (B, L, D) -> (B, L, D)``; ``mask``/``bias`` go to the self-attention."""
        sa = self.self_attn
        x = self._residual(
            x, 1, lambda h: _attend(sa, h, mask=mask, bias=bias, positions=positions)
        )
        return self._residual(x, 2, self.ff)

    @classmethod
    def from_torch(cls: type[_L], layer: nn.Module) -> _L:
        """Copy a ``torch.nn.TransformerEncoderLayer`` (weights, norm placement, eps)."""
        return _copy_torch_layer(cls, layer)


class DecoderLayer(EncoderLayer):
    """Masked self-attention, context (cross) attention over the encoder output, and
    feed-forward: a transformer decoder layer.

    Self-attention is causal (``causal=True``) and any ``mask`` passed to :meth:`forward`
    is combined with it. ``cross_attention=False`` gives a decoder-only (GPT-style) layer.
    The other arguments are those of :class:`EncoderLayer`.

    Example:
        >>> import torch
        >>> layer = DecoderLayer(32, 4, 64, dropout=0.0)
        >>> tgt, memory = torch.randn(2, 5, 32), torch.randn(2, 9, 32)
        >>> tuple(layer(tgt, memory).shape)
        (2, 5, 32)
    """

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        dim_feedforward: int = 2048,
        *,
        cross_attention: bool = True,
        causal: bool = True,
        num_kv_heads: int | None = None,
        dropout: float = 0.1,
        activation: str = "relu",
        norm_first: bool = False,
        norm: str = "layer",
        norm_eps: float = 1e-5,
        bias: bool = True,
        qk_norm: bool = False,
        rope: RotaryEmbedding | None = None,
        normalize: str = "softmax",
        engine: str = "auto",
    ) -> None:
        super().__init__(
            d_model,
            num_heads,
            dim_feedforward,
            num_kv_heads=num_kv_heads,
            dropout=dropout,
            activation=activation,
            norm_first=norm_first,
            norm=norm,
            norm_eps=norm_eps,
            bias=bias,
            qk_norm=qk_norm,
            rope=rope,
            normalize=normalize,
            engine=engine,
        )
        self.causal = causal
        self.cross_attn: MultiHeadAttention | None = None
        if cross_attention:  # sub-layers: 1 self-attention, 2 cross-attention, 3 feed-forward
            self.cross_attn = MultiHeadAttention(
                d_model,
                num_heads,
                num_kv_heads=num_kv_heads,
                bias=bias,
                dropout=dropout,
                qk_norm=qk_norm,
                normalize=normalize,
                engine=engine,
            )
            self._add_norm(3, norm, d_model, norm_eps, bias, dropout)

    def forward(
        self,
        x: Tensor,
        memory: Tensor | None = None,
        *,
        mask: MaskLike = None,
        memory_mask: MaskLike = None,
        bias: Bias | Tensor | None = None,
        cache: KVCache | None = None,
        cross_cache: KVCache | None = None,
        positions: Tensor | None = None,
    ) -> Tensor:
        """``x (B, Lt, D)``, ``memory (B, Ls, D)`` -> ``(B, Lt, D)``.

        ``cache`` / ``cross_cache`` are this layer's :class:`KVCache` s for step-by-step
        decoding; ``memory`` may be None once ``cross_cache`` is filled.
        """
        sa, ca = self.self_attn, self.cross_attn
        m = _with_causal(mask) if self.causal else mask
        x = self._residual(
            x, 1, lambda h: _attend(sa, h, mask=m, bias=bias, cache=cache, positions=positions)
        )
        if ca is not None:
            mem = _memory(ca, memory, cross_cache)
            x = self._residual(
                x, 2, lambda h: _attend(ca, h, mem, mask=memory_mask, cache=cross_cache)
            )
        return self._residual(x, 3 if ca is not None else 2, self.ff)

    @classmethod
    def from_torch(cls: type[_L], layer: nn.Module) -> _L:
        """Copy a ``torch.nn.TransformerDecoderLayer`` (its self-attention is made causal
        here; torch's takes the causal mask as an argument)."""
        return _copy_torch_layer(cls, layer)


def _attend(attn: MultiHeadAttention, x: Tensor, *args: Tensor | None, **kw: object) -> Tensor:
    """Call ``attn`` for its output only (it returns a Tensor without ``need_weights``)."""
    out = attn(x, *args, **kw)
    assert isinstance(out, Tensor)
    return out


def _memory(attn: MultiHeadAttention, memory: Tensor | None, cache: KVCache | None) -> Tensor:
    """The cross-attention key input; a placeholder once the cache holds its keys."""
    if memory is not None:
        return memory
    if cache is None or not cache.length:
        raise ValueError("memory (B, Ls, D) is required unless cross_cache is already filled")
    assert cache.keys is not None
    return cache.keys.new_empty(cache.batch_size, 0, attn.kdim)


def _with_causal(mask: MaskLike) -> Mask:
    causal = M.causal()
    return causal if mask is None else causal & mask


def _torch_activation(act: object) -> str:
    if act is F.relu or isinstance(act, nn.ReLU):
        return "relu"
    if act is F.gelu or (isinstance(act, nn.GELU) and act.approximate == "none"):
        return "gelu"
    if isinstance(act, nn.GELU):
        return "gelu_tanh"
    raise ValueError(f"the torch layer's activation {act!r} has no attnlab equivalent")


def _copy_torch_layer(cls: type[_L], layer: Any) -> _L:
    """Build ``cls`` with ``layer``'s sizes and options and load its weights."""
    sa, w = layer.self_attn, layer.linear1.weight
    ours = cls(
        sa.embed_dim,
        sa.num_heads,
        layer.linear1.out_features,
        dropout=layer.dropout.p,
        activation=_torch_activation(layer.activation),
        norm_first=layer.norm_first,
        norm_eps=layer.norm1.eps,
        bias=sa.in_proj_bias is not None,
    )
    ours.load_state_dict({_rename(k): v for k, v in layer.state_dict().items()})
    return ours.to(w.device, w.dtype)


def _rename(key: str) -> str:
    """A torch transformer state-dict key as attnlab names it."""
    parts = key.split(".")
    renamed = {"linear1": "ff.linear1", "linear2": "ff.linear2", "multihead_attn": "cross_attn"}
    return ".".join(renamed.get(p, p) for p in parts)


def _clones(layer: nn.Module, n: int) -> nn.ModuleList:
    if not isinstance(n, int) or n <= 0:
        raise ValueError(f"num_layers must be a positive int, got {n!r}")
    return nn.ModuleList(copy.deepcopy(layer) for _ in range(n))


class Encoder(nn.Module):
    """A stack of ``num_layers`` copies of an :class:`EncoderLayer`, then ``norm``.

    Args:
        layer: the layer to copy (its weights are copied too; re-initialize if needed).
        num_layers: stack depth.
        norm: optional final norm (pre-norm stacks need one).

    Example:
        >>> import torch
        >>> enc = Encoder(EncoderLayer(32, 4, 64, dropout=0.0), 2)
        >>> tuple(enc(torch.randn(2, 7, 32)).shape)
        (2, 7, 32)
    """

    def __init__(self, layer: EncoderLayer, num_layers: int, norm: nn.Module | None = None):
        super().__init__()
        self.layers = _clones(layer, num_layers)
        self.norm = norm

    def forward(
        self,
        x: Tensor,
        *,
        mask: MaskLike = None,
        bias: Bias | Tensor | None = None,
        positions: Tensor | None = None,
    ) -> Tensor:
        """``x (B, L, D) -> (B, L, D)``; ``mask`` and ``bias`` apply in every layer."""
        for layer in self.layers:
            x = layer(x, mask=mask, bias=bias, positions=positions)
        return x if self.norm is None else self.norm(x)


class Decoder(nn.Module):
    """A stack of :class:`DecoderLayer` copies, then ``norm``; with or without
    cross-attention, and with a :class:`DecoderCache` for step-by-step decoding.

    Example:
        >>> import torch
        >>> dec = Decoder(DecoderLayer(32, 4, 64, dropout=0.0), 2).eval()
        >>> memory, tgt = torch.randn(1, 6, 32), torch.randn(1, 4, 32)
        >>> full = dec(tgt, memory)
        >>> cache = dec.new_cache()
        >>> steps = [dec(tgt[:, i : i + 1], memory, cache=cache) for i in range(4)]
        >>> torch.allclose(torch.cat(steps, 1), full, atol=1e-5)
        True
    """

    def __init__(self, layer: DecoderLayer, num_layers: int, norm: nn.Module | None = None):
        super().__init__()
        self.layers = _clones(layer, num_layers)
        self.norm = norm
        self.cross = layer.cross_attn is not None

    def new_cache(self) -> DecoderCache:
        """An empty cache for this stack."""
        return DecoderCache(len(self.layers), cross=self.cross)

    def forward(
        self,
        x: Tensor,
        memory: Tensor | None = None,
        *,
        mask: MaskLike = None,
        memory_mask: MaskLike = None,
        bias: Bias | Tensor | None = None,
        cache: DecoderCache | None = None,
        positions: Tensor | None = None,
    ) -> Tensor:
        """``x (B, Lt, D)`` (only the new steps when ``cache`` is given), ``memory
        (B, Ls, D)`` -> ``(B, Lt, D)``. ``mask`` is combined with the causal mask."""
        for i, layer in enumerate(self.layers):
            x = layer(
                x,
                memory,
                mask=mask,
                memory_mask=memory_mask,
                bias=bias,
                cache=None if cache is None else cache.self_attn[i],
                cross_cache=None
                if cache is None or cache.cross_attn is None
                else cache.cross_attn[i],
                positions=positions,
            )
        return x if self.norm is None else self.norm(x)


class DecoderOnly(Decoder):
    """A decoder-only (GPT-style) stack: pre-norm causal layers without cross-attention
    and a final norm. Defaults follow modern practice (GELU, no dropout).

    Example:
        >>> import torch
        >>> from attnlab.positional import RotaryEmbedding
        >>> lm = DecoderOnly(32, 4, 2, num_kv_heads=2, rope=RotaryEmbedding(8)).eval()
        >>> x = torch.randn(1, 5, 32)
        >>> cache = lm.new_cache()
        >>> a = lm(x[:, :3], cache=cache)
        >>> b = lm(x[:, 3:], cache=cache)
        >>> torch.allclose(torch.cat([a, b], 1), lm(x), atol=1e-5)
        True
    """

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        num_layers: int,
        dim_feedforward: int | None = None,
        *,
        num_kv_heads: int | None = None,
        dropout: float = 0.0,
        activation: str = "gelu",
        norm: str = "layer",
        norm_eps: float = 1e-5,
        bias: bool = True,
        qk_norm: bool = False,
        rope: RotaryEmbedding | None = None,
        normalize: str = "softmax",
        engine: str = "auto",
    ) -> None:
        layer = DecoderLayer(
            d_model,
            num_heads,
            dim_feedforward or 4 * d_model,
            cross_attention=False,
            num_kv_heads=num_kv_heads,
            dropout=dropout,
            activation=activation,
            norm_first=True,
            norm=norm,
            norm_eps=norm_eps,
            bias=bias,
            qk_norm=qk_norm,
            rope=rope,
            normalize=normalize,
            engine=engine,
        )
        super().__init__(layer, num_layers, _norm(norm, d_model, norm_eps, bias))


class Transformer(nn.Module):
    """The encoder-decoder transformer of Vaswani et al. (2017), batch-first, without
    embeddings (add them in the model): ``forward(src, tgt) -> (B, Lt, D)``.

    Pre-norm stacks (``norm_first=True``) end with a final norm each. Masks are explicit:
    ``src_mask`` for the encoder's self-attention, ``memory_mask`` for the decoder's
    context attention (usually the same source padding mask), ``tgt_mask`` combined with
    the decoder's causal mask.

    Example:
        >>> import torch
        >>> from attnlab import masks
        >>> model = Transformer(32, 4, 2, 2, 64, dropout=0.0)
        >>> src, tgt = torch.randn(2, 9, 32), torch.randn(2, 5, 32)
        >>> pad = masks.padding(torch.tensor([9, 6]))
        >>> tuple(model(src, tgt, src_mask=pad, memory_mask=pad).shape)
        (2, 5, 32)
    """

    def __init__(
        self,
        d_model: int = 512,
        num_heads: int = 8,
        num_encoder_layers: int = 6,
        num_decoder_layers: int = 6,
        dim_feedforward: int = 2048,
        *,
        num_kv_heads: int | None = None,
        dropout: float = 0.1,
        activation: str = "relu",
        norm_first: bool = False,
        norm: str = "layer",
        norm_eps: float = 1e-5,
        bias: bool = True,
        normalize: str = "softmax",
        engine: str = "auto",
    ) -> None:
        super().__init__()
        kw = {
            "num_kv_heads": num_kv_heads,
            "dropout": dropout,
            "activation": activation,
            "norm_first": norm_first,
            "norm": norm,
            "norm_eps": norm_eps,
            "bias": bias,
            "normalize": normalize,
            "engine": engine,
        }
        final = (lambda: _norm(norm, d_model, norm_eps, bias)) if norm_first else (lambda: None)
        enc = EncoderLayer(d_model, num_heads, dim_feedforward, **kw)  # type: ignore[arg-type]
        dec = DecoderLayer(d_model, num_heads, dim_feedforward, **kw)  # type: ignore[arg-type]
        self.encoder = Encoder(enc, num_encoder_layers, final())
        self.decoder = Decoder(dec, num_decoder_layers, final())

    def forward(
        self,
        src: Tensor,
        tgt: Tensor,
        *,
        src_mask: MaskLike = None,
        tgt_mask: MaskLike = None,
        memory_mask: MaskLike = None,
    ) -> Tensor:
        """``src (B, Ls, D)``, ``tgt (B, Lt, D)`` -> ``(B, Lt, D)``."""
        memory = self.encode(src, mask=src_mask)
        return self.decode(tgt, memory, mask=tgt_mask, memory_mask=memory_mask)

    def encode(self, src: Tensor, *, mask: MaskLike = None) -> Tensor:
        """The encoder output (``memory``) ``(B, Ls, D)``."""
        return self.encoder(src, mask=mask)

    def decode(
        self,
        tgt: Tensor,
        memory: Tensor | None,
        *,
        mask: MaskLike = None,
        memory_mask: MaskLike = None,
        cache: DecoderCache | None = None,
    ) -> Tensor:
        """Decoder output ``(B, Lt, D)``; with ``cache`` (:meth:`new_cache`), one step at a time."""
        return self.decoder(tgt, memory, mask=mask, memory_mask=memory_mask, cache=cache)

    def new_cache(self) -> DecoderCache:
        """An empty decoding cache (self- and cross-attention per decoder layer)."""
        return self.decoder.new_cache()

    @classmethod
    def from_torch(cls, model: nn.Transformer) -> Transformer:
        """Copy a batch-first ``torch.nn.Transformer`` with ``norm_first=True``.

        (torch's post-norm stacks end with an extra final norm that attnlab's post-norm
        stacks leave out, so only pre-norm models map one to one.)
        """
        layer: Any = model.encoder.layers[0]
        if not layer.norm_first:
            raise ValueError("from_torch needs norm_first=True (see the docstring)")
        sa = layer.self_attn
        ours = cls(
            sa.embed_dim,
            sa.num_heads,
            len(model.encoder.layers),
            len(model.decoder.layers),
            layer.linear1.out_features,
            dropout=layer.dropout.p,
            activation=_torch_activation(layer.activation),
            norm_first=True,
            norm_eps=layer.norm1.eps,
            bias=sa.in_proj_bias is not None,
        )
        ours.load_state_dict({_rename(k): v for k, v in model.state_dict().items()})
        return ours.to(layer.linear1.weight.device, layer.linear1.weight.dtype)
