"""Transformer stacks: encoder, decoder, decoder-only, and the encoder-decoder transformer.

A stack is ``num_layers`` copies of one layer (:class:`~attnlab.nn.EncoderLayer`,
:class:`~attnlab.nn.DecoderLayer`), then an optional final norm, which pre-norm stacks need.
:class:`DecoderOnly` and :class:`Transformer` build their layers from one
:class:`~attnlab.nn.LayerConfig`; inputs are batch-first ``(B, L, D)``.
"""

from __future__ import annotations

import copy
from typing import Any

from torch import Tensor, nn

from attnlab._validate import instance_of, positive_int
from attnlab.bias import Bias
from attnlab.nn._from_torch import load_torch, torch_config
from attnlab.nn.cache import DecoderCache
from attnlab.nn.config import LayerConfig
from attnlab.nn.layers import DecoderLayer, EncoderLayer, MaskLike, _with_causal

__all__ = ["Decoder", "DecoderOnly", "Encoder", "Transformer"]


def _stack(layer: object, kind: type[EncoderLayer], n: int, norm: object) -> nn.ModuleList:
    """``n`` copies of ``layer`` (a ``kind``), after checking the final ``norm``. A
    DecoderLayer is an EncoderLayer to Python, not to an Encoder: its forward asked for
    the memory an encoder does not have."""
    checked = instance_of("layer", layer, kind, f"an attnlab.nn.{kind.__name__}")
    if kind is EncoderLayer and isinstance(layer, DecoderLayer):
        raise TypeError("layer must be an attnlab.nn.EncoderLayer, got DecoderLayer")
    if norm is not None and not isinstance(norm, nn.Module):  # (failed at the first forward)
        raise TypeError(f"norm must be an nn.Module or None, got {type(norm).__name__}")
    return _clones(checked, n)


def _clones(layer: nn.Module, n: int) -> nn.ModuleList:
    """``n`` deep copies of ``layer`` (numpy ints taken, as everywhere)."""
    return nn.ModuleList(copy.deepcopy(layer) for _ in range(positive_int("num_layers", n)))


