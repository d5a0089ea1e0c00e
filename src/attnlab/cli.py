"""Command line: ``attnlab demo | train | tour | engines | bench | embed | attend | explain``.

Example:
    >>> main(["engines"])  # doctest: +ELLIPSIS
    reference ...
    0
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

import torch

import attnlab
from attnlab import bias, masks
from attnlab.engines import available_engines
from attnlab.interpret.command import add_parsers as add_explain_parser
from attnlab.models.commands import add_parsers as add_model_parsers
from attnlab.tasks.run import add_parsers as add_task_parsers


def _engines(_: argparse.Namespace) -> int:
    for name, eng in available_engines().items():
        kind = "exact" if eng.exact else "approximate"
        print(f"{name:<10} {kind:<11} {eng.summary}")
    return 0


def _section(title: str) -> None:
    print(f"\n== {title} " + "=" * max(0, 70 - len(title)))


def _demo(args: argparse.Namespace) -> int:
    torch.manual_seed(0)
    print(
        f"attnlab {attnlab.__version__} on torch {torch.__version__} "
        f"({torch.get_num_threads()} threads)"
    )
    _section("engines")
    _engines(args)
    _demo_masks()
    _demo_call(args.length)
    _demo_normalizers()
    return 0


def _demo_masks() -> None:
    _section("masks compose with & | ~ and know their block layout")
    doc_ids = torch.tensor([0] * 5 + [1] * 7 + [2] * 4)
    mask = masks.documents(doc_ids) & masks.causal()
    print(mask)
    for row in mask.dense(16, 16)[0, 0].int().tolist():
        print("   " + "".join("#" if x else "." for x in row))
    print(mask.block_layout(16, 16, 4, 4))


def _demo_call(length: int) -> None:
    _section(f"one call, every engine (B=1, H=8, L={length}, E=64, window 128 + ALiBi)")
    q, k, v = (torch.randn(1, 8, length, 64) for _ in range(3))
    mask, alibi = masks.causal() & masks.window(128), bias.alibi(8)
    ref = attnlab.attention(
        q.double(), k.double(), v.double(), mask=mask, bias=alibi, engine="reference"
    )
    assert isinstance(ref, torch.Tensor)
    for name in ("auto", *(n for n, e in available_engines().items() if e.exact)):
        attnlab.attention(q, k, v, mask=mask, bias=alibi, engine=name)  # warm-up
        t0 = time.perf_counter()
        out = attnlab.attention(q, k, v, mask=mask, bias=alibi, engine=name)
        ms = 1e3 * (time.perf_counter() - t0)
        assert isinstance(out, torch.Tensor)
        err = (out.double() - ref).abs().max().item()
        print(f"   {name:<10} {ms:8.1f} ms   max |err| vs fp64 = {err:.2e}")
    r = attnlab.attention(
        q[:, :1, :6], k[:, :1, :6], v[:, :1, :6], mask=masks.causal(), return_weights=True
    )
    assert isinstance(r, attnlab.AttentionOutput) and r.weights is not None
    print("   causal weights of head 0 (6 tokens):")
    for row in r.weights[0, 0].tolist():
        print("     " + " ".join(f"{x:4.2f}" for x in row))


def _demo_normalizers() -> None:
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


def build_parser() -> argparse.ArgumentParser:
    """The ``attnlab`` argument parser."""
    parser = argparse.ArgumentParser(prog="attnlab", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=attnlab.__version__)
    sub = parser.add_subparsers(dest="command", required=True)
    tour = sub.add_parser("tour", help="a short tour of the API: masks, engines, normalizers")
    tour.add_argument("--length", type=int, default=1024, help="sequence length of the tour")
    tour.set_defaults(func=_demo)
    add_task_parsers(sub)  # train, demo
    eng = sub.add_parser("engines", help="list the engines and what they support")
    eng.set_defaults(func=_engines)
    add_model_parsers(sub)  # embed, attend
    add_explain_parser(sub)  # explain
    bench = sub.add_parser(
        "bench", help="time engines against torch SDPA / FlexAttention", add_help=False
    )
    bench.set_defaults(func=None)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:
        from attnlab.bench import main as bench_main

        return bench_main(argv[1:])
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
