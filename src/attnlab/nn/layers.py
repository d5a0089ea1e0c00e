"""Transformer layers: the position-wise feed-forward, encoder and decoder layers.

Layers follow ``torch.nn.TransformerEncoderLayer`` / ``TransformerDecoderLayer``
(post-norm by default, ``norm_first=True`` for pre-norm) with attnlab's attention inside,
so every mask, bias, normalizer, engine, GQA and RoPE option reaches them. Sizes and
options come in one :class:`~attnlab.nn.LayerConfig`; inputs are batch-first ``(B, L, D)``.
:meth:`EncoderLayer.from_torch` and :meth:`DecoderLayer.from_torch` copy torch layers.

Submodule names are part of the API (checkpoint keys, :func:`attnlab.interpret.capture`
patterns) and follow torch's, so loading weights is a key mapping:

* ``self_attn``: a :class:`~attnlab.nn.MultiHeadAttention` (``in_proj_weight`` with the
  query, key and value rows in that order, ``in_proj_bias``, ``out_proj``);
* ``cross_attn``: the decoder's context attention (torch's ``multihead_attn``);
* ``ff.linear1``, ``ff.linear2``: the feed-forward (torch's ``linear1``, ``linear2``);
* ``norm1``, ``norm2`` (, ``norm3``): one norm per sub-layer in order: self-attention,
  (cross-attention,) feed-forward; ``dropout1``... the dropouts after them.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Literal, TypeVar, cast, overload

import torch.nn.functional as F
from torch import Tensor, nn

from attnlab import masks as M
from attnlab._validate import (
    instance_of,
    positive_int,
    same_dtype,
    validate_dropout,
    validate_flag,
)
from attnlab.bias import Bias
from attnlab.masks import Mask
from attnlab.nn._from_torch import load_torch, torch_config
from attnlab.nn._fused import feed_forward, module_linear, plain
from attnlab.nn._inputs import check_input
from attnlab.nn._weights import weight_dtype
from attnlab.nn.attention import MultiHeadAttention
from attnlab.nn.cache import KVCache
from attnlab.nn.config import ACTIVATIONS, LayerConfig, check_choice

__all__ = ["DecoderLayer", "EncoderLayer", "FeedForward", "MaskLike"]

MaskLike = Mask | Tensor | None
_L = TypeVar("_L", bound="EncoderLayer")


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
        check_choice("activation", activation, ACTIVATIONS)
        for name, size in (("d_model", d_model), ("dim_feedforward", dim_feedforward)):
            positive_int(name, size)
        bias = validate_flag("bias", bias)  # ("no" is truthy)
        width = 2 * dim_feedforward if activation == "swiglu" else dim_feedforward
        self.activation = activation
        self.linear1 = nn.Linear(d_model, width, bias=bias)
        self.dropout = nn.Dropout(validate_dropout(dropout, "dropout"))  # (True: p=1.0)
        self.linear2 = nn.Linear(dim_feedforward, d_model, bias=bias)

    def forward(self, x: Tensor, residual: Tensor | None = None) -> Tensor:
        """``x (B, L, D) -> (B, L, D)``; plus ``residual (B, L, D)`` where given (the
        sum a residual layer makes, fused into the last product at CPU inference)."""
        d = self.linear1.in_features  # (torch: "mat1 and mat2 shapes cannot be multiplied")
        if not isinstance(x, Tensor) or x.dim() < 1 or x.shape[-1] != d:
            got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"x must be (B, L, {d}), got {got}")
        same_dtype("x", x, weight_dtype(self.linear1))  # (torch: "mat1 and mat2 must have")
        if residual is not None:
            if not isinstance(residual, Tensor):
                raise TypeError(
                    f"residual must be a Tensor (B, L, D), got {type(residual).__name__}"
                )
            if residual.shape != x.shape:
                raise ValueError(f"residual must be {tuple(x.shape)}, got {tuple(residual.shape)}")
            same_dtype("residual", residual, x.dtype)
        if self.activation == "swiglu":
            gate, value = self.linear1(x).chunk(2, dim=-1)  # (B, L, F) each
            h = F.silu(gate) * value
        elif residual is not None and not (self.dropout.training and self.dropout.p):
            # fused products, a block of rows at a time (attnlab.nn._fused.feed_forward)
            return feed_forward(x, self.linear1, self.linear2, self.activation, residual)
        else:  # one fused matmul + bias + activation at CPU inference
            h = module_linear(self.linear1, x, self.activation)  # (B, L, F)
        return module_linear(self.linear2, self.dropout(h), residual=residual)


def _foldable(sub: nn.Module, kind: type, drop: nn.Module) -> bool:
    """Whether sub-layer ``sub`` may add the residual itself: no dropout after it, and a
    plain ``kind`` without hooks (one that captures its output sees the sub-layer's own
    output, without the residual)."""
    return not (drop.training and float(getattr(drop, "p", 0.0)) > 0.0) and plain(sub, kind)


def _attention(c: LayerConfig, *, rope: bool) -> MultiHeadAttention:
    """The layer's self-attention (with the config's RoPE) or cross-attention (without)."""
    return MultiHeadAttention(
        c.d_model,
        c.num_heads,
        num_kv_heads=c.num_kv_heads,
        bias=c.bias,
        dropout=c.attention_p,
        qk_norm=c.qk_norm,
        rope=c.rope if rope else None,
        normalize=c.normalize,
        engine=c.engine,
    )


class EncoderLayer(nn.Module):
    """Self-attention and feed-forward with residuals: a transformer encoder layer.

    Args:
        config: sizes and options, a :class:`~attnlab.nn.LayerConfig`.

    Example:
        >>> import torch
        >>> from attnlab.nn import LayerConfig
        >>> layer = EncoderLayer(LayerConfig(32, 4, 64, dropout=0.0, norm_first=True))
        >>> out, weights = layer(torch.randn(2, 7, 32), need_weights=True)
        >>> tuple(out.shape), tuple(weights.shape)
        ((2, 7, 32), (2, 4, 7, 7))
    """

    def __init__(self, config: LayerConfig) -> None:
        super().__init__()
        c = self.config = instance_of("config", config, LayerConfig, "an attnlab.nn.LayerConfig")
        self.norm_first = c.norm_first
        self.self_attn = _attention(c, rope=True)
        self.ff = FeedForward(
            c.d_model, c.dim_feedforward, activation=c.activation, dropout=c.dropout, bias=c.bias
        )
        self.norm1, self.dropout1 = c.norm_layer(), nn.Dropout(c.dropout)
        self.norm2, self.dropout2 = c.norm_layer(), nn.Dropout(c.dropout)

    def check(self, name: str, x: object) -> None:
        """``x`` a floating ``(B, L, d_model)`` tensor of this layer's dtype, else an error
        naming ``name`` (a pre-norm layer's norm failed first, in torch's words: "Given
        normalized_shape=[32], expected input with shape [*, 32]", "mixed dtype (CPU)")."""
        check_input(name, x, self.config.d_model)
        same_dtype(name, cast(Tensor, x), weight_dtype(self.norm1))

    def _in(self, x: Tensor, norm: nn.Module) -> Tensor:
        """A sub-layer's input: ``norm(x)`` pre-norm, ``x`` post-norm."""
        return norm(x) if self.norm_first else x

    def _out(self, x: Tensor, h: Tensor, norm: nn.Module, drop: nn.Module) -> Tensor:
        """The residual around sub-layer output ``h``: pre-norm ``x + drop(h)``, post-norm
        ``norm(x + drop(h))``."""
        return x + drop(h) if self.norm_first else norm(x + drop(h))

    @overload
    def forward(
        self,
        x: Tensor,
        *,
        mask: MaskLike = ...,
        bias: Bias | Tensor | None = ...,
        positions: Tensor | None = ...,
        need_weights: Literal[False] = ...,
    ) -> Tensor: ...

    @overload
    def forward(
        self,
        x: Tensor,
        *,
        mask: MaskLike = ...,
        bias: Bias | Tensor | None = ...,
        positions: Tensor | None = ...,
        need_weights: Literal[True],
    ) -> tuple[Tensor, Tensor]: ...

    @overload
    def forward(
        self,
        x: Tensor,
        *,
        mask: MaskLike = ...,
        bias: Bias | Tensor | None = ...,
        positions: Tensor | None = ...,
        need_weights: bool = ...,
    ) -> Tensor | tuple[Tensor, Tensor]: ...

    def forward(
        self,
        x: Tensor,
        *,
        mask: MaskLike = None,
        bias: Bias | Tensor | None = None,
        positions: Tensor | None = None,
        need_weights: bool = False,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """``x (B, L, D) -> (B, L, D)``; ``mask``/``bias`` go to the self-attention.

        With ``need_weights``, a pair with the self-attention weights ``(B, H, L, L)``.
        """
        self.check("x", x)
        fold = _foldable(self.self_attn, MultiHeadAttention, self.dropout1)
        out = self.self_attn(
            self._in(x, self.norm1),
            mask=mask,
            bias=bias,
            positions=positions,
            need_weights=need_weights,
            **({"residual": x} if fold else {}),
        )
        h, weights = out if need_weights else (out, None)
        if fold:  # h is x + attention(...) already (added in the output projection)
            x = h if self.norm_first else self.norm1(h)
        else:
            x = self._out(x, h, self.norm1, self.dropout1)
        if not _foldable(self.ff, FeedForward, self.dropout2):
            x = self._out(x, self.ff(self._in(x, self.norm2)), self.norm2, self.dropout2)
        else:  # x + ff(...) in one pass (the residual fused into ff's last product)
            x = self.ff(self._in(x, self.norm2), residual=x)
            x = x if self.norm_first else self.norm2(x)
        return x if weights is None else (x, weights)

    @classmethod
    def from_torch(cls: type[_L], layer: nn.Module) -> _L:
        """Copy a ``torch.nn.TransformerEncoderLayer`` (weights, norm placement, eps)."""
        return load_torch(cls(torch_config(layer, nn.TransformerEncoderLayer)), layer, layer)


class DecoderLayer(EncoderLayer):
    """Masked self-attention, context (cross) attention over the encoder output, and
    feed-forward: a transformer decoder layer.

    Self-attention is causal (``causal=True``) and any ``mask`` passed to :meth:`forward`
    is combined with it. ``cross_attention=False`` gives a decoder-only (GPT-style) layer.

    Args:
        config: sizes and options, a :class:`~attnlab.nn.LayerConfig` (the cross-attention
            takes them too, without RoPE).
        cross_attention: whether the layer attends over ``memory``.
        causal: whether the self-attention is causal.

    Example:
        >>> import torch
        >>> from attnlab.nn import LayerConfig
        >>> layer = DecoderLayer(LayerConfig(32, 4, 64, dropout=0.0))
        >>> tgt, memory = torch.randn(2, 5, 32), torch.randn(2, 9, 32)
        >>> tuple(layer(tgt, memory).shape)
        (2, 5, 32)
    """

    def __init__(
        self, config: LayerConfig, *, cross_attention: bool = True, causal: bool = True
    ) -> None:
        super().__init__(config)
        self.causal = validate_flag("causal", causal)  # ("no" is truthy)
        cross_attention = validate_flag("cross_attention", cross_attention)
        self.cross_attn: MultiHeadAttention | None = None
        if cross_attention:  # sub-layers: 1 self-attention, 2 cross-attention, 3 feed-forward
            self.cross_attn = _attention(config, rope=False)
            self.norm3, self.dropout3 = config.norm_layer(), nn.Dropout(config.dropout)

    @overload
    def forward(
        self,
        x: Tensor,
        memory: Tensor | None = ...,
        *,
        mask: MaskLike = ...,
        memory_mask: MaskLike = ...,
        bias: Bias | Tensor | None = ...,
        cache: KVCache | None = ...,
        cross_cache: KVCache | None = ...,
        positions: Tensor | None = ...,
        need_weights: Literal[False] = ...,
    ) -> Tensor: ...

    @overload
    def forward(
        self,
        x: Tensor,
        memory: Tensor | None = ...,
        *,
        mask: MaskLike = ...,
        memory_mask: MaskLike = ...,
        bias: Bias | Tensor | None = ...,
        cache: KVCache | None = ...,
        cross_cache: KVCache | None = ...,
        positions: Tensor | None = ...,
        need_weights: Literal[True],
    ) -> tuple[Tensor, Tensor]: ...

    @overload
    def forward(
        self,
        x: Tensor,
        memory: Tensor | None = ...,
        *,
        mask: MaskLike = ...,
        memory_mask: MaskLike = ...,
        bias: Bias | Tensor | None = ...,
        cache: KVCache | None = ...,
        cross_cache: KVCache | None = ...,
        positions: Tensor | None = ...,
        need_weights: bool = ...,
    ) -> Tensor | tuple[Tensor, Tensor]: ...

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
        need_weights: bool = False,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """``x (B, Lt, D)``, ``memory (B, Ls, D)`` -> ``(B, Lt, D)``.

        ``cache`` / ``cross_cache`` are this layer's :class:`KVCache` s for step-by-step
        decoding; ``memory`` may be None once ``cross_cache`` is filled. With
        ``need_weights``, a pair with the self-attention weights ``(B, H, Lt, Lk)``.
        """
        self.check("x", x)
        if memory is not None:
            self.check("memory", memory)
            _check_memory_batch(memory, x, cross_cache)
        out = self.self_attn(
            self._in(x, self.norm1),
            mask=_with_causal(mask) if self.causal else mask,
            bias=bias,
            cache=cache,
            positions=positions,
            need_weights=need_weights,
        )
        h, weights = out if need_weights else (out, None)
        x = self._out(x, h, self.norm1, self.dropout1)
        ca, norm, drop = self.cross_attn, self.norm2, self.dropout2
        if ca is None and not (memory is None and memory_mask is None and cross_cache is None):
            raise ValueError(  # (they were ignored: an all-False memory_mask changed nothing)
                "memory, memory_mask and cross_cache must be None: this decoder layer has no "
                "cross-attention (cross_attention=False)"
            )
        if ca is not None:
            mem = _memory(ca, memory, cross_cache)
            h = ca(self._in(x, norm), mem, mask=memory_mask, cache=cross_cache)
            x = self._out(x, h, norm, drop)
            norm, drop = self.norm3, self.dropout3
        x = self._out(x, self.ff(self._in(x, norm)), norm, drop)
        return x if weights is None else (x, weights)

    @classmethod
    def from_torch(cls: type[_L], layer: nn.Module) -> _L:
        """Copy a ``torch.nn.TransformerDecoderLayer`` (its self-attention is made causal
        here; torch's takes the causal mask as an argument)."""
        return load_torch(cls(torch_config(layer, nn.TransformerDecoderLayer)), layer, layer)


def _check_memory_batch(memory: Tensor, x: Tensor, cache: KVCache | None) -> None:
    """``memory`` of ``x``'s batch or 1 (unless the cross cache holds its keys): it was
    named as the cross-attention's ``key`` and ``query``."""
    if memory.shape[0] not in (1, x.shape[0]) and (cache is None or not cache.length):
        raise ValueError(
            f"memory must have x's batch size {x.shape[0]} (or 1), got memory "
            f"{tuple(memory.shape)} for x {tuple(x.shape)}"
        )


def _memory(attn: MultiHeadAttention, memory: Tensor | None, cache: KVCache | None) -> Tensor:
    """The cross-attention key input; a placeholder once the cache holds its keys."""
    if memory is not None:
        return memory
    if cache is None or not cache.length:
        raise ValueError("memory (B, Ls, D) is required unless cross_cache is already filled")
    assert cache.keys is not None
    return cache.keys.new_empty(cache.batch_size, 0, attn.kdim)


_CAUSAL = M.causal()  # (holds nothing: shared by every layer and thread)
# id(mask) -> (mask, causal() & mask), both weakly: while someone holds the combined mask
_JOINED: dict[int, tuple[weakref.ref, weakref.ref]] = {}


def _with_causal(mask: MaskLike) -> Mask:
    """``causal() & mask``: the same object for the same ``mask`` while one is alive (a
    stack holds it through its forward). The blocked and flex engines memoize plans per
    mask object; a new one per layer made them plan again in every layer (8 block masks
    in 2 forwards of a 4-layer DecoderOnly). Nothing here keeps a mask alive; a mask
    this made comes back as it is.

    Example:
        >>> from attnlab import masks
        >>> w = masks.window(4)
        >>> joined = _with_causal(w)
        >>> _with_causal(w) is joined, _with_causal(joined) is joined, joined.spec()
        (True, True, '(causal() & window(left=4, right=0))')
    """
    if mask is None or mask is _CAUSAL:
        return _CAUSAL
    if isinstance(mask, M.And) and mask.parts[0] is _CAUSAL:  # made here: causal already
        return mask
    key = id(mask)
    held = _JOINED.get(key)  # read once: another thread may replace it meanwhile
    joined = held[1]() if held is not None and held[0]() is mask else None
    if joined is None:
        joined = _CAUSAL & mask
        _JOINED[key] = (weakref.ref(mask), weakref.ref(joined, _forget(key)))
    return joined


def _forget(key: int) -> Callable[[weakref.ref], None]:
    """A callback that drops ``key``'s entry once its combined mask is gone."""

    def drop(ref: weakref.ref) -> None:
        held = _JOINED.get(key)
        if held is not None and held[1] is ref:  # (not a newer entry for a new mask)
            _JOINED.pop(key, None)

    return drop
