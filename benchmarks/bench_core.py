"""Core attention benchmark: attnlab engines against torch SDPA, measured in the same run.

Prints one JSON line per (case, engine, mode) with attnlab's time, the anchor's time
(torch SDPA with the mask as a dense tensor, or ``is_causal`` for plain causal) and the
ratio ``anchor / ours`` (> 1 means attnlab is faster).

    python benchmarks/bench_core.py                 # the full table (fp32, B=1, H=8, E=64)
    python benchmarks/bench_core.py --smoke         # tiny sizes, for CI
    python benchmarks/bench_core.py --n 4096 --cases window,alibi --engines auto,reference
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

import attnlab
from attnlab import bias as B
from attnlab import masks as M

Case = tuple[M.Mask | None, B.Bias | None]


def make_case(name: str, n: int, heads: int) -> Case:
    """The mask and bias of a named benchmark case at length ``n``."""
    gen = torch.Generator().manual_seed(0)
    if name == "dense":
        return None, None
    if name == "causal":
        return M.causal(), None
    if name == "window":
        return M.causal() & M.window(min(256, n)), None
    if name == "documents":
        cuts = torch.randperm(n - 1, generator=gen)[:15].add(1).sort().values
        ids = torch.zeros(n, dtype=torch.long)
        ids[cuts] = 1
        return M.documents(ids.cumsum(0)), None
    if name == "alibi":
        return M.causal(), B.alibi(heads)
    raise ValueError(f"unknown case {name!r}; expected dense, causal, window, documents, alibi")


def timeit(fn: Callable[[], object], repeat: int) -> float:
    """Median wall time of ``fn`` in milliseconds, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def anchor_fn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, case: Case) -> torch.Tensor:
    """torch SDPA with the case's mask and bias as a dense tensor (is_causal when it can)."""
    mask, bias = case
    n = q.shape[2]
    if isinstance(mask, type(M.causal())) and bias is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    attn = None if mask is None else mask.dense(n, n)
    if bias is not None:
        b = bias.dense(n, n, heads=q.shape[1])
        attn = b if attn is None else b.masked_fill(~attn, float("-inf"))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn)


def run_one(
    case_name: str, engine: str, mode: str, n: int, heads: int, dim: int, repeat: int
) -> dict[str, object]:
    """Time attnlab and the anchor on one case; returns the JSON record."""
    case = make_case(case_name, n, heads)
    q, k, v = (torch.randn(1, heads, n, dim, requires_grad=mode == "fwd+bwd") for _ in range(3))

    def ours() -> None:
        out = attnlab.attention(q, k, v, mask=case[0], bias=case[1], engine=engine)
        if mode == "fwd+bwd":
            torch.autograd.backward(out, torch.ones_like(out))

    def anchor() -> None:
        out = anchor_fn(q, k, v, case)
        if mode == "fwd+bwd":
            out.backward(torch.ones_like(out))

    with torch.set_grad_enabled(mode == "fwd+bwd"):
        t_anchor, t_ours = timeit(anchor, repeat), timeit(ours, repeat)
    return {
        "case": case_name,
        "engine": engine,
        "mode": mode,
        "n": n,
        "heads": heads,
        "dim": dim,
        "ours_ms": round(t_ours, 3),
        "sdpa_ms": round(t_anchor, 3),
        "speedup_vs_sdpa": round(t_anchor / t_ours, 3),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny sizes, one repeat (CI)")
    p.add_argument("--n", type=int, default=4096)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--cases", default="dense,causal,window,documents,alibi")
    p.add_argument("--engines", default="auto")
    p.add_argument("--modes", default="fwd,fwd+bwd")
    a = p.parse_args(argv)
    if a.smoke:
        a.n, a.heads, a.repeat = 128, 2, 1
    torch.manual_seed(0)
    for case in a.cases.split(","):
        for engine in a.engines.split(","):
            for mode in a.modes.split(","):
                rec = run_one(case, engine, mode, a.n, a.heads, a.dim, a.repeat)
                print(json.dumps(rec), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
