"""Where a perturbation goes in: the embedding layer of a model, and the norm-ball algebra.

A :class:`Perturbation` is a forward hook on one module: ``site="output"`` adds ``delta``
to what the module returns (token embeddings ``(B, L, E)``, the ViT's patch embeddings
``(B, N, D)``), ``site="input"`` adds it to the module's first input (the ViT's pixels
``(B, C, H, W)``, optionally clamped to the images' range ``bounds``, which every input
must lie inside: a clamp would change the clean images silently). ``delta`` is made lazily, the
shape of that tensor, and is a leaf that requires grad, so ``delta.grad`` after a backward
is d loss / d embeddings.

Norms are per example: every dimension but the first (batch) counts.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from attnlab._validate import nonnegative_int
from attnlab.models.vit import PatchEmbedding

__all__ = [
    "NORMS",
    "SITES",
    "Perturbation",
    "ascent_direction",
    "check_bounds",
    "check_inside",
    "check_norm",
    "check_positive",
    "check_site",
    "find_embedding",
    "per_example_norm",
    "project",
    "random_start",
    "seeded_generator",
    "unused_embedding",
]

NORMS = ("l2", "linf")
SITES = ("output", "input")
_EMBEDDINGS = (nn.Embedding, PatchEmbedding)


def check_positive(name: str, value: object, *, zero: bool = False) -> float:
    """``value`` (any real number but a bool: a numpy scalar too) as a finite float > 0
    (>= 0 with ``zero``), or an error naming ``name``.

    Example:
        >>> import numpy as np
        >>> check_positive("epsilon", 0.5), check_positive("epsilon", np.float32(0.25))
        (0.5, 0.25)
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    v = float(value)
    if not (v >= 0 if zero else v > 0) or v != v or v == float("inf"):
        want = ">= 0" if zero else "> 0"
        raise ValueError(f"{name} must be a finite number {want}, got {value!r}")
    return v


def check_norm(norm: object) -> str:
    """``norm`` as one of :data:`NORMS`, or a ValueError naming it."""
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    return str(norm)


def check_bounds(bounds: object) -> tuple[float, float]:
    """``bounds`` as a ``(low, high)`` pair of floats with ``low < high``, or an error.

    Example:
        >>> check_bounds((0, 1))
        (0.0, 1.0)
    """
    if (
        isinstance(bounds, str | bytes | Tensor)
        or not isinstance(bounds, Sequence)
        or len(bounds) != 2
    ):
        raise TypeError(f"bounds must be a (low, high) pair of numbers, got {bounds!r}")
    if any(isinstance(b, bool) or not isinstance(b, numbers.Real) for b in bounds):
        raise TypeError(f"bounds must be a (low, high) pair of numbers, got {bounds!r}")
    low, high = float(bounds[0]), float(bounds[1])
    if not low < high:
        raise ValueError(f"bounds must be (low, high) with low < high, got {bounds!r}")
    return low, high


def check_inside(name: str, images: Tensor, bounds: tuple[float, float]) -> None:
    """A ValueError naming ``name`` and ``bounds`` unless every value of ``images`` lies in
    the bounds (a clamp would change them silently).

    Example:
        >>> check_inside("images", torch.tensor([-0.5, 0.5]), (0.0, 1.0))
        ... # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ValueError: images must lie inside bounds=(0.0, 1.0), got values in [-0.5, 0.5]; ...
    """
    if not isinstance(images, Tensor) or not images.is_floating_point():
        seen = f"dtype {images.dtype}" if isinstance(images, Tensor) else type(images).__name__
        raise TypeError(f"{name} must be a floating-point tensor, got {seen}")
    if images.numel() == 0 or images.device.type == "meta":  # (meta: no values to read)
        return
    low, high = torch.aminmax(images.detach())
    lo, hi = torch.tensor(bounds, dtype=images.dtype)  # as the clamp compares them
    if not bool((lo <= low) & (high <= hi)):  # (NaN: False)
        raise ValueError(
            f"{name} must lie inside bounds={bounds}, got values in "
            f"[{float(low):.4g}, {float(high):.4g}]; "
            "pass the images' own range as bounds (normalized images: the normalized range)"
        )


