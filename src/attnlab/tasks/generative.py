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

The scoring ViT is the vision task's model trained by :func:`train_feature_vit`
(:data:`FEATURE_VIT_STEPS` Adam steps, seed 0, one thread); :func:`feature_vit` trains it
once and caches it in memory and in :func:`cache_dir` (safetensors). The training tasks
(``attnlab train gan | vae``) are in :mod:`attnlab.tasks.generative_task`.
"""

from __future__ import annotations

import os
import sys
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from numpy.typing import NDArray
from torch import Tensor

from attnlab._io import WriteError, atomic_write
from attnlab._validate import nonnegative_int, positive_int, positive_real
from attnlab.models.vit import ViT, check_images
from attnlab.nn.seeded import reset_parameters
from attnlab.tasks.vision import TEST_FRACTION, DigitsTask, load_split
from attnlab.train.checkpoint import digest
from attnlab.train.loop import num_threads

__all__ = [
    "DigitsScorer",
    "cache_dir",
    "class_coverage",
    "digits",
    "feature_vit",
    "frechet_distance",
    "train_feature_vit",
    "vit_features",
]

FEATURE_VIT_STEPS = 600  # Adam steps of the scoring ViT (90.8% test accuracy; 89-97% by seed)


def digits(n: int | None = None, *, seed: int = 0) -> tuple[Tensor, Tensor]:
    """The vision task's training images ``(N, 1, 8, 8)`` scaled to [-1, 1], and labels.

    Example:
        >>> x, y = digits(100)
        >>> tuple(x.shape), float(x.min()), float(x.max())
        ((100, 1, 8, 8), -1.0, 1.0)
    """
    x, y, _, _ = load_split(TEST_FRACTION, seed)
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
    s_a, s_b = (np.atleast_2d(np.cov(x, rowvar=False)) for x in (a, b))  # (D, D); D = 1 too
    root = np.real(sqrtm(s_a @ s_b))
    fd = float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a + s_b - 2 * root))
    return max(fd, 0.0)


def _features64(name: str, x: Tensor | NDArray[np.float64]) -> NDArray[np.float64]:
    """``x`` as a float64 array ``(N, D)`` with ``N >= 2``, or an error naming ``name``."""
    arr = x.detach().double().cpu().numpy() if isinstance(x, Tensor) else np.asarray(x, float)
    if arr.ndim != 2 or arr.shape[0] < 2:
        raise ValueError(f"{name} must be features (N, D) with N >= 2, got shape {arr.shape}")
    if not np.isfinite(arr).all():  # (sqrtm failed with an internal error)
        bad = int((~np.isfinite(arr)).sum())
        raise ValueError(f"{name} must be finite features, got {bad} NaN or inf of {arr.size}")
    return arr


def class_coverage(pred: Tensor, classes: int = 10, threshold: float = 0.05) -> float:
    """Share of ``classes`` that receive at least ``threshold`` of the predictions ``pred``,
    class ids in ``[0, classes)``.

    Example:
        >>> class_coverage(torch.tensor([0, 0, 1, 2]), classes=4, threshold=0.25)
        0.75
    """
    if positive_real("threshold", threshold) > 1.0:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    classes = positive_int("classes", classes)
    if not isinstance(pred, Tensor) or pred.is_floating_point() or pred.dtype == torch.bool:
        seen = pred.dtype if isinstance(pred, Tensor) else type(pred).__name__
        raise TypeError(f"pred must be an integer tensor of class ids, got {seen}")
    if pred.numel() and not 0 <= int(pred.min()) <= int(pred.max()) < classes:
        raise ValueError(  # (bincount grew past classes: the share was of more classes)
            f"pred must hold class ids in [0, {classes}) (classes={classes}), got ids from "
            f"{int(pred.min())} to {int(pred.max())}"
        )
    counts = torch.bincount(pred.flatten(), minlength=classes)
    share = counts.double() / max(pred.numel(), 1)  # (classes,)
    return float((share >= threshold - 1e-12).double().mean())


def train_feature_vit(steps: int = 400, *, seed: int = 0, batch_size: int = 128) -> ViT:
    """A ViT trained by the vision task's own :class:`DigitsTask` (its model, batches and
    loss) with Adam for ``steps`` steps; returned in eval mode.

    Every draw (the initial weights, the batches, their random shifts) comes from a
    ``torch.Generator`` seeded by ``seed``, not from torch's global RNG: the model is the
    same whatever other threads draw meanwhile, and the caller's RNG is untouched. The
    model has no dropout (the task's ``dropout=0``). (Since this change the same seed
    trains another model than before, equally good; :func:`feature_vit`'s cache files
    carry a new name.)

    Example:
        >>> vit = train_feature_vit(2)
        >>> vit.training, torch.equal(vit.cls, train_feature_vit(2).cls)
        (False, True)
    """
    steps, batch_size = positive_int("steps", steps), positive_int("batch_size", batch_size)
    g = torch.Generator().manual_seed(nonnegative_int("seed", seed))
    task = DigitsTask(seed=seed)
    model = _seeded_vit(task, g)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    with num_threads(1), torch.enable_grad():  # gradients on even inside a no_grad
        for _ in range(steps):
            idx = torch.randint(0, task.num_train(), (batch_size,), generator=g)
            loss = task.loss(model, task.batch(idx, generator=g))
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


def _seeded_vit(task: DigitsTask, g: torch.Generator) -> ViT:
    """``task``'s ViT with its weights drawn from ``g`` as a build draws them: built on the
    meta device (no draw), every parameter drawn from ``g``, then the encoder layers made
    copies of the first, as :class:`~attnlab.nn.Encoder` builds them."""
    with torch.device("meta"):
        model = task.build_model()
    assert isinstance(model, ViT) and _no_buffers(model)
    reset_parameters(model.to_empty(device="cpu"), g)
    first, *rest = model.encoder.layers
    for layer in rest:
        layer.load_state_dict(first.state_dict())
    return model


def _no_buffers(model: torch.nn.Module) -> bool:
    """``model`` holds parameters only: a meta build made real by ``to_empty`` leaves
    buffers uninitialized, and neither drawing parameters nor loading them fills those."""
    return next(model.buffers(), None) is None


def cache_dir() -> Path:
    """Where derived models are cached: ``$ATTNLAB_CACHE`` (a leading ``~`` is the home
    folder), else ``$XDG_CACHE_HOME/attnlab`` when that is an absolute path (the XDG rule:
    a relative one is ignored), else ``~/.cache/attnlab``.

    Example:
        >>> isinstance(cache_dir(), Path)
        True
    """
    if os.environ.get("ATTNLAB_CACHE"):
        return Path(os.environ["ATTNLAB_CACHE"]).expanduser()
    xdg = Path(os.environ.get("XDG_CACHE_HOME") or ".")
    return (xdg if xdg.is_absolute() else Path.home() / ".cache") / "attnlab"


_FEATURE_VITS: dict[tuple[int, int], ViT] = {}
_FILLING: dict[tuple[int, int], threading.Lock] = {}  # one per key: it trains once
_FILLING_LOCK = threading.Lock()
CACHE_VERSION = 2  # 2: trained from a generator of its own (1: from torch's global RNG)


def feature_vit(steps: int | None = None, *, seed: int = 0) -> ViT:
    """The scoring ViT (:func:`train_feature_vit`, ``steps`` default
    :data:`FEATURE_VIT_STEPS`), trained once per ``(steps, seed)`` and torch version:
    kept in memory and in ``cache_dir()/feature_vit-v2-...safetensors`` (written
    atomically; a cache that cannot be written is a RuntimeWarning, and the model is kept
    in memory). A training says so first, in one line on stderr (600 steps take 30-50 s).
    Training draws from its own seeded generator, so the cached model is the
    one a fresh run would train; threads asking for the same ``(steps, seed)`` at once
    wait for one training.

    Example:
        >>> import tempfile, unittest.mock
        >>> with unittest.mock.patch.dict(os.environ, {"ATTNLAB_CACHE": tempfile.mkdtemp()}):
        ...     vit = feature_vit(2)
        >>> vit.training, vit is feature_vit(2)
        (False, True)
    """
    steps = positive_int("steps", FEATURE_VIT_STEPS if steps is None else steps)
    key = (steps, nonnegative_int("seed", seed))
    with _FILLING_LOCK:
        lock = _FILLING.setdefault(key, threading.Lock())
    with lock:
        if key not in _FEATURE_VITS:
            _FEATURE_VITS[key] = _load_or_train(steps, seed)
    return _FEATURE_VITS[key]


def _load_or_train(steps: int, seed: int) -> ViT:
    """The cached scoring ViT of ``(steps, seed)``, else a fresh one (then cached)."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    name = f"feature_vit-v{CACHE_VERSION}-s{steps}-seed{seed}-torch{torch.__version__}"
    path = cache_dir() / f"{name}.safetensors"
    with torch.device("meta"):  # (a CPU build drew on torch's global RNG)
        model = DigitsTask(seed=seed).build_model()
    assert isinstance(model, ViT) and _no_buffers(model)
    try:
        model.to_empty(device="cpu").load_state_dict(_verified(path))
        return model.eval()
    except (OSError, RuntimeError, SafetensorError):  # missing, corrupt, stale: retrain
        _say_training(steps, path)
        model = train_feature_vit(steps, seed=seed)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    try:  # (a cache that could not be written failed the caller after the training)
        atomic_write(path, lambda t: save_file(state, t, metadata={"digest": digest(state)}))
    except WriteError as e:
        msg = f"the scoring ViT is kept in memory only, not cached: {e}"
        warnings.warn(msg, RuntimeWarning, stacklevel=3)
    return model


_SECONDS_PER_STEP = (0.05, 0.083)  # the scoring ViT's, one thread (600 steps: 30-50 s)


def _say_training(steps: int, path: Path) -> None:
    """One line on stderr before the scoring ViT trains (the first evaluation of a GAN or
    VAE sat silent for 30-50 s), as the kernel build says it is compiling."""
    lo, hi = (round(steps * s) for s in _SECONDS_PER_STEP)
    took = f", ~{lo}-{hi} s" if hi >= 2 else ""
    line = f"training the scoring ViT for the Fréchet distance (once{took}; cached in {path})"
    print(f"attnlab: {line}", file=sys.stderr, flush=True)


def _verified(path: Path) -> dict[str, Tensor]:
    """The tensors of a cached model file whose digest matches them, else a RuntimeError
    (damaged bytes loaded as NaN weights: FD then failed in sqrtm)."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        saved = (f.metadata() or {}).get("digest")
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    if saved is None or digest(tensors) != saved:
        raise RuntimeError(f"{path}: no digest, or its tensors do not match it")
    return tensors


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
