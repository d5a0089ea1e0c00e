"""Is the attention an explanation? Three tests on a trained model's attention module.

* :func:`adversarial_attention` (Jain & Wallace, 2019): attention as different as
  possible from the model's own (Jensen-Shannon divergence) while the output moves by at
  most ``tolerance`` (total variation distance of the output distributions);
* :func:`permutation_test` (Jain & Wallace, 2019): shuffle each attention row among its
  real positions and measure how far the output moves;
* :func:`uniform_attention` (Wiegreffe & Pinter, 2019): freeze the attention to uniform,
  train the model that way, and compare its accuracy (the frozen-attention baseline).

They intervene on one attention module. One that returns ``(context, weights)`` with
``context = weights @ values`` (:class:`~attnlab.nn.AttentionPooling`, the sentence
attention of the hierarchical classifier; :class:`~attnlab.nn.BahdanauAttention` and
:class:`~attnlab.nn.LuongAttention`, the dates model's decoder, one call per step) has its
weights replaced and its output recomputed from them. Any other module (a
:class:`~attnlab.nn.MultiHeadAttention` of a transformer: the ViT's last self-attention,
the translator's cross-attention) has the weights ``(B, H, Lq, Lk)`` of every
:func:`attnlab.attention` call it makes replaced, through the rewrite hook of
:mod:`attnlab.functional`, and each call's output recomputed from them. ``run(model)``
must return the model's logits ``(B, C)`` or ``(B, T, C)`` for a fixed batch.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from attnlab._observe import REWRITERS
from attnlab._validate import nonnegative_int, positive_int
from attnlab.nn import AttentionPooling, BahdanauAttention, LuongAttention
from attnlab.robust.perturb import check_positive

__all__ = [
    "AttentionSearch",
    "adversarial_attention",
    "jsd",
    "median",
    "override_attention",
    "permutation_test",
    "tvd",
    "uniform_attention",
]

Run = Callable[[nn.Module], Tensor]
WeightsFn = Callable[[Tensor, int], Tensor]
_SITES = (AttentionPooling, BahdanauAttention, LuongAttention)


def jsd(p: Tensor, q: Tensor) -> Tensor:
    """Jensen-Shannon divergence (nats, at most ln 2) over the last dim.

    Example:
        >>> round(float(jsd(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]))), 4)
        0.6931
    """
    m = (p + q) / 2
    kl = lambda a: (torch.special.xlogy(a, a) - torch.special.xlogy(a, m)).sum(-1)  # noqa: E731
    return (kl(p) + kl(q)) / 2


def tvd(p: Tensor, q: Tensor) -> Tensor:
    """Total variation distance ``0.5 * sum |p - q|`` over the last dim.

    Example:
        >>> p = torch.tensor([[0.5, 0.5, 0.0], [0.2, 0.3, 0.5]])
        >>> tvd(p, torch.tensor([[0.0, 0.5, 0.5], [0.2, 0.3, 0.5]])).tolist()
        [0.5, 0.0]
    """
    return 0.5 * (p - q).abs().sum(-1)


def _values(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Tensor:
    if isinstance(module, AttentionPooling):
        return args[0] if args else kwargs["h"]
    keys = args[1] if len(args) > 1 else kwargs["keys"]
    values = args[2] if len(args) > 2 else kwargs.get("values")
    return keys if values is None else values


@contextmanager
def override_attention(module: nn.Module, fn: WeightsFn) -> Iterator[None]:
    """Inside the block, ``module``'s weights ``w`` of call ``i`` become ``fn(w, i)`` and its
    output is recomputed from them, for the calls of this thread (other threads' calls of
    the same module keep their own weights).

    Args:
        module: an AttentionPooling, BahdanauAttention or LuongAttention (weights
            ``(B, Lk)`` or ``(B, Lq, Lk)``), or any module whose attention runs through
            :func:`attnlab.attention` (weights ``(B, H, Lq, Lk)``; calls of this thread
            made while ``module`` runs, its submodules included).
        fn: ``(weights, call index) -> new weights`` (same shape).

    Example:
        >>> pool = AttentionPooling(3)
        >>> h = torch.randn(2, 4, 3)
        >>> with override_attention(pool, lambda w, i: torch.full_like(w, 0.25)):
        ...     out, w = pool(h)
        >>> torch.allclose(out, h.mean(1))
        True
        >>> from attnlab.nn import MultiHeadAttention
        >>> mha, x = MultiHeadAttention(8, 2).eval(), torch.randn(1, 4, 8)
        >>> with override_attention(mha, lambda w, i: torch.full_like(w, 0.25)):
        ...     out = mha(x)
        >>> bool(torch.allclose(out[0, 0], out[0, 3], atol=1e-6))  # every query: mean of v
        True
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be an nn.Module, got {type(module).__name__}")
    if not isinstance(module, _SITES):
        with _rewritten(module, fn):
            yield
        return
    me, calls = threading.get_ident(), [0]

    def hook(m: nn.Module, args: Any, kwargs: Any, out: tuple[Tensor, Tensor]) -> Any:
        if threading.get_ident() != me:
            return None  # another thread's call: its own output, as for the other sites
        w = fn(out[1], calls[0])
        calls[0] += 1
        v = _values(m, args, kwargs)  # (B, Lk, D)
        context = (w[:, None] @ v)[:, 0] if w.dim() == 2 else w @ v
        return context, w

    handle = module.register_forward_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


