"""Attacks for evaluation: PGD on pixels, PGD on embeddings, greedy character edits.

* :func:`pgd_pixels`: L-infinity (or L2) PGD on images, kept in the images' range;
* :func:`pgd_embeddings`: PGD on a text model's embeddings (a :class:`Perturbation` to
  evaluate under);
* :class:`CharEditAttack`: greedy character edits (swap two neighbours, drop one, insert
  one) within a budget of edits per word, choosing at each round the edit that lowers the
  model's score of the right answer most, until the answer is wrong or the budget spent.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnlab._validate import instance_of, nonnegative_int, positive_int
from attnlab.robust.adversarial import PGD
from attnlab.robust.perturb import (
    Perturbation,
    ascent_direction,
    check_bounds,
    check_inside,
    check_norm,
    check_positive,
    project,
    random_start,
    seeded_generator,
)
from attnlab.train import LossFn

__all__ = ["CharEditAttack", "EditResult", "pgd_embeddings", "pgd_pixels", "word_edits"]


def _class_indices(labels: object, batch: int) -> tuple[Tensor, tuple[int, int]]:
    """``labels``, an integer tensor ``(B,)`` of indices >= 0, as int64 with its range
    (``(0, -1)`` if unread), or an error naming it: cross-entropy's own messages for float
    or ``(B, 1)`` labels named no argument, and it skips a row labelled -100 unattacked."""
    if (
        not isinstance(labels, Tensor)
        or labels.is_floating_point()
        or labels.is_complex()
        or labels.dtype == torch.bool
    ):
        seen = labels.dtype if isinstance(labels, Tensor) else type(labels).__name__
        raise TypeError(f"labels must be an integer tensor of class indices (B,), got {seen}")
    if tuple(labels.shape) != (batch,):
        raise ValueError(
            f"labels must hold one class index per image, shape (B,) = ({batch},), got "
            f"{tuple(labels.shape)} {labels.dtype}"
        )
    if labels.numel() == 0 or labels.device.type == "meta":  # (meta: no values to read)
        return labels.long(), (0, -1)
    low, high = torch.stack(torch.aminmax(labels)).tolist()  # (one device read)
    if low < 0:
        raise ValueError(f"labels must be class indices >= 0, got values in [{low}, {high}]")
    return labels.long(), (low, high)


def _check_classes(seen: tuple[int, int], logits: Tensor) -> None:
    """A ValueError naming ``labels`` (range ``seen``) if one is not an index into
    ``logits (B, K)``'s classes (cross-entropy's "Target 5 is out of bounds" named none)."""
    if logits.dim() == 0:  # (cross-entropy's own message)
        return
    classes = logits.shape[1] if logits.dim() > 1 else logits.shape[0]  # as cross-entropy
    if seen[1] >= classes:
        raise ValueError(
            f"labels must be class indices in [0, {classes}) for the model's {classes} "
            f"classes, got values in [{seen[0]}, {seen[1]}]"
        )


def pgd_pixels(
    model: nn.Module,
    images: Tensor,
    labels: Tensor,
    *,
    epsilon: float,
    steps: int = 10,
    alpha: float | None = None,
    norm: str = "linf",
    bounds: tuple[float, float] = (0.0, 1.0),
    seed: int = 0,
) -> Tensor:
    """Adversarial images: PGD on the cross-entropy of ``model(images)`` (Madry et al.).

    Args:
        model: ``images (B, C, H, W) -> logits (B, K)`` (put it in eval mode first).
        images: ``(B, C, H, W)`` inside ``bounds`` (else a ValueError). labels: ``(B,)``
            class indices in ``[0, K)``, an integer tensor (else a ValueError).
        epsilon: radius (> 0). steps: >= 1. alpha: step (default ``2.5 eps / steps``).
        norm: ``"linf"`` or ``"l2"``. bounds: the valid pixel range ``(low, high)``,
            ``low < high``.
        seed: of the random start, drawn from a generator of its own on the images'
            device (torch's global RNG is not used: the same seed, the same start,
            whatever other threads draw meanwhile).

    Runs from evaluation code too: under ``torch.no_grad()`` the ascent has gradients on,
    and under ``torch.inference_mode()`` it leaves inference mode, cloning ``images`` and
    ``labels`` out of it if they were made in it (the model's parameters must be normal
    tensors: a model built under inference mode cannot be attacked).

    Returns:
        ``(B, C, H, W)`` images within ``epsilon`` of ``images`` and inside ``bounds``.

    Example:
        >>> m = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
        >>> x = torch.rand(3, 1, 2, 2)
        >>> adv = pgd_pixels(m, x, torch.tensor([0, 1, 0]), epsilon=0.1, steps=2)
        >>> bool((adv - x).abs().max() <= 0.1 + 1e-6), bool(adv.min() >= 0)
        (True, True)
    """
    eps, norm = check_positive("epsilon", epsilon), check_norm(norm)
    steps = positive_int("steps", steps)
    alpha = check_positive("alpha", 2.5 * eps / steps if alpha is None else alpha)
    bounds = check_bounds(bounds)
    check_inside("images", images, bounds)
    instance_of("model", model, nn.Module, "a torch.nn.Module")
    labels, seen = _class_indices(labels, images.shape[0])
    generator = seeded_generator(seed, images.device)
    with torch.inference_mode(False), torch.enable_grad():  # (evaluation code: no_grad)
        x, labels = _autograd_usable(images), _autograd_usable(labels)
        delta = random_start(x, eps, norm, generator=generator)
        for step in range(steps):
            delta = ((x + delta).clamp(*bounds) - x).requires_grad_(True)
            logits = model(x + delta)  # (B, K)
            if step == 0:
                _check_classes(seen, logits)
            loss = F.cross_entropy(logits, labels)
            (grad,) = torch.autograd.grad(loss, delta)
            delta = project(delta.detach() + alpha * ascent_direction(grad, norm), eps, norm)
        return (x + delta).clamp(*bounds).detach()


def _autograd_usable(t: Tensor) -> Tensor:
    """``t`` detached; a tensor made under ``torch.inference_mode()`` cloned (outside it)
    into a normal one, which autograd can save ("Inference tensors cannot be saved for
    backward")."""
    return t.detach().clone() if t.is_inference() else t.detach()


def pgd_embeddings(
    model: nn.Module,
    batch: Any,
    loss_fn: LossFn,
    *,
    epsilon: float,
    steps: int = 10,
    alpha: float | None = None,
    norm: str = "l2",
    embedding: str | None = None,
    seed: int | None = None,
) -> Perturbation:
    """PGD on the embeddings of ``batch``: evaluate under it with ``p.active()``.

    Args:
        model, batch, loss_fn: the attack maximizes ``loss_fn(model, batch)``.
        epsilon, steps, alpha, norm, embedding: as in :class:`~attnlab.robust.PGD`.
        seed: of the random start, drawn as :func:`pgd_pixels` draws its own, from a
            generator of its own (the global RNG not used; the same seed, the same attack,
            whatever other threads draw meanwhile). None (the default): drawn from torch's
            global RNG, which it advances. A model in training mode draws its dropout
            from the global RNG: put it in eval mode for a reproducible attack.

    Runs under ``torch.no_grad()`` (the ascent has gradients on), not under
    ``torch.inference_mode()`` (a RuntimeError: ``batch`` and ``loss_fn`` may hold
    inference tensors, which autograd cannot use).

    Example:
        >>> m = nn.Sequential(nn.Embedding(5, 3), nn.Flatten(), nn.Linear(6, 2))
        >>> ids, y = torch.tensor([[1, 2], [3, 4]]), torch.tensor([0, 1])
        >>> p = pgd_embeddings(m, ids, lambda m, b: F.cross_entropy(m(b), y), epsilon=0.5)
        >>> bool(p.delta.flatten(1).norm(dim=1).max() <= 0.5 + 1e-6)
        True
        >>> loss = lambda m, b: F.cross_entropy(m(b), y)
        >>> a, b = (pgd_embeddings(m, ids, loss, epsilon=0.5, seed=3) for _ in range(2))
        >>> torch.equal(a.delta, b.delta)
        True
    """
    pgd = PGD(epsilon, steps=steps, alpha=alpha, norm=norm, embedding=embedding)
    return pgd.attack(model, batch, loss_fn, seed=seed)


# ---------------------------------------------------------------------------------------
# greedy character edits


@dataclass
class EditResult:
    """The attack on one text: the edited text, the edits per word, whether it won.

    Example:
        >>> att = CharEditAttack(1, "x")  # one edit per word, inserting "x"
        >>> score = lambda i, t: torch.tensor([-float(s.count("x")) for s in t])
        >>> wins = lambda i, t: [s.count("x") == 2 for s in t]  # two x's fool the "model"
        >>> [(r.edits, r.success) for r in att.attack(["ab cd", "ok"], score, wins)]
        [([1, 1], True), ([1], False)]
    """

    text: str
    edits: list[int]
    success: bool


def word_edits(
    word: str,
    protect: Callable[[str], bool],
    alphabet: str,
    *,
    allowed: Callable[[str], bool] | None = None,
) -> list[str]:
    """Every word one edit away (swap two neighbours, drop one, insert one of
    ``alphabet``) that keeps the protected characters and their adjacency.

    A protected character (a digit of a date) is never dropped, swapped or inserted (those
    of ``alphabet`` are skipped), nothing is inserted between two protected characters,
    and none is dropped from between two of them, so ``"21.11"`` never becomes ``"2111"``.
    ``allowed(edited) -> bool`` (default: all): the edited words it refuses are left
    out, e.g. those that name another month.

    Example:
        >>> sorted(word_edits("a1", str.isdigit, "x"))
        ['1', 'a1x', 'ax1', 'xa1']
        >>> sorted(word_edits("a1", str.isdigit, "x7"))  # "7" is protected: never inserted
        ['1', 'a1x', 'ax1', 'xa1']
        >>> sorted(word_edits("a1", str.isdigit, "x", allowed=lambda w: "x" not in w))
        ['1']
    """
    alphabet = "".join(a for a in alphabet if not protect(a))
    out: set[str] = set()
    n = len(word)
    for i in range(n):
        c = word[i]
        left = i > 0 and protect(word[i - 1])
        right = i + 1 < n and protect(word[i + 1])
        if n > 1 and not protect(c) and not (left and right):
            out.add(word[:i] + word[i + 1 :])
        if i + 1 < n and c != word[i + 1] and not protect(c) and not protect(word[i + 1]):
            out.add(word[:i] + word[i + 1] + c + word[i + 2 :])
    for i in range(n + 1):
        if 0 < i < n and protect(word[i - 1]) and protect(word[i]):
            continue
        out.update(word[:i] + a + word[i:] for a in alphabet)
    out.discard(word)
    return sorted(out if allowed is None else filter(allowed, out))


class CharEditAttack:
    """Greedy character edits within ``budget`` edits per word (words: split on " ").

    Args:
        budget: edits allowed in each word (>= 0).
        alphabet: characters that may be inserted (no space); the protected ones among
            them never are.
        protect: characters never edited, inserted or removed (default none); e.g.
            ``str.isdigit`` for dates.
        max_candidates: edits scored per text and round, drawn at random (seeded).
        seed: of that draw.

    ``attack(texts, score, wrong, allowed=None)``: ``score(index, texts) -> (N,)`` (lower
    = worse for the model, e.g. the log-probability of the right answer) and
    ``wrong(index, texts) -> list[bool]`` (the model's answer is wrong) see edited texts
    and, in ``index``, which of the original texts each one comes from.
    ``allowed(index, word, edited) -> bool`` (default: all) says whether ``word``, as
    text ``index`` had it before any edit, may be edited into ``edited``: the edits that
    would change the right answer are refused there (the dates study refuses a month
    name that becomes another month's, ``"Jun"`` -> ``"Ju"`` -> ``"Jul"``).

    Example:
        >>> att = CharEditAttack(1, "x")
        >>> r = att.attack(["ab"], lambda i, t: torch.tensor([-s.count("x") for s in t]),
        ...                lambda i, t: ["x" in s for s in t])
        >>> r[0].success, r[0].edits, r[0].text.count("x")
        (True, [1], 1)
    """

    def __init__(
        self,
        budget: int,
        alphabet: str,
        *,
        protect: Callable[[str], bool] | None = None,
        max_candidates: int = 64,
        seed: int = 0,
    ) -> None:
        self.budget = nonnegative_int("budget", budget)
        if not isinstance(alphabet, str) or " " in alphabet:
            raise ValueError(f"alphabet must be a str without spaces, got {alphabet!r}")
        self.alphabet = alphabet
        if protect is not None and not callable(protect):  # (it failed in attack())
            raise TypeError(
                f"protect must be a callable (char) -> bool or None, got {type(protect).__name__}"
            )
        self.protect = protect or (lambda c: False)
        self.max_candidates = positive_int("max_candidates", max_candidates)
        self.seed = nonnegative_int("seed", seed)  # (None drew from the clock)

    def _candidates(
        self,
        words: list[str],
        used: list[int],
        rng: random.Random,
        allowed: Callable[[int, str], bool] | None,
    ) -> list[tuple[int, str]]:
        """``max_candidates`` drawn among the allowed edits of the words with budget left;
        ``allowed(j, edited)``: may word ``j`` become ``edited`` (None: all may)."""
        cands = [
            (j, w)
            for j, word in enumerate(words)
            if used[j] < self.budget
            for w in word_edits(
                word,
                self.protect,
                self.alphabet,
                allowed=None if allowed is None else partial(allowed, j),
            )
        ]
        return rng.sample(cands, min(len(cands), self.max_candidates))

    def attack(
        self,
        texts: Sequence[str],
        score: Callable[[list[int], list[str]], Tensor],
        wrong: Callable[[list[int], list[str]], list[bool]],
        allowed: Callable[[int, str, str], bool] | None = None,
    ) -> list[EditResult]:
        """Attack every text; see the class docstring."""
        if allowed is not None and not callable(allowed):
            raise TypeError(
                "allowed must be a callable (index, word, edited) -> bool or None, got "
                f"{type(allowed).__name__}"
            )
        rng = random.Random(self.seed)
        words = [t.split(" ") for t in texts]
        first = [list(w) for w in words]  # the words as they were: what allowed judges
        used = [[0] * len(w) for w in words]
        done = wrong(list(range(len(texts))), list(texts))
        for _ in range(self.budget * max((len(w) for w in words), default=0)):
            todo = [i for i in range(len(texts)) if not done[i]]
            cands = {
                i: self._candidates(words[i], used[i], rng, _judge(allowed, i, first[i]))
                for i in todo
            }
            flat = [(i, j, w) for i in todo for j, w in cands[i]]
            if not flat:
                break
            edited = [" ".join([*words[i][:j], w, *words[i][j + 1 :]]) for i, j, w in flat]
            scores = score([i for i, _, _ in flat], edited).tolist()
            best: dict[int, tuple[float, int, str]] = {}
            for (i, j, w), s in zip(flat, scores, strict=True):
                if i not in best or s < best[i][0]:
                    best[i] = (s, j, w)
            for i, (_, j, w) in best.items():
                words[i][j], used[i][j] = w, used[i][j] + 1
            now = wrong(list(best), [" ".join(words[i]) for i in best])
            for i, w_ in zip(best, now, strict=True):
                done[i] = w_
        return [
            EditResult(" ".join(w), u, bool(d)) for w, u, d in zip(words, used, done, strict=True)
        ]


def _judge(
    allowed: Callable[[int, str, str], bool] | None, index: int, first: list[str]
) -> Callable[[int, str], bool] | None:
    """``allowed`` for text ``index``: may its word ``j`` (``first[j]`` before any edit)
    become ``edited``."""
    if allowed is None:
        return None
    return lambda j, edited: bool(allowed(index, first[j], edited))
