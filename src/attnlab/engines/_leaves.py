"""A bias's learnable tensors, and the bias holding again those a forward saw.

``torch.func.functional_call(model, params, ...)`` swaps ``params`` into the modules for
one call and puts the modules' own tensors back after it. A backward that runs later (the
first-order MAML pattern: ``functional_call(...).backward()``) and recomputes a bias tile
from the module would read the module's own tensors, which the saved graph never saw: no
gradient for ``params`` and probabilities of the wrong bias.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from attnlab.bias.function import CustomBias
from attnlab.engines._versions import held_tensors

__all__ = ["HIDES_GRAD", "bias_leaves", "hides_grad", "holding"]

# what :func:`hides_grad` finds, said by those that refuse it (then: who reaches what)
HIDES_GRAD = (
    "the bias's function reads a tensor that requires grad but is not one of the bias's "
    "parameters or buffers (a closure's or a default's)"
)


def _slots(bias: nn.Module) -> list[tuple[nn.Module, str, str, Tensor]]:
    """``(owner, "_parameters" or "_buffers", name, tensor)`` of each tensor of ``bias``
    that autograd should reach, parameters first (the order of :func:`bias_leaves`)."""
    found = []
    for kind, named in (("_parameters", bias.named_parameters), ("_buffers", bias.named_buffers)):
        for path, t in named():
            if t is not None and t.requires_grad:
                owner_path, _, name = path.rpartition(".")
                found.append((bias.get_submodule(owner_path), kind, name, t))
    return found


def bias_leaves(bias: nn.Module | None) -> list[Tensor]:
    """The tensors of ``bias`` that autograd should reach (parameters and grad buffers).

    Example:
        >>> from attnlab import bias
        >>> [tuple(t.shape) for t in bias_leaves(bias.relative_buckets(4))]
        [(32, 4)]
    """
    return [] if bias is None else [slot[3] for slot in _slots(bias)]


def hides_grad(bias: nn.Module | None) -> bool:
    """Whether ``bias``'s function reads a tensor that requires grad outside the bias's
    parameters and buffers (a closure's or a default's), with grad enabled: a backward that
    reaches only :func:`bias_leaves` would lose its gradient without a word.

    Example:
        >>> from attnlab import bias
        >>> w = torch.ones(2, requires_grad=True)
        >>> hides_grad(bias.custom(lambda h, q, k: w[h] * (k - q))), hides_grad(None)
        (True, False)
    """
    if bias is None or not torch.is_grad_enabled():
        return False
    fns = [m.fn for m in bias.modules() if isinstance(m, CustomBias)]  # (attnlab's own
    if not fns:  # biases keep their tensors as parameters and buffers)
        return False
    leaves = {id(t) for t in bias_leaves(bias)}
    return any(t.requires_grad and id(t) not in leaves for t in held_tensors(fns))


@contextmanager
def holding(bias: nn.Module | None, leaves: list[Tensor]) -> Iterator[None]:
    """Inside the block ``bias`` holds ``leaves`` (its :func:`bias_leaves` at the forward)
    where it holds other tensors now, and its own again after.

    Example:
        >>> import torch
        >>> from attnlab import bias
        >>> t5 = bias.relative_buckets(2)
        >>> saved = [torch.zeros(32, 2, requires_grad=True)]
        >>> with holding(t5, saved):
        ...     t5.table is saved[0]
        True
        >>> t5.table is saved[0]
        False
    """
    slots = [] if bias is None else _slots(bias)
    same = len(slots) == len(leaves)
    swap = same and any(s[3] is not t for s, t in zip(slots, leaves, strict=True))
    if swap:
        for (owner, kind, name, _), t in zip(slots, leaves, strict=True):
            getattr(owner, kind)[name] = t
    try:
        yield
    finally:
        if swap:
            for owner, kind, name, own in slots:
                getattr(owner, kind)[name] = own
