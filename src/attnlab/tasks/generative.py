"""Generative attention on scikit-learn's 8x8 digits: a self-attention GAN and a VAE with
an attending decoder, each against the same model without attention, scored in the
feature space of the vision task's ViT.

Data: the training split of :func:`attnlab.tasks.vision.load_split` (1437 images at the
default ``test_fraction=0.2, seed=0``), scaled from [0, 1] to [-1, 1].

Scores (:class:`DigitsScorer`):

- **Fréchet distance** (as FID, Heusel et al. 2017, with a different feature extractor):
  features are the ViT's pooled representation before its classifier head, i.e. the final
  (layer-normed) CLS state ``ViT.features(x)[:, 0]``, ``(N, D)``, of images mapped back to
  [0, 1]. With ``mu_r, S_r`` the mean and covariance (``ddof=1``) of the real images'
  features and ``mu_g, S_g`` those of the generated images' features, in float64,
  ``FD = ||mu_r - mu_g||^2 + tr(S_r + S_g - 2 (S_r S_g)^(1/2))``, the matrix square root
  by :func:`scipy.linalg.sqrtm` (its real part; the result clamped at 0). The real
  reference is the whole training split; lower is better.
- **Class coverage**: the ViT classifies every generated image; coverage is the share of
  the 10 classes that receive at least ``5%`` of the samples (so 1.0 = every digit
  is generated at least half as often as a uniform generator would; a generator that
  collapses to few digits scores low).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch
from numpy.typing import NDArray
from torch import Tensor

from attnlab._validate import positive_int
from attnlab.models.gan import GAN, GANConfig, d_hinge_loss, g_hinge_loss
from attnlab.models.vae import VAE, VAEConfig, vae_loss
from attnlab.models.vit import ViT, check_images
from attnlab.tasks.vision import DigitsTask, load_split

__all__ = [
    "DigitsScorer",
    "TrainResult",
    "class_coverage",
    "digits",
    "frechet_distance",
    "train_feature_vit",
    "train_gan",
    "train_vae",
    "vit_features",
]


def digits(n: int | None = None, *, seed: int = 0) -> tuple[Tensor, Tensor]:
    """The vision task's training images ``(N, 1, 8, 8)`` scaled to [-1, 1], and labels.

    Example:
        >>> x, y = digits(100)
        >>> tuple(x.shape), float(x.min()), float(x.max())
        ((100, 1, 8, 8), -1.0, 1.0)
    """
    x, y, _, _ = load_split(0.2, seed)
    if n is not None:
        n = positive_int("n", n)
        x, y = x[:n], y[:n]
    return x * 2 - 1, y


def frechet_distance(
    real: Tensor | NDArray[np.float64], fake: Tensor | NDArray[np.float64]
) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets ``(N, D)`` and
    ``(M, D)``: ``||mu_r - mu_g||^2 + tr(S_r + S_g - 2 sqrtm(S_r S_g))`` (float64,
    covariances with ``ddof=1``).

    Example:
        >>> f = torch.randn(50, 4)
        >>> round(frechet_distance(f, f), 6)
        0.0
    """
    a, b = _features64("real", real), _features64("fake", fake)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"real and fake need the same feature width, got {a.shape} and {b.shape}")
    from scipy.linalg import sqrtm

    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)  # (D, D)
    root = np.real(sqrtm(s_a @ s_b))
    fd = float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a + s_b - 2 * root))
    return max(fd, 0.0)


def _features64(name: str, x: Tensor | NDArray[np.float64]) -> NDArray[np.float64]:
    """``x`` as a float64 array ``(N, D)`` with ``N >= 2``, or an error naming ``name``."""
    arr = x.detach().double().cpu().numpy() if isinstance(x, Tensor) else np.asarray(x, float)
    if arr.ndim != 2 or arr.shape[0] < 2:
        raise ValueError(f"{name} must be features (N, D) with N >= 2, got shape {arr.shape}")
    return arr


def class_coverage(pred: Tensor, classes: int = 10, threshold: float = 0.05) -> float:
    """Share of ``classes`` that receive at least ``threshold`` of the predictions ``pred``.

    Example:
        >>> class_coverage(torch.tensor([0, 0, 1, 2]), classes=4, threshold=0.25)
        0.75
    """
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    counts = torch.bincount(pred.flatten(), minlength=positive_int("classes", classes))
    share = counts.double() / max(pred.numel(), 1)  # (classes,)
    return float((share >= threshold - 1e-12).double().mean())


def train_feature_vit(steps: int = 400, *, seed: int = 0, batch_size: int = 128) -> ViT:
    """A ViT trained by the vision task's own :class:`DigitsTask` (its model, batches and
    loss) with Adam for ``steps`` steps; returned in eval mode.

    Example:
        >>> vit = train_feature_vit(2)
        >>> vit.training
        False
    """
    torch.manual_seed(seed)
    task = DigitsTask(seed=seed)
    model = task.build_model()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    for _ in range(positive_int("steps", steps)):
        idx = torch.randint(0, task.num_train(), (positive_int("batch_size", batch_size),))
        loss = task.loss(model, task.batch(idx))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert isinstance(model, ViT)
    return model.eval()


