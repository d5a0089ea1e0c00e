"""What ``engine="auto"`` picks, against every exact engine that can compute the same call.

Each case is one call (forward, or forward and backward where ``mode`` says so) timed with
``engine="auto"`` and with each exact engine that accepts it (``reference``, ``sdpa``,
``blocked``), alternating, best of ``--repeat`` runs each, each timed run right after an
untimed one of the same engine (a fixed cycle timed ``blocked`` after ``sdpa`` and
``reference`` had filled the caches: 0.87 ms named against 0.49 ms as ``auto``'s pick,
the same kernel call). One JSON line per case:
``auto`` (the engine it picked), ``ms`` per engine, ``anchor`` (the fastest other engine)
and ``ratio = anchor / auto`` (about 1 or more: ``auto`` picked the fastest; below 1 it
left speed on the table). The cases are the calls whose pick the rules of
:mod:`attnlab.engines.blocked_choice` decide: ALiBi with dense masks, what SDPA cannot
compute (``return_lse``, weights), a few query rows against a long windowed cache,
half-precision decoding steps, and controls that stay with SDPA or the reference engine.

python benchmarks/bench_auto.py            # every case
python benchmarks/bench_auto.py --smoke    # small sizes, one run each, for CI
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

import attnlab
from attnlab import bias as B
from attnlab import masks as M
from attnlab.cli._args import int_in, parse_smoke, script_parser
from attnlab.engines import get_engine, select_engine
from attnlab.functional import _request

ENGINES = ("reference", "sdpa", "blocked")


@dataclass(frozen=True)
class Case:
    name: str
    lq: int
    lk: int
    mask: str = "none"
    bias: str = "none"
    dtype: str = "float32"
    heads: tuple[int, int] = (8, 8)  # query heads, key/value heads
    lse: bool = False
    weights: bool = False
    backward: bool = False


CASES = (
    Case("alibi_padding", 1024, 1024, "pad70", "alibi"),
    Case("alibi_padding", 1024, 1024, "pad70", "alibi", backward=True),
    Case("alibi_dense", 1024, 1024, "none", "alibi"),
    Case("alibi_prefix_bf16", 2048, 2048, "prefix", "alibi", "bfloat16"),
    Case("alibi_few_rows", 64, 4096, "none", "alibi"),
    Case("lse_causal", 256, 256, "causal", lse=True),
    Case("lse_causal", 256, 256, "causal", lse=True, backward=True),
    Case("weights_causal", 1024, 1024, "causal", weights=True),
    Case("weights_dense", 2048, 2048, "none", weights=True),
    Case("few_rows_window", 16, 4096, "cwin128", heads=(32, 8)),
    Case("few_rows_window_alibi", 1, 4096, "cwin128", "alibi", heads=(32, 8)),
    Case("decode_window_bf16", 1, 32768, "cwin128", dtype="bfloat16", heads=(8, 2)),
    Case("decode_window_fp16", 1, 32768, "cwin128", dtype="float16", heads=(8, 2)),
    Case("t5_padding", 1024, 1024, "pad70", "t5"),
    Case("padding", 2048, 2048, "pad70", heads=(4, 4)),
    Case("padding", 1024, 1024, "pad70", backward=True),
    Case("causal_gqa", 1024, 1024, "causal", heads=(8, 2), backward=True),
    Case("documents_bf16", 256, 256, "docs4", dtype="bfloat16", backward=True),
    Case("one_row_window_fp16", 1, 2048, "cwin64", dtype="float16", heads=(8, 2)),
    Case("one_row_window_bf16", 1, 2048, "cwin64", dtype="bfloat16", heads=(8, 2)),
    Case("few_rows_window_bf16", 2, 2048, "cwin128", dtype="bfloat16"),
    Case("decode_gqa_bf16", 1, 32768, dtype="bfloat16", heads=(8, 2)),
    Case("decode_gqa_fp16", 1, 32768, dtype="float16", heads=(8, 2)),
    Case("causal", 2048, 2048, "causal"),  # sdpa with AMX in bfloat16, AVX2 from 4096
    Case("causal_bf16", 2048, 2048, "causal", dtype="bfloat16"),
    Case("dense_fp16", 1024, 1024, "none", dtype="float16"),
    Case("dense_fp16", 1024, 1024, "none", dtype="float16", backward=True),
    # picks that follow the CPU: blocked, but SDPA where it runs bfloat16 on AMX tiles
    # (causal with a gradient from 1024, padding over 60% of the tiles, one-head-per-head
    # decoding over every key) or oneDNN has float16 and torch runs AVX2 (causal_fp16)
    Case("causal_fp16", 2048, 2048, "causal", dtype="float16"),
    Case("causal_bf16", 2048, 2048, "causal", dtype="bfloat16", backward=True),
    Case("padding_bf16", 2048, 2048, "pad70", dtype="bfloat16"),
    Case("decode_bf16", 1, 4096, "causal", dtype="bfloat16"),
    # controls: SDPA or the reference engine stays the pick
    Case("dense", 2048, 2048, "none"),
    Case("t5_padding", 1024, 1024, "pad70", "t5", backward=True),
    Case("decode_8_rows_bf16", 8, 4096, "causal", dtype="bfloat16"),  # a tie: sdpa
    Case("weights_dense_small", 256, 256, "none", weights=True),
)


def _mask(name: str, lk: int) -> M.Mask | None:
    return {
        "none": None,
        "causal": M.causal(),
        "cwin128": M.causal() & M.window(128),
        "cwin64": M.causal() & M.window(64),
        "pad70": M.padding([lk * 7 // 10]),
        "prefix": M.prefix(lk // 2),
        "docs4": M.documents(torch.arange(lk) * 4 // lk),
    }[name]


def _call(case: Case, scale: int) -> tuple[tuple, dict]:
    """``(q, k, v)`` and the keyword arguments of ``case`` at ``1 / scale`` of its length."""
    torch.manual_seed(0)
    lq, lk = max(1, case.lq // scale), max(16, case.lk // scale)
    dt = getattr(torch, case.dtype)
    hq, hkv = case.heads
    q = torch.randn(1, hq, lq, 64, dtype=dt, requires_grad=case.backward)
    k, v = (torch.randn(1, hkv, lk, 64, dtype=dt, requires_grad=case.backward) for _ in "kv")
    bias = {"none": None, "alibi": B.alibi(hq), "t5": B.relative_buckets(hq)}[case.bias]
    kw = dict(mask=_mask(case.mask, lk), bias=bias, return_lse=case.lse)
    return (q, k, v), dict(kw, return_weights=case.weights)


def _runner(qkv: tuple, kw: dict, engine: str, backward: bool) -> Callable[[], None]:
    def run() -> None:
        res = attnlab.attention(*qkv, **kw, engine=engine)
        out = res if isinstance(res, torch.Tensor) else res.out
        if backward:
            out.sum().backward()
            for t in qkv:
                t.grad = None

    return run


def _able(qkv: tuple, kw: dict) -> tuple[str, list[str]]:
    req = _request(*qkv, kw["mask"], kw["bias"], None, "dot", "softmax", 0.0,
                   kw["return_weights"], kw["return_lse"])  # fmt: skip
    able = [name for name in ENGINES if get_engine(name).unsupported(req) is None]
    return select_engine("auto", req).name, able


def run_case(case: Case, scale: int, repeat: int) -> dict:
    qkv, kw = _call(case, scale)
    with torch.set_grad_enabled(case.backward):
        picked, able = _able(qkv, kw)
        fns = {e: _runner(qkv, kw, e, case.backward) for e in ["auto", *able]}
        best = {e: float("inf") for e in fns}
        for e in fns:
            fns[e]()  # warm-up
        for r in range(repeat):
            names = list(fns)[r % len(fns) :] + list(fns)[: r % len(fns)]
            for e in names:
                fns[e]()  # untimed: each engine timed after its own call
                t0 = time.perf_counter()
                fns[e]()
                best[e] = min(best[e], time.perf_counter() - t0)
    ms = {e: round(t * 1e3, 3) for e, t in best.items()}
    anchor = min((e for e in able if e != picked), key=lambda e: ms[e], default=picked)
    return {
        "bench": "auto",
        "case": case.name,
        "mode": "fwd+bwd" if case.backward else "fwd",
        "lq": qkv[0].shape[2],
        "lk": qkv[1].shape[2],
        "dtype": case.dtype,
        "auto": picked,
        "ms": ms,
        "anchor": anchor,
        "ratio": round(ms[anchor] / max(ms["auto"], 1e-6), 3),
        "cpu": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
    }


def main() -> None:
    ap = script_parser(__doc__)
    ap.add_argument("--smoke", action="store_true", help="1/8 of the lengths, one run each")
    ap.add_argument(
        "--repeat", type=int_in(1), default=7, help="timed runs per engine (best counts)"
    )
    args = parse_smoke(ap, None, {"repeat": 1})  # --repeat beside --smoke: refused
    scale, repeat = (8, args.repeat) if args.smoke else (1, args.repeat)
    for case in CASES:
        print(json.dumps(run_case(case, scale, repeat)), flush=True)


if __name__ == "__main__":
    main()
