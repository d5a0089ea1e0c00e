"""Overlays that transformers' model files define for themselves, as attnlab masks.

:mod:`~attnlab.integrations.hf_masks` reads the pieces of ``transformers.masking_utils``
by name; a model's own overlay has no such stable name (Gemma 4's and T5Gemma 2's
``sliding_window_mask_function`` differ), so one is read only when its code is, op for op,
the code of a copy kept here (:data:`OVERLAYS`), the globals it reads are the same objects,
and its closure holds plain ints (or Unlimited OCR's ``inf``). Anything else stays
transformers' function, evaluated tile by tile. The overlays compare absolute query and key
indices by their difference alone, so their windows hold in attnlab's bottom-right aligned
positions too.
"""

from __future__ import annotations

import builtins
import inspect
import math
from collections.abc import Callable
from types import CodeType

import torch

from attnlab.masks import Mask, chunk_window, window
from attnlab.masks.intervals import Causal, Window

__all__ = ["OVERLAYS", "model_overlay", "without_covered"]

Found = tuple[bool, Mask | None]  # (recognized, its mask; None: every pair attends)
_NO: Found = (False, None)


# -- copies of the overlays of transformers' model files (transformers 5.25) --------------
# fmt: off
def _bidirectional_window_overlay(sliding_window):  # type: ignore[no-untyped-def]
    def inner_mask(batch_idx, head_idx, q_idx, kv_idx):  # type: ignore[no-untyped-def]
        return abs(q_idx - kv_idx) < sliding_window
    return inner_mask


def _sliding_window_mask_function(sliding_window):  # type: ignore[no-untyped-def]
    def inner_mask(batch_idx, head_idx, q_idx, kv_idx):  # type: ignore[no-untyped-def]
        left_window_size, right_window_size = sliding_window

        dist = q_idx - kv_idx
        left_mask = (dist >= 0) & (dist < left_window_size)
        right_mask = (dist < 0) & (-dist < right_window_size)
        return left_mask | right_mask
    return inner_mask


def _t5gemma2_sliding_window_mask_function(sliding_window, is_causal=True):  # type: ignore[no-untyped-def]
    def inner_mask(batch_idx, head_idx, q_idx, kv_idx):  # type: ignore[no-untyped-def]
        if is_causal:
            left_window_size, right_window_size = sliding_window, 0
        else:
            left_window_size, right_window_size = (
                (sliding_window + 1) // 2, (sliding_window) // 2 + 1
            )

        dist = q_idx - kv_idx
        left_mask = (dist >= 0) & (dist < left_window_size)
        right_mask = (dist < 0) & (-dist < right_window_size)
        return left_mask | right_mask
    return inner_mask


def _reference_sliding_window_causal_mask(kv_offset, prefill_length):  # type: ignore[no-untyped-def]
    def prefill_overlay(batch_idx, head_idx, q_idx, kv_idx):  # type: ignore[no-untyped-def]
        # Remove kv_offset to retrieve the kv_index with respect to prefill
        return kv_idx - kv_offset < prefill_length
    return prefill_overlay


def _chunked_limited_mask_function(left_ctx, right_ctx):  # type: ignore[no-untyped-def]
    chunk_size = right_ctx + 1
    left_context_chunks = left_ctx // chunk_size if left_ctx >= 0 else 10_000

    def inner_mask(batch_idx, head_idx, q_idx, kv_idx):  # type: ignore[no-untyped-def]
        q_chunk = torch.div(q_idx, chunk_size, rounding_mode="trunc")
        kv_chunk = torch.div(kv_idx, chunk_size, rounding_mode="trunc")
        chunk_diff = q_chunk - kv_chunk
        return (chunk_diff >= 0) & (chunk_diff <= left_context_chunks)
    return inner_mask


_always = lambda *args: torch.tensor(True, dtype=torch.bool)  # noqa: E731
# fmt: on


def _count(value: object) -> int | None:
    """``value`` if it is a plain int (not a bool), else None."""
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _bidirectional(cells: dict[str, object], _: int | None = None) -> Found:
    """Gemma 3's and Step3p7's ``|q - k| < w`` (EmbeddingGemma's local layers)."""
    w = _count(cells["sliding_window"])
    return (True, window(w - 1, w - 1)) if w is not None and w >= 1 else _NO


def _reach(left: object, right: object) -> Found:
    """``0 <= q - k < left`` or ``0 < k - q < right``: ``window(left - 1, right - 1)``."""
    lo, hi = _count(left), _count(right)
    if lo is None or hi is None or lo < 1:
        return _NO  # (left < 1 leaves a query without itself: not one window)
    return True, window(lo - 1, max(hi - 1, 0))


def _two_sided(cells: dict[str, object], _: int | None = None) -> Found:
    """Gemma 4's audio and Moonshine streaming's ``(left, right)`` windows."""
    sides = cells["sliding_window"]
    if not isinstance(sides, tuple | list) or len(sides) != 2:
        return _NO
    return _reach(*sides)


