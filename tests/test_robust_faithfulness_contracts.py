"""attnlab.robust's faithfulness tests keep a float64 model's dtype and take the
conventional median (the mean of the two middle values for an even count)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from attnlab.nn import AttentionPooling
from attnlab.robust import adversarial_attention, override_attention, permutation_test, tvd
from attnlab.robust.faithfulness import _permute_rows
from tests.conftest import check_and_control


def _pooling(dtype: torch.dtype) -> tuple[nn.Module, AttentionPooling, Tensor]:
    """An attention-pooling classifier in ``dtype``, and its input ``h (4, 5, 6)``."""
    torch.manual_seed(1)
    pool, head = AttentionPooling(6).to(dtype), nn.Linear(6, 3).to(dtype)
    return nn.ModuleDict({"pool": pool, "head": head}), pool, torch.randn(4, 5, 6).to(dtype)


def test_faithfulness_tests_run_a_float64_model_in_float64() -> None:
    model, pool, h = _pooling(torch.float64)
    run = lambda m: m["head"](m["pool"](h)[0])  # noqa: E731
    r = adversarial_attention(model, pool, run, tolerance=0.05, steps=20)
    assert r.weights.dtype == r.original.dtype == r.jsd.dtype == torch.float64
    with torch.no_grad():
        base = run(model).softmax(-1)
        with override_attention(pool, lambda w, i: r.weights[:, i]):
            moved = tvd(run(model).softmax(-1), base)  # recomputed independently
    torch.testing.assert_close(moved, r.tvd, rtol=0, atol=1e-12)
    assert bool((r.tvd <= 0.05).all()) and float(r.jsd.max()) > 0.01
    perm = permutation_test(model, pool, run, permutations=4)
    assert perm["median_tvd"].dtype == torch.float64 and bool((perm["median_tvd"] > 0).all())


def test_permutation_median_is_the_mean_of_the_middle_two() -> None:
    model, pool, h = _pooling(torch.float32)
    run = lambda m: m["head"](m["pool"](h)[0])  # noqa: E731
    r = permutation_test(model, pool, run, permutations=2, seed=0)
    with torch.no_grad():  # the two shuffles, redone
        base, w0 = run(model).softmax(-1), pool(h)[1][:, None]
        g, shifts = torch.Generator().manual_seed(0), []
        for _ in range(2):
            w = _permute_rows(w0, g)
            with override_attention(pool, lambda _, i, w=w: w[:, i]):
                shifts.append(tvd(run(model).softmax(-1), base))
    s = torch.stack(shifts, 1)
    assert bool((s[:, 0] != s[:, 1]).any())  # the control: lower median != mean here
    torch.testing.assert_close(r["median_tvd"], s.mean(1))
    from attnlab.robust.faithfulness import median  # what the faithfulness study reports

    x = torch.tensor([[4.0, 1.0, 3.0, 10.0], [2.0, 2.0, 5.0, 0.0]])
    torch.testing.assert_close(median(x, 1), torch.tensor(np.median(x.numpy(), 1)))
    assert float(median(torch.tensor([1.0, 2.0, 3.0]))) == 2.0


def test_override_of_a_pooling_layer_leaves_other_threads_alone() -> None:
    """The pooling, Bahdanau and Luong sites hooked every thread's calls (another thread
    got the uniform mean, 0.131 off its own output); the other sites kept to this one."""
    import threading

    torch.manual_seed(0)
    pool, h = AttentionPooling(3), torch.randn(2, 5, 3)
    alone, _ = pool(h)
    got: list[Tensor] = []
    with override_attention(pool, lambda w, i: torch.full_like(w, 0.2)):
        thread = threading.Thread(target=lambda: got.append(pool(h)[0]))
        thread.start()
        thread.join(timeout=60)
        mine, _ = pool(h)
    torch.testing.assert_close(got[0], alone, rtol=0, atol=0)
    torch.testing.assert_close(mine, h.mean(1))


@pytest.mark.parametrize(
    ("kw", "exc", "match"),
    [
        ({"lr": 0}, ValueError, r"lr must be a finite number > 0, got 0"),  # JSD stayed 0
        ({"lr": -1.0}, ValueError, r"lr must be a finite number > 0, got -1"),  # Adam's words
        ({"lr": "0.5"}, TypeError, r"lr must be a real number, got str"),
        ({"penalty": -1}, ValueError, r"penalty must be a finite number >= 0, got -1"),
        ({"penalty": float("nan")}, ValueError, r"penalty must be a finite number >= 0, got nan"),
        ({"seed": -1}, ValueError, r"seed must be an int >= 0, got -1"),
        ({"seed": 1.5}, TypeError, r"seed must be an int >= 0, got 1\.5 \(float\)"),  # torch's
    ],
)
def test_adversarial_attention_names_a_bad_lr_penalty_or_seed(
    kw: dict, exc: type, match: str
) -> None:
    """lr=0, penalty=-1 or NaN and seed=-1 were accepted (lr=0: JSD 0 for every example);
    lr=-1 and seed=1.5 failed in Adam's and torch's words, naming no argument."""
    model, pool, h = _pooling(torch.float32)
    run = lambda m: m["head"](m["pool"](h)[0])  # noqa: E731
    check_and_control(
        lambda: adversarial_attention(model, pool, run, steps=2, **kw),
        lambda: adversarial_attention(model, pool, run, steps=2, lr=0.1, seed=3),
        exc,
        match,
    )


def test_adversarial_attention_without_penalty_still_keeps_the_tolerance() -> None:
    """penalty=0 means no penalty (documented): the search ignores the output, and only the
    best iterate within tolerance is kept; checked against an independent TVD."""
    model, pool, h = _pooling(torch.float64)
    run = lambda m: m["head"](m["pool"](h)[0])  # noqa: E731
    r = adversarial_attention(model, pool, run, tolerance=0.02, steps=30, penalty=0)
    with torch.no_grad():
        base = run(model).softmax(-1)
        with override_attention(pool, lambda w, i: r.weights[:, i]):
            moved = tvd(run(model).softmax(-1), base)
    torch.testing.assert_close(moved, r.tvd, rtol=0, atol=1e-12)
    assert bool((moved <= 0.02).all())


@pytest.mark.parametrize(
    ("seed", "exc", "match"),
    [
        (-1, ValueError, r"seed must be an int >= 0, got -1"),
        (1.5, TypeError, r"seed must be an int >= 0, got 1\.5 \(float\)"),
        (True, TypeError, r"seed must be an int >= 0, got True \(bool\)"),
    ],
)
def test_permutation_test_names_a_bad_seed(seed: object, exc: type, match: str) -> None:
    """seed=-1 was accepted; 1.5 failed as torch's "manual_seed expected a long"."""
    model, pool, h = _pooling(torch.float32)
    run = lambda m: m["head"](m["pool"](h)[0])  # noqa: E731
    check_and_control(
        lambda: permutation_test(model, pool, run, permutations=2, seed=seed),
        lambda: permutation_test(model, pool, run, permutations=2, seed=np.int64(4)),
        exc,
        match,
    )
