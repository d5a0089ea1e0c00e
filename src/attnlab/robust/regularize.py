"""Attention regularizers as loss terms, and as :class:`attnlab.train.Trainer` plug-ins.

* entropy (Attanasio et al., 2022): the mean entropy of each layer's and head's attention
  rows, pushed up (no target) or toward a target entropy;
* supervised attention (Garg et al., 2019): cross-entropy of the attention rows against
  given alignments (a distribution or a one-hot row per query);
* head dropout: whole heads of every :class:`~attnlab.nn.MultiHeadAttention` zeroed at
  random during training (Zhou et al., 2020), the survivors scaled by ``1 / (1 - p)``.

The plug-ins read the weights with :class:`attnlab.interpret.capture` ``(grad=True)``, so
they work on any model whose attention goes through :mod:`attnlab.functional`. Listed
after (around) an adversarial plug-in they read the one pass it trains on, not its attack
steps (:mod:`attnlab.robust.passes`); listed before it, every pass it makes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from attnlab._validate import instance_of
from attnlab.nn import MultiHeadAttention
from attnlab.robust.passes import visible_calls
from attnlab.robust.perturb import check_positive
from attnlab.train import LossFn

__all__ = [
    "EntropyRegularizer",
    "HeadDropout",
    "SupervisedAttention",
    "attention_entropy",
    "entropy_term",
    "head_entropies",
    "supervised_attention_term",
]


def attention_entropy(weights: Tensor) -> Tensor:
    """Entropy (nats) of each attention row: ``(..., Lk) -> (...)``, with ``0 log 0 = 0``;
    computed in float32 at least (float16's floor 6.1e-5 misscored smaller weights),
    returned in the weights' dtype.

    Example:
        >>> attention_entropy(torch.tensor([[0.5, 0.5, 0.0], [1.0, 0.0, 0.0]]))
        tensor([0.6931, 0.0000])
    """
    w = weights.to(torch.promote_types(weights.dtype, torch.float32))
    safe = w.clamp_min(torch.finfo(w.dtype).tiny)  # masked 0s: gradient 0, not NaN
    return (-(w * safe.log()).sum(-1) + 0.0).to(weights.dtype)  # + 0.0: no "-0."


def head_entropies(weights: Tensor) -> Tensor:
    """Mean row entropy of each head: ``(B, H, Lq, Lk) -> (H,)``; fully masked rows (all
    weights 0) are left out of the mean.

    Example:
        >>> bool(head_entropies(torch.full((2, 3, 4, 5), 0.2)).sub(1.6094).abs().max() < 1e-4)
        True
    """
    instance_of("weights", weights, Tensor, "a (B, H, Lq, Lk) Tensor")
    if weights.dim() != 4:
        raise ValueError(f"weights must be (B, H, Lq, Lk), got shape {tuple(weights.shape)}")
    real = (weights.sum(-1) > 0).to(weights.dtype)  # (B, H, Lq)
    ent = attention_entropy(weights) * real  # (B, H, Lq)
    return ent.sum((0, 2)) / real.sum((0, 2)).clamp_min(1.0)


def entropy_term(weights: Sequence[Tensor], target: float | Tensor | None = None) -> Tensor:
    """The entropy regularizer over several attention calls.

    Args:
        weights: one ``(B, H, Lq, Lk)`` tensor per layer (or per call).
        target: None: ``-mean(Hbar)`` (minimizing it spreads attention, as in EAR); a
            number >= 0 (a float or a 0-dim tensor) or a ``(H,)`` tensor, one per head of
            every layer (all must have ``H`` heads): ``mean((Hbar - target)^2)``. ``Hbar`` is each
            layer's and head's mean row entropy (:func:`head_entropies`).

    Example:
        >>> w = [torch.full((1, 2, 3, 4), 0.25)]                 # entropy log 4 = 1.386
        >>> round(float(entropy_term(w)), 3), round(float(entropy_term(w, 1.386)), 6)
        (-1.386, 0.0)
    """
    if not weights:
        raise ValueError("weights is empty: no attention call was captured")
    target = _entropy_target(target)
    ents = [head_entropies(w) for w in weights]  # (H,) each
    ent = torch.cat(ents)  # (sum of the layers' H,)
    if target is None:
        return -ent.mean()
    if isinstance(target, Tensor) and target.dim() == 1:  # (H,) per head; 0-dim: a number
        target = _per_head(target, [e.shape[0] for e in ents]).repeat(len(weights))
    return ((ent - target) ** 2).mean()


def _entropy_target(target: object) -> float | Tensor | None:
    """``target`` of :func:`entropy_term`: None, a finite number >= 0 (an entropy), or a
    0-dim or ``(H,)`` tensor of them; a TypeError/ValueError naming it otherwise (a NaN
    target made the term NaN)."""
    if target is None or not isinstance(target, Tensor):
        return None if target is None else check_positive("target", target, zero=True)
    if target.dim() > 1 or not (torch.isfinite(target) & (target >= 0)).all():
        raise ValueError(
            f"target must be a finite number or (H,) tensor, each >= 0 (an entropy), got {target}"
        )
    return target


def _per_head(target: Tensor, heads: list[int]) -> Tensor:
    """``target`` ``(H,)`` if every layer has ``H`` heads, else a ValueError naming it."""
    if set(heads) != {target.shape[0]}:
        raise ValueError(
            f"target has {target.shape[0]} values (one per head) but the layers have heads "
            f"{sorted(set(heads))}; pass one number (a float or a 0-dim tensor) for every "
            f"head, or an (H,) tensor when every layer has H heads"
        )
    return target


def supervised_attention_term(weights: Tensor, target: Tensor, eps: float = 1e-9) -> Tensor:
    """Cross-entropy ``-sum_k t_k log(w_k + eps)`` of attention rows against target rows,
    averaged over the rows whose target is not all 0; computed in float32 at least (in
    float16 ``eps`` was 0 and a masked key's ``0 * log 0`` NaN), returned in the weights'
    dtype.

    Args:
        weights: ``(..., Lk)`` attention rows.
        target: the same shape (or broadcastable): distributions or one-hot rows.
        eps: added to the weights; raised to the smallest normal of the weights' dtype
            (``6.1e-5`` in float16), so that the gradient ``-t / (w + eps)`` stays finite
            once cast back to that dtype (``-1e9`` became ``-inf`` in float16, then NaN).

    Example:
        >>> w, t = torch.tensor([[0.5, 0.25, 0.25]]), torch.tensor([[1.0, 0.0, 0.0]])
        >>> round(float(supervised_attention_term(w, t)), 4)
        0.6931
    """
    wide = torch.promote_types(weights.dtype, torch.float32)  # float16 rounds 1e-9 to 0
    eps = max(eps, torch.finfo(weights.dtype).tiny)  # 1 / eps finite in weights' dtype
    w = weights.to(wide)
    t = _broadcast_target(target, w)
    rows = (t.sum(-1) > 0).to(wide)
    ce = -(t * torch.log(w + eps)).sum(-1)
    return ((ce * rows).sum() / rows.sum().clamp_min(1.0)).to(weights.dtype)


def _broadcast_target(target: object, w: Tensor) -> Tensor:
    """``target`` in ``w``'s dtype and shape, or an error naming it (``expand_as`` raised a
    bare RuntimeError, a list AttributeError)."""
    t = instance_of("target", target, Tensor, "a Tensor").to(w.dtype)
    try:
        return t.expand_as(w)
    except RuntimeError:
        shape = tuple(w.shape)
        msg = f"target must broadcast to weights' shape {shape}, got {tuple(t.shape)}"
        raise ValueError(msg) from None


class EntropyRegularizer:
    """Plug-in: ``loss + weight * entropy_term(captured weights, target)``.

    Args:
        weight: the term's weight (> 0).
        target: see :func:`entropy_term`.
        layers: a sequence of module names or patterns whose attention counts (default
            all); a bare str is refused (write ``["layers.0.self_attn"]``).

    Example:
        >>> EntropyRegularizer(0.1, layers=["han.word_attention"]).layers
        ['han.word_attention']
    """

    def __init__(
        self,
        weight: float = 0.01,
        *,
        target: float | Tensor | None = None,
        layers: Sequence[str] | None = None,
    ) -> None:
        self.weight = check_positive("weight", weight)
        self.target, self.layers = _entropy_target(target), _layer_names(layers)

    def step(self, model: nn.Module, batch: Any, loss_fn: LossFn) -> Tensor:
        with visible_calls(model, self.layers) as calls:
            loss = loss_fn(model, batch)
        return loss + self.weight * entropy_term([c.weights for c in calls], self.target)


def _layer_names(layers: object) -> list[str] | None:
    """``layers`` as a list of module names or patterns; a bare str is refused, not split
    into its characters."""
    if layers is None:
        return None
    if isinstance(layers, str | Tensor) or not isinstance(layers, Sequence):
        raise TypeError(f"layers must be a sequence of module names, got {layers!r}")
    if not all(isinstance(name, str) for name in layers):
        raise TypeError(f"layers must be a sequence of module names (str), got {layers!r}")
    return list(layers)


class SupervisedAttention:
    """Plug-in: ``loss + weight * supervised_attention_term(weights of layer, target)``.

    Args:
        layer: the module name whose attention is supervised (``"han.sentence_attention"``).
        alignment: ``alignment(batch) -> target (B, Lq, Lk)`` (or ``(B, Lk)`` for a
            one-query pooling: every query gets that row); the layer's calls are joined
            along the query dimension (one call per decoder step gives ``Lq`` = the steps)
            and every head is supervised. Another shape, or not a Tensor, is refused at
            the step with an error naming ``alignment`` and both shapes.
        weight: the term's weight (> 0).

    Example:
        >>> SupervisedAttention("han.sentence_attention", lambda b: b.target).weight
        1.0
    """

    def __init__(self, layer: str, alignment: Callable[[Any], Tensor], weight: float = 1.0) -> None:
        if not isinstance(layer, str):
            raise TypeError(f"layer must be a module name (str), got {type(layer).__name__}")
        if not callable(alignment):
            raise TypeError(f"alignment must be callable (batch) -> Tensor, got {alignment!r}")
        self.layer, self.alignment = layer, alignment
        self.weight = check_positive("weight", weight)

    def step(self, model: nn.Module, batch: Any, loss_fn: LossFn) -> Tensor:
        with visible_calls(model, [self.layer]) as calls:
            loss = loss_fn(model, batch)
        if not calls:
            raise ValueError(f"layer={self.layer!r} made no attention call in this step")
        w = torch.cat([c.weights for c in calls], dim=2)  # (B, H, Lq, Lk)
        target = _alignment_rows(self.alignment(batch), w)  # (B, Lq or 1, Lk)
        return loss + self.weight * supervised_attention_term(w, target[:, None])


def _alignment_rows(target: object, w: Tensor) -> Tensor:
    """What ``alignment(batch)`` returned, as ``(B, Lq, Lk)`` or ``(B, 1, Lk)`` for the
    weights ``w (B, H, Lq, Lk)``, or an error naming ``alignment``, the shape seen and the
    shapes expected (a ``(Lk,)`` row was broadcast silently, a list raised AttributeError)."""
    b, _, lq, lk = w.shape
    want = f"a Tensor (B, Lq, Lk) = {(b, lq, lk)} or (B, Lk) = {(b, lk)}"
    if not isinstance(target, Tensor):
        got = type(target).__name__
        raise TypeError(f"alignment(batch) must return {want}, got {got}")
    if tuple(target.shape) not in ((b, lq, lk), (b, lk)):
        got = f"shape {tuple(target.shape)}"
        raise ValueError(f"alignment(batch) must return {want}, got {got}")
    return target[:, None] if target.dim() == 2 else target


class HeadDropout:
    """Plug-in: each head of every :class:`~attnlab.nn.MultiHeadAttention` is zeroed with
    probability ``p`` per example during the step (before the output projection), the
    others scaled by ``1 / (1 - p)``.

    Example:
        >>> HeadDropout(0.1).p
        0.1
    """

    def __init__(self, p: float = 0.1) -> None:
        check_positive("p", p)
        if p >= 1:
            raise ValueError(f"p must be in (0, 1), got {p}")
        self.p = float(p)

    def _hook(self, module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        x, heads = args[0], self._heads[module]  # (B, Lq, H * E)
        keep = torch.rand(x.shape[0], 1, heads, 1, device=x.device) >= self.p  # (B, 1, H, 1)
        scale = keep.to(x.dtype) / (1 - self.p)
        return ((x.unflatten(-1, (heads, -1)) * scale).flatten(-2), *args[1:])

    def step(self, model: nn.Module, batch: Any, loss_fn: LossFn) -> Tensor:
        mhas = [m for m in model.modules() if isinstance(m, MultiHeadAttention)]
        if not mhas:
            raise TypeError(f"model ({type(model).__name__}) has no MultiHeadAttention")
        self._heads: dict[nn.Module, int] = {m.out_proj: m.num_heads for m in mhas}
        handles = [p.register_forward_pre_hook(self._hook) for p in self._heads]
        try:
            return loss_fn(model, batch)
        finally:
            for h in handles:
                h.remove()
