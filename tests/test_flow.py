"""Attention flow against networkx max-flow on the paper notebook's graph."""

from __future__ import annotations

import networkx as nx
import numpy as np
import pytest
import torch
from torch import Tensor

from attnlab.interpret import attention_flow, rollout

pytest.importorskip("scipy")


def _fused_numpy(attn: Tensor, head_fusion: str, residual: bool) -> np.ndarray:
    """(B, H, n, n) -> (B, n, n), written from the paper: fuse heads, add I, renormalize."""
    a = attn.double().numpy()
    fused = {"mean": a.mean(1), "max": a.max(1), "min": a.min(1)}[head_fusion]
    if residual:
        fused = fused + np.eye(a.shape[-1])
        fused = fused / fused.sum(-1, keepdims=True)
    return fused


def _flow_networkx(caps: list[np.ndarray]) -> np.ndarray:
    """caps: L x (n, n). As samiraabnar/attention_flow's get_adjmat + compute_flows: an
    adjacency from (l+1, query) to (l, key), one edmonds_karp max-flow per pair, from
    output node (L, i) to input node (0, j); not normalized. Returns (n, n)."""
    num_layers, n = len(caps), caps[0].shape[0]
    adj = np.zeros(((num_layers + 1) * n, (num_layers + 1) * n))
    for layer, c in enumerate(caps):
        adj[(layer + 1) * n : (layer + 2) * n, layer * n : (layer + 1) * n] = c
    graph = nx.from_numpy_array(adj, create_using=nx.DiGraph, edge_attr="capacity")
    out = np.zeros((n, n))
    for i in range(n):
        for j in range(n):
            out[i, j] = nx.maximum_flow_value(
                graph, num_layers * n + i, j, flow_func=nx.algorithms.flow.edmonds_karp
            )
    return out


