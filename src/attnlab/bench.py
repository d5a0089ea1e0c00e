"""Benchmarks of attnlab's engines against torch, measured in the same run.

Each result is one JSON line with attnlab's time beside the anchors' on the same case:
torch SDPA with the mask (and bias) as a dense tensor, and, with ``--flex``, torch
FlexAttention compiled (forward only; FlexAttention has no CPU backward). Ratios are
``anchor / ours`` (> 1: attnlab is faster). ``--memory`` measures the peak memory of one
forward+backward in a fresh process. :mod:`attnlab.cli.bench` parses the command line;
a script gets the same records from :func:`records`.

    attnlab bench                                   # window/documents/alibi/dense/causal
    attnlab bench --smoke                           # tiny sizes, for CI
    attnlab bench --cases window --n 16384 --flex   # one case, with FlexAttention
    attnlab bench --memory --n 65536 --heads 1 --window 512
    attnlab bench --device cuda --dtype bfloat16 --flex --repeat 20   # on a GPU

On a GPU each timed call ends with ``torch.cuda.synchronize()``, FlexAttention is timed
forward and backward, and the memory probe reads ``torch.cuda.max_memory_allocated``.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

import attnlab
import attnlab.engines
from attnlab import bias as B
from attnlab import masks as M
from attnlab._timing import interleaved_ms, matmul_gflops, synced, timeit
from attnlab._validate import positive_int
from attnlab.engines.flex import (
    compile_options,
    cpu_compile_problem,
    flex_available,
    room_to_compile,
)
from attnlab.functional import unsupported_by

__all__ = [
    "CASES",
    "MODES",
    "SMOKE",
    "BenchConfig",
    "check_cases",
    "check_device",
    "doc_ids",
    "interleaved_ms",
    "make_case",
    "matmul_gflops",
    "memory_probe",
    "records",
    "roofline_dtype",
    "run_case",
    "timeit",
    "window_pairs",
]

CASES = ("window", "documents", "alibi", "dense", "causal")
MODES = ("fwd", "fwd+bwd")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SMOKE: dict[str, Any] = {"n": 256, "heads": 2, "window": 64, "repeat": 1}  # all --smoke sets


@dataclass(frozen=True)
class BenchConfig:
    """The sizes and settings of one benchmark run (``attnlab bench``'s options).

    Attributes:
        n, heads, dim: sequence length ``L``, heads ``H`` and head dim ``E`` (``B = 1``).
        window: the ``window`` case's window (and the memory probe's).
        engine: attnlab's engine (``"auto"``: what users get).
        modes: ``"fwd"`` and/or ``"fwd+bwd"``.
        repeat: timed calls per figure (the median is reported).
        flex: also time FlexAttention (compiled; forward only on the CPU, which has no
            FlexAttention backward).
        device: ``"cpu"`` or ``"cuda"`` (or ``"cuda:N"``).
        dtype: ``"float32"``, ``"bfloat16"`` or ``"float16"`` of q, k and v.

    Example:
        >>> cfg = BenchConfig(device="cpu:0")  # checked and recorded as 'cpu'
        >>> cfg.n, cfg.device, cfg.smoke().n, cfg.smoke().dim  # smoke: tiny, dim kept
        (4096, 'cpu', 256, 64)
        >>> BenchConfig(modes=("bwd",))
        Traceback (most recent call last):
        ValueError: modes: 'bwd' is not a mode; expected some of ('fwd', 'fwd+bwd')
    """

    n: int = 4096
    heads: int = 8
    dim: int = 64
    window: int = 256
    engine: str = "auto"
    modes: tuple[str, ...] = ("fwd", "fwd+bwd")
    repeat: int = 3
    flex: bool = False
    device: str = "cpu"
    dtype: str = "float32"

    def __post_init__(self) -> None:
        for name in ("n", "heads", "dim", "window", "repeat"):
            positive_int(name, getattr(self, name))
        if not isinstance(self.modes, tuple) or not self.modes:
            raise TypeError(f"modes must be a non-empty tuple of {MODES}, got {self.modes!r}")
        bad = [m for m in self.modes if m not in MODES]
        if bad:
            raise ValueError(f"modes: {bad[0]!r} is not a mode; expected some of {MODES}")
        if self.engine != "auto" and self.engine not in attnlab.engines.available_engines():
            known = ("auto", *attnlab.engines.available_engines())
            raise ValueError(f"engine={self.engine!r} is not an engine; expected one of {known}")
        if self.dtype not in DTYPES:
            raise ValueError(
                f"dtype={self.dtype!r} is not a dtype; expected one of {tuple(DTYPES)}"
            )
        object.__setattr__(self, "device", check_device(self.device))  # 'cpu:0' as 'cpu'
        if self.flex and (why := flex_problem(self.device)) is not None:
            raise ValueError(f"flex=True: {why}; expected flex=False here")

    def smoke(self) -> BenchConfig:
        """These settings at :data:`SMOKE`'s tiny sizes, ``dim`` and the rest kept (CI)."""
        return dataclasses.replace(self, **SMOKE)


