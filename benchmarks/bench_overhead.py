"""Per-call host overhead of ``attnlab.attention`` on small calls, where Python decides the
time (1x8x16x16 float32, no mask, causal, key padding, one decoding row): torch's SDPA on the
same inputs timed in the same run beside it. JSON lines.

python benchmarks/bench_overhead.py            # best of 5 rounds of 300 calls per case
python benchmarks/bench_overhead.py --smoke    # a few calls, for CI
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F

import attnlab
from attnlab import masks as M
from attnlab.cli._args import int_in, parse_smoke, script_parser


def per_call_us(fn: Callable[[], object], calls: int, rounds: int) -> float:
    """Best mean microseconds of ``fn()`` over ``rounds`` rounds of ``calls`` calls, after
    ``calls`` calls not timed."""
    best = float("inf")
    for _ in range(calls):
        fn()
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - t0) / calls * 1e6)
    return best


def main() -> None:
    parser = script_parser(__doc__)
    parser.add_argument("--smoke", action="store_true", help="a few calls, one round")
    parser.add_argument("--calls", type=int_in(1), default=300, help="calls per round")
    parser.add_argument("--rounds", type=int_in(1), default=5, help="rounds (best kept)")
    args = parse_smoke(parser, None, {"calls": 3, "rounds": 1})
    q, k, v = torch.randn(3, 1, 8, 16, 16).unbind(0)  # (B, H, L, E) each
    keep = torch.ones(1, 1, 1, 16, dtype=torch.bool)
    keep[..., 13:] = False
    cases = {  # name: (SDPA's call, attnlab's)
        "dense": ({}, {}),
        "causal": ({"is_causal": True}, {"mask": M.causal()}),
        "padding": ({"attn_mask": keep}, {"mask": M.padding(torch.tensor([13]))}),
        "decode": ({}, {"mask": M.causal()}),  # one query row over 16 keys
    }
    call = partial(attnlab.attention, k=k, v=v)
    for name, (theirs, ours) in cases.items():
        qq = q[:, :, -1:] if name == "decode" else q
        sizes = (args.calls, args.rounds)
        bare = partial(F.scaled_dot_product_attention, qq, k, v, **theirs)
        anchor, mine = per_call_us(bare, *sizes), per_call_us(partial(call, qq, **ours), *sizes)
        row = {"bench": "overhead", "case": name, "shape": list(qq.shape), "anchor": "sdpa"}
        row |= {"anchor_us": round(anchor, 1), "attnlab_us": round(mine, 1)}
        print(json.dumps(row | {"cpu": torch.backends.cpu.get_cpu_capability()}), flush=True)


if __name__ == "__main__":
    main()
