"""Approximate attention against exact attention, in the shape of LRA's speed/memory table.

For each length N, forward+backward of one attention call on ``(B, H, N, E)`` fp32
inputs (default B=1, H=8, E=64; non-causal, the encoder setting of LRA):

* ``exact``: ``attnlab.attention`` with ``engine="auto"`` (torch SDPA's flash kernel);
* ``dense``: the ``"reference"`` engine, which materializes the ``N x N`` weights as LRA's
  vanilla Transformer does (up to ``--dense-max``; its memory is LRA's 9.48 GB column);
* ``linear``: the ``"linear"`` engine (elu + 1 features);
* ``performer``: the ``"performer"`` engine, 256 random features;
* ``nystrom``: the ``"nystrom"`` engine, 256 landmarks, 6 pseudo-inverse iterations;
* ``linformer``: :func:`attnlab.nn.linformer.linformer_attention` with learned
  ``(256, N)`` projections (their gradients included) and exact attention over them.

Times are medians of ``--repeat`` calls after a warm-up, the methods interleaved so that
machine noise hits all alike; ``speedup`` is exact's time over the method's at the same N.
Peak memory is the growth of the resident set (Linux ``VmHWM`` after resetting it through
``/proc/self/clear_refs``, minus ``VmRSS`` before) over one forward+backward, in a fresh
process per method and N, inputs already allocated. Each method's ``exponent`` is the
least-squares slope of log(time) against log(N). One JSON line per (method, N), then one
summary line per method with the exponent, the speedups at 4K and 16K and the relative
output error against fp64 exact attention at N=1024 (or the largest N, if 1024 is not
measured) on the same random inputs; the exponent is null with fewer than two N.
``--threads 1`` keeps a shared machine's other jobs from stalling torch's thread pool.

python benchmarks/bench_approx.py            # N = 1K ... 16K (exact at 16K takes minutes)
python benchmarks/bench_approx.py --smoke    # tiny sizes, for CI
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

import attnlab
from attnlab.bench import interleaved_ms
from attnlab.cli._args import int_in, ints_in, names_in, parse_smoke, script_parser
from attnlab.nn.linformer import linformer_attention

METHODS = ("exact", "dense", "linear", "performer", "nystrom", "linformer")
OPTIONS: dict[str, dict[str, object]] = {
    "performer": {"num_features": 256, "seed": 0},
    "nystrom": {"num_landmarks": 256, "pinv_iterations": 6},
}
PROJ_DIM = 256


def make_step(method: str, n: int, heads: int, dim: int) -> Callable[[], None]:
    """One forward+backward of ``method`` on fresh random ``(1, heads, n, dim)`` inputs."""
    q, k, v = (torch.randn(1, heads, n, dim, requires_grad=True) for _ in range(3))
    projs = [torch.randn(PROJ_DIM, n).div(math.sqrt(PROJ_DIM)).requires_grad_() for _ in "kv"]

    def forward() -> Tensor:
        if method == "linformer":
            out = linformer_attention(q, k, v, projs[0], projs[1])
        elif method == "exact":
            out = attnlab.attention(q, k, v)
        elif method == "dense":
            out = attnlab.attention(q, k, v, engine="reference")
        else:
            out = attnlab.attention(q, k, v, engine=method, engine_options=OPTIONS.get(method))
        assert isinstance(out, Tensor)
        return out

    def step() -> None:
        out = forward()
        out.backward(torch.ones_like(out))

    return step


def _rss_kib(field: str) -> int:
    status = Path("/proc/self/status").read_text()
    match = re.search(rf"{field}:\s+(\d+)", status)
    return int(match.group(1)) if match else 0


def probe(methods: list[str], n: int, heads: int, dim: int) -> dict[str, float]:
    """Peak extra resident memory (MiB) of one forward+backward of each method."""
    peaks = {}
    for method in methods:
        make_step(method, 64, heads, dim)()  # one-time allocations (thread pools, caches)
        step = make_step(method, n, heads, dim)
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        base = _rss_kib("VmRSS")
        step()
        peaks[method] = (_rss_kib("VmHWM") - base) / 1024
        del step
    return peaks


def peak_memory(methods: list[str], n: int, args: argparse.Namespace) -> dict[str, float]:
    """:func:`probe` in fresh processes (one per method, or one for all with --smoke)."""
    groups = [methods] if args.smoke else [[m] for m in methods]
    peaks: dict[str, float] = {}
    for group in groups:
        cmd = [sys.executable, __file__, "--probe", str(n), "--heads", str(args.heads)]
        cmd += ["--dim", str(args.dim), "--methods", ",".join(group)]
        cmd += ["--threads", str(args.threads)]
        res = subprocess.run(cmd, capture_output=True, text=True, check=True)
        peaks.update(json.loads(res.stdout.strip().splitlines()[-1]))
    return peaks


def relative_error(method: str, n: int, heads: int, dim: int) -> float | None:
    """Relative Frobenius error of the method's output against fp64 exact attention (None
    for Linformer, whose untrained projections say little; JSON has no NaN)."""
    torch.manual_seed(1)
    q, k, v = (torch.randn(1, heads, n, dim) for _ in range(3))
    if method in ("exact", "dense"):
        engine, opts = "auto", None
    elif method == "linformer":  # learned projections: untrained ones say little
        return None
    else:
        engine, opts = method, OPTIONS.get(method)
    err = attnlab.approximation_error(q, k, v, engine=engine, engine_options=opts)
    return round(err["relative_fro"], 4)


def exponent(points: list[tuple[int, float]]) -> float | None:
    """Least-squares slope of log(ms) against log(n) over ``(n, ms)`` points (None with
    fewer than 2 distinct N: no slope to fit)."""
    if len({n for n, _ in points}) < 2:
        return None
    x = [math.log(n) for n, _ in points]
    y = [math.log(t) for _, t in points]
    mx, my = statistics.fmean(x), statistics.fmean(y)
    return sum((a - mx) * (b - my) for a, b in zip(x, y, strict=True)) / sum(
        (a - mx) ** 2 for a in x
    )


def run(args: argparse.Namespace) -> None:
    """Time and probe every (method, N), print a JSON line each, then the summaries."""
    all_methods, ns = list(args.methods), list(args.ns)
    times: dict[str, dict[int, float]] = {m: {} for m in all_methods}
    for n in ns:
        methods = [m for m in all_methods if m != "dense" or n <= args.dense_max]
        torch.manual_seed(0)
        steps = {m: make_step(m, n, args.heads, args.dim) for m in methods}
        ms = interleaved_ms(steps, args.repeat)
        del steps
        mem = peak_memory(methods, n, args) if not args.smoke or n == ns[-1] else {}
        for m in methods:
            times[m][n] = ms[m]
            rec = {"bench": "approx", "method": m, "n": n, "heads": args.heads}
            rec |= {"dim": args.dim, "ms": round(ms[m], 2)}
            rec |= {"speedup": round(ms["exact"] / ms[m], 2) if "exact" in ms else None}
            rec |= {"peak_mib": round(mem[m], 1) if m in mem else None}
            rec |= {
                "threads": torch.get_num_threads(),
                "cpu": torch.backends.cpu.get_cpu_capability(),
            }
            print(json.dumps(rec), flush=True)
    err_n = 1024 if 1024 in ns else max(ns)
    for m in all_methods:
        print(json.dumps(_summary(m, err_n, times, args)), flush=True)


def _summary(
    m: str, err_n: int, times: dict[str, dict[int, float]], args: argparse.Namespace
) -> dict[str, object]:
    """The method's fitted exponent (None with fewer than 2 N), its speedups at 4K and 16K
    and its error at ``err_n`` (1K where measured, else the largest N)."""
    rec: dict[str, object] = {
        "bench": "approx_summary",
        "method": m,
        "cpu": torch.backends.cpu.get_cpu_capability(),
    }
    slope = exponent(sorted(times[m].items()))
    rec["exponent"] = None if slope is None else round(slope, 3)
    for n, label in ((4096, "speedup_4k"), (16384, "speedup_16k")):
        if n in times[m] and n in times.get("exact", {}) and m != "dense":
            rec[label] = round(times["exact"][n] / times[m][n], 2)
    rec[f"rel_err_{err_n}"] = relative_error(m, err_n, args.heads, args.dim)
    return rec


def main(argv: list[str] | None = None) -> int:
    p = script_parser(__doc__)
    ns = "1024,2048,4096,8192,16384"
    p.add_argument("--ns", type=ints_in(1), default=ns, help="comma list of N")
    p.add_argument(
        "--methods",
        type=names_in(METHODS),
        default=",".join(METHODS),
        help=f"comma list of {METHODS}",
    )
    p.add_argument("--heads", type=int_in(1), default=8)
    p.add_argument("--dim", type=int_in(1), default=64)
    p.add_argument("--repeat", type=int_in(1), default=3)
    p.add_argument("--dense-max", type=int_in(0), default=4096, help="largest N of 'dense'")
    p.add_argument(
        "--threads", type=int_in(0), default=0, help="torch threads (0: torch's default)"
    )
    p.add_argument("--smoke", action="store_true", help="tiny sizes, one repeat (CI)")
    p.add_argument("--probe", type=int_in(0), default=0, help=argparse.SUPPRESS)
    args = parse_smoke(p, argv, {"ns": (128, 256), "heads": 2, "repeat": 1})
    if args.smoke:
        args.threads = args.threads or 1
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.probe:
        peaks = probe(list(args.methods), args.probe, args.heads, args.dim)
        print(json.dumps(peaks))
        return 0
    run(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