def flex_problem(device: str) -> str | None:
    """Why FlexAttention cannot be timed, compiled, on ``device`` here, or None."""
    if not flex_available():
        return "this torch has no FlexAttention (torch.nn.attention.flex_attention)"
    return cpu_compile_problem() if torch.device(device).type == "cpu" else None


def check_device(device: str) -> str:
    """``device`` as recorded (``'cpu:0'`` as ``'cpu'``): the CPU or a CUDA device here.

    Example:
        >>> check_device("cpu:0")
        'cpu'
        >>> check_device("cpu:5")
        Traceback (most recent call last):
        ValueError: device='cpu:5': the CPU is only 'cpu' (or 'cpu:0')
    """
    if not isinstance(device, str):
        raise TypeError(f"device must be a str such as 'cpu' or 'cuda', got {device!r}")
    try:
        dev = torch.device(device)
    except RuntimeError:
        msg = f"device={device!r} is not a device; expected 'cpu' or 'cuda[:N]'"
        raise ValueError(msg) from None
    if dev.type == "cpu" and dev.index:  # ('cpu:5' ran, recorded as "cpu:5")
        raise ValueError(f"device={device!r}: the CPU is only 'cpu' (or 'cpu:0')")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device={device!r}: attnlab bench runs on 'cpu' or 'cuda[:N]'")
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if dev.type == "cuda" and (dev.index or 0) >= count:
        raise ValueError(f"device={device!r}: this machine has {count} CUDA device(s)")
    return "cpu" if dev.type == "cpu" else device


def doc_ids(n: int, docs: int = 16, seed: int = 0) -> Tensor:
    """Ids of ``docs`` packed documents of random lengths summing to ``n``.

    Example:
        >>> ids = doc_ids(1000, docs=16)
        >>> len(ids), ids.unique().tolist() == list(range(16)), bool((ids.diff() >= 0).all())
        (1000, True, True)
    """
    gen = torch.Generator().manual_seed(seed)
    cuts = torch.randperm(n - 1, generator=gen)[: docs - 1].add(1)
    return torch.zeros(n, dtype=torch.long).index_fill_(0, cuts, 1).cumsum(0)


def make_case(name: str, n: int, heads: int, window: int) -> tuple[M.Mask | None, B.Bias | None]:
    """The mask and bias of a named case at length ``n``.

    Example:
        >>> mask, bias = make_case("window", 6, heads=2, window=2)
        >>> mask.dense(6, 6).sum(-1).flatten().tolist(), bias  # query p sees keys p - 2 .. p
        ([1, 2, 3, 3, 3, 3], None)
        >>> alibi = make_case("alibi", 6, heads=2, window=2)[1]
        >>> alibi.dense(2, 2, heads=2)[0, :, 1, 0].tolist()  # -slope per head at distance 1
        [-0.0625, -0.00390625]
    """
    cases: dict[str, Callable[[], tuple[M.Mask | None, B.Bias | None]]] = {
        "window": lambda: (M.causal() & M.window(window), None),
        "documents": lambda: (M.documents(doc_ids(n)), None),
        "alibi": lambda: (M.causal(), B.alibi(heads)),
        "dense": lambda: (None, None),
        "causal": lambda: (M.causal(), None),
    }
    if name not in cases:
        raise ValueError(f"case={name!r} is not a benchmark case; expected one of {CASES}")
    return cases[name]()


