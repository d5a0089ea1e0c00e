"""A Vision Transformer (Dosovitskiy et al., 2021) built from :mod:`attnlab.nn` blocks.

Images ``(B, C, H, W)`` are cut into ``p x p`` patches, each patch is projected to
``D`` (a convolution with kernel = stride = ``p``, the same as unfold + linear), a
learned CLS token is put in front, learned positions are added, a pre-norm
:class:`~attnlab.nn.Encoder` mixes the ``1 + (H/p)(W/p)`` tokens, and a linear head
classifies the final CLS state. :class:`PatchEmbedding` is shared with the captioner.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn

from attnlab._validate import plain_fields, positive_int, same_dtype, validate_dropout
from attnlab.nn import Encoder, EncoderLayer, LayerConfig
from attnlab.positional import LearnedPositional

__all__ = ["PatchEmbedding", "ViT", "ViTConfig", "check_images", "patch_grid_side"]


def check_images(images: object, channels: int, size: int) -> Tensor:
    """``images`` as a float tensor ``(B, channels, size, size)`` or a clear error.

    Example:
        >>> check_images(torch.zeros(2, 1, 8, 8), 1, 8).shape
        torch.Size([2, 1, 8, 8])
    """
    if not isinstance(images, Tensor):
        raise TypeError(f"images must be a torch.Tensor (B, C, H, W), got {type(images).__name__}")
    if not images.is_floating_point():
        raise TypeError(f"images must be a floating-point tensor, got dtype {images.dtype}")
    want = (channels, size, size)
    if images.dim() != 4 or tuple(images.shape[1:]) != want:
        raise ValueError(
            f"images must have shape (B, C, H, W) = (B, {channels}, {size}, {size}), "
            f"got shape {tuple(images.shape)}"
        )
    return images


def patch_grid_side(image_size: object, patch_size: object) -> int:
    """Patches per side of an ``image_size`` square cut into ``patch_size`` squares, or a
    TypeError/ValueError naming both sizes.

    Example:
        >>> patch_grid_side(32, 4)
        8
        >>> patch_grid_side(30, 4)
        Traceback (most recent call last):
        ...
        ValueError: image_size=30 must be a multiple of patch_size=4
    """
    size, patch = positive_int("image_size", image_size), positive_int("patch_size", patch_size)
    if size % patch:
        raise ValueError(f"image_size={size} must be a multiple of patch_size={patch}")
    return size // patch


class PatchEmbedding(nn.Module):
    """Non-overlapping ``patch x patch`` patches, each projected to ``dim``.

    ``proj`` is a ``Conv2d`` with kernel = stride = ``patch``: patch ``(i, j)`` (row-major)
    becomes ``W @ flatten(x[:, :, i*p:(i+1)*p, j*p:(j+1)*p]) + b``.

    Args:
        image_size: ``H = W`` of the input; must be a multiple of ``patch``.
        patch: patch side ``p``.
        channels: input channels ``C``.
        dim: output width ``D``.

    Example:
        >>> pe = PatchEmbedding(8, 2, 1, 16)
        >>> pe.grid, tuple(pe(torch.randn(3, 1, 8, 8)).shape)
        (4, (3, 16, 16))
    """

    def __init__(self, image_size: int, patch: int, channels: int, dim: int) -> None:
        super().__init__()
        self.grid = patch_grid_side(image_size, patch)
        self.image_size, self.patch = int(image_size), int(patch)
        self.channels = positive_int("channels", channels)
        self.proj = nn.Conv2d(channels, positive_int("dim", dim), patch, stride=patch)

    @property
    def num_patches(self) -> int:
        return self.grid * self.grid

    def forward(self, images: Tensor) -> Tensor:
        """``images (B, C, H, W) -> (B, N, D)`` with ``N = (H/p) * (W/p)``, row-major."""
        x = check_images(images, self.channels, self.image_size)
        x = same_dtype("images", x, self.proj.weight.dtype)  # (a bare "Input type" error)
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, N, D)


@dataclass
class ViTConfig:
    """Sizes of a :class:`ViT` (saved in its checkpoints).

    Example:
        >>> ViT(ViTConfig(image_size=8, patch_size=4, d_model=16, num_heads=2, layers=1)).num_tokens
        5
        >>> ViT(ViTConfig(image_size=8, patch_size=3))
        Traceback (most recent call last):
        ...
        ValueError: image_size=8 must be a multiple of patch_size=3
    """

    image_size: int = 8
    patch_size: int = 2
    channels: int = 1
    num_classes: int = 10
    d_model: int = 64
    num_heads: int = 4
    layers: int = 4
    dim_feedforward: int = 128
    dropout: float = 0.1
    engine: str = "auto"

    def __post_init__(self) -> None:
        plain_fields(self)  # numpy scalars as Python's: the config stays JSON-able


class ViT(nn.Module):
    """Patch embedding, CLS token, learned positions, pre-norm encoder, linear head.

    ``forward(images (B, C, H, W)) -> logits (B, num_classes)``. The encoder layers'
    self-attention calls are named ``encoder.layers.{i}.self_attn`` for
    :class:`attnlab.interpret.capture`; token 0 is the CLS token, tokens ``1..N`` the
    patches in row-major order.

    Example:
        >>> vit = ViT(ViTConfig(d_model=16, num_heads=2, layers=2, dim_feedforward=32))
        >>> tuple(vit(torch.randn(5, 1, 8, 8)).shape), vit.num_tokens
        ((5, 10), 17)
    """

    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d = positive_int("d_model", cfg.d_model)
        self.patches = PatchEmbedding(cfg.image_size, cfg.patch_size, cfg.channels, d)
        self.num_tokens = 1 + self.patches.num_patches
        self.cls = nn.Parameter(torch.zeros(1, 1, d))
        self.reset_parameters()
        self.pos = LearnedPositional(self.num_tokens, d)
        p = validate_dropout(cfg.dropout, "dropout")  # (nn.Dropout's error named nothing)
        self.dropout = nn.Dropout(p)
        layer = EncoderLayer(
            LayerConfig(
                d,
                cfg.num_heads,
                cfg.dim_feedforward,
                dropout=p,
                activation="gelu",
                norm_first=True,
                engine=cfg.engine,
            )
        )
        self.encoder = Encoder(layer, positive_int("layers", cfg.layers), nn.LayerNorm(d))
        self.head = nn.Linear(d, positive_int("num_classes", cfg.num_classes))

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Draw the class token again, ``N(0, 0.02**2)`` as when built (from
        ``generator`` if given, else torch's global RNG; the submodules have their own)."""
        nn.init.normal_(self.cls, std=0.02, generator=generator)

    def config(self) -> dict[str, object]:
        """The JSON-able config that rebuilds this model."""
        return asdict(self.cfg)

    def features(self, images: Tensor) -> Tensor:
        """Final token states ``(B, 1 + N, D)`` (CLS first) of ``images (B, C, H, W)``."""
        x = self.patches(images)  # (B, N, D)
        cls = self.cls.expand(x.shape[0], -1, -1).to(x.dtype)  # (B, 1, D)
        x = self.pos(torch.cat([cls, x], dim=1))  # (B, 1 + N, D)
        return self.encoder(self.dropout(x))  # (B, 1 + N, D)

    def forward(self, images: Tensor) -> Tensor:
        """Class logits ``(B, num_classes)`` of ``images (B, C, H, W)``."""
        return self.head(self.features(images)[:, 0])
