"""A small VAE (Kingma & Welling, 2014) for 8x8 one-channel images, whose decoder attends
over its spatial positions.

The encoder maps an image to the mean and log-variance of a diagonal Gaussian ``q(z|x)``;
the decoder maps ``z`` back to an image in [-1, 1], with a
:class:`~attnlab.models.gan.SelfAttention2d` over the 8x8 positions of its last feature map
(gated by ``gamma``, initialised to 0). ``VAEConfig(attention=False)`` is the same VAE
without that layer. The loss (:func:`vae_loss`) is the negative ELBO with a Gaussian
likelihood of fixed variance: ``sum((x - x_hat)^2) / (2 sigma^2) + KL(q(z|x) || N(0, I))``
per image.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn

from attnlab._validate import (
    instance_of,
    plain_fields,
    positive_int,
    positive_real,
    same_dtype,
    validate_flag,
)
from attnlab.models.gan import IMAGE_SIZE, SelfAttention2d, check_latents, draw_latents
from attnlab.models.vit import check_images

__all__ = ["VAE", "VAEConfig", "VAEOutput", "vae_loss"]


@dataclass
class VAEConfig:
    """Sizes of a :class:`VAE` (8x8 one-channel images in [-1, 1])."""

    latent_dim: int = 16
    channels: int = 32
    heads: int = 1
    attention: bool = True
    sigma: float = 0.5  # the likelihood's standard deviation (images in [-1, 1])

    def __post_init__(self) -> None:
        plain_fields(self)  # numpy scalars as Python's: the config stays JSON-able
        positive_int("latent_dim", self.latent_dim)
        positive_int("channels", self.channels)
        positive_int("heads", self.heads)
        if self.channels % self.heads:
            raise ValueError(f"channels={self.channels} must be a multiple of heads={self.heads}")
        validate_flag("attention", self.attention)
        positive_real("sigma", self.sigma)


@dataclass
class VAEOutput:
    recon: Tensor  # (B, 1, 8, 8) decoder means in [-1, 1]
    mu: Tensor  # (B, latent_dim)
    logvar: Tensor  # (B, latent_dim)


def vae_loss(out: VAEOutput, images: Tensor, sigma: float) -> tuple[Tensor, Tensor, Tensor]:
    """``(loss, reconstruction, kl)``, each a mean over the batch of per-image sums:
    reconstruction ``sum((x - x_hat)^2) / (2 sigma^2)``, ``kl = -0.5 * sum(1 + logvar -
    mu^2 - exp(logvar))``, ``loss = reconstruction + kl`` (the negative ELBO up to a
    constant).

    ``out.recon`` must have the shape of ``images`` and ``out.mu``, ``out.logvar`` their
    batch (they were broadcast); an empty batch is a ValueError (a mean over no image: NaN),
    as :func:`~attnlab.tasks.generative.frechet_distance` refuses too few features.

    Example:
        >>> o = VAEOutput(torch.zeros(1, 1, 8, 8), torch.zeros(1, 2), torch.zeros(1, 2))
        >>> [abs(float(t)) for t in vae_loss(o, torch.ones(1, 1, 8, 8), 1.0)]
        [32.0, 32.0, 0.0]
    """
    sigma = positive_real("sigma", sigma)  # (0 gave an infinite loss)
    b = _batch_of(out, images)
    rec = (images - out.recon).pow(2).sum() / (2 * sigma**2) / b
    kl = -0.5 * (1 + out.logvar - out.mu.pow(2) - out.logvar.exp()).sum() / b
    return rec + kl, rec, kl


def _batch_of(out: VAEOutput, images: Tensor) -> int:
    """The batch ``B >= 1`` of ``images`` that ``out`` matches, or a ValueError naming both
    (a TypeError if ``out`` is no VAEOutput or ``images`` no tensor)."""
    instance_of("out", out, VAEOutput, "a VAEOutput (what VAE returns)")
    instance_of("images", images, Tensor, "a tensor (B, 1, 8, 8)")
    if out.recon.shape != images.shape:
        raise ValueError(
            f"out.recon and images must have the same shape (B, 1, 8, 8), got out.recon "
            f"{tuple(out.recon.shape)} and images {tuple(images.shape)}"
        )
    b = len(images)
    if out.mu.shape != out.logvar.shape or out.mu.dim() != 2 or len(out.mu) != b:
        raise ValueError(
            f"out.mu and out.logvar must have shape (B, latent_dim) with images' B = {b}, "
            f"got out.mu {tuple(out.mu.shape)} and out.logvar {tuple(out.logvar.shape)}"
        )
    if b == 0:
        raise ValueError(f"images must hold at least 1 image, got shape {tuple(images.shape)}")
    return b


class VAE(nn.Module):
    """Convolutional encoder (8x8 -> 4x4 -> 2x2 -> Gaussian), decoder (2x2 -> 4x4 -> 8x8,
    self-attention over the 64 positions when ``cfg.attention``, -> image).

    Example:
        >>> vae = VAE(VAEConfig(latent_dim=4, channels=8))
        >>> out = vae(torch.rand(3, 1, 8, 8) * 2 - 1)
        >>> tuple(out.recon.shape), tuple(out.mu.shape), tuple(vae.sample(2).shape)
        ((3, 1, 8, 8), (3, 4), (2, 1, 8, 8))
    """

    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        c = cfg.channels
        self.encoder = nn.Sequential(
            nn.Conv2d(1, c, 4, stride=2, padding=1),
            nn.SiLU(),
            nn.Conv2d(c, 2 * c, 4, stride=2, padding=1),
            nn.SiLU(),
            nn.Flatten(),
            nn.Linear(2 * c * 4, 2 * cfg.latent_dim),
        )
        self.project = nn.Linear(cfg.latent_dim, 2 * c * 4)
        self.up = nn.Sequential(
            nn.SiLU(),
            nn.ConvTranspose2d(2 * c, c, 4, stride=2, padding=1),
            nn.SiLU(),
            nn.ConvTranspose2d(c, c, 4, stride=2, padding=1),
            nn.SiLU(),
        )
        self.attn = (
            SelfAttention2d(c, cfg.heads, spectral=False) if cfg.attention else nn.Identity()
        )
        self.to_image = nn.Sequential(nn.Conv2d(c, 1, 3, padding=1), nn.Tanh())

    def config(self) -> dict[str, object]:
        """The JSON-able config that rebuilds this model."""
        return asdict(self.cfg)

    def encode(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """``(mu, logvar)``, each ``(B, latent_dim)``, of ``images (B, 1, 8, 8)``."""
        images = check_images(images, 1, IMAGE_SIZE)
        h = self.encoder(same_dtype("images", images, next(self.parameters()).dtype))
        mu, logvar = h.chunk(2, dim=-1)
        return mu, logvar.clamp(-10.0, 10.0)

    def decode(self, z: Tensor) -> Tensor:
        """Images ``(B, 1, 8, 8)`` in [-1, 1] from ``z (B, latent_dim)``."""
        z = check_latents(z, self.cfg.latent_dim, next(self.parameters()).dtype)
        x = self.project(z).view(len(z), 2 * self.cfg.channels, 2, 2)  # (B, 2C, 2, 2)
        x = self.attn(self.up(x))  # (B, C, 8, 8)
        return self.to_image(x)  # (B, 1, 8, 8)

    def forward(self, images: Tensor) -> VAEOutput:
        """Reconstructions of ``images (B, 1, 8, 8)`` through a reparameterized sample."""
        mu, logvar = self.encode(images)
        z = mu + torch.randn_like(mu) * (0.5 * logvar).exp()  # (B, latent_dim)
        return VAEOutput(self.decode(z), mu, logvar)

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """``n`` images ``(n, 1, 8, 8)`` decoded from ``z ~ N(0, I)`` on the model's device
        (latents from :func:`~attnlab.models.gan.draw_latents`)."""
        z = draw_latents(n, self.cfg.latent_dim, self, generator)  # (n, latent_dim)
        return self.decode(z)
