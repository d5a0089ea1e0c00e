"""Head sizes of 0 (``E = 0``: every score is 0; ``Ev = 0``: an empty output): the
blocked engine declines them by name (its backward raised std::bad_alloc) and ``auto``
serves them as the float64 formula does."""

from __future__ import annotations

import pytest
import torch

import attnlab
from attnlab import bias, masks


@pytest.mark.parametrize(("e", "ev"), [(4, 0), (0, 3)])
def test_zero_head_sizes(e: int, ev: int) -> None:
    torch.manual_seed(0)
    q, k = torch.randn(1, 2, 8, e), torch.randn(1, 2, 8, e)
    v = torch.randn(1, 2, 8, ev)
    with pytest.raises(ValueError, match="the blocked engine needs head sizes E >= 1 and Ev >= 1"):
        attnlab.attention(q, k, v, mask=masks.causal(), engine="blocked")
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = attnlab.attention(*leaves, mask=masks.causal())
    out.square().sum().backward()
    # E = 0: each row the mean of the values it sees (causal); Ev = 0: nothing
    counts = torch.arange(1, 9, dtype=torch.float32).view(1, 1, 8, 1)
    want = v.cumsum(2) / counts
    torch.testing.assert_close(out.detach(), want)
    assert all(t.grad is not None and not t.grad.isnan().any() for t in leaves)


@pytest.mark.parametrize("engine", ["auto", "sdpa"])
@pytest.mark.parametrize(
    ("mask", "alibi"),
    [(masks.window(0), None), (masks.padding([1, 5]), None), (masks.causal(), bias.alibi(2))],
)
def test_empty_values_rows_of_one_key(
    engine: str, mask: masks.Mask, alibi: bias.Bias | None
) -> None:
    """``Ev = 0`` with gradients where some row sees one key: SDPA's exact one-key rows
    reshaped the empty values with ``-1`` (RuntimeError "cannot reshape tensor of 0
    elements"); the output is empty and the gradients 0, as the reference engine gives."""
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 2, 5, 8), torch.randn(2, 2, 5, 8), torch.randn(2, 2, 5, 0)
    grads = []
    for name in (engine, "reference"):
        leaf = q.clone().requires_grad_()
        out = attnlab.attention(leaf, k, v, mask=mask, bias=alibi, engine=name)
        assert out.shape == (2, 2, 5, 0)
        out.sum().backward()
        grads.append(leaf.grad)
    torch.testing.assert_close(grads[0], grads[1])
    torch.testing.assert_close(grads[0], torch.zeros_like(q))
