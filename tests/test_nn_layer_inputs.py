"""Layers and stacks name a wrong input: a pre-norm layer's norm failed first, in torch's
words ("Given normalized_shape=[32], expected input with shape [*, 32]", "mixed dtype
(CPU): all inputs must share same datatype", "rms_norm not implemented for 'Long'"), and a
post-norm one named ``query``/``key``, its attention's arguments."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch

from attnlab.nn import (
    DecoderLayer,
    DecoderOnly,
    EncoderLayer,
    FeedForward,
    LayerConfig,
    MultiHeadAttention,
    Transformer,
)
from attnlab.positional import RotaryEmbedding
from tests.conftest import check_and_control

PRE, POST = LayerConfig(32, 4, 64, norm_first=True), LayerConfig(32, 4, 64)
RMS = LayerConfig(32, 4, 64, norm_first=True, norm="rms")
X, MEM = torch.randn(2, 7, 32), torch.randn(2, 5, 32)
NARROW, WIDE64 = torch.randn(2, 7, 16), torch.randn(2, 7, 32, dtype=torch.float64)

CASES: list[tuple[str, Callable[[], object], type, str]] = [
    ("pre-norm width", lambda: EncoderLayer(PRE)(NARROW), ValueError,
     r"^x must be \(B, L, 32\), got \(2, 7, 16\)$"),
    ("post-norm width", lambda: EncoderLayer(POST)(NARROW), ValueError,
     r"^x must be \(B, L, 32\), got \(2, 7, 16\)$"),
    ("pre-norm dtype", lambda: EncoderLayer(PRE)(WIDE64), TypeError, r"^x .*float32.*float64"),
    ("rms int", lambda: EncoderLayer(RMS)(X.long()), TypeError, r"^x must be a floating"),
    ("decoder-only width", lambda: DecoderOnly(PRE, 1)(NARROW), ValueError, r"^x must be"),
    ("memory width", lambda: DecoderLayer(POST)(X, MEM[..., :16]), ValueError,
     r"^memory must be \(B, L, 32\), got \(2, 5, 16\)$"),
    ("memory dtype", lambda: DecoderLayer(PRE)(X, MEM.double()), TypeError, r"^memory "),
    ("memory batch", lambda: DecoderLayer(PRE)(X, torch.randn(3, 5, 32)), ValueError,
     r"^memory must have x's batch size 2 \(or 1\), got memory \(3, 5, 32\) for x \(2, 7"),
    ("src width", lambda: Transformer(PRE, 1, 1)(NARROW, X), ValueError, r"^src must be"),
    ("tgt width", lambda: Transformer(POST, 1, 1)(X, NARROW), ValueError, r"^tgt must be"),
]  # fmt: skip


@pytest.mark.parametrize(("what", "call", "kind", "message"), CASES, ids=[c[0] for c in CASES])
def test_a_wrong_input_is_named(what: str, call: Callable[[], object], kind: type, message: str):
    with pytest.raises(kind, match=message):
        call()


def test_right_inputs_still_run() -> None:
    """The control: each layer and stack above takes the inputs of its width and dtype,
    and a memory of batch 1 is broadcast."""
    one = DecoderLayer(POST).eval()
    want = one(X, MEM[:1].expand(2, 5, 32).contiguous())
    assert torch.allclose(one(X, MEM[:1]), want, atol=1e-6)
    assert EncoderLayer(PRE)(X).shape == EncoderLayer(RMS)(X).shape == X.shape
    assert DecoderLayer(POST)(X, MEM).shape == DecoderOnly(PRE, 1)(X).shape == X.shape
    assert Transformer(PRE, 1, 1)(MEM, X).shape == X.shape
    assert (
        DecoderLayer(PRE.__class__(32, 4, 64, norm_first=True))
        .double()(X.double(), MEM.double())
        .dtype
        == torch.float64
    )


def _ff(p: object) -> FeedForward:
    return FeedForward(8, 16, dropout=p)  # type: ignore[arg-type]


# (the call with the bad value, the call with numpy's value of the kind, error, message)
OPTION_CASES: list[tuple[Callable[[], object], Callable[[], object], type, str]] = [
    (lambda: _ff(True), lambda: _ff(np.float32(0.5)), TypeError,
     r"^dropout must be a float in \[0, 1\), got bool"),
    (lambda: _ff(1), lambda: _ff(np.float64(0.5)), ValueError, r"^dropout must be in .* got 1$"),
    (lambda: _ff(float("nan")), lambda: _ff(0), ValueError, r"^dropout must be in .* got nan"),
    (lambda: _ff(torch.tensor(0.1)), lambda: _ff(0.1), TypeError, r"^dropout must .* got Tensor"),
    (lambda: _ff(None), lambda: _ff(0.1), TypeError, r"^dropout must .* got NoneType"),
    (lambda: _ff("0.1"), lambda: _ff(0.1), TypeError, r"^dropout must .* got str"),
    (lambda: MultiHeadAttention(32, 4, dropout=1.5),
     lambda: MultiHeadAttention(32, 4, dropout=np.float32(0.5)), ValueError, r"^dropout"),
    (lambda: RotaryEmbedding(8, interleaved="yes"),
     lambda: RotaryEmbedding(8, interleaved=np.bool_(True)), TypeError,
     r"^interleaved must be a bool, got str"),
]  # fmt: skip


@pytest.mark.parametrize(("bad", "ok", "exc", "match"), OPTION_CASES)
def test_dropout_and_flags_are_checked_and_numpy_taken(
    bad: Callable[[], object], ok: Callable[[], object], exc: type, match: str
) -> None:
    """A FeedForward's dropout is checked as a LayerConfig's (True zeroed the hidden layer in
    training, NaN failed at the first call, None in a bare '<'), and numpy's float32 and
    bool are taken where float64 and bool are (they were TypeErrors)."""
    check_and_control(bad, ok, exc, match)
