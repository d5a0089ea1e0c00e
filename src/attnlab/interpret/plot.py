"""Pictures of attention (matplotlib, the ``viz`` extra): alignment matrices, per-head
heatmaps, layer x head grids and token saliency bars.

Files are written atomically (a temporary file renamed over the target).
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor

from attnlab._io import atomic_write

__all__ = [
    "alignment",
    "check_finite",
    "check_png_path",
    "check_tokens",
    "head_grid",
    "heatmap",
    "pyplot",
    "saliency",
    "save_figure",
]


def pyplot() -> Any:
    """matplotlib's pyplot on the Agg backend (files only), with an install hint if missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("attnlab's pictures need matplotlib: pip install 'attnlab[viz]'") from e
    return plt


def alignment(
    weights: Tensor,
    src_tokens: Sequence[str],
    tgt_tokens: Sequence[str],
    path: str | Path,
    *,
    title: str = "",
) -> Path:
    """Save an alignment matrix ``(Lt, Ls)`` (target rows over source columns) as a PNG.

    Args:
        weights: ``(Lt, Ls)`` attention of each output token over the source tokens.
        src_tokens, tgt_tokens: the column and row labels.
        path: the PNG to write.
        title: a title above the matrix.

    Returns:
        The path written.

    Example:
        >>> import tempfile, torch
        >>> p = alignment(torch.eye(2), ["a", "b"], ["x", "y"], tempfile.mkdtemp() + "/a.png")
        >>> p.suffix, p.stat().st_size > 0
        ('.png', True)
    """
    check_png_path(path)
    for name, tokens in (("src_tokens", src_tokens), ("tgt_tokens", tgt_tokens)):
        check_tokens(name, tokens)
    w = _matrix("weights", weights, len(tgt_tokens), len(src_tokens))
    plt = pyplot()
    cols, rows = min(w.shape[1], MAX_LABELS), min(w.shape[0], MAX_LABELS)  # the size bounded
    fig, ax = plt.subplots(figsize=(1.0 + 0.45 * cols, 1.0 + 0.4 * rows))
    with _closed_on_error(fig):
        ax.imshow(w, cmap="viridis", vmin=0.0, vmax=max(float(w.max()), 1e-9), aspect="auto")
        _label(ax, src_tokens, tgt_tokens)
        ax.set_title(title, fontsize=9)
    return save_figure(fig, path)


def heatmap(weights: Tensor, tokens: Sequence[str], path: str | Path, *, title: str = "") -> Path:
    """Save one head's self-attention ``(n, n)`` (queries as rows) as a labelled PNG.

    Example:
        >>> import tempfile, torch
        >>> p = heatmap(torch.eye(3), ["a", "b", "c"], tempfile.mkdtemp() + "/h.png")
        >>> p.stat().st_size > 0
        True
    """
    check_tokens("tokens", tokens)
    return alignment(weights, tokens, tokens, path, title=title)


def head_grid(
    attentions: Sequence[Tensor],
    path: str | Path,
    *,
    tokens: Sequence[str] | None = None,
    title: str = "",
) -> Path:
    """Save every layer's heads as a grid of small heatmaps (layers as rows).

    Args:
        attentions: per-layer ``(H, n, n)`` weights of one example, in layer order.
        path: the PNG to write.
        tokens: tick labels when there are at most 24 tokens.
        title: a title above the grid.

    Example:
        >>> import tempfile, torch
        >>> attns = [torch.rand(2, 4, 4).softmax(-1) for _ in range(3)]
        >>> head_grid(attns, tempfile.mkdtemp() + "/g.png").stat().st_size > 0
        True
    """
    if isinstance(attentions, Tensor) or not all(isinstance(a, Tensor) for a in attentions):
        raise TypeError(  # (a 4-D tensor: "Boolean value of Tensor ... is ambiguous")
            "attentions must be a list of per-layer (H, n, m) tensors (a stacked tensor t: "
            f"pass list(t)), got {type(attentions).__name__}"
        )
    if not attentions or any(a.dim() != 3 or a.shape[0] == 0 for a in attentions):
        raise ValueError(  # (zero heads: matplotlib's "Number of columns must be ...")
            "attentions must be a non-empty list of per-layer (H, n, m) tensors, H >= 1"
        )
    check_png_path(path)
    if tokens is not None:
        check_tokens("tokens", tokens)
    maps = [_array(f"attentions[{i}]", a) for i, a in enumerate(attentions)]
    rows, cols = len(attentions), max(a.shape[0] for a in attentions)
    plt = pyplot()
    fig, axes = plt.subplots(rows, cols, figsize=(1.6 * cols, 1.6 * rows), squeeze=False)
    small = tokens is not None and len(tokens) <= 24
    with _closed_on_error(fig):
        for li, a in enumerate(attentions):
            for h in range(cols):
                ax = axes[li][h]
                ax.set_xticks([])
                ax.set_yticks([])
                if h >= a.shape[0]:
                    ax.axis("off")
                    continue
                ax.imshow(maps[li][h], cmap="viridis", vmin=0.0)
                if li == 0:
                    ax.set_title(f"head {h}", fontsize=7)
                if h == 0:
                    ax.set_ylabel(f"layer {li}", fontsize=7)
                if small and li == rows - 1 and tokens is not None:
                    ax.set_xticks(range(len(tokens)), tokens, rotation=90, fontsize=4)
        fig.suptitle(title, fontsize=9)
    return save_figure(fig, path)


