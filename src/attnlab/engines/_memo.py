"""The engines' memo of what they built for the last mask object (private).

A model's layers call attention with one mask object per forward or decoding step
(``attnlab.nn`` stacks share one combined mask, the transformers backend hands one mask
to every layer), so each engine keeps what it made from the last mask: the flex
engine's block mask, the blocked engine's plan and decoding row bounds, the sdpa
engine's dense mask. :class:`LastMask` is that memo, once for all four.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Generic, TypeVar

from attnlab.engines._versions import versions
from attnlab.masks import Mask

__all__ = ["LastMask"]

V = TypeVar("V")


class LastMask(Generic[V]):
    """What ``build()`` made for the last mask object, kept while the next call passes the
    same object, the same ``key`` (the call's sizes and whatever else the value depends
    on) and the same versions of the tensors the mask holds (an in-place change of one,
    or a new mask object, builds again).

    The versions in the kept key are read after ``build()``: a build may make tensors the
    mask keeps (a mask drawing or caching a table for the length), and a key read before
    it never matched again, so the next call built once more.

    The mask is held by a weak reference, so no mask is kept alive; ``strong=True`` holds
    it (a caller whose value is useless once the mask is gone and whose masks live only
    through one forward says why). ``keep(value)`` False: that value is returned but not
    kept (a size cap). A caller skips the memo itself where it must not keep anything
    (while compiling, on the meta device). Thread-safe: the kept entry is read once and
    replaced whole, so a thread never pairs one call's key with another's value.

    Example:
        >>> from attnlab import masks
        >>> memo, built, m = LastMask[int](), [], masks.causal()
        >>> def build() -> int:
        ...     built.append(1)
        ...     return len(built)
        >>> memo.get(m, (4, 4), build), memo.get(m, (4, 4), build), memo.get(m, (4, 8), build)
        (1, 1, 2)
    """

    def __init__(self, *, strong: bool = False, keep: Callable[[V], bool] | None = None) -> None:
        """Empty; ``strong``: hold the mask (weakly by default); ``keep``: which values to
        keep (all by default)."""
        self._strong = strong
        self._keep = keep
        # (the mask where held strongly, its weak reference, key, value)
        self._last: tuple[Mask | None, weakref.ref[Mask], tuple, V] | None = None

    def get(self, mask: Mask, key: tuple, build: Callable[[], V]) -> V:
        """``build()``, made again only when ``mask`` is a new object, ``key`` differs or
        a tensor ``mask`` holds changed."""
        last = self._last  # read once: another thread may replace it meanwhile
        if last is not None and last[1]() is mask and last[2] == (*key, versions(mask)):
            return last[3]
        value = build()
        if self._keep is None or self._keep(value):
            held = mask if self._strong else None  # versions read after the build:
            self._last = (held, weakref.ref(mask), (*key, versions(mask)), value)
        return value
