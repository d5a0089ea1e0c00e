"""Tests for attnlab.bias: every value is checked against an independent reference.

The references below are written from the papers' definitions with Python scalars and loops,
so they share no code with the implementation.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

import attnlab
from attnlab import masks
from attnlab._grid import Grid
from attnlab.bias import (
    ALiBi,
    Bias,
    CustomBias,
    LearnedRelative,
    RelativeBuckets,
    SumBias,
    TensorBias,
    alibi,
    alibi_slopes,
    as_bias,
    custom,
    learned_relative,
    relative_buckets,
    t5_bucket,
    tensor,
)
from tests.conftest import check_and_control, max_err, naive_attention

# --------------------------------------------------------------------------- references


def ref_slopes(n: int) -> list[float]:
    """ALiBi slopes following the rule in Press et al. (2022), written recursively."""

    def power_of_2(n: int) -> list[float]:
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))  # = 2^(-8/n)
        return [start * start**i for i in range(n)]

    if math.log2(n).is_integer():
        return power_of_2(n)
    closest = 2 ** math.floor(math.log2(n))
    return power_of_2(closest) + ref_slopes(2 * closest)[0::2][: n - closest]


def ref_t5_bucket(rel: int, bidirectional: bool, num_buckets: int, max_distance: int) -> int:
    """T5's bucket of one relative position (key - query), with Python scalars."""
    bucket = 0
    if bidirectional:
        num_buckets //= 2
        if rel > 0:
            bucket += num_buckets
        n = abs(rel)
    else:
        n = max(-rel, 0)
    max_exact = num_buckets // 2
    if n < max_exact:
        return bucket + n
    log_ratio = math.log(n / max_exact) / math.log(max_distance / max_exact)
    large = max_exact + int(log_ratio * (num_buckets - max_exact))
    return bucket + min(large, num_buckets - 1)


def positions(lq: int, lk: int) -> list[int]:
    """Bottom-right aligned query positions."""
    return [i + lk - lq for i in range(lq)]


# --------------------------------------------------------------------------- ALiBi slopes


def test_alibi_slopes_8_heads_are_the_papers() -> None:
    got = alibi_slopes(8)
    assert got.dtype == torch.float32 and got.shape == (8,)
    assert got.tolist() == [1 / 2, 1 / 4, 1 / 8, 1 / 16, 1 / 32, 1 / 64, 1 / 128, 1 / 256]


def test_alibi_slopes_12_heads_literal() -> None:
    got = alibi_slopes(12).double()
    first = torch.tensor([2.0**-e for e in range(1, 9)], dtype=torch.float64)
    rest = torch.tensor([2**-0.5, 2**-1.5, 2**-2.5, 2**-3.5], dtype=torch.float64)
    torch.testing.assert_close(got, torch.cat([first, rest]), rtol=1e-6, atol=0)


def test_alibi_slopes_6_heads_literal() -> None:
    # m = 4: 2^-2, 2^-4, 2^-6, 2^-8; then every other slope for 8: 2^-1, 2^-3.
    assert alibi_slopes(6).tolist() == [1 / 4, 1 / 16, 1 / 64, 1 / 256, 1 / 2, 1 / 8]


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 6, 7, 8, 9, 12, 16, 20, 24, 32, 40, 64, 96])
def test_alibi_slopes_follow_the_rule(n: int) -> None:
    expected = torch.tensor(ref_slopes(n), dtype=torch.float64)
    torch.testing.assert_close(alibi_slopes(n).double(), expected, rtol=1e-6, atol=0)


@pytest.mark.parametrize("n", [3, 12, 16, 20, 40, 96])  # 3: float32 is exact
def test_alibi_in_float64_has_the_papers_slopes(n: int) -> None:
    """A float64 ALiBi (``.double()``, ``.to(float64)``, ``alibi_slopes(n, float64)``)
    carries Press et al.'s slopes computed in Python floats, and its bias at distance 4096
    is theirs (the slopes stayed float32's: 1.2e-8 off for 12 heads, the bias 5e-5 off)."""
    exact = torch.tensor(ref_slopes(n), dtype=torch.float64)
    close = {"rtol": 1e-14, "atol": 0}  # float64 rounding: the paper's code multiplies
    b = alibi(n).double()
    for got in (b.slopes, alibi(n).to(torch.float64).slopes):
        assert got.dtype == torch.float64
        torch.testing.assert_close(got, exact, **close)
    far = b.dense(1, 4097, heads=n)[0, :, 0, 0]  # the query at 4096, the key at 0
    torch.testing.assert_close(far, -exact * 4096, **close)
    torch.testing.assert_close(alibi_slopes(n, torch.float64), exact, **close)
    assert torch.equal(b.float().slopes, alibi_slopes(n))  # back in float32: the default
    assert torch.equal(alibi_slopes(n), exact.float())  # float32, rounded once
    check_and_control(
        lambda: alibi_slopes(n, torch.int64),
        lambda: alibi_slopes(n, torch.float16),
        TypeError,
        r"dtype must be a floating-point torch\.dtype, got torch\.int64",
    )


@pytest.mark.parametrize(
    ("value", "exc", "match"),
    [
        (0, ValueError, "num_heads must be a positive int, got 0"),
        (-3, ValueError, "num_heads must be a positive int, got -3"),
        (2.0, TypeError, r"num_heads must be a positive int, got 2\.0 \(float\)"),
        (True, TypeError, r"num_heads must be a positive int, got True \(bool\)"),
    ],
)
def test_alibi_num_heads_validated(value: object, exc: type[Exception], match: str) -> None:
    check_and_control(lambda: alibi_slopes(value), lambda: alibi_slopes(3), exc, match)  # type: ignore[arg-type]
    check_and_control(lambda: alibi(value), lambda: alibi(3), exc, match)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- ALiBi values


@pytest.mark.parametrize(("lq", "lk"), [(4, 4), (3, 7), (1, 5), (5, 3)])
def test_alibi_dense_equals_loops(lq: int, lk: int) -> None:
    heads = 12
    slopes = ref_slopes(heads)
    got = alibi(heads).dense(lq, lk, heads=heads)
    assert got.shape == (1, heads, lq, lk) and got.dtype == torch.float32
    expected = torch.zeros(1, heads, lq, lk, dtype=torch.float64)
    for h in range(heads):
        for i, p in enumerate(positions(lq, lk)):
            for k in range(lk):
                expected[0, h, i, k] = -slopes[h] * abs(p - k)
    torch.testing.assert_close(got.double(), expected, rtol=1e-6, atol=1e-7)


