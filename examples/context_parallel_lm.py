"""Train a small decoder LM on long packed rows with context-parallel attention.

Rows of ``--seq`` tokens (8192 by default) are packed from the generation task's
sentences (num2words and Babel); attention is ``documents & causal`` so no sentence sees
another. The world is ``dp x cp`` ranks: each group of ``cp`` consecutive ranks holds one
row, cut in the zigzag layout, and runs :func:`attnlab.distributed.attention`; gradients
are summed over each context group and averaged over the data-parallel groups.

Single node::

    torchrun --nproc-per-node 4 examples/context_parallel_lm.py --cp 2   # dp=2, cp=2

Several nodes (run on each)::

    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d \\
        --rdzv-endpoint HOST:29500 examples/context_parallel_lm.py --cp 8

Without torchrun, ``--local P`` spawns P local gloo processes (``--local 1``: the
single-process run the context-parallel one must equal, loss for loss).
"""

from __future__ import annotations

import argparse
import json
import math
import os
from typing import NoReturn

import torch
import torch.distributed as dist
from torch import Tensor, nn

import attnlab.distributed as D
from attnlab import masks
from attnlab.distributed.launch import run_local
from attnlab.tasks.generation import make_sentences
from attnlab.tasks.text import Vocab


def packed_rows(rows: int, seq: int, seed: int = 0) -> tuple[Tensor, Tensor, int]:
    """``rows`` rows of ``seq`` token ids and document ids ``(rows, seq)``, vocab size."""
    texts = [f"{p} {c}" for p, c in make_sentences(rows * seq // 8, seed)]
    vocab = Vocab.build(texts)
    ids: list[int] = []
    docs: list[int] = []
    for doc, text in enumerate(texts):
        words = vocab.encode(text)
        ids += words
        docs += [doc] * len(words)
        if len(ids) >= rows * seq:
            break
    n = rows * seq
    return torch.tensor(ids[:n]).view(rows, seq), torch.tensor(docs[:n]).view(rows, seq), len(vocab)


class Parser(argparse.ArgumentParser):
    """argparse whose errors are one line on stderr (exit status 2), without the usage."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


class Block(nn.Module):
    """Pre-norm attention and MLP; attention is context-parallel over ``group``."""

    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.out = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x: Tensor, mask: masks.Mask, group: object) -> Tensor:
        b, length, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, length, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        a = D.attention(q, k, v, mask=mask, group=group)  # (B, H, L_r, E)
        x = x + self.out(a.transpose(1, 2).reshape(b, length, d))
        return x + self.mlp(self.norm2(x))


class TinyLM(nn.Module):
    def __init__(self, vocab: int, seq: int, d: int = 64, heads: int = 4, layers: int = 2) -> None:
        super().__init__()
        self.embed, self.pos = nn.Embedding(vocab, d), nn.Embedding(seq, d)
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.head = nn.Linear(d, vocab)

    def forward(self, ids: Tensor, pos: Tensor, mask: masks.Mask, group: object) -> Tensor:
        x = self.embed(ids) + self.pos(pos)  # (B, L_r, d)
        for blk in self.blocks:
            x = blk(x, mask, group)
        return self.head(x)


def train(
    rank: int, world: int, cp: int, seq: int, steps: int, dtype: str = "float32"
) -> list[float]:
    """The losses of data-parallel group 0 over ``steps`` AdamW steps."""
    dp, r = world // cp, rank % cp
    groups = [dist.new_group(list(range(g * cp, (g + 1) * cp))) for g in range(dp)]
    group = groups[rank // cp]
    ids, docs, vocab = packed_rows(dp, seq)
    ids, docs = ids[rank // cp : rank // cp + 1], docs[rank // cp]  # this group's row
    targets = torch.cat([ids[:, 1:], torch.full((1, 1), -100)], 1)
    targets[0, :-1][docs[1:] != docs[:-1]] = -100  # no target across a document boundary
    valid = int((targets != -100).sum())
    torch.manual_seed(0)
    model = TinyLM(vocab, seq).to(getattr(torch, dtype))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    mask = masks.documents(docs) & masks.causal()
    local_ids, local_t = (D.shard(t, r, cp, dim=1) for t in (ids, targets))
    pos = D.positions(seq, r, cp)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        logits = model(local_ids, pos, mask, group)
        loss = (
            nn.functional.cross_entropy(logits.flatten(0, 1), local_t.flatten(), reduction="sum")
            / valid
        )
        loss.backward()
        for p in model.parameters():  # sum over the context group, mean over data groups
            grad = p.grad
            assert grad is not None  # every parameter takes part in the loss
            dist.all_reduce(grad)
            grad.div_(dp)
        opt.step()
        total = loss.detach().double()
        dist.all_reduce(total, group=group)
        losses.append(float(total))
    return losses


def _checked(p: argparse.ArgumentParser, args: argparse.Namespace, world: int) -> int:
    """The context-parallel group size, once the options fit ``world`` ranks (else a
    one-line usage error, exit status 2)."""
    if world < 1:
        p.error(f"argument --local: must be >= 1, got {world}")
    cp = world if args.cp is None else args.cp
    if cp < 1 or world % cp:
        p.error(f"argument --cp: must divide the {world} ranks, got {cp}")
    if args.steps < 1:
        p.error(f"argument --steps: must be >= 1, got {args.steps}")
    if args.seq < 16 * cp:  # each rank holds two chunks of at least 8 tokens
        p.error(f"argument --seq: must be >= 16 x cp = {16 * cp}, got {args.seq}")
    return cp


def main() -> None:
    first = " ".join((__doc__ or "").split("\n\n")[0].split())
    p = Parser(description=first, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--seq", type=int, default=8192, help="tokens per row")
    p.add_argument("--steps", type=int, default=20, help="AdamW steps")
    p.add_argument("--cp", type=int, default=None, help="context-parallel group size")
    p.add_argument("--local", type=int, default=None, help="spawn this many local processes")
    p.add_argument(
        "--dtype", default="float32", choices=["float32", "float64", "bfloat16"], help="model dtype"
    )
    args = p.parse_args()
    if args.local is not None:
        cp = _checked(p, args, args.local)
        losses = run_local(train, args.local, cp, args.seq, args.steps, args.dtype, timeout=3600)[0]
    else:
        dist.init_process_group("gloo")
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
        world, rank = dist.get_world_size(), dist.get_rank()
        try:
            cp = _checked(p, args, world)
            losses = train(rank, world, cp, args.seq, args.steps, args.dtype)
        finally:  # (without it a rank could abort at exit: "terminate called without an
            dist.destroy_process_group()  # active exception", and torchrun exited 1)
        if rank != 0:
            return
    print(json.dumps({"losses": losses, "perplexity": math.exp(losses[-1])}))


if __name__ == "__main__":
    main()
