"""An offset whose last position passes int64 failed in torch's arange ("value cannot be
converted to type int64_t without overflow"), naming nothing; LearnedPositional built the
arange before its own max_len check."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from attnlab.positional import (
    LearnedPositional,
    RotaryEmbedding,
    SinusoidalPositional,
    sinusoidal_table,
)

X, Q = torch.zeros(1, 2, 4), torch.zeros(1, 1, 2, 8)
CASES: list[tuple[str, Callable[[int], object], str]] = [
    ("learned", lambda o: LearnedPositional(4, 4)(X, o), r"past max_len: offset=\d+"),
    ("sinusoidal", lambda o: SinusoidalPositional(4)(X, o), r"^offset=\d+ with 2 tokens runs"),
    ("table", lambda o: sinusoidal_table(2, 4, offset=o), r"^offset=\d+ with 2 tokens runs"),
    ("rotary", lambda o: RotaryEmbedding(8)(Q, o), r"^positions=\d+ with 2 tokens runs"),
]


@pytest.mark.parametrize(("what", "call", "message"), CASES, ids=[c[0] for c in CASES])
def test_an_offset_past_int64_is_named(what: str, call: Callable[[int], object], message: str):
    with pytest.raises(ValueError, match=message):
        call(2**63 - 2)
    if what != "learned":  # the control: the last offset whose arange fits
        assert torch.isfinite(torch.as_tensor(call(2**63 - 3))).all()
