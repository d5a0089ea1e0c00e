"""Context-parallel attention (attnlab.distributed) against one process, measured and
simulated, and torch's own ``context_parallel`` on gloo/CPU.

Prints JSON lines:

* ``measured``: forward+backward of one fp32 attention (H=8, E=64) in one process with one
  thread (the anchor: ``attnlab.attention``, auto engine) and over P gloo processes with
  one thread each, timed alternately in the same run; parallel efficiency is
  ``t(1 process) / (P x t(P processes))``. With the bytes each rank received per step.
* ``simulated``: :func:`attnlab.distributed.simulate` at P = 8 .. 64 for causal, window and
  documents masks, with the link bandwidth and per-rank compute rate it states, next to
  ring-flash-attention's published 90% (forward+backward, 8 GPUs).
* ``torch_context_parallel``: what ``torch.distributed.tensor.experimental.context_parallel``
  does with causal SDPA on 2 gloo processes (today: it raises).

python benchmarks/bench_distributed.py             # N=16384 causal, N=65536 window 512
python benchmarks/bench_distributed.py --smoke     # tiny sizes, for CI
"""

from __future__ import annotations

import json
import time
from typing import Any

import torch
import torch.distributed as dist

import attnlab
import attnlab.distributed as D
from attnlab import masks
from attnlab.cli._args import int_in, parse_smoke, script_parser
from attnlab.distributed.launch import run_local

H, E = 8, 64


def _mask(case: str, n: int, window: int) -> masks.Mask:
    if case == "causal":
        return masks.causal()
    if case == "window":
        return masks.causal() & masks.window(window)
    ids = torch.arange(n) * 16 // n  # 16 packed documents of equal length
    return masks.documents(ids) & masks.causal()


def _inputs(n: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(1, H, n, E, generator=g) for _ in range(4))


def _one_process(case: str, n: int, window: int) -> float:
    """Seconds of one forward+backward in this process (one thread)."""
    q, k, v, grad = (t.requires_grad_(i < 3) for i, t in enumerate(_inputs(n)))
    start = time.perf_counter()
    attnlab.attention(q, k, v, mask=_mask(case, n, window)).backward(grad)
    return time.perf_counter() - start


def _worker(rank: int, world: int, case: str, n: int, window: int, reps: int) -> dict[str, Any]:
    """Per-repeat seconds of the sharded forward+backward on this rank, and its traffic."""
    q, k, v, grad = (D.shard(t, rank, world) for t in _inputs(n))
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    times = []
    for _ in range(reps + 1):  # the first run warms up
        dist.barrier()
        D.TRAFFIC.reset()
        start = time.perf_counter()
        D.attention(q, k, v, mask=_mask(case, n, window)).backward(grad)
        dist.barrier()
        times.append(time.perf_counter() - start)
    return {"times": times[1:], "received": D.TRAFFIC.received, "peers": sorted(D.TRAFFIC.peers)}


def measured(case: str, n: int, world: int, window: int, reps: int) -> dict[str, Any]:
    """Alternate one-process and P-process runs; the best of each gives the efficiency."""
    torch.set_num_threads(1)
    _one_process(case, min(n, 1024), window)  # warm up (kernel load, allocator)
    one, many, info = [], [], {}
    for _ in range(reps):
        one.append(_one_process(case, n, window))
        info = run_local(_worker, world, case, n, window, 1, timeout=1800)[0]
        many.append(max(r for r in info["times"]))
    plan = D.plan(n, world, mask=_mask(case, n, window), heads=H, head_dim=E)
    steps = [s.received for s in plan.ranks[0].steps]
    return {
        "bench": "distributed",
        "kind": "measured",
        "case": case,
        "n": n,
        "P": world,
        "window": window if case == "window" else None,
        "one_process_s": round(min(one), 3),
        "ours_s": round(min(many), 3),
        "efficiency": round(min(one) / (world * min(many)), 3),
        "fwd_received_bytes_per_step_rank0": steps,
        "window_bound_bytes": 2 * (window * H * E * 4 * 2) if case == "window" else None,
        "cpu": torch.backends.cpu.get_cpu_capability(),
    }


def simulated(
    n: int, bandwidth: float, flops: float, worlds: list[int], latency: float = 20e-6
) -> list[dict[str, Any]]:
    rows = []
    for case in ("causal", "window", "documents"):
        for world in worlds:
            p = D.plan(n, world, mask=_mask(case, n, 4096), heads=H, head_dim=E)
            rows.append(
                {
                    "bench": "distributed",
                    "kind": "simulated",
                    "case": case,
                    "n": n,
                    "P": world,
                    "strategy": "ring",
                    "layout": "zigzag",
                    "bandwidth_GBps": bandwidth / 1e9,
                    "rank_TFLOPs": flops / 1e12,
                    "latency_us": latency * 1e6,
                    "efficiency_fwd": round(
                        D.simulate(
                            p, bandwidth=bandwidth, flops=flops, latency=latency, backward=False
                        ),
                        3,
                    ),
                    "efficiency_fwd_bwd": round(
                        D.simulate(p, bandwidth=bandwidth, flops=flops, latency=latency), 3
                    ),
                    "ring_flash_attention_published_fwd_bwd": 0.90,
                }
            )
    return rows


def _torch_cp(rank: int, world: int) -> str:
    """What torch's context_parallel does with causal SDPA on gloo/CPU."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.experimental import context_parallel

    mesh = init_device_mesh("cpu", (world,))
    q, k, v = (torch.randn(1, 2, 64, 16) for _ in range(3))
    try:
        with context_parallel(mesh, buffers=[q, k, v], buffer_seq_dims=[2, 2, 2]):
            torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return "ran"
    except Exception as e:  # the outcome is the report
        return f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"


def main(argv: list[str] | None = None) -> int:
    p = script_parser(__doc__)
    p.add_argument("--smoke", action="store_true", help="tiny sizes, one repeat (CI)")
    p.add_argument("--reps", type=int_in(1), default=2)
    p.add_argument("--skip-measured", action="store_true")
    args = parse_smoke(p, argv, {"reps": 1})  # --reps beside --smoke: refused
    if args.smoke:
        runs, reps, sim_n, worlds = (
            [("causal", 512, 2, 64), ("window", 1024, 2, 64)],
            args.reps,
            8192,
            [8, 32],
        )
    else:
        runs, reps, sim_n, worlds = (
            [("causal", 16384, 2, 512), ("window", 65536, 2, 512)],
            args.reps,
            1 << 20,
            [8, 16, 32, 64],
        )
    if not args.skip_measured:
        for case, n, world, window in runs:
            print(json.dumps(measured(case, n, world, window, reps)), flush=True)
    for row in simulated(sim_n, bandwidth=50e9, flops=100e12, worlds=worlds):
        print(json.dumps(row), flush=True)
    try:  # torch's outcome is the report, a hang included: it must not stop the benchmark
        outcome = run_local(_torch_cp, 2, timeout=120)[0]
    except (TimeoutError, RuntimeError) as e:
        outcome = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
    print(
        json.dumps({"bench": "distributed", "kind": "torch_context_parallel", "outcome": outcome})
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
