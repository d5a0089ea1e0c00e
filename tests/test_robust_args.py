"""attnlab.robust's arguments: random starts on the model's device and dtype (the meta
device stands in for a GPU), bounds and flags checked when they are given, and a bare str
refused where a list of layer names is expected. Every refusal has a positive control."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnlab.nn import MultiHeadAttention
from attnlab.robust import (
    FGM,
    PGD,
    SMART,
    EntropyRegularizer,
    FreeLB,
    Perturbation,
    pgd_embeddings,
    pgd_pixels,
)
from attnlab.robust.perturb import random_start
from tests.conftest import check_and_control

NORMS = ["l2", "linf"]


def _text_model(device: str) -> tuple[nn.Module, Tensor, Tensor]:
    """Embedding -> flatten -> linear on ``device``, with a batch of ids and labels."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(5, 3), nn.Flatten(), nn.Linear(6, 2)).to(device)
    ids = torch.tensor([[1, 2], [3, 4]], device=device)
    return model, ids, torch.tensor([0, 1], device=device)


def _image_model(device: str) -> tuple[nn.Module, Tensor, Tensor]:
    """Flatten -> linear on 2x2 one-channel images in [0, 1] on ``device``."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 2)).to(device)
    x = torch.rand(3, 1, 2, 2).to(device)
    return model, x, torch.tensor([0, 1, 0], device=device)


# ---------------------------------------------------------------------------------------
# random starts follow the input's device and dtype


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64])
def test_random_start_follows_device_and_dtype(norm: str, dtype: torch.dtype) -> None:
    like = torch.zeros(4, 3, 5, dtype=dtype, device="meta")
    out = random_start(like, 0.5, norm)
    assert (out.device.type, out.dtype, out.shape) == ("meta", dtype, like.shape)


@pytest.mark.parametrize("norm", NORMS)
def test_random_start_on_cpu_keeps_its_draw_and_ball(norm: str) -> None:
    like = torch.zeros(4, 3, 5, dtype=torch.float64)
    torch.manual_seed(7)
    out = random_start(like, 0.5, norm)
    torch.manual_seed(7)  # the same draws, written out
    if norm == "linf":
        want = torch.empty_like(like).uniform_(-0.5, 0.5)
    else:
        g = torch.randn_like(like)
        radius = 0.5 * torch.rand(4, 1, 1, dtype=torch.float64)
        want = g / g.flatten(1).norm(dim=1).view(-1, 1, 1) * radius
    torch.testing.assert_close(out, want, rtol=1e-12, atol=0.0)
    size = out.flatten(1).norm(dim=1) if norm == "l2" else out.flatten(1).abs().amax(1)
    assert bool((size <= 0.5).all()) and bool((size > 0).all())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_an_all_zero_gradient_has_a_zero_l2_direction_in_every_dtype(dtype: torch.dtype) -> None:
    """In float16 the 1e-12 floor of the norm was 0: 0 / 0 = NaN for the zero example,
    and FGM then gave NaN parameter gradients."""
    from attnlab.robust.perturb import ascent_direction, project

    g = torch.tensor([[3.0, -4.0], [0.0, 0.0]], dtype=torch.float64)
    want = g / g.norm(dim=1, keepdim=True).clamp_min(1e-300)  # [[0.6, -0.8], [0, 0]]
    got = ascent_direction(g.to(dtype), "l2")
    assert got.dtype == dtype
    torch.testing.assert_close(got.double(), want, rtol=0, atol=torch.finfo(dtype).eps)
    torch.testing.assert_close(
        project(g.to(dtype), 1.0, "l2").double(), want, rtol=0, atol=torch.finfo(dtype).eps
    )
    model = nn.Sequential(nn.Embedding(5, 2), nn.Flatten(), nn.Linear(4, 3)).to(dtype)
    y = torch.tensor([0, -100])  # the second example is ignored: its gradient is all 0

    def loss(m: nn.Module, b: Tensor) -> Tensor:
        return F.cross_entropy(m(b).float(), y, ignore_index=-100)

    FGM(0.5).step(model, torch.tensor([[1, 2], [3, 4]]), loss).backward()
    assert all(bool(torch.isfinite(p.grad).all()) for p in model.parameters())


@pytest.mark.parametrize("device", ["cpu", "meta"])
@pytest.mark.parametrize("norm", NORMS)
def test_pgd_embeddings_runs_on_the_models_device(device: str, norm: str) -> None:
    model, ids, y = _text_model(device)
    p = pgd_embeddings(model, ids, lambda m, b: F.cross_entropy(m(b), y), epsilon=0.5, norm=norm)
    assert p.delta is not None and p.delta.device.type == device
    assert p.delta.shape == (2, 2, 3)


@pytest.mark.parametrize("device", ["cpu", "meta"])
@pytest.mark.parametrize("norm", NORMS)
def test_pgd_pixels_runs_on_the_images_device(device: str, norm: str) -> None:
    model, x, y = _image_model(device)
    adv = pgd_pixels(model, x, y, epsilon=0.1, steps=2, norm=norm)
    assert (adv.device.type, adv.dtype, adv.shape) == (device, x.dtype, x.shape)


@pytest.mark.parametrize("device", ["cpu", "meta"])
@pytest.mark.parametrize("norm", NORMS)
def test_pgd_and_freelb_plugins_start_on_the_models_device(device: str, norm: str) -> None:
    model, ids, y = _text_model(device)

    def loss(m: nn.Module, b: Tensor) -> Tensor:
        return F.cross_entropy(m(b), y)

    pert = PGD(0.5, steps=2, norm=norm).attack(model, ids, loss)
    assert pert.delta is not None and pert.delta.device.type == device
    out = FreeLB(0.5, steps=1, norm=norm).step(model, ids, loss)  # random start by default
    assert out.device.type == device


# ---------------------------------------------------------------------------------------
# bounds: a (low, high) pair with low < high, and only with site="input"


@pytest.mark.parametrize("bounds", [(1, 0), (0.5, 0.5), (0.0, float("nan"))])
def test_pgd_pixels_refuses_bounds_not_low_below_high(bounds: tuple[float, float]) -> None:
    model, x, y = _image_model("cpu")
    check_and_control(
        lambda: pgd_pixels(model, x, y, epsilon=0.1, bounds=bounds),
        lambda: pgd_pixels(model, x, y, epsilon=0.1, bounds=(0, 1)),
        ValueError,
        r"bounds must be \(low, high\) with low < high, got \(",
    )
    inside = x.clamp(0.2, 0.8)  # images outside the bounds are refused
    adv = pgd_pixels(model, inside, y, epsilon=0.1, bounds=(0.2, 0.8))
    assert bool((adv >= 0.2).all()) and bool((adv <= 0.8).all())  # compared in float32


@pytest.mark.parametrize("bounds", ["01", b"01", (0,), (0, 1, 2), (0, "1"), (False, True), 1.0])
def test_bounds_must_be_a_pair_of_numbers(bounds: object) -> None:
    model, x, y = _image_model("cpu")
    check_and_control(
        lambda: pgd_pixels(model, x, y, epsilon=0.1, bounds=bounds),  # type: ignore[arg-type]
        lambda: pgd_pixels(model, x, y, epsilon=0.1, bounds=[-1, 2]),  # type: ignore[arg-type]
        TypeError,
        r"bounds must be a \(low, high\) pair of numbers, got ",
    )


@pytest.mark.parametrize(
    "make",
    [
        lambda **k: FGM(0.1, **k),
        lambda **k: PGD(0.1, **k),
        lambda **k: FreeLB(0.1, **k),
        lambda **k: SMART(lambda m, b: m(b), **k),
    ],
    ids=["FGM", "PGD", "FreeLB", "SMART"],
)
def test_adversary_checks_bounds_when_built(make: object) -> None:
    assert callable(make)
    check_and_control(
        lambda: make(bounds=(0, 1)),  # site="output" (the default): bounds clamp nothing
        lambda: make(site="input", bounds=(0, 1)),
        ValueError,
        r"bounds clamp the perturbed input; got bounds=\(0, 1\) with site='output', "
        r"expected site='input'",
    )
    check_and_control(
        lambda: make(site="input", bounds=(1, 0)),
        lambda: make(site="input"),
        ValueError,
        r"bounds must be \(low, high\) with low < high, got \(1, 0\)",
    )
    assert make(site="input", bounds=(0, 1)).bounds == (0.0, 1.0)
    check_and_control(  # (embedding=3 was refused only at the first step)
        lambda: make(embedding=3),
        lambda: make(embedding="embed"),
        TypeError,
        r"embedding must be a submodule name \(str\) or None, got int",
    )


def test_perturbation_checks_bounds() -> None:
    emb = nn.Embedding(4, 2)
    check_and_control(
        lambda: Perturbation(emb, "input", bounds=(1, 0)),
        lambda: Perturbation(emb, "input", bounds=(0, 1)),
        ValueError,
        r"bounds must be \(low, high\) with low < high",
    )


# ---------------------------------------------------------------------------------------
# flags are bools


@pytest.mark.parametrize("flag", ["random_start", "clean"])
@pytest.mark.parametrize("value", ["no", 0, None])
def test_pgd_flags_must_be_bool(flag: str, value: object) -> None:
    check_and_control(
        lambda: PGD(0.1, **{flag: value}),  # type: ignore[arg-type]
        lambda: PGD(0.1, **{flag: False}),  # type: ignore[arg-type]
        TypeError,
        rf"{flag} must be a bool, got {type(value).__name__}",
    )
    assert getattr(PGD(0.1, **{flag: False}), flag) is False  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------
# layers: a sequence of module names, not a str


class _Attending(nn.Module):
    """Embedding -> self-attention (named ``mha``) -> mean -> linear."""

    def __init__(self) -> None:
        super().__init__()
        self.embed, self.mha, self.head = (
            nn.Embedding(6, 8),
            MultiHeadAttention(8, 2),
            nn.Linear(8, 2),
        )

    def forward(self, ids: Tensor) -> Tensor:
        x = self.embed(ids)  # (B, L, D)
        return self.head((x + self.mha(x)).mean(1))  # (B, 2)


def test_entropy_regularizer_refuses_a_bare_str_of_layers() -> None:
    check_and_control(
        lambda: EntropyRegularizer(0.1, layers="layers.0.self_attn"),  # type: ignore[arg-type]
        lambda: EntropyRegularizer(0.1, layers=["layers.0.self_attn"]),
        TypeError,
        r"layers must be a sequence of module names, got 'layers.0.self_attn'",
    )
    with pytest.raises(TypeError, match=r"layers must be a sequence of module names \(str\)"):
        EntropyRegularizer(0.1, layers=["mha", 0])  # type: ignore[list-item]
    assert EntropyRegularizer(0.1, layers=("mha",)).layers == ["mha"]


def test_an_entropy_target_per_head_must_match_every_layers_heads() -> None:
    from attnlab.robust import entropy_term

    two, one = torch.full((1, 2, 3, 4), 0.25), torch.full((1, 1, 1, 2), 0.5)
    check_and_control(
        lambda: entropy_term([two], torch.tensor([1.0, 1.0, 1.0])),
        lambda: entropy_term([two, two], torch.tensor([1.0, 1.0])),
        ValueError,
        r"target has 3 values \(one per head\).*heads \[2\].*one number",
    )
    with pytest.raises(ValueError, match=r"target has 2 values.*heads \[1, 2\]"):
        entropy_term([two, one], torch.tensor([1.0, 1.0]))
    assert torch.isfinite(entropy_term([two, one], torch.tensor(1.0)))


@pytest.mark.parametrize(
    "target", [float("nan"), -1.0, torch.tensor(float("nan")), torch.tensor([-1.0, math.inf])]
)
def test_an_entropy_target_must_be_finite_and_nonnegative(target: float | Tensor) -> None:
    """A float NaN target made the term NaN silently; a tensor NaN or inf target passed
    :class:`EntropyRegularizer` and failed at training's first step as a divergence."""
    from attnlab.robust import entropy_term

    w = [torch.full((1, 2, 3, 4), 0.25)]
    check_and_control(
        lambda: entropy_term(w, target),
        lambda: entropy_term(w, torch.tensor([0.0, 1.0])),
        ValueError,
        r"target must be a finite number",
    )
    check_and_control(
        lambda: EntropyRegularizer(0.1, target=target),
        lambda: EntropyRegularizer(0.1, target=torch.tensor(1.0)),
        ValueError,
        r"target must be a finite number.*>= 0",
    )


