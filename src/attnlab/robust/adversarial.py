"""Adversarial training as :class:`attnlab.train.Trainer` plug-ins.

Each plug-in perturbs the model's embeddings (:func:`~attnlab.robust.perturb.find_embedding`:
token embeddings, the ViT's patch embeddings, or with ``site="input"`` the pixels) and
turns ``(model, batch, loss_fn)`` into the step's gradients:

======== ================================================================ ================
plug-in  objective                                                        cost per step
======== ================================================================ ================
FGM      L(x) + L(x + eps g/||g||)  (Miyato et al., 2017)                 2 fwd + 2 bwd
PGD      L(x + delta_k), delta by k projected ascent steps (Madry, 2018)  k+1 fwd + k+1 bwd
FreeLB   mean over k of L(x + delta_t), gradients accumulated (Zhu, 2020) k fwd + k bwd
SMART    L(x) + w * symKL(f(x), f(x + delta)) (Jiang et al., 2020)        k+3 fwd, k+1 bwd
======== ================================================================ ================

(plain training: 1 forward + 1 backward). Norms are per example (L2 or L-infinity over
all of one example's embedding values). ``benchmarks/bench_robust.py`` measures the costs.

With ``site="input"`` and ``bounds``, PGD, FreeLB and SMART keep ``x + delta`` inside the
bounds after the start and after every step (:meth:`Perturbation.within_bounds`, as
:func:`~attnlab.robust.pgd_pixels` does). A regularizer listed after (around) a plug-in
reads the attention of the one pass it trains on (FGM, PGD, FreeLB: the last adversarial
pass; SMART: the clean pass): the others run in :func:`~attnlab.robust.passes.hidden_pass`.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnlab._validate import instance_of, nonnegative_int, positive_int, validate_flag
from attnlab.robust.passes import hidden_pass
from attnlab.robust.perturb import (
    Perturbation,
    ascent_direction,
    check_norm,
    check_positive,
    check_site,
    find_embedding,
    project,
    random_start,
    seeded_generator,
    unused_embedding,
)
from attnlab.train import LossFn

__all__ = ["FGM", "PGD", "SMART", "FreeLB", "symmetric_kl"]

Outputs = Callable[[nn.Module, Any], Tensor]


class _Adversary:
    """Shared settings: the ball, where the perturbation goes in."""

    def __init__(
        self,
        epsilon: float,
        norm: str,
        embedding: str | None,
        site: str,
        bounds: tuple[float, float] | None,
    ) -> None:
        self.epsilon = check_positive("epsilon", epsilon)
        self.norm = check_norm(norm)
        if embedding is not None:  # (3 was refused only at the first step)
            instance_of("embedding", embedding, str, "a submodule name (str) or None")
        self.embedding = embedding
        self.site, self.bounds = check_site(site, bounds)
        self._cache: tuple[nn.Module, Perturbation] | None = None

    def perturbation(self, model: nn.Module) -> Perturbation:
        """The (cached) :class:`Perturbation` of ``model``'s embedding layer, cleared."""
        if self._cache is None or self._cache[0] is not model:
            module = find_embedding(model, self.embedding)
            name = next(n for n, m in model.named_modules() if m is module)
            self._cache = (model, Perturbation(module, self.site, self.bounds, name=name))
        pert = self._cache[1]
        pert.delta = None
        return pert

    def _start(self, x: Tensor) -> Tensor:
        return random_start(x, self.epsilon, self.norm)

    def _seeded_start(self, seed: int, x: Tensor) -> Tensor:
        return random_start(x, self.epsilon, self.norm, generator=seeded_generator(seed, x.device))

    def _leaf(self, pert: Perturbation) -> Tensor:
        """``pert.delta`` after a tracked forward; a ValueError naming ``embedding=`` when
        the layer never ran."""
        if pert.delta is None:
            raise unused_embedding(self._model(), pert.module, self.embedding)
        return pert.delta

    def _grad(self, pert: Perturbation, loss: Tensor | None = None) -> Tensor:
        """``d loss / d delta`` (``loss=None``: the ``delta.grad`` a backward left); a
        ValueError naming ``embedding=`` when there is none."""
        delta = self._leaf(pert)
        if loss is None:
            g = delta.grad
        else:
            (g,) = torch.autograd.grad(loss, delta, allow_unused=True)
        if g is None:
            raise unused_embedding(self._model(), pert.module, self.embedding)
        return g

    def _model(self) -> nn.Module:
        assert self._cache is not None
        return self._cache[0]

    def _ascend(self, pert: Perturbation, g: Tensor, alpha: float, norm: str) -> None:
        """One ascent step of size ``alpha`` along ``g`` (``norm``'s steepest direction),
        projected onto the ball, then into the bounds."""
        step = self._leaf(pert).detach() + alpha * ascent_direction(g, norm)
        pert.leaf(pert.within_bounds(project(step, self.epsilon, self.norm)))


