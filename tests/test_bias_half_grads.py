"""Learned relative tables in half precision: their gradients sum in float32.

Each table entry gathers the gradient of many score cells; torch's indexing backward sums
them in the table's own dtype, which in bfloat16 stalls once the sum is large (2.9 off an
entry of size 6 for 256 x 256 scores, about 200x the rounding of the exact gradient).
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

import attnlab
from attnlab.bias import learned_relative, relative_buckets

B, H, L, E = 2, 4, 256, 32


def _table_grad(kind: str, table: Tensor, x: list[Tensor], engine: str) -> Tensor:
    bias = learned_relative(H, 16) if kind == "learned" else relative_buckets(H)
    bias = bias.to(table.dtype)
    with torch.no_grad():
        bias.table.copy_(table)
    q, k, v = (t.to(table.dtype) for t in x)
    out = attnlab.attention(q, k, v, bias=bias, engine=engine)
    g = torch.Generator().manual_seed(1)
    out.backward(torch.randn(out.shape, generator=g).to(out.dtype))
    assert bias.table.grad is not None
    return bias.table.grad


@pytest.mark.parametrize("engine", ["reference", "blocked"])
@pytest.mark.parametrize("kind", ["learned", "buckets"])
def test_bfloat16_table_gradients_round_once(kind: str, engine: str) -> None:
    g = torch.Generator().manual_seed(0)
    x = list(torch.randn(3, B, H, L, E, generator=g, dtype=torch.float64).unbind(0))
    rows = 33 if kind == "learned" else 32
    table = torch.randn(rows, H, generator=g, dtype=torch.float64)
    exact = _table_grad(kind, table, x, "reference")  # float64
    half = _table_grad(kind, table.bfloat16(), x, engine)
    rounding = (exact.bfloat16().double() - exact).abs().max().item()
    err = (half.double() - exact).abs().max().item()
    assert half.dtype == torch.bfloat16
    assert err <= 8 * rounding, (err, rounding)  # was 160x


def test_float32_tables_are_read_directly() -> None:
    bias = learned_relative(2, 3)
    w = bias.dense(5, 5, heads=2)
    idx = (torch.arange(5).view(1, 5) - torch.arange(5).view(5, 1)).clamp(-3, 3) + 3
    assert torch.equal(w[0, 1], bias.table[idx, 1])
