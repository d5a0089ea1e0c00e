"""The public API's types: the flags that decide what a call returns are typed overloads,
so a type checker follows README's uses (``r = attention(..., return_weights=True)`` then
``r.out``; ``y: Tensor = layer.forward(x)``) without a cast.
Arguments are typed as widely as the calls accept them.

``mypy --strict`` on a snippet takes ~30 s cold (torch's stubs), so the overloads are read
at runtime instead (``typing.get_overloads``, Python 3.11+).
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Callable

import pytest

import attnlab
from attnlab.nn import DecoderLayer, EncoderLayer, MultiHeadAttention

pytestmark = pytest.mark.skipif(sys.version_info < (3, 11), reason="needs get_overloads")

FLAGS = ("return_weights", "return_lse")
FUNCTIONAL = {
    ("Literal[False]", "Literal[False]"): "Tensor",
    ("Literal[True]", "bool"): "AttentionOutput",
    ("bool", "Literal[True]"): "AttentionOutput",
    ("bool", "bool"): "Tensor | AttentionOutput",
}
LAYER = {
    ("Literal[False]",): "Tensor",
    ("Literal[True]",): "tuple[Tensor, Tensor]",
    ("bool",): "Tensor | tuple[Tensor, Tensor]",
}


def overload_returns(fn: Callable[..., object], flags: tuple[str, ...]) -> dict[tuple, str]:
    """Each overload of ``fn``: the annotations of ``flags`` -> the return annotation; every
    overload takes the implementation's parameters, in its order."""
    from typing import get_overloads

    names = list(inspect.signature(fn).parameters)
    table = {}
    for ov in get_overloads(fn):
        sig = inspect.signature(ov)
        assert list(sig.parameters) == names, f"{ov.__qualname__}: {list(sig.parameters)}"
        table[tuple(sig.parameters[f].annotation for f in flags)] = sig.return_annotation
    return table


@pytest.mark.parametrize("fn", [attnlab.attention, attnlab.attend], ids=["attention", "attend"])
def test_the_weights_flags_decide_the_functional_return_type(fn: Callable[..., object]) -> None:
    assert overload_returns(fn, FLAGS) == FUNCTIONAL


@pytest.mark.parametrize("layer", [MultiHeadAttention, EncoderLayer, DecoderLayer])
def test_need_weights_decides_a_layer_forward_return_type(layer: type) -> None:
    assert overload_returns(layer.forward, ("need_weights",)) == LAYER


def test_attention_weights_takes_any_sequence_of_heads() -> None:
    """(``heads`` was typed ``list[int]``: a tuple or range, which work, failed mypy;
    ``capture(heads=)`` takes a ``Sequence[int]``.)"""
    import typing
    from collections.abc import Sequence

    import torch

    assert typing.get_type_hints(attnlab.attention_weights)["heads"] == Sequence[int] | None
    q = torch.randn(1, 4, 6, 8)
    for heads in ((0, 2), range(2), [1, 3]):
        assert attnlab.attention_weights(q, q, q, heads=heads).shape == (1, 2, 6, 6)


def test_attention_weights_takes_any_pair_of_rows() -> None:
    """(``rows`` was typed ``tuple[int, int]``: ``rows=[2, 5]``, which works, failed mypy.)"""
    import typing
    from collections.abc import Sequence

    import torch

    assert typing.get_type_hints(attnlab.attention_weights)["rows"] == Sequence[int] | None
    q = torch.randn(1, 2, 8, 4)
    want = attnlab.attention_weights(q, q, q)[:, :, 2:5]
    for rows in ((2, 5), [2, 5], range(2, 6, 3)):
        assert torch.equal(attnlab.attention_weights(q, q, q, rows=rows), want)
