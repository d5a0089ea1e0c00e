"""``attnlab bench``: attnlab's engines timed against torch SDPA / FlexAttention in the same
run, printed as JSON lines (the measuring is :mod:`attnlab.bench`'s; ``benchmarks/
bench_core.py`` is the same program).
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Sequence
from typing import Any

import torch

from attnlab import bench
from attnlab.cli._args import int_in, names_in, refuse_beside_smoke
from attnlab.cli._errors import Parser, UsageError, add_debug_option
from attnlab.engines import available_engines

__all__ = ["add_arguments", "add_parsers", "build_parser", "parse_args", "run"]

_DESCRIPTION = (bench.__doc__ or "").splitlines()[0]
_ENGINE_HELP = "attnlab's engine, timed against the anchors (default %(default)s)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``attnlab bench``."""
    defaults = bench.BenchConfig()
    cases, positive = bench.CASES, int_in(1)
    p.add_argument(  # (None: the default, so that --memory sees one given)
        "--cases", type=names_in(cases), help=f"comma list of {cases} (default all)"
    )
    # what --smoke sets defaults to None here, so that one given (even at its default) is
    # seen: --smoke --n 4096 ran at 256 without a word
    p.add_argument("--n", type=positive, help=f"sequence length (default {defaults.n})")
    p.add_argument("--heads", type=positive, help=f"attention heads (default {defaults.heads})")
    p.add_argument(
        "--dim", type=positive, default=defaults.dim, help="head dim (default %(default)s)"
    )
    p.add_argument(
        "--window", type=positive, help=f"the window case's window (default {defaults.window})"
    )
    engines = ["auto", *available_engines()]
    p.add_argument("--engine", default=defaults.engine, choices=engines, help=_ENGINE_HELP)
    modes = ",".join(defaults.modes)
    p.add_argument("--modes", type=names_in(bench.MODES), help=f"comma list (default {modes})")
    p.add_argument(
        "--repeat",
        type=positive,
        help=f"timed calls per figure, median reported (default {defaults.repeat})",
    )
    p.add_argument("--flex", action="store_true", help="also time FlexAttention (compiles)")
    p.add_argument(
        "--device",
        type=_device,
        default=defaults.device,
        help="cpu or cuda[:N] (default %(default)s)",
    )
    dtypes = list(bench.DTYPES)
    p.add_argument(
        "--dtype", default=defaults.dtype, choices=dtypes, help="of q, k, v (default %(default)s)"
    )
    p.add_argument("--memory", action="store_true", help="peak memory of window fwd+bwd")
    p.add_argument("--smoke", action="store_true", help="tiny sizes, one repeat (for CI)")


def _device(text: str) -> str:
    """An argparse type: a device this machine has (checked before any work)."""
    try:
        return bench.check_device(text)
    except (TypeError, ValueError) as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_parsers(sub: Any) -> None:
    """Add the ``bench`` subcommand to an argparse subparsers object."""
    p = sub.add_parser(
        "bench", help="time engines against torch SDPA / FlexAttention", description=_DESCRIPTION
    )
    add_arguments(p)
    p.set_defaults(run=run)


def build_parser() -> argparse.ArgumentParser:
    """``attnlab bench``'s own parser: its usage and errors name ``attnlab bench``."""
    p = Parser(prog="attnlab bench", description=_DESCRIPTION)
    add_arguments(p)
    add_debug_option(p)
    p.set_defaults(run=run, command="bench")
    return p


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """The arguments after ``attnlab bench``."""
    return build_parser().parse_args(argv)


def run(args: argparse.Namespace) -> int:
    """``attnlab bench``: one JSON line per record, flushed as each is measured."""
    default = bench.BenchConfig()  # where the options' defaults come from
    _check_memory_options(args)
    _check_lists(args)
    args.cases = bench.CASES if args.cases is None else args.cases
    args.modes = default.modes if args.modes is None else args.modes
    given = [f"--{k}" for k in bench.SMOKE if getattr(args, k) is not None]
    if args.smoke:  # it sets its own sizes
        refuse_beside_smoke(given)
    for k in bench.SMOKE:
        setattr(args, k, getattr(default, k) if getattr(args, k) is None else getattr(args, k))
    if args.flex and (why := bench.flex_problem(args.device)) is not None:
        raise UsageError("--flex", f"{why}; leave --flex out")
    cfg = bench.BenchConfig(
        n=args.n,
        heads=args.heads,
        dim=args.dim,
        window=args.window,
        engine=args.engine,
        modes=tuple(args.modes),
        repeat=args.repeat,
        flex=args.flex,
        device=args.device,
        dtype=args.dtype,
    )
    if args.smoke:
        cfg = cfg.smoke()
    _check_engine(cfg, args)
    _check_memory(cfg, args.cases, args.memory)
    for rec in bench.records(cfg, args.cases, memory=args.memory):
        print(json.dumps(rec), flush=True)
    return 0


def _check_lists(args: argparse.Namespace) -> None:
    """``--cases`` and ``--modes`` name each once (``dense,dense`` timed dense twice), and
    ``--window`` needs the case that reads it (``--cases dense --window 5`` ran, exit 0,
    with the window unused)."""
    for flag, names in (("--cases", args.cases), ("--modes", args.modes)):
        twice = [n for n in names or () if names.count(n) > 1]
        if twice:
            raise UsageError(flag, f"names {twice[0]!r} twice; give each once")
    if args.window is not None and args.cases is not None and "window" not in args.cases:
        msg = f"is {args.window}, but only the case 'window' reads it and --cases is "
        raise UsageError("--window", msg + f"{','.join(args.cases)}: add window or drop --window")


