"""Context-parallel attention on GPUs over NCCL: the same exactness as on gloo/CPU.

Skipped without two CUDA GPUs and NCCL (CI has none). Each rank holds its shard on its own
GPU; forward and every gradient must equal one process's ``attnlab.attention`` on the
whole sequence on the same GPU, in fp64.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

import attnlab
import attnlab.distributed as D
from attnlab import masks
from attnlab.distributed.launch import run_local

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        torch.cuda.device_count() < 2 or not dist.is_nccl_available(),
        reason="needs two CUDA GPUs and NCCL",
    ),
]

N, H, HKV, E = 96, 4, 2, 16
MASKS = {
    "causal": lambda: masks.causal(),
    "window": lambda: masks.causal() & masks.window(20),
    "documents": lambda: masks.documents(torch.arange(N) * 3 // N) & masks.causal(),
}


def _errors(rank: int, world: int, strategy: str) -> dict[str, float]:
    """Largest |sharded - whole| over the output and the three gradients, per mask."""
    dev = torch.device("cuda", rank)
    g = torch.Generator().manual_seed(0)
    q, dout = (torch.randn(1, H, N, E, generator=g, dtype=torch.float64) for _ in range(2))
    k, v = (torch.randn(1, HKV, N, E, generator=g, dtype=torch.float64) for _ in range(2))
    q, k, v, dout = (t.to(dev) for t in (q, k, v, dout))
    errs = {}
    for name, make in MASKS.items():
        whole = [t.clone().requires_grad_() for t in (q, k, v)]
        ref = attnlab.attention(*whole, mask=make())
        ref.backward(dout)
        part = [D.shard(t, rank, world).clone().requires_grad_() for t in (q, k, v)]
        out = D.attention(*part, mask=make(), strategy=strategy)
        out.backward(D.shard(dout, rank, world))
        pairs = [(out, D.shard(ref.detach(), rank, world))]
        pairs += [(p.grad, D.shard(w.grad, rank, world)) for p, w in zip(part, whole, strict=True)]
        errs[name] = max(float((a - b).abs().max()) for a, b in pairs)
    return errs


@pytest.mark.parametrize("strategy", ["ring", "all-gather"])
def test_nccl_equals_one_process(strategy: str) -> None:
    results = run_local(_errors, 2, strategy, backend="nccl", timeout=300)
    bad = {(r, m): e for r, errs in enumerate(results) for m, e in errs.items() if e > 1e-10}
    assert not bad, bad


def test_nccl_needs_a_gpu_per_rank() -> None:
    with pytest.raises(ValueError, match="one GPU per rank"):
        run_local(_errors, torch.cuda.device_count() + 1, "ring", backend="nccl")
