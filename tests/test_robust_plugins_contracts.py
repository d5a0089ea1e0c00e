"""attnlab.robust's adversarial plug-ins keep their promises: in pixel space ``x + delta``
stays inside the bounds (PGD's attack is pgd_pixels'), regularizers compose with them in
either order (a regularizer around one reads the pass it trains on), an embedding layer
that takes no part in the loss is named with ``embedding=``, and numpy numbers are
numbers. Each against an independent computation or with a control."""

from __future__ import annotations

from functools import partial
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnlab.interpret import capture
from attnlab.robust import (
    FGM,
    PGD,
    SMART,
    EntropyRegularizer,
    FreeLB,
    Perturbation,
    SupervisedAttention,
    entropy_term,
    pgd_embeddings,
    pgd_pixels,
)
from attnlab.robust.perturb import check_positive
from attnlab.train import TrainConfig, Trainer
from tests.conftest import check_and_control
from tests.test_robust import Batch, Tiny, TinyTask

PIXELS: dict[str, Any] = {"site": "input", "bounds": (0.0, 1.0), "embedding": "0"}

# ---------------------------------------------------------------------------------------
# pixel-space plug-ins: x + delta kept inside the bounds (Madry's projection)


def _pixel_model(positive: bool = False) -> nn.Module:
    """Identity ("0", the perturbed input) -> flatten -> linear, on 4x4 images, float64."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Identity(), nn.Flatten(), nn.Linear(16, 3)).double()
    if positive:  # d (sum of logits) / d pixel > 0 for every pixel
        with torch.no_grad():
            model[2].weight.uniform_(0.1, 1.0)
    return model


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_pgd_plugin_in_pixel_space_is_pgd_pixels(norm: str) -> None:
    model = _pixel_model()
    x = torch.zeros(8, 1, 4, 4, dtype=torch.float64)  # black: half the start leaves [0, 1]
    x[:4] = 1.0  # white: the other half
    y = torch.randint(0, 3, (8,))
    loss = lambda m, b: F.cross_entropy(m(b), y)  # noqa: E731
    eps = 0.1 if norm == "linf" else 0.4
    want = pgd_pixels(model, x, y, epsilon=eps, steps=10, norm=norm, seed=0)
    g = torch.Generator().manual_seed(0)  # pgd_pixels' start, drawn from the global RNG
    torch.manual_seed(int(torch.randint(2**31, (1,), generator=g)))
    pert = PGD(eps, steps=10, norm=norm, **PIXELS).attack(model, x, loss)
    assert pert.delta is not None
    got = x + pert.delta
    assert bool(((got >= 0) & (got <= 1)).all())  # inside the bounds, unclamped
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    assert int((got != x).sum()) == int((want != x).sum()) > x.numel() // 4
    with torch.no_grad():
        assert float(loss(model, got)) == pytest.approx(float(loss(model, want)), rel=1e-12)
        assert float(loss(model, got)) > float(loss(model, x))  # the control: it attacked


def _recorded_deltas(plug: Any, model: nn.Module, x: Tensor) -> list[Tensor]:
    """The perturbation each forward of ``plug.step`` ran with (the loss: the logits' sum)."""
    pert, seen = plug.perturbation(model), []

    def logits(m: nn.Module, b: Tensor) -> Tensor:
        if pert.delta is not None:
            seen.append(pert.delta.detach().clone())
        return m(b)

    if isinstance(plug, SMART):
        plug.outputs = logits
        plug.step(model, x, lambda m, b: m(b).sum())
    else:
        plug.step(model, x, lambda m, b: logits(m, b).sum())
    return seen


@pytest.mark.parametrize("name", ["pgd", "freelb", "smart"])
def test_pixel_plugins_keep_every_pixel_movable(name: str) -> None:
    model = _pixel_model(positive=True)
    x = torch.zeros(8, 1, 4, 4, dtype=torch.float64)  # black images
    plug: Any = {
        "pgd": PGD(0.1, steps=3, norm="linf", **PIXELS),
        "freelb": FreeLB(0.1, steps=3, alpha=0.05, norm="linf", **PIXELS),
        "smart": SMART(lambda m, b: m(b), epsilon=0.1, noise=0.05, steps=2, **PIXELS),
    }[name]
    torch.manual_seed(1)
    deltas = _recorded_deltas(plug, model, x)
    assert len(deltas) >= 2
    for d in deltas:  # the start and every step: x + delta inside [0, 1]
        assert bool((x + d >= 0).all()) and bool((x + d <= 1).all())
    if name != "smart":  # every pixel has a positive gradient: every one moved up
        assert bool((deltas[-1] > 0).all())


@pytest.mark.parametrize("name", ["fgm", "pgd", "freelb", "smart"])
def test_pixel_plugins_refuse_images_outside_their_bounds(name: str) -> None:
    """Normalized images in [-1, 1] with bounds (0, 1): each pass (the clean one too) was
    silently clamped to [0, 1]; pgd_pixels refuses such images, and so do they."""
    make: Any = {
        "fgm": lambda **k: FGM(0.1, norm="linf", **k),
        "pgd": lambda **k: PGD(0.1, steps=2, norm="linf", **k),
        "freelb": lambda **k: FreeLB(0.1, steps=2, norm="linf", **k),
        "smart": lambda **k: SMART(lambda m, b: m(b), epsilon=0.1, steps=1, **k),
    }[name]
    model, y = _pixel_model(), torch.randint(0, 3, (4,))
    x = torch.rand(4, 1, 4, 4, dtype=torch.float64) * 2 - 1
    loss = lambda m, b: F.cross_entropy(m(b), y)  # noqa: E731
    inside = {**PIXELS, "bounds": (-1.0, 1.0)}
    check_and_control(
        lambda: make(**PIXELS).step(model, x, loss),
        lambda: make(**inside).step(model, x, loss),
        ValueError,
        r"the input of Identity \(site='input'\) must lie inside bounds=\(0.0, 1.0\), got "
        r"values in \[-0.9.*, 0.9.*\]; pass the images' own range as bounds",
    )


# ---------------------------------------------------------------------------------------
# regularizers compose with adversarial plug-ins, in either order


def _adversaries() -> dict[str, Any]:
    return {
        "fgm": FGM(0.3),
        "pgd": PGD(0.3, steps=2, random_start=False),
        "pgd_mixed": PGD(0.3, steps=2, clean=True),
        "freelb": FreeLB(0.3, steps=3),
        "smart": SMART(lambda m, b: m(b.ids), epsilon=0.1, steps=2),
    }


def _regularizers() -> dict[str, Any]:
    align = lambda b: (b.ids == 1).double()  # noqa: E731
    return {
        "entropy": EntropyRegularizer(0.5, layers=["mha"]),
        "supervised": SupervisedAttention("pool", align, weight=0.5),
    }


@pytest.mark.parametrize("reg", ["entropy", "supervised"])
@pytest.mark.parametrize("adv", list(_adversaries()))
@pytest.mark.parametrize("outer", [True, False], ids=["reg_around", "reg_inside"])
def test_regularizers_compose_in_either_order(adv: str, reg: str, outer: bool) -> None:
    a, r = _adversaries()[adv], _regularizers()[reg]
    cfg = TrainConfig(steps=2, batch_size=8, eval_every=2, progress=False)
    hist = Trainer(TinyTask(32), cfg, plugins=[a, r] if outer else [r, a]).fit()
    assert len(hist) == 1 and np.isfinite(hist[0]["clean_loss"])


def _task_loss(model: nn.Module, batch: Batch) -> Tensor:
    return F.cross_entropy(model(batch.ids), batch.y)


@pytest.mark.parametrize(
    ("adv", "trained"), [("fgm", -1), ("pgd", -1), ("freelb", -1), ("smart", 0)]
)
def test_a_regularizer_around_reads_the_pass_trained_on(adv: str, trained: int) -> None:
    model, batch = Tiny().double(), TinyTask(16).batch(torch.arange(8))
    passes: list[list[Tensor]] = []

    def recording(m: nn.Module, b: Batch) -> Tensor:
        with capture(m, layers=["mha"]) as cap:
            out = _task_loss(m, b)
        passes.append([c.weights for c in cap])
        return out

    torch.manual_seed(3)
    plain = _adversaries()[adv].step(model, batch, recording)
    reg = EntropyRegularizer(0.5, layers=["mha"])
    want = float(plain.detach()) + 0.5 * float(entropy_term(passes[trained]))
    torch.manual_seed(3)
    model.zero_grad()
    composed = partial(reg.step, loss_fn=partial(_adversaries()[adv].step, loss_fn=_task_loss))
    got = composed(model, batch)  # as Trainer(plugins=[adv, reg]) builds it
    assert float(got.detach()) == pytest.approx(want, rel=1e-9)
    got.backward()  # its graph is whole: "backward through the graph a second time" before
    every = float(plain.detach()) + 0.5 * float(entropy_term([w for p in passes for w in p]))
    if len(passes) > 1:  # the control: the term over every pass is another number
        assert every != pytest.approx(want, rel=1e-6)


# ---------------------------------------------------------------------------------------
# an embedding layer outside the loss is named; numpy numbers are numbers


class _UnusedFirst(nn.Module):
    """Its first embedding (``pos``) is never used: ``tok`` embeds the input."""

    def __init__(self) -> None:
        super().__init__()
        self.pos, self.tok, self.lin = nn.Embedding(4, 3), nn.Embedding(5, 3), nn.Linear(3, 2)

    def forward(self, ids: Tensor) -> Tensor:
        return self.lin(self.tok(ids).mean(1))


@pytest.mark.parametrize("name", ["fgm", "pgd", "freelb", "freelb1", "smart"])
def test_an_unused_embedding_layer_names_the_argument(name: str) -> None:
    m, ids, y = _UnusedFirst(), torch.tensor([[1, 2]]), torch.tensor([0])
    loss = lambda mm, b: F.cross_entropy(mm(b), y)  # noqa: E731
    make = {
        "fgm": FGM,
        "pgd": PGD,
        "freelb": partial(FreeLB, steps=2),
        "freelb1": partial(FreeLB, steps=1),
        "smart": partial(SMART, lambda m, b: m(b)),
    }[name]
    check_and_control(
        lambda: make(epsilon=0.1).step(m, ids, loss),
        lambda: make(epsilon=0.1, embedding="tok").step(m, ids, loss),
        ValueError,
        r"'pos' .* took no part in the loss.*pass embedding='<submodule name>'.*\['pos', 'tok'\]",
    )


class _Shared(nn.Module):
    """One embedding ``emb`` read for both inputs of a pair (a siamese model)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb, self.lin = nn.Embedding(7, 3), nn.Linear(3, 2)

    def forward(self, pair: tuple[Tensor, Tensor]) -> Tensor:
        return self.lin(self.emb(pair[0]).mean(1) + self.emb(pair[1]).mean(1))


@pytest.mark.parametrize("name", ["fgm", "pgd", "freelb", "smart", "pgd_embeddings"])
def test_a_shared_embedding_on_inputs_of_two_lengths_is_named(name: str) -> None:
    """An embedding run on a 4-token and a 3-token input in one forward failed inside the
    hook as "The size of tensor a (3) must match the size of tensor b (4)"."""
    m, y = _Shared().double(), torch.tensor([0, 1])
    loss = lambda mm, b: F.cross_entropy(mm(b), y)  # noqa: E731
    run = {
        "fgm": lambda b: FGM(0.1).step(m, b, loss),
        "pgd": lambda b: PGD(0.1).step(m, b, loss),
        "freelb": lambda b: FreeLB(0.1, steps=2).step(m, b, loss),
        "smart": lambda b: SMART(lambda mm, bb: mm(bb), epsilon=0.1).step(m, b, loss),
        "pgd_embeddings": lambda b: pgd_embeddings(m, b, loss, epsilon=0.1),
    }[name]
    first = torch.randint(0, 7, (2, 4))
    check_and_control(
        lambda: run((first, torch.randint(0, 7, (2, 3)))),
        lambda: run((first, torch.randint(0, 7, (2, 4)))),  # one length: one delta fits both
        ValueError,
        r"layer 'emb' \(Embedding\) has shape \(2, 4, 3\), its output here \(2, 3, 3\).*"
        r"pass embedding='<submodule name>'",
    )


def test_a_shared_embedding_gets_one_delta_whose_gradient_sums_both_calls() -> None:
    """Inputs of one length: the one delta goes into both calls; its gradient is the
    hand-derived ``2 / L * W^T (softmax(z) - onehot(y)) / B`` at every position."""
    m, y = _Shared().double(), torch.tensor([0, 1])
    a, b = torch.randint(0, 7, (2, 4)), torch.randint(0, 7, (2, 4))
    p = Perturbation(m.emb, name="emb")
    with p.active(track=True):
        F.cross_entropy(m((a, b)), y).backward()
    with torch.no_grad():
        e, w, c = m.emb.weight, m.lin.weight, m.lin.bias
        dz = (((e[a].mean(1) + e[b].mean(1)) @ w.T + c).softmax(-1) - F.one_hot(y, 2)) / 2
        want = (2 / 4 * dz @ w)[:, None].expand(2, 4, 3)  # (B, L, E)
    assert p.delta is not None and p.delta.grad is not None
    torch.testing.assert_close(p.delta.grad, want, rtol=1e-12, atol=1e-15)


def test_a_perturbation_that_does_not_fit_the_output_is_named() -> None:
    """A delta made for a batch of 2 broadcast a batch of 1 up to 2 outputs silently; a
    delta that broadcasts onto the output (one for every position) is still added."""
    emb = nn.Embedding(5, 3)
    p = Perturbation(emb)
    p.leaf(torch.zeros(2, 4, 3))

    def run(ids: Tensor) -> Tensor:
        with p.active():
            return emb(ids)

    check_and_control(
        lambda: run(torch.tensor([[1, 2, 3, 4]])),
        lambda: run(torch.tensor([[1, 2, 3, 4], [0, 1, 2, 3]])),
        ValueError,
        r"layer Embedding has shape \(2, 4, 3\), its output here \(1, 4, 3\)",
    )
    p.leaf(torch.ones(1, 1, 3))
    ids = torch.tensor([[1, 2, 3, 4], [0, 1, 2, 3]])
    torch.testing.assert_close(run(ids), emb(ids) + 1, rtol=0, atol=0)


def test_numbers_include_numpy_scalars_but_not_bools() -> None:
    assert FGM(np.float32(0.5)).epsilon == 0.5 and PGD(np.int64(1), steps=4).alpha == 0.625
    assert FreeLB(0.2, alpha=np.float64(0.05)).alpha == 0.05
    assert check_positive("x", np.float16(0), zero=True) == 0.0
    for bad in (True, np.bool_(True), "0.1"):
        check_and_control(
            lambda bad=bad: FGM(bad), lambda: FGM(0.1), TypeError, "epsilon must be a real"
        )
    check_and_control(
        lambda: FGM(np.float64("nan")), lambda: FGM(np.float64(1)), ValueError, "epsilon"
    )
