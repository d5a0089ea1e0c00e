"""The checks and bookkeeping of :func:`~attnlab.engines.register_engine`.

:func:`registered` checks an engine and its ``auto_rank`` and works out the new orders of
``auto`` without changing anything, so a refused registration leaves the registry as it
was (a bad ``auto_rank`` had already taken the engine out of ``auto``'s order, and an
engine without ``passes_plain`` stayed registered and broke every later plain call).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from attnlab._validate import nonnegative_int

if TYPE_CHECKING:
    from attnlab.engines.base import Engine

__all__ = ["registered"]


def registered(
    engine: object, auto_rank: object, registry: Mapping[str, Engine], orders: tuple[list[str], ...]
) -> tuple[list[str], list[str], list[Engine]]:
    """``auto``'s exact and approximate orders (``orders``, unchanged) with ``engine`` at
    ``auto_rank`` (None: in neither; past the end: last), and the engines a plain call asks
    in that order; a TypeError/ValueError naming what is wrong before anything changes."""
    _check_engine(engine)
    rank = None if auto_rank is None else nonnegative_int("auto_rank", auto_rank)
    name = engine.name  # type: ignore[attr-defined]  # checked: an Engine
    exact, approx = ([n for n in order if n != name] for order in orders)
    if rank is not None:
        (exact if engine.exact else approx).insert(rank, name)  # type: ignore[attr-defined]
    every = {**registry, name: engine}
    plain: list[Engine] = []
    for n in exact:  # up to the first engine that answers every plain call it gets
        plain.append(every[n])  # type: ignore[arg-type]
        if not every[n].passes_plain:  # type: ignore[attr-defined]
            break
    return exact, approx, plain


def _check_engine(engine: object) -> None:
    """A TypeError/ValueError unless ``engine`` is an :class:`Engine` with a name of its
    own, a bool ``exact`` and ``passes_plain``, and its own ``unsupported`` and
    ``forward``."""
    from attnlab.engines.base import Engine  # here: base imports this module

    if not isinstance(engine, Engine):
        raise TypeError(
            "engine must be an instance of an attnlab.engines.Engine subclass, got "
            f"{engine!r} ({type(engine).__name__})"
        )
    name = engine.name
    if not isinstance(name, str):
        raise TypeError(f"engine.name must be a str, got {name!r} ({type(name).__name__})")
    if name in ("", "auto"):
        raise ValueError(
            f"engine.name must be a name of its own, got {name!r} ('auto' is the choice "
            "attention(engine='auto') makes per call among the registered engines)"
        )
    for flag in ("exact", "passes_plain"):
        if not isinstance(getattr(engine, flag), bool):
            raise TypeError(f"engine.{flag} must be a bool, got {getattr(engine, flag)!r}")
    missing = [
        m for m in ("unsupported", "forward") if getattr(type(engine), m) is getattr(Engine, m)
    ]
    if missing:
        raise TypeError(f"engine {name!r} must implement {' and '.join(missing)}")