def test_alibi_slopes_are_a_buffer_not_a_parameter() -> None:
    b = alibi(4)
    assert isinstance(b, ALiBi) and list(b.parameters()) == []
    assert torch.equal(dict(b.named_buffers())["slopes"], alibi_slopes(4))
    assert b.per_head and not b.per_batch


def test_alibi_check_message_and_control() -> None:
    b = alibi(8)
    msg = (
        "bias=alibi(num_heads=8) has 8 heads but the query has 12 heads; build it with num_heads=12"
    )
    check_and_control(
        lambda: b.check(batch=2, heads=12, lq=4, lk=4),
        lambda: b.check(batch=2, heads=8, lq=4, lk=4),
        ValueError,
        re.escape(msg),
    )
    # dense validates the same way
    check_and_control(
        lambda: b.dense(3, 3, heads=12), lambda: b.dense(3, 3, heads=8), ValueError, "has 8 heads"
    )


def test_dense_dtype_and_size_arguments() -> None:
    b = alibi(2)
    assert b.dense(2, 3, heads=2, dtype=torch.float64).dtype == torch.float64
    assert b.dense(2, 3, batch=5, heads=2).shape == (1, 2, 2, 3)  # not per batch
    assert b.dense(0, 3, heads=2).shape == (1, 2, 0, 3)
    check_and_control(
        lambda: b.dense(-1, 3, heads=2),
        lambda: b.dense(1, 3, heads=2),
        ValueError,
        "lq must be an int >= 0, got -1",
    )
    check_and_control(
        lambda: b.dense(2, 3, batch=-1, heads=2),
        lambda: b.dense(2, 3, batch=0, heads=2),  # an empty batch: its bias broadcasts
        ValueError,
        "batch must be an int >= 0, got -1",
    )
    check_and_control(
        lambda: b.dense(2, 3, batch=1, heads=0),
        lambda: b.dense(2, 3, batch=1, heads=2),
        ValueError,
        "heads must be a positive int, got 0",
    )
    assert tensor(torch.zeros(0, 1, 2, 3)).dense(2, 3, batch=0).shape == (0, 1, 2, 3)


def _empty_batch_biases() -> dict[str, Bias | Tensor]:
    return {
        "alibi": alibi(4),
        "t5": relative_buckets(4, num_buckets=8, max_distance=16),
        "learned": learned_relative(4, max_distance=8),
        "custom": custom(lambda h, q, k: (q - k).float()),
        "custom_shared": custom(lambda h, q, k: 0.5, per_head=False),
        "tensor": torch.randn(5, 6),
        "tensor_of_no_items": torch.randn(0, 4, 5, 6),
        "sum": alibi(4) + tensor(torch.randn(1, 4, 5, 6)),
    }


@pytest.mark.parametrize("name", list(_empty_batch_biases()))
@pytest.mark.parametrize("engine", ["auto", "reference"])
def test_an_empty_batch_takes_any_bias(name: str, engine: str) -> None:
    """B = 0 gives the empty output with a bias as without one, or with a mask (it said
    'batch must be a positive int, got 0'); its gradients are empty too."""
    b = _empty_batch_biases()[name]
    q = torch.randn(0, 4, 5, 8, requires_grad=True)
    k, v = torch.randn(0, 2, 6, 8), torch.randn(0, 2, 6, 3)
    assert attnlab.attention(q, k, v, bias=b, engine=engine).shape == (0, 4, 5, 3)
    r = attnlab.attention(
        q, k, v, bias=b, mask=masks.causal(), engine=engine, return_weights=True, return_lse=True
    )
    assert isinstance(r, attnlab.AttentionOutput) and r.weights is not None and r.lse is not None
    assert (r.out.shape, r.weights.shape, r.lse.shape) == ((0, 4, 5, 3), (0, 4, 5, 6), (0, 4, 5))
    r.out.sum().backward()
    assert q.grad is not None and q.grad.shape == q.shape


@pytest.mark.parametrize(("lq", "lk"), [(0, 6), (5, 0)])
def test_an_empty_sequence_takes_a_tensor_bias(lq: int, lk: int) -> None:
    """A tensor bias of a call with no queries or no keys is empty too (its gather read
    index 0 of an empty axis); the output is that of no bias: empty, or 0 without keys."""
    q, k, v = torch.randn(2, 4, lq, 8), torch.randn(2, 2, lk, 8), torch.randn(2, 2, lk, 3)
    for b in (torch.randn(lq, lk), torch.randn(2, 4, lq, lk), torch.randn(1, 4, lq, 1)):
        out = attnlab.attention(q, k, v, bias=b)
        assert isinstance(out, Tensor) and torch.equal(out, torch.zeros(2, 4, lq, 3))


# --------------------------------------------------------------------------- T5 buckets