@torch.no_grad()
def vit_features(vit: ViT, images: Tensor) -> tuple[Tensor, Tensor]:
    """``(features (N, D), predicted classes (N,))`` of ``images (N, 1, 8, 8)`` in
    [-1, 1]: the pooled CLS state before the head, and the head's argmax."""
    x = (check_images(images, 1, 8).clamp(-1, 1) + 1) / 2  # (N, 1, 8, 8) in [0, 1]
    feats = torch.cat([vit.features(c)[:, 0] for c in x.split(512)])  # (N, D)
    return feats, vit.head(feats).argmax(-1)


@dataclass
class DigitsScorer:
    """Fréchet distance and class coverage of generated digits (see the module docstring).

    Example:
        >>> vit = train_feature_vit(2)
        >>> scorer = DigitsScorer(vit, digits(200)[0])
        >>> s = scorer.score(digits(200)[0])
        >>> round(s["frechet"], 6), 0.0 <= s["coverage"] <= 1.0
        (0.0, True)
    """

    vit: ViT
    real: Tensor  # (N, 1, 8, 8) in [-1, 1]
    real_features: Tensor = field(init=False)

    def __post_init__(self) -> None:
        self.real_features = vit_features(self.vit, self.real)[0]

    def score(self, images: Tensor) -> dict[str, float]:
        """``{"frechet": ..., "coverage": ...}`` of ``images (M, 1, 8, 8)`` in [-1, 1]."""
        feats, pred = vit_features(self.vit, images)
        fd = frechet_distance(self.real_features, feats)
        return {"frechet": round(fd, 4), "coverage": class_coverage(pred)}


@dataclass
class TrainResult:
    """A trained model, its per-step losses and the training time in seconds."""

    model: GAN | VAE
    losses: list[float]  # the discriminator's (GAN) or the negative ELBO (VAE), per step
    seconds: float


def _batches(n: int, steps: int, batch_size: int) -> list[Tensor]:
    """``steps`` random index batches ``(batch_size,)`` over ``n`` items (torch's RNG)."""
    return [torch.randint(0, n, (batch_size,)) for _ in range(steps)]


def _check_images_and_budget(images: Tensor, steps: int, batch_size: int) -> None:
    check_images(images, 1, 8)
    positive_int("steps", steps)
    positive_int("batch_size", batch_size)


def train_gan(
    cfg: GANConfig,
    images: Tensor,
    *,
    steps: int,
    batch_size: int = 64,
    lr_g: float = 1e-4,
    lr_d: float = 4e-4,
    seed: int = 0,
) -> TrainResult:
    """Hinge-loss GAN training on ``images (N, 1, 8, 8)`` in [-1, 1]: per step one
    discriminator and one generator update, Adam with ``betas=(0, 0.9)`` and SAGAN's two
    learning rates (TTUR). ``losses`` are the discriminator's.

    Example:
        >>> r = train_gan(GANConfig(latent_dim=4, channels=8), digits(64)[0], steps=2)
        >>> len(r.losses)
        2
    """
    _check_images_and_budget(images, steps, batch_size)
    torch.manual_seed(seed)
    gan, t0 = GAN(cfg), time.perf_counter()
    opt_g = torch.optim.Adam(gan.generator.parameters(), lr=lr_g, betas=(0.0, 0.9))
    opt_d = torch.optim.Adam(gan.discriminator.parameters(), lr=lr_d, betas=(0.0, 0.9))
    losses = []
    for idx in _batches(len(images), steps, batch_size):
        z = torch.randn(batch_size, cfg.latent_dim)
        fake = gan.generator(z)  # (B, 1, 8, 8)
        d_loss = d_hinge_loss(gan.discriminator(images[idx]), gan.discriminator(fake.detach()))
        opt_d.zero_grad()
        d_loss.backward()
        opt_d.step()
        g_loss = g_hinge_loss(gan.discriminator(fake))
        opt_g.zero_grad()
        g_loss.backward()
        opt_g.step()
        losses.append(d_loss.item())
    return TrainResult(gan.eval(), losses, time.perf_counter() - t0)


def train_vae(
    cfg: VAEConfig,
    images: Tensor,
    *,
    steps: int,
    batch_size: int = 64,
    lr: float = 2e-3,
    seed: int = 0,
) -> TrainResult:
    """Negative-ELBO training (:func:`~attnlab.models.vae.vae_loss`) with Adam on
    ``images (N, 1, 8, 8)`` in [-1, 1].

    Example:
        >>> r = train_vae(VAEConfig(latent_dim=4, channels=8), digits(64)[0], steps=2)
        >>> len(r.losses)
        2
    """
    _check_images_and_budget(images, steps, batch_size)
    torch.manual_seed(seed)
    vae, t0 = VAE(cfg), time.perf_counter()
    opt = torch.optim.Adam(vae.parameters(), lr=lr)
    losses = []
    for idx in _batches(len(images), steps, batch_size):
        loss = vae_loss(vae(images[idx]), images[idx], cfg.sigma)[0]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return TrainResult(vae.eval(), losses, time.perf_counter() - t0)
