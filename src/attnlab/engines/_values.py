"""The weighted sum of values with NaN values kept to the rows that see them (private).

:func:`weighted_values` screens ``v`` for NaN on the CPU, where reading a value is free;
on a device where a read stalls the host (:func:`attnlab._devices.reads_stall`: CUDA) it
always takes the NaN-keeping form, which equals the plain product bit for bit, values and
gradients, where ``v`` holds no NaN (its fills then change nothing).
"""

from __future__ import annotations

import torch
from torch import Tensor

from attnlab import _devices
from attnlab._eager import any_nan
from attnlab.scores import expand_kv, grouped_matmul

__all__ = ["weighted_values"]


def weighted_values(w: Tensor, v: Tensor, allowed: Tensor | None) -> Tensor:
    """``w (B, Hq, Lq, Lk) @ v (B, Hkv, Lk, Ev)`` where a NaN value reaches only the rows
    ``allowed (., ., Lq, Lk)`` (None: every key) lets see its key: a masked-out weight is
    0, and ``0 * NaN`` would spread it to every row (an uninitialized cache slot, say).

    Example:
        >>> v = torch.tensor([[[[1.0], [float("nan")]]]])
        >>> allowed = torch.tensor([[[[True, False], [True, True]]]])
        >>> weighted_values(torch.tensor([[[[1.0, 0.0], [0.5, 0.5]]]]), v, allowed).flatten()
        tensor([1., nan])
    """
    if not _devices.reads_stall(v) and not any_nan(v):
        return grouped_matmul(w, v)
    bad = torch.isnan(v)  # (B, Hkv, Lk, Ev)
    out = grouped_matmul(w, v.masked_fill(bad, 0.0))  # (B, Hq, Lq, Ev)
    return out.masked_fill(_reach(bad, allowed, out.shape), float("nan"))


def _reach(bad: Tensor, allowed: Tensor | None, shape: torch.Size) -> Tensor:
    """Where a NaN value reaches the output ``shape = (B, Hq, Lq, Ev)``: some key a row is
    ``allowed`` to see holds NaN in that feature (bool, broadcastable to ``shape``).

    The count of such keys is a product of 0/1 entries, positive exactly when one term
    is, in any float dtype: in half precision where reads stall (a GPU's tensor cores; it
    is a second product the size of ``w @ v``), float32 on the CPU (whose half-precision
    product took 24x float32's time, 1x8x512x512).
    """
    b, h, lq, _ = shape
    if allowed is None:
        return expand_kv(bad.any(-2, keepdim=True), h)  # (B, Hq, 1, Ev)
    dtype = torch.float16 if _devices.reads_stall(bad) else torch.float32
    a = allowed.expand(b, h, lq, bad.shape[-2]).to(dtype)  # (B, Hq, Lq, Lk)
    return grouped_matmul(a, bad.to(dtype)) > 0  # (B, Hq, Lq, Ev)
