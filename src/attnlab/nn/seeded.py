"""Parameters drawn from an explicit ``torch.Generator``, not torch's global RNG.

Seeding the global RNG (``torch.manual_seed``) is process-wide: another thread drawing
from it meanwhile changes the numbers. :func:`reset_parameters` redraws every parameter
of a model from a generator of the caller's, with the distributions the model's own
layers draw from when built, so a seed fixes the model whatever other threads do.
"""

from __future__ import annotations

import inspect
import math

import torch
from torch import nn

__all__ = ["reset_parameters"]

# torch layers whose reset_parameters draws kaiming_uniform(a=sqrt 5) weights and
# U(-1/sqrt(fan_in), 1/sqrt(fan_in)) biases; and those whose draws nothing (constants)
_TORCH_AFFINE = (nn.Linear.reset_parameters, nn.Conv2d.reset_parameters)
_TORCH_CONSTANT = (nn.LayerNorm.reset_parameters, nn.RMSNorm.reset_parameters)


def reset_parameters(module: nn.Module, generator: torch.Generator) -> nn.Module:
    """Draw every parameter of ``module`` again from ``generator``, each from the
    distribution its layer draws it from when built; returns ``module``.

    A layer takes part through its own ``reset_parameters(generator=...)``; torch's
    ``Linear``, ``Conv1d/2d/3d``, ``Embedding``, ``LayerNorm`` and ``RMSNorm`` are drawn
    as their own ``reset_parameters`` draws them. Any other layer with parameters is a TypeError
    naming it (its parameters would otherwise keep what they held). Build the model on
    the meta device and ``to_empty`` it first to draw nothing from the global RNG.

    Example:
        >>> lin = nn.Linear(4, 3)
        >>> a = reset_parameters(lin, torch.Generator().manual_seed(0)).weight.clone()
        >>> b = reset_parameters(lin, torch.Generator().manual_seed(0)).weight
        >>> torch.equal(a, b), bool(a.abs().max() <= 1 / 4**0.5)
        (True, True)
    """
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    for m in module.modules():
        if next(m.parameters(recurse=False), None) is None:
            continue
        own = getattr(type(m), "reset_parameters", None)
        if own is not None and "generator" in inspect.signature(own).parameters:
            m.reset_parameters(generator=generator)  # type: ignore[operator]
        elif own in _TORCH_AFFINE:
            affine_init(m, generator)
        elif isinstance(m, nn.Embedding) and own is nn.Embedding.reset_parameters:
            nn.init.normal_(m.weight, generator=generator)
            m._fill_padding_idx_with_zero()
        elif own in _TORCH_CONSTANT:
            m.reset_parameters()  # type: ignore[operator]
        else:
            raise TypeError(
                f"{type(m).__name__} has parameters but no reset_parameters(generator=...): "
                "its parameters cannot be drawn from a generator"
            )
    return module


def affine_init(m: nn.Module, generator: torch.Generator) -> None:
    """torch's ``Linear``/``Conv`` initialization of ``m`` (Kaiming-uniform weight with
    ``a = sqrt(5)``, bias ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``), drawn from ``generator``.

    Example:
        >>> a, b = nn.Linear(3, 2), nn.Linear(3, 2)
        >>> affine_init(a, torch.Generator().manual_seed(1))
        >>> affine_init(b, torch.Generator().manual_seed(1))
        >>> torch.equal(a.weight, b.weight), torch.equal(a.bias, b.bias)
        (True, True)
    """
    weight, bias = m.weight, m.bias
    assert isinstance(weight, torch.Tensor)
    nn.init.kaiming_uniform_(weight, a=math.sqrt(5), generator=generator)
    if isinstance(bias, torch.Tensor):
        fan_in, _ = nn.init._calculate_fan_in_and_fan_out(weight)
        bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0.0
        nn.init.uniform_(bias, -bound, bound, generator=generator)
