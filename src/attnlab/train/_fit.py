"""Whether a checkpoint's tensors can stand for a model's: ``load_state_dict`` casts an
int8 or bool tensor to the parameter's float dtype silently, and an optimizer moment of
another shape failed only inside the optimizer's first step."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor, nn, optim

__all__ = ["model_misfits", "optimizer_misfits"]

# optimizer state entries shaped as their parameter (Adam's moments, SGD's momentum)
_LIKE_PARAM = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer")


def model_misfits(model: nn.Module, saved: Mapping[str, Tensor]) -> list[str]:
    """The saved tensors that are not floating-point where the model's are (float16,
    bfloat16 and float64 are cast, and fit).

    Example:
        >>> import torch
        >>> m = torch.nn.Linear(2, 1)
        >>> model_misfits(m, {"weight": torch.ones(1, 2, dtype=torch.int8)})
        ['weight (torch.int8, the model has torch.float32)']
    """
    own = model.state_dict()
    return [
        f"{k} ({v.dtype}, the model has {own[k].dtype})"
        for k, v in saved.items()
        if k in own and own[k].is_floating_point() and not v.is_floating_point()
    ]


def optimizer_misfits(opt: optim.Optimizer, saved: Mapping[str, Any]) -> list[str]:
    """The saved optimizer state tensors that cannot stand for their parameter's: not
    floating-point where it is, or (moments, momentum) of another shape. ``saved`` is a
    state dict that ``opt.load_state_dict`` took (its groups fit ``opt``'s).

    Example:
        >>> import torch
        >>> m = torch.nn.Linear(2, 1)
        >>> opt = torch.optim.Adam(m.parameters())
        >>> saved = {"param_groups": [{"params": [0, 1]}],
        ...          "state": {1: {"step": torch.tensor(1.0), "exp_avg": torch.zeros(3)}}}
        >>> optimizer_misfits(opt, saved)
        ['optim.1.exp_avg (shape (3,), its parameter (1,))']
    """
    ids = [i for group in saved["param_groups"] for i in group["params"]]
    params = [p for group in opt.param_groups for p in group["params"]]
    out = []
    for pid, param in zip(ids, params, strict=False):
        for key, v in saved["state"].get(pid, {}).items():
            if not isinstance(v, Tensor) or key == "step":
                continue
            if param.is_floating_point() and not v.is_floating_point():
                out.append(f"optim.{pid}.{key} ({v.dtype}, its parameter {param.dtype})")
            elif key in _LIKE_PARAM and v.shape != param.shape:
                shapes = f"shape {tuple(v.shape)}, its parameter {tuple(param.shape)}"
                out.append(f"optim.{pid}.{key} ({shapes})")
    return out
