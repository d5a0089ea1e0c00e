"""Non-finite keys and values (NaN, ``inf``, ``-inf``) that a mask hides: a screen, and
plain math's product of the non-finite entries without ``0 * inf`` from hidden pairs.

A hidden key or value (an unwritten cache slot, padding) must stay out of the rows that
do not read it; in a product its weight 0 (or its upstream gradient 0) times ``inf``
is NaN. The engines zero the non-finite entries before their products and add back
what plain math gives where a row reads them (:func:`inf_products`).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from attnlab._eager import screened, sum_is_off
from attnlab.scores import grouped_matmul

__all__ = ["any_nonfinite", "finite_part", "inf_products"]


def any_nonfinite(*ts: Tensor) -> bool:
    """Whether some of ``ts`` may hold NaN, ``inf`` or ``-inf``: the NaN screen's one read
    of a sum (non-finite where an element is), then, only where it is (or overflowed), a
    pass that looks at each element. False while exporting or on the meta device, True
    under vmap (as :func:`attnlab._eager.any_nan`).

    Example:
        >>> any_nonfinite(torch.tensor([float("inf")]), torch.tensor([float("-inf")]))
        True
        >>> any_nonfinite(torch.ones(2), torch.tensor([3e38, 3e38]))  # the sum overflows
        False
    """
    kept = screened(ts)
    if not isinstance(kept, list):
        return kept
    if not kept or not sum_is_off(kept, lambda x: not math.isfinite(x)):
        return False
    return not bool(torch.stack([torch.isfinite(t).all() for t in kept]).all())


def inf_products(a: Tensor, d: Tensor, allowed: Tensor | None) -> Tensor:
    """Plain math's ``a (B, Hq, M, K) @ d (B, Hkv, K, N)`` for a ``d`` that holds only
    non-finite entries (0 elsewhere, adding nothing: the finite part's product carries a
    NaN of ``a`` there), where a pair ``(m, k)`` that ``allowed``
    (broadcastable to ``a``; None: every pair) hides adds nothing: per entry 0, ``inf``,
    ``-inf`` or NaN (``0 * inf``, ``inf - inf`` or a NaN read), in ``a``'s dtype, with no
    gradient (it is constant where it is finite). Counts of signed pairs, in float32.

    Example:
        >>> a = torch.tensor([[[[1.0, 0.0], [1.0, 1.0]]]])
        >>> d = torch.tensor([[[[0.0], [float("inf")]]]])
        >>> allowed = torch.tensor([[[[True, False], [True, True]]]])
        >>> inf_products(a, d, allowed).flatten(), inf_products(a, d, None).flatten()
        (tensor([0., inf]), tensor([nan, inf]))
    """
    with torch.no_grad():
        a = a.detach()
        seen = torch.ones_like(a, dtype=torch.bool) if allowed is None else allowed

        def count(pick: Tensor, of: Tensor) -> Tensor:  # (B, Hq, M, N) pairs seen
            return grouped_matmul((pick & seen).to(torch.float32), of.to(torch.float32))

        up, down = d == math.inf, d == -math.inf  # (B, Hkv, K, N)
        plus = count(a > 0, up) + count(a < 0, down)
        minus = count(a > 0, down) + count(a < 0, up)
        void = count((a == 0) | a.isnan(), up | down) + count(a == a, d.isnan())
        void += count(a.isnan(), d.isnan())  # (0 * inf, NaN * inf, anything * NaN)
        nan = (void > 0) | ((plus > 0) & (minus > 0))
        out = torch.where(plus > 0, math.inf, torch.where(minus > 0, -math.inf, 0.0))
        return out.masked_fill_(nan, math.nan).to(a.dtype)


class _FinitePart(torch.autograd.Function):
    """``x`` with its non-finite entries 0, whose gradient (and tangent) passes to every
    entry, the non-finite ones too, as plain math's does (``masked_fill`` gave them 0);
    usable under ``torch.func`` (vmap, grad, jvp)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor, bad: Tensor) -> Tensor:
        return x.masked_fill(bad, 0.0)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Tensor, Tensor], output: Tensor) -> None:
        pass

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return grad, None

    @staticmethod
    def jvp(ctx: Any, x_t: Tensor, bad_t: None) -> Tensor:
        return x_t


def finite_part(x: Tensor, bad: Tensor) -> Tensor:
    """``x`` with the entries ``bad`` (its non-finite ones) 0; the gradient reaches all.

    Example:
        >>> x = torch.tensor([1.0, float("inf")], requires_grad=True)
        >>> finite_part(x, ~torch.isfinite(x)).sum().backward()
        >>> x.grad
        tensor([1., 1.])
    """
    return _FinitePart.apply(x, bad) if x.requires_grad else x.masked_fill(bad, 0.0)
