"""The image tasks' runners for :func:`attnlab.tasks.inspect.load_run`: vision (a ViT on
8x8 digits) and captioning (shapes), each rebuilt from its checkpoint's config.

A picture of any size and mode becomes what the task's data is. Vision: grey, light ink
on a dark ground in [0, 1] (a mostly light picture, such as a digit drawn in black on
white, is inverted), shrunk by averaging (as scikit-learn's digits were made). Captioning:
RGB on black, uint8, shrunk by averaging. Transparent pixels count as the background
(white for vision before the inversion, black for captioning); the aspect ratio is not kept.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import torch
from torch import Tensor

from attnlab.interpret import capture
from attnlab.interpret.image import patch_grid
from attnlab.models.captioner import Captioner, CaptionerConfig
from attnlab.models.vit import ViT, ViTConfig
from attnlab.tasks.inspect import AttentionStack, Inspection, Overlay, RunModel, labels, stack
from attnlab.tasks.text import Vocab

if TYPE_CHECKING:  # pragma: no cover
    from PIL.Image import Image

__all__ = ["RUNNERS", "CaptioningRun", "VisionRun", "digit_pixels", "scene_pixels"]


def _flatten(image: Image, background: tuple[int, int, int]) -> Image:
    """``image`` as RGB, transparent pixels replaced by ``background``."""
    from PIL import Image as PILImage

    try:
        rgba = image.convert("RGBA")
    except (ValueError, OSError) as e:  # an unconvertible mode, an unreadable file
        raise ValueError(
            f"image: Pillow cannot read this {image.mode} picture as RGBA ({e})"
        ) from e
    ground = PILImage.new("RGBA", rgba.size, (*background, 255))
    return PILImage.alpha_composite(ground, rgba).convert("RGB")


def digit_pixels(image: Image, size: int) -> Tensor:
    """``(size, size)`` grey in [0, 1], light on dark, as the digits task's images are.

    Example:
        >>> from PIL import Image, ImageDraw
        >>> im = Image.new("RGB", (64, 64), "white")
        >>> ImageDraw.Draw(im).line([(32, 8), (32, 56)], fill="black", width=8)
        >>> x = digit_pixels(im, 8)
        >>> tuple(x.shape), float(x[:, 0].max()), round(float(x[1:7, 3:5].sum(1).min()), 2)
        ((8, 8), 0.0, 1.0)
    """
    from PIL import Image as PILImage

    grey = _flatten(image, (255, 255, 255)).convert("L")
    small = grey.resize((size, size), PILImage.Resampling.BOX)
    x = torch.from_numpy(np.asarray(small, dtype=np.float32) / 255.0)  # (size, size)
    return 1.0 - x if float(x.mean()) > 0.5 else x


def scene_pixels(image: Image, size: int) -> Tensor:
    """``(3, size, size)`` uint8 RGB on black, as the captioning task's scenes are.

    Example:
        >>> from PIL import Image
        >>> scene_pixels(Image.new("RGBA", (50, 40), (255, 0, 0, 255)), 32)[:, 0, 0].tolist()
        [255, 0, 0]
    """
    from PIL import Image as PILImage

    small = _flatten(image, (0, 0, 0)).resize((size, size), PILImage.Resampling.BOX)
    return torch.from_numpy(np.asarray(small, dtype=np.uint8).copy()).permute(2, 0, 1)


def patch_labels(grid: int) -> list[str]:
    """``"row,col"`` of each patch, row-major.

    Example:
        >>> patch_labels(2)
        ['0,0', '0,1', '1,0', '1,1']
    """
    return [f"{r},{c}" for r in range(grid) for c in range(grid)]


_Config = TypeVar("_Config", ViTConfig, CaptionerConfig)


def _channels(cfg: _Config, want: int) -> _Config:
    """``cfg`` if its images have the channels the task's pictures are converted to."""
    if cfg.channels != want:
        raise ValueError(f"model channels must be {want} for this task, got {cfg.channels}")
    return cfg


class VisionRun(RunModel):
    """A digit picture -> its class; the encoder's self-attention (token 0: CLS) and the
    rollout from the CLS token over the patches (:func:`attnlab.tasks.vision.cls_rollout`)."""

    model: ViT
    task, kind, input = "vision", "image", "image"

    @classmethod
    def build(cls, config: dict[str, Any]) -> VisionRun:
        return cls(ViT(_channels(ViTConfig(**config["model"]), 1)), config)

    def _run_image(self, image: Image) -> Inspection:
        from attnlab.tasks.vision import cls_rollout

        cfg, grid = self.model.cfg, self.model.patches.grid
        x = digit_pixels(image, cfg.image_size)  # (s, s)
        batch = x[None, None]  # (1, 1, s, s)
        with capture(self.model, layers=["encoder.layers.*.self_attn"]) as cap:
            probs = self.model(batch)[0].softmax(-1)  # (classes,)
        k = int(probs.argmax())
        lab = ["[CLS]", *patch_labels(grid)]
        enc = stack(cap, "encoder.layers.*.self_attn", "encoder", "self", lab, lab)
        roll = patch_grid(cls_rollout(self.model, batch), grid)[0]  # (g, g)
        return Inspection(
            f"{k} (p={float(probs[k]):.2f})",
            [enc],
            None,
            pixels=x,
            grid=grid,
            overlays=[Overlay("rollout", roll)],
        )


class CaptioningRun(RunModel):
    """A picture -> its greedy caption; the patch encoder's self-attention and each
    word's attention over the patches (:func:`attnlab.tasks.captioning.word_attention`)."""

    model: Captioner
    task, kind, input = "captioning", "caption", "image"

    def __init__(self, model: Captioner, config: dict[str, Any]) -> None:
        super().__init__(model, config)
        self.vocab = Vocab(config["vocab"])

    @classmethod
    def build(cls, config: dict[str, Any]) -> CaptioningRun:
        return cls(Captioner(_channels(CaptionerConfig(**config["model"]), 3)), config)

    def _run_image(self, image: Image) -> Inspection:
        from attnlab.tasks.captioning import word_attention

        cfg, grid = self.model.cfg, self.model.patches.grid
        img = scene_pixels(image, cfg.image_size)  # (3, s, s) uint8
        with capture(self.model, layers=["encoder.layers.*.self_attn"]) as cap:
            ids, maps = word_attention(self.model, img)  # maps (steps, g, g)
        words, patches = labels(self.vocab, ids), patch_labels(grid)
        produced = words + ["</s>"] * (len(maps) > len(ids))
        per_word = AttentionStack("words", "cross", produced, patches, [maps.flatten(1)[None]])
        enc = stack(cap, "encoder.layers.*.self_attn", "patches", "self", patches, patches)
        return Inspection(
            self.vocab.decode(ids),
            [enc, per_word],
            per_word,
            pixels=img.permute(1, 2, 0).float() / 255.0,  # (s, s, 3)
            grid=grid,
            overlays=[Overlay(w, maps[i]) for i, w in enumerate(words)],
        )


RUNNERS: dict[str, type[RunModel]] = {r.task: r for r in (VisionRun, CaptioningRun)}