def test_entropy_regularizer_with_named_layers_steps() -> None:
    torch.manual_seed(0)
    model, ids, y = _Attending(), torch.tensor([[1, 2, 3], [4, 5, 1]]), torch.tensor([0, 1])

    def loss(m: nn.Module, b: Tensor) -> Tensor:
        return F.cross_entropy(m(b), y)

    out = EntropyRegularizer(0.1, layers=["mha"]).step(model, ids, loss)
    assert float(out.detach()) < float(
        loss(model, ids).detach()
    )  # minus 0.1 * a positive mean entropy


@pytest.mark.skipif(sys.platform != "linux", reason="a pseudo-terminal through pty")
def test_a_study_shows_progress_on_a_terminal(tmp_path: Path) -> None:
    """(A study printed nothing while each row trained: 37 s for vision's plain row.)"""
    import os
    import pty

    seen: list[bytes] = []

    def read(fd: int) -> bytes:
        seen.append(os.read(fd, 4096))
        return seen[-1]

    script = str(Path(sys.executable).parent / "attnlab")
    argv = [script, "robust", "vision", "--smoke", "--method", "plain", "--out", str(tmp_path)]
    status = pty.spawn(argv, read)
    text = b"".join(seen).decode(errors="replace")
    assert os.waitstatus_to_exitcode(status) == 0, text
    assert "step 20/20" in text and "ex/s" in text, text  # the trainer's bar


