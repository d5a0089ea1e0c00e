"""Explanations built on attention: rollout, gradient relevance, integrated gradients.

- :func:`rollout` (Abnar & Zuidema 2020): multiply the layers' head-fused attention,
  each mixed half-and-half with the identity for the residual connection.
- :func:`relevance` / :func:`gradient_relevance` (Chefer et al. 2021): the positive part
  of gradient x attention, averaged over heads, accumulated as ``R <- R + A_bar @ R``.
  The gradients come from autograd through the model as it is: no per-layer rule.
- :func:`integrated_gradients` (Sundararajan et al. 2017) over inputs or a layer's output
  (the token embeddings), computed by captum.

Attention lists are in layer order, each ``(B, H, n, n)`` with rows the queries.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from attnlab._validate import plain, validate_flag
from attnlab.interpret._captum import captum_attr, float64_path, trapezoid_fix
from attnlab.interpret.capture import capture

__all__ = [
    "HEAD_FUSIONS",
    "Attribution",
    "fuse_heads",
    "gradient_relevance",
    "integrated_gradients",
    "relevance",
    "residual_attention",
    "rollout",
]

HEAD_FUSIONS = ("mean", "max", "min")


def _check_layers(name: str, attentions: object, weights: bool = False) -> tuple[int, int]:
    """``(B, n)`` of a non-empty list of square ``(B, H, n, n)`` float tensors sharing
    ``B``, ``n``, dtype and device; with ``weights``, their entries must also be finite
    and ``>= 0`` (attention weights; gradients may be negative)."""
    if isinstance(attentions, Tensor) or not isinstance(attentions, Sequence):
        raise TypeError(
            f"{name} must be a list of (B, H, n, n) tensors, one per layer; got "
            f"{type(attentions).__name__} (a stacked tensor t: pass list(t))"
        )
    if len(attentions) == 0:
        raise ValueError(f"{name} must be a non-empty list (at least one layer), got none")
    first = attentions[0]
    for i, a in enumerate(attentions):
        _check_heads(f"{name}[{i}]", a)
        if a.shape[0] != first.shape[0] or a.shape[-1] != first.shape[-1]:
            raise ValueError(
                f"{name} must share batch B and length n (the same B and n in every "
                f"layer); {name}[0] has shape {tuple(first.shape)}, {name}[{i}] has "
                f"{tuple(a.shape)}"
            )
        if a.dtype != first.dtype or a.device != first.device:
            raise TypeError(
                f"{name} must share dtype and device; {name}[0] is {first.dtype}/"
                f"{first.device}, {name}[{i}] is {a.dtype}/{a.device}"
            )
        if weights and (not bool(torch.isfinite(a).all()) or bool((a < 0).any())):
            raise ValueError(f"{name}[{i}] must be finite and >= 0 (attention weights)")
    return first.shape[0], first.shape[-1]


def _check_heads(name: str, a: object, square: bool = True) -> None:
    """``a`` a floating ``(B, H, n, m)`` tensor with ``H >= 1`` heads (``square``:
    ``n == m``, self-attention)."""
    if not isinstance(a, Tensor):
        raise TypeError(f"{name} must be a Tensor, got {type(a).__name__}")
    if not a.is_floating_point():  # (mean() failed on it, naming nothing)
        raise TypeError(f"{name} must be a floating-point tensor, got {a.dtype}")
    if a.dim() != 4 or a.shape[1] == 0 or (square and a.shape[-1] != a.shape[-2]):
        want = "(B, H, n, n) (square self-attention, " if square else "(B, H, n, m) ("
        raise ValueError(  # (H = 0: the mean over heads was NaN, the max an IndexError)
            f"{name} must have shape {want}H >= 1 heads), got {tuple(a.shape)}"
        )


def fuse_heads(attention: Tensor, head_fusion: str = "mean") -> Tensor:
    """``(B, H, n, m)`` -> ``(B, n, m)`` by the mean, max or min over heads.

    Example:
        >>> a = torch.tensor([[[[1.0, 0.0]], [[0.0, 1.0]]]])  # B=1, H=2, one query
        >>> fuse_heads(a).tolist(), fuse_heads(a, "max").tolist()
        ([[[0.5, 0.5]]], [[[1.0, 1.0]]])
    """
    _check_heads("attention", attention, square=False)  # (a 2-D tensor: a mean over keys)
    if head_fusion == "mean":
        return attention.mean(1)
    if head_fusion == "max":
        return attention.amax(1)
    if head_fusion == "min":
        return attention.amin(1)
    raise ValueError(f"head_fusion must be one of {HEAD_FUSIONS}, got {head_fusion!r}")


def residual_attention(
    attention: Tensor, head_fusion: str = "mean", residual: bool = True
) -> Tensor:
    """One layer as rollout and flow see it: ``(B, H, n, n)`` -> ``(B, n, n)``, heads fused,
    then with ``residual`` ``0.5 * A + 0.5 * I`` with rows renormalized.

    Example:
        >>> a = torch.tensor([[[[0.0, 1.0], [0.0, 1.0]]]])
        >>> residual_attention(a)[0].tolist()
        [[0.5, 0.5], [0.0, 1.0]]
    """
    _check_heads("attention", attention)
    validate_flag("residual", residual)  # (a str such as "yes" was taken as True)
    fused = fuse_heads(attention.detach(), head_fusion)  # (B, n, n)
    if not residual:
        return fused
    eye = torch.eye(fused.shape[-1], dtype=fused.dtype, device=fused.device)
    aug = 0.5 * fused + 0.5 * eye  # (B, n, n)
    return aug / aug.sum(-1, keepdim=True).clamp_min(1e-12)


def rollout(
    attentions: Sequence[Tensor], *, head_fusion: str = "mean", residual: bool = True
) -> Tensor:
    """Attention rollout: how much each output token draws on each input token.

    Each layer's heads are fused; with ``residual`` the fused matrix becomes
    ``0.5 * A + 0.5 * I`` with rows renormalized; the result is ``A_L @ ... @ A_1``.

    Args:
        attentions: per-layer weights ``(B, H, n, n)`` in layer order.
        head_fusion: ``"mean"`` (the paper's), ``"max"`` or ``"min"`` over heads.
        residual: account for the residual connection (the paper's choice).

    Returns:
        ``(B, n, n)``: row ``i`` is output token ``i``'s attribution over the input tokens.

    Example:
        >>> a = torch.tensor([[[[0.0, 1.0], [0.0, 1.0]]]])  # everyone attends to token 1
        >>> rollout([a, a])[0].tolist()
        [[0.25, 0.75], [0.0, 1.0]]
    """
    _check_layers("attentions", attentions, weights=True)  # (NaN spread to every row)
    validate_flag("residual", residual)  # (a str such as "no" was taken as True)
    out: Tensor | None = None
    for a in attentions:
        layer = residual_attention(a, head_fusion, residual)  # (B, n, n)
        out = layer if out is None else layer @ out
    assert out is not None
    return out


def relevance(attentions: Sequence[Tensor], gradients: Sequence[Tensor]) -> Tensor:
    """Chefer et al.'s relevance from each layer's weights and d score / d weights.

    ``R = I``; for each layer ``R <- R + mean_h((grad * A)^+) @ R``.

    Args:
        attentions, gradients: per-layer ``(B, H, n, n)`` in layer order.

    Returns:
        ``(B, n, n)``: row ``i`` is token ``i``'s relevance over the input tokens (row 0,
        the [CLS] token, explains a classifier).

    Example:
        >>> a = torch.full((1, 1, 2, 2), 0.5)
        >>> relevance([a], [torch.tensor([[[[1.0, -1.0], [0.0, 2.0]]]])])[0].tolist()
        [[1.5, 0.0], [0.0, 2.0]]
    """
    b, n = _check_layers("attentions", attentions, weights=True)
    _check_layers("gradients", gradients)
    a0, g0 = attentions[0], gradients[0]
    if (g0.dtype, g0.device) != (a0.dtype, a0.device):  # (a bare RuntimeError in the product)
        raise TypeError(
            f"gradients must have the attentions' dtype and device {a0.dtype}/{a0.device}, "
            f"got {g0.dtype}/{g0.device}"
        )
    if len(gradients) != len(attentions):
        raise ValueError(
            f"gradients has {len(gradients)} layers but attentions has {len(attentions)}"
        )
    r = torch.eye(n, dtype=attentions[0].dtype, device=attentions[0].device).expand(b, n, n)
    for a, g in zip(attentions, gradients, strict=True):
        if g.shape != a.shape:
            raise ValueError(f"a gradient has shape {tuple(g.shape)}, its weights {tuple(a.shape)}")
        cam = (g.detach() * a.detach()).clamp_min(0).mean(1)  # (B, n, n)
        r = r + cam @ r
    return r


def gradient_relevance(
    model: nn.Module, run: Callable[[], Tensor], *, layers: Sequence[str] | None = None
) -> Tensor:
    """Chefer et al.'s relevance of ``run()``'s score, captured from ``model``.

    ``run`` calls the model and returns the score to explain: a scalar, or ``(B,)`` (one per
    example; they are summed, which leaves each example's gradients its own). Every
    attnlab attention call inside ``model`` whose name matches ``layers`` (default: all)
    is computed on the reference engine with its weights kept in the graph.

    Returns:
        ``(B, n, n)`` relevance (see :func:`relevance`).

    Example:
        >>> from attnlab.nn import Encoder, EncoderLayer, LayerConfig
        >>> enc = Encoder(EncoderLayer(LayerConfig(16, 2, 32, dropout=0.0)), 2).eval()
        >>> x = torch.randn(1, 5, 16)
        >>> tuple(gradient_relevance(enc, lambda: enc(x)[:, 0].sum()).shape)
        (1, 5, 5)
    """
    # the backward inside the block too: activation checkpointing recomputes each call
    # there, on the engine of the forward (reference), and capture does not record it again
    with capture(model, layers=layers, grad=True) as cap, torch.enable_grad():
        score = run()
        if not isinstance(score, Tensor) or score.dim() > 1:
            shape = tuple(score.shape) if isinstance(score, Tensor) else type(score).__name__
            raise ValueError(f"run() must return a scalar or (B,) score, got {shape}")
        weights = [c.weights for c in cap.records]
        if not weights:
            raise ValueError(f"no attention call inside the model matched layers={layers}")
        shapes = sorted({(w.shape[0], *w.shape[2:]) for w in weights})  # (B, Lq, Lk) each
        if len(shapes) > 1 or shapes[0][1] != shapes[0][2]:  # (it blamed "attentions")
            names = sorted({c.name for c in cap.records})
            raise ValueError(
                f"layers={layers}: the matched attention calls are not one stack of square "
                f"self-attention (B, Lq, Lk): {shapes} from {names[:4]}; choose one stack's "
                "calls, e.g. layers=['encoder.*']"
            )
        if not all(w.requires_grad for w in weights):  # (torch: "does not require grad")
            raise RuntimeError(
                "gradient_relevance: the attention weights are outside the autograd graph: "
                "run() ran under torch.inference_mode, or under reentrant activation "
                "checkpointing (use_reentrant=True runs the forward without grad; use "
                "use_reentrant=False)"
            )
        grads = torch.autograd.grad(score.sum(), weights, allow_unused=True)
    grads_ = [torch.zeros_like(w) if g is None else g for w, g in zip(weights, grads, strict=True)]
    return relevance(weights, grads_)


@dataclass(frozen=True)
class Attribution:
    """Integrated-gradients attributions.

    Attributes:
        attributions: the inputs' (or the layer output's) shape, e.g. ``(B, L, D)``.
        delta: ``(B,)`` completeness gap ``sum(attributions) - (f(x) - f(baseline))``.

    Example:
        >>> a = Attribution(torch.ones(1, 2, 3), torch.zeros(1))  # integrated_gradients'
        >>> a.per_token()  # (B, L): each token's attribution summed over D
        tensor([[3., 3.]])
    """

    attributions: Tensor
    delta: Tensor

    def per_token(self) -> Tensor:
        """``(B, L)``: attributions summed over the last (embedding) dimension."""
        return self.attributions.sum(-1)


def integrated_gradients(
    forward: Callable[[Tensor], Tensor],
    inputs: Tensor,
    baselines: Tensor | None = None,
    *,
    layer: nn.Module | None = None,
    steps: int = 50,
    method: str = "gausslegendre",
    internal_batch_size: int | None = None,
) -> Attribution:
    """Integrated gradients of ``forward``'s ``(B,)`` output (captum).

    Args:
        forward: ``inputs -> (B,)`` scores.
        inputs: what ``forward`` takes, e.g. embeddings ``(B, L, D)`` or token ids ``(B, L)``.
        baselines: the reference input (default zeros; with ``layer``, baseline token ids).
        layer: attribute to this module's output instead of the inputs (e.g. a model's word
            embedding, so ``inputs`` can be token ids).
        steps, method: the path integral's points and rule (captum's ``n_steps`` and
            ``method``; ``"gausslegendre"`` converges fastest).
        internal_batch_size: evaluate the path in chunks of this many inputs.

    Returns:
        An :class:`Attribution`; completeness means ``delta`` is small against
        ``f(x) - f(baseline)``.

    Example:
        >>> x = torch.tensor([[1.0, 2.0, 3.0]])
        >>> ig = integrated_gradients(lambda t: (t**2).sum(-1), x)
        >>> [round(v, 4) for v in ig.attributions[0].tolist()], abs(ig.delta.item()) < 1e-4
        ([1.0, 4.0, 9.0], True)
    """
    if not isinstance(inputs, Tensor):
        raise TypeError(f"inputs must be a Tensor, got {type(inputs).__name__}")
    steps, internal_batch_size = _check_path(method, steps, internal_batch_size)
    base = _check_baselines(inputs, baselines)
    if layer is not None and not isinstance(layer, nn.Module):
        raise TypeError(f"layer must be a torch.nn.Module or None, got {type(layer).__name__}")
    attr = captum_attr()

    def scores(x: Tensor) -> Tensor:  # captum asserted on other shapes, naming neither
        out = forward(x)
        ok = isinstance(out, Tensor) and (out.dim() == 1 or out.shape[1:] == (1,))
        if not ok:
            got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise ValueError(f"forward must return one score per input, (B,); got {got}")
        return out

    algo = (
        attr.IntegratedGradients(scores)
        if layer is None
        else attr.LayerIntegratedGradients(scores, layer)
    )
    float64_path(algo if layer is None else algo.ig, method, steps)
    with torch.enable_grad():
        a, delta = algo.attribute(
            inputs,
            baselines=base,
            n_steps=steps,
            method=method,
            internal_batch_size=internal_batch_size,
            return_convergence_delta=True,
        )
    if method == "riemann_trapezoid":
        a, delta = trapezoid_fix(a, delta, steps)
    return Attribution(a.detach(), delta.detach())


# captum's rules of the path integral (``captum.attr._utils.approximation_methods``)
IG_METHODS: tuple[str, ...] = ("riemann_right", "riemann_left", "riemann_middle")
IG_METHODS += ("riemann_trapezoid", "gausslegendre")


def _check_baselines(inputs: Tensor, baselines: object) -> Tensor | float | None:
    """``baselines`` (a number as Python's, numpy's too) if it is a baseline tensor of the
    inputs' shape (or one of its rows, ``(1, ...)``), a number or None, and a batch with an
    input (captum's AssertionError or IndexError named neither)."""
    if inputs.dim() == 0 or inputs.shape[0] == 0:
        raise ValueError(f"inputs must hold at least one input (B >= 1), got {tuple(inputs.shape)}")
    number = plain(baselines)
    if baselines is None:
        return None
    if isinstance(number, int | float) and not isinstance(number, bool):
        return number
    if not isinstance(baselines, Tensor):
        raise TypeError(
            f"baselines must be a Tensor, a number or None, got {type(baselines).__name__}"
        )
    if _kind(baselines) != _kind(inputs):  # (float baselines of token ids: a bare
        # RuntimeError from the embedding, "Expected tensor for argument #1 'indices'")
        hint = " (token ids need baseline ids, e.g. the padding id)" * (_kind(inputs) == "integer")
        raise TypeError(
            f"baselines must be {_kind(inputs)} like the inputs ({inputs.dtype}), got "
            f"{baselines.dtype}{hint}"
        )
    ok = baselines.shape == inputs.shape or baselines.shape == (1, *inputs.shape[1:])
    if not ok:
        raise ValueError(
            f"baselines must have the inputs' shape {tuple(inputs.shape)} or "
            f"{(1, *inputs.shape[1:])}, got {tuple(baselines.shape)}"
        )
    return baselines


def _kind(t: Tensor) -> str:
    """A tensor's kind of number: bool, integer, floating or complex."""
    if t.dtype == torch.bool:
        return "bool"
    return "complex" if t.is_complex() else "floating" if t.is_floating_point() else "integer"


def _check_path(method: object, steps: object, batch: object) -> tuple[int, int | None]:
    """The path integral's rule, steps and chunk size, named here rather than by captum's
    assert; the sizes as Python's ints (numpy's taken)."""
    n = plain(steps)
    if isinstance(n, bool) or not isinstance(n, int) or n < 2:
        raise ValueError(f"steps must be an int >= 2, got {steps!r}")
    if method not in IG_METHODS:
        raise ValueError(f"method={method!r} is not one of {IG_METHODS}")
    chunk = plain(batch)
    if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1):
        raise ValueError(f"internal_batch_size must be an int >= 1, got {batch!r}")
    return n, chunk
