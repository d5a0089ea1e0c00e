"""What layers read off their submodules' weights, for submodules whose ``weight`` may be
no tensor: a ``Linear`` of ``torch.ao.quantization.quantize_dynamic`` has a method there."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["weight_dtype"]


def weight_dtype(module: object) -> torch.dtype | None:
    """The dtype of ``module.weight`` when that is a tensor, else None (for
    :func:`~attnlab._validate.same_dtype`: no check, the module checks its input itself).

    Example:
        >>> weight_dtype(torch.nn.Linear(2, 3).double()), weight_dtype(torch.nn.ReLU())
        (torch.float64, None)
    """
    weight = getattr(module, "weight", None)
    return weight.dtype if isinstance(weight, Tensor) else None