def _attentions(seed: int, layers: int, n: int, batch: int = 2, heads: int = 3) -> list[Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [
        torch.softmax(2 * torch.randn(batch, heads, n, n, generator=gen, dtype=torch.float64), -1)
        for _ in range(layers)
    ]


def _bound(caps: list[np.ndarray]) -> float:
    """The module's documented error bound: L * n**2 * (largest row sum) * 2**-30."""
    largest = max(float(c.sum(-1).max()) for c in caps)
    return len(caps) * caps[0].shape[0] ** 2 * largest * 2.0**-30


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("head_fusion", ["mean", "max", "min"])
@pytest.mark.parametrize("residual", [True, False])
def test_matches_networkx(seed: int, head_fusion: str, residual: bool) -> None:
    atts = _attentions(seed, layers=3, n=6)
    ours = attention_flow(atts, head_fusion=head_fusion, residual=residual)
    assert ours.shape == (2, 6, 6)
    for b in range(2):
        caps = [_fused_numpy(a, head_fusion, residual)[b] for a in atts]
        ref = _flow_networkx(caps)
        np.testing.assert_allclose(ours[b].numpy(), ref, rtol=0, atol=_bound(caps))


def test_sparse_and_unnormalized_capacities_match_networkx() -> None:
    """Causal attention (zero edges, unreachable pairs) scaled by 1000: the integer scaling
    adapts to the largest row sum, and missing paths give exactly 0."""
    causal = torch.ones(5, 5).tril().bool()
    atts = [a.masked_fill(~causal, 0) * 1000 for a in _attentions(3, layers=2, n=5, batch=1)]
    ours = attention_flow(atts, residual=False)[0].numpy()
    caps = [_fused_numpy(a, "mean", False)[0] for a in atts]
    ref = _flow_networkx(caps)
    np.testing.assert_allclose(ours, ref, rtol=0, atol=_bound(caps))
    assert (ours[~causal.numpy()] == 0).all()
    assert ref.max() > 100  # the check is not vacuous


def test_bounds_hold() -> None:
    """0 <= flow[i, j] <= min(out-capacity of output i, in-capacity of input j)."""
    atts = _attentions(4, layers=3, n=7, batch=1)
    flow = attention_flow(atts, head_fusion="max", residual=True)[0].numpy()
    caps = [_fused_numpy(a, "max", True)[0] for a in atts]
    cap_out = caps[-1].sum(1)[:, None]  # (n, 1): edges leaving source (L, i)
    cap_in = caps[0].sum(0)[None, :]  # (1, n): edges entering sink (0, j)
    tol = _bound(caps)
    assert (flow >= 0).all()
    assert (flow <= np.minimum(cap_out, cap_in) + tol).all()
    assert (flow > tol).any()


def test_one_layer_is_the_attention() -> None:
    """With one layer each pair is a single edge: flow = 0.5 A + 0.5 I, directly."""
    atts = _attentions(5, layers=1, n=8)
    flow = attention_flow(atts)
    expected = 0.5 * atts[0].mean(1) + 0.5 * torch.eye(8, dtype=torch.float64)
    torch.testing.assert_close(flow, expected, rtol=0, atol=2.0**-30)


def test_outputs_normalize_and_dtype() -> None:
    atts = _attentions(6, layers=2, n=6, batch=1)
    full = attention_flow(atts)
    some = attention_flow(atts, outputs=[4, 0])
    torch.testing.assert_close(some, full[:, [4, 0]], rtol=0, atol=0)
    normed = attention_flow(atts, normalize=True)
    torch.testing.assert_close(normed, full / full.sum(-1, keepdim=True))
    f32 = attention_flow([a.float() for a in atts])
    assert f32.dtype == torch.float32
    torch.testing.assert_close(f32, full.float(), rtol=0, atol=1e-6)
    zero = attention_flow([torch.zeros(1, 1, 3, 3)], residual=False, normalize=True)
    assert torch.equal(zero, torch.zeros(1, 3, 3))  # zero rows stay 0, not NaN


def _good() -> list[Tensor]:
    return _attentions(7, layers=2, n=4, batch=1)


@pytest.mark.parametrize(
    ("atts", "error", "match"),
    [
        (lambda: torch.stack(_good()), TypeError, "list of \\(B, H, n, n\\) tensors"),
        (lambda: [], ValueError, "at least one layer"),
        (lambda: [_good()[0], torch.rand(1, 2, 5, 5)], ValueError, "share batch B and length"),
        (lambda: [_good()[0], torch.rand(2, 2, 4, 4).double()], ValueError, "share batch B"),
        (lambda: [torch.rand(1, 2, 4, 5)], ValueError, "square self-attention"),
        (lambda: [torch.rand(2, 4, 4)], ValueError, "got \\(2, 4, 4\\)"),
        (lambda: [torch.ones(1, 1, 4, 4, dtype=torch.long)], TypeError, "floating-point"),
        (lambda: [_good()[0], _good()[1].float()], TypeError, "share dtype"),
        (lambda: [-_good()[0]], ValueError, "finite and >= 0"),
        (lambda: [_good()[0].fill_(float("nan"))], ValueError, "finite and >= 0"),
    ],
)
def test_bad_attentions(atts: object, error: type[Exception], match: str) -> None:
    assert attention_flow(_good()).shape == (1, 4, 4)  # positive control
    with pytest.raises(error, match=match):
        attention_flow(atts())  # type: ignore[operator]


def test_bad_options() -> None:
    assert attention_flow(_good(), head_fusion="min", outputs=[3]).shape == (1, 1, 4)
    with pytest.raises(ValueError, match="head_fusion must be one of"):
        attention_flow(_good(), head_fusion="sum")
    with pytest.raises(TypeError, match="residual must be a bool"):
        attention_flow(_good(), residual=1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="token indices in \\[0, 4\\)"):
        attention_flow(_good(), outputs=[4])
    with pytest.raises(TypeError, match="sequence of token indices"):
        attention_flow(_good(), outputs=2)  # type: ignore[arg-type]


@pytest.mark.parametrize("shape", [(0, 2, 4, 4), (1, 2, 0, 0), (0, 1, 0, 0)])
def test_empty_batches_and_sequences_give_empty_flows(shape: tuple[int, ...]) -> None:
    """(numpy raised "need at least one array to stack" for B = 0, and "zero-size array to
    reduction operation maximum" for n = 0; rollout returned both.)"""
    a = torch.rand(*shape)
    flows = attention_flow([a, a])
    assert flows.shape == rollout([a, a]).shape == (shape[0], shape[-1], shape[-1])
    assert flows.dtype == a.dtype


@pytest.mark.parametrize("scale", [1e-250, 1e-305, 1e-310])
def test_tiny_capacities_match_networkx(scale: float) -> None:
    """Row sums below about 6e-300 overflowed the scale ``2.0**30 / largest`` to inf: every
    flow came back 0 with RuntimeWarnings. Now the same relative error as at scale 1."""
    atts = [a * scale for a in _attentions(7, layers=2, n=5, batch=1)]
    with np.errstate(all="raise"):
        ours = attention_flow(atts, residual=False)[0].numpy()
    caps = [_fused_numpy(a, "mean", False)[0] for a in atts]
    ref = _flow_networkx(caps)
    assert ref.min() > 0  # the check is not vacuous
    np.testing.assert_allclose(ours, ref, rtol=0, atol=_bound(caps) + 2 * 5e-324)
