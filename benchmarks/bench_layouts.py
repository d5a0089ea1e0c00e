"""Work skipping under masks with no exact key interval per row: block layout, blocked
plan (first call, and again for the same mask object) and one blocked forward, as JSON
lines, beside torch SDPA with the same mask made dense (the anchor). A dilated window,
``window & block_random`` and ``window | global_tokens`` were planned over every (query,
key) pair on every call (33-43 s at 32768 for 1.9% of tiles).

python benchmarks/bench_layouts.py --ns 4096,16384
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

import attnlab
from attnlab import masks
from attnlab._request import build_request
from attnlab.cli._args import ints_in, parse_smoke, script_parser
from attnlab.engines import get_engine

CASES: dict[str, Callable[[], masks.Mask]] = {
    "dilated(256,2)": lambda: masks.dilated(256, 2),
    "window(256)&block_random(64,3)": lambda: masks.window(256) & masks.block_random(64, 3),
    "window(256,256)|global_tokens([0])": lambda: masks.window(256, 256) | masks.global_tokens([0]),
}


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
        dense = m.dense(n, n)  # (the anchor's mask, made once, outside its time)
        anchor = lambda: F.scaled_dot_product_attention(q, q, q, attn_mask=dense)  # noqa: E731
        seconds(anchor)  # a warm-up, as the second attnlab call is
        row["sdpa_dense_s"] = seconds(anchor)
    return row


def main(argv: list[str] | None = None) -> int:
    """Parse the arguments and print one JSON line per case and size."""
    p = script_parser(__doc__)
    p.add_argument("--ns", type=ints_in(1, 2**20), default=(4096, 16384), help="lengths")
    p.add_argument("--heads", type=ints_in(1, 64), default=(4,), help="query heads")
    p.add_argument("--no-forward", action="store_true", help="time layouts and plans only")
    p.add_argument("--smoke", action="store_true", help="tiny sizes (CI)")
    args = parse_smoke(p, argv, {"ns": (512,), "heads": (1,)})
    torch.set_num_threads(1)
    cap = torch.backends.cpu.get_cpu_capability()
    for n in args.ns:
        for name in CASES:
            row = run(n, name, args.heads[0], not args.no_forward)
            print(json.dumps({"cpu": cap, **row}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