def test_pgd_seed_and_a_module_without_attention_are_named() -> None:
    """(pgd_pixels' seed="a" failed inside manual_seed; a faithfulness test on a module
    that makes no attention call raised "stack expects a non-empty TensorList".)"""
    from attnlab.robust import permutation_test

    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 2)).eval()
    x, y = torch.rand(3, 1, 2, 2), torch.tensor([0, 1, 0])
    check_and_control(
        lambda: pgd_pixels(model, x, y, epsilon=0.1, seed="a"),  # type: ignore[arg-type]
        lambda: pgd_pixels(model, x, y, epsilon=0.1, seed=3),
        TypeError,
        "seed must be",
    )
    with pytest.raises(ValueError, match="module: Sequential made no attnlab attention call"):
        permutation_test(model, model, lambda m: m(x))


@pytest.mark.parametrize(
    ("images", "match"),
    [
        (torch.randint(0, 2, (3, 1, 2, 2), dtype=torch.uint8), "got dtype torch.uint8$"),
        (torch.rand(3, 1, 2, 2).tolist(), "got list$"),
    ],
)
def test_pgd_pixels_names_the_images_type_not_their_values(images: object, match: str) -> None:
    """The message held the tensor's repr cut at 60 characters ("got tensor([[[[0, 1],
    ...") instead of its dtype."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 2)).eval()
    y = torch.tensor([0, 1, 0])
    check_and_control(
        lambda: pgd_pixels(model, images, y, epsilon=0.1, steps=1),  # type: ignore[arg-type]
        lambda: pgd_pixels(model, torch.rand(3, 1, 2, 2), y, epsilon=0.1, steps=1),
        TypeError,
        "images must be a floating-point tensor, " + match,
    )


@pytest.mark.parametrize(
    ("kw", "exc", "match"),
    [
        ({"labels": torch.tensor([0.0, 1.0, 0.0])}, TypeError, r"labels must be .*got .*float32"),
        ({"labels": torch.zeros(3, 1).long()}, ValueError, r"labels must .*\(3,\), got \(3, 1\)"),
        ({"labels": torch.tensor([0, 1])}, ValueError, r"labels must .*\(3,\), got \(2,\)"),
        ({"labels": [0, 1, 0]}, TypeError, r"labels must be .*got list"),
        ({"labels": torch.tensor([0, -100, 1])}, ValueError, r"labels .* >= 0, got .*\[-100, 1\]"),
        ({"labels": torch.tensor([0, -1, 1])}, ValueError, r"labels .* >= 0, got .*\[-1, 1\]"),
        ({"labels": torch.tensor([0, 2, 1])}, ValueError, r"labels must .*\[0, 2\) .*in \[0, 2\]"),
        ({"labels": torch.tensor([0, 7, 1]).int()}, ValueError, r"labels .*\[0, 2\).*\[0, 7\]"),
        ({"model": None}, TypeError, "model must be a torch.nn.Module, got NoneType"),
    ],
)  # fmt: skip
def test_pgd_pixels_names_bad_labels_and_model(kw: dict, exc: type, match: str) -> None:
    """(Float labels: "expected target dtype to be Long"; (B, 1): "0D or 1D target tensor
    expected"; -100: accepted, that row left unattacked; -1 or 2 of 2 classes: IndexError
    "Target 2 is out of bounds"; a model of None: "'NoneType' object is not callable".)"""
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 2)).eval()
    args = {"model": model, "images": torch.rand(3, 1, 2, 2), "labels": torch.tensor([0, 1, 0])}
    check_and_control(
        lambda: pgd_pixels(**(args | kw), epsilon=0.1, steps=1),
        lambda: pgd_pixels(**args, epsilon=0.1, steps=1),
        exc,
        match,
    )


@pytest.mark.parametrize(
    ("kw", "exc", "match"),
    [
        ({"protect": 5}, TypeError, r"protect must be a callable .* or None, got int"),
        ({"seed": "x"}, TypeError, r"seed must be an int >= 0, got 'x'"),
        ({"seed": None}, TypeError, r"seed must be an int >= 0, got None"),
        ({"seed": -1}, ValueError, r"seed must be an int >= 0, got -1"),
    ],
)  # fmt: skip
def test_char_edit_attack_checks_protect_and_seed_when_built(
    kw: dict, exc: type, match: str
) -> None:
    """(protect=5 failed only in attack(): "'int' object is not callable"; seed="x" and
    None were accepted, None drawing from the clock: no run repeated.)"""
    from attnlab.robust import CharEditAttack

    check_and_control(
        lambda: CharEditAttack(1, "x", **kw),
        lambda: CharEditAttack(1, "x", protect=str.isdigit, seed=3),
        exc,
        match,
    )


class _Trained(Exception):
    """Raised by a stand-in ``train_row``: the study got as far as training a row."""


@pytest.mark.parametrize(
    "module, fn, bad, match",
    [
        ("study_vision", "vision_study", {"methods": ["plain", "bogus"]}, "methods must hold"),
        ("study_vision", "vision_study", {"methods": "plain"}, "methods must be a sequence"),
        ("study_shortcut", "shortcut_study", {"methods": ["plain", "plain"]}, "each row once"),
        ("study_shortcut", "shortcut_study", {"methods": []}, "at least one"),
        ("study_dates", "dates_study", {"examples": 0}, "examples must be a positive int"),
        ("study_dates", "dates_study", {"methods": ["plain", "x"]}, "methods must hold"),
        ("study_faithfulness", "faithfulness_study", {"names": ("dates", "x")}, "names must"),
        ("study_faithfulness", "faithfulness_row", {"name": "bogus"}, "name must be one of"),
        ("study_faithfulness", "faithfulness_row", {"examples": -1}, "examples must be"),
    ],
)
def test_a_study_checks_every_row_before_the_first_trains(
    monkeypatch: pytest.MonkeyPatch, module: str, fn: str, bad: dict, match: str
) -> None:
    """(``vision_study(["fgm", "bogus"])`` trained fgm for minutes before refusing "bogus";
    ``faithfulness_row("bogus")`` trained the dates model under that name; ``dates_study``
    with ``examples=0`` named ``limit``.)"""
    import importlib

    mod = importlib.import_module(f"attnlab.robust.{module}")

    def train_row(*a: object, **k: object) -> None:
        raise _Trained

    monkeypatch.setattr(mod, "train_row", train_row)
    study = getattr(mod, fn)
    good = {"name": "dates"} if fn == "faithfulness_row" else {}
    with pytest.raises(ValueError if "sequence" not in match else TypeError, match=match):
        study(**{**good, **bad}, smoke=True)
    with pytest.raises(_Trained):  # the positive control reaches the first row
        study(**good, smoke=True)


@pytest.mark.parametrize(
    ("rate", "exc"),
    [(5.0, ValueError), (-1.0, ValueError), (math.nan, ValueError), ("x", TypeError)],
)
@pytest.mark.parametrize("kind", ["EditedDatesTask", "AdversarialEditsTask"])
def test_edited_dates_tasks_check_rate_when_built(kind: str, rate: object, exc: type) -> None:
    """(rate=5, -1 and NaN were taken as they came; "x" failed at the first batch:
    "'<' not supported between instances of 'float' and 'str'".)"""
    from attnlab.robust import study_dates

    task = getattr(study_dates, kind)
    kw = {"train_size": 8, "test_size": 2, "locales": ("fr_FR",)}
    check_and_control(
        lambda: task(**kw, rate=rate),
        lambda: task(**kw, rate=1),
        exc,
        rf"rate must be a number in \[0, 1\].*got .*{rate if rate != 'x' else 'str'}",
    )


@pytest.mark.parametrize(
    ("target", "exc", "got"),
    [
        (torch.eye(5)[0], ValueError, r"got shape \(5,\)"),  # (Lk,): broadcast, 8.79 returned
        (torch.eye(5)[:2], ValueError, r"got shape \(2, 5\)"),  # another batch
        (torch.eye(5)[None, :4].expand(3, 4, 5), ValueError, r"got shape \(3, 4, 5\)"),
        (torch.eye(6)[None, :5].expand(3, 5, 6), ValueError, r"got shape \(3, 5, 6\)"),
        ([[1.0, 0, 0, 0, 0]] * 3, TypeError, r"got list"),  # AttributeError: no .dim
    ],
)
def test_supervised_attention_names_an_alignment_of_another_shape(
    target: object, exc: type, got: str
) -> None:
    """alignment(batch) must give (B, Lq, Lk) or (B, Lk); both documented shapes give the
    same term when the (B, Lk) row is each query's row (the control)."""
    from attnlab.robust import SupervisedAttention

    mha, x = MultiHeadAttention(8, 2).eval(), torch.randn(3, 5, 8)
    zero = lambda m, b: m(b).sum() * 0  # noqa: E731 (the step is the term alone)
    rows = torch.eye(5)[torch.tensor([0, 2, 4])]  # (B, Lk)
    each = rows[:, None].expand(3, 5, 5)  # (B, Lq, Lk): the same row for every query
    check_and_control(
        lambda: SupervisedAttention("", lambda b: target).step(mha, x, zero),
        lambda: SupervisedAttention("", lambda b: each).step(mha, x, zero),
        exc,
        r"alignment\(batch\) must return a Tensor \(B, Lq, Lk\) = \(3, 5, 5\) or "
        r"\(B, Lk\) = \(3, 5\), " + got,
    )
    a = float(SupervisedAttention("", lambda b: rows).step(mha, x, zero).detach())
    b = float(SupervisedAttention("", lambda b: each).step(mha, x, zero).detach())
    assert a == pytest.approx(b, rel=1e-6) and a > 0.5


