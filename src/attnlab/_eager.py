"""attnlab under torch's transforms: what ``torch.compile`` leaves to run as written, and
whether ``torch.func.vmap`` is running the caller.

attnlab plans each attention call in Python from the values of its mask (row spans, the
tiles to skip, plans cached by the mask object). Traced by dynamo, that planning broke
the graph at each read and, on the blocked engine, failed in inductor or indexed out of
bounds; run as written, the call is one graph break and exactly the uncompiled call.
Under vmap a tensor has one value per vmapped item and none can be read (``bool()``
raises), so the engines read none there (:func:`vmapping`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ParamSpec, TypeVar, cast

import torch
from torch._C._functorch import TransformType, get_interpreter_stack

__all__ = ["PLANS", "as_written", "vmapping"]

#: why attnlab's attention calls run as written
PLANS = "attnlab plans each call from its mask's values in Python"

_P = ParamSpec("_P")
_R = TypeVar("_R")


def as_written(reason: str) -> Callable[[Callable[_P, _R]], Callable[_P, _R]]:
    """A decorator: ``torch.compiler.disable`` with ``reason``, keeping the signature's
    types (torch's own decorator is untyped).

    Example:
        >>> @as_written("reads its argument's values")
        ... def first(x: torch.Tensor) -> int:
        ...     return int(x[0])
        >>> torch.compile(lambda x: first(x) + 1)(torch.tensor([41]))
        42
    """

    def decorate(fn: Callable[_P, _R]) -> Callable[_P, _R]:
        return cast(Callable[_P, _R], torch.compiler.disable(fn, reason=reason))

    return decorate


def vmapping() -> bool:
    """Whether ``torch.func.vmap`` (also inside ``jacrev``) runs the caller:
    then no tensor value can be read, and whatever an engine would decide from one it
    must decide without it.

    Example:
        >>> vmapping(), bool(torch.func.vmap(lambda x: torch.tensor(vmapping()))(torch.ones(2))[0])
        (False, True)
    """
    stack = get_interpreter_stack()
    return bool(stack) and any(i.key() == TransformType.Vmap for i in stack)


def differentiating_twice() -> bool:
    """Whether two ``torch.func`` differentiation levels run the caller (``grad`` of
    ``grad``, a Hessian, MAML's outer step): a backward that is not differentiable itself
    must refuse, since torch.func differentiates it silently as a constant.

    Example:
        >>> differentiating_twice()
        False
    """
    stack = get_interpreter_stack() or []
    return sum(i.key() in (TransformType.Grad, TransformType.Jvp) for i in stack) > 1