@contextmanager
def _rewritten(module: nn.Module, fn: WeightsFn) -> Iterator[None]:
    """``fn`` rewrites the weights of the attnlab attention calls made inside ``module``
    (in this thread), counted in order."""
    me, depth, calls = threading.get_ident(), [0], [0]

    def enter(m: nn.Module, args: Any) -> None:
        depth[0] += threading.get_ident() == me

    def leave(m: nn.Module, args: Any, out: Any) -> None:
        depth[0] -= threading.get_ident() == me

    def rewrite(req: Any, w: Tensor) -> Tensor:
        if depth[0] <= 0:
            return w  # a call outside the module
        calls[0] += 1
        return fn(w, calls[0] - 1)

    handles = [
        module.register_forward_pre_hook(enter),
        module.register_forward_hook(leave, always_call=True),
    ]
    entry = (me, rewrite)
    REWRITERS.append(entry)
    try:
        yield
    finally:
        REWRITERS.remove(entry)
        for h in handles:
            h.remove()


def _rows_of(w: Tensor) -> WeightsFn:
    """Call ``i`` gets ``w[:, i]``, in the dtype of its own weights."""
    return lambda own, i: w[:, i].to(own.dtype)


def _working(dtype: torch.dtype) -> torch.dtype:
    """The dtype the tests compute in: the model's, at least float32 (float64 stays)."""
    return torch.promote_types(dtype, torch.float32)


def _probs(logits: Tensor) -> Tensor:
    return logits.to(_working(logits.dtype)).softmax(-1)


def median(x: Tensor, dim: int | None = None) -> Tensor:
    """The median (over ``dim``, default all): for an even count the mean of the two middle
    values (``torch.median`` gives the lower one).

    Example:
        >>> median(torch.tensor([[1.0, 2.0, 10.0, 4.0]]), 1), torch.tensor([1.0, 2.0]).median()
        (tensor([3.]), tensor(1.))
    """
    return torch.quantile(x, 0.5) if dim is None else torch.quantile(x, 0.5, dim=dim)


def _recorded(model: nn.Module, module: nn.Module, run: Run) -> tuple[Tensor, Tensor]:
    """``(probabilities (B, T?, C), weights (B, calls, Lk))`` of a normal run."""
    seen: list[Tensor] = []

    def keep(w: Tensor, i: int) -> Tensor:
        seen.append(w)
        return w

    with torch.no_grad(), override_attention(module, keep):
        probs = _probs(run(model))
    if not seen:  # (torch.stack: "expects a non-empty TensorList")
        raise ValueError(
            f"module: {type(module).__name__} made no attnlab attention call while run ran "
            "the model; give the attention layer the model calls"
        )
    w = torch.stack(seen, 1)
    return probs, w.to(_working(w.dtype))


