"""ListOps accuracy of exact attention and each approximation, a small LRA-style comparison.

ListOps (Nangia & Bowman 2018; LRA's version, Tay et al. 2020) asks for the value, 0-9,
of a nested expression such as ``[MAX 4 3 [MIN 2 3 ] 1 0 [MED 1 5 8 9 2 ] ]``; the
operators are MAX, MIN, MED (median, rounded down) and SM (sum modulo 10). The generator
follows LRA's: a node is an operator with probability 0.25 (up to ``max_depth``) and has
2 to ``max_args`` arguments. Sequences here are at most 128 tokens (LRA: up to 2K) so
that a small encoder trains on a CPU in about a minute per method.

Each method trains the same classifier (token + learned position embeddings, a stack of
pre-norm :class:`attnlab.nn.EncoderLayer`, mean pooling over real tokens, a linear head;
dropout 0.1 except on attention weights, which the approximations do not form) with the
layer's self-attention swapped: ``exact`` (engine ``auto``), the ``linear``, ``performer``
and ``nystrom`` engines, and :class:`attnlab.nn.LinformerAttention`. Their sizes are a
quarter of ``max_len`` (32 features, landmarks or projected rows at 128 tokens), about
LRA's ratio (256 at 1K-2K). Same data, seed, steps and optimizer for all. LRA's published
ListOps accuracies (Transformer 36.37, Performer 18.01, Linformer 35.70, Linear
Transformer 16.13; Nystromformer is not in LRA's table) are printed beside them as a
reference, not a target: LRA's sequences are 16x longer and its models bigger.

python benchmarks/listops.py --threads 1   # 5 methods, 1-2 minutes each on a CPU core
python benchmarks/listops.py --smoke    # a few steps, for CI
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import attnlab
from attnlab import masks as M
from attnlab.cli._args import float_in, int_in, names_in, parse_smoke, script_parser
from attnlab.nn import EncoderLayer, LayerConfig, LinformerAttention

METHODS = ("exact", "linear", "performer", "nystrom", "linformer")
LRA_ACCURACY = {"exact": 36.37, "linear": 16.13, "performer": 18.01, "linformer": 35.70}
OPS: dict[str, Callable[[list[int]], int]] = {
    "[MAX": max,
    "[MIN": min,
    "[MED": lambda xs: int(statistics.median(xs)),
    "[SM": lambda xs: sum(xs) % 10,
}
VOCAB = ["<pad>", *(str(d) for d in range(10)), *OPS, "]"]
TOKEN_ID = {tok: i for i, tok in enumerate(VOCAB)}


def _tree(rng: random.Random, depth: int, max_depth: int, max_args: int) -> tuple[list[str], int]:
    """Tokens and value of a random expression; the root (depth 0) is always an operator."""
    if depth > 0 and (depth >= max_depth or rng.random() > 0.25):
        digit = rng.randrange(10)
        return [str(digit)], digit
    op = rng.choice(list(OPS))
    tokens, values = [op], []
    for _ in range(rng.randint(2, max_args)):
        sub, val = _tree(rng, depth + 1, max_depth, max_args)
        tokens += sub
        values.append(val)
    return [*tokens, "]"], OPS[op](values)


def generate(
    n: int,
    *,
    max_len: int = 128,
    min_len: int = 16,
    seed: int = 0,
    max_depth: int = 6,
    max_args: int = 5,
) -> list[tuple[list[str], int]]:
    """``n`` distinct-draw examples ``(tokens, label)`` with ``min_len <= len <= max_len``."""
    rng, out = random.Random(seed), []
    while len(out) < n:
        tokens, label = _tree(rng, 0, max_depth, max_args)
        if min_len <= len(tokens) <= max_len:
            out.append((tokens, label))
    return out


def encode(examples: list[tuple[list[str], int]]) -> tuple[Tensor, Tensor, Tensor]:
    """Token ids ``(N, L)`` padded with 0, lengths ``(N,)`` and labels ``(N,)``."""
    length = max(len(t) for t, _ in examples)
    ids = torch.zeros(len(examples), length, dtype=torch.long)
    for i, (tokens, _) in enumerate(examples):
        ids[i, : len(tokens)] = torch.tensor([TOKEN_ID[t] for t in tokens])
    lengths = torch.tensor([len(t) for t, _ in examples])
    return ids, lengths, torch.tensor([label for _, label in examples])


class EngineAttention(nn.Module):
    """Multi-head self-attention through ``attnlab.attention(engine=, engine_options=)``,
    with :class:`attnlab.nn.MultiHeadAttention`'s call, to be an EncoderLayer's
    ``self_attn`` (MultiHeadAttention itself does not pass engine options on)."""

    def __init__(self, d: int, heads: int, engine: str, options: dict[str, object]) -> None:
        super().__init__()
        self.heads, self.engine, self.options = heads, engine, options or None
        self.qkv, self.out = nn.Linear(d, 3 * d), nn.Linear(d, d)

    def forward(self, x: Tensor, *, mask: M.Mask | None = None, **_: object) -> Tensor:
        """``x (B, L, D) -> (B, L, D)``."""
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        out = attnlab.attention(  # q, k, v: (B, H, L, E)
            q, k, v, mask=mask, engine=self.engine, engine_options=self.options
        )
        assert isinstance(out, Tensor)
        return self.out(out.transpose(1, 2).reshape(b, n, d))


def attention_layer(method: str, args: argparse.Namespace) -> nn.Module:
    """The self-attention of ``method``, its size a quarter of ``max_len``."""
    d, h, size = args.d_model, args.heads, args.max_len // 4
    if method == "linformer":
        return LinformerAttention(d, h, max_len=args.max_len, proj_dim=size)
    options: dict[str, dict[str, object]] = {
        "performer": {"num_features": size, "seed": args.seed},
        "nystrom": {"num_landmarks": size},
    }
    engine = "auto" if method == "exact" else method
    return EngineAttention(d, h, engine, options.get(method, {}))


class Classifier(nn.Module):
    """Embeddings, ``layers`` pre-norm encoder layers, mean pooling, a 10-way head."""

    def __init__(self, method: str, args: argparse.Namespace) -> None:
        super().__init__()
        d, h = args.d_model, args.heads
        self.embed = nn.Embedding(len(VOCAB), d, padding_idx=0)
        self.pos = nn.Parameter(torch.randn(args.max_len, d) * 0.02)
        self.layers = nn.ModuleList()
        for _ in range(args.layers):
            layer = EncoderLayer(LayerConfig(d, h, 2 * d, dropout=0.1, norm_first=True))
            layer.self_attn = attention_layer(method, args)  # type: ignore[assignment]
            self.layers.append(layer)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, 10)

    def forward(self, ids: Tensor, lengths: Tensor) -> Tensor:
        """``ids (B, L)``, ``lengths (B,)`` -> logits ``(B, 10)``."""
        x = self.embed(ids) + self.pos[: ids.shape[1]]  # (B, L, D)
        mask = M.padding(lengths)
        for layer in self.layers:
            x = layer(x, mask=mask)
        real = (torch.arange(ids.shape[1]) < lengths[:, None]).unsqueeze(-1)  # (B, L, 1)
        pooled = (self.norm(x) * real).sum(1) / lengths[:, None]  # (B, D)
        return self.head(pooled)


def train_and_test(
    method: str, data: dict[str, tuple[Tensor, ...]], args: argparse.Namespace
) -> dict[str, object]:
    """Train one classifier for ``args.steps`` steps; its test accuracy and times."""
    torch.manual_seed(args.seed)
    model = Classifier(method, args)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, args.lr, total_steps=args.steps)
    ids, lengths, labels = data["train"]
    gen = torch.Generator().manual_seed(args.seed)
    t0 = time.perf_counter()
    model.train()
    for _ in range(args.steps):
        idx = torch.randint(len(labels), (args.batch,), generator=gen)
        n = int(lengths[idx].max())
        loss = F.cross_entropy(model(ids[idx, :n], lengths[idx]), labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    train_s = time.perf_counter() - t0
    return {
        "method": method,
        "test_acc": round(100 * accuracy(model, data["test"]), 2),
        "final_loss": round(loss.item(), 3),
        "train_s": round(train_s, 1),
    }


@torch.no_grad()
def accuracy(model: nn.Module, split: tuple[Tensor, ...], batch: int = 250) -> float:
    """Fraction of correct predictions, in batches (eval mode)."""
    model.eval()
    ids, lengths, labels = split
    correct = 0
    for i in range(0, len(labels), batch):
        sl = slice(i, i + batch)
        n = int(lengths[sl].max())
        correct += int((model(ids[sl, :n], lengths[sl]).argmax(-1) == labels[sl]).sum())
    return correct / len(labels)


def main(argv: list[str] | None = None) -> int:
    p = script_parser(__doc__)
    p.add_argument("--methods", type=names_in(METHODS), default=",".join(METHODS))
    p.add_argument("--train", type=int_in(1), default=20000, help="training examples")
    p.add_argument("--test", type=int_in(1), default=2000, help="test examples")
    p.add_argument("--max-len", type=int_in(16), default=128)
    p.add_argument("--steps", type=int_in(1), default=1500)
    p.add_argument("--batch", type=int_in(1), default=32)
    p.add_argument("--lr", type=float_in(0.0, open_low=True), default=2e-3)
    p.add_argument("--d-model", type=int_in(1), default=64)
    p.add_argument("--heads", type=int_in(1), default=4)
    p.add_argument("--layers", type=int_in(1), default=2)
    p.add_argument("--seed", type=int_in(0), default=0)
    p.add_argument(
        "--threads", type=int_in(0), default=0, help="torch threads (0: torch's default)"
    )
    p.add_argument("--smoke", action="store_true", help="a few steps on little data (CI)")
    args = parse_smoke(p, argv, {"train": 200, "test": 50, "steps": 3, "max_len": 48})
    if args.threads:
        torch.set_num_threads(args.threads)
    examples = generate(args.train + args.test, max_len=args.max_len, seed=args.seed)
    data = {"train": encode(examples[: args.train]), "test": encode(examples[args.train :])}
    majority = torch.bincount(data["test"][2], minlength=10).max().item() / args.test
    print(
        json.dumps(
            {
                "bench": "listops_data",
                "train": args.train,
                "test": args.test,
                "max_len": args.max_len,
                "majority_acc": round(100 * majority, 2),
            }
        ),
        flush=True,
    )
    for method in args.methods:
        rec = {"bench": "listops", **train_and_test(method, data, args)}
        rec["cpu"] = torch.backends.cpu.get_cpu_capability()  # train_s is a time
        rec["lra_reference"] = LRA_ACCURACY.get(method)
        print(json.dumps(rec), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