def saliency(
    tokens: Sequence[str],
    scores: Tensor | Sequence[float],
    path: str | Path,
    *,
    title: str = "",
) -> Path:
    """Save a bar per token (positive bars green, negative red) as a PNG; ``scores`` are
    finite numbers, one per token.

    Example:
        >>> import tempfile
        >>> saliency(["a", "b"], [0.5, -0.2], tempfile.mkdtemp() + "/s.png").suffix
        '.png'
    """
    check_png_path(path)
    check_tokens("tokens", tokens)
    if isinstance(scores, Tensor) and scores.dim() != 1:  # ("only one element tensors")
        raise ValueError(f"scores must be one value per token (n,), got {tuple(scores.shape)}")
    vals = _numbers(scores)
    if len(vals) != len(tokens):
        raise ValueError(f"scores has {len(vals)} values but there are {len(tokens)} tokens")
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(1.0 + 0.4 * len(vals), 2.6))
    with _closed_on_error(fig):
        ax.bar(range(len(vals)), vals, color=["#2a9d47" if v >= 0 else "#c0392b" for v in vals])
        ax.set_xticks(range(len(tokens)), tokens, rotation=60, ha="right")
        ax.axhline(0.0, color="black", linewidth=0.5)
        ax.set_title(title, fontsize=9)
    return save_figure(fig, path)


def check_png_path(path: object, kind: str = "a PNG") -> Path:
    """``path`` as the PNG (or ``kind`` of file, "an HTML") to write: a str or path-like
    that is not a folder (a folder failed only at the write, after all the drawing), whose
    suffix, if it has one, is that kind's (``a.svg`` and ``r.png`` were written as PNG
    and HTML under names that said otherwise).

    Example:
        >>> import tempfile
        >>> check_png_path("pictures/a.png").name
        'a.png'
        >>> check_png_path(tempfile.mkdtemp())  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: path must be a PNG file to write, got the folder '...'
        >>> check_png_path("a.svg")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: path 'a.svg' ends in '.svg', but a PNG file is written there; give a ...
    """
    if not isinstance(path, str | os.PathLike):
        raise TypeError(
            f"path must be a str or Path ({kind} file to write), got {type(path).__name__}"
        )
    if Path(path).is_dir() or os.fspath(path).endswith(("/", os.sep)):  # ("new/": a file)
        raise ValueError(f"path must be {kind} file to write, got the folder {str(path)!r}")
    suffix, kinds = Path(path).suffix, _SUFFIXES.get(kind, ())
    if kinds and suffix and suffix.lower() not in kinds:
        raise ValueError(
            f"path {str(path)!r} ends in {suffix!r}, but {kind} file is written there; give "
            f"a name ending in {' or '.join(kinds)}"
        )
    return Path(path)


#: the suffixes a file of each kind may have (a name without one is kept)
_SUFFIXES = {"a PNG": (".png",), "an HTML": (".html", ".htm")}