class FGM(_Adversary):
    """Fast gradient method (Miyato et al., 2017): one step of size ``epsilon`` along the
    embedding gradient; trains on the clean plus the adversarial loss.

    ``delta = epsilon * g / ||g||_2`` (L2, per example) or ``epsilon * sign(g)`` (L-inf,
    FGSM), ``g = d L / d embeddings``. The logged loss is clean + adversarial.

    Args:
        epsilon: radius (> 0).
        norm: ``"l2"`` or ``"linf"``.
        embedding: the embedding submodule's name (default: found).
        site: ``"output"`` (embeddings) or ``"input"`` (pixels of a ViT).
        bounds: clamp of the perturbed input (``site="input"``), e.g. ``(0, 1)``; an
            input outside them is refused (ValueError), as :func:`~attnlab.robust.pgd_pixels` does.

    Example:
        >>> FGM(epsilon=0.5).epsilon, FGM(0.1, norm="linf").norm
        (0.5, 'linf')
    """

    def __init__(
        self,
        epsilon: float = 1.0,
        *,
        norm: str = "l2",
        embedding: str | None = None,
        site: str = "output",
        bounds: tuple[float, float] | None = None,
    ) -> None:
        super().__init__(epsilon, norm, embedding, site, bounds)

    def step(self, model: nn.Module, batch: Any, loss_fn: LossFn) -> Tensor:
        pert = self.perturbation(model)
        with hidden_pass():
            with pert.active(track=True):
                clean = loss_fn(model, batch)
            clean.backward()  # parameter gradients of the clean loss, and d L / d delta
        pert.delta = self.epsilon * ascent_direction(self._grad(pert), self.norm)
        with pert.active():
            adv = loss_fn(model, batch)
        pert.delta = None
        return adv + clean.detach()


