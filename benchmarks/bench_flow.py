"""Attention flow: attnlab's scipy max-flow against networkx, one max-flow per node pair.

The input is ``--layers`` layers of random softmax attention ``(1, --heads, n, n)``
(logits ``2 * N(0, 1)``, seed 0), heads averaged, residual added (``0.5 A + 0.5 I``): the
paper's setting. Both compute the max-flow from every output token ``(L, i)`` to every
input token ``(0, j)`` of the same layered graph (edges from queries down to keys):

* ``ours``: :func:`attnlab.interpret.attention_flow` end to end (fusion, graph, ``n**2``
  scipy Dinic max-flows on integer capacities scaled by ``2**30``); median of
  ``--repeat`` runs after a warm-up;
* the anchor: the paper notebook's approach, a networkx ``DiGraph`` built once and
  ``networkx.maximum_flow_value`` per pair, with ``--anchor-flow`` (networkx's default
  ``preflow_push``, its fastest; the notebook used ``edmonds_karp``, several times
  slower). One pass over ``--anchor-pairs`` random pairs (0: all ``n**2``); when fewer
  than all, ``anchor_ms`` is the per-pair time times ``n**2`` and ``anchor_pairs_timed``
  says how many were timed.

``ratio`` is ``anchor_ms / ours_ms``; ``max_abs_diff`` is the largest ``|ours - networkx|``
over the pairs networkx computed, beside the documented worst-case bound ``error_bound``.

python benchmarks/bench_flow.py                      # 6 layers, 64 tokens, 256 anchor pairs
python benchmarks/bench_flow.py --anchor-pairs 0     # time networkx on all 4096 pairs
python benchmarks/bench_flow.py --smoke              # tiny, all pairs, for CI
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import networkx as nx
import numpy as np
import torch
from torch import Tensor

from attnlab.cli._args import int_in, parse_smoke, script_parser
from attnlab.interpret import attention_flow, fuse_heads

FLOWS = {
    "preflow_push": nx.algorithms.flow.preflow_push,
    "edmonds_karp": nx.algorithms.flow.edmonds_karp,
    "shortest_augmenting_path": nx.algorithms.flow.shortest_augmenting_path,
}


def make_attentions(layers: int, n: int, heads: int, seed: int) -> list[Tensor]:
    """``layers`` random softmax attentions ``(1, heads, n, n)`` in float64."""
    gen = torch.Generator().manual_seed(seed)
    shape = (1, heads, n, n)
    return [
        torch.softmax(2 * torch.randn(shape, generator=gen, dtype=torch.float64), -1)
        for _ in range(layers)
    ]


def capacities(attentions: list[Tensor]) -> list[np.ndarray]:
    """The notebook's per-layer capacities: heads averaged, ``A + I`` rows renormalized."""
    caps = []
    for a in attentions:
        fused = fuse_heads(a, "mean")[0].numpy() + np.eye(a.shape[-1])  # (n, n)
        caps.append(fused / fused.sum(-1, keepdims=True))
    return caps


def networkx_flows(
    caps: list[np.ndarray], pairs: list[tuple[int, int]], flow: str
) -> dict[tuple[int, int], float]:
    """The anchor: one networkx DiGraph (node ``l * n + i``, edge ``(l+1, i) -> (l, j)``
    of capacity ``caps[l][i, j]``), then one max-flow per (output i, input j) pair."""
    num_layers, n = len(caps), caps[0].shape[0]
    adj = np.zeros(((num_layers + 1) * n, (num_layers + 1) * n))
    for layer, c in enumerate(caps):
        adj[(layer + 1) * n : (layer + 2) * n, layer * n : (layer + 1) * n] = c
    graph = nx.from_numpy_array(adj, create_using=nx.DiGraph, edge_attr="capacity")
    return {
        (i, j): nx.maximum_flow_value(graph, num_layers * n + i, j, flow_func=FLOWS[flow])
        for i, j in pairs
    }


def run(args: argparse.Namespace) -> dict[str, object]:
    """Time both on the same input; returns the JSON record."""
    atts = make_attentions(args.layers, args.n, args.heads, args.seed)
    n, total = args.n, args.n * args.n
    all_pairs = [(i, j) for i in range(n) for j in range(n)]
    rng = np.random.default_rng(args.seed)
    k = total if args.anchor_pairs <= 0 else min(args.anchor_pairs, total)
    pairs = [all_pairs[p] for p in sorted(rng.choice(total, size=k, replace=False))]

    ours = attention_flow(atts)[0].numpy()  # (n, n); also the warm-up (imports scipy)
    times = []
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        attention_flow(atts)
        times.append(1e3 * (time.perf_counter() - t0))
    ours_ms = statistics.median(times)

    caps = capacities(atts)
    t0 = time.perf_counter()
    ref = networkx_flows(caps, pairs, args.anchor_flow)
    anchor_pass_ms = 1e3 * (time.perf_counter() - t0)
    anchor_ms = anchor_pass_ms / k * total

    diff = max(abs(ours[i, j] - v) for (i, j), v in ref.items())
    return {
        "bench": "flow",
        "layers": args.layers,
        "n": n,
        "heads": args.heads,
        "batch": 1,
        "head_fusion": "mean",
        "residual": True,
        "ours_ms": round(ours_ms, 1),
        "anchor": f"networkx.maximum_flow_value per pair ({args.anchor_flow})",
        "anchor_ms": round(anchor_ms, 1),
        "anchor_extrapolated": k < total,
        "anchor_pairs_timed": k,
        "anchor_pairs_total": total,
        "ours_ms_per_pair": round(ours_ms / total, 4),
        "anchor_ms_per_pair": round(anchor_pass_ms / k, 3),
        "ratio": round(anchor_ms / ours_ms, 1),
        "pairs_compared": k,
        "max_abs_diff": float(f"{diff:.3g}"),
        "error_bound": float(f"{args.layers * n * n * 2.0**-30:.3g}"),
        "threads": torch.get_num_threads(),
        "cpu": torch.backends.cpu.get_cpu_capability(),
    }


def main(argv: list[str] | None = None) -> int:
    p = script_parser(__doc__)
    p.add_argument("--layers", type=int_in(1), default=6)
    p.add_argument("--n", type=int_in(1), default=64, help="tokens")
    p.add_argument("--heads", type=int_in(1), default=12)
    p.add_argument("--seed", type=int_in(0), default=0)
    p.add_argument("--repeat", type=int_in(1), default=3, help="timed runs of ours (median)")
    p.add_argument(
        "--anchor-pairs", type=int_in(0), default=256, help="pairs networkx times (0: all)"
    )
    p.add_argument("--anchor-flow", default="preflow_push", choices=sorted(FLOWS))
    p.add_argument("--smoke", action="store_true", help="tiny sizes, all pairs (CI)")
    smoke = {"layers": 2, "n": 8, "heads": 2, "repeat": 1, "anchor_pairs": 0}
    args = parse_smoke(p, argv, smoke)
    print(json.dumps(run(args)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