@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize(
    ("num_buckets", "max_distance"), [(32, 128), (8, 16), (16, 20), (64, 256), (4, 10)]
)
def test_t5_bucket_matches_scalar_reference(
    bidirectional: bool, num_buckets: int, max_distance: int
) -> None:
    rel = torch.arange(-300, 301)
    got = t5_bucket(
        rel, bidirectional=bidirectional, num_buckets=num_buckets, max_distance=max_distance
    )
    expected = [
        ref_t5_bucket(r, bidirectional, num_buckets, max_distance) for r in range(-300, 301)
    ]
    assert got.dtype == torch.int64
    assert got.tolist() == expected
    # Every bucket is reached in -300..300, except (as in T5) the first "after" bucket when
    # bidirectional: a key after the query is at distance >= 1.
    unused = {num_buckets // 2} if bidirectional else set()
    assert set(expected) == set(range(num_buckets)) - unused


def test_t5_bucket_literal_values() -> None:
    rel = torch.tensor([[-200, -9, -1, 0], [1, 2, 9, 200]])  # shape is kept
    got = t5_bucket(rel, bidirectional=True, num_buckets=32, max_distance=128)
    assert got.tolist() == [[15, 8, 1, 0], [17, 18, 24, 31]]
    uni = t5_bucket(rel, bidirectional=False, num_buckets=32, max_distance=128)
    assert uni.tolist() == [[31, 9, 1, 0], [0, 0, 0, 0]]  # later keys share bucket 0


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"num_buckets": 7}, ValueError, "num_buckets must be an even int >= 4 when bidire.*got 7"),
        ({"num_buckets": 2}, ValueError, "num_buckets must be an even int >= 4 when bidire.*got 2"),
        (
            {"num_buckets": 1, "bidirectional": False},
            ValueError,
            "num_buckets must be an int >= 2, got 1",
        ),
        ({"num_buckets": 32.0}, TypeError, r"num_buckets must be an int >= 2, got 32\.0"),
        ({"max_distance": 0}, ValueError, "max_distance must be a positive int, got 0"),
        (
            {"max_distance": 8},
            ValueError,
            r"max_distance must be greater than the 8 exactly-bucketed offsets .*got 8",
        ),
        ({"bidirectional": 1}, TypeError, r"bidirectional must be a bool, got 1 \(int\)"),
    ],
)
def test_bucket_arguments_validated(
    kwargs: dict[str, object], exc: type[Exception], match: str
) -> None:
    args: dict[str, object] = {"num_buckets": 32, "max_distance": 128, "bidirectional": True}
    args.update(kwargs)
    rel = torch.arange(-3, 4)
    check_and_control(
        lambda: t5_bucket(rel, **args),  # type: ignore[arg-type]
        lambda: t5_bucket(rel, num_buckets=32, max_distance=128, bidirectional=True),
        exc,
        match,
    )
    check_and_control(
        lambda: relative_buckets(2, **args),  # type: ignore[arg-type]
        lambda: relative_buckets(2),
        exc,
        match,
    )


def test_t5_bucket_small_valid_configurations() -> None:
    rel = torch.arange(-5, 6)
    uni = t5_bucket(rel, bidirectional=False, num_buckets=2, max_distance=2)
    assert uni.tolist() == [ref_t5_bucket(r, False, 2, 2) for r in range(-5, 6)]
    bi = t5_bucket(rel, bidirectional=True, num_buckets=4, max_distance=2)
    assert bi.tolist() == [ref_t5_bucket(r, True, 4, 2) for r in range(-5, 6)]


@pytest.mark.parametrize(
    ("value", "match"),
    [
        (torch.arange(3.0), "relative_position must be an integer tensor, got dtype torch.float32"),
        (torch.ones(3, dtype=torch.bool), "must be an integer tensor, got dtype torch.bool"),
        ([1, 2], "relative_position must be an integer tensor, got list"),
    ],
)
def test_t5_bucket_rejects_non_integer_positions(value: object, match: str) -> None:
    kw: dict[str, object] = {"bidirectional": True, "num_buckets": 8, "max_distance": 16}
    check_and_control(
        lambda: t5_bucket(value, **kw),  # type: ignore[arg-type]
        lambda: t5_bucket(torch.arange(3, dtype=torch.int32), **kw),  # type: ignore[arg-type]
        TypeError,
        match,
    )


# --------------------------------------------------------------------------- learned tables


def randomize(table: Tensor) -> None:
    with torch.no_grad():
        table.copy_(torch.randn_like(table))


@pytest.mark.parametrize("bidirectional", [True, False])
def test_relative_buckets_dense_and_grad(bidirectional: bool) -> None:
    torch.manual_seed(0)
    heads, nb, md, lq, lk = 3, 8, 16, 5, 40
    b = relative_buckets(heads, num_buckets=nb, max_distance=md, bidirectional=bidirectional)
    assert isinstance(b, RelativeBuckets) and b.table.shape == (nb, heads)
    assert isinstance(b.table, nn.Parameter) and b.per_head and not b.per_batch
    randomize(b.table)
    table = b.table.detach().tolist()

    got = b.dense(lq, lk, heads=heads)
    assert got.shape == (1, heads, lq, lk)
    expected = torch.zeros(1, heads, lq, lk)
    counts = torch.zeros(nb, heads)
    for h in range(heads):
        for i, p in enumerate(positions(lq, lk)):
            for k in range(lk):
                bucket = ref_t5_bucket(k - p, bidirectional, nb, md)
                expected[0, h, i, k] = table[bucket][h]
                counts[bucket, h] += h + 1  # the loss below weights head h by h + 1
    torch.testing.assert_close(got, expected)

    weights = torch.arange(1.0, heads + 1).view(1, heads, 1, 1)
    (got * weights).sum().backward()
    assert b.table.grad is not None
    torch.testing.assert_close(b.table.grad, counts)


def test_learned_relative_dense_and_grad() -> None:
    torch.manual_seed(1)
    heads, d, lq, lk = 2, 3, 4, 9
    b = learned_relative(heads, d)
    assert isinstance(b, LearnedRelative) and b.table.shape == (2 * d + 1, heads)
    randomize(b.table)
    table = b.table.detach().tolist()

    got = b.dense(lq, lk, heads=heads)
    assert got.shape == (1, heads, lq, lk)
    expected = torch.zeros(1, heads, lq, lk)
    counts = torch.zeros(2 * d + 1, heads)
    for h in range(heads):
        for i, p in enumerate(positions(lq, lk)):
            for k in range(lk):
                row = min(max(k - p, -d), d) + d
                expected[0, h, i, k] = table[row][h]
                counts[row, h] += 1
    torch.testing.assert_close(got, expected)
    got.sum().backward()
    assert b.table.grad is not None
    torch.testing.assert_close(b.table.grad, counts)
    assert counts[0, 0] > 1 and counts[-1, 0] > 0  # both clamps were exercised


@pytest.mark.parametrize(
    ("build", "exc", "match"),
    [
        (lambda: learned_relative(0, 4), ValueError, "num_heads must be a positive int, got 0"),
        (lambda: learned_relative(2, 0), ValueError, "max_distance must be a positive int, got 0"),
        (
            lambda: learned_relative(2, 1.5),  # type: ignore[arg-type]
            TypeError,
            r"max_distance must be .*got 1\.5 \(float",
        ),
        (lambda: relative_buckets(-1), ValueError, "num_heads must be a positive int, got -1"),
    ],
)
def test_table_constructors_validated(
    build: Callable[[], object], exc: type[Exception], match: str
) -> None:
    check_and_control(build, lambda: learned_relative(2, 4), exc, match)


