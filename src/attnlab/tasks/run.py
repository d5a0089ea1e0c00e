"""``attnlab train TASK`` and ``attnlab demo``: train, score, show and report.

The demo is a short run of the translation task: French number words to English, on
numbers never seen in training, with its scores, a few translations, and a report folder
holding cross-attention alignment pictures and a self-contained HTML page.
"""

from __future__ import annotations

import argparse
import base64
import html
import json
import time
from pathlib import Path
from typing import Any

import torch

from attnlab._io import atomic_write
from attnlab.interpret import capture
from attnlab.models.seq2seq import Seq2Seq
from attnlab.tasks.text import pad_batch
from attnlab.tasks.translation import TranslationTask
from attnlab.train import TrainConfig, Trainer

__all__ = ["add_parsers", "demo_command", "train_command"]

TASKS = ("translation",)


def add_parsers(sub: Any) -> None:
    """Add the ``train`` and ``demo`` sub-commands to an argparse sub-parser group."""
    t = sub.add_parser("train", help="train a task model (see README: tasks)")
    t.add_argument("task", choices=TASKS)
    t.add_argument("--steps", type=int, default=2000)
    t.add_argument("--batch-size", type=int, default=128)
    t.add_argument("--lr", type=float, default=2e-3)
    t.add_argument("--train-size", type=int, default=60_000)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--time-limit", type=float, default=None, help="seconds of training")
    t.add_argument("--target", type=float, default=None, help="stop at this eval score")
    t.add_argument("--out", default="runs/translation", help="checkpoints and report")
    t.add_argument("--resume", action="store_true", help="continue from OUT/last.safetensors")
    t.add_argument("--no-progress", action="store_true")
    t.set_defaults(func=train_command)
    d = sub.add_parser("demo", help="the translation task in about 3 minutes, with a report")
    d.add_argument("--out", default="attnlab-demo", help="report folder")
    d.add_argument("--seconds", type=float, default=150.0, help="training time limit")
    d.add_argument("--no-progress", action="store_true")
    d.set_defaults(func=demo_command)


def train_command(args: argparse.Namespace) -> int:
    """Train the translation task with the command line's settings."""
    cfg = TrainConfig(
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        warmup=100,
        eval_every=250,
        target=args.target,
        time_limit=args.time_limit,
        seed=args.seed,
        out_dir=args.out,
        resume=args.resume,
        progress=not args.no_progress,
    )
    _run(TranslationTask(args.train_size, dropout=0.0), cfg, Path(args.out) / "report")
    return 0


def demo_command(args: argparse.Namespace) -> int:
    """A short translation run (``--seconds`` of training) with scores and a report."""
    print("attnlab demo: French number words -> English number words (num2words)")
    print("held-out numbers never appear in training; model: 2+2-layer transformer\n")
    cfg = TrainConfig(
        steps=1100,
        batch_size=128,
        lr=2e-3,
        warmup=100,
        eval_every=275,
        time_limit=args.seconds,
        out_dir=None,
        progress=not args.no_progress,
    )
    _run(TranslationTask(40_000, eval_size=200, dropout=0.0), cfg, Path(args.out))
    return 0


def _run(task: TranslationTask, cfg: TrainConfig, report: Path) -> None:
    print(f"data: {task.num_train()} training pairs, {len(task.test_pairs)} held-out pairs")
    trainer = Trainer(task, cfg, on_eval=lambda r: print(json.dumps(r), flush=True))
    t0 = time.perf_counter()
    trainer.fit()
    print(f"trained {trainer.step} steps in {time.perf_counter() - t0:.0f} s")
    model = trainer.model.eval()
    assert isinstance(model, Seq2Seq)
    greedy = task.evaluate(model, limit=len(task.test_pairs))
    beam = task.evaluate(model, limit=200, beam=4)
    scores = {"greedy_exact": greedy["exact"], "greedy_bleu": greedy["bleu"]}
    scores |= {"beam4_exact_first200": beam["exact"], "beam4_bleu_first200": beam["bleu"]}
    print("held-out scores:", json.dumps(scores))
    samples = _samples(task, model, n=6)
    for src, hyp, ref in samples:
        print(f"  {'ok ' if hyp == ref else 'BAD'} {src}\n      -> {hyp}")
    write_report(task, model, samples, scores, report)
    print(f"report: {report / 'report.html'}")


def _samples(task: TranslationTask, model: Seq2Seq, n: int) -> list[tuple[str, str, str]]:
    pairs = task.test_pairs[:n]
    hyps = task.translate(model, [s for s, _ in pairs])
    return [(s, h, r) for (s, r), h in zip(pairs, hyps, strict=True)]


def cross_alignment(task: TranslationTask, model: Seq2Seq, src: str, hyp: str) -> torch.Tensor:
    """Cross-attention of each output token over the source, mean over heads and layers:
    ``(Lt + 1, Ls)`` (the last row is the end-of-sentence step)."""
    s, lengths = pad_batch([task.src_vocab.encode(src)])
    t, _ = pad_batch([[1, *task.tgt_vocab.encode(hyp)]])
    with torch.no_grad(), capture(model, layers=["*.cross_attn"]) as cap:
        model(s, lengths, t)
    return torch.stack([c.weights[0].mean(0) for c in cap]).mean(0)  # (Lt, Ls)


def write_report(
    task: TranslationTask,
    model: Seq2Seq,
    samples: list[tuple[str, str, str]],
    scores: dict[str, float],
    folder: Path,
) -> Path:
    """Alignment PNGs and a self-contained ``report.html`` (images inlined) in ``folder``."""
    from attnlab.interpret.plot import alignment

    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, (src, hyp, ref) in enumerate(samples[:4]):
        w = cross_alignment(task, model, src, hyp)
        src_toks = [task.src_vocab.tokens[j] for j in task.src_vocab.encode(src)]
        tgt_toks = [task.tgt_vocab.tokens[j] for j in task.tgt_vocab.encode(hyp)] + ["</s>"]
        png = alignment(w, src_toks, tgt_toks, folder / f"alignment_{i}.png", title=src)
        rows.append((src, hyp, ref, base64.b64encode(png.read_bytes()).decode()))
    return _write_html(folder / "report.html", rows, scores)


def _write_html(
    path: Path, rows: list[tuple[str, str, str, str]], scores: dict[str, float]
) -> Path:
    parts = ["<!doctype html><meta charset='utf-8'><title>attnlab demo</title>"]
    parts.append("<style>body{font-family:sans-serif;max-width:60em;margin:auto}</style>")
    parts.append("<h1>French number words to English</h1><p>Held-out scores: ")
    parts.append(html.escape(", ".join(f"{k} {v}" for k, v in scores.items())) + "</p>")
    for src, hyp, ref, img in rows:
        ok = "correct" if hyp == ref else f"expected: {html.escape(ref)}"
        parts.append(f"<h3>{html.escape(src)}</h3><p>{html.escape(hyp)} ({ok})</p>")
        parts.append(f"<img alt='cross-attention alignment' src='data:image/png;base64,{img}'>")
    text = "\n".join(parts)
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"), mode=0o644)