def test_regularizer_terms_name_a_bad_weights_or_target() -> None:
    """(A target of the wrong shape: a bare RuntimeError from ``expand_as``; a list: an
    AttributeError; symmetric_kl over 3 and 4 classes: a bare RuntimeError.)"""
    from attnlab.robust import supervised_attention_term, symmetric_kl
    from attnlab.robust.regularize import head_entropies

    w = torch.full((1, 2, 3, 4), 0.25)
    check_and_control(
        lambda: supervised_attention_term(w, torch.ones(3, 5)),
        lambda: supervised_attention_term(w, torch.ones(3, 4)),
        ValueError,
        r"target must broadcast to weights' shape \(1, 2, 3, 4\), got \(3, 5\)",
    )
    check_and_control(
        lambda: supervised_attention_term(w, [[1.0, 0.0, 0.0, 0.0]]),  # type: ignore[arg-type]
        lambda: supervised_attention_term(w, torch.tensor([1.0, 0.0, 0.0, 0.0])),
        TypeError,
        r"target must be a Tensor, got list",
    )
    check_and_control(
        lambda: head_entropies([w]),  # type: ignore[arg-type]
        lambda: head_entropies(w),
        TypeError,
        r"weights must be a \(B, H, Lq, Lk\) Tensor, got list",
    )
    check_and_control(
        lambda: symmetric_kl(torch.zeros(2, 3), torch.zeros(2, 4)),
        lambda: symmetric_kl(torch.zeros(2, 4), torch.zeros(2, 4)),
        ValueError,
        r"q_logits must have p_logits' shape \(2, 3\), got \(2, 4\)",
    )


