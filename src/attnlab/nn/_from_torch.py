"""Copying ``torch.nn`` transformer layers and models: their options as a
:class:`LayerConfig`, their weights by a key mapping."""

from __future__ import annotations

from typing import Any, TypeVar

import torch.nn.functional as F
from torch import nn

from attnlab.nn.config import LayerConfig

_M = TypeVar("_M", bound=nn.Module)
# torch module names -> attnlab's (the rest are the same)
_RENAMED = {"linear1": "ff.linear1", "linear2": "ff.linear2", "multihead_attn": "cross_attn"}


def torch_config(layer: Any, kind: type[nn.Module]) -> LayerConfig:
    """The :class:`LayerConfig` of ``layer``, a ``torch.nn.TransformerEncoderLayer`` or
    ``TransformerDecoderLayer`` (``kind``): sizes, dropout, activation, norm placement and
    eps; another module is a TypeError naming it (it was an AttributeError)."""
    if not isinstance(layer, kind):
        raise TypeError(f"layer must be a torch.nn.{kind.__name__}, got {type(layer).__name__}")
    t: Any = layer  # (torch types its submodules as Tensor | Module)
    sa = t.self_attn
    return LayerConfig(
        sa.embed_dim,
        sa.num_heads,
        t.linear1.out_features,
        dropout=t.dropout.p,
        activation=_activation(t.activation),
        norm_first=t.norm_first,
        norm_eps=t.norm1.eps,
        bias=sa.in_proj_bias is not None,
    )


def load_torch(ours: _M, theirs: nn.Module, layer: Any) -> _M:
    """Load ``theirs``' weights into ``ours`` on the device and in the dtype of ``layer``
    (a torch layer of ``theirs``), in its train or eval mode.

    ``ours`` moves first: loaded into float32, float64 weights were rounded (copies of a
    float64 layer were off by 4e-8)."""
    w = layer.linear1.weight
    ours.to(w.device, w.dtype).train(theirs.training)
    ours.load_state_dict({_rename(k): v for k, v in theirs.state_dict().items()})
    return ours


def _rename(key: str) -> str:
    """A torch transformer state-dict key as attnlab names it."""
    return ".".join(_RENAMED.get(p, p) for p in key.split("."))


def _activation(act: object) -> str:
    if act is F.relu or isinstance(act, nn.ReLU):
        return "relu"
    if act is F.gelu or (isinstance(act, nn.GELU) and act.approximate == "none"):
        return "gelu"
    if isinstance(act, nn.GELU):
        return "gelu_tanh"
    raise ValueError(f"the torch layer's activation {act!r} has no attnlab equivalent")