def check_site(site: object, bounds: object) -> tuple[str, tuple[float, float] | None]:
    """``site`` as one of :data:`SITES` and ``bounds`` checked (None, or ``site="input"``).

    Example:
        >>> check_site("input", (0, 1))
        ('input', (0.0, 1.0))
    """
    if site not in SITES:
        raise ValueError(f"site must be 'output' or 'input', got {site!r}")
    if bounds is None:
        return str(site), None
    if site != "input":
        raise ValueError(
            f"bounds clamp the perturbed input; got bounds={bounds!r} with site={site!r}, "
            f"expected site='input' (or bounds=None)"
        )
    return str(site), check_bounds(bounds)


def find_embedding(model: nn.Module, name: str | None = None) -> nn.Module:
    """The module whose output is the model's input embeddings.

    Args:
        model: any model.
        name: a submodule name (``"src_embed"``); default the first ``nn.Embedding`` or
            :class:`~attnlab.models.vit.PatchEmbedding` in ``model.named_modules()``
            order (the source embedding of a seq2seq model, the patches of a ViT).

    Raises:
        TypeError: the model has no embedding layer (name one with ``name``).

    Example:
        >>> find_embedding(nn.Sequential(nn.Embedding(5, 3), nn.Linear(3, 2)))
        Embedding(5, 3)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    modules = dict(model.named_modules())
    if name is not None:
        if name not in modules:
            raise ValueError(f"embedding={name!r} is not a submodule of {type(model).__name__}")
        return modules[name]
    for module in modules.values():
        if isinstance(module, _EMBEDDINGS):
            return module
    raise TypeError(
        f"model ({type(model).__name__}) has no embedding layer (nn.Embedding or "
        f"PatchEmbedding); pass embedding='<submodule name>' to name one"
    )


def unused_embedding(model: nn.Module, module: nn.Module, name: str | None) -> ValueError:
    """The error for an embedding layer that took no part in the loss: the layer
    :func:`find_embedding` gave for ``name`` never ran in the forward pass, or its output
    did not reach the loss; it names ``embedding=`` and the candidates to pass.

    Example:
        >>> m = nn.ModuleDict({"pos": nn.Embedding(4, 2), "tok": nn.Embedding(5, 2)})
        >>> print(unused_embedding(m, m.pos, None))  # doctest: +NORMALIZE_WHITESPACE
        the embedding layer 'pos' (Embedding, the first found) of ModuleDict took no part in
        the loss (it never ran, or its output did not reach the loss); pass
        embedding='<submodule name>' naming the layer that embeds the input, one of ['pos', 'tok']
    """
    names = {id(m): n for n, m in model.named_modules()}
    found = names.get(id(module), "?")
    which = "named by embedding=" if name is not None else "the first found"
    candidates = [n for n, m in model.named_modules() if isinstance(m, _EMBEDDINGS)]
    return ValueError(
        f"the embedding layer {found!r} ({type(module).__name__}, {which}) of "
        f"{type(model).__name__} took no part in the loss (it never ran, or its output did "
        f"not reach the loss); pass embedding='<submodule name>' naming the layer that "
        f"embeds the input, one of {candidates}"
    )


def per_example_norm(x: Tensor, norm: str) -> Tensor:
    """``(B, ...) -> (B, 1, ..., 1)``: the L2 or L-infinity norm of each example."""
    flat = x.flatten(1)
    n = flat.norm(dim=1) if norm == "l2" else flat.abs().amax(dim=1)
    return n.view(-1, *([1] * (x.dim() - 1)))


def _wide_l2(x: Tensor) -> tuple[Tensor, Tensor]:
    """``x`` in float32 at least (float64 stays) and its per-example L2 norm floored at
    1e-12: in float16 that floor was 0 (and the norm of large values inf), so an all-zero
    example's direction was 0 / 0 = NaN."""
    wide = x.to(torch.promote_types(x.dtype, torch.float32))
    return wide, per_example_norm(wide, "l2").clamp_min(1e-12)


def ascent_direction(grad: Tensor, norm: str) -> Tensor:
    """The steepest-ascent unit step: ``g / ||g||_2`` per example (0 for an all-zero
    example; computed in float32 at least), or ``sign(g)``.

    Example:
        >>> ascent_direction(torch.tensor([[3.0, -4.0]]), "l2")
        tensor([[ 0.6000, -0.8000]])
    """
    if norm == "linf":
        return grad.sign()
    wide, n = _wide_l2(grad)
    return (wide / n).to(grad.dtype)