@pytest.mark.parametrize(
    ("bias", "name"),
    [
        (lambda: relative_buckets(4), "relative_buckets(num_heads=4, num_buckets=32, "),
        (lambda: learned_relative(4, 8), "learned_relative(num_heads=4, max_distance=8)"),
    ],
)
def test_table_check_heads(bias: Callable[[], Bias], name: str) -> None:
    b = bias()
    check_and_control(
        lambda: b.check(batch=1, heads=6, lq=3, lk=3),
        lambda: b.check(batch=1, heads=4, lq=3, lk=3),
        ValueError,
        re.escape(name) + r".* has 4 heads but the query has 6 heads; build it with num_heads=6",
    )


# --------------------------------------------------------------------------- tensor bias


@pytest.mark.parametrize(
    ("shape", "batch", "heads", "per_batch", "per_head"),
    [
        ((5, 7), 2, 3, False, False),
        ((3, 5, 7), 2, 3, False, True),
        ((1, 5, 7), 2, 3, False, False),
        ((2, 3, 5, 7), 2, 3, True, True),
        ((2, 1, 5, 7), 2, 3, True, False),
        ((1, 3, 1, 7), 2, 3, False, True),
    ],
)
def test_tensor_bias_ranks_and_dense(
    shape: tuple[int, ...], batch: int, heads: int, per_batch: bool, per_head: bool
) -> None:
    t = torch.randn(shape)
    b = tensor(t)
    assert isinstance(b, TensorBias)
    assert (b.per_batch, b.per_head) == (per_batch, per_head)
    got = b.dense(5, 7, batch=batch, heads=heads)
    bb, hb = (batch if per_batch else 1), (heads if per_head else 1)
    assert got.shape == (bb, hb, 5, 7)
    full = t.view((1,) * (4 - t.dim()) + shape).expand(batch, heads, 5, 7)
    # independent reference: loop over every element of the full broadcast tensor
    for bi in range(bb):
        for h in range(hb):
            for i in range(5):
                for k in range(7):
                    assert got[bi, h, i, k].item() == full[bi, h, i, k].item()


@pytest.mark.parametrize(
    ("rows", "keys"), [([0, 1], [0, 1, 2]), ([3, 4], [5, 6]), ([1, 3], [6, 0, 2]), ([2], [4])]
)
def test_tensor_bias_tile_equals_slice(rows: list[int], keys: list[int]) -> None:
    t = torch.randn(2, 3, 5, 7)
    b = tensor(t)
    grid = Grid.tile(torch.tensor(rows), torch.tensor(keys), lq=5, lk=7, batch=2, heads=3)
    got = torch.broadcast_to(b(grid), grid.shape)
    assert torch.equal(got, t[:, :, rows][:, :, :, keys])


def test_tensor_bias_gradients_flow() -> None:
    t = torch.randn(3, 4, 5, requires_grad=True)
    b = tensor(t)
    b.dense(4, 5, heads=3).sum().backward()
    assert t.grad is not None and torch.equal(t.grad, torch.ones(3, 4, 5))
    # a tile only touches its own block
    t.grad = None
    grid = Grid.tile(torch.tensor([1, 2]), torch.tensor([0, 4]), lq=4, lk=5, heads=3)
    b(grid).sum().backward()
    expected = torch.zeros(3, 4, 5)
    expected[:, 1:3][:, :, [0, 4]] = 1
    assert t.grad is not None and torch.equal(t.grad, expected)


def test_tensor_bias_parameter_is_registered() -> None:
    p = nn.Parameter(torch.zeros(4, 4))
    b = tensor(p)
    assert list(b.parameters()) == [p]
    assert list(tensor(torch.zeros(4, 4)).parameters()) == []


def test_tensor_bias_check_message_and_control() -> None:
    b = tensor(torch.zeros(2, 3, 5, 7))
    msg = (
        "bias=tensor(shape=(2, 3, 5, 7)) does not fit scores of shape (batch=2, heads=8, "
        "lq=5, lk=7): its heads size is 3, expected 1 or 8"
    )
    check_and_control(
        lambda: b.check(batch=2, heads=8, lq=5, lk=7),
        lambda: b.check(batch=2, heads=3, lq=5, lk=7),
        ValueError,
        re.escape(msg),
    )
    b2 = tensor(torch.zeros(5, 7))
    check_and_control(
        lambda: b2.check(batch=4, heads=8, lq=5, lk=6),
        lambda: b2.check(batch=4, heads=8, lq=5, lk=7),
        ValueError,
        r"its lk size is 7, expected 1 or 6",
    )
    check_and_control(
        lambda: b2.dense(4, 7), lambda: b2.dense(5, 7), ValueError, "its lq size is 5, expected"
    )


def test_a_bias_for_another_batch_names_the_one_size_expected_once() -> None:
    """Scores of batch 1 take a bias of batch 1 only: the message said "expected 1 or 1"."""
    q = torch.randn(1, 2, 3, 8)
    check_and_control(
        lambda: attnlab.attention(q, q, q, bias=torch.zeros(2, 2, 3, 3)),
        lambda: attnlab.attention(q, q, q, bias=torch.zeros(1, 2, 3, 3)),
        ValueError,
        r"\(batch=1, heads=2, lq=3, lk=3\): its batch size is 2, expected 1$",
    )


@pytest.mark.parametrize(
    ("value", "exc", "match"),
    [
        ([[0.0]], TypeError, "t must be a float tensor, got list"),
        (torch.ones(2, 2, dtype=torch.bool), TypeError, r"boolean tensors are masks \(pass"),
        (torch.ones(2, 2, dtype=torch.int64), TypeError, "got dtype torch.int64"),
        (torch.ones(4), ValueError, r"t must have rank 2 .*got rank 1 with shape \(4,\)"),
        (torch.ones(1, 1, 1, 2, 2), ValueError, "got rank 5"),
    ],
)
def test_tensor_constructor_validated(value: object, exc: type[Exception], match: str) -> None:
    check_and_control(lambda: tensor(value), lambda: tensor(torch.ones(2, 2)), exc, match)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- custom


def test_custom_bias_matches_formula() -> None:
    b = custom(lambda h, q, k: -(h + 1) * (q - k).abs() / 4)
    assert isinstance(b, CustomBias) and b.per_head
    got = b.dense(3, 6, heads=2)
    assert got.shape == (1, 2, 3, 6) and got.is_floating_point()
    for h in range(2):
        for i, p in enumerate(positions(3, 6)):
            for k in range(6):
                assert got[0, h, i, k].item() == -(h + 1) * abs(p - k) / 4