class PGD(_Adversary):
    """Projected gradient descent (Madry et al., 2018): ``steps`` ascent steps of size
    ``alpha`` on the perturbation, each projected back onto the ``epsilon`` ball; trains
    on the adversarial loss (plus the clean loss with ``clean=True``).

    Args:
        epsilon: radius (> 0).
        steps: ascent steps (>= 1).
        alpha: step size (default ``2.5 * epsilon / steps``).
        norm: ``"l2"`` or ``"linf"``.
        random_start: start from a uniform draw in the ball (else from 0).
        clean: add the clean loss (the variant common for text).
        embedding, site, bounds: as in :class:`FGM`.

    Example:
        >>> round(PGD(0.1, steps=3).alpha, 6)
        0.083333
    """

    def __init__(
        self,
        epsilon: float = 1.0,
        *,
        steps: int = 3,
        alpha: float | None = None,
        norm: str = "l2",
        random_start: bool = True,
        clean: bool = False,
        embedding: str | None = None,
        site: str = "output",
        bounds: tuple[float, float] | None = None,
    ) -> None:
        super().__init__(epsilon, norm, embedding, site, bounds)
        self.steps = positive_int("steps", steps)
        self.alpha = check_positive(
            "alpha", 2.5 * self.epsilon / self.steps if alpha is None else alpha
        )
        self.random_start = validate_flag("random_start", random_start)
        self.clean = validate_flag("clean", clean)

    def attack(
        self, model: nn.Module, batch: Any, loss_fn: LossFn, *, seed: int | None = None
    ) -> Perturbation:
        """The perturbation after ``steps`` projected ascent steps (parameters untouched);
        ``seed``: of the random start, from a generator of its own (None: torch's global
        RNG). Under ``torch.no_grad()`` (evaluation code) the ascent runs with gradients
        on, as outside it; under ``torch.inference_mode()`` a RuntimeError (the batch and
        ``loss_fn`` may hold inference tensors, which autograd cannot use)."""
        if not callable(loss_fn):  # ("'NoneType' object is not callable" at the first step)
            raise TypeError(f"loss_fn must be callable (model, batch) -> loss, got {loss_fn!r}")
        if torch.is_inference_mode_enabled():  # (enable_grad cannot help there)
            raise RuntimeError(
                "PGD.attack (pgd_embeddings) ascends the gradient of loss_fn and cannot run "
                "under torch.inference_mode(), whose tensors autograd refuses; call it "
                "outside inference_mode (under torch.no_grad() it runs)"
            )
        pert = self.perturbation(model)
        init = self._start if self.random_start else None
        if self.random_start and seed is not None:
            nonnegative_int("seed", seed)
            init = partial(self._seeded_start, seed)
        with torch.enable_grad():  # (under no_grad: "element 0 of tensors does not require grad")
            for _ in range(self.steps):
                with hidden_pass(), pert.active(track=True, init=init):
                    loss = loss_fn(model, batch)
                self._ascend(pert, self._grad(pert, loss), self.alpha, self.norm)
        pert.delta = self._leaf(pert).detach()
        return pert

    def step(self, model: nn.Module, batch: Any, loss_fn: LossFn) -> Tensor:
        pert = self.attack(model, batch, loss_fn)
        with pert.active():
            adv = loss_fn(model, batch)
        pert.delta = None
        if not self.clean:
            return adv
        with hidden_pass():
            return adv + loss_fn(model, batch)


class FreeLB(_Adversary):
    """FreeLB (Zhu et al., 2020): ``steps`` ascent steps whose parameter gradients are
    all kept, so the update follows the mean loss over the path of the perturbation.

    ``for t in 1..K: (L(x + delta_{t-1}) / K).backward(); delta_t = project(delta_{t-1}
    + alpha * g / ||g||)``; the first ``K - 1`` backward passes run here, the last in the
    trainer. ``delta_0`` is drawn in the ball of radius ``init_epsilon`` (0: zeros).

    Args:
        epsilon: radius (> 0) of the ball the perturbation stays in.
        steps: ascent steps ``K`` (>= 1).
        alpha: step size (default ``epsilon / steps``).
        init_epsilon: radius of the random start (>= 0; default ``epsilon / 2``).
        norm, embedding, site, bounds: as in :class:`FGM`.

    Example:
        >>> round(FreeLB(0.3, steps=3).alpha, 6)
        0.1
    """

    def __init__(
        self,
        epsilon: float = 1.0,
        *,
        steps: int = 3,
        alpha: float | None = None,
        init_epsilon: float | None = None,
        norm: str = "l2",
        embedding: str | None = None,
        site: str = "output",
        bounds: tuple[float, float] | None = None,
    ) -> None:
        super().__init__(epsilon, norm, embedding, site, bounds)
        self.steps = positive_int("steps", steps)
        self.alpha = check_positive("alpha", self.epsilon / self.steps if alpha is None else alpha)
        init = self.epsilon / 2 if init_epsilon is None else init_epsilon
        self.init_epsilon = check_positive("init_epsilon", init, zero=True)
        if self.init_epsilon > self.epsilon:  # its first loss was outside the ball
            raise ValueError(
                f"init_epsilon must be at most epsilon={self.epsilon} (the ball the "
                f"perturbation stays in), got {self.init_epsilon}"
            )

    def _init(self, x: Tensor) -> Tensor:
        if self.init_epsilon == 0:
            return torch.zeros_like(x)
        return random_start(x, self.init_epsilon, self.norm)

    def step(self, model: nn.Module, batch: Any, loss_fn: LossFn) -> Tensor:
        pert, total = self.perturbation(model), 0.0
        for _ in range(self.steps - 1):
            with hidden_pass():
                with pert.active(track=True, init=self._init):
                    loss = loss_fn(model, batch) / self.steps
                loss.backward()  # accumulates the parameters' gradients, and d L / d delta
            total += float(loss.detach())
            self._ascend(pert, self._grad(pert), self.alpha, self.norm)
        with pert.active(track=True, init=self._init):
            last = loss_fn(model, batch) / self.steps
        self._leaf(pert)  # (steps=1: the layer ran)
        pert.delta = None
        return last + total  # the logged value is the mean loss over the K steps