def project(delta: Tensor, epsilon: float, norm: str) -> Tensor:
    """``delta`` projected onto the ball of radius ``epsilon`` (> 0; per example) of
    ``norm`` (one of :data:`NORMS`); others are refused, as FGM and PGD refuse them (``"l3"``
    was taken for L2, a negative ``epsilon`` flipped the direction).

    Example:
        >>> project(torch.tensor([[3.0, -4.0]]), 1.0, "l2")
        tensor([[ 0.6000, -0.8000]])
    """
    epsilon, norm = check_positive("epsilon", epsilon), check_norm(norm)
    if norm == "linf":
        return delta.clamp(-epsilon, epsilon)
    wide, n = _wide_l2(delta)
    return (wide * torch.clamp(epsilon / n, max=1.0)).to(delta.dtype)


def random_start(
    like: Tensor, epsilon: float, norm: str, *, generator: torch.Generator | None = None
) -> Tensor:
    """A uniform draw in the L-inf ball, or a Gaussian direction scaled into the L2 ball;
    from ``generator`` (on ``like``'s device) if given, else torch's global RNG."""
    if norm == "linf":
        return torch.empty_like(like).uniform_(-epsilon, epsilon, generator=generator)
    g = torch.empty_like(like).normal_(generator=generator)  # (as randn_like draws)
    shape = (like.shape[0], *([1] * (like.dim() - 1)))  # (B, 1, ..., 1)
    radius = torch.rand(shape, dtype=like.dtype, device=like.device, generator=generator)
    radius = epsilon * radius
    wide, n = _wide_l2(g)
    return (wide / n * radius).to(like.dtype)


def seeded_generator(seed: int, device: torch.device) -> torch.Generator:
    """A generator on ``device`` for the draws of ``seed`` (>= 0): seeded from the first
    draw of a CPU generator seeded with ``seed``, as torch's global RNG was seeded
    before, so the same seed draws the same start on the CPU as it did then.

    Example:
        >>> a = seeded_generator(3, torch.device("cpu"))
        >>> b = seeded_generator(3, torch.device("cpu"))
        >>> torch.equal(torch.rand(2, generator=a), torch.rand(2, generator=b))
        True
    """
    cpu = torch.Generator().manual_seed(nonnegative_int("seed", seed))  # (a torch error)
    if device.type == "meta":  # (no generator there; a draw on it takes a CPU one)
        device = torch.device("cpu")
    return torch.Generator(device=device).manual_seed(
        int(torch.randint(2**31, (1,), generator=cpu))
    )