def test_custom_bias_shared_across_heads_and_scalar_result() -> None:
    seen: list[list[int]] = []

    def fn(h: Tensor, q: Tensor, k: Tensor) -> Tensor:
        seen.append(h.flatten().tolist())
        return (k - q).float()

    b = custom(fn, per_head=False)
    assert not b.per_head
    got = b.dense(2, 3, heads=4)
    assert got.shape == (1, 1, 2, 3) and seen == [[0]]
    assert got[0, 0].tolist() == [[-1.0, 0.0, 1.0], [-2.0, -1.0, 0.0]]
    const = custom(lambda h, q, k: 0.5, per_head=False).dense(2, 3)
    assert torch.equal(const, torch.full((1, 1, 2, 3), 0.5))
    ints = custom(lambda h, q, k: k - q).dense(1, 2)
    assert ints.dtype == torch.get_default_dtype() and ints.tolist() == [[[[-1.0, 0.0]]]]


def test_custom_bias_module_parameters_get_gradients() -> None:
    class Scale(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.tensor(2.0))

        def forward(self, h: Tensor, q: Tensor, k: Tensor) -> Tensor:
            return self.w * (k - q)

    fn = Scale()
    b = custom(fn, per_head=False)
    assert list(b.parameters()) == [fn.w]
    b.dense(2, 2).sum().backward()  # positions 0, 1: (k - q) sums to 0 - 1 + 1 + 0 = 0
    assert fn.w.grad is not None and fn.w.grad.item() == 0.0
    fn.w.grad = None
    b.dense(1, 3).sum().backward()  # position 2: -2 - 1 + 0
    assert fn.w.grad is not None and fn.w.grad.item() == -3.0


