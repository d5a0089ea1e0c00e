"""Pictures of attention (matplotlib, the ``viz`` extra): alignment matrices and heatmaps.

Files are written atomically (a temporary file renamed over the target).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import Tensor

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
    out = _atomic_savefig(fig, Path(path))
    plt.close(fig)
    return out


def _atomic_savefig(fig: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".png")
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=110)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path
