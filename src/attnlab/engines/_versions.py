"""What a cached plan depends on: the tensors a mask holds, with their versions.

The blocked and flex engines memoize a mask's plan for the last mask object; its key
holds :func:`versions`, which changes when any of those tensors is replaced or changed in
place (a custom mask's function counts the tensors it closes over, its default
arguments, module-level tensors it names, and, for a ``functools.partial``, a bound
method or a callable object, the arguments or the object's attributes). Containers of
more than :data:`WIDE` entries are not searched (each call pays for the search).
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Sized
from types import CodeType, FunctionType, MethodType, ModuleType
from typing import Any

import torch
from torch import Tensor

from attnlab.masks import Mask

__all__ = ["held_code", "held_tensors", "raw_bytes", "tensor_versions", "versions"]


def _version_of(t: Tensor) -> object:
    """``t``'s version counter; an inference tensor (made under ``torch.inference_mode``)
    has none, so its contents stand for it where that is cheap (small, on the CPU), and
    otherwise a new object, which matches nothing: the caller recomputes."""
    if not t.is_inference():
        return t._version
    if t.device.type == "cpu" and t.numel() <= 1 << 16:
        return (t.dtype, tuple(t.shape), raw_bytes(t))
    return object()


def raw_bytes(t: Tensor) -> bytes:
    """The bytes of a CPU tensor's values, in order.

    Example:
        >>> raw_bytes(torch.tensor([1, 2], dtype=torch.uint8))
        b'\\x01\\x02'
    """
    return t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def versions(obj: object, depth: int = 0) -> tuple:
    """The tensors held by a mask (through its attributes, nested masks and sequences) as
    ``(data pointer, version)`` pairs: they change when a tensor is replaced or changed in
    place.

    Example:
        >>> from attnlab import masks
        >>> lengths = torch.tensor([3, 2])
        >>> m = masks.causal() & masks.padding(lengths)
        >>> before = versions(m)
        >>> _ = lengths.add_(0)
        >>> versions(m) != before
        True
    """
    return tensor_versions(held_tensors(obj))


def tensor_versions(tensors: Iterable[Tensor]) -> tuple:
    """``(data pointer, version)`` of each of ``tensors``, as :func:`versions` keys a
    mask's (an inference tensor, which keeps no version, by its values where small).

    Example:
        >>> t = torch.zeros(2)
        >>> before = tensor_versions([t])
        >>> _ = t.add_(1)
        >>> tensor_versions([t]) != before
        True
    """
    return tuple((t.data_ptr(), _version_of(t)) for t in tensors)


def held_tensors(obj: object, depth: int = 0) -> tuple[Tensor, ...]:
    """The tensors a mask (or a bias, or a custom mask's function) holds, as
    :func:`versions` finds them.

    Example:
        >>> from attnlab import masks
        >>> [t.tolist() for t in held_tensors(masks.causal() & masks.padding([3, 2]))]
        [[3, 2]]
    """
    if isinstance(obj, Tensor):
        return (obj,)
    if depth > 4:
        return ()
    parts = _parts(obj)
    if isinstance(parts, Sized) and len(parts) > WIDE:  # (a vocabulary passed as a default
        return ()  # argument: walking its entries on every call took 50 ms)
    found: list[Tensor] = []  # (a loop, not nested generators: a memo hit walks it per call)
    for x in parts:
        if isinstance(x, Tensor):
            found.append(x)
        elif x is not None and _followed(x):
            found += held_tensors(x, depth + 1)
    return tuple(found)


WIDE = 64  # containers with more entries are not searched for tensors

_SCALARS = (bool, int, float, complex, str, bytes, type(None))
# their classes are attnlab's or torch's (a bias module's repr names it): walked, not read
_NOT_OWN_CODE = (Mask, MethodType, functools.partial, torch.nn.Module)


def held_code(obj: object, depth: int = 0) -> tuple[str, ...]:
    """What a mask's (or bias's) functions compute beyond the tensors they read: each
    function's code (bytecode, constants and names; not its file or lines) and the plain
    numbers and strings it closes over, takes as defaults or names at module level; for
    a callable object, its class's ``__call__`` and such attributes. Found where
    :func:`held_tensors` looks.

    Example:
        >>> from attnlab import masks
        >>> a = masks.custom(lambda b, h, q, k: (q - k) % 2 == 0)
        >>> b = masks.custom(lambda b, h, q, k: (q - k) % 3 == 0)
        >>> held_code(a) != held_code(b), held_code(masks.causal())
        (True, ())
    """
    if isinstance(obj, Tensor) or depth > 4:
        return ()
    own: tuple[str, ...] = ()
    if isinstance(obj, FunctionType):
        values = [*_function_parts(obj), *(obj.__globals__.get(n) for n in obj.__code__.co_names)]
        own = (_code_text(obj.__code__), *(repr(x) for x in values if isinstance(x, _SCALARS)))
    elif callable(obj) and not isinstance(obj, _NOT_OWN_CODE):  # a callable object
        call = next((vars(c)["__call__"] for c in type(obj).__mro__ if "__call__" in vars(c)), None)
        own = (_code_text(call.__code__),) if isinstance(call, FunctionType) else ()
        attrs = getattr(obj, "__dict__", {}).items()
        own += tuple(f"{k}={v!r}" for k, v in attrs if isinstance(v, _SCALARS))
    parts = _parts(obj)
    if isinstance(parts, Sized) and len(parts) > WIDE:
        return own
    return own + tuple(c for x in parts if _followed(x) for c in held_code(x, depth + 1))


def _code_text(code: CodeType) -> str:
    """``code``'s bytecode, constants (nested code too) and names, as text."""
    consts = [_code_text(c) if isinstance(c, CodeType) else repr(c) for c in code.co_consts]
    return f"{code.co_code.hex()}|{'|'.join(consts)}|{code.co_names}"