def symmetric_kl(p_logits: Tensor, q_logits: Tensor) -> Tensor:
    """``KL(p||q) + KL(q||p)`` over the last dim, averaged over the rest: a scalar, in the
    logits' dtype, at least float32 (float64 stays).

    Example:
        >>> float(symmetric_kl(torch.tensor([[0.0, 1.0]]), torch.tensor([[0.0, 1.0]])))
        0.0
    """
    if q_logits.shape != p_logits.shape:  # (3 against 4 classes: a bare RuntimeError)
        shape = tuple(p_logits.shape)
        raise ValueError(f"q_logits must have p_logits' shape {shape}, got {tuple(q_logits.shape)}")
    wide = torch.promote_types(torch.result_type(p_logits, q_logits), torch.float32)
    lp, lq = F.log_softmax(p_logits.to(wide), -1), F.log_softmax(q_logits.to(wide), -1)
    return ((lp.exp() - lq.exp()) * (lp - lq)).sum(-1).mean()


class SMART(_Adversary):
    """SMART's smoothness-inducing regularizer (Jiang et al., 2020).

    ``L(x) + weight * symKL(f(x), f(x + delta))``, ``delta`` from a draw of scale
    ``noise`` followed by ``steps`` ascent steps of size ``alpha`` along the sign of the
    symmetric KL's gradient, each projected onto the ``epsilon`` ball.

    Args:
        outputs: ``outputs(model, batch) -> logits (..., C)``.
        epsilon: radius (> 0). weight: of the smoothness term (> 0).
        steps: ascent steps (>= 1). alpha: their size (default ``epsilon``).
        noise: scale of the Gaussian start (default ``epsilon / 10``).
        norm, embedding, site, bounds: as in :class:`FGM`.

    Example:
        >>> SMART(lambda m, b: m(b), epsilon=0.1).weight
        1.0
    """

    def __init__(
        self,
        outputs: Outputs,
        *,
        epsilon: float = 1e-2,
        weight: float = 1.0,
        steps: int = 1,
        alpha: float | None = None,
        noise: float | None = None,
        norm: str = "linf",
        embedding: str | None = None,
        site: str = "output",
        bounds: tuple[float, float] | None = None,
    ) -> None:
        super().__init__(epsilon, norm, embedding, site, bounds)
        if not callable(outputs):
            raise TypeError(f"outputs must be callable (model, batch) -> logits, got {outputs!r}")
        self.outputs = outputs
        self.weight = check_positive("weight", weight)
        self.steps = positive_int("steps", steps)
        self.alpha = check_positive("alpha", self.epsilon if alpha is None else alpha)
        self.noise = check_positive("noise", self.epsilon / 10 if noise is None else noise)

    def step(self, model: nn.Module, batch: Any, loss_fn: LossFn) -> Tensor:
        loss = loss_fn(model, batch)
        with hidden_pass():
            clean = self.outputs(model, batch)
        target = clean.detach()
        pert = self.perturbation(model)
        init: Callable[[Tensor], Tensor] = lambda x: torch.randn_like(x) * self.noise  # noqa: E731
        for _ in range(self.steps):
            with hidden_pass(), pert.active(track=True, init=init):
                div = symmetric_kl(self.outputs(model, batch), target)
            self._ascend(pert, self._grad(pert, div), self.alpha, "linf")
        pert.delta = self._leaf(pert).detach()
        with hidden_pass(), pert.active():
            div = symmetric_kl(self.outputs(model, batch), clean)
        pert.delta = None
        return loss + self.weight * div
