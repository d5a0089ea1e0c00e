"""Seeded library calls draw from a generator of their own, not torch's process-wide RNG:
two threads with different seeds at once each get the single-threaded result of its seed.

(``train_feature_vit`` and ``pgd_pixels``/``pgd_embeddings`` seeded torch's global RNG
inside ``fork_rng``: the second thread's ``manual_seed`` reset the first one's stream;
two trainings at once were 0.99 and 0.04 off their single-threaded models, an attack
0.19 off. ``feature_vit`` trained twice when two threads asked for the same model.)
Each test forces the interleaving that broke the old code (:class:`_Order`).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import attnlab.robust.adversarial as adversarial
import attnlab.robust.attacks as attacks
from attnlab.models.vit import ViT
from attnlab.nn.seeded import reset_parameters
from attnlab.tasks import generative
from attnlab.tasks.vision import DigitsTask

TIMEOUT = 60.0


class _Order:
    """The interleaving that broke the old code: thread 0 enters its job (and seeds) and
    reaches its first draw; only then thread 1 enters its job and reaches its first draw;
    thread 0 draws everything; then thread 1 draws."""

    def __init__(self) -> None:
        self.gate = threading.Barrier(2, timeout=TIMEOUT)
        self.entered0, self.done0 = threading.Event(), threading.Event()

    def forced(self, draw: Callable[..., Any]) -> Callable[..., Any]:
        """``draw`` that holds each thread at its first call as the order says."""
        first: set[str] = set()

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            me = threading.current_thread().name
            if me.startswith("seed-") and me not in first:
                first.add(me)
                if me == "seed-0":
                    self.entered0.set()
                self.gate.wait()  # both past their seeding (old code: the global RNG's)
                if me == "seed-1":
                    assert self.done0.wait(TIMEOUT)
            return draw(*args, **kwargs)

        return wrapper


def _together(job: Callable[[int], Any], order: _Order | None = None) -> dict[int, Any]:
    """``job(0)`` and ``job(1)`` in two threads started at a barrier (and held in
    ``order``'s order, if given)."""
    start, out, errors = threading.Barrier(2, timeout=TIMEOUT), {}, []

    def run(i: int) -> None:
        try:
            start.wait()
            if order is not None and i == 1:
                assert order.entered0.wait(TIMEOUT)
            out[i] = job(i)
        except BaseException as e:  # reported below
            errors.append(e)
        finally:
            if order is not None and i == 0:
                order.done0.set()

    threads = [threading.Thread(target=run, args=(i,), name=f"seed-{i}") for i in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT)
    assert not any(t.is_alive() for t in threads), "a thread hung"
    assert not errors, errors
    return out


def _flat(model: nn.Module) -> Tensor:
    return torch.cat([p.detach().flatten() for p in model.state_dict().values()])


def _train(seed: int) -> Tensor:
    return _flat(generative.train_feature_vit(3, seed=seed, batch_size=16))


def test_train_feature_vit_in_two_threads_equals_each_seeds_single_threaded_model(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ref = {s: _train(s) for s in (0, 1)}
    assert torch.equal(_train(0), ref[0])  # the same seed, the same model
    assert not torch.equal(ref[0], ref[1])  # positive control: the seed matters
    order = _Order()
    monkeypatch.setattr(DigitsTask, "batch", order.forced(DigitsTask.batch))
    out = _together(_train, order)
    for s in (0, 1):
        diff = float((out[s] - ref[s]).abs().max())
        assert torch.equal(out[s], ref[s]), f"seed {s}: {diff} off its single-threaded model"


def test_feature_vit_asked_by_two_threads_at_once_trains_once(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ATTNLAB_CACHE", str(tmp_path))
    monkeypatch.setattr(generative, "_FEATURE_VITS", {})
    trained = []
    real = generative.train_feature_vit

    def slow(steps: int, *, seed: int = 0, batch_size: int = 128) -> ViT:
        trained.append(seed)
        time.sleep(0.3)  # the other thread asks meanwhile
        return real(steps, seed=seed, batch_size=16)

    monkeypatch.setattr(generative, "train_feature_vit", slow)
    out = _together(lambda _: generative.feature_vit(2, seed=0))
    assert trained == [0] and out[0] is out[1]
    assert torch.equal(_flat(out[0]), _flat(real(2, seed=0, batch_size=16)))


def _built(make: Callable[[], nn.Module], g: torch.Generator) -> nn.Module:
    """``make()`` built on the meta device, its parameters drawn from ``g`` (no global
    RNG drawn)."""
    with torch.device("meta"):
        model = make()
    return reset_parameters(model.to_empty(device="cpu"), g)


def _pixels(seed: int, norm: str) -> Tensor:
    g = torch.Generator().manual_seed(0)
    model = _built(lambda: nn.Sequential(nn.Flatten(), nn.Linear(64, 10)), g).eval()
    x, y = torch.rand(4, 1, 8, 8, generator=g), torch.randint(0, 10, (4,), generator=g)
    return attacks.pgd_pixels(model, x, y, epsilon=0.1, steps=1, alpha=1e-3, norm=norm, seed=seed)


def _embeddings(seed: int) -> Tensor:
    g = torch.Generator().manual_seed(0)
    model = _built(lambda: nn.Sequential(nn.Embedding(5, 3), nn.Flatten(), nn.Linear(6, 2)), g)
    ids, y = torch.tensor([[1, 2], [3, 4]]), torch.tensor([0, 1])
    p = attacks.pgd_embeddings(
        model, ids, lambda m, b: F.cross_entropy(m(b), y), epsilon=0.5, steps=1, seed=seed
    )
    assert p.delta is not None
    return p.delta


@pytest.mark.parametrize("attack", ["pixels-linf", "pixels-l2", "embeddings"])
def test_pgd_in_two_threads_equals_each_seeds_single_threaded_attack(
    attack: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    def run(seed: int) -> Tensor:
        if attack == "embeddings":
            return _embeddings(seed)
        return _pixels(seed, attack.split("-")[1])

    ref = {s: run(s) for s in (0, 1)}
    assert torch.equal(run(0), ref[0])  # the same seed, the same attack
    assert not torch.equal(ref[0], ref[1])  # positive control: the seed matters
    order = _Order()
    for module in (attacks, adversarial):  # where each attack looks up its random start
        monkeypatch.setattr(module, "random_start", order.forced(module.random_start))
    out = _together(run, order)
    for s in (0, 1):
        diff = float((out[s] - ref[s]).abs().max())
        assert torch.equal(out[s], ref[s]), f"seed {s}: {diff} off its single-threaded attack"


def test_a_seeded_attack_leaves_the_global_rng_alone() -> None:
    state = torch.get_rng_state()
    _pixels(3, "l2"), _embeddings(3)
    assert torch.equal(torch.get_rng_state(), state)


def test_reset_parameters_draws_a_vit_as_its_build_does() -> None:
    """Each parameter from the distribution its layer's build draws it from: constants
    equal, random ones with the same spread and 95% quantile of ``|w|`` (against a build
    on the global RNG)."""
    torch.manual_seed(0)
    built = DigitsTask(d_model=128, dim_feedforward=256).build_model()
    assert isinstance(built, ViT)
    drawn = _built(lambda: ViT(built.cfg), torch.Generator().manual_seed(0))
    for (name, a), b in zip(built.state_dict().items(), drawn.state_dict().values(), strict=True):
        if float(a.std()) == 0:  # ones and zeros
            assert torch.equal(a, b), name
        elif a.numel() >= 1000:
            assert abs(float(b.std()) / float(a.std()) - 1) < 0.1, name
            qa, qb = (float(torch.quantile(t.abs().flatten(), 0.95)) for t in (a, b))
            assert abs(qb / qa - 1) < 0.1, name


def test_reset_parameters_refuses_a_layer_it_cannot_draw() -> None:
    with pytest.raises(
        TypeError, match=r"^Bilinear has parameters but no reset_parameters\(generator=\.\.\.\)"
    ):
        reset_parameters(nn.Sequential(nn.Linear(2, 2), nn.Bilinear(2, 2, 2)), torch.Generator())
    with pytest.raises(TypeError, match=r"generator must be a torch\.Generator, got int"):
        reset_parameters(nn.Linear(2, 2), 0)  # type: ignore[arg-type]
    lin = reset_parameters(nn.Linear(2, 2), torch.Generator())  # positive control
    assert isinstance(lin, nn.Linear)