def _sdpa_anchor(case: tuple[M.Mask | None, B.Bias | None], cfg: BenchConfig) -> Any:
    """torch SDPA's arguments for the case: a dense bool or float mask, or is_causal."""
    mask, bias = case
    n, dev = cfg.n, torch.device(cfg.device)
    if mask is not None and mask.is_causal and bias is None:
        return {"is_causal": True}
    attn = None if mask is None else mask.dense(n, n, device=dev)
    if bias is not None:
        b = bias.dense(n, n, heads=cfg.heads, device=dev, dtype=DTYPES[cfg.dtype])
        attn = b if attn is None else b.masked_fill(~attn, float("-inf"))
    return {"attn_mask": attn}


def _flex_anchor(name: str, cfg: BenchConfig) -> Callable[..., Tensor]:
    """FlexAttention compiled for the case (block mask built once, outside the timing)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    n, window = cfg.n, cfg.window
    ids, slopes = doc_ids(n).to(cfg.device), B.alibi_slopes(cfg.heads).to(cfg.device)

    def mask_mod(b: Tensor, h: Tensor, q: Tensor, k: Tensor) -> Tensor:
        if name == "window":
            return (k <= q) & (q - k <= window)
        if name == "documents":
            return ids[q] == ids[k]
        return k <= q

    def score_mod(s: Tensor, b: Tensor, h: Tensor, q: Tensor, k: Tensor) -> Tensor:
        return s - slopes[h] * (q - k).abs()

    block_mask = (
        None
        if name == "dense"
        else create_block_mask(mask_mod, None, None, n, n, device=cfg.device)
    )
    # static shapes, as the engine compiles it: with the engine's compilations of the
    # same function, automatic dynamic shapes made the documents case's ids dynamic, and
    # inductor's CPU kernel for that failed to build (CppCompileError)
    options = compile_options(cfg.device)
    compiled = torch.compile(flex_attention, dynamic=False, options=options)
    mod = score_mod if name == "alibi" else None

    def run(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        # each case compiles flex_attention again: past torch's 8 per process it ran
        # uncompiled (an H200: ALiBi 78 ms, not 1.5), the engine's limit lifts that
        with room_to_compile():
            return compiled(q, k, v, score_mod=mod, block_mask=block_mask)

    return run


def records(
    cfg: BenchConfig, cases: Sequence[str] = CASES, *, memory: bool = False
) -> Iterator[dict[str, Any]]:
    """The benchmark's JSON records, one per case and mode, as each is measured (torch
    seeded first); with ``memory``, only the memory probe's record.

    Example:
        >>> cfg = BenchConfig(modes=("fwd",)).smoke()
        >>> [(r["case"], r["n"]) for r in records(cfg, ["causal"])]
        [('causal', 256)]
    """
    check_cases(cfg, cases, memory=memory)
    torch.manual_seed(0)
    if memory:
        yield memory_probe(cfg)
        return
    for name in cases:
        yield from run_case(name, cfg)


def check_cases(cfg: BenchConfig, cases: Sequence[str] = CASES, *, memory: bool = False) -> None:
    """``ValueError`` before any work if a case is unknown or ``cfg.engine`` cannot compute
    a case and mode that the run would time (with ``memory``: the probe's window case,
    forward+backward). Asked of the engine on tiny inputs of the run's device and dtype.

    Example:
        >>> check_cases(BenchConfig(engine="linear"), ["causal"])  # linear does causal
        >>> check_cases(BenchConfig(engine="linear"), ["window"])  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ValueError: engine 'linear' cannot time case 'window' (fwd): linear supports ...
    """
    bad = [c for c in cases if c not in CASES]
    if isinstance(cases, str) or bad:
        raise ValueError(f"cases must be a list of names from {CASES}, got {cases!r}")
    if cfg.engine == "auto":  # auto falls back to the reference engine
        return
    wanted = [("window", "fwd+bwd")] if memory else [(c, m) for c in cases for m in cfg.modes]
    for name, mode in wanted:
        why = _unsupported(cfg.engine, name, mode, cfg)
        if why is not None:
            what = (
                "the memory probe (case 'window', fwd+bwd)" if memory else f"case {name!r} ({mode})"
            )
            raise ValueError(
                f"engine {cfg.engine!r} cannot time {what}: {why}; "
                f"engines that can: {', '.join(['auto', *_able(name, mode, cfg)])}"
            )


def _able(name: str, mode: str, cfg: BenchConfig) -> list[str]:
    """The engines that can compute case ``name`` in ``mode``."""
    engines = attnlab.engines.available_engines()
    return [e for e in engines if _unsupported(e, name, mode, cfg) is None]


def _unsupported(engine: str, name: str, mode: str, cfg: BenchConfig) -> str | None:
    """Why ``engine`` cannot compute case ``name`` in ``mode`` (tiny inputs), or None."""
    n = min(cfg.n, 64)
    mask, bias = make_case(name, n, cfg.heads, cfg.window)
    shape, grad = (1, cfg.heads, n, cfg.dim), mode == "fwd+bwd"
    q = torch.zeros(shape, device=cfg.device, dtype=DTYPES[cfg.dtype], requires_grad=grad)
    with torch.enable_grad():
        return unsupported_by(engine, q, q, q, mask=mask, bias=bias)


def run_case(name: str, cfg: BenchConfig) -> list[dict[str, Any]]:
    """Time one case forward and/or forward+backward; returns the JSON records.

    Example:
        >>> recs = run_case("causal", BenchConfig(n=64, heads=1, dim=8, repeat=1))
        >>> [r["mode"] for r in recs]
        ['fwd', 'fwd+bwd']
        >>> all(r["speedup_vs_sdpa"] == round(r["sdpa_ms"] / r["ours_ms"], 3) for r in recs)
        True
    """
    case = make_case(name, cfg.n, cfg.heads, cfg.window)
    anchor_kw = _sdpa_anchor(case, cfg)
    flex = _flex_anchor(name, cfg) if cfg.flex else None
    return [_measure(name, mode, case, anchor_kw, flex, cfg) for mode in cfg.modes]


def _measure(
    name: str,
    mode: str,
    case: tuple[M.Mask | None, B.Bias | None],
    anchor_kw: dict[str, Any],
    flex: Callable[..., Tensor] | None,
    cfg: BenchConfig,
) -> dict[str, Any]:
    """One JSON record: attnlab and its anchors on the same inputs, in the same run."""
    n, h, e, grad = cfg.n, cfg.heads, cfg.dim, mode == "fwd+bwd"
    shape, dtype = (1, h, n, e), DTYPES[cfg.dtype]
    q, k, v = (
        torch.randn(shape, device=cfg.device, dtype=dtype, requires_grad=grad) for _ in "qkv"
    )
    fns: dict[str, Callable[[], Any]] = {
        "ours_ms": lambda: attnlab.attention(
            q, k, v, mask=case[0], bias=case[1], engine=cfg.engine
        ),
        "sdpa_ms": lambda: F.scaled_dot_product_attention(q, k, v, **anchor_kw),
    }
    if flex is not None and (not grad or q.is_cuda):
        fns["flex_ms"] = lambda: flex(q, k, v)
    rec = _header(name, mode, cfg)
    with torch.set_grad_enabled(grad):
        for key, fn in fns.items():
            step = synced(_with_backward(fn) if grad else fn, cfg.device)
            rec[key] = round(timeit(step, cfg.repeat), 3)
    for key in ("sdpa_ms", "flex_ms"):
        if key in rec:
            rec[f"speedup_vs_{key[:-3]}"] = round(rec[key] / rec["ours_ms"], 3)
    if name == "window" and not grad:
        roof = roofline_dtype(cfg.device, dtype)
        flops = 4 * window_pairs(n, cfg.window) * e * h  # QK^T and PV over allowed pairs
        useful, peak = flops / rec["ours_ms"] / 1e6, matmul_gflops(device=cfg.device, dtype=roof)
        rec["useful_gflops"], rec["matmul_gflops"] = round(useful, 1), round(peak, 1)
        rec["matmul_dtype"] = str(roof).removeprefix("torch.")
        rec["efficiency"] = round(useful / peak, 3)  # unrounded: a busy matmul rounds to 0.0
    return rec


def _header(case: str, mode: str, cfg: BenchConfig, *more: str) -> dict[str, Any]:
    """A record's first keys: the case, the mode, the settings of ``cfg`` and the CPU."""
    keys = ("engine", "n", "heads", "dim", *more, "device", "dtype")
    cpu = {"cpu": torch.backends.cpu.get_cpu_capability()}  # every figure names its CPU
    return {"case": case, "mode": mode, **{k: getattr(cfg, k) for k in keys}, **cpu}