def _t5gemma2(cells: dict[str, object], _: int | None = None) -> Found:
    """T5Gemma 2's window of ``w``: ``w`` keys back when causal, else about ``w / 2``
    each side."""
    w, is_causal = _count(cells["sliding_window"]), cells["is_causal"]
    if w is None or not isinstance(is_causal, bool):
        return _NO
    return _reach(w, 0) if is_causal else _reach((w + 1) // 2, w // 2 + 1)


def _prefill(cells: dict[str, object], _: int | None = None) -> Found:
    """Unlimited OCR's prefill keys, those before ``prefill_length``: while it prefills
    (the length not known yet, ``inf``) every key; a known length is not read (its decode
    calls' keys are not aligned on their queries, transformers' function runs)."""
    length = cells["prefill_length"]
    return (True, None) if isinstance(length, float) and length == math.inf else _NO


def _chunked_limited(cells: dict[str, object], kv_offset: int | None) -> Found:
    """Nemotron ASR streaming's chunks of ``chunk_size`` absolute positions, each query
    seeing its chunk and ``left_context_chunks`` before: :func:`chunk_window` from the
    first key's position ``kv_offset`` (None, positions remapped: not read)."""
    size, back = _count(cells["chunk_size"]), _count(cells["left_context_chunks"])
    if kv_offset is None or size is None or back is None or size < 1 or back < 0:
        return _NO
    return True, chunk_window(size, back, kv_offset)


Meaning = Callable[[dict[str, object], int | None], Found]
# an overlay's function name -> the copies of its code (one name, two codes: Gemma 4's
# and T5Gemma 2's windows) and what each one's closure means
OVERLAYS: dict[str, tuple[tuple[Callable[..., object], Meaning], ...]] = {
    "_bidirectional_window_overlay": ((_bidirectional_window_overlay(1), _bidirectional),),
    "sliding_window_mask_function": (
        (_sliding_window_mask_function((1, 1)), _two_sided),
        (_t5gemma2_sliding_window_mask_function(1), _t5gemma2),
    ),
    "<lambda>": ((_always, lambda cells, _: (True, None)),),  # Gemma 3's bidirectional full
    "prefill_overlay": ((_reference_sliding_window_causal_mask(0, 1), _prefill),),
    "chunked_limited_mask_function": ((_chunked_limited_mask_function(0, 0), _chunked_limited),),
}


def model_overlay(
    fn: Callable[..., object], cells: dict[str, object], kv_offset: int | None = 0
) -> Found:
    """Whether ``fn`` is one of :data:`OVERLAYS`, and its mask (None: every pair);
    ``kv_offset``: the first key's absolute position (None: positions remapped, as in a
    packed sequence, where only the windows on differences are read).

    Example:
        >>> fn = _bidirectional_window_overlay(3)
        >>> model_overlay(fn, {"sliding_window": 3})[1].spec()
        'window(left=2, right=2)'
        >>> model_overlay(lambda *args: torch.tensor(False), {})
        (False, None)
    """
    parts = str(getattr(fn, "__qualname__", "")).split(".")
    # a factory's inner function by the factory's name, a closure or a lambda by its own
    for kind in dict.fromkeys((parts[0], parts[-1])):
        for copy, meaning in OVERLAYS.get(kind, ()):
            if _same_code(fn, copy):
                return meaning(cells, kv_offset)
    return _NO


def _same_code(fn: Callable[..., object], copy: Callable[..., object]) -> bool:
    """Whether ``fn`` runs ``copy``'s code: the same ops, names, constants (its docstring
    aside) and closure variables, its globals the same objects as ``copy``'s."""
    code, want = getattr(fn, "__code__", None), getattr(copy, "__code__", None)
    if not isinstance(code, CodeType) or not isinstance(want, CodeType):
        return False
    if _code_key(code) != _code_key(want):
        return False
    return all(_global(fn, n) is _global(copy, n) for n in code.co_names)


_FLAGS = 0xFFFF & ~inspect.CO_NESTED  # (``__future__`` flags are above 0xFFFF)


_HAS_DOC = getattr(inspect, "CO_HAS_DOCSTRING", None)  # Python 3.14 on: co_consts[0] is
# the docstring only where this flag is set (before, always the docstring or None)


def _code_key(code: CodeType) -> tuple[object, ...]:
    """What a function's code does (its docstring, whether it is nested and its module's
    ``__future__`` flags aside)."""
    doc = _HAS_DOC is None or bool(code.co_flags & _HAS_DOC)
    return (code.co_code, code.co_names, code.co_freevars, code.co_varnames,
            code.co_consts[doc:], code.co_argcount, code.co_flags & _FLAGS)  # fmt: skip


def _global(fn: Callable[..., object], name: str) -> object:
    """What the global ``name`` of ``fn`` is (a builtin if its module has none)."""
    scope = getattr(fn, "__globals__", {})
    return scope[name] if name in scope else getattr(builtins, name, None)


def without_covered(masks: list[Mask]) -> list[Mask]:
    """The parts of an ``|`` less each window (or window and causal) inside another's
    window: Gemma 3's bidirectional window beside its causal one is the wider alone.

    Example:
        >>> from attnlab.masks import causal
        >>> [m.spec() for m in without_covered([window(2, 0) & causal(), window(2, 2)])]
        ['window(left=2, right=2)']
    """
    spans = [_band(m) for m in masks]
    kept = []
    for i, (m, s) in enumerate(zip(masks, spans, strict=True)):
        covered = s is not None and any(
            t is not None and (t != s or j < i) and t[0] >= s[0] and t[1] >= s[1]
            for j, t in enumerate(spans)
            if j != i
        )
        if not covered:
            kept.append(m)
    return kept


def _band(mask: Mask) -> tuple[float, float] | None:
    """``(left, right)`` reach of a conjunction of windows and causal, else None."""
    left, right = math.inf, math.inf
    for m in mask.conjuncts:
        if isinstance(m, Window):
            left, right = min(left, m.left), min(right, m.right)
        elif isinstance(m, Causal):
            right = min(right, 0)
        else:
            return None
    return left, right
