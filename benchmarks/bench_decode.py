"""One decoding step's attention against a KV cache: ``attnlab.attention`` (``auto``, which
picks the blocked engine's compiled decoding kernel for these calls) against torch's SDPA,
in the same run. JSON lines with the anchor's time beside ours, ``ratio = sdpa / attnlab``
(> 1: attnlab is faster).

Grouped-query heads as in Llama-style models (8 query heads, 2 key/value heads, head size
64, float32, batch 1). Each step reads a cache that was just written, as a transformers
cache is (``torch.cat`` of the old cache and the new key), so the keys come from memory
rather than from a warm cache. Cases: no mask at several cache lengths (``dense``), and a
sliding window of 512 keys over the cache (``window``: SDPA takes the window as a dense
boolean row mask; attnlab reads only the window's keys).

python benchmarks/bench_decode.py               # cache lengths 512 .. 32768
python benchmarks/bench_decode.py --smoke       # small sizes, for CI
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

import attnlab
from attnlab import masks as M
from attnlab.cli._args import int_in, parse_smoke, script_parser

HEADS, KV_HEADS, DIM = 8, 2, 64


def step_us(fn: Callable[[Tensor, Tensor], object], lk: int, steps: int) -> float:
    """Mean microseconds of ``fn(k, v)`` over ``steps`` fresh caches of ``lk`` keys (the
    concatenation itself not timed)."""
    old = [torch.randn(1, KV_HEADS, lk - 1, DIM) for _ in range(4)]
    new = torch.randn(1, KV_HEADS, 1, DIM)
    total = 0.0
    for i in range(steps + 2):
        k = torch.cat([old[i % 4], new], 2)
        v = torch.cat([old[(i + 1) % 4], new], 2)
        t0 = time.perf_counter()
        fn(k, v)
        if i >= 2:  # two warm-up steps
            total += time.perf_counter() - t0
    return total / steps * 1e6


def case_rows(lk: int, window: int | None, steps: int, rounds: int) -> dict:
    """Best mean step time of each side over alternating rounds."""
    q = torch.randn(1, HEADS, 1, DIM)
    mask = None if window is None else M.window(window - 1)
    if window is None:
        sdpa_mask = None
    else:  # the row's allowed keys, the last `window` of the cache
        sdpa_mask = torch.zeros(1, 1, 1, lk, dtype=torch.bool)
        sdpa_mask[..., -window:] = True

    def ours(k: Tensor, v: Tensor) -> object:
        return attnlab.attention(q, k, v, mask=mask)

    def anchor(k: Tensor, v: Tensor) -> object:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=sdpa_mask, enable_gqa=True)

    best = {"sdpa": float("inf"), "attnlab": float("inf")}
    with torch.no_grad():
        for _ in range(rounds):
            for name, fn in (("sdpa", anchor), ("attnlab", ours)):
                best[name] = min(best[name], step_us(fn, lk, steps))
    return {
        "bench": "decode",
        "case": "dense" if window is None else "window",
        "lk": lk,
        "window": window,
        "heads": HEADS,
        "kv_heads": KV_HEADS,
        "anchor": "sdpa",
        "anchor_us": round(best["sdpa"], 1),
        "attnlab_us": round(best["attnlab"], 1),
        "ratio": round(best["sdpa"] / best["attnlab"], 3),
        "threads": torch.get_num_threads(),
        "cpu": torch.backends.cpu.get_cpu_capability(),
    }


def main() -> None:
    parser = script_parser(__doc__)
    parser.add_argument("--smoke", action="store_true", help="small sizes, one round each")
    parser.add_argument("--lengths", type=int_in(1), nargs="+", default=[512, 2048, 8192, 32768])
    parser.add_argument("--window", type=int_in(1), default=512, help="keys of the window case")
    parser.add_argument("--steps", type=int_in(1), default=100, help="decoding steps per round")
    parser.add_argument("--rounds", type=int_in(1), default=3, help="alternating rounds")
    smoke = {"lengths": [64, 256], "window": 32, "steps": 3, "rounds": 1}
    args = parse_smoke(parser, None, smoke)
    for lk in args.lengths:
        print(json.dumps(case_rows(lk, None, args.steps, args.rounds)), flush=True)
    for lk in args.lengths:
        if lk > args.window:
            print(json.dumps(case_rows(lk, args.window, args.steps, args.rounds)), flush=True)


if __name__ == "__main__":
    main()
