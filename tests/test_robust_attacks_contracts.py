"""attnlab.robust's attacks refuse what they cannot honour (images outside the bounds),
never insert a protected character, and draw a seeded random start without touching
torch's global RNG."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from attnlab.robust import CharEditAttack, pgd_embeddings, pgd_pixels
from attnlab.robust.attacks import word_edits
from tests.conftest import check_and_control


def test_pgd_pixels_refuses_images_outside_the_bounds() -> None:
    m = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    x, y = torch.rand(5, 1, 2, 2), torch.randint(0, 3, (5,))
    normalized = (x - 0.5) / 0.25  # in [-2, 2]
    check_and_control(
        lambda: pgd_pixels(m, normalized, y, epsilon=0.1),
        lambda: pgd_pixels(m, x, y, epsilon=0.1),
        ValueError,
        r"images must lie inside bounds=\(0\.0, 1\.0\), got values in \[-",
    )
    pgd_pixels(m, normalized, y, epsilon=0.1, bounds=(-2, 2))  # its own range: accepted
    with pytest.raises(ValueError, match="images must lie inside bounds"):
        pgd_pixels(m, torch.full_like(x, float("nan")), y, epsilon=0.1)


def test_char_attack_never_inserts_a_protected_character() -> None:
    assert all(w.count("7") == 0 for w in word_edits("ab,", str.isdigit, "7x"))
    assert "24,x" in word_edits("24,", str.isdigit, "7x")
    assert "247," in word_edits("24,", lambda c: False, "7x")  # control: unprotected, inserted
    att = CharEditAttack(1, "7x", protect=str.isdigit)
    score = lambda i, t: torch.tensor([-float(s.count("7") + s.count("x")) for s in t])  # noqa: E731
    r = att.attack(["May 24, 1964"], score, lambda i, t: [False] * len(t))[0]
    assert [c for c in r.text if c.isdigit()] == list("241964") and "x" in r.text


def test_pgd_embeddings_seed_leaves_the_global_rng_alone() -> None:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Embedding(5, 3), nn.Flatten(), nn.Linear(6, 2)).eval()
    ids, y = torch.tensor([[1, 2], [3, 4]]), torch.tensor([0, 1])
    loss = lambda mm, b: F.cross_entropy(mm(b), y)  # noqa: E731
    state = torch.get_rng_state()
    a, b = (pgd_embeddings(m, ids, loss, epsilon=0.5, steps=1, seed=5) for _ in range(2))
    assert torch.equal(state, torch.get_rng_state())
    assert a.delta is not None and b.delta is not None and torch.equal(a.delta, b.delta)
    c = pgd_embeddings(m, ids, loss, epsilon=0.5, steps=1, seed=6)
    assert c.delta is not None and not torch.equal(a.delta, c.delta)
    pgd_embeddings(m, ids, loss, epsilon=0.5, steps=1)  # default: the global RNG, advanced
    assert not torch.equal(state, torch.get_rng_state())
    with pytest.raises(ValueError, match="seed"):
        pgd_embeddings(m, ids, loss, epsilon=0.5, seed=-1)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_pgd_pixels_from_evaluation_code_is_the_same_attack(norm: str) -> None:
    """Under torch.no_grad() it raised "element 0 of tensors does not require grad";
    under torch.inference_mode(), with images and labels made there (as a loader in the
    block makes them), the same. Both now give the attack made outside, bit for bit."""
    m = nn.Sequential(nn.Flatten(), nn.Linear(4, 2)).eval()
    x, y = torch.rand(3, 1, 2, 2), torch.tensor([0, 1, 0])
    want = pgd_pixels(m, x, y, epsilon=0.1, norm=norm, seed=2)
    assert float((want - x).abs().max()) > 0.05  # the control: the attack moved the images
    with torch.no_grad():
        quiet = pgd_pixels(m, x, y, epsilon=0.1, norm=norm, seed=2)
    with torch.inference_mode():
        xi, yi = x.clone(), y.clone()
        assert xi.is_inference() and yi.is_inference()
        inferred = pgd_pixels(m, xi, yi, epsilon=0.1, norm=norm, seed=2)
        assert float(F.cross_entropy(m(inferred), yi)) > float(F.cross_entropy(m(xi), yi))
    assert torch.equal(quiet, want) and torch.equal(inferred, want)


def test_pgd_embeddings_runs_under_no_grad_and_names_inference_mode() -> None:
    """Under torch.no_grad() it raised "element 0 of tensors does not require grad"; it is
    now the attack made outside, bit for bit. Under torch.inference_mode() the batch may
    hold inference tensors autograd cannot use: an error names the attack and the way out."""
    m = nn.Sequential(nn.Embedding(5, 3), nn.Flatten(), nn.Linear(6, 2)).eval()
    ids, y = torch.tensor([[1, 2], [3, 4]]), torch.tensor([0, 1])
    loss = lambda mm, b: F.cross_entropy(mm(b), y)  # noqa: E731
    want = pgd_embeddings(m, ids, loss, epsilon=0.5, seed=1).delta
    with torch.no_grad():
        quiet = pgd_embeddings(m, ids, loss, epsilon=0.5, seed=1).delta
    assert want is not None and quiet is not None and torch.equal(quiet, want)
    assert float(want.flatten(1).norm(dim=1).min()) > 0.4  # the control: it moved
    with (
        torch.inference_mode(),
        pytest.raises(
            RuntimeError,
            match=r"PGD\.attack \(pgd_embeddings\) ascends the gradient.*"
            r"inference_mode\(\).*call it outside",
        ),
    ):
        pgd_embeddings(m, ids, loss, epsilon=0.5, seed=1)


def test_pgd_embeddings_names_a_loss_fn_that_is_not_callable() -> None:
    """loss_fn=None failed at the first step as "'NoneType' object is not callable"."""
    m = nn.Sequential(nn.Embedding(5, 3), nn.Flatten(), nn.Linear(6, 2))
    ids, y = torch.tensor([[1, 2], [3, 4]]), torch.tensor([0, 1])
    check_and_control(
        lambda: pgd_embeddings(m, ids, None, epsilon=0.5),  # type: ignore[arg-type]
        lambda: pgd_embeddings(m, ids, lambda mm, b: F.cross_entropy(mm(b), y), epsilon=0.5),
        TypeError,
        r"loss_fn must be callable \(model, batch\) -> loss, got None",
    )
