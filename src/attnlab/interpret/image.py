"""Attention over an image's patch grid, drawn on the image (matplotlib, Agg backend).

A map ``(gh, gw)`` holds one weight per patch; it is stretched over the whole image
(each cell covers its patch exactly, for any grid that tiles the image) and blended on
top of it. One PNG holds the image and one panel per map: per-word attention of a
captioner, or the rollout of a ViT's CLS token.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from attnlab._validate import plain, real_where
from attnlab.interpret.plot import (
    check_finite,
    check_png_path,
    check_tokens,
    pyplot,
    save_figure,
)

__all__ = ["image_attention", "patch_grid"]


def _as_image(image: object) -> np.ndarray:
    """``(H, W)`` grey or ``(H, W, 3)`` RGB as a float array scaled to [0, 1]."""
    if isinstance(image, Tensor):
        image = image.detach().float().cpu().numpy()
    if not isinstance(image, np.ndarray):
        raise TypeError(
            f"image must be a Tensor or numpy array (H, W) or (H, W, 3), got {type(image).__name__}"
        )
    if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] != 3):
        raise ValueError(f"image must have shape (H, W) or (H, W, 3), got {image.shape}")
    img = image.astype(np.float64)
    check_finite("image", img)  # (a blank panel was drawn)
    lo, hi = float(img.min()), float(img.max())
    return (img - lo) / (hi - lo) if hi > lo else np.zeros_like(img)


def _as_maps(maps: object, titles: Sequence[str]) -> np.ndarray:
    """``(N, gh, gw)`` finite non-negative maps, one per title."""
    m = maps.detach().float().cpu().numpy() if isinstance(maps, Tensor) else maps
    if not isinstance(m, np.ndarray):
        raise TypeError(f"maps must be a Tensor or numpy array (N, gh, gw), got {type(m).__name__}")
    if m.ndim != 3 or m.shape[0] != len(titles):
        raise ValueError(
            f"maps must have shape (N, gh, gw) with N = len(titles) = {len(titles)}, "
            f"got shape {m.shape}"
        )
    if not np.isfinite(m).all() or (m < 0).any():  # (drawn, negative weights as 0)
        raise ValueError(
            f"maps must be finite and >= 0 (attention weights), got values from {np.min(m)} "
            f"to {np.max(m)}"
        )
    return m


def image_attention(
    image: Tensor | np.ndarray,
    maps: Tensor | np.ndarray,
    titles: Sequence[str],
    path: str | Path,
    *,
    title: str = "",
    alpha: float = 0.6,
) -> Path:
    """Save a PNG: the image, then one panel per attention map blended over it.

    Args:
        image: ``(H, W)`` grey or ``(H, W, 3)`` RGB (any finite range; scaled to [0, 1]).
        maps: ``(N, gh, gw)`` attention (finite, >= 0) over the ``gh x gw`` patch grid
            (row-major patches, as a ViT's ``PatchEmbedding`` orders them).
        titles: ``N`` panel titles (the generated words, or "rollout").
        path: the PNG to write (atomically).
        title: a line above the panels.
        alpha: opacity of the attention overlay, in [0, 1].

    Returns:
        The path written.

    Example:
        >>> import tempfile
        >>> maps = torch.softmax(torch.randn(2, 4, 4).flatten(1), -1).view(2, 4, 4)
        >>> p = image_attention(torch.rand(8, 8), maps, ["a", "b"], tempfile.mkdtemp() + "/x.png")
        >>> p.suffix, p.stat().st_size > 0
        ('.png', True)
    """
    check_png_path(path)
    check_tokens("titles", titles)  # (a str was split into one panel per letter)
    real_where("alpha", alpha, lambda a: 0 <= a <= 1, "a number in [0, 1]")
    img, m = _as_image(image), _as_maps(maps, titles)
    h, w = img.shape[:2]
    plt = pyplot()
    n = 1 + len(titles)
    fig, axes = plt.subplots(1, n, figsize=(1.6 * n, 2.0), squeeze=False)
    extent = (-0.5, w - 0.5, h - 0.5, -0.5)  # each grid cell covers its patch
    axes[0, 0].imshow(img, cmap="gray" if img.ndim == 2 else None, interpolation="nearest")
    axes[0, 0].set_title("image", fontsize=8)
    for ax, a, t in zip(axes[0, 1:], m, titles, strict=True):
        ax.imshow(img, cmap="gray" if img.ndim == 2 else None, interpolation="nearest")
        vmax = max(float(a.max()), 1e-9)
        ax.imshow(a, cmap="inferno", alpha=alpha, extent=extent, vmin=0.0, vmax=vmax)
        ax.set_title(t, fontsize=8)
    for ax in axes[0]:
        ax.set_xticks([])
        ax.set_yticks([])
    if title:
        fig.suptitle(title, fontsize=9)
    return save_figure(fig, path, dpi=100)


def patch_grid(weights: Tensor, grid: int) -> Tensor:
    """``(N, grid * grid)`` patch weights as ``(N, grid, grid)`` maps (row-major).

    Example:
        >>> patch_grid(torch.arange(8.0).view(2, 4), 2)[1]
        tensor([[4., 5.],
                [6., 7.]])
    """
    if not isinstance(weights, Tensor):
        raise TypeError(f"weights must be a Tensor, got {type(weights).__name__}")
    g = plain(grid)  # (np.int64 was refused)
    if isinstance(g, bool) or not isinstance(g, int) or g < 1:  # (0: reshape failed)
        raise ValueError(f"grid must be a positive int, got {grid!r}")
    if weights.dim() != 2 or weights.shape[1] != g * g:
        raise ValueError(
            f"weights must have shape (N, grid * grid) = (N, {g * g}), got {tuple(weights.shape)}"
        )
    return weights.reshape(-1, g, g).to(torch.float32)
