"""Sentence splitting for :mod:`attnlab.apps`: pysbd, one segmenter per thread, with the
characters pysbd keeps for itself passed through."""

from __future__ import annotations

import contextlib
import re
import threading
import warnings
from collections.abc import Iterator
from types import ModuleType
from typing import Any

__all__ = ["split_sentences"]

_LOCAL = threading.local()


def _segmenter() -> Any:
    """This thread's pysbd segmenter: one ``segment`` call keeps its text on the object
    and matches sentences against it, so two threads sharing one lost sentences (235 of
    600 calls of four threads returned none)."""
    seg = getattr(_LOCAL, "segmenter", None)
    if seg is None:
        seg = _LOCAL.segmenter = _pysbd().Segmenter(language="en", clean=False)
    return seg


_IMPORT = threading.Lock()
_MODULE: list[ModuleType] = []  # pysbd, once imported
# pysbd's own files (its regexes' "invalid escape sequence": shown when no .pyc is written,
# a command printed three warning lines first)
_PYSBD_FILES = re.compile(r".*[\\/]pysbd[\\/]")


def _pysbd() -> ModuleType:
    """pysbd, imported once under a lock, its own files' compile warnings hidden: two
    filters for them go in front of the process's for the import, and exactly those two
    come out after. (A ``warnings.catch_warnings`` block in each thread's first call
    restored the process's whole filter list and ``showwarning`` as it had found them, so
    two threads at once left ``ignore (SyntaxWarning, DeprecationWarning)`` first among
    the process's filters.)"""
    with _IMPORT:
        if not _MODULE:
            with _hidden(SyntaxWarning, DeprecationWarning, module=_PYSBD_FILES):
                try:
                    import pysbd
                except ImportError as e:  # pragma: no cover - depends on the environment
                    raise ModuleNotFoundError(
                        "attnlab.apps splits sentences with pysbd: pip install 'attnlab[apps]'"
                    ) from e
            _MODULE.append(pysbd)
    return _MODULE[0]


@contextlib.contextmanager
def _hidden(*categories: type[Warning], module: re.Pattern[str]) -> Iterator[None]:
    """An ignore filter per category, for the warnings of files ``module`` matches, in
    front of the process's filters during the block; only they are taken out after."""
    filters: list[Any] = warnings.filters  # type: ignore[assignment]
    mine = [("ignore", None, c, module, 0) for c in categories]
    filters[:0] = mine
    try:
        yield
    finally:
        for entry in mine:
            with contextlib.suppress(ValueError):  # (someone reset the filters meanwhile)
                filters.remove(entry)


# characters pysbd uses as its own placeholders: a sentence holding one was dropped or cut
# ("The sonata is in B♭ major." never reached the index); they pass as private-use ones
_PYSBD_OWN = "∯∮♨☝♭♬☉☈☇☄ȸȹ⌬⎋☏♝♟✂"
_HIDE = {ord(c): 0xF0000 + i for i, c in enumerate(_PYSBD_OWN)}
_SHOW = {v: k for k, v in _HIDE.items()}


def split_sentences(text: str) -> list[str]:
    """The sentences of one paragraph of prose (whitespace collapsed), by pysbd.

    Example:
        >>> split_sentences("Call str.format(), i.e. the method. It returns 3.5 too.")
        ['Call str.format(), i.e. the method.', 'It returns 3.5 too.']
        >>> split_sentences("The sonata is in B♭ major. It is short.")
        ['The sonata is in B♭ major.', 'It is short.']
    """
    flat = " ".join(text.split()).translate(_HIDE)
    parts = (
        s.translate(_SHOW).strip().strip("\u200b\ufeff").strip() for s in _segmenter().segment(flat)
    )
    return [s for s in parts if s] if flat else []