# ---------------------------------------------------------------------------------------
# project: the norm and radius checked as FGM and PGD check them


@pytest.mark.parametrize(
    ("norm", "epsilon", "exc", "match"),
    [
        ("l3", 1.0, ValueError, r"norm must be one of \('l2', 'linf'\), got 'l3'"),  # was L2
        ("L2", 1.0, ValueError, r"norm must be one of \('l2', 'linf'\), got 'L2'"),
        ("linf", -1.0, ValueError, r"epsilon must be a finite number > 0, got -1"),  # all -1
        ("l2", -1.0, ValueError, r"epsilon must be a finite number > 0, got -1"),  # flipped
        ("l2", 0.0, ValueError, r"epsilon must be a finite number > 0, got 0"),
        ("l2", float("nan"), ValueError, r"epsilon must be a finite number > 0, got nan"),
        ("l2", "1", TypeError, r"epsilon must be a real number, got str"),
    ],
)
def test_project_checks_its_norm_and_epsilon(
    norm: str, epsilon: object, exc: type, match: str
) -> None:
    """norm="l3" was projected as L2; epsilon=-1 set every L-inf value to -1 and flipped the L2
    direction ([0.3, -0.2] -> [-0.83, 0.55])."""
    from attnlab.robust import project

    d = torch.tensor([[0.3, -0.2]], dtype=torch.float64)
    check_and_control(
        lambda: project(d, epsilon, norm),  # type: ignore[arg-type]
        lambda: project(d, np.float64(0.1), "l2"),
        exc,
        match,
    )
    want = d * 0.1 / math.hypot(0.3, 0.2)  # the L2 ball of radius 0.1, by hand
    torch.testing.assert_close(project(d, 0.1, "l2"), want, rtol=1e-12, atol=0.0)
    assert torch.equal(project(d, 0.25, "linf"), torch.tensor([[0.25, -0.2]], dtype=d.dtype))