def test_a_custom_bias_closing_over_a_parameter_gets_its_gradient_or_a_refusal() -> None:
    """The blocked engine's backward reaches a bias's parameters and buffers only: a
    parameter the function closes over got no gradient (None, the output still requiring
    grad); it declines the call by name, and auto gives it to an engine that can."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 4, 300, 16, requires_grad=True) for _ in range(3))
    w = nn.Parameter(torch.full((4,), 0.05))
    b = custom(lambda h, p, kk: -w[h] * (p - kk).abs().float())
    m = masks.causal() & masks.window(64)
    ref = attnlab.attention(q, k, v, mask=m, bias=b, engine="reference")
    want = torch.autograd.grad(ref.sum(), w)[0]
    got = torch.autograd.grad(attnlab.attention(q, k, v, mask=m, bias=b).sum(), w)[0]
    assert max_err(got, want) < 1e-3 * float(want.abs().max())
    with pytest.raises(ValueError, match="reads a tensor that requires grad but is not one of"):
        attnlab.attention(q, k, v, mask=m, bias=b, engine="blocked")
    with torch.no_grad():  # no gradient wanted: it runs
        out = attnlab.attention(q, k, v, mask=m, bias=b, engine="blocked")
    assert max_err(out, ref) < 1e-5


def test_custom_bias_errors() -> None:
    check_and_control(
        lambda: custom(3),  # type: ignore[arg-type]
        lambda: custom(lambda h, q, k: q),
        TypeError,
        r"fn must be callable as fn\(h, q_pos, k\) -> Tensor, got int",
    )
    check_and_control(
        lambda: custom(lambda h, q, k: q, per_head="no"),  # type: ignore[arg-type]
        lambda: custom(lambda h, q, k: q, per_head=False),
        TypeError,
        "per_head must be a bool, got 'no'",
    )

    def masky(h: Tensor, q: Tensor, k: Tensor) -> Tensor:
        return k <= q

    check_and_control(
        lambda: custom(masky).dense(2, 2),
        lambda: custom(lambda h, q, k: (k <= q).float()).dense(2, 2),
        TypeError,
        r"bias=custom\(fn=.*masky, per_head=True\): fn returned a boolean tensor; .*mask=",
    )
    check_and_control(
        lambda: custom(lambda h, q, k: torch.zeros(3, 2, 2)).dense(2, 2),
        lambda: custom(lambda h, q, k: torch.zeros(1, 2, 2)).dense(2, 2),
        ValueError,
        r"fn returned shape \(3, 2, 2\), expected a shape broadcastable to \(1, 1, 2, 2\)",
    )
    for wrong, seen in ((None, "NoneType"), ("0.5", "str"), ([0.5], "list")):
        check_and_control(
            lambda wrong=wrong: custom(lambda h, q, k: wrong).dense(2, 2),
            lambda: custom(lambda h, q, k: 0.5).dense(2, 2),
            TypeError,
            rf"bias=custom\(fn=.*, per_head=True\): fn returned {seen}, expected a float "
            rf"tensor or a Python number",
        )
    check_and_control(
        lambda: custom(lambda h, q, k: torch.zeros(1, 1, 1, 2, 2)).dense(2, 2),
        lambda: custom(lambda h, q, k: torch.zeros(1, 1, 2, 2)).dense(2, 2),
        ValueError,
        r"fn returned shape \(1, 1, 1, 2, 2\)",
    )


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_custom_bias_and_mask_run_under_flexattention() -> None:
    """FlexAttention calls the functions on 0-dim coordinates (under vmap): the check of
    their result's shape reads the coordinates' shape, not a grid's (the bias raised
    IndexError). Against fp64 attention with the bias and mask written out."""
    from attnlab.engines.flex import flex_available

    if not flex_available():
        pytest.skip("this torch has no FlexAttention")
    q, k, v = (torch.randn(1, 2, 32, 16, dtype=torch.float64) for _ in range(3))
    pos = torch.arange(32, dtype=torch.float64)
    dist = (pos[:, None] - pos[None, :]).abs()  # Lq = Lk: position = row
    table = torch.stack([-0.1 * dist - h for h in range(2)])[None]  # (1, H, L, L)
    allowed = pos[None, :] <= pos[:, None]
    ref = naive_attention(q, k, v, allowed=allowed, bias=table)[0]
    ours = attnlab.attention(
        *(t.float() for t in (q, k, v)),
        bias=custom(lambda h, qq, kk: -0.1 * (qq - kk).abs() - h),
        mask=masks.custom(lambda b, h, qq, kk: kk <= qq),
        engine="flex",
        engine_options={"compile": False},
    )
    assert isinstance(ours, Tensor) and (ours.double() - ref).abs().max() < 1e-5


class _Indexing(torch.overrides.TorchFunctionMode):
    """Records the index of every ``Tensor.__getitem__`` call."""

    def __init__(self) -> None:
        super().__init__()
        self.indices: list[object] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        if func is Tensor.__getitem__:
            self.indices.append(args[1])
        return func(*args, **(kwargs or {}))


def test_a_tensor_bias_is_indexed_by_tensors_alone() -> None:
    """(A broadcast dim was indexed by a Python 0 among tensor indices, t[0, h, q, k]:
    torch 2.9's dynamo failed on it under FlexAttention, "Could not extract specialized
    integer from data-dependent expression".)"""
    t = torch.randn(1, 3, 5, 7)
    grid = Grid.tile(torch.tensor([1, 2]), torch.tensor([0, 4]), lq=5, lk=7, batch=2, heads=3)
    with _Indexing() as seen:
        got = torch.broadcast_to(tensor(t)(grid), grid.shape)
    assert torch.equal(got, t.expand(2, -1, -1, -1)[:, :, [1, 2]][:, :, :, [0, 4]])
    mixed = [i for i in seen.indices if isinstance(i, tuple) and int in map(type, i)]
    assert seen.indices and not mixed


def test_a_custom_bias_makes_its_repr_only_for_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """(Its repr was made for every call: torch 2.9's dynamo cannot trace a module's repr,
    so FlexAttention with compile=False failed on every custom bias.)"""
    made: list[int] = []
    monkeypatch.setattr(CustomBias, "extra_repr", lambda self: str(made.append(1) or "fn"))
    grid = Grid.tile(torch.tensor([1, 2]), torch.tensor([0, 4]), lq=5, lk=7, heads=3)
    custom(lambda h, q, k: (k - q) * h)(grid)
    assert not made
    with pytest.raises(ValueError, match=r"bias=custom\(fn\): fn returned shape \(9,\)"):
        custom(lambda h, q, k: torch.zeros(9))(grid)
    assert made


# --------------------------------------------------------------------------- sums


def test_sum_of_alibi_and_tensor_equals_sum_of_denses() -> None:
    a = alibi(4)
    t = tensor(torch.randn(2, 1, 3, 6))
    s = a + t
    assert isinstance(s, SumBias)
    assert s.per_batch and s.per_head
    got = s.dense(3, 6, batch=2, heads=4)
    assert got.shape == (2, 4, 3, 6)
    expected = a.dense(3, 6, batch=2, heads=4) + t.dense(3, 6, batch=2, heads=4)
    torch.testing.assert_close(got, expected)


def test_sum_flattens_checks_all_and_reprs() -> None:
    a, r, t = alibi(2), learned_relative(2, 4), tensor(torch.zeros(3, 3))
    s = (a + r) + (t + a)
    assert isinstance(s, SumBias) and len(s.terms) == 4
    assert repr(s) == (
        "alibi(num_heads=2) + learned_relative(num_heads=2, max_distance=4) "
        "+ tensor(shape=(3, 3)) + alibi(num_heads=2)"
    )
    assert not s.per_batch and s.per_head
    assert (t + t).per_head is False
    # check() checks every term: the tensor's lq and alibi's heads
    check_and_control(
        lambda: s.check(batch=1, heads=2, lq=4, lk=3),
        lambda: s.check(batch=1, heads=2, lq=3, lk=3),
        ValueError,
        r"bias=tensor\(shape=\(3, 3\)\) .*its lq size is 3, expected 1 or 4",
    )
    check_and_control(
        lambda: s.check(batch=1, heads=3, lq=3, lk=3),
        lambda: s.check(batch=1, heads=2, lq=3, lk=3),
        ValueError,
        r"bias=alibi\(num_heads=2\) has 2 heads",
    )
    # gradients reach every term's parameters through the sum
    s.dense(3, 3, heads=2).sum().backward()
    assert r.table.grad is not None and r.table.grad.sum().item() == 2 * 9


def test_sum_errors() -> None:
    check_and_control(
        lambda: alibi(2) + 1,
        lambda: alibi(2) + alibi(2),
        TypeError,
        "unsupported operand",
    )
    check_and_control(
        lambda: SumBias(), lambda: SumBias(alibi(1)), ValueError, "at least one term, got none"
    )
    check_and_control(
        lambda: SumBias(alibi(1), 2),  # type: ignore[arg-type]
        lambda: SumBias(alibi(1), alibi(1)),
        TypeError,
        "SumBias terms must be Bias instances, got int",
    )


# --------------------------------------------------------------------------- every bias on tiles

BUILDERS: dict[str, Callable[[], Bias]] = {
    "alibi": lambda: alibi(3),
    "buckets": lambda: relative_buckets(3, num_buckets=8, max_distance=8),
    "causal_buckets": lambda: relative_buckets(
        3, num_buckets=6, max_distance=7, bidirectional=False
    ),
    "learned": lambda: learned_relative(3, 2),
    "custom": lambda: custom(lambda h, q, k: torch.sin(h + 0.1 * q * k)),
    "tensor": lambda: tensor(torch.randn(2, 3, 6, 9)),
    "sum": lambda: alibi(3) + tensor(torch.randn(9)[None].expand(6, 9).contiguous()),
}


@settings(max_examples=30, deadline=None)
@given(
    name=st.sampled_from(sorted(BUILDERS)),
    rows=st.lists(st.integers(0, 5), min_size=1, max_size=4),
    keys=st.lists(st.integers(0, 8), min_size=1, max_size=5),
)
def test_tile_equals_slice_of_dense(name: str, rows: list[int], keys: list[int]) -> None:
    torch.manual_seed(0)
    b = BUILDERS[name]()
    dense = b.dense(6, 9, batch=2, heads=3)
    full = dense.expand(2, 3, 6, 9)
    grid = Grid.tile(torch.tensor(rows), torch.tensor(keys), lq=6, lk=9, batch=2, heads=3)
    got = torch.broadcast_to(b(grid), grid.shape)
    assert torch.equal(got, full[:, :, rows][:, :, :, keys])


def test_base_class_is_abstract_and_default_check_accepts() -> None:
    with pytest.raises(TypeError, match="abstract"):
        Bias()  # type: ignore[abstract]

    class Zero(Bias):
        def forward(self, grid: Grid) -> Tensor:
            return torch.zeros(())

    z = Zero()
    z.check(batch=7, heads=5, lq=3, lk=2)  # default: no check
    assert z.dense(3, 2, batch=7, heads=5).shape == (1, 1, 3, 2)
    assert repr(z) == "bias()"


# --------------------------------------------------------------------------- linear-distance slopes


def np_linear_distance(slopes: list[float], lq: int, lk: int, *, aligned: bool = True) -> Tensor:
    """``-slopes[h] * |p - k|`` built in numpy, shape (1, H, lq, lk); p bottom-right aligned.

    ``aligned=False`` puts query ``i`` at position ``i`` (top-left): the wrong frame, used as
    a control that the comparison can fail.
    """
    m = np.asarray(slopes, dtype=np.float64)[:, None, None]  # (H, 1, 1)
    p = np.arange(lq) + (lk - lq if aligned else 0)  # (lq,)
    k = np.arange(lk)  # (lk,)
    values = -m * np.abs(p[:, None] - k[None, :])  # (H, lq, lk)
    return torch.from_numpy(values[None])  # (1, H, lq, lk)


@pytest.mark.parametrize("heads", [1, 5, 8, 12])
@pytest.mark.parametrize(("lq", "lk"), [(4, 4), (3, 7), (1, 5), (5, 3)])
def test_alibi_linear_distance_slopes_rebuild_its_dense(heads: int, lq: int, lk: int) -> None:
    b = alibi(heads)
    slopes = b.linear_distance_slopes()
    assert slopes is not None and slopes is dict(b.named_buffers())["slopes"]
    assert slopes.shape == (heads,)
    torch.testing.assert_close(
        slopes.double(), torch.tensor(ref_slopes(heads), dtype=torch.float64), rtol=1e-6, atol=0
    )
    # An engine that computes -slopes[h] * |p - k| from the answer gets exactly b's values.
    dense = b.dense(lq, lk, heads=heads).double()
    expected = np_linear_distance(slopes.tolist(), lq, lk)
    torch.testing.assert_close(dense, expected, rtol=1e-6, atol=1e-7)
    if lq != lk:  # control: the comparison sees a wrong query frame
        assert not torch.allclose(dense, np_linear_distance(slopes.tolist(), lq, lk, aligned=False))


def test_linear_distance_slopes_none_unless_declared() -> None:
    # Biases whose values are ALiBi's still answer None: the answer is declared, not guessed.
    same_as_alibi = {
        "custom": custom(lambda h, q, k: -torch.tensor(ref_slopes(3))[h] * (q - k).abs()),
        "tensor": tensor(alibi(3).dense(4, 4, heads=3)[0]),
    }
    for name, b in same_as_alibi.items():
        torch.testing.assert_close(b.dense(4, 4, heads=3), alibi(3).dense(4, 4, heads=3))
        assert b.linear_distance_slopes() is None, name
    others = [
        relative_buckets(3, num_buckets=8, max_distance=8),
        learned_relative(3, 2),
        alibi(3) + tensor(torch.zeros(4, 4)),
        alibi(3) + alibi(3),  # linear too, but a sum of several terms answers None
    ]
    for b in others:
        assert b.linear_distance_slopes() is None, repr(b)
    # control: a sum of exactly one term gives that term's answer
    one = SumBias(alibi(3)).linear_distance_slopes()
    assert one is not None and torch.equal(one, alibi_slopes(3))


def test_user_subclass_declares_linear_distance_slopes() -> None:
    class Undeclared(Bias):
        """ALiBi-shaped values with user slopes, without the declaration."""

        slopes: Tensor

        def __init__(self, slopes: Tensor) -> None:
            super().__init__()
            self.register_buffer("slopes", slopes)  # (H,)

        @property
        def per_head(self) -> bool:
            return True

        def forward(self, grid: Grid) -> Tensor:
            return -self.slopes[grid.h] * (grid.q - grid.k).abs()  # (1, Hg, Tq, Tk)

    class Declared(Undeclared):
        def linear_distance_slopes(self) -> Tensor:
            return self.slopes

    values = [0.3, 1.5, 0.0]
    b = Declared(torch.tensor(values, dtype=torch.float64))
    got = b.linear_distance_slopes()
    assert got is not None and got.tolist() == values
    torch.testing.assert_close(b.dense(3, 6, heads=3), np_linear_distance(values, 3, 6))
    one = SumBias(b).linear_distance_slopes()
    assert one is not None and torch.equal(one, b.slopes)
    # control: the same values without the declaration answer Bias's default, None
    u = Undeclared(torch.tensor(values, dtype=torch.float64))
    assert torch.equal(u.dense(3, 6, heads=3), b.dense(3, 6, heads=3))
    assert u.linear_distance_slopes() is None


# --------------------------------------------------------------------------- as_bias


def test_as_bias_conversions() -> None:
    assert as_bias(None) is None
    a = alibi(2)
    assert as_bias(a) is a
    t = torch.zeros(3, 3)
    b = as_bias(t)
    assert isinstance(b, TensorBias) and b.values is t


@pytest.mark.parametrize(
    ("value", "match"),
    [
        (
            torch.ones(2, 2, dtype=torch.bool),
            r"bias= got a boolean tensor; boolean tensors are masks: pass them as mask=",
        ),
        (
            torch.ones(2, 2, dtype=torch.int32),
            r"bias= got a tensor of dtype torch.int32; expected a float tensor, a Bias or None",
        ),
        ([[0.0]], r"bias= got list; expected a Bias \(e.g. alibi\(num_heads\)\), a float tensor"),
        ("alibi", r"bias= got str; expected a Bias"),
    ],
)
def test_as_bias_rejects(value: object, match: str) -> None:
    check_and_control(
        lambda: as_bias(value),  # type: ignore[arg-type]
        lambda: as_bias(torch.ones(2, 2)),
        TypeError,
        match,
    )


@pytest.mark.parametrize("shape", [(8,), (1, 2, 4, 8, 8)])
def test_attention_names_bias_for_a_tensor_of_the_wrong_rank(shape: tuple[int, ...]) -> None:
    """(It named ``t``, the argument of ``bias.tensor``, which the caller never wrote.)"""
    q = torch.randn(2, 4, 8, 16)
    check_and_control(
        lambda: attnlab.attention(q, q, q, bias=torch.zeros(shape)),
        lambda: attnlab.attention(q, q, q, bias=torch.zeros(1, 4, 8, 8)),
        ValueError,
        rf"bias= got a tensor of rank {len(shape)} with shape \({shape[0]},.*; expected rank 2",
    )


def test_reprs() -> None:
    assert repr(alibi(8)) == "alibi(num_heads=8)"
    assert repr(relative_buckets(2, 16, 64, bidirectional=False)) == (
        "relative_buckets(num_heads=2, num_buckets=16, max_distance=64, bidirectional=False)"
    )
    assert repr(learned_relative(2, 5)) == "learned_relative(num_heads=2, max_distance=5)"
    assert repr(tensor(torch.zeros(1, 2, 3))) == "tensor(shape=(1, 2, 3))"

    def my_fn(h: Tensor, q: Tensor, k: Tensor) -> Tensor:
        return q.float()

    assert re.fullmatch(
        r"custom\(fn=.*my_fn, per_head=False\)", repr(custom(my_fn, per_head=False))
    )


def test_edges_the_audit_found_in_sinks_buckets_dense_heads_and_attend() -> None:
    """(Sinks over zero keys raised IndexError from amax; t5_bucket(-2**63) gave a bucket of
    -2**63; dense(dtype=int64) truncated ALiBi to zeros; expand_kv(3 heads, 4) gave 3 heads
    and dot() failed in unflatten; attend() checked its mask against the scores' batch 1,
    not the output's batch 2.)"""
    from attnlab.bias import alibi
    from attnlab.bias.relative import t5_bucket
    from attnlab.scores import dot, expand_kv

    q, k = (
        torch.randn(1, 2, 3, 4, dtype=torch.float64),
        torch.zeros(1, 2, 0, 4, dtype=torch.float64),
    )
    sinks = torch.tensor([0.5, -1.0], dtype=torch.float64)
    for engine in ("auto", "reference"):
        got = attnlab.attention(q, k, k, sinks=sinks, return_lse=True, engine=engine)
        assert torch.equal(got.out, torch.zeros(1, 2, 3, 4, dtype=torch.float64))
        assert torch.equal(got.lse, sinks.view(1, 2, 1).expand(1, 2, 3))  # log(exp(sink))
    for bidirectional in (True, False):
        rel = torch.tensor([-(2**63), -(2**62), 2**63 - 1, -128, 128])
        kw = {"bidirectional": bidirectional, "num_buckets": 32, "max_distance": 128}
        far = t5_bucket(torch.tensor([-128, -128, 128, -128, 128]), **kw)
        assert torch.equal(t5_bucket(rel, **kw), far)  # past max_distance: the same bucket
    with pytest.raises(TypeError, match=r"dtype must be a floating-point torch\.dtype, got torch"):
        alibi(2).dense(2, 3, heads=2, dtype=torch.int64)
    assert alibi(2).dense(2, 3, heads=2, dtype=torch.float64).dtype == torch.float64
    with pytest.raises(ValueError, match="heads=4 must be a multiple of the key/value heads"):
        expand_kv(torch.ones(1, 3, 2, 4), 4)
    with pytest.raises(ValueError, match="query heads Hq=3 must be a multiple of key/value"):
        dot(torch.ones(1, 3, 2, 4), torch.ones(1, 2, 2, 4))
    s, v = (
        torch.randn(1, 2, 3, 5, dtype=torch.float64),
        torch.randn(2, 2, 5, 4, dtype=torch.float64),
    )
    got = attnlab.attend(s, v, mask=masks.padding([3, 5]))
    for i, n in enumerate((3, 5)):
        want = torch.softmax(s[0, :, :, :n], -1) @ v[i, :, :n]  # (H, Lq, Ev)
        torch.testing.assert_close(got[i], want, rtol=0, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_row_with_neither_keys_nor_a_sink_has_weights_0(dtype: torch.dtype) -> None:
    """(The blocked kernel's weights pass gave NaN weights on such a row in float32:
    exp(-inf - -inf); its output and logsumexp were right.) Against the reference engine
    and a softmax over the scores and the sink, in float64."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, n, 8, generator=g, dtype=dtype) for n in (4, 6, 6))
    mask, sinks = masks.padding([6], query_lengths=[3]), torch.tensor([0.5, -math.inf])
    for engine in ("reference", "blocked", "auto"):
        got = attnlab.attention(
            q, k, v, mask=mask, sinks=sinks.to(dtype), engine=engine, return_weights=True
        )
        s = torch.cat(
            [
                q.double() @ k.double().mT / 8**0.5,
                sinks.view(1, 2, 1, 1).expand(1, 2, 4, 1).double(),
            ],
            -1,
        )
        want = torch.softmax(s, -1)[..., :6].masked_fill(torch.arange(4).view(4, 1) >= 3, 0.0)
        assert not got.weights.isnan().any(), engine
        torch.testing.assert_close(got.weights.double(), want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("engine", ["reference", "sdpa", "blocked", "auto"])
def test_float64_alibi_of_a_default_module_is_float64_exact(engine: str) -> None:
    """(alibi(12) kept float32 slopes, so float64 attention carried their rounding: 1.7e-8
    at 4097 keys on every engine, while alibi(12).double() was exact.) Against the fp64
    formula with slopes from Press et al.'s rule, 12 heads (not a power of two)."""
    from attnlab.bias import alibi

    torch.manual_seed(0)
    h, n = 12, 1030
    q, k, v = (torch.randn(1, h, n, 8, dtype=torch.float64) for _ in range(3))
    base = [2 ** (-8 * (i + 1) / 8) for i in range(8)]  # 8 heads: 2^(-8/8 * (i + 1))
    more = [2 ** (-8 * (i + 1) / 16) for i in range(16)][0::2][:4]  # odd ones of 16 heads
    slopes = torch.tensor(base + more, dtype=torch.float64)
    pos = torch.arange(n)
    bias = -slopes[:, None, None] * (pos[:, None] - pos[None, :]).abs().double()
    want = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(8) + bias, -1) @ v
    got = attnlab.attention(q, k, v, bias=alibi(h), engine=engine)
    assert max_err(got, want) < 1e-12
    dense = alibi(h).dense(1, n, heads=h, dtype=torch.float64)[0, :, 0]  # the last row
    assert max_err(dense, bias[:, -1]) == 0.0
