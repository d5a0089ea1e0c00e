"""Scalar arguments: numbers and flags checked, and numpy's scalars taken as Python's.

Each checker returns the plain ``int``, ``float`` or ``bool`` it accepted (numpy's scalars
included), so a config that stores what it returns stays JSON-able; :func:`plain_fields`
does so for a dataclass's fields. Errors name the argument, what was seen and what was
expected. (``attnlab._validate`` re-exports the checkers.)
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Callable, Iterable
from typing import cast

import torch


def plain(value: object) -> object:
    """``value`` as Python's ``bool``, ``int`` or ``float`` where it is numpy's scalar of
    that kind (``json`` refuses ``np.int64``, ``np.float32`` and ``np.bool_``; torch's
    ``nn.GRU`` refuses ``np.int64``); ``value`` itself otherwise.

    Example:
        >>> import numpy as np
        >>> [type(plain(v)).__name__ for v in (np.int64(2), np.float32(0.5), np.bool_(1))]
        ['int', 'float', 'bool']
    """
    kind = type(value)
    if kind.__module__ != "numpy":
        return value
    if kind.__name__ in ("bool", "bool_"):
        return bool(value)
    if isinstance(value, numbers.Integral):
        return int(value)
    return float(value) if isinstance(value, numbers.Real) else value


def plain_fields(obj: object) -> None:
    """Replace each numpy scalar among dataclass ``obj``'s fields by Python's (frozen ones
    too): a config built from numpy values saves as JSON and builds torch modules.

    Example:
        >>> import numpy as np
        >>> @dataclasses.dataclass(frozen=True)
        ... class C:
        ...     n: int
        >>> c = C(np.int64(3)); plain_fields(c); type(c.n).__name__
        'int'
    """
    for field in dataclasses.fields(obj):  # type: ignore[arg-type]
        value = getattr(obj, field.name)
        if type(value).__module__ == "numpy":
            object.__setattr__(obj, field.name, plain(value))


def positive_int(name: str, value: object) -> int:
    """``value`` as an int, or a TypeError/ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be a positive int, got {value!r} ({type(value).__name__})")
    if value < 1:
        raise ValueError(f"{name} must be a positive int, got {value}")
    return int(value)


def positive_real(name: str, value: object) -> float:
    """``value`` as a finite float > 0, or a TypeError/ValueError naming ``name``.

    Example:
        >>> positive_real("lr_g", 1e-4), positive_real("sigma", 1)
        (0.0001, 1.0)
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    if not 0 < float(value) < math.inf:
        raise ValueError(f"{name} must be a finite number > 0, got {value}")
    return float(value)


def real_where(name: str, value: object, ok: Callable[[float], bool], expected: str) -> float:
    """``value`` as a float for which ``ok`` holds (NaN fails every comparison), or a
    TypeError/ValueError naming ``name``, what was seen and ``expected``.

    Example:
        >>> real_where("damping", 0.85, lambda d: 0 < d < 1, "a number in (0, 1)")
        0.85
        >>> real_where("damping", "0.5", lambda d: 0 < d < 1, "a number in (0, 1)")
        Traceback (most recent call last):
        ...
        TypeError: damping must be a number in (0, 1), got str '0.5'
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be {expected}, got {type(value).__name__} {value!r}")
    if not ok(float(value)):
        raise ValueError(f"{name} must be {expected}, got {value}")
    return float(value)


def nonnegative_int(name: str, value: object) -> int:
    """``value`` as an int >= 0, or a TypeError/ValueError naming ``name``; a symbolic
    size (``torch.export`` with a dynamic dimension) passes as it is."""
    if isinstance(value, torch.SymInt):
        return cast(int, value)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int >= 0, got {value!r} ({type(value).__name__})")
    if value < 0:
        raise ValueError(f"{name} must be an int >= 0, got {value}")
    return int(value)


def validate_scale(scale: object) -> float | None:
    """``None`` or a finite real number."""
    if scale is None:
        return None
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):  # (numpy's too)
        raise TypeError(f"scale must be a finite float or None, got {type(scale).__name__}")
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")
    return float(scale)


def validate_softcap(softcap: object) -> float | None:
    """``None`` or a positive finite float (logit soft-capping)."""
    if softcap is None:
        return None
    if isinstance(softcap, bool) or not isinstance(softcap, numbers.Real):  # (numpy's too)
        raise TypeError(f"softcap must be a positive float or None, got {type(softcap).__name__}")
    cap = float(softcap)
    if not (math.isfinite(cap) and cap > 0):
        raise ValueError(f"softcap must be a positive finite float or None, got {softcap}")
    return cap


def validate_dropout(p: object, name: str = "dropout_p") -> float:
    """A probability in ``[0, 1)`` (numpy's float32 too, as float64), or an error naming
    ``name`` (NaN fails the comparison)."""
    if type(p) is float and 0.0 <= p < 1.0:  # the common case first: runs per attention call
        return p
    if isinstance(p, bool) or not isinstance(p, numbers.Real):
        raise TypeError(f"{name} must be a float in [0, 1), got {type(p).__name__}")
    if not 0.0 <= float(p) < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {p}")
    return float(p)


def validate_flag(name: str, value: object) -> bool:
    """A real ``bool`` or numpy's (not a tensor or an int).

    Example:
        >>> import numpy as np
        >>> validate_flag("residual", np.bool_(False))
        False
    """
    if value is True or value is False:  # the common case first: runs per attention call
        return value is True
    kind = type(value)
    if kind.__module__ == "numpy" and kind.__name__ in ("bool", "bool_"):
        return bool(value)  # (refused as "must be a bool, got bool")
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {kind.__name__}")
    return value


def choice(name: str, value: object, choices: Iterable[str]) -> str:
    """``value`` if it is one of the names ``choices``; a TypeError naming ``name`` for
    what is not a str (a list raised "unhashable type" from a dict), a ValueError else.

    Example:
        >>> choice("activation", "Tanh", ("Tanh", "ReLU"))
        'Tanh'
    """
    known = tuple(choices)
    if not isinstance(value, str):
        raise TypeError(f"{name} must be one of {known}, got {type(value).__name__} {value!r}")
    if value not in known:
        raise ValueError(f"{name}={value!r} is not one of {known}")
    return value
