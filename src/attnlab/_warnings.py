"""Holding a block's warnings back and passing them on after it, changed or dropped.

:func:`passed_on` is the one ``catch_warnings(record=True)`` block that ``attnlab ask``
(one truncation warning instead of three) and ``attnlab embed`` (``TEXT 2`` instead of the
encoder's ``texts[1]``) had each written; :func:`warn_again` re-issues one from its own
module, so that filters by module still match.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager

__all__ = ["passed_on", "warn_again"]


@contextmanager
def passed_on(handle: Callable[[list[warnings.WarningMessage]], None]) -> Iterator[None]:
    """Record every warning of the block and hand them to ``handle`` after it, also when
    it raises.

    Example:
        >>> with passed_on(lambda caught: print([str(w.message) for w in caught])):
        ...     warnings.warn("held")
        ['held']
    """
    caught: list[warnings.WarningMessage] = []
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield
    finally:
        handle(caught)


def warn_again(w: warnings.WarningMessage, message: Warning | str | None = None) -> None:
    """Warn ``w`` (or ``message`` in its place) again, from the module that first warned."""
    module = next(
        (n for n, m in list(sys.modules.items()) if getattr(m, "__file__", None) == w.filename),
        None,
    )
    text = w.message if message is None else message
    warnings.warn_explicit(text, w.category, w.filename, w.lineno, module=module)