def _parts(obj: object) -> Iterable[Any]:
    """What ``obj`` holds that a mask's values may come from."""
    if isinstance(obj, Mask):  # (first: what a memo walks on every call)
        own = getattr(obj, "__dict__", {}).values()
        if isinstance(obj, (tuple, list, dict)):  # a mask that is a container too
            return [*(obj.values() if isinstance(obj, dict) else obj), *own]
        return own
    if isinstance(obj, FunctionType):  # a custom mask's function: the tensors it reads
        return _function_parts(obj)
    if isinstance(obj, functools.partial):
        return [obj.func, *obj.args, *obj.keywords.values()]
    if isinstance(obj, MethodType):  # a bound method: its function and its object
        return [obj.__func__, obj.__self__]
    if isinstance(obj, (tuple, list)):
        return obj
    if isinstance(obj, dict):
        return obj.values()
    return getattr(obj, "__dict__", {}).values()  # a mask, or a callable object


def _function_parts(fn: FunctionType) -> list[Any]:
    """The values ``fn`` closes over, its default arguments, and the module-level tensors
    it names, directly or as an attribute of a module it names (``mod.lengths``)."""
    items: list[Any] = [c.cell_contents for c in fn.__closure__ or () if _filled(c)]
    items += [*(fn.__defaults__ or ()), *(fn.__kwdefaults__ or {}).values()]
    names = fn.__code__.co_names
    for name in names:
        found = fn.__globals__.get(name)
        if isinstance(found, Tensor):
            items.append(found)
        elif isinstance(found, ModuleType):
            attrs = (getattr(found, a, None) for a in names)
            items += [t for t in attrs if isinstance(t, Tensor)]
    return items


_HOLDERS = (Tensor, Mask, tuple, list, dict, FunctionType, MethodType, functools.partial)


def _followed(x: object) -> bool:
    """Whether :func:`versions` looks inside ``x``: tensors, masks, containers, functions,
    and callable objects (a custom mask's function may be one), but not classes."""
    if isinstance(x, _HOLDERS):
        return True
    return callable(x) and hasattr(x, "__dict__") and not isinstance(x, (type, ModuleType))


def _filled(cell: Any) -> bool:
    """Whether a closure cell holds a value (an empty one raises ValueError when read)."""
    try:
        cell.cell_contents  # noqa: B018
    except ValueError:
        return False
    return True
