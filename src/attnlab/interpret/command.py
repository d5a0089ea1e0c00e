"""``attnlab explain TEXT``: what a sentence encoder attends to, and which tokens matter.

On the shipped all-MiniLM-L6-v2 (or any sentence-transformers folder) it captures every
layer's attention, computes rollout, gradient relevance and integrated gradients of the
embedding, and writes the interactive HTML report with PNG pictures beside it.

The explained score is the embedding's length along its own direction (the raw pooled
vector dotted with its unit vector, held fixed), or with ``--against OTHER`` the cosine
similarity to OTHER's embedding. Token saliency pools the ``(n, n)`` explanations the
way the model pools tokens (the mean of rows for mean pooling, row 0 for [CLS]).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from attnlab.interpret.capture import capture
from attnlab.interpret.explain import gradient_relevance, integrated_gradients, rollout
from attnlab.interpret.flow import attention_flow
from attnlab.interpret.report import report
from attnlab.models.sentence import SentenceEncoder

__all__ = ["Explanation", "add_parsers", "explain_text"]


@dataclass
class Explanation:
    """What :func:`explain_text` found and wrote.

    Attributes:
        tokens: the ``n`` tokens.
        attentions: per-layer ``(H, n, n)`` weights.
        saliency: method -> ``n`` token scores (rollout, relevance, integrated gradients).
        score, baseline_score: the explained score at the text and at the baseline.
        files: the HTML report first, then the PNGs.
    """

    tokens: list[str]
    attentions: list[Tensor]
    saliency: dict[str, list[float]]
    score: float
    baseline_score: float
    files: list[Path] = field(default_factory=list)


def _pool_rows(matrix: Tensor, pooling: str) -> Tensor:
    """``(n, n)`` explanation -> ``(n,)`` token scores, pooled like the model's tokens."""
    return matrix[0] if pooling == "cls" else matrix.mean(0)


def _score_fn(enc: SentenceEncoder, ids: Tensor, against: str | None) -> Callable[[Tensor], Tensor]:
    """``ids (B, n) -> (B,)``: the score that the explanations explain."""
    with torch.no_grad():
        if against is None:
            target = F.normalize(enc.embed_rows(ids, normalize=False), dim=-1)  # (1, D)
        else:
            target = F.normalize(enc.embed_rows(torch.tensor(enc.tokenize([against]))), dim=-1)

    def score(t: Tensor) -> Tensor:
        e = enc.embed_rows(t, normalize=False)
        e = F.normalize(e, dim=-1) if against is not None else e
        return (e * target).sum(-1)

    return score


