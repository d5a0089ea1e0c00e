"""``attnlab train gan | gan-plain | vae | vae-plain``: the self-attention GAN and the VAE
with an attending decoder (``-plain``: the same model without attention) as tasks of
:class:`attnlab.train.Trainer`, with its checkpoints, ``--resume``, Ctrl-C handling,
progress and time limits. Scores are :mod:`attnlab.tasks.generative`'s: the Fréchet
distance of ``samples`` generated images in the scoring ViT's features (``score = -FD``,
so higher is better) and class coverage.

A GAN on one optimizer: the trainer takes one AdamW step over all parameters after one
``backward`` of :meth:`GANTask.loss`, which returns

    L = L_D(D(x), D(sg(G(z)))) + L_G(D_sg(G(z)))

where ``sg`` stops gradients: the fake images are detached inside ``L_D``, so ``L_D``
reaches only D's parameters, and in ``L_G`` the discriminator runs on detached copies of
its parameters (:func:`torch.func.functional_call`), so ``L_G`` reaches only G's. A step
is therefore a simultaneous update: D on ``L_D`` and G on ``L_G`` from the same point, as
two optimizers would take it. :meth:`GANTask.param_groups` gives G and D their own learning
rates (TTUR: G at ``lr * g_lr_scale``, D at ``lr``) and Adam betas ``(0, 0.9)``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from attnlab._validate import instance_of, positive_int, positive_real
from attnlab.models.gan import GAN, GANConfig, d_hinge_loss, g_hinge_loss
from attnlab.models.vae import VAE, VAEConfig, vae_loss
from attnlab.models.vit import check_images
from attnlab.tasks import generative
from attnlab.tasks.generative import DigitsScorer, digits
from attnlab.tasks.options import DataOptions
from attnlab.tasks.registry import TaskSpec
from attnlab.tasks.vision import TRAIN_IMAGES
from attnlab.train import TrainConfig, Trainer
from attnlab.train.checkpoint import digest
from attnlab.train.loop import Task

__all__ = [
    "GAN_DEFAULTS",
    "GAN_PLAIN_SPEC",
    "GAN_SPEC",
    "VAE_DEFAULTS",
    "VAE_PLAIN_SPEC",
    "VAE_SPEC",
    "GANBatch",
    "GANTask",
    "TrainResult",
    "VAETask",
    "gan_losses",
    "train_gan",
    "train_vae",
]

# TrainConfig settings of ``attnlab train gan`` / ``vae`` (and of train_gan / train_vae)
GAN_DEFAULTS: dict[str, Any] = {
    "steps": 2000,
    "batch_size": 64,
    "lr": 4e-4,  # the discriminator's; the generator's is lr * g_lr_scale = 1e-4
    "warmup": 0,
    "weight_decay": 0.0,
    "clip": 0.0,
    "eval_every": 250,
    "threads": 1,
}
VAE_DEFAULTS: dict[str, Any] = GAN_DEFAULTS | {"steps": 3000, "lr": 2e-3, "eval_every": 500}


@dataclass
class GANBatch:
    real: Tensor  # (B, 1, 8, 8) in [-1, 1]
    z: Tensor  # (B, latent_dim)


def gan_losses(gan: GAN, real: Tensor, z: Tensor) -> tuple[Tensor, Tensor]:
    """``(L_D, L_G)`` of one step: ``L_D`` the hinge loss of D on ``real (B, 1, 8, 8)`` and
    on ``G(z)`` detached (its gradient reaches D only), ``L_G`` the hinge loss of G through
    D with detached parameters (its gradient reaches G only).

    Example:
        >>> gan = GAN(GANConfig(latent_dim=4, channels=8))
        >>> d, g = gan_losses(gan, torch.zeros(2, 1, 8, 8), torch.randn(2, 4))
        >>> d.requires_grad and g.requires_grad
        True
    """
    fake = gan.generator(z)  # (B, 1, 8, 8)
    d_loss = d_hinge_loss(gan.discriminator(real), gan.discriminator(fake.detach()))
    frozen = {n: p.detach() for n, p in gan.discriminator.named_parameters()}
    g_loss = g_hinge_loss(functional_call(gan.discriminator, frozen, (fake,)))
    return d_loss, g_loss


class _DigitsGenerative(DataOptions):
    """What the GAN and VAE tasks share: training images, evaluation, sampling."""

    name: str

    def __init__(self, train_size: int | None, images: Tensor | None, samples: int) -> None:
        if images is not None and train_size is not None:
            raise ValueError("give train_size or images, not both")
        custom = images is not None
        if images is None:
            n = None if train_size is None else positive_int("train_size", train_size)
            full = digits()[0]
            if n is not None and n > len(full):
                raise ValueError(f"train_size={n} is more than the {len(full)} training images")
            images = full[:n]
        self.images = check_images(images, 1, 8)  # (N, 1, 8, 8) in [-1, 1]
        self.samples = positive_int("samples", samples)
        given = digest({"images": self.images.detach().cpu()}) if custom else None
        self.data_options = {"samples": self.samples, "images": given}  # (custom: a digest)
        self.seed = 0  # of the data split and the scoring ViT (evaluation noise: seed 1)
        self._scorer: DigitsScorer | None = None

    def num_train(self) -> int:
        return len(self.images)

    def scorer(self) -> DigitsScorer:
        """The scorer against the whole training split (its ViT trained once, cached)."""
        if self._scorer is None:
            vit = generative.feature_vit(None, seed=self.seed)
            self._scorer = DigitsScorer(vit, digits(seed=self.seed)[0])
        return self._scorer

    def generate(self, model: nn.Module, n: int, seed: int = 1) -> Tensor:
        """``n`` images ``(n, 1, 8, 8)`` from a fixed noise seed (the global RNG untouched)."""
        assert isinstance(model, GAN | VAE)
        return model.sample(n, generator=torch.Generator().manual_seed(seed))

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """Fréchet distance and coverage of ``samples`` images; ``score = -frechet``."""
        s = self.scorer().score(self.generate(model, self.samples))
        return {**s, "score": -s["frechet"]}


class GANTask(_DigitsGenerative):
    """The self-attention GAN (``cfg.attention``) or its plain twin on the digits.

    Args:
        train_size: the first ``train_size`` training images (None: all 1437).
        cfg: the model (default :class:`~attnlab.models.gan.GANConfig()`).
        images: train on these ``(N, 1, 8, 8)`` in [-1, 1] instead.
        g_lr_scale: the generator's learning rate as a share of the discriminator's.
        samples: generated images per evaluation.

    Example:
        >>> task = GANTask(64, cfg=GANConfig(latent_dim=4, channels=8, attention=False))
        >>> task.name, task.num_train(), tuple(task.batch(torch.arange(3)).z.shape)
        ('gan-plain', 64, (3, 4))
    """

    def __init__(
        self,
        train_size: int | None = None,
        *,
        cfg: GANConfig | None = None,
        images: Tensor | None = None,
        g_lr_scale: float = 0.25,
        samples: int = 1437,
    ) -> None:
        super().__init__(train_size, images, samples)
        self.model_cfg = (
            GANConfig() if cfg is None else instance_of("cfg", cfg, GANConfig, "a GANConfig")
        )
        self.name = "gan" if self.model_cfg.attention else "gan-plain"
        self.g_lr_scale = positive_real("g_lr_scale", g_lr_scale)

    def build_model(self) -> nn.Module:
        return GAN(self.model_cfg)

    def config(self) -> dict[str, Any]:
        model, data = asdict(self.model_cfg), self.data_options
        return {"task": self.name, "model": model, "g_lr_scale": self.g_lr_scale, "data": data}

    def batch(self, indices: Tensor) -> GANBatch:
        """Real images ``indices`` and fresh latents (torch's global RNG: checkpointed)."""
        z = torch.randn(len(indices), self.model_cfg.latent_dim)  # (B, latent_dim)
        return GANBatch(self.images[indices], z)

    def loss(self, model: nn.Module, batch: GANBatch) -> Tensor:
        """``L_D + L_G`` (:func:`gan_losses`): one backward, a simultaneous G/D update."""
        assert isinstance(model, GAN)
        d_loss, g_loss = gan_losses(model, batch.real, batch.z)
        return d_loss + g_loss

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        """AdamW groups: G at ``lr * g_lr_scale``, D at ``lr``; betas (0, 0.9), no decay."""
        assert isinstance(model, GAN)
        common = {"betas": (0.0, 0.9), "weight_decay": 0.0}
        return [
            {"params": list(model.generator.parameters()), "lr_scale": self.g_lr_scale, **common},
            {"params": list(model.discriminator.parameters()), "lr_scale": 1.0, **common},
        ]


class VAETask(_DigitsGenerative):
    """The VAE with an attending decoder (``cfg.attention``) or its plain twin; the loss
    is the negative ELBO (:func:`~attnlab.models.vae.vae_loss`).

    Example:
        >>> task = VAETask(64, cfg=VAEConfig(latent_dim=4, channels=8))
        >>> task.name, task.loss(task.build_model(), task.batch(torch.arange(4))).item() > 0
        ('vae', True)
    """

    def __init__(
        self,
        train_size: int | None = None,
        *,
        cfg: VAEConfig | None = None,
        images: Tensor | None = None,
        samples: int = 1437,
    ) -> None:
        super().__init__(train_size, images, samples)
        self.model_cfg = (
            VAEConfig() if cfg is None else instance_of("cfg", cfg, VAEConfig, "a VAEConfig")
        )
        self.name = "vae" if self.model_cfg.attention else "vae-plain"

    def build_model(self) -> nn.Module:
        return VAE(self.model_cfg)

    def config(self) -> dict[str, Any]:
        return {"task": self.name, "model": asdict(self.model_cfg), "data": self.data_options}

    def batch(self, indices: Tensor) -> Tensor:
        return self.images[indices]  # (B, 1, 8, 8)

    def loss(self, model: nn.Module, batch: Tensor) -> Tensor:
        assert isinstance(model, VAE)
        return vae_loss(model(batch), batch, self.model_cfg.sigma)[0]


@dataclass
class TrainResult:
    """A trained model, its per-step training losses and the training time in seconds."""

    model: GAN | VAE
    losses: list[float]  # L_D + L_G (GAN) or the negative ELBO (VAE), per step
    seconds: float


def _train(task: GANTask | VAETask, defaults: dict[str, Any], **over: Any) -> TrainResult:
    """``over["steps"]`` trainer steps of ``task`` (no evaluation, no files, no progress)."""
    cfg = TrainConfig(**(defaults | over | {"progress": False, "threads": None}))
    trainer, t0 = Trainer(task, cfg), time.perf_counter()
    losses = [trainer.train_step() for _ in range(cfg.steps)]
    model = trainer.model.eval()
    assert isinstance(model, GAN | VAE)
    return TrainResult(model, losses, time.perf_counter() - t0)


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
    """``steps`` steps of :class:`GANTask` on ``images (N, 1, 8, 8)`` in [-1, 1], exactly
    as ``attnlab train gan`` takes them (:data:`GAN_DEFAULTS`, its cosine schedule).

    Example:
        >>> r = train_gan(GANConfig(latent_dim=4, channels=8), digits(64)[0], steps=2)
        >>> len(r.losses)
        2
    """
    scale = positive_real("lr_g", lr_g) / positive_real("lr_d", lr_d)  # (0: a bare error)
    task = GANTask(cfg=cfg, images=images, g_lr_scale=scale)
    return _train(task, GAN_DEFAULTS, steps=steps, batch_size=batch_size, lr=lr_d, seed=seed)


def train_vae(
    cfg: VAEConfig,
    images: Tensor,
    *,
    steps: int,
    batch_size: int = 64,
    lr: float = 2e-3,
    seed: int = 0,
) -> TrainResult:
    """``steps`` steps of :class:`VAETask` on ``images (N, 1, 8, 8)`` in [-1, 1], as
    ``attnlab train vae`` takes them (:data:`VAE_DEFAULTS`).

    Example:
        >>> r = train_vae(VAEConfig(latent_dim=4, channels=8), digits(64)[0], steps=2)
        >>> len(r.losses)
        2
    """
    task = VAETask(cfg=cfg, images=images)
    return _train(task, VAE_DEFAULTS, steps=steps, batch_size=batch_size, lr=lr, seed=seed)


def _spec(summary: str, build: Callable[[int | None], Task], defaults: dict[str, Any]) -> TaskSpec:
    from attnlab.tasks.generative_report import finish

    return TaskSpec(
        summary=summary,
        build=build,
        defaults=defaults,
        finish=finish,
        max_train_size=TRAIN_IMAGES,
        score_range=(-math.inf, 0.0),  # -Frechet: the distance is at least 0
    )


_DIGITS = "on scikit-learn's 8x8 digits, Fréchet distance in the ViT's features"
GAN_SPEC = _spec(f"self-attention GAN {_DIGITS}", lambda n: GANTask(n), GAN_DEFAULTS)
GAN_PLAIN_SPEC = _spec(
    f"the same GAN without attention {_DIGITS}",
    lambda n: GANTask(n, cfg=GANConfig(attention=False)),
    GAN_DEFAULTS,
)
VAE_SPEC = _spec(f"VAE with an attending decoder {_DIGITS}", lambda n: VAETask(n), VAE_DEFAULTS)
VAE_PLAIN_SPEC = _spec(
    f"the same VAE without attention {_DIGITS}",
    lambda n: VAETask(n, cfg=VAEConfig(attention=False)),
    VAE_DEFAULTS,
)
