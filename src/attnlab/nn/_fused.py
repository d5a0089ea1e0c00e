"""Linear layers at inference through oneDNN's fused CPU kernel: matmul, bias and
activation in one pass.

On CPU, in float32, when no gradient is needed, ``linear(x, w, b, "gelu")`` runs
``torch.ops.mkldnn._linear_pointwise`` (the kernel torch's own compiler emits for this
pattern); everywhere else it is ``F.linear`` and the activation. Both compute the same
function; the fused kernel saves the bias copy and the activation's extra pass over the
output, and its matmul is faster than MKL's on small inner dimensions. Weights are packed
into oneDNN's blocked layout once (and again only when they change). On CPUs without
AVX-512 the activation runs as torch's own pass after the product
(:func:`attnlab._cpu.fuse_activation` says why).

Example:
    >>> import torch
    >>> x, w, b = torch.randn(5, 16), torch.randn(8, 16), torch.randn(8)
    >>> with torch.no_grad():
    ...     y = linear(x, w, b, "gelu")
    >>> torch.allclose(y, torch.nn.functional.gelu(x @ w.T + b), atol=1e-5)
    True
"""

from __future__ import annotations

import functools
import weakref
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnlab._cpu import fuse_activation

__all__ = ["linear", "module_linear"]

_POINTWISE: Any = getattr(torch.ops.mkldnn, "_linear_pointwise", None)
_REORDER: Any = getattr(torch.ops.mkldnn, "_reorder_linear_weight", None)
# attnlab activation -> (oneDNN post-op, its algorithm)
_POST_OPS = {None: ("none", ""), "relu": ("relu", ""), "gelu": ("gelu", "none")}
_POST_OPS["gelu_tanh"] = ("gelu", "tanh")


def _fusable(x: Tensor, weight: Tensor, bias: Tensor | None) -> bool:
    """CPU float32 without autograd or autocast, and the op is available."""
    return (
        _POINTWISE is not None
        and x.device.type == "cpu"
        and x.dtype == weight.dtype == torch.float32
        and x.dim() >= 2
        and not torch.is_autocast_enabled("cpu")
        and not (
            torch.is_grad_enabled()
            and any(t is not None and t.requires_grad for t in (x, weight, bias))
        )
        and torch.backends.mkldnn.is_available()
    )


def linear(x: Tensor, weight: Tensor, bias: Tensor | None, activation: str | None = None) -> Tensor:
    """``activation(x @ weight.T + bias)`` for ``x (..., K)``, ``weight (N, K)`` -> ``(..., N)``.

    ``activation`` is None, ``"relu"``, ``"gelu"`` or ``"gelu_tanh"``.
    """
    if _fusable(x, weight, bias):
        fold = activation in (None, "relu") or fuse_activation()[0]  # GELU: per ISA
        op, algorithm = _POST_OPS[activation if fold else None]
        flat = x.reshape(-1, x.shape[-1])  # (M, K)
        out = _POINTWISE(flat, _packed(weight, flat.shape[0]), bias, op, [], algorithm)  # (M, N)
        out = out.view(*x.shape[:-1], weight.shape[0])
        return out if fold else _activate(out, activation)
    return _activate(F.linear(x, weight, bias), activation)


# id(weight) -> (a weak reference to it, its version when packed, oneDNN's blocked copy);
# an entry goes when its weight is freed
_PACKED: dict[int, tuple[weakref.ref[Tensor], int, Tensor]] = {}


def _packed(weight: Tensor, rows: int) -> Tensor:
    """``weight (N, K)`` in oneDNN's own blocked layout, packed once and reused while the
    weight is unchanged (its version counter): each call then skips the reorder oneDNN
    would otherwise make of a plain weight (7-10% of a MiniLM-sized linear). The result is
    the same; a weight that cannot be packed is used as it is."""
    if _REORDER is None or weight.dim() != 2 or not weight.is_contiguous():
        return weight
    key = id(weight)
    cached = _PACKED.get(key)
    if cached is not None and cached[0]() is weight and cached[1] == weight._version:
        return cached[2]
    try:
        packed = _REORDER(weight.detach(), rows)
    except RuntimeError:
        return weight
    ref = weakref.ref(weight, functools.partial(_forget, key))
    _PACKED[key] = (ref, weight._version, packed)
    return packed


def _forget(key: int, _ref: object) -> None:
    """Drop the packed copy of a weight that was freed."""
    _PACKED.pop(key, None)


def _activate(y: Tensor, activation: str | None) -> Tensor:
    if activation == "relu":
        return F.relu(y)
    if activation is not None:
        return F.gelu(y, approximate="tanh" if activation == "gelu_tanh" else "none")
    return y


def module_linear(module: nn.Module, x: Tensor, activation: str | None = None) -> Tensor:
    """``activation(module(x))`` for an ``nn.Linear``, fused when :func:`linear` can be.

    A module that is not a plain ``nn.Linear`` (quantized, swapped) or that carries hooks
    is called as a module, so those keep working.
    """
    hooked = module._forward_hooks or module._forward_pre_hooks
    if type(module) is nn.Linear and not hooked:
        return linear(x, module.weight, module.bias, activation)
    return _activate(module(x), activation)
