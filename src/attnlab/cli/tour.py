"""``attnlab tour``: a short tour of the API (engines, masks, one call on every engine,
normalizers), printed."""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch

import attnlab
from attnlab import bias, masks
from attnlab.cli._args import int_in
from attnlab.cli.engines import print_engines
from attnlab.engines import available_engines
from attnlab.functional import unsupported_by

__all__ = ["add_parsers", "run", "tour"]

# the tour's fp64 reference builds (8, L, L) scores: 8192 is 4 GiB
_MAX_LENGTH = 8192


def add_parsers(sub: Any) -> None:
    """Add the ``tour`` subcommand to an argparse subparsers object."""
    p = sub.add_parser("tour", help="a short tour of the API: masks, engines, normalizers")
    p.add_argument(
        "--length",
        type=int_in(1, _MAX_LENGTH),
        default=1024,
        help=f"sequence length of the tour, 1 to {_MAX_LENGTH} (default %(default)s)",
    )
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """``attnlab tour``."""
    tour(args.length)
    return 0


def tour(length: int = 1024) -> None:
    """Print the tour; the engines' call runs at sequence length ``length``."""
    torch.manual_seed(0)
    print(
        f"attnlab {attnlab.__version__} on torch {torch.__version__} "
        f"({torch.get_num_threads()} threads)"
    )
    _section("engines")
    print_engines()
    _tour_masks()
    _tour_call(length)
    _tour_normalizers()


def _section(title: str) -> None:
    print(f"\n== {title} " + "=" * max(0, 70 - len(title)))


def _tour_masks() -> None:
    _section("masks compose with & | ~ and know their block layout")
    doc_ids = torch.tensor([0] * 5 + [1] * 7 + [2] * 4)
    mask = masks.documents(doc_ids) & masks.causal()
    print(mask)
    for row in mask.dense(16, 16)[0, 0].int().tolist():
        print("   " + "".join("#" if x else "." for x in row))
    print(mask.block_layout(16, 16, 4, 4))


def _tour_call(length: int) -> None:
    _section(f"one call, every engine (B=1, H=8, L={length}, E=64, window 128 + ALiBi)")
    q, k, v = (torch.randn(1, 8, length, 64) for _ in range(3))
    mask, alibi = masks.causal() & masks.window(128), bias.alibi(8)
    ref = attnlab.attention(
        q.double(), k.double(), v.double(), mask=mask, bias=alibi, engine="reference"
    )
    assert isinstance(ref, torch.Tensor)
    for name in ("auto", *(n for n, e in available_engines().items() if e.exact)):
        why = None if name == "auto" else unsupported_by(name, q, k, v, mask=mask, bias=alibi)
        if why is not None:  # (flex where torch cannot compile it: the tour ended, exit 1)
            print(f"   {name:<10} skipped: {why}")
            continue
        attnlab.attention(q, k, v, mask=mask, bias=alibi, engine=name)  # warm-up
        t0 = time.perf_counter()
        out = attnlab.attention(q, k, v, mask=mask, bias=alibi, engine=name)
        ms = 1e3 * (time.perf_counter() - t0)
        assert isinstance(out, torch.Tensor)
        err = (out.double() - ref).abs().max().item()
        print(f"   {name:<10} {ms:8.1f} ms   max |err| vs fp64 = {err:.2e}")
    _tour_weights(q, k, v)


def _tour_weights(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """The causal weights of head 0 over the first (up to 6) tokens."""
    n = min(6, q.shape[2])  # all of them in a tour shorter than 6
    r = attnlab.attention(
        q[:, :1, :n], k[:, :1, :n], v[:, :1, :n], mask=masks.causal(), return_weights=True
    )
    assert isinstance(r, attnlab.AttentionOutput) and r.weights is not None
    print(f"   causal weights of head 0 ({n} token{'s' if n > 1 else ''}):")
    for row in r.weights[0, 0].tolist():
        print("     " + " ".join(f"{x:4.2f}" for x in row))


def _tour_normalizers() -> None:
    _section("normalizers: softmax is dense, sparsemax and entmax15 give exact zeros")
    scores = torch.tensor([[[[1.2, 1.0, 0.4, -0.5, -2.0]]]])
    v = torch.eye(5).view(1, 1, 5, 5)

    def fixed(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        return scores

    for name in ("softmax", "sparsemax", "entmax15"):
        r = attnlab.attention(
            scores.new_ones(1, 1, 1, 1),
            scores.new_ones(1, 1, 5, 1),
            v,
            score=fixed,
            normalize=name,
            return_weights=True,
        )
        assert isinstance(r, attnlab.AttentionOutput) and r.weights is not None
        print(f"   {name:<10}" + " ".join(f"{x:5.3f}" for x in r.weights.flatten().tolist()))
