"""Sentence splitting for :mod:`attnlab.apps`: pysbd, one segmenter per thread, with the
characters pysbd keeps for itself passed through."""

from __future__ import annotations

import threading
import warnings
from typing import Any

__all__ = ["split_sentences"]

_LOCAL = threading.local()


def _segmenter() -> Any:
    """This thread's pysbd segmenter: one ``segment`` call keeps its text on the object
    and matches sentences against it, so two threads sharing one lost sentences (235 of
    600 calls of four threads returned none)."""
    seg = getattr(_LOCAL, "segmenter", None)
    if seg is None:
        try:
            with warnings.catch_warnings():  # its regexes' "invalid escape sequence", shown
                # when no .pyc is written (a command printed three warning lines first)
                warnings.simplefilter("ignore", (SyntaxWarning, DeprecationWarning))
                import pysbd
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ModuleNotFoundError(
                "attnlab.apps splits sentences with pysbd: pip install 'attnlab[apps]'"
            ) from e
        seg = _LOCAL.segmenter = pysbd.Segmenter(language="en", clean=False)
    return seg


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
