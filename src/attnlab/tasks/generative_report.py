"""What ``attnlab train gan | vae`` (and their ``-plain`` twins) show once training ends:
final scores beside the held-out test images' (the floor for that many images), a grid of
generated digits next to real ones, and, for the models with attention, where the
self-attention layer of one generated sample looks from a few query positions.

The attention maps are the layer's weights as :func:`attnlab.interpret.capture` records
them from the generator's (GAN) or decoder's (VAE) own forward pass: for the query at
row ``r``, column ``c`` of the 8x8 feature map, row ``r * 8 + c`` of the ``(H, 64, 64)``
weights (mean over heads), drawn over the generated image, whose pixels are those positions.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor, nn

from attnlab.interpret import capture
from attnlab.interpret.plot import pyplot, save_figure
from attnlab.models.gan import GAN, SelfAttention2d
from attnlab.models.vae import VAE
from attnlab.nn._modes import eval_mode
from attnlab.tasks.report import Section, write_html
from attnlab.tasks.vision import load_split

if TYPE_CHECKING:
    from attnlab.tasks.generative_task import GANTask, VAETask

__all__ = ["QUERIES", "attention_of", "finish", "mosaic", "write_attention", "write_samples"]

QUERIES = ((2, 2), (2, 5), (5, 2), (5, 5))  # (row, column) query positions pictured
PICTURE_SEED = 2  # of the latent of the pictured sample


def mosaic(images: Tensor, cols: int = 8) -> np.ndarray:
    """``images (N, 1, h, w)`` in [-1, 1] tiled ``cols`` per row with 1-pixel gaps (NaN,
    drawn white) into one array in [0, 1].

    Example:
        >>> m = mosaic(torch.zeros(3, 1, 2, 2), cols=2)
        >>> m.shape, float(np.nanmax(m)), int(np.isnan(m).sum())
        ((5, 5), 0.5, 13)
    """
    n, _, h, w = images.shape
    rows = -(-n // cols)
    out = np.full((rows * (h + 1) - 1, cols * (w + 1) - 1), np.nan)
    pix = ((images[:, 0].detach().float().clamp(-1, 1) + 1) / 2).cpu().numpy()  # (N, h, w)
    for i in range(n):
        r, c = divmod(i, cols)
        out[r * (h + 1) : r * (h + 1) + h, c * (w + 1) : c * (w + 1) + w] = pix[i]
    return out


def write_samples(generated: Tensor, real: Tensor, path: Path, title: str) -> Path:
    """A PNG: 64 generated images ``(N, 1, 8, 8)`` beside 64 real ones (atomically)."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(6.4, 3.5))
    cmap = plt.get_cmap("gray").with_extremes(bad="white")
    for ax, imgs, name in zip(axes, (generated, real), ("generated", "real"), strict=True):
        ax.imshow(mosaic(imgs[:64]), cmap=cmap, vmin=0, vmax=1, interpolation="nearest")
        ax.set_title(name, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title, fontsize=9)
    return save_figure(fig, path, dpi=100)


@torch.no_grad()
def attention_of(model: GAN | VAE, z: Tensor) -> tuple[Tensor, Tensor]:
    """``(image (8, 8), weights (H, 64, 64))`` of the sample generated from ``z (1,
    latent_dim)``: the self-attention layer's weights over the 8x8 positions, captured
    from the generator's (GAN) or decoder's (VAE) forward pass in eval mode (as
    :meth:`GAN.sample`; the model's mode is restored after, its batch-norm statistics
    untouched).

    Example:
        >>> from attnlab.models.gan import GANConfig
        >>> gan = GAN(GANConfig(latent_dim=4, channels=16))  # training mode
        >>> img, w = attention_of(gan, torch.randn(1, 4))
        >>> tuple(img.shape), tuple(w.shape), bool(torch.allclose(w.sum(-1), torch.ones(1, 64)))
        ((8, 8), (1, 64, 64), True)
        >>> gan.training, gan.generator.training
        (True, True)
    """
    if not model.cfg.attention:
        raise ValueError("model has no attention layer (cfg.attention=False): nothing to picture")
    if z.dim() != 2 or z.shape[0] != 1:
        raise ValueError(f"z must have shape (1, latent_dim), got {tuple(z.shape)}")
    net, layer = (model.generator, "generator.attn") if isinstance(model, GAN) else (model, "attn")
    # (train mode normalized by this one sample and overwrote the running statistics)
    with eval_mode(net), capture(model, layers=[layer]) as cap:
        img = model.decode(z) if isinstance(model, VAE) else net(z)  # (1, 1, 8, 8)
    return img[0, 0], cap.records[0].weights[0]  # (8, 8), (H, L, L)


