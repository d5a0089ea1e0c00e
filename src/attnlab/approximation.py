"""How far an approximate engine's output is from exact attention on given inputs.

Example:
    >>> import torch, attnlab
    >>> _ = torch.manual_seed(0)
    >>> q, k, v = (0.5 * torch.randn(3, 1, 2, 256, 16)).unbind(0)
    >>> few = attnlab.approximation_error(
    ...     q, k, v, engine="performer", engine_options={"num_features": 16})
    >>> many = attnlab.approximation_error(
    ...     q, k, v, engine="performer", engine_options={"num_features": 1024})
    >>> many["relative_fro"] < few["relative_fro"]
    True
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from attnlab.functional import attention
from attnlab.masks import Mask

__all__ = ["approximation_error"]


def approximation_error(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    engine: str,
    engine_options: Mapping[str, object] | None = None,
    mask: Mask | Tensor | None = None,
    scale: float | None = None,
) -> dict[str, float]:
    """Error of ``engine``'s output against exact softmax attention (fp64 reference).

    The approximation runs in the inputs' dtype; the exact output is the reference
    engine's in float64 on the same inputs. No autograd.

    Args:
        q, k, v: ``(B, Hq, Lq, E)``, ``(B, Hkv, Lk, E)``, ``(B, Hkv, Lk, Ev)``.
        engine: the engine to measure (any name, e.g. ``"performer"``).
        engine_options: its settings, as in :func:`attnlab.attention`.
        mask, scale: as in :func:`attnlab.attention` (dot score, softmax).

    Returns:
        ``{"max_abs", "mean_abs", "relative_fro"}``: the largest and mean absolute
        difference of the outputs ``(B, Hq, Lq, Ev)``, and ``|approx - exact|_F /
        |exact|_F``.

    Example:
        >>> from attnlab import masks
        >>> _ = torch.manual_seed(0)
        >>> q, k, v = torch.randn(3, 1, 2, 16, 8).unbind(0)
        >>> err = approximation_error(q, k, v, engine="sdpa", mask=masks.causal())
        >>> sorted(err), err["max_abs"] < 1e-5  # an exact engine: float32 rounding only
        (['max_abs', 'mean_abs', 'relative_fro'], True)
        >>> approximation_error(q, k, v, engine="linear")["relative_fro"] > 0.1  # not softmax
        True
    """
    with torch.no_grad():
        approx = attention(
            q, k, v, mask=mask, scale=scale, engine=engine, engine_options=engine_options
        )
        exact = attention(
            q.double(), k.double(), v.double(), mask=mask, scale=scale, engine="reference"
        )
    assert isinstance(approx, Tensor) and isinstance(exact, Tensor)
    diff = approx.double() - exact  # (B, Hq, Lq, Ev)
    return {
        "max_abs": diff.abs().max().item(),
        "mean_abs": diff.abs().mean().item(),
        "relative_fro": (diff.norm() / exact.norm().clamp_min(1e-300)).item(),
    }