def explain_text(
    enc: SentenceEncoder,
    text: str,
    out: str | Path,
    *,
    against: str | None = None,
    steps: int = 32,
    flow_tokens: int = 64,
    log: Callable[[str], None] = print,
) -> Explanation:
    """Explain ``enc``'s embedding of ``text`` and write the report to ``out`` (HTML).

    PNGs go beside it: ``<stem>_heads.png`` (every layer's heads), ``<stem>_rollout.png``
    and ``<stem>_saliency_<method>.png``. Attention flow (one max-flow per token pair) is
    computed for texts of at most ``flow_tokens`` tokens.

    Example:
        >>> import tempfile
        >>> enc = SentenceEncoder.from_pretrained()  # needs attnlab[pretrained]
        >>> ex = explain_text(enc, "Cats purr.", tempfile.mkdtemp() + "/r.html", steps=4,
        ...                   log=lambda s: None)
        >>> ex.tokens, [p.suffix for p in ex.files][:2]
        (['[CLS]', 'cats', 'pu', '##rr', '.', '[SEP]'], ['.html', '.png'])
    """
    from attnlab.interpret import plot

    out = Path(out)
    ids = torch.tensor(enc.tokenize([text]))  # (1, n)
    tokens = [enc.tokenizer.id_to_token(int(i)) or "?" for i in ids[0]]
    pooling = enc.config.pooling
    with torch.no_grad(), capture(enc.bert) as cap:
        enc.bert(ids)
    attns = [c.weights[0] for c in cap]  # per layer (H, n, n)
    log(f"{len(tokens)} tokens, {len(attns)} layers x {attns[0].shape[0]} heads captured")
    score = _score_fn(enc, ids, against)
    t0 = time.perf_counter()
    roll = rollout([a[None] for a in attns])[0]  # (n, n)
    rel = gradient_relevance(enc.bert, lambda: score(ids))[0]  # (n, n)
    log(f"rollout and gradient relevance in {time.perf_counter() - t0:.1f} s")
    base = ids.clone()
    base[:, 1:-1] = enc.bert.config.pad_token_id  # keep [CLS] and [SEP]
    t0 = time.perf_counter()
    ig = integrated_gradients(
        score,
        ids,
        base,
        layer=enc.bert.embeddings.word_embeddings,
        steps=steps,
        internal_batch_size=8,
    )
    with torch.no_grad():
        s_x, s_b = float(score(ids)), float(score(base))
    log(
        f"integrated gradients ({steps} steps) in {time.perf_counter() - t0:.1f} s: "
        f"sum {float(ig.per_token().sum()):.4f} vs f(x) - f(baseline) {s_x - s_b:.4f}"
    )
    sal = {"rollout": _pool_rows(roll, pooling).tolist()}
    if len(tokens) <= flow_tokens:
        t0 = time.perf_counter()
        rows = [0] if pooling == "cls" else None
        flow = attention_flow([a[None] for a in attns], outputs=rows, normalize=True)[0]
        sal["attention flow"] = flow.mean(0).tolist()
        log(f"attention flow ({flow.numel()} max-flows) in {time.perf_counter() - t0:.1f} s")
    else:
        log(f"attention flow skipped: {len(tokens)} tokens > flow_tokens={flow_tokens}")
    sal |= {
        "gradient relevance": _pool_rows(rel - torch.eye(len(tokens)), pooling).tolist(),
        "integrated gradients": ig.per_token()[0].tolist(),
    }
    stem = out.with_suffix("")
    pngs = [plot.head_grid(attns, f"{stem}_heads.png", tokens=tokens, title="attention heads")]
    pngs.append(plot.heatmap(roll, tokens, f"{stem}_rollout.png", title="attention rollout"))
    for name, vals in sal.items():
        slug = name.replace(" ", "_")
        pngs.append(plot.saliency(tokens, vals, f"{stem}_saliency_{slug}.png", title=name))
    what = f"similarity to: {against}" if against else "the embedding along its own direction"
    html = report(
        out,
        tokens,
        attns,
        title="attnlab explain",
        text=f"{text}  (score: {what})",
        saliency=sal,
        pictures=pngs,
    )
    return Explanation(tokens, attns, sal, s_x, s_b, [html, *pngs])


def add_parsers(sub: Any) -> None:
    """Add the ``explain`` sub-command to an argparse sub-parser group."""
    p = sub.add_parser("explain", help="explain a sentence encoder's attention (HTML + PNGs)")
    p.add_argument("text", metavar="TEXT")
    p.add_argument("--out", default="report.html", help="the HTML report; PNGs go beside it")
    p.add_argument("--against", default=None, help="explain the similarity to this text")
    p.add_argument("--steps", type=int, default=32, help="integrated-gradients steps")
    p.add_argument(
        "--flow-tokens", type=int, default=64, help="attention flow only up to this many tokens"
    )
    p.add_argument(
        "--model", default=None, help="a sentence-transformers folder (default: all-MiniLM-L6-v2)"
    )
    p.set_defaults(func=_explain)


def _explain(args: argparse.Namespace) -> int:
    enc = SentenceEncoder.from_pretrained(args.model)
    ex = explain_text(
        enc,
        args.text,
        args.out,
        against=args.against,
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