def check_tokens(name: str, tokens: object) -> None:
    """``tokens`` a sequence of labels, not one str (each letter was drawn as a token).

    Example:
        >>> check_tokens("tokens", "abc")
        Traceback (most recent call last):
        ...
        TypeError: tokens must be a list of str (one per token), got the str 'abc'
    """
    if isinstance(tokens, str) or not isinstance(tokens, Sequence):
        shown = f"the str {tokens!r}" if isinstance(tokens, str) else type(tokens).__name__
        raise TypeError(f"{name} must be a list of str (one per token), got {shown}")


def check_finite(name: str, a: np.ndarray) -> np.ndarray:
    """``a`` if it holds no NaN or inf, or a ValueError naming ``name`` (NaN was drawn as a
    blank or a bar of nothing, inf broke the colour scale, and the PNG said nothing).

    Example:
        >>> check_finite("scores", np.array([1.0, np.nan]))
        Traceback (most recent call last):
        ...
        ValueError: scores must be finite, got 1 NaN or inf values
    """
    bad = int((~np.isfinite(a)).sum())
    if bad:
        raise ValueError(f"{name} must be finite, got {bad} NaN or inf values")
    return a


def _numbers(scores: object) -> list[float]:
    """``scores``, a 1-D tensor or array or a sequence of real numbers, as finite floats."""
    seq = scores.tolist() if isinstance(scores, Tensor) else scores
    if (
        isinstance(seq, str)
        or not isinstance(seq, Sequence | np.ndarray)
        or not all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in seq)
    ):  # ("1" was drawn as 1.0, "x" failed in float())
        raise TypeError(f"scores must be numbers, one per token, got {scores!r:.80}")
    return [float(v) for v in check_finite("scores", np.asarray(seq, dtype=np.float64))]


def _array(name: str, weights: Tensor) -> Any:
    """``weights`` as a finite float32 numpy array."""
    return check_finite(name, weights.detach().float().cpu().numpy())


def _matrix(name: str, weights: Tensor, rows: int, cols: int) -> Any:
    if not isinstance(weights, Tensor):  # (numpy: "'ndarray' object has no attribute")
        raise TypeError(f"{name} must be a Tensor, got {type(weights).__name__}")
    w = weights.detach().float().cpu().numpy()
    if w.shape != (rows, cols):
        raise ValueError(
            f"{name} has shape {w.shape} but the labels need ({rows}, {cols}) "
            "(rows: queries / target tokens, columns: keys / source tokens)"
        )
    if w.size == 0:  # (numpy's "zero-size array to reduction operation maximum")
        raise ValueError(
            f"{name} has shape {w.shape}, no tokens to draw; expected (rows, cols) with at "
            "least one token each"
        )
    return check_finite(name, w)


@contextmanager
def _closed_on_error(fig: Any) -> Iterator[None]:
    """Close ``fig`` if drawing on it fails (:func:`save_figure` closes it otherwise): a
    failed picture left its figure open, one more per call in a long-running process."""
    try:
        yield
    except BaseException:
        pyplot().close(fig)
        raise


#: labels drawn per axis at most (every k-th token past it): a picture sized by every
#: token took 25.6 s and 5.4 GB at 256 tokens, 90.7 s and 20.6 GB at 512
MAX_LABELS = 64


def _label(ax: Any, cols: Sequence[str], rows: Sequence[str]) -> None:
    for labels, put in ((cols, ax.set_xticks), (rows, ax.set_yticks)):
        at = list(range(0, len(labels), max(1, math.ceil(len(labels) / MAX_LABELS))))
        kw = {"rotation": 60, "ha": "right"} if put == ax.set_xticks else {}
        put(at, [labels[i] for i in at], **kw)


def save_figure(fig: Any, path: str | Path, *, dpi: int = 110) -> Path:
    """Lay out ``fig``, write it to ``path`` as a PNG atomically and free it (also when
    that fails). Every text is drawn as written: a token such as ``$$`` or ``$_$`` is not
    read as matplotlib's math (which failed to parse, after all the work, or drew
    something else)."""
    from matplotlib.text import Text

    try:
        for text in fig.findobj(Text):
            text.set_parse_math(False)
        fig.tight_layout()
        return atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=dpi, format="png"))
    finally:
        pyplot().close(fig)
