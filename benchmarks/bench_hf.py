"""transformers models on the attnlab backend against ``attn_implementation="sdpa"`` / ``"eager"``.

The same tiny-vocabulary random model (nothing downloaded) runs with each attention
implementation in the same process; runs alternate (anchor, attnlab, anchor, ...) and
each side's best run counts. One JSON line per case, with the anchor's time beside ours
and ``ratio = anchor / attnlab`` (> 1: attnlab is faster):

* ``window``: a Mistral-style model (hidden 512, 8 heads, 2 key/value heads, 4 layers,
  sliding window 512) at 8192 tokens, forward and forward+backward, against ``sdpa``
  (targets: ratio >= 3 for both);
* ``memory``: peak resident memory of that forward, each implementation in a fresh
  process (target: attnlab at most a quarter of sdpa's), and of the same model whose
  attention does nothing (its MLPs, norms and projections): ``no_attention_fraction`` is
  the least ``fraction`` any attention could reach, and ``attention_fraction`` compares
  what the two attentions add; with glibc's default allocator and with its mmap
  threshold fixed (``allocator``), which removes the heap's fragmentation from the peak;
  ``second_run_*``: the same for a second forward in the same process;
* ``dense``: a Llama-style model at 2048 tokens, prefill and greedy decoding of 128
  tokens (``generate()`` of 129 tokens minus ``generate()`` of 1), against ``sdpa``
  (targets: within 5% and 10%), best of 7 rounds: these runs are short and noisy;
* ``weights``: ``output_attentions=True`` on the window model at 4096 tokens, against
  ``eager``, the only other implementation that returns weights (target: ratio >= 5);
* ``padded``: greedy decoding of 64 tokens by the Llama-style model for a batch of 4
  left-padded prompts of 1024 tokens (0, 10%, 30% and 70% of them padding), against
  ``sdpa``, which attends through a dense mask (no target of the issue; ``same_tokens``
  says whether both decoded the same tokens), best of 7 rounds;
* ``static``: the same decoding of 64 tokens after one 1024-token prompt into a static
  cache of 8192 slots (``transformers.StaticCache``), against ``sdpa``, which reads every
  slot through a mask (no target of the issue), best of 7 rounds;
* ``softcap``: a Gemma-2-style model (logits soft-capped at 50, local layers of window 512
  between global ones) at 4096 tokens, forward and forward+backward, against ``eager``
  (transformers refuses ``sdpa`` for it) and, forward only with ``--flex``, against
  ``flex_attention`` (compiled; it has no backward on the CPU), and greedy decoding of 64
  tokens after 1024 against ``eager`` (best of 7 rounds); no target of the issue;
* ``bf16``: the Llama-style model in bfloat16, prefill of ``--padded-n`` tokens and greedy
  decoding of ``--new`` tokens after it, against ``sdpa`` (no target of the issue: half
  precision is where torch's CPU SDPA is slow on a decoding step), best of 7 rounds;
* ``sinks``: the same for a gpt-oss-style model (a sink logit per head, local layers of
  window 128 between global ones, 4 experts) against ``eager``, the only other
  implementation transformers runs it with on the CPU (its ``flex_attention`` refuses
  sinks there); no target of the issue.

python benchmarks/bench_hf.py                   # every case at the target sizes
python benchmarks/bench_hf.py --cases window    # one case
python benchmarks/bench_hf.py --smoke           # small sizes, one run each, for CI
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may come from a hub
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch

from attnlab.cli._args import int_in, parse_smoke, script_parser

VOCAB = 512
CASES = ("window", "memory", "dense", "weights", "padded", "static", "softcap", "sinks", "bf16")


def build(kind: str, layers: int, window: int, impl: str) -> torch.nn.Module:
    """The seeded random model of ``kind`` ("window": Mistral-style, "dense": Llama-style,
    "softcap": Gemma-2-style, "sinks": gpt-oss-style)."""
    import transformers as t

    from attnlab.integrations.transformers import register

    register()
    if impl == "none":  # the model's own memory floor: attention returns its queries
        t.AttentionInterface.register(
            "none", lambda m, q, k, v, mask, **kw: (q.transpose(1, 2), None)
        )
        t.masking_utils.AttentionMaskInterface.register("none", lambda **kw: None)
    common = {
        "vocab_size": VOCAB,
        "hidden_size": 512,
        "intermediate_size": 1024,
        "num_hidden_layers": layers,
        "num_attention_heads": 8,
        "num_key_value_heads": 2,
        "max_position_embeddings": 16384,
    }
    torch.manual_seed(0)
    if kind == "window":
        cfg = t.MistralConfig(**common, sliding_window=window)
        return t.AutoModel.from_config(cfg, attn_implementation=impl).eval()
    if kind in ("softcap", "sinks"):
        return _alternating(kind, common, window, impl)
    cfg = t.LlamaConfig(**common)
    return t.AutoModelForCausalLM.from_config(cfg, attn_implementation=impl).eval()


def _alternating(kind: str, common: dict, window: int, impl: str) -> torch.nn.Module:
    """The Gemma-2-style ("softcap") or gpt-oss-style ("sinks") base model: local layers
    of ``window`` between global ones, head size 64."""
    import transformers as t

    common = {**common, "head_dim": 64, "sliding_window": window}
    if kind == "softcap":
        cfg = t.Gemma2Config(**common, attn_logit_softcapping=50.0)
    else:  # its YaRN factor 32 over 4096 positions: no warning about the context length
        common["max_position_embeddings"] = 32 * 4096
        cfg = t.GptOssConfig(**common, num_local_experts=4, num_experts_per_tok=2)
    return t.AutoModelForCausalLM.from_config(cfg, attn_implementation=impl).eval()


def best_times(fns: dict[str, Callable[[], object]], repeat: int) -> dict[str, float]:
    """Best seconds of each fn over ``repeat`` alternating rounds (after one warm-up)."""
    for fn in fns.values():
        fn()
    times = {k: float("inf") for k in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name] = min(times[name], time.perf_counter() - t0)
    return times


def _row(case: str, mode: str, anchor: str, secs: dict[str, float], **extra: object) -> dict:
    a, ours = secs[anchor], secs["attnlab"]
    return {
        "bench": "hf",
        "case": case,
        "mode": mode,
        **extra,
        "anchor": anchor,
        "anchor_s": round(a, 4),
        "attnlab_s": round(ours, 4),
        # a difference of two timings (decoding) at or below 0 is noise, not a speed
        "ratio": round(a / ours, 3) if min(a, ours) > 0 else None,
        "threads": torch.get_num_threads(),
        "cpu": torch.backends.cpu.get_cpu_capability(),
    }


def window_case(args: argparse.Namespace) -> list[dict]:
    """Forward and forward+backward of the window model against sdpa."""
    ids = torch.randint(0, VOCAB, (1, args.n))
    models = {i: build("window", args.layers, args.window, i) for i in ("sdpa", "attnlab")}

    def fwd(m: torch.nn.Module) -> Callable[[], object]:
        def run() -> object:
            with torch.no_grad():
                return m(input_ids=ids, use_cache=False).last_hidden_state

        return run

    def fwd_bwd(m: torch.nn.Module) -> Callable[[], object]:
        def run() -> object:
            m.zero_grad(set_to_none=True)
            out = m(input_ids=ids, use_cache=False).last_hidden_state
            out.square().mean().backward()
            return out

        return run

    size = {"n": args.n, "window": args.window, "layers": args.layers}
    rows = []
    for mode, make in (("fwd", fwd), ("fwd+bwd", fwd_bwd)):
        secs = best_times({k: make(m) for k, m in models.items()}, args.repeat)
        rows.append(_row("window", mode, "sdpa", secs, **size))
    return rows


def memory_case(args: argparse.Namespace) -> list[dict]:
    """Peak resident memory of one forward of the window model above the resident memory
    just before it (Linux ``VmHWM`` reset through ``/proc/self/clear_refs``), each
    implementation in a fresh process: once with glibc's defaults, and once with its mmap
    threshold fixed at 128 KiB (``MALLOC_MMAP_THRESHOLD_``), so that freed activations go
    back to the OS at once and the peak shows what is alive rather than the heap's
    fragmentation. ``--smoke`` measures the second setting only."""
    allocators = ("mmap_128k",) if args.smoke else ("default", "mmap_128k")  # 3 processes each
    return [_memory_row(args, allocator) for allocator in allocators]


_MEMORY_CODE = (
    "import sys, torch; sys.path.insert(0, {here!r}); import bench_hf as b\n"
    "torch.set_num_threads({threads})\n"
    "m = b.build('window', {layers}, {window}, {impl!r})\n"
    "ids = torch.randint(0, b.VOCAB, (1, {n}))\n"
    "def kib(key):\n"
    "    line = next(x for x in open('/proc/self/status') if x.startswith(key))\n"
    "    return int(line.split()[1])\n"
    "for run in range(2):  # the first forward, then a second one (no first-call set-up)\n"
    "    open('/proc/self/clear_refs', 'w').write('5')  # VmHWM := VmRSS (ru_maxrss is\n"
    "    base = kib('VmRSS')  # inherited from the parent process through fork)\n"
    "    with torch.no_grad(): m(input_ids=ids, use_cache=False)\n"
    "    print((kib('VmHWM') - base) / 1024)\n"
)


def _memory_row(args: argparse.Namespace, allocator: str) -> dict:
    """The memory row of one allocator setting: sdpa, attnlab and no attention at all."""
    here = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ)
    if allocator == "mmap_128k":
        env["MALLOC_MMAP_THRESHOLD_"] = "131072"
    mib, warm = {}, {}
    for impl in ("sdpa", "attnlab", "none"):
        sizes = {"layers": args.layers, "window": args.window, "n": args.n}
        src = _MEMORY_CODE.format(here=here, impl=impl, threads=torch.get_num_threads(), **sizes)
        cmd = [sys.executable, "-c", src]
        res = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if res.returncode:
            raise RuntimeError(res.stderr[-2000:])
        mib[impl], warm[impl] = (float(x) for x in res.stdout.strip().splitlines()[-2:])
    return {
        "bench": "hf",
        "case": "memory",
        "mode": "fwd",
        "allocator": allocator,
        "n": args.n,
        "window": args.window,
        "layers": args.layers,
        "anchor": "sdpa",
        "anchor_peak_mib": round(mib["sdpa"], 1),
        "attnlab_peak_mib": round(mib["attnlab"], 1),
        "fraction": round(mib["attnlab"] / max(mib["sdpa"], 1e-3), 3),
        "no_attention_peak_mib": round(mib["none"], 1),  # MLP, norms, projections
        # the least `fraction` any attention could reach: the model without one
        "no_attention_fraction": round(mib["none"] / max(mib["sdpa"], 1e-3), 3),
        "attention_fraction": round(
            (mib["attnlab"] - mib["none"]) / max(mib["sdpa"] - mib["none"], 1e-3), 3
        ),
        # a second forward in the same process: without the first call's set-up
        # (allocator arenas, oneDNN and thread-pool buffers, cached tables)
        "second_run_mib": {k: round(v, 1) for k, v in warm.items()},
        "second_run_fraction": round(warm["attnlab"] / max(warm["sdpa"], 1e-3), 3),
        "cpu": torch.backends.cpu.get_cpu_capability(),
    }


def decode_seconds(
    models: dict[str, torch.nn.Module], ids: torch.Tensor, new: int, repeat: int, **kw: object
) -> tuple[dict[str, float], bool]:
    """Seconds of ``new`` greedy decoding steps by each model, and whether they decoded the
    same tokens: ``generate()`` of ``new + 1`` tokens minus ``generate()`` of 1 (its prefill
    and first token), both through the same path, best of ``repeat`` rounds. ``kw``: the
    other ``generate()`` arguments; a callable one is called with the model on each call
    (a fresh cache)."""

    def generate(m: torch.nn.Module, n: int) -> Callable[[], torch.Tensor]:
        steps = {"max_new_tokens": n, "min_new_tokens": n, "do_sample": False}
        return lambda: m.generate(
            ids, **steps, **{k: v(m) if callable(v) else v for k, v in kw.items()}
        )

    tokens = [generate(m, new)() for m in models.values()]
    gens = {f"{k} {n}": generate(m, n) for k, m in models.items() for n in (1, new + 1)}
    gen = best_times(gens, repeat)  # type: ignore[arg-type]
    return {k: gen[f"{k} {new + 1}"] - gen[f"{k} 1"] for k in models}, torch.equal(*tokens)


def dense_case(args: argparse.Namespace) -> list[dict]:
    """Prefill and greedy decoding of the Llama-style model against sdpa."""
    ids = torch.randint(0, VOCAB, (1, args.dense_n))
    models = {i: build("dense", args.layers, 0, i) for i in ("sdpa", "attnlab")}
    return _prefill_and_decode("dense", models, ids, args, n=args.dense_n, layers=args.layers)


def bf16_case(args: argparse.Namespace) -> list[dict]:
    """Prefill and greedy decoding of the Llama-style model in bfloat16 against sdpa."""
    ids = torch.randint(0, VOCAB, (1, args.padded_n))
    models = {i: build("dense", args.layers, 0, i).bfloat16() for i in ("sdpa", "attnlab")}
    size = {"n": args.padded_n, "layers": args.layers, "dtype": "bfloat16"}
    return _prefill_and_decode("bf16", models, ids, args, **size)


def _prefill_and_decode(
    case: str,
    models: dict[str, torch.nn.Module],
    ids: torch.Tensor,
    args: argparse.Namespace,
    **size: object,
) -> list[dict]:
    """A prefill row and a decoding row of ``args.new`` greedy tokens after ``ids (1, L)``,
    each model's best of ``args.dense_repeat`` alternating rounds."""

    def prefill(m: torch.nn.Module) -> Callable[[], object]:
        def run() -> object:
            with torch.no_grad():
                return m(input_ids=ids).logits

        return run

    secs = best_times({k: prefill(m) for k, m in models.items()}, args.dense_repeat)
    rows = [_row(case, "prefill", "sdpa", secs, **size)]
    ones = torch.ones_like(ids)
    decode, same = decode_seconds(models, ids, args.new, args.dense_repeat, attention_mask=ones)
    rows.append(_row(case, f"decode {args.new}", "sdpa", decode, **size, same_tokens=same))
    return rows


