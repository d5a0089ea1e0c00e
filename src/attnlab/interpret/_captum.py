"""Where captum (0.9) computes integrated gradients less exactly than the rule it names:
float64 paths held float32 points and step sizes, and the trapezoid rule's points were
weighed as if ``1/steps`` apart. :func:`~attnlab.interpret.explain.integrated_gradients`
corrects both, on its own captum objects only."""

from __future__ import annotations

import inspect
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = ["captum_attr", "float64_path", "trapezoid_fix"]

# captum's Riemann points over [0, 1], as (first, last) for n steps (its float32 linspace)
_RIEMANN = {
    "riemann_left": lambda n: (0.0, 1 - 1 / n),
    "riemann_right": lambda n: (1 / n, 1.0),
    "riemann_middle": lambda n: (1 / (2 * n), 1 - 1 / (2 * n)),
    "riemann_trapezoid": lambda n: (0.0, 1.0),
}


def captum_attr() -> Any:
    """``captum.attr``, or an ImportError that says how to install it."""
    try:
        import captum.attr
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("integrated gradients need captum: pip install 'attnlab[explain]'") from e
    return captum.attr


def float64_path(ig: Any, method: str, steps: int) -> None:
    """Make this ``ig`` (an ``IntegratedGradients``) exact in float64 for ``method`` at
    ``steps`` points; other dtypes are left as captum computes them.

    captum multiplies each step's gradients by its step size cast to float32
    (``torch.tensor(step_sizes).float()``): 6.6e-9 off a float64 integral that 64
    Gauss-Legendre steps reach to 1e-14. Each step's float64 gradients are scaled by
    ``size / float32(size)`` first. Its Riemann points come from a float32
    ``torch.linspace`` (riemann_middle at 50 steps: 7.7e-8 off the same rule in float64):
    float64 paths get the same points in float64, also chunk by chunk (captum hands each
    chunk its slice of the float32 points, which are matched to the nearest exact one).
    """
    from captum.attr._utils.approximation_methods import approximation_parameters

    plain = ig._attribute
    signature = inspect.signature(plain)

    def attribute(*args: Any, **kwargs: Any) -> Any:
        call = signature.bind(*args, **kwargs)
        call.apply_defaults()
        if not _float64(call.arguments["inputs"], call.arguments["baselines"]):
            return plain(*args, **kwargs)
        n, given = call.arguments["n_steps"], call.arguments["step_sizes_and_alphas"]
        sizes_of, alphas_of = approximation_parameters(call.arguments["method"])
        sizes, alphas = given if given is not None else (sizes_of(n), alphas_of(n))
        exact_alphas = np.asarray(_alphas64(method, steps))
        near = np.abs(np.asarray(alphas)[:, None] - exact_alphas[None, :]).argmin(1)
        call.arguments["step_sizes_and_alphas"] = (sizes, exact_alphas[near].tolist())
        exact = torch.tensor(sizes, dtype=torch.float64)
        fix = (exact / exact.float().double()).view(n, 1)  # (steps, 1)
        gradients = ig.gradient_func

        def scaled(*a: Any, **k: Any) -> tuple[Tensor, ...]:
            grads = gradients(*a, **k)  # each (steps * B, ...), step-major
            return tuple(
                (g.reshape(n, -1) * fix.to(g.device)).view(g.shape)
                if g.dtype == torch.float64
                else g
                for g in grads
            )

        ig.gradient_func = scaled
        try:
            return plain(*call.args, **call.kwargs)
        finally:
            ig.gradient_func = gradients

    ig._attribute = attribute


def _alphas64(method: str, n: int) -> list[float]:
    """The path's ``n`` points of captum's rule ``method``, in float64."""
    if method in _RIEMANN:
        first, last = _RIEMANN[method](n)
        return torch.linspace(first, last, n, dtype=torch.float64).tolist()
    from captum.attr._utils.approximation_methods import approximation_parameters

    return list(approximation_parameters(method)[1](n))  # Gauss-Legendre: numpy's float64


def _float64(inputs: Any, baselines: Any) -> bool:
    """Whether the path runs in float64: an input or a baseline tensor is float64."""
    return any(isinstance(t, Tensor) and t.dtype == torch.float64 for t in (*inputs, *baselines))


def trapezoid_fix(a: Tensor, delta: Tensor, steps: int) -> tuple[Tensor, Tensor]:
    """captum (0.9) places the trapezoid's ``steps`` points ``1/(steps-1)`` apart but
    weighs them as if ``1/steps`` apart, so every attribution came out ``(steps-1)/steps``
    of the integral (a linear score lost a quarter at 4 steps); rescale, and move
    ``delta`` (``sum(a) - (f(x) - f(b))``) by the same added sum."""
    k = steps / (steps - 1)
    added = a.detach().flatten(1).sum(1).to(delta.dtype) * (k - 1)  # (B,)
    return a * k, delta + added