def window_pairs(n: int, window: int) -> int:
    """The (query, key) pairs the ``window`` case allows at length ``n``: query ``p`` sees
    keys ``max(0, p - window) .. p``, ``min(p, window) + 1`` of them, summed in closed form.

    Example:
        >>> window_pairs(4, 1), window_pairs(4, 3), window_pairs(4, 10**6)  # 1+2+2+2, 1+2+3+4
        (7, 10, 10)
    """
    m = min(window, n - 1)  # the rows p >= m see m + 1 keys; the first m see p + 1
    return (m + 1) * (2 * n - m) // 2


def roofline_dtype(device: str, dtype: torch.dtype) -> torch.dtype:
    """The dtype of the efficiency figure's matmul: the one attention computes in. On the
    CPU, half precision runs in float32 inside attnlab's engines, and torch's bfloat16
    matmul there is often emulated (about 1 GFLOP/s), which gave efficiencies above 1.

    Example:
        >>> roofline_dtype("cpu", torch.bfloat16), roofline_dtype("cuda", torch.bfloat16)
        (torch.float32, torch.bfloat16)
    """
    return torch.float32 if torch.device(device).type == "cpu" else dtype


def _with_backward(fn: Callable[[], Tensor]) -> Callable[[], None]:
    def step() -> None:
        out = fn()
        out.backward(torch.ones_like(out))

    return step


