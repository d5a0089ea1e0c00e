"""``attnlab explain TEXT``: what a sentence encoder attends to, and which tokens matter.

Loads the shipped all-MiniLM-L6-v2 (or any sentence-transformers folder), hands it to
:func:`attnlab.interpret.explain_text` as a :class:`~attnlab.interpret.TextModel`, prints
the most important tokens and the files written: the interactive HTML report and PNG
pictures beside it.
"""

from __future__ import annotations

import argparse
from typing import Any

from attnlab._io import OutputLock
from attnlab.cli._args import check_out_file, clean_text, int_in
from attnlab.cli._errors import UsageError
from attnlab.cli._sentence import add_model_option, load_encoder
from attnlab.interpret import TextModel, explain_text
from attnlab.tasks.encoder import text_model

__all__ = ["add_parsers", "run", "text_model"]


def add_parsers(sub: Any) -> None:
    """Add the ``explain`` subcommand to an argparse subparsers object."""
    p = sub.add_parser("explain", help="explain a sentence encoder's attention (HTML + PNGs)")
    p.add_argument("text", metavar="TEXT")
    p.add_argument("--out", default="report.html", help="the HTML report; PNGs go beside it")
    p.add_argument("--against", default=None, help="explain the similarity to this text")
    p.add_argument("--steps", type=int_in(2), default=32, help="integrated-gradients steps")
    p.add_argument(
        "--flow-tokens",
        type=int_in(0),
        default=64,
        help="attention flow only up to this many tokens",
    )
    add_model_option(p)
    p.add_argument(
        "--hf-model",
        default=None,
        metavar="DIR",
        help="explain a local transformers encoder or decoder folder instead (attnlab[hf])",
    )
    p.add_argument(
        "--continuation", default=None, help="with a decoder: explain log p(this | TEXT)"
    )
    p.set_defaults(run=run)


def _hf_model(args: argparse.Namespace, text: str) -> TextModel:
    """``--hf-model DIR`` on the attnlab transformers backend."""
    from attnlab.integrations.hf_text import hf_text_model, load_hf

    model, tokenizer = load_hf(args.hf_model)
    return hf_text_model(model, tokenizer, text=text, continuation=args.continuation)


def run(args: argparse.Namespace) -> int:
    """``attnlab explain``."""
    text = clean_text(args, "TEXT", args.text)
    against = None if args.against is None else clean_text(args, "--against", args.against)
    if not text.strip():
        raise UsageError("TEXT", "is empty; give a sentence to explain")
    out = check_out_file("--out", args.out)
    model = _hf_model(args, text) if args.hf_model else text_model(load_encoder(args.model)[0])
    with OutputLock(out, folder=False, command=f"attnlab explain --out {out}"):
        ex = explain_text(
            model,
            text,
            out,
            against=against,
            steps=args.steps,
            flow_tokens=args.flow_tokens,
        )
    top = sorted(zip(ex.saliency["integrated gradients"], ex.tokens, strict=True), reverse=True)
    print(
        "most important tokens (integrated gradients): "
        + ", ".join(f"{t} ({v:+.3f})" for v, t in top[:5])
    )
    for path in ex.files:
        print(f"wrote {path}")
    return 0