def _output_shift(probs: Tensor, base: Tensor) -> Tensor:
    """Largest TVD over the output positions of each example: ``(B,)``."""
    return tvd(probs, base).flatten(1).amax(1) if probs.dim() > 2 else tvd(probs, base)


@dataclass
class AttentionSearch:
    """What :func:`adversarial_attention` found, per example.

    Attributes:
        jsd: ``(B,)`` JSD between the found and the original attention (mean over rows).
        tvd: ``(B,)`` how far the output moved under the found attention (<= tolerance).
        weights: ``(B, calls, Lk)`` the found attention. original: the model's own.

    Example:
        >>> pool, head = AttentionPooling(3), nn.Linear(3, 2)
        >>> h = torch.randn(4, 5, 3)
        >>> r = adversarial_attention(pool, pool, lambda m: head(pool(h)[0]), steps=5)
        >>> tuple(r.weights.shape), tuple(r.jsd.shape)  # one call over 5 keys per example
        ((4, 1, 5), (4,))
        >>> torch.allclose(r.original[:, 0], pool(h)[1]), bool((r.tvd <= 0.01).all())
        (True, True)
    """

    jsd: Tensor
    tvd: Tensor
    weights: Tensor
    original: Tensor


def adversarial_attention(
    model: nn.Module,
    module: nn.Module,
    run: Run,
    *,
    tolerance: float = 0.01,
    steps: int = 100,
    lr: float = 0.5,
    penalty: float = 100.0,
    seed: int = 0,
) -> AttentionSearch:
    """Jain & Wallace's adversarial attention: maximize the JSD to the model's attention
    while the output's TVD stays at most ``tolerance`` (Adam on the attention logits with a
    penalty past the tolerance; the best iterate within tolerance is kept, so the model's
    own attention, JSD 0, is the answer when nothing else is found).

    Args:
        model, module, run: as in the module docstring.
        tolerance: the largest output TVD allowed (> 0). steps: Adam steps (>= 1).
        lr: Adam's learning rate (> 0; 0 never moved from the start).
        penalty: weight of the loss ``relu(TVD - tolerance)`` (>= 0; 0: no penalty, the
            search ignores the output and only the keeping of the best iterate within
            tolerance holds it).
        seed: of the random start of the logits (an int >= 0).

    Example:
        >>> pool = AttentionPooling(3)
        >>> head = nn.Linear(3, 2)
        >>> h = torch.randn(4, 5, 3)
        >>> run = lambda m: head(pool(h)[0])
        >>> r = adversarial_attention(pool, pool, run, tolerance=0.05, steps=20)
        >>> bool((r.tvd <= 0.05).all()), bool((r.jsd >= 0).all())
        (True, True)
    """
    check_positive("tolerance", tolerance)
    positive_int("steps", steps)
    lr, penalty = check_positive("lr", lr), check_positive("penalty", penalty, zero=True)
    g = torch.Generator().manual_seed(nonnegative_int("seed", seed))
    base, w0 = _recorded(model, module, run)  # (B, ..., C), (B, T, Lk)
    real = w0 > 0
    z0 = w0.clamp_min(1e-12).log() + torch.randn(w0.shape, generator=g).to(w0)
    z = z0.masked_fill(~real, 0.0).requires_grad_(True)
    opt = torch.optim.Adam([z], lr=lr)
    zeros = w0.new_zeros(len(w0))  # (B,)
    best = AttentionSearch(zeros, zeros.clone(), w0.clone(), w0)
    for _ in range(steps):
        w = torch.softmax(z.masked_fill(~real, -torch.inf), -1).nan_to_num(0.0)  # (B, T, Lk)
        with override_attention(module, _rows_of(w)):
            shift = _output_shift(_probs(run(model)), base)  # (B,)
        div = _mean_rows(jsd(w, w0), real.any(-1))  # (B,)
        ok = (shift <= tolerance) & (div > best.jsd)
        best.jsd = torch.where(ok, div.detach(), best.jsd)
        best.tvd = torch.where(ok, shift.detach(), best.tvd)
        best.weights[ok] = w.detach()[ok]
        loss = (-div + penalty * torch.relu(shift - tolerance)).sum()
        (grad,) = torch.autograd.grad(loss, z)
        z.grad = grad
        opt.step()
    return best


