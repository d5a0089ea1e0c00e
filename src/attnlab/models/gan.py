"""A small self-attention GAN (Zhang et al., 2019) for 8x8 one-channel images.

SAGAN's three ingredients, kept visible:

- :class:`SelfAttention2d`: every spatial position attends over all ``h * w`` positions of
  the feature map through :func:`attnlab.attention` in the ``(B, H, L, E)`` layout, and the
  result enters the residual stream through a learned gate ``gamma`` initialised to 0
  (so the block starts as the identity);
- spectral normalization (:func:`torch.nn.utils.parametrizations.spectral_norm`) on every
  convolution and linear layer of the generator and the discriminator;
- the hinge loss (:func:`d_hinge_loss`, :func:`g_hinge_loss`).

``GANConfig(attention=False)`` builds the same networks without the attention blocks: the
baseline that the attention is measured against.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.parametrizations import spectral_norm

from attnlab._validate import plain_fields, positive_int, same_dtype, validate_flag
from attnlab.functional import attention
from attnlab.models.vit import check_images
from attnlab.nn._modes import eval_mode

__all__ = [
    "GAN",
    "Discriminator",
    "GANConfig",
    "Generator",
    "SelfAttention2d",
    "d_hinge_loss",
    "g_hinge_loss",
    "sn",
]

IMAGE_SIZE = 8


def sn(module: nn.Module, enabled: bool = True) -> nn.Module:
    """``module`` with spectral normalization of its ``weight`` (or unchanged when not
    ``enabled``): the weight used is ``W / sigma_max(W)``, ``sigma_max`` estimated by power
    iteration (one step per training forward).

    Example:
        >>> lin = sn(nn.Linear(4, 3))
        >>> hasattr(lin, "parametrizations")
        True
    """
    return spectral_norm(module) if enabled else module


def draw_latents(
    n: int, latent_dim: int, like: nn.Module, generator: torch.Generator | None = None
) -> Tensor:
    """``z ~ N(0, I)`` of shape ``(n, latent_dim)`` on the device and dtype of ``like``'s
    parameters.

    The draw runs on ``generator``'s device (on ``like``'s without one) and then moves, so
    a seeded CPU generator gives the same latents wherever the model lives.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> tuple(draw_latents(2, 4, nn.Linear(4, 1).to("meta"), g).shape)
        (2, 4)
    """
    n, latent_dim = positive_int("n", n), positive_int("latent_dim", latent_dim)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(
            f"generator must be a torch.Generator or None, got {type(generator).__name__}"
        )
    p = next(like.parameters())
    where = p.device if generator is None else generator.device
    z = torch.randn(n, latent_dim, generator=generator, device=where)  # (n, latent_dim)
    return z.to(p.device, p.dtype)


def check_latents(z: object, latent_dim: int, dtype: torch.dtype) -> Tensor:
    """``z`` as a floating-point tensor ``(B, latent_dim)``, or an error naming ``z``
    (``dtype``: the model's, named in the message).

    Example:
        >>> check_latents(torch.zeros(2, 4, dtype=torch.long), 4, torch.float32)
        ... # doctest: +ELLIPSIS
        Traceback (most recent call last):
        TypeError: z must be a floating-point tensor (torch.float32, ...), got dtype torch.int64
    """
    z = _floating("z", z, f"({dtype}, the model's dtype)")
    same_dtype("z", z, dtype)
    if z.dim() != 2 or z.shape[1] != latent_dim:
        raise ValueError(
            f"z must have shape (B, latent_dim) = (B, {latent_dim}), got {tuple(z.shape)}"
        )
    return z


def _floating(name: str, x: object, want: str) -> Tensor:
    """``x`` if a floating-point tensor, or a TypeError naming ``name`` (``want``: said after
    what is expected)."""
    if not isinstance(x, Tensor) or not x.is_floating_point():
        seen = f"dtype {x.dtype}" if isinstance(x, Tensor) else type(x).__name__
        raise TypeError(f"{name} must be a floating-point tensor {want}, got {seen}")
    return x


def d_hinge_loss(real_logits: Tensor, fake_logits: Tensor) -> Tensor:
    """Discriminator hinge loss ``mean(relu(1 - D(x))) + mean(relu(1 + D(G(z))))``; an
    empty batch is a ValueError (a mean over no logit: NaN), as in
    :func:`~attnlab.models.vae.vae_loss`.

    Example:
        >>> float(d_hinge_loss(torch.tensor([2.0, 0.0]), torch.tensor([-2.0, 0.5])))
        1.25
    """
    real, fake = _logits("real_logits", real_logits), _logits("fake_logits", fake_logits)
    return F.relu(1.0 - real).mean() + F.relu(1.0 + fake).mean()


def g_hinge_loss(fake_logits: Tensor) -> Tensor:
    """Generator hinge loss ``-mean(D(G(z)))``; an empty batch is a ValueError (NaN).

    Example:
        >>> float(g_hinge_loss(torch.tensor([1.0, 3.0])))
        -2.0
        >>> g_hinge_loss(torch.zeros(0))
        Traceback (most recent call last):
        ...
        ValueError: fake_logits must hold at least 1 logit, got shape (0,)
    """
    return -_logits("fake_logits", fake_logits).mean()


def _logits(name: str, x: object) -> Tensor:
    """``x`` if a floating-point tensor of at least one logit, else an error naming ``name``
    (the mean over an empty batch was NaN)."""
    logits = _floating(name, x, "of discriminator logits")
    if logits.numel() == 0:
        raise ValueError(f"{name} must hold at least 1 logit, got shape {tuple(logits.shape)}")
    return logits


class SelfAttention2d(nn.Module):
    """SAGAN's self-attention over the ``h * w`` positions of a feature map.

    ``q, k = W_q x, W_k x`` (1x1 convolutions to ``heads * key_dim``), ``v = W_v x``
    (to ``channels``); per head, ``o = softmax(q k^T) v`` (no ``1/sqrt(E)`` scale, as in
    SAGAN) over the ``L = h * w`` positions; ``out = x + gamma * W_o o`` with the scalar
    ``gamma`` initialised to 0.

    Args:
        channels: ``C`` of the input ``(B, C, h, w)``; a multiple of ``heads``.
        heads: attention heads ``H``.
        key_dim: per-head query/key width ``E`` (default ``max(1, C // 8 // heads)``).
        spectral: spectral-normalize the four 1x1 convolutions (a bool).

    Example:
        >>> att = SelfAttention2d(16, heads=2)
        >>> x = torch.randn(3, 16, 8, 8)
        >>> bool(torch.equal(att(x), x))  # gamma = 0: the identity
        True
    """

    def __init__(
        self, channels: int, heads: int = 1, key_dim: int | None = None, spectral: bool = True
    ) -> None:
        super().__init__()
        c, self.heads = positive_int("channels", channels), positive_int("heads", heads)
        self.channels = c
        spectral = validate_flag("spectral", spectral)  # "no" is truthy: it was on
        if c % self.heads:
            raise ValueError(f"channels={c} must be a multiple of heads={self.heads}")
        e = max(1, c // 8 // self.heads) if key_dim is None else positive_int("key_dim", key_dim)
        self.key_dim = e
        self.query = sn(nn.Conv2d(c, self.heads * e, 1, bias=False), spectral)
        self.key = sn(nn.Conv2d(c, self.heads * e, 1, bias=False), spectral)
        self.value = sn(nn.Conv2d(c, c, 1, bias=False), spectral)
        self.out = sn(nn.Conv2d(c, c, 1, bias=False), spectral)
        self.gamma = nn.Parameter(torch.zeros(()))

    def reset_parameters(self) -> None:
        """Set the residual gate ``gamma`` to 0 again, as when built (SAGAN)."""
        nn.init.zeros_(self.gamma)

    def _check(self, x: object) -> Tensor:
        """``x`` as a floating-point ``(B, C, H, W)`` with this layer's ``C`` and dtype, or
        an error (the dtype read off ``gamma``: a spectral-normed weight would step its
        power iteration)."""
        x = _floating("x", x, "(B, C, H, W)")
        if x.dim() != 4 or x.shape[1] != self.channels:
            raise ValueError(
                f"x must have shape (B, C, H, W) with C = channels = {self.channels}, "
                f"got {tuple(x.shape)}"
            )
        return same_dtype("x", x, self.gamma.dtype)

    def _heads(self, x: Tensor) -> Tensor:
        """``(B, H * E, h, w) -> (B, H, L, E)`` with ``L = h * w`` (row-major)."""
        b, he, h, w = x.shape
        return x.view(b, self.heads, he // self.heads, h * w).transpose(2, 3)  # (B, H, L, E)

    def weights(self, x: Tensor) -> Tensor:
        """Attention weights ``(B, H, L, L)`` of ``x (B, C, h, w)`` (for pictures)."""
        x = self._check(x)
        q, k = self._heads(self.query(x)), self._heads(self.key(x))  # (B, H, L, E)
        return torch.softmax(q @ k.transpose(-1, -2), dim=-1)  # (B, H, L, L)

    def forward(self, x: Tensor) -> Tensor:
        """``x (B, C, h, w) -> x + gamma * attention (B, C, h, w)``."""
        b, c, h, w = self._check(x).shape
        q, k = self._heads(self.query(x)), self._heads(self.key(x))  # (B, H, L, E)
        v = self._heads(self.value(x))  # (B, H, L, C / H)
        o = attention(q, k, v, scale=1.0)  # (B, H, L, C / H)
        assert isinstance(o, Tensor)
        o = o.transpose(2, 3).reshape(b, c, h, w)  # (B, C, h, w)
        return x + self.gamma * self.out(o)


@dataclass
class GANConfig:
    """Sizes of a :class:`GAN` (8x8 one-channel images in [-1, 1])."""

    latent_dim: int = 32
    channels: int = 64
    heads: int = 1
    attention: bool = True

    def __post_init__(self) -> None:
        plain_fields(self)  # numpy scalars as Python's: the config stays JSON-able
        positive_int("latent_dim", self.latent_dim)
        positive_int("channels", self.channels)
        positive_int("heads", self.heads)
        validate_flag("attention", self.attention)  # "no" is truthy: attention stayed on
        if self.channels % 2 or (self.channels // 2) % self.heads:
            raise ValueError(
                f"channels={self.channels} must be even and channels // 2 a multiple of "
                f"heads={self.heads}"
            )


def _up(c_in: int, c_out: int) -> nn.Sequential:
    """Nearest 2x upsampling, a spectral-normalized 3x3 conv, batch norm, ReLU."""
    return nn.Sequential(
        nn.Upsample(scale_factor=2.0, mode="nearest"),
        sn(nn.Conv2d(c_in, c_out, 3, padding=1)),
        nn.BatchNorm2d(c_out),
        nn.ReLU(),
    )


class Generator(nn.Module):
    """``z (B, latent_dim) -> images (B, 1, 8, 8)`` in [-1, 1]: 2x2 -> 4x4 -> 8x8, with a
    :class:`SelfAttention2d` at 8x8 when ``cfg.attention``.

    Example:
        >>> g = Generator(GANConfig(latent_dim=4, channels=8))
        >>> tuple(g(torch.randn(2, 4)).shape)
        (2, 1, 8, 8)
    """

    def __init__(self, cfg: GANConfig) -> None:
        super().__init__()
        c = cfg.channels
        self.cfg = cfg
        self.project = sn(nn.Linear(cfg.latent_dim, c * 4))
        self.blocks = nn.Sequential(_up(c, c), _up(c, c // 2))
        self.attn = SelfAttention2d(c // 2, cfg.heads) if cfg.attention else nn.Identity()
        self.to_image = nn.Sequential(
            nn.BatchNorm2d(c // 2), nn.ReLU(), sn(nn.Conv2d(c // 2, 1, 3, padding=1)), nn.Tanh()
        )

    def forward(self, z: Tensor) -> Tensor:
        """Images ``(B, 1, 8, 8)`` from latents ``z (B, latent_dim)``."""
        z = check_latents(z, self.cfg.latent_dim, next(self.parameters()).dtype)
        x = self.project(z).view(len(z), self.cfg.channels, 2, 2)  # (B, C, 2, 2)
        x = self.blocks(x)  # (B, C/2, 8, 8)
        return self.to_image(self.attn(x))  # (B, 1, 8, 8)


class Discriminator(nn.Module):
    """``images (B, 1, 8, 8) -> logits (B,)``: 8x8 (self-attention when
    ``cfg.attention``) -> 4x4 -> 2x2 -> summed features -> linear; every layer
    spectral-normalized.

    Example:
        >>> d = Discriminator(GANConfig(channels=8))
        >>> tuple(d(torch.randn(2, 1, 8, 8)).shape)
        (2,)
    """

    def __init__(self, cfg: GANConfig) -> None:
        super().__init__()
        c = cfg.channels
        self.stem = nn.Sequential(sn(nn.Conv2d(1, c // 2, 3, padding=1)), nn.LeakyReLU(0.1))
        self.attn = SelfAttention2d(c // 2, cfg.heads) if cfg.attention else nn.Identity()
        self.down = nn.Sequential(
            sn(nn.Conv2d(c // 2, c, 4, stride=2, padding=1)),
            nn.LeakyReLU(0.1),
            sn(nn.Conv2d(c, 2 * c, 4, stride=2, padding=1)),
            nn.LeakyReLU(0.1),
        )
        self.head = sn(nn.Linear(2 * c, 1))

    def forward(self, images: Tensor) -> Tensor:
        """Logits ``(B,)`` of ``images (B, 1, 8, 8)``."""
        dtype = next(self.parameters()).dtype  # (not head.weight: spectral norm would step)
        images = same_dtype("images", check_images(images, 1, IMAGE_SIZE), dtype)
        x = self.stem(images)  # (B, C/2, 8, 8)
        x = self.down(self.attn(x))  # (B, 2C, 2, 2)
        return self.head(x.sum(dim=(2, 3))).squeeze(-1)  # (B,)


class GAN(nn.Module):
    """A generator and a discriminator built from one :class:`GANConfig`.

    Example:
        >>> gan = GAN(GANConfig(latent_dim=4, channels=8, attention=False))
        >>> tuple(gan.sample(3).shape)
        (3, 1, 8, 8)
    """

    def __init__(self, cfg: GANConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.generator = Generator(cfg)
        self.discriminator = Discriminator(cfg)

    def config(self) -> dict[str, object]:
        """The JSON-able config that rebuilds this model."""
        return asdict(self.cfg)

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """``n`` images ``(n, 1, 8, 8)`` in [-1, 1], the generator in eval mode, on the
        model's device (latents from :func:`draw_latents`)."""
        z = draw_latents(n, self.cfg.latent_dim, self.generator, generator)  # (n, latent)
        with eval_mode(self.generator):
            return self.generator(z)
