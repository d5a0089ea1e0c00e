"""``attnlab embed`` and ``attnlab attend``: a pretrained sentence encoder from the shell.

``attnlab embed TEXT...`` prints one text's embedding, or the cosine similarity matrix of
several. ``attnlab attend TEXT`` prints, for every layer and head, the tokens each token
attends to most. Both use all-MiniLM-L6-v2 from ``attnlab[pretrained]`` unless
``--model`` names a sentence-transformers folder
(:meth:`attnlab.models.SentenceEncoder.from_pretrained`).

Example:
    >>> from attnlab.cli import main
    >>> main(["embed", "A cat sits on the mat.", "Dogs bark."])  # needs attnlab[pretrained]
    cosine similarity of 2 texts (all-MiniLM-L6-v2):
              [0]     [1]
    [0]    1.0000  0.1212  A cat sits on the mat.
    [1]    0.1212  1.0000  Dogs bark.
    0
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import torch

from attnlab.cli._args import clean_text, clip, int_in
from attnlab.cli._errors import UsageError
from attnlab.cli._sentence import (
    add_model_option,
    check_has_tokens,
    load_encoder,
    model_name,
    model_parts,
    texts_named,
)

__all__ = ["add_parsers", "run_attend", "run_embed"]


def add_parsers(sub: Any) -> None:
    """Add the ``embed`` and ``attend`` subcommands to an argparse subparsers object."""
    embed = sub.add_parser("embed", help="sentence embeddings, or the cosine matrix of several")
    embed.add_argument("texts", nargs="+", metavar="TEXT")
    embed.add_argument("--json", action="store_true", help="print the embeddings as JSON")
    embed.add_argument(
        "--batch-size",
        type=int_in(1),
        default=32,
        help="texts per forward pass (default %(default)s)",
    )
    add_model_option(embed)
    embed.set_defaults(run=run_embed)
    attend = sub.add_parser("attend", help="per layer and head, the tokens each token attends to")
    attend.add_argument("text", metavar="TEXT")
    attend.add_argument(
        "--top", type=int_in(1), default=1, help="keys shown per token (default %(default)s)"
    )
    attend.add_argument(
        "--layer", type=int_in(0), action="append", help="only this layer (repeatable)"
    )
    attend.add_argument(
        "--head", type=int_in(0), action="append", help="only this head (repeatable)"
    )
    add_model_option(attend)
    attend.set_defaults(run=run_attend)


def run_embed(args: argparse.Namespace) -> int:
    """``attnlab embed``."""
    args.texts = [clean_text(args, f"TEXT {i + 1}", t) for i, t in enumerate(args.texts)]
    for i, t in enumerate(args.texts):  # (an embedding of [CLS] [SEP] alone came out)
        if not t.strip():
            raise UsageError(f"TEXT {i + 1}", "is empty; give a text to embed")
    tokens = model_parts(args.model)[0]  # before the weights load (~1 s)
    for i, t in enumerate(args.texts):
        check_has_tokens(f"TEXT {i + 1}", t, tokens)
    enc, name = load_encoder(args.model)
    with texts_named(lambda i: f"TEXT {i + 1}"):  # (the encoder's texts[1] is TEXT 2)
        emb = enc.encode(args.texts, batch_size=args.batch_size)  # (N, D)
    if args.json:
        print(json.dumps([[round(x, 7) for x in row] for row in emb.tolist()]))
    elif len(args.texts) == 1:
        print(f"embedding of 1 text ({name}, {emb.shape[1]} dims):")
        values = emb[0].tolist()
        for i in range(0, len(values), 8):  # eight a line; the last may hold fewer
            print(" ".join(f"{x:8.4f}" for x in values[i : i + 8]))
    else:
        _print_similarity(args.texts, emb, name)
    return 0


def _print_similarity(texts: list[str], emb: torch.Tensor, name: str) -> None:
    """The cosine matrix of ``emb (N, D)``, rows labelled with their texts."""
    unit = torch.nn.functional.normalize(emb, dim=-1)
    sim = unit @ unit.T  # (N, N)
    print(f"cosine similarity of {len(texts)} texts ({name}):")
    print("     " + "".join(f"{f'[{j}]':>8}" for j in range(len(texts))))
    for i, row in enumerate(sim.tolist()):
        label = clip(texts[i], 60, "...")
        print(f"{f'[{i}]':<5}" + "".join(f"{x:8.4f}" for x in row) + f"  {label}")


def run_attend(args: argparse.Namespace) -> int:
    """``attnlab attend``."""
    text = clean_text(args, "TEXT", args.text)
    if not text.strip():
        raise UsageError("TEXT", "is empty; give a sentence")
    ids_of, config = model_parts(args.model)  # before the weights load (~1 s)
    check_has_tokens("TEXT", text, ids_of)
    name = model_name(args.model)
    _check_in_model("--layer", args.layer, config.num_hidden_layers, "layers", name)
    _check_in_model("--head", args.head, config.num_attention_heads, "heads", name)
    enc = load_encoder(args.model)[0]
    with texts_named(lambda i: "TEXT"):
        ids = enc.tokenize([text])[0]
    tokens = [enc.tokenizer.id_to_token(i) or "?" for i in ids]
    with torch.inference_mode():
        out = enc.bert(torch.tensor([ids]), need_weights=True)
    assert out.attentions is not None
    top = max(1, min(args.top, len(ids)))
    print("tokens: " + " ".join(tokens))
    for li, w in enumerate(out.attentions):  # w: (1, H, L, L)
        if args.layer and li not in args.layer:
            continue
        vals, idx = w[0].topk(top, dim=-1)  # (H, L, top)
        for h in range(w.shape[1]):
            if args.head and h not in args.head:
                continue
            print(f"layer {li} head {h}: " + _head_line(tokens, vals[h], idx[h]))
    return 0


def _check_in_model(argument: str, given: list[int] | None, n: int, what: str, name: str) -> None:
    """Every index in ``given`` is below ``n``, the model's count of ``what``."""
    bad = [i for i in given or [] if i >= n]
    if bad:
        raise UsageError(argument, f"{bad[0]} is out of range: {name} has {what} 0 to {n - 1}")


def _head_line(tokens: list[str], vals: torch.Tensor, idx: torch.Tensor) -> str:
    """``query->key (weight)`` for each token; ``vals, idx (L, top)``."""
    parts = []
    for q, (vs, ks) in enumerate(zip(vals.tolist(), idx.tolist(), strict=True)):
        keys = ",".join(f"{tokens[k]}({v:.2f})" for v, k in zip(vs, ks, strict=True))
        parts.append(f"{tokens[q]}->{keys}")
    return "  ".join(parts)