class Encoder(nn.Module):
    """A stack of ``num_layers`` copies of an :class:`~attnlab.nn.EncoderLayer`, then ``norm``.

    Args:
        layer: the layer to copy (its weights are copied too; re-initialize if needed).
        num_layers: stack depth.
        norm: optional final norm (pre-norm stacks need one).

    Example:
        >>> import torch
        >>> from attnlab.nn import LayerConfig
        >>> enc = Encoder(EncoderLayer(LayerConfig(32, 4, 64, dropout=0.0)), 2)
        >>> tuple(enc(torch.randn(2, 7, 32)).shape)
        (2, 7, 32)
    """

    def __init__(self, layer: EncoderLayer, num_layers: int, norm: nn.Module | None = None):
        super().__init__()
        self.layers = _stack(layer, EncoderLayer, num_layers, norm)
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
    """A stack of :class:`~attnlab.nn.DecoderLayer` copies, then ``norm``; with or without
    cross-attention, and with a :class:`DecoderCache` for step-by-step decoding.

    Example:
        >>> import torch
        >>> from attnlab.nn import LayerConfig
        >>> dec = Decoder(DecoderLayer(LayerConfig(32, 4, 64, dropout=0.0)), 2).eval()
        >>> memory, tgt = torch.randn(1, 6, 32), torch.randn(1, 4, 32)
        >>> full = dec(tgt, memory)
        >>> cache = dec.new_cache()
        >>> steps = [dec(tgt[:, i : i + 1], memory, cache=cache) for i in range(4)]
        >>> torch.allclose(torch.cat(steps, 1), full, atol=1e-5)
        True
    """

    def __init__(self, layer: DecoderLayer, num_layers: int, norm: nn.Module | None = None):
        super().__init__()
        self.layers = _stack(layer, DecoderLayer, num_layers, norm)
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
        if cache is not None and not isinstance(cache, DecoderCache):  # (AttributeError)
            raise TypeError(f"cache must be an attnlab.nn.DecoderCache, got {type(cache).__name__}")
        if cache is not None and len(cache.self_attn) != len(self.layers):
            raise ValueError(
                f"cache has {len(cache.self_attn)} layers but this decoder has "
                f"{len(self.layers)}: make it with DecoderCache(num_layers={len(self.layers)})"
            )
        # one combined mask for every causal layer, alive through the forward: the engines
        # memoize plans per mask object (a new one per layer: a plan per layer)
        joined = _with_causal(mask) if any(layer.causal for layer in self.layers) else mask
        for i, layer in enumerate(self.layers):
            x = layer(
                x,
                memory,
                mask=joined if layer.causal else mask,
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
    """A decoder-only (GPT-style) stack: ``num_layers`` causal :class:`~attnlab.nn.DecoderLayer` s
    without cross-attention, then a final norm when the layers are pre-norm.

    Modern decoders are pre-norm without dropout: ``LayerConfig(..., norm_first=True,
    activation="gelu", dropout=0.0)``, often with ``rope`` and ``num_kv_heads``.

    Args:
        config: the layers' sizes and options.
        num_layers: stack depth.

    Example:
        >>> import torch
        >>> from attnlab.nn import LayerConfig
        >>> from attnlab.positional import RotaryEmbedding
        >>> config = LayerConfig(32, 4, 128, num_kv_heads=2, dropout=0.0, activation="gelu",
        ...                      norm_first=True, rope=RotaryEmbedding(8))
        >>> lm = DecoderOnly(config, 2).eval()
        >>> x = torch.randn(1, 5, 32)
        >>> cache = lm.new_cache()
        >>> a = lm(x[:, :3], cache=cache)
        >>> b = lm(x[:, 3:], cache=cache)
        >>> torch.allclose(torch.cat([a, b], 1), lm(x), atol=1e-5)
        True
    """

    def __init__(self, config: LayerConfig, num_layers: int) -> None:
        layer = DecoderLayer(config, cross_attention=False)
        super().__init__(layer, num_layers, config.norm_layer() if config.norm_first else None)


class Transformer(nn.Module):
    """The encoder-decoder transformer of Vaswani et al. (2017), batch-first, without
    embeddings (add them in the model): ``forward(src, tgt) -> (B, Lt, D)``.

    Pre-norm stacks (``config.norm_first``) end with a final norm each. Masks are explicit:
    ``src_mask`` for the encoder's self-attention, ``memory_mask`` for the decoder's
    context attention (usually the same source padding mask), ``tgt_mask`` combined with
    the decoder's causal mask.

    Args:
        config: the sizes and options of every encoder and decoder layer.
        num_encoder_layers, num_decoder_layers: the stacks' depths.

    Example:
        >>> import torch
        >>> from attnlab import masks
        >>> from attnlab.nn import LayerConfig
        >>> model = Transformer(LayerConfig(32, 4, 64, dropout=0.0), 2, 2)
        >>> src, tgt = torch.randn(2, 9, 32), torch.randn(2, 5, 32)
        >>> pad = masks.padding(torch.tensor([9, 6]))
        >>> tuple(model(src, tgt, src_mask=pad, memory_mask=pad).shape)
        (2, 5, 32)
    """

    def __init__(
        self, config: LayerConfig, num_encoder_layers: int = 6, num_decoder_layers: int = 6
    ) -> None:
        super().__init__()
        enc, dec = EncoderLayer(config), DecoderLayer(config)
        pre = config.norm_first
        positive_int("num_encoder_layers", num_encoder_layers)  # (else named num_layers)
        positive_int("num_decoder_layers", num_decoder_layers)
        self.encoder = Encoder(enc, num_encoder_layers, config.norm_layer() if pre else None)
        self.decoder = Decoder(dec, num_decoder_layers, config.norm_layer() if pre else None)

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
        layer = self.decoder.layers[0] if len(self.decoder.layers) else None
        if isinstance(layer, EncoderLayer):  # (its layers would say "x")
            layer.check("src", src)
            layer.check("tgt", tgt)
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
        if not isinstance(model, nn.Transformer):
            raise TypeError(f"model must be a torch.nn.Transformer, got {type(model).__name__}")
        layer: Any = model.encoder.layers[0]
        if not layer.norm_first:
            raise ValueError(
                "model: from_torch needs norm_first=True, got a post-norm torch.nn.Transformer "
                "(its stacks end with a final norm that attnlab's post-norm stacks leave out)"
            )
        cfg = torch_config(layer, nn.TransformerEncoderLayer)
        ours = cls(cfg, len(model.encoder.layers), len(model.decoder.layers))
        return load_torch(ours, model, layer)
