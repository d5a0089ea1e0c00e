"""attnlab's EncoderLayer against torch.nn.TransformerEncoderLayer of the same size.

Prints one JSON line per (mode, norm placement): both times in ms, measured interleaved in
the same run, and torch_ms / attnlab_ms (> 1 means attnlab is faster). Inference runs both
under ``torch.inference_mode`` in eval mode (torch takes its fused fast path there); a
training step is forward, backward and an AdamW step.

python benchmarks/bench_layers.py            # d=512, 8 heads, ff=2048, B=8, L=256
python benchmarks/bench_layers.py --smoke    # tiny sizes, for CI
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable

import torch
from torch import nn

from attnlab.bench import interleaved_ms
from attnlab.cli._args import int_in, parse_smoke, script_parser
from attnlab.nn import EncoderLayer


def _train_step(layer: nn.Module, x: torch.Tensor) -> Callable[[], None]:
    opt = torch.optim.AdamW(layer.parameters(), lr=1e-4)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        layer(x).square().mean().backward()
        opt.step()

    return step


def _infer(layer: nn.Module, x: torch.Tensor) -> Callable[[], None]:
    def run() -> None:
        with torch.inference_mode():
            layer(x)

    return run


def run(args: argparse.Namespace) -> list[dict[str, object]]:
    rows = []
    x = torch.randn(args.batch, args.length, args.d)
    for norm_first in (False, True):
        ref = nn.TransformerEncoderLayer(
            args.d, args.heads, args.ff, dropout=0.0, norm_first=norm_first, batch_first=True
        )
        ours = EncoderLayer.from_torch(ref)
        for mode in ("inference", "train_step"):
            ref.train(mode != "inference"), ours.train(mode != "inference")
            make = _infer if mode == "inference" else _train_step
            t = interleaved_ms({"torch": make(ref, x), "attnlab": make(ours, x)}, args.repeat)
            rows.append(
                {
                    "bench": "encoder_layer",
                    "mode": mode,
                    "norm_first": norm_first,
                    "shape": [args.batch, args.length, args.d, args.heads, args.ff],
                    "torch_ms": round(t["torch"], 3),
                    "attnlab_ms": round(t["attnlab"], 3),
                    "ratio": round(t["torch"] / t["attnlab"], 3),
                    "threads": torch.get_num_threads(),
                    "cpu": torch.backends.cpu.get_cpu_capability(),
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = script_parser(__doc__)
    p.add_argument("--batch", type=int_in(1), default=8)
    p.add_argument("--length", type=int_in(1), default=256)
    p.add_argument("--d", type=int_in(1), default=512)
    p.add_argument("--heads", type=int_in(1), default=8)
    p.add_argument("--ff", type=int_in(1), default=2048)
    p.add_argument("--repeat", type=int_in(1), default=15)
    p.add_argument("--smoke", action="store_true", help="tiny sizes, 2 repeats (CI)")
    smoke = {"batch": 2, "length": 16, "d": 32, "heads": 4, "ff": 64, "repeat": 2}
    args = parse_smoke(p, argv, smoke)
    if args.d % args.heads:
        p.error(f"argument --heads: must divide --d ({args.d}), got {args.heads}")
    run(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
