"""Timing helpers of the benchmarks (:mod:`attnlab.bench` re-exports them, and
``benchmarks/*.py`` import them from there): medians of wall time, calls interleaved so
that machine noise hits every contender alike, a CUDA sync around each timed call, and
the matmul throughput that efficiency figures divide by.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["interleaved_ms", "matmul_gflops", "synced", "timeit"]


def timeit(fn: Callable[[], object], repeat: int) -> float:
    """Median wall time of ``fn`` in milliseconds, after one warm-up call.

    Example:
        >>> calls = []
        >>> ms = timeit(lambda: (calls.append(1), time.sleep(0.005)), repeat=3)
        >>> len(calls), 5 <= ms < 500  # the warm-up and 3 timed calls; each sleeps 5 ms
        (4, True)
    """
    fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def interleaved_ms(fns: dict[str, Callable[[], object]], repeat: int) -> dict[str, float]:
    """Median ms of each fn after one warm-up, calls alternating so that machine noise
    hits every fn alike (benchmarks compare ratios measured this way).

    Example:
        >>> order = []
        >>> slow = lambda: time.sleep(0.002) or order.append("b")  # 2 ms
        >>> ms = interleaved_ms({"a": lambda: order.append("a"), "b": slow}, repeat=2)
        >>> "".join(order), ms["b"] > ms["a"]  # warm-ups, then a and b in turn
        ('ababab', True)
    """
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(1e3 * (time.perf_counter() - t0))
    return {name: statistics.median(ts) for name, ts in times.items()}


def synced(fn: Callable[[], Any], device: str) -> Callable[[], Any]:
    """``fn`` followed by ``torch.cuda.synchronize()`` on a CUDA ``device`` (so a timer
    around it sees the kernels' time, not their launch), else ``fn`` itself."""
    if torch.device(device).type != "cuda":
        return fn

    def call() -> Any:
        out = fn()
        torch.cuda.synchronize(device)
        return out

    return call


def matmul_gflops(
    size: int = 2048,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    *,
    budget_s: float = 2.0,
) -> float:
    """Matmul throughput of this device now, in ``dtype`` (the roofline of the efficiency
    figure), measured on square matrices of at most ``size``.

    The size doubles from 128 while the timing at the next size fits in ``budget_s``
    seconds, so a dtype this device runs slowly (bfloat16 on many CPUs: a 2048 matmul
    takes over 10 s) is measured on smaller matrices in seconds, not minutes.

    Example:
        >>> matmul_gflops(256, budget_s=0.1) > 0
        True
    """
    n = min(size, 128)
    ms = _matmul_ms(n, device, dtype)
    while 2 * n <= size and 4 * 8 * ms / 1e3 <= budget_s:  # 4 calls at 2n, each ~8x longer
        n *= 2
        ms = _matmul_ms(n, device, dtype)
    return 2 * n**3 / ms / 1e6


def _matmul_ms(n: int, device: str, dtype: torch.dtype) -> float:
    """Median ms of an ``(n, n) @ (n, n)`` matmul (three calls after a warm-up)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    return timeit(synced(lambda: a @ a, device), 3)