def memory_probe(cfg: BenchConfig) -> dict[str, Any]:
    """Peak memory of one forward+backward above its inputs, measured in a fresh process:
    resident memory on the CPU, ``torch.cuda.max_memory_allocated`` on a GPU.

    Example:
        >>> r = memory_probe(BenchConfig(n=256, heads=1, dim=16, window=32))  # ~2 s: a process
        >>> r["case"], r["mode"], 0 <= r["peak_extra_gib"] < 1
        ('memory', 'fwd+bwd', True)
    """
    cuda = torch.device(cfg.device).type == "cuda"
    peak = (
        "torch.cuda.max_memory_allocated()"
        if cuda
        else "resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024"
    )
    code = (
        "import resource, torch, attnlab; from attnlab import masks as M\n"
        f"q, k, v = (torch.randn(1, {cfg.heads}, {cfg.n}, {cfg.dim}, device={cfg.device!r}, "
        f"dtype=torch.{cfg.dtype}, requires_grad=True) for _ in range(3))\n"
        f"base = {peak}\n"
        f"out = attnlab.attention(q, k, v, mask=M.causal() & M.window({cfg.window}), "
        f"engine={cfg.engine!r})\n"
        "out.backward(torch.ones_like(out))\n"
        f"print(({peak} - base) / 2**30)\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    gib = float(res.stdout.strip().splitlines()[-1])
    return {**_header("memory", "fwd+bwd", cfg, "window"), "peak_extra_gib": round(gib, 3)}