def padded_case(args: argparse.Namespace) -> list[dict]:
    """Greedy decoding of a left-padded batch by the Llama-style model against sdpa."""
    n = args.padded_n
    ids = torch.randint(0, VOCAB, (4, n))
    attention_mask = torch.ones_like(ids)
    for row, pad in enumerate((0, n // 10, 3 * n // 10, 7 * n // 10)):
        attention_mask[row, :pad] = 0  # left padding, as generate() expects
    models = {i: build("dense", args.layers, 0, i) for i in ("sdpa", "attnlab")}
    decode, same = decode_seconds(
        models, ids, args.padded_new, args.dense_repeat, attention_mask=attention_mask,
        pad_token_id=0,
    )  # fmt: skip
    size = {"n": n, "batch": 4, "layers": args.layers, "same_tokens": same}
    return [_row("padded", f"decode {args.padded_new}", "sdpa", decode, **size)]


def static_case(args: argparse.Namespace) -> list[dict]:
    """Greedy decoding into a static cache by the Llama-style model against sdpa."""
    import transformers as t

    ids = torch.randint(0, VOCAB, (1, args.padded_n))
    models = {i: build("dense", args.layers, 0, i) for i in ("sdpa", "attnlab")}
    decode, same = decode_seconds(
        models, ids, args.padded_new, args.dense_repeat, attention_mask=torch.ones_like(ids),
        cache=lambda m: t.StaticCache(m.config, max_cache_len=args.static_slots),
    )  # fmt: skip
    size = {"n": ids.shape[1], "slots": args.static_slots, "layers": args.layers}
    return [_row("static", f"decode {args.padded_new}", "sdpa", decode, **size, same_tokens=same)]


def weights_case(args: argparse.Namespace) -> list[dict]:
    """``output_attentions=True`` on the window model against eager."""
    ids = torch.randint(0, VOCAB, (1, args.weights_n))
    models = {i: build("window", args.layers, args.window, i) for i in ("eager", "attnlab")}

    def run(m: torch.nn.Module) -> Callable[[], object]:
        def call() -> object:
            with torch.no_grad():
                return m(input_ids=ids, use_cache=False, output_attentions=True).attentions

        return call

    secs = best_times({k: run(m) for k, m in models.items()}, args.repeat)
    with torch.no_grad():  # the weights agree (every layer)
        a, b = (run(m)() for m in models.values())
    diff = max(float((x - y).abs().max()) for x, y in zip(a, b, strict=True))  # type: ignore[call-overload]
    size = {"n": args.weights_n, "window": args.window, "layers": args.layers}
    return [_row("weights", "fwd output_attentions", "eager", secs, **size, max_abs_diff=diff)]


def family_case(args: argparse.Namespace, kind: str) -> list[dict]:
    """Forward and forward+backward of the soft-capped or the sinks model against eager
    (and, forward only, ``flex_attention`` with ``--flex``), outputs compared; greedy
    decoding after a prompt of ``--padded-n`` tokens against eager."""
    window = args.window if kind == "softcap" else args.sinks_window
    anchors = ["eager", *(["flex_attention"] if args.flex and kind == "softcap" else [])]
    models = {i: build(kind, args.layers, window, i) for i in (*anchors, "attnlab")}
    ids = torch.randint(0, VOCAB, (1, args.family_n))

    def fwd(m: torch.nn.Module) -> Callable[[], torch.Tensor]:
        def run() -> torch.Tensor:
            with torch.no_grad():
                return m.model(input_ids=ids, use_cache=False).last_hidden_state

        return run

    def fwd_bwd(m: torch.nn.Module) -> Callable[[], torch.Tensor]:
        def run() -> torch.Tensor:
            m.zero_grad(set_to_none=True)
            out = m.model(input_ids=ids, use_cache=False).last_hidden_state
            out.square().mean().backward()
            return out

        return run

    outs = {k: fwd(m)() for k, m in models.items()}
    diff = max(float((outs[a] - outs["attnlab"]).abs().max()) for a in anchors)
    size = {"n": args.family_n, "window": window, "layers": args.layers, "max_abs_diff": diff}
    secs = best_times({k: fwd(m) for k, m in models.items()}, args.repeat)
    rows = [_row(kind, "fwd", a, secs, **size) for a in anchors]
    train = {k: fwd_bwd(m) for k, m in models.items() if k != "flex_attention"}
    rows.append(_row(kind, "fwd+bwd", "eager", best_times(train, args.repeat), **size))
    prompt = ids[:, : args.padded_n]
    pair = {k: models[k] for k in ("eager", "attnlab")}
    decode, same = decode_seconds(
        pair, prompt, args.padded_new, args.dense_repeat, attention_mask=torch.ones_like(prompt)
    )
    size = {"n": prompt.shape[1], "window": window, "layers": args.layers, "same_tokens": same}
    return [*rows, _row(kind, f"decode {args.padded_new}", "eager", decode, **size)]


#: what --smoke sets (refused beside it)
SMOKE_SIZES: dict[str, object] = {"n": 512, "window": 64, "layers": 1, "repeat": 1}
SMOKE_SIZES |= {"dense_repeat": 1, "dense_n": 128, "new": 4, "weights_n": 256, "padded_n": 64}
SMOKE_SIZES |= {"padded_new": 4, "static_slots": 128, "family_n": 256, "sinks_window": 32}


def main() -> None:
    parser = script_parser(__doc__)
    parser.add_argument("--smoke", action="store_true", help="small sizes, one run each")
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=CASES)
    parser.add_argument("--n", type=int_in(1), default=8192, help="tokens of the window cases")
    parser.add_argument("--window", type=int_in(1), default=512)
    parser.add_argument("--layers", type=int_in(1), default=4)
    parser.add_argument("--dense-n", type=int_in(1), default=2048, help="tokens of the dense case")
    parser.add_argument("--new", type=int_in(1), default=128, help="greedy tokens to decode")
    parser.add_argument("--weights-n", type=int_in(1), default=4096, help="tokens, weights case")
    parser.add_argument("--padded-n", type=int_in(1), default=1024, help="tokens, padded case")
    parser.add_argument("--padded-new", type=int_in(1), default=64, help="tokens, padded case")
    parser.add_argument("--static-slots", type=int_in(1), default=8192, help="static cache size")
    parser.add_argument(
        "--family-n", type=int_in(1), default=4096, help="tokens, softcap and sinks"
    )
    parser.add_argument("--sinks-window", type=int_in(1), default=128, help="window, sinks case")
    parser.add_argument(
        "--flex", action="store_true", help="softcap case: also flex_attention (compiles)"
    )
    parser.add_argument("--repeat", type=int_in(1), default=3, help="alternating rounds")
    parser.add_argument(
        "--dense-repeat", type=int_in(1), default=7, help="rounds of the dense case (short runs)"
    )
    parser.add_argument("--threads", type=int_in(0), default=0, help="torch threads (0: default)")
    args = parse_smoke(parser, None, SMOKE_SIZES)
    if args.flex:  # transformers' flex_attention, compiled for the CPU
        from attnlab.bench import flex_problem

        if (why := flex_problem("cpu")) is not None:
            parser.error(f"--flex: {why}")
    if args.threads:  # one thread keeps a shared machine's other jobs from stalling the pool
        torch.set_num_threads(args.threads)
    if importlib.util.find_spec("transformers") is None:  # `make bench-smoke` alone
        print(json.dumps({"bench": "hf", "skipped": "not installed: transformers (attnlab[hf])"}))
        return
    run = {"window": window_case, "memory": memory_case, "dense": dense_case}
    run["weights"], run["padded"], run["static"] = weights_case, padded_case, static_case
    run["softcap"] = lambda a: family_case(a, "softcap")
    run["sinks"] = lambda a: family_case(a, "sinks")
    run["bf16"] = bf16_case
    for case in args.cases:
        for row in run[case](args):
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