def query_maps(weights: Tensor, queries: Sequence[tuple[int, int]] = QUERIES) -> Tensor:
    """``(Q, 8, 8)``: for each ``(row, col)`` query, its weights over the 8x8 positions,
    mean over heads, from ``weights (H, 64, 64)``.

    Example:
        >>> w = torch.eye(64)[None]  # every position attends to itself
        >>> m = query_maps(w, [(1, 2)])
        >>> int(m[0].argmax()), float(m.sum())
        (10, 1.0)
    """
    rows = torch.tensor([r * 8 + c for r, c in queries])
    return weights.mean(0)[rows].view(len(queries), 8, 8)


def write_attention(model: GAN | VAE, path: Path, title: str) -> tuple[Path, Tensor]:
    """A PNG of where :data:`QUERIES` look in one generated sample; returns the path and
    the pictured maps ``(Q, 8, 8)`` (so they can be checked against a recomputation)."""
    z = torch.randn(1, model.cfg.latent_dim, generator=torch.Generator().manual_seed(PICTURE_SEED))
    img, weights = attention_of(model, z)
    maps = query_maps(weights)
    plt = pyplot()
    fig, axes = plt.subplots(1, 1 + len(QUERIES), figsize=(1.7 * (1 + len(QUERIES)), 2.2))
    pixels = ((img.clamp(-1, 1) + 1) / 2).numpy()
    axes[0].imshow(pixels, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    axes[0].set_title("sample", fontsize=8)
    for ax, (r, c), m in zip(axes[1:], QUERIES, maps, strict=True):
        ax.imshow(pixels, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        ax.imshow(m.numpy(), cmap="inferno", alpha=0.6, vmin=0, vmax=max(float(m.max()), 1e-9))
        ax.plot([c], [r], marker="x", color="cyan", markersize=7, mew=2)
        ax.set_title(f"query ({r},{c}) max {float(m.max()):.2f}", fontsize=7)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title, fontsize=9)
    return save_figure(fig, path, dpi=100), maps


def _gamma(model: GAN | VAE) -> float:
    """The attention gate of the pictured layer (how much attention enters the output)."""
    att = model.generator.attn if isinstance(model, GAN) else model.attn
    assert isinstance(att, SelfAttention2d)
    return float(att.gamma.detach())


def finish(task: GANTask | VAETask, model: nn.Module, folder: Path) -> dict[str, float]:
    """Final scores (and the held-out images' as the floor), pictures and ``report.html``."""
    assert isinstance(model, GAN | VAE)
    scores = task.evaluate(model.eval())
    floor = task.scorer().score(load_split(0.2, task.seed)[2] * 2 - 1)
    print(f"final scores ({task.samples} samples):", json.dumps(scores))
    print("  held-out real test images score (the floor):", json.dumps(floor))
    folder.mkdir(parents=True, exist_ok=True)
    what = f"{task.name}: Fréchet distance {scores['frechet']}"
    png = write_samples(task.generate(model, 64), task.images, folder / "samples.png", what)
    sections = [Section("Samples", "generated (left) and real training images (right)", [png])]
    if model.cfg.attention:
        gamma = _gamma(model)
        title = f"{task.name}: self-attention of one sample (gamma = {gamma:.3f})"
        att, _ = write_attention(model, folder / "attention.png", title)
        note = (
            "cyan x: the query position; colour: its attention weights over the 8x8 map "
            "(max: the largest weight; uniform attention is 1/64 = 0.016)"
        )
        sections.append(Section("Attention of a generated sample", note, [att]))
    write_html(folder / "report.html", f"{task.name} on 8x8 digits", scores, sections)
    return scores
