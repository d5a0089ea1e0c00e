"""Work skipping under masks with no exact key interval per row: block layout, blocked
plan (first call, and again for the same mask object) and one blocked forward, as JSON
lines. A dilated window, ``window & block_random`` and ``window | global_tokens`` were
planned over every (query, key) pair on every call (33-43 s at 32768 for 1.9% of tiles).

python benchmarks/bench_layouts.py --ns 4096,32768
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable

import torch

import attnlab
from attnlab import masks
from attnlab._request import build_request
from attnlab.engines import get_engine

CASES: dict[str, Callable[[], masks.Mask]] = {
    "dilated(256,2)": lambda: masks.dilated(256, 2),
    "window(256)&block_random(64,3)": lambda: masks.window(256) & masks.block_random(64, 3),
    "window(256,256)|global_tokens([0])": lambda: masks.window(256, 256) | masks.global_tokens([0]),
}


def sizes(text: str) -> list[int]:
    """``--ns``: comma-separated positive sequence lengths."""
    try:
        ns = [int(x) for x in text.split(",")]
    except ValueError:
        ns = []
    if not ns or min(ns) < 1:
        raise argparse.ArgumentTypeError(f"--ns wants positive ints like 4096,8192, got {text!r}")
    return ns


def seconds(f: Callable[[], object]) -> float:
    """Wall time of one call of ``f``."""
    t = time.perf_counter()
    f()
    return time.perf_counter() - t


def run(n: int, name: str, heads: int, forward: bool) -> dict[str, object]:
    """One case at ``n`` queries and keys: layout, plans and (optionally) a forward."""
    m, q = CASES[name](), torch.randn(1, heads, n, 64)
    engine = get_engine("blocked")
    req = lambda: build_request(q, q, q, m, None, None, "dot", "softmax", 0.0, False, False)  # noqa: E731
    row: dict[str, object] = {"case": name, "n": n, "heads": heads}
    row["layout_s"] = seconds(lambda: m.block_layout(n, n, 128, 128))
    row["plan_s"] = seconds(lambda: engine.plan(req()))
    row["plan_again_s"] = seconds(lambda: engine.plan(req()))
    row["computed_fraction"] = engine.plan(req()).computed_fraction
    if forward:  # the first call picks and plans (auto's choice too), the second reuses
        call = lambda: attnlab.attention(q, q, q, mask=m)  # noqa: E731
        row["attention_s"], row["attention_again_s"] = seconds(call), seconds(call)
    return row


def main() -> None:
    """Parse the arguments and print one JSON line per case and size."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ns", type=sizes, default=[4096, 16384])
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--no-forward", action="store_true", help="time layouts and plans only")
    args = p.parse_args()
    torch.set_num_threads(1)
    cap = torch.backends.cpu.get_cpu_capability()
    for n in args.ns:
        for name in CASES:
            row = run(n, name, args.heads, not args.no_forward)
            print(json.dumps({"cpu": cap, **row}), flush=True)


if __name__ == "__main__":
    main()