class Perturbation:
    """Add ``delta`` to a module's output (or first input) while the context is open.

    Args:
        module: usually :func:`find_embedding`'s answer.
        site: ``"output"`` or ``"input"`` (a floating-point input: pixels).
        bounds: ``(low, high)`` to clamp the perturbed input to (``site="input"`` only);
            an input outside them is refused with a ValueError, as
            :func:`~attnlab.robust.pgd_pixels` refuses it.
        name: the module's name in its model, for the error messages (default: its type).

    One ``delta`` per module: a module that runs more than once in a forward pass (an
    embedding shared by two inputs) gets the same ``delta`` each time, so it must fit
    every tensor it is added to; one it cannot fit (inputs of other lengths) is refused
    with a ValueError naming the module and both shapes.

    Attributes:
        delta: the perturbation (None until set or until the first forward with
            ``track=True`` makes a zero leaf of the right shape, or ``init``'s draw; with
            ``site="input"`` and ``bounds`` that draw is first brought inside the bounds,
            see :meth:`within_bounds`).

    Example:
        >>> emb = nn.Embedding(4, 2)
        >>> p = Perturbation(emb)
        >>> with p.active(track=True):
        ...     emb(torch.tensor([[1, 2]])).sum().backward()
        >>> p.delta.grad
        tensor([[[1., 1.],
                 [1., 1.]]])
    """

    def __init__(
        self,
        module: nn.Module,
        site: str = "output",
        bounds: tuple[float, float] | None = None,
        *,
        name: str | None = None,
    ) -> None:
        self.module, self.name = module, name
        self.site, self.bounds = check_site(site, bounds)
        self.delta: Tensor | None = None
        self._x: Tensor | None = None  # the input of the last forward (site="input")
        self._track = False
        self._init: Callable[[Tensor], Tensor] | None = None

    def leaf(self, value: Tensor) -> Tensor:
        """Set ``delta`` to a detached copy of ``value`` that requires grad; return it."""
        self.delta = value.detach().clone().requires_grad_(True)
        return self.delta

    def within_bounds(self, delta: Tensor) -> Tensor:
        """``delta`` changed so that ``x + delta`` lies inside ``bounds`` (``x``: the input
        of the last forward; ``site="input"`` with ``bounds``), else ``delta`` as it is.

        The projection of Madry et al.'s PGD (and :func:`~attnlab.robust.pgd_pixels`):
        a pixel pushed past the bounds would be clamped in the forward, get no gradient
        through the clamp and never move again; brought back onto the bound, it does.

        Example:
            >>> p = Perturbation(nn.Identity(), "input", bounds=(0, 1))
            >>> with p.active():
            ...     _ = p.module(torch.tensor([[0.0, 0.5, 1.0]]))
            >>> p.within_bounds(torch.tensor([[-0.2, 0.2, 0.2]]))
            tensor([[0.0000, 0.2000, 0.0000]])
        """
        if self.bounds is None or self._x is None:
            return delta
        return (self._x + delta).clamp(*self.bounds) - self._x

    @contextmanager
    def active(
        self, *, track: bool = False, init: Callable[[Tensor], Tensor] | None = None
    ) -> Iterator[Perturbation]:
        """Apply ``delta`` inside the block; ``track`` makes a leaf if it is None: zeros, or
        ``init(x)`` of the tensor ``x`` it is added to."""
        self._init = torch.zeros_like if init is None else init
        self._track = track
        if self.site == "output":
            handle = self.module.register_forward_hook(self._add_to_output)
        else:
            handle = self.module.register_forward_pre_hook(self._add_to_input)
        try:
            yield self
        finally:
            handle.remove()
            self._track = False

    def _delta_for(self, x: Tensor) -> Tensor | None:
        if self.delta is None and self._track:
            assert self._init is not None
            self.leaf(self.within_bounds(self._init(x.detach())))
        if self.delta is not None:
            self._check_fits(x, self.delta)
        return self.delta

    def _check_fits(self, x: Tensor, delta: Tensor) -> None:
        """A ValueError naming the module and both shapes unless ``x + delta`` has ``x``'s
        shape (else a bare "size of tensor a (3) must match ... b (4)" came from the hook,
        or a smaller ``x`` was broadcast up silently)."""
        try:
            fits = torch.broadcast_shapes(x.shape, delta.shape) == x.shape
        except RuntimeError:
            fits = False
        if fits:
            return
        kind = type(self.module).__name__
        layer = kind if self.name is None else f"{self.name!r} ({kind})"
        where = "output" if self.site == "output" else "input"
        raise ValueError(
            f"the perturbation of layer {layer} has shape {tuple(delta.shape)}, its {where} "
            f"here {tuple(x.shape)}: one delta per layer, and this layer ran again in the "
            "forward pass on a tensor of another shape (an embedding shared by two inputs), "
            "or the batch is not the one delta was made for; pass embedding='<submodule "
            "name>' naming a layer that runs once per forward pass"
        )

    def _add_to_output(self, module: nn.Module, args: Any, out: Tensor) -> Tensor:
        delta = self._delta_for(out)
        return out if delta is None else out + delta

    def _add_to_input(self, module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        x = args[0]
        if not isinstance(x, Tensor) or not x.is_floating_point():
            raise TypeError(
                f"site='input' perturbs a floating-point input (pixels); "
                f"{type(module).__name__} got {getattr(x, 'dtype', type(x).__name__)}"
            )
        self._x = x.detach()
        if self.bounds is not None:
            check_inside(f"the input of {type(module).__name__} (site='input')", x, self.bounds)
        delta = self._delta_for(x)
        if delta is None:
            return args
        x = x + delta
        if self.bounds is not None:
            x = x.clamp(*self.bounds)
        return (x, *args[1:])
