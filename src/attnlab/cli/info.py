"""``attnlab info``: this machine as attnlab sees it, and the modes it chose from that.

Prints the CPU and torch's instruction set, the thread count, whether bfloat16 matrix
products are native or emulated and what ``precision="auto"`` runs (and why), whether linears
fold their GELU into oneDNN's product (per instruction set, and at which sizes), the blocked
engine's compiled kernel (built for which instruction set, or why it is unavailable), the
cache behind large zeroed weights (:mod:`attnlab.engines.zeros`) and the registered
engines. ``--json`` prints the same as one JSON object.
"""

from __future__ import annotations

import argparse
import json
import platform
from typing import Any

import torch

import attnlab
from attnlab._cpu import bf16_products, cpu_info, fuse_activation, resolve_precision
from attnlab.engines import available_engines, kernel_status
from attnlab.engines.zeros import cache_info
from attnlab.nn._fused import FUSE_INNER, FUSE_ROWS, FUSE_WEIGHT

__all__ = ["add_parsers", "facts", "run"]


def add_parsers(sub: Any) -> None:
    """Add the ``info`` subcommand to an argparse subparsers object."""
    p = sub.add_parser("info", help="CPU, instruction set, threads, kernels and precisions")
    p.add_argument("--json", action="store_true", help="one JSON object instead of lines")
    p.set_defaults(run=run)


def facts() -> dict[str, Any]:
    """What ``attnlab info`` reports, as a dict (builds the kernel if it is not built)."""
    zeros = cache_info()  # first: a bad ATTNLAB_ZEROS_CACHE_MB fails before any build
    cpu, engines = cpu_info(), available_engines()
    precision, why = resolve_precision("auto", cpu)
    fused, fused_why = fuse_activation(cpu)
    products, products_why = bf16_products(cpu)
    return {
        "attnlab": attnlab.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu": cpu.cpu_name,
        "capability": cpu.capability,
        "threads": cpu.threads,
        "bf16_units": cpu.bf16_units,
        "onednn_bf16": cpu.onednn_bf16,
        "bf16_products": products,  # bfloat16 matrix products run natively
        "bf16_products_why": products_why,
        "bf16_native": cpu.native_bf16,  # attnlab's bfloat16 modes run
        "precision_auto": precision,
        "precision_why": why,
        "gelu_fused": fused,
        "gelu_why": fused_why,
        "gelu_fused_when": _fused_when(),
        "kernel": kernel_status(),
        "zeros_cache": zeros,
        "engines": {n: "exact" if e.exact else "approximate" for n, e in engines.items()},
    }


def run(args: argparse.Namespace) -> int:
    """``attnlab info``."""
    f = facts()
    if args.json:
        print(json.dumps(f))
        return 0
    k = f["kernel"]
    bf16 = "" if f["bf16_native"] else "; attnlab's precision='bfloat16' runs float32"
    print(f"attnlab {f['attnlab']}, torch {f['torch']}, python {f['python']}")
    print(f"cpu: {f['cpu'] or 'unknown'}; torch instruction set {f['capability']}; "
          f"{f['threads']} threads")  # fmt: skip
    native = "native" if f["bf16_products"] else "emulated"
    print(f"bfloat16 matrix products: {native} ({f['bf16_products_why']}){bf16}")
    print(f"precision='auto' runs {f['precision_auto']}: {f['precision_why']}")
    gelu = "its own pass"
    if f["gelu_fused"]:
        gelu = f"folded into oneDNN's product {f['gelu_fused_when']}; elsewhere its own pass"
    print(f"float32 linear + GELU at inference: {gelu} ({f['gelu_why']})")
    if k["loaded"]:
        print(f"blocked kernel: built for {k['isa']} ({' '.join(k['flags'])}); "
              f"{k['rows_forward']} query rows per forward task, {k['rows_backward']} "
              f"per backward task")  # fmt: skip
        pool = f"up to {k['pool_mib']} MiB" if k["pool_mib"] else "off"
        print(f"kernel output pool (freed outputs kept for the next call): {pool} "
              f"(ATTNLAB_KERNEL_POOL_MB)")  # fmt: skip
    else:
        print(f"blocked kernel: unavailable ({k['why_not']}); the blocked engine runs "
              f"torch's per-block kernel instead")  # fmt: skip
    print(f"weights zero-cache: {_zeros_line(f['zeros_cache'])}")
    print("engines: " + ", ".join(f"{n} ({kind})" for n, kind in f["engines"].items()))
    return 0


def _fused_when() -> str:
    """Which linears take oneDNN's fused product at all (``attnlab.nn._fused``'s sizes)."""
    power = FUSE_WEIGHT.bit_length() - 1
    weight = f"2**{power}" if FUSE_WEIGHT.bit_count() == 1 else str(FUSE_WEIGHT)
    return f"for inner sizes <= {FUSE_INNER}, from {FUSE_ROWS} rows and {weight} weight entries"


def _zeros_line(z: dict[str, Any]) -> str:
    """The zeros cache in words: its limit, or why it is off."""
    if not z["pagemap"]:
        return "off (/proc/self/pagemap is not readable here; each result is a fresh map)"
    if not z["limit_mib"]:
        return "off (ATTNLAB_ZEROS_CACHE_MB=0)"
    return (
        f"keeps up to {z['limit_mib']} MiB of written pages of dead results "
        f"(ATTNLAB_ZEROS_CACHE_MB)"
    )
