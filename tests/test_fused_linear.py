"""The fused oneDNN linear of inference: equal to F.linear, and never stale after a weight
changes (its packed copy of the weight follows the weight's version)."""

from __future__ import annotations

import gc

import pytest
import torch
import torch.nn.functional as F

from attnlab.nn import _fused
from attnlab.nn._fused import linear


@pytest.mark.parametrize("fold", [True, False])  # the AVX-512 and the AVX2 choice
@pytest.mark.parametrize("activation", [None, "relu", "gelu", "gelu_tanh"])
@pytest.mark.parametrize("rows", [1, 37, 640])
def test_fused_linear_equals_torch(
    activation: str | None, rows: int, fold: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_fused, "fuse_activation", lambda: (fold, "test"))
    x, w, b = torch.randn(rows, 48), torch.randn(24, 48), torch.randn(24)
    want = F.linear(x.double(), w.double(), b.double())
    if activation == "relu":
        want = F.relu(want)
    elif activation is not None:
        want = F.gelu(want, approximate="tanh" if activation == "gelu_tanh" else "none")
    with torch.no_grad():
        got = linear(x, w, b, activation)
    ours, plain = (got.double() - want).abs().max(), (F.linear(x, w, b).double() - want).abs()
    assert ours <= 2 * plain.max() + 1e-6  # the 2x rule, with gelu's own rounding


def test_packed_weight_follows_in_place_updates_and_is_freed() -> None:
    x, w, b = torch.randn(16, 32), torch.randn(8, 32), torch.randn(8)
    with torch.no_grad():
        first = linear(x, w, b)
        assert torch.allclose(first, F.linear(x, w, b), atol=1e-5)
        w.mul_(-2.0)  # an optimizer step or load_state_dict: the version changes
        second = linear(x, w, b)
    assert torch.allclose(second, F.linear(x, w, b), atol=1e-5)
    assert not torch.allclose(first, second)  # positive control: the update was seen
    if _fused._REORDER is not None:
        before = len(_fused._PACKED)
        del w
        gc.collect()
        assert len(_fused._PACKED) == before - 1  # the packed copy goes with its weight
