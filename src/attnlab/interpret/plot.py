"""Pictures of attention (matplotlib, the ``viz`` extra): alignment matrices and heatmaps.

Files are written atomically (a temporary file renamed over the target).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import Tensor

from attnlab._io import atomic_write

__all__ = ["alignment"]


def _pyplot() -> Any:
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
    w = weights.detach().float().cpu().numpy()
    if w.shape != (len(tgt_tokens), len(src_tokens)):
        raise ValueError(
            f"weights has shape {w.shape} but the labels need "
            f"({len(tgt_tokens)}, {len(src_tokens)}) (target rows, source columns)"
        )
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(1.0 + 0.45 * w.shape[1], 1.0 + 0.4 * w.shape[0]))
    ax.imshow(w, cmap="viridis", vmin=0.0, vmax=max(float(w.max()), 1e-9), aspect="auto")
    ax.set_xticks(range(len(src_tokens)), src_tokens, rotation=60, ha="right")
    ax.set_yticks(range(len(tgt_tokens)), tgt_tokens)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    out = atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"), mode=0o644)
    plt.close(fig)
    return out
