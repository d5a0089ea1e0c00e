"""Attention flow (Abnar & Zuidema 2020, "Quantifying Attention Flow in Transformers").

The attention graph has ``L + 1`` layers of ``n`` nodes: layer 0 holds the input tokens,
layer ``l + 1`` the outputs of attention layer ``l``. As in the paper's notebook
(samiraabnar/attention_flow, ``get_adjmat``/``compute_flows``), edges point down, from
query node ``(l + 1, i)`` to key node ``(l, j)``, with capacity ``A_l[i, j]``: the
head-fused, residual-augmented attention of layer ``l``. The flow of output token ``i``
from input token ``j`` is the max-flow from source ``(L, i)`` to sink ``(0, j)`` (the
same value as from ``(0, j)`` to ``(L, i)`` on the reversed graph). Head fusion and the
residual are those of attention rollout: ``A = fuse_h(attn)``; with ``residual``,
``A = 0.5 A + 0.5 I`` with rows renormalized.

Each pair is one max-flow, computed with scipy's Dinic solver
(:func:`scipy.sparse.csgraph.maximum_flow`) on one CSR graph built once per batch element.

Precision: scipy needs integer capacities, so capacities are scaled by ``s = 2**k``, the
largest power of two with ``s * r <= 2**30`` where ``r`` is the largest row sum (total
out-capacity of a node; ``r = 1`` for attention rows, so ``s = 2**30``), and rounded to the
nearest integer. Each capacity is then off by at most ``1 / (2 s) <= r * 2**-30``, and a
flow value by at most ``m / (2 s)``, where ``m`` is the number of edges of a minimum cut
(at most ``L * n**2``): ``|error| <= m * r * 2**-30``. Measured against networkx on
softmax attention the error is ~1e-9 (``benchmarks/bench_flow.py``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from attnlab._validate import validate_flag
from attnlab.interpret.explain import HEAD_FUSIONS, _check_layers, residual_attention

__all__ = ["attention_flow"]

_CAPACITY_BITS = 30  # flow values stay below 2**31 (scipy's int32 capacities)


def attention_flow(
    attentions: Sequence[Tensor],
    *,
    head_fusion: str = "mean",
    residual: bool = True,
    outputs: Sequence[int] | None = None,
    normalize: bool = False,
) -> Tensor:
    """Max-flow from every input token to every output token of the attention graph.

    Args:
        attentions: one ``(B, H, n, n)`` weight tensor per layer, first layer first, rows
            are queries (what :func:`attnlab.interpret.capture` records). Heads may differ
            between layers; ``B`` and ``n`` may not. Weights must be finite and ``>= 0``.
        head_fusion: ``"mean"``, ``"max"`` or ``"min"`` over heads.
        residual: add the identity (``0.5 A + 0.5 I``, rows renormalized) for the residual
            connection around each attention layer.
        outputs: indices of the output tokens (last-layer nodes) to compute; default all.
            Cost is ``len(outputs) * n`` max-flows per batch element.
        normalize: divide each output row by its sum (as the paper's notebook does); rows
            of zeros stay zero.

    Returns:
        ``(B, n_out, n)`` flow values, ``n_out = len(outputs)`` (default ``n``): row ``r``
        is output token ``outputs[r]``, column ``j`` input token ``j``. Same dtype and
        device as the attentions. Needs scipy (``pip install attnlab[explain]``).

    Example:
        >>> import torch
        >>> from attnlab.interpret import attention_flow
        >>> a = torch.tensor([[[[1.0, 0.0], [0.5, 0.5]]]])  # (B=1, H=1, 2, 2)
        >>> attention_flow([a], residual=False)[0]
        tensor([[1.0000, 0.0000],
                [0.5000, 0.5000]])
        >>> attention_flow([a, a], residual=False)[0, 1]  # flow is capped by each edge
        tensor([1.0000, 0.5000])
    """
    layers = _validate_attentions(attentions)
    if head_fusion not in HEAD_FUSIONS:
        raise ValueError(f"head_fusion must be one of {HEAD_FUSIONS}, got {head_fusion!r}")
    validate_flag("residual", residual)
    validate_flag("normalize", normalize)
    n = layers[0].shape[-1]
    rows = _validate_outputs(outputs, n)
    caps = [residual_attention(a, head_fusion, residual) for a in layers]  # L x (B, n, n)
    caps_np = torch.stack(caps, 1).detach().to("cpu", torch.float64).numpy()  # (B, L, n, n)
    flows = np.zeros((caps_np.shape[0], len(rows), n))  # (B, n_out, n); B or n may be 0
    for b, c in enumerate(caps_np):
        flows[b] = _flows_one(c, rows)
    if normalize:
        total = flows.sum(-1, keepdims=True)
        flows = np.divide(flows, total, out=np.zeros_like(flows), where=total > 0)
    return torch.from_numpy(flows).to(layers[0].device, layers[0].dtype)


def _flows_one(caps: np.ndarray, rows: list[int]) -> np.ndarray:
    """``caps (L, n, n)`` float64 -> ``(len(rows), n)`` max-flow values, one per pair."""
    maximum_flow = _scipy().csgraph.maximum_flow
    num_layers, n, _ = caps.shape
    out = np.zeros((len(rows), n))
    largest = caps.sum(-1).max() if caps.size else 0.0
    if largest <= 0:
        return out
    bits = _scale_bits(float(largest))
    graph = _graph(np.rint(np.ldexp(caps, bits)).astype(np.int32))
    into_sink = caps[0].sum(0)  # (n,) capacity into each input node
    for r, i in enumerate(rows):
        source = num_layers * n + i
        if caps[-1, i].sum() <= 0:
            continue
        for j in np.flatnonzero(into_sink > 0):
            out[r, j] = maximum_flow(graph, source, int(j), method="dinic").flow_value
    return np.ldexp(out, -bits)


def _scale_bits(largest: float) -> int:
    """``k`` of the capacities' scale ``2**k``: the largest with ``2**k * largest <=
    2**30``, for any positive ``largest`` (``2.0**30 / largest`` overflowed to inf below
    about 6e-300, and every flow came back 0), applied with ``np.ldexp`` (exact: the scale
    itself may not be a float, ``2**1059`` at ``1e-310``).

    Example:
        >>> _scale_bits(1.0), _scale_bits(0.75), _scale_bits(1e-310)
        (30, 30, 1059)
    """
    mantissa, exponent = np.frexp(largest)  # largest = mantissa * 2**exponent, in [0.5, 1)
    return _CAPACITY_BITS - int(exponent) + int(mantissa == 0.5)


def _graph(caps: np.ndarray) -> Any:
    """The layered graph as a CSR array: node ``l * n + i``; edge ``(l+1, i) -> (l, j)``
    with capacity ``caps[l, i, j]`` (zeros dropped)."""
    num_layers, n, _ = caps.shape
    layer, i, j = np.nonzero(caps)
    src = (layer + 1) * n + i
    dst = layer * n + j
    size = (num_layers + 1) * n
    graph = _scipy().csr_array((caps[layer, i, j], (src, dst)), shape=(size, size), dtype=np.int32)
    graph.sort_indices()
    return graph


def _scipy() -> Any:
    """``scipy.sparse`` (with ``csgraph``), or an ImportError saying how to get it."""
    try:
        import scipy.sparse
        import scipy.sparse.csgraph
    except ImportError as err:
        raise ImportError(
            "attention_flow needs scipy's max-flow solver: pip install 'attnlab[explain]'"
        ) from err
    return scipy.sparse


def _validate_attentions(attentions: object) -> list[Tensor]:
    """A non-empty list of finite, nonnegative ``(B, H, n, n)`` float tensors sharing
    ``B``, ``n``, dtype and device."""
    _check_layers("attentions", attentions, weights=True)
    return list(attentions)  # type: ignore[call-overload]


def _validate_outputs(outputs: object, n: int) -> list[int]:
    if outputs is None:
        return list(range(n))
    if isinstance(outputs, Tensor | str) or not isinstance(outputs, Sequence):
        raise TypeError(f"outputs must be a sequence of token indices, got {outputs!r}")
    bad = [o for o in outputs if isinstance(o, bool) or not isinstance(o, int | np.integer)]
    if bad or any(not 0 <= o < n for o in outputs):
        raise ValueError(f"outputs must be token indices in [0, {n}), got {list(outputs)}")
    return [int(o) for o in outputs]