def _mean_rows(x: Tensor, rows: Tensor) -> Tensor:
    """Mean of ``x (B, ...)`` over the rows marked in ``rows`` (same shape): ``(B,)``."""
    x, r = x.flatten(1), rows.flatten(1).to(x.dtype)
    return (x * r).sum(-1) / r.sum(-1).clamp_min(1.0)


def _permute_rows(w: Tensor, g: torch.Generator) -> Tensor:
    """Each row of ``w (..., Lk)`` shuffled among its nonzero positions."""
    real = w > 0
    far = torch.full_like(w, torch.inf)
    src = torch.where(real, torch.rand(w.shape, generator=g).to(w.device), far).argsort(-1)
    pos = torch.arange(w.shape[-1], dtype=w.dtype, device=w.device).expand_as(w)  # (..., Lk)
    dst = torch.where(real, pos, far).argsort(-1)
    return torch.zeros_like(w).scatter(-1, dst, w.gather(-1, src))


def permutation_test(
    model: nn.Module, module: nn.Module, run: Run, *, permutations: int = 20, seed: int = 0
) -> dict[str, Tensor]:
    """Jain & Wallace's permutation test: how far the output moves (TVD) when each
    attention row is shuffled among its real positions.

    Args:
        model, module, run: as in the module docstring.
        permutations: shuffles per example (>= 1). seed: of the shuffles (an int >= 0).

    Returns:
        ``{"median_tvd": (B,) median over the permutations (:func:`median`: for an even
        count the mean of the two middle values), "max_attention": (B,) the largest weight
        of each example (mean over its rows)}``.

    Example:
        >>> pool, head, h = AttentionPooling(3), nn.Linear(3, 2), torch.randn(4, 5, 3)
        >>> r = permutation_test(pool, pool, lambda m: head(pool(h)[0]), permutations=3)
        >>> r["median_tvd"].shape
        torch.Size([4])
    """
    positive_int("permutations", permutations)
    g = torch.Generator().manual_seed(nonnegative_int("seed", seed))
    base, w0 = _recorded(model, module, run)
    shifts = []
    for _ in range(permutations):
        w = _permute_rows(w0, g)
        with torch.no_grad(), override_attention(module, _rows_of(w)):
            shifts.append(_output_shift(_probs(run(model)), base))
    return {
        "median_tvd": median(torch.stack(shifts, 1), 1),
        "max_attention": _mean_rows(w0.amax(-1), (w0 > 0).any(-1)),
    }


@contextmanager
def uniform_attention(module: nn.Module) -> Iterator[None]:
    """Wiegreffe & Pinter's frozen baseline: inside the block ``module`` attends uniformly
    over the positions its own weights do not mask (weight > 0).

    Train with it open (``with uniform_attention(trainer.model.attention): trainer.fit()``)
    and evaluate with it open, then compare with the model trained normally.

    Example:
        >>> pool, h = AttentionPooling(3), torch.randn(2, 4, 3)
        >>> with uniform_attention(pool):
        ...     print(pool(h)[1][0].tolist())
        [0.25, 0.25, 0.25, 0.25]
    """

    def uniform(w: Tensor, i: int) -> Tensor:
        real = (w > 0).to(w.dtype)
        return real / real.sum(-1, keepdim=True).clamp_min(1.0)

    with override_attention(module, uniform):
        yield