def _check_memory_options(args: argparse.Namespace) -> None:
    """``--memory`` measures one window forward+backward, once: a case, mode, repeat or
    FlexAttention it would not run is refused (they went unread, exit 0)."""
    if not args.memory:
        return
    probe = "--memory measures one forward+backward of the case 'window', once"
    if args.cases is not None and tuple(args.cases) != ("window",):
        raise UsageError("--cases", f"is {','.join(args.cases)}; {probe}: leave --cases out")
    if args.modes is not None and tuple(args.modes) != ("fwd+bwd",):
        raise UsageError("--modes", f"is {','.join(args.modes)}; {probe}: leave --modes out")
    if args.repeat is not None:
        raise UsageError("--repeat", f"is {args.repeat}; {probe}: leave --repeat out")
    if args.flex:
        raise UsageError("--flex", f"{probe}, with the engine of --engine: leave --flex out")


# Engines whose memory probe holds no n x n matrix: blocked skips the window's masked
# tiles, and auto takes blocked for it past tiny lengths. The probe of another engine
# (reference, sdpa) builds the dense mask and scores.
_TILED = ("auto", "blocked")

_Need = tuple[int, tuple[str, ...], str]  # bytes, the options that set them, what for


def _check_memory(cfg: bench.BenchConfig, cases: Sequence[str], memory: bool) -> None:
    """What the run will hold fits in this machine's memory, on the CPU: the largest
    case's n x n masks and scores and the timed tensors, or with ``memory`` what the probe allocates
    (``--n 3000000`` failed in torch asking for 9 TB; ``--heads 50000000``, 819 GB)."""
    if torch.device(cfg.device).type != "cpu" or not hasattr(os, "sysconf"):
        return
    have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for need, names, what in _probe_needs(cfg) if memory else _timing_needs(cfg, cases):
        if need > have:
            given = " x ".join(f"{a} {getattr(cfg, a[2:])}" for a in names)
            msg = f"{given} needs {need / 2**30:.0f} GiB for {what}; this "
            raise UsageError(_furthest(cfg, names), msg + f"machine has {have / 2**30:.0f} GiB")


def _timing_needs(cfg: bench.BenchConfig, cases: Sequence[str]) -> list[_Need]:
    """The timed cases' memory: the ``n x n`` matrices of the largest case (see
    :func:`_pair_bytes`), and q, k, v, the output and their gradients."""
    size = torch.empty((), dtype=bench.DTYPES[cfg.dtype]).element_size()
    needs: list[_Need] = [
        (
            8 * cfg.heads * cfg.n * cfg.dim * size,
            ("--n", "--heads", "--dim"),
            "the anchor's tensors",
        )
    ]
    pairs = {case: _pair_bytes(cfg, case, size) for case in cases}
    case = max(pairs, key=lambda c: pairs[c][0], default=None)
    if case is not None and pairs[case][0]:
        per_pair, per_head = pairs[case]
        names = ("--n", "--heads") if per_head else ("--n",)
        what = f"the n x n masks and scores of case {case!r} (SDPA's anchor and {cfg.engine})"
        needs.insert(0, (cfg.n * cfg.n * per_pair, names, what))
    return needs


def _pair_bytes(cfg: bench.BenchConfig, case: str, size: int) -> tuple[int, bool]:
    """Bytes per (query, key) pair that ``case`` holds at its peak, and whether they grow
    with the heads: the anchor's bool mask, held through the case (none for dense and
    causal: SDPA runs is_causal), ALiBi's float bias per head and its masked copy, and
    the largest work of one call: SDPA's float copy of a bool mask (4 bytes; 8 with
    backward, ~8.6 measured), the reference engine's scores and weights (float32 per
    head: 8 x heads; 1.02 GiB at n 4096, 8 heads), the sdpa engine's own mask."""
    if case in ("dense", "causal"):
        held, work = 0, 0
    elif case == "alibi":
        held, work = 1 + 2 * cfg.heads * size, 0
    else:
        held, work = 1, 4 * (2 if "fwd+bwd" in cfg.modes else 1)
    ours = {"reference": 8 * cfg.heads, "sdpa": held + work}.get(cfg.engine, 0)
    heads = case == "alibi" or cfg.engine == "reference"
    return held + max(work, ours), heads


def _probe_needs(cfg: bench.BenchConfig) -> list[_Need]:
    """The memory probe's peak (one windowed forward+backward; no anchor, no ``--cases``):
    14 float32 tensors of q's size (q, k, v, the output, the gradients and the engine's
    work: 12.4-13.6 measured with auto at n = 65536-262144), and on an engine that is not
    tiled the ``n x n`` bool mask and a float32 score matrix per head."""
    tensors = (
        14 * cfg.heads * cfg.n * cfg.dim * 4,
        ("--n", "--heads", "--dim"),
        "the memory probe's tensors",
    )
    if cfg.engine in _TILED:
        return [tensors]
    dense = (
        cfg.n * cfg.n * (1 + 4 * cfg.heads),
        ("--n", "--heads"),
        f"the memory probe's n x n mask and scores ({cfg.engine})",
    )
    return [tensors, dense]


def _furthest(cfg: bench.BenchConfig, names: Sequence[str]) -> str:
    """Of the size options ``names``, the one furthest above its default."""
    default = bench.BenchConfig()
    return max(names, key=lambda a: getattr(cfg, a[2:]) / getattr(default, a[2:]))


def _check_engine(cfg: bench.BenchConfig, args: argparse.Namespace) -> None:
    """``--engine`` can compute every case and mode asked (or the ``--memory`` probe's):
    a usage error naming it, before any work, if not."""
    try:
        bench.check_cases(cfg, args.cases, memory=args.memory)
    except ValueError as e:
        raise UsageError("--engine", str(e).removeprefix("engine ")) from e
