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

import functools
from collections.abc import Callable, Sequence
from typing import Any, ParamSpec, TypeVar, cast

import torch
from torch._C._functorch import (
    CGradInterpreterPtr,
    TransformType,
    get_interpreter_stack,
    get_unwrapped,
    is_functorch_wrapped_tensor,
)
from torch.autograd.function import once_differentiable

__all__ = ["PLANS", "as_written", "differentiated_again", "first_order_only", "vmapping"]

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


def differentiated_again(saved: Sequence[torch.Tensor]) -> bool:
    """Whether the gradients a backward is about to return will be differentiated again
    (call it before ``once_differentiable`` turns grad mode off): autograd's
    ``create_graph=True`` (grad mode on in a backward that no ``torch.func`` transform
    runs), two ``torch.func`` differentiation levels (``grad`` of ``grad``, a Hessian), or
    one ``torch.func.grad`` level whose caller records for plain autograd on ``saved``
    tensors that want grad there (MAML: an inner ``grad`` step, an outer ``.backward()``).

    Example:
        >>> with torch.no_grad():  # as in a plain backward
        ...     differentiated_again([torch.ones(2, requires_grad=True)])
        False
    """
    stack = get_interpreter_stack() or []
    if not stack:
        return torch.is_grad_enabled()
    levels = [i for i in stack if i.key() in (TransformType.Grad, TransformType.Jvp)]
    if len(levels) > 1:
        return True
    if not levels or levels[0].key() != TransformType.Grad:
        return False
    return bool(CGradInterpreterPtr(levels[0]).prevGradMode()) and any(
        _unwrapped(t).requires_grad for t in saved
    )


def _unwrapped(t: torch.Tensor) -> torch.Tensor:
    """The plain tensor under ``torch.func``'s wrappers."""
    while is_functorch_wrapped_tensor(t):
        t = get_unwrapped(t)
    return t


def first_order_only(what: str, instead: str) -> Callable[[Callable[..., _R]], Callable[..., _R]]:
    """A decorator for an autograd Function's ``backward`` (static or class method) that
    is ``once_differentiable`` and raises, naming ``what`` and ``instead``, when its
    gradients would be differentiated again (:func:`differentiated_again`): neither
    ``once_differentiable`` nor ``torch.func`` sees that the gradients depend on the
    saved inputs, so a second-order gradient came out silently wrong (1970 off where the
    reference's largest entry is 1993).

    Example:
        >>> class Cube(torch.autograd.Function):
        ...     @staticmethod
        ...     def forward(ctx, x):
        ...         ctx.save_for_backward(x)
        ...         return x**3
        ...     @staticmethod
        ...     @first_order_only("Cube", "x**3")
        ...     def backward(ctx, g):
        ...         return 3 * ctx.saved_tensors[0] ** 2 * g
        >>> x = torch.tensor(2.0, requires_grad=True)
        >>> torch.autograd.grad(Cube.apply(x), x)[0].item()
        12.0
        >>> try:
        ...     torch.autograd.grad(Cube.apply(x), x, create_graph=True)
        ... except RuntimeError as e:
        ...     print(str(e).split(" (")[0])
        a second-order gradient
    """

    def decorate(fn: Callable[..., _R]) -> Callable[..., _R]:
        inner = once_differentiable(fn)

        @functools.wraps(fn)
        def backward(*args: Any) -> _R:
            ctx = args[1] if isinstance(args[0], type) else args[0]  # (cls,) ctx, *grads
            if differentiated_again(ctx.saved_tensors):
                raise RuntimeError(
                    "a second-order gradient (create_graph=True, grad of grad, a Hessian, "
                    f"MAML's outer step) through {what}: its backward is not "
                    f"differentiable; {instead}"
                )
            return inner(*args)

        return backward

    return decorate
