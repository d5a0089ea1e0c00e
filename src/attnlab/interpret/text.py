"""Explain a text encoder: what it attends to, and which tokens matter to its embedding.

:func:`explain_text` captures every layer's attention, computes rollout, attention flow,
gradient relevance and integrated gradients of the embedding, and writes the interactive
HTML report with PNG pictures beside it (``attnlab explain`` runs it on a sentence
encoder). The encoder comes in as a :class:`TextModel`: the few things the explanations
use, so this module knows no model class.

The explained score is the embedding's length along its own direction (the raw pooled
vector dotted with its unit vector, held fixed), or with ``against=OTHER`` the cosine
similarity to OTHER's embedding. Token saliency pools the ``(n, n)`` explanations the
way the model pools tokens (the mean of rows for mean pooling, row 0 for [CLS], and for a
decoder the rows its scored log-probabilities are read from).
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnlab._scalars import plain
from attnlab.interpret.capture import capture
from attnlab.interpret.explain import (
    Attribution,
    gradient_relevance,
    integrated_gradients,
    rollout,
)
from attnlab.interpret.flow import attention_flow
from attnlab.interpret.report import report
from attnlab.nn._modes import eval_mode

__all__ = [
    "Explanation",
    "TextModel",
    "captured_attentions",
    "explain_text",
    "explained_score",
    "explanation_files",
    "write_explanation",
]


@dataclass(frozen=True)
class TextModel:
    """A text encoder as the explanations see it.

    Attributes:
        network: the attention stack; ``network(ids)`` runs it on ids ``(1, n)`` (its
            attention calls are captured and differentiated).
        tokenize: a text -> its ``n`` token ids, special tokens included.
        token_name: a token id -> the token's string.
        pooled: ids ``(B, n)`` -> the raw pooled embedding ``(B, D)``, differentiable.
        embed: ids ``(B, n)`` -> the embedding ``(B, D)`` as the model gives it.
        input_embeddings: the module whose output integrated gradients interpolate.
        pad_id: the baseline's token id (the first token when ``keep_first`` and the last
            ``keep_last`` are kept).
        keep_first: whether the baseline keeps the first token: a special token the
            tokenizer puts first ([CLS], <s>), not a word of the text (GPT-2 adds none).
        keep_last: tokens at the end the baseline keeps: a decoder's scored continuation
            (padded, its log-probability was of other tokens than the path's).
        pooling: ``"cls"`` (the first token's state), ``"next"`` (a decoder's
            log-probability of its last ``keep_last`` tokens, read from the rows before
            each) or another pooling (a mean of tokens).
        scored: (``"next"``) the scored tokens' text, as the report names the score
            (the tokens' names joined when empty).

    Example:
        >>> from attnlab.nn import MultiHeadAttention
        >>> words = nn.Embedding(10, 8)
        >>> net = nn.Sequential(words, MultiHeadAttention(8, 2))
        >>> model = TextModel(net, tokenize=lambda s: [1, *(2 + len(w) for w in s.split()), 9],
        ...                   token_name=str, pooled=lambda t: net(t).mean(1),
        ...                   embed=lambda t: F.normalize(net(t).mean(1), dim=-1),
        ...                   input_embeddings=words, pad_id=0)
        >>> ids = torch.tensor([model.tokenize("a toy text")])
        >>> ids.tolist(), tuple(model.embed(ids).shape), len(captured_attentions(model, ids))
        ([[1, 3, 5, 6, 9]], (1, 8), 1)
    """

    network: nn.Module
    tokenize: Callable[[str], Sequence[int]]
    token_name: Callable[[int], str]
    pooled: Callable[[Tensor], Tensor]
    embed: Callable[[Tensor], Tensor]
    input_embeddings: nn.Module
    pad_id: int
    pooling: str = "mean"
    keep_last: int = 1
    keep_first: bool = True
    scored: str = ""


@dataclass
class Explanation:
    """What :func:`explain_text` found and wrote.

    Attributes:
        tokens: the ``n`` tokens.
        attentions: per-layer ``(H, n, n)`` weights.
        saliency: method -> ``n`` token scores (rollout, relevance, integrated gradients).
        score, baseline_score: the explained score at the text and at the baseline.
        files: the HTML report first, then the PNGs.

    Example:
        >>> ex = Explanation(["[CLS]", "cats", "[SEP]"], [torch.eye(3)[None]],
        ...                  {"rollout": [0.25, 0.5, 0.25]}, score=0.75, baseline_score=0.25)
        >>> max(zip(ex.saliency["rollout"], ex.tokens)), ex.score - ex.baseline_score, ex.files
        ((0.5, 'cats'), 0.5, [])
    """

    tokens: list[str]
    attentions: list[Tensor]
    saliency: dict[str, list[float]]
    score: float
    baseline_score: float
    files: list[Path] = field(default_factory=list)


def _score_rows(model: TextModel, n: int) -> list[int] | None:
    """The rows of an ``(n, n)`` explanation the explained score reads (None: all)."""
    if model.pooling == "cls":
        return [0]
    if model.pooling == "next":  # row i predicts token i + 1
        return list(range(n - 1 - model.keep_last, n - 1))
    return None


def _score_name(model: TextModel, tokens: list[str], against: str | None) -> str:
    """What the explained score is, as the report's note names it: a decoder's
    ``-log p(continuation | text)``, a similarity, or the embedding's length.

    Example:
        >>> _score_name(_toy(), ["1", "3", "9"], None), _score_name(_toy(), [], "dogs")
        ('the embedding along its own direction', 'similarity to: dogs')
    """
    if against is not None:
        return f"similarity to: {against}"
    if model.pooling == "next":
        scored = model.scored or " ".join(tokens[len(tokens) - model.keep_last :])
        return f'-log p("{scored}" | text)'
    return "the embedding along its own direction"


def _pool_rows(matrix: Tensor, rows: list[int] | None) -> Tensor:
    """``(n, n)`` explanation -> ``(n,)`` token scores: the mean of ``rows`` (None: all)."""
    return (matrix if rows is None else matrix[rows]).mean(0)


def _toy(dim: int = 8) -> TextModel:
    """The docstrings' example model: a word is the id ``2 + len(word)`` between ``1`` and
    ``9``; embeddings of size ``dim`` and two attention layers of 2 heads."""
    from attnlab.nn import MultiHeadAttention  # only the examples need it

    words = nn.Embedding(10, dim)
    net = nn.Sequential(words, MultiHeadAttention(dim, 2), MultiHeadAttention(dim, 2))
    return TextModel(
        net,
        tokenize=lambda s: [1, *(2 + len(w) for w in s.split()), 9],
        token_name=str,
        pooled=lambda t: net(t).mean(1),
        embed=lambda t: F.normalize(net(t).mean(1), dim=-1),
        input_embeddings=words,
        pad_id=0,
    )


def captured_attentions(model: TextModel, ids: Tensor) -> list[Tensor]:
    """Every layer's attention weights ``(H, n, n)`` on ids ``(1, n)``, in layer order.

    Example:
        >>> toy = _toy()  # two attention layers over word lengths (see _toy)
        >>> ids = torch.tensor([toy.tokenize("a toy text")])
        >>> attns = captured_attentions(toy, ids)
        >>> len(attns), tuple(attns[0].shape)  # 2 layers of 2 heads over 5 tokens
        (2, (2, 5, 5))
        >>> bool(torch.allclose(attns[1].sum(-1), torch.ones(2, 5)))  # rows sum to 1
        True
    """
    with torch.no_grad(), capture(model.network) as cap:
        model.network(ids)
    return [c.weights[0] for c in cap]


def explained_score(
    model: TextModel, ids: Tensor, against: str | None = None
) -> Callable[[Tensor], Tensor]:
    """``ids (B, n) -> (B,)``: the score that the explanations explain (see the module).

    Example:
        >>> toy = _toy()  # two attention layers over word lengths (see _toy)
        >>> ids = torch.tensor([toy.tokenize("a toy text")])
        >>> score = explained_score(toy, ids)  # the pooled vector's length
        >>> bool(torch.isclose(score(ids), toy.pooled(ids).norm(dim=-1)).all())
        True
        >>> cosine = explained_score(toy, ids, against="a toy text")  # to that text's embedding
        >>> round(float(cosine(ids).detach()), 4)
        1.0
    """
    with torch.no_grad():
        if against is None:
            target = F.normalize(model.pooled(ids), dim=-1)  # (1, D)
        else:
            other = torch.tensor([list(model.tokenize(against))])  # (1, m)
            target = F.normalize(model.embed(other), dim=-1)
            if target.shape[-1] == 1:  # every cosine was 1 and every explanation 0
                raise ValueError(
                    f"against={against!r}: the model's embedding is one number (a "
                    f"decoder's log-probability), which has no similarity; use an encoder"
                )

    def score(t: Tensor) -> Tensor:
        e = model.pooled(t)
        e = F.normalize(e, dim=-1) if against is not None else e
        return (e * target).sum(-1)

    return score


Progress = Callable[[int, int, str], None]
"""``progress(done, total, label)``: ``done`` of ``total`` units of the work ``label``."""


def _integrated(
    model: TextModel,
    score: Callable[[Tensor], Tensor],
    ids: Tensor,
    steps: int,
    progress: Progress | None = None,
) -> tuple[Attribution, float, float]:
    """Integrated gradients from a baseline of padding between the first token (when
    ``keep_first``) and the last ``keep_last``, and the score at the text and at the
    baseline; ``progress`` hears the path's steps done before each chunk and at the end."""
    base = ids.clone()
    base[:, int(model.keep_first) : ids.shape[1] - model.keep_last] = model.pad_id
    done, tell = 0, progress or (lambda done, total, label: None)

    def counted(t: Tensor) -> Tensor:  # the path's chunks run with gradients (captum also
        nonlocal done  # scores the input and the baseline, without)
        if torch.is_grad_enabled():
            tell(done, steps, "integrated gradients")
            done = min(steps, done + t.shape[0])
        return score(t)

    ig = integrated_gradients(
        counted, ids, base, layer=model.input_embeddings, steps=steps, internal_batch_size=8
    )
    tell(steps, steps, "integrated gradients")
    with torch.no_grad():
        return ig, float(score(ids)), float(score(base))


FLOW_CHUNK = 4  # output rows per max-flow call: progress between (about 13 s at 253 tokens)


def _flow_saliency(
    attns: list[Tensor],
    rows: list[int] | None,
    flow_tokens: int,
    log: Callable[[str], None],
    progress: Progress | None = None,
) -> dict[str, list[float]]:
    """``{"attention flow": n scores}``, or nothing past ``flow_tokens`` tokens; computed
    :data:`FLOW_CHUNK` output rows at a time (rows are independent max-flows: the same
    numbers as in one call), ``progress`` hearing the rows done."""
    n = attns[0].shape[-1]
    if n > flow_tokens:
        log(f"attention flow skipped: {n} tokens > flow_tokens={flow_tokens}")
        return {}
    t0, tell = time.perf_counter(), progress or (lambda done, total, label: None)
    layers, wanted = [a[None] for a in attns], list(range(n)) if rows is None else rows
    parts = []  # (r, n) each
    for start in range(0, len(wanted), FLOW_CHUNK):
        tell(start, len(wanted), "attention flow")
        chunk = wanted[start : start + FLOW_CHUNK]
        parts.append(attention_flow(layers, outputs=chunk, normalize=True)[0])
    tell(len(wanted), len(wanted), "attention flow")
    flow = torch.cat(parts)  # (len(wanted), n)
    log(f"attention flow ({flow.numel()} max-flows) in {time.perf_counter() - t0:.1f} s")
    return {"attention flow": flow.mean(0).tolist()}


SALIENCY = ("rollout", "attention flow", "gradient relevance", "integrated gradients")


def explanation_files(out: str | Path, saliency: Sequence[str] = SALIENCY) -> list[Path]:
    """The files :func:`write_explanation` writes for report ``out``: the report, then the
    heads and rollout pictures and one per name in ``saliency``.

    Example:
        >>> [p.name for p in explanation_files("r.html", ["attention flow"])]
        ['r.html', 'r_heads.png', 'r_rollout.png', 'r_saliency_attention_flow.png']
    """
    stem = Path(out).with_suffix("")
    names = ["heads", "rollout"]
    first: dict[str, str] = {}
    for n in saliency:  # letters, digits, "_" and "-" only: "a/b" wrote into a folder "r_a"
        safe = "saliency_" + re.sub(r"[^\w-]+", "_", n)
        if safe in first:  # ("x y" and "x_y" wrote one picture, the first lost)
            raise ValueError(
                f"saliency names {first[safe]!r} and {n!r} would share the picture {safe}.png; "
                "give names that differ in letters or digits"
            )
        first[safe] = n
        names.append(safe)
    return [Path(out), *(Path(f"{stem}_{n}.png") for n in names)]


def write_explanation(
    out: str | Path,
    tokens: list[str],
    attns: list[Tensor],
    roll: Tensor,
    saliency: dict[str, list[float]],
    *,
    text: str = "",
    note: str = "",
) -> list[Path]:
    """The HTML report ``out`` and PNGs beside it (heads, rollout ``roll (n, n)``, one per
    saliency method); returns the report first, then the PNGs.

    Example:
        >>> import tempfile
        >>> attns = [torch.full((1, 3, 3), 1 / 3)]  # one layer, one head, 3 tokens
        >>> with tempfile.TemporaryDirectory() as d:  # no saliency: no saliency PNGs
        ...     files = write_explanation(Path(d) / "r.html", list("abc"), attns, attns[0][0], {})
        ...     sizes = [f.stat().st_size > 0 for f in files]
        >>> [f.name for f in files], all(sizes)
        (['r.html', 'r_heads.png', 'r_rollout.png'], True)
    """
    from attnlab.interpret import plot

    heads, rollout, *pictures = explanation_files(out, list(saliency))[1:]
    pngs = [plot.head_grid(attns, heads, tokens=tokens, title="attention heads")]
    pngs.append(plot.heatmap(roll, tokens, rollout, title="attention rollout"))
    for (name, vals), picture in zip(saliency.items(), pictures, strict=True):
        pngs.append(plot.saliency(tokens, vals, picture, title=name))
    html = report(
        out, tokens, attns, title="attnlab explain", text=text, note=note, saliency=saliency,
        pictures=pngs,
    )  # fmt: skip
    return [html, *pngs]


def _check_explain_args(
    model: object, text: object, out: object, against: object, steps: object, flow: object
) -> tuple[int, int]:
    """:func:`explain_text`'s arguments, checked before any work (TypeError/ValueError);
    ``steps`` and ``flow`` returned as Python's ints (numpy's taken)."""
    if not isinstance(model, TextModel):
        raise TypeError(f"model must be a TextModel, got {type(model).__name__}")
    for name, value in (("text", text), ("against", against)):
        if not (isinstance(value, str) or (name == "against" and value is None)):
            raise TypeError(f"{name} must be a str, got {type(value).__name__}")
    for name, value in (("text", text), ("against", against)):
        if value is not None and not str(value).strip():  # (against="" was scored as the
            # empty text's embedding, and the report called it "its own direction")
            raise ValueError(f"{name} must be a non-empty str, got an empty or blank one")
    if not isinstance(out, str | Path):
        raise TypeError(f"out must be a str or Path (the .html report), got {type(out).__name__}")
    if Path(out).is_dir():
        raise ValueError(f"out must be a file path, got the folder {str(out)!r}")
    if Path(out).suffix.lower() not in ("", ".html", ".htm"):  # (r.png was written as HTML)
        msg = f"out {str(out)!r} ends in {Path(out).suffix!r}, but the report written is HTML"
        raise ValueError(msg + "; give a name ending in .html or .htm")
    n, most = plain(steps), plain(flow)
    if isinstance(n, bool) or not isinstance(n, int) or n < 2:
        raise ValueError(f"steps must be an int >= 2 (integrated gradients), got {steps!r}")
    if isinstance(most, bool) or not isinstance(most, int) or most < 0:
        raise ValueError(f"flow_tokens must be an int >= 0, got {flow!r}")
    return n, most


def explain_text(
    model: TextModel,
    text: str,
    out: str | Path,
    *,
    against: str | None = None,
    steps: int = 32,
    flow_tokens: int = 64,
    log: Callable[[str], None] = print,
    progress: Progress | None = None,
) -> Explanation:
    """Explain ``model``'s embedding of ``text`` and write the report to ``out`` (HTML).

    PNGs go beside it: ``<stem>_heads.png`` (every layer's heads), ``<stem>_rollout.png``
    and ``<stem>_saliency_<method>.png``. Attention flow (one max-flow per token pair) is
    computed for texts of at most ``flow_tokens`` tokens; ``steps`` are the integrated
    gradients' steps. ``attnlab explain`` runs this on a sentence encoder.

    The two long parts report to ``progress(done, total, label)``, when given: label
    ``"integrated gradients"`` counts the path's steps, ``"attention flow"`` the output
    rows (a row of MiniLM's 6 layers: 0.2 s at 100 tokens, 1.8 s at 200, 48 s at 510);
    each ends with ``done == total``. The results do not depend on it.

    Example:
        >>> import tempfile
        >>> toy = _toy(16)  # two attention layers over word lengths (see _toy)
        >>> ex = explain_text(toy, "a toy text", tempfile.mkdtemp() + "/r.html", steps=4,
        ...                   log=lambda s: None)
        >>> ex.tokens, [p.suffix for p in ex.files][:2]
        (['1', '3', '5', '6', '9'], ['.html', '.png'])
    """
    steps, flow_tokens = _check_explain_args(model, text, out, against, steps, flow_tokens)
    if progress is not None and not callable(progress):
        msg = f"progress must be a callable (done, total, label) or None, got {progress!r:.60}"
        raise TypeError(msg)
    with eval_mode(model.network):  # (dropout in training mode: another score each run)
        ids = torch.tensor([list(model.tokenize(text))])  # (1, n)
        tokens = [model.token_name(int(i)) for i in ids[0]]
        attns = captured_attentions(model, ids)  # per layer (H, n, n)
        if not attns:  # (an IndexError below)
            raise ValueError(
                f"model: {type(model.network).__name__} made no attnlab attention call to explain "
                "(a transformers model must run with attn_implementation='attnlab')"
            )
        log(f"{len(tokens)} tokens, {len(attns)} layers x {attns[0].shape[0]} heads captured")
        score = explained_score(model, ids, against)
        t0 = time.perf_counter()
        roll = rollout([a[None] for a in attns])[0]  # (n, n)
        rel = gradient_relevance(model.network, lambda: score(ids))[0]  # (n, n)
        log(f"rollout and gradient relevance in {time.perf_counter() - t0:.1f} s")
        t0 = time.perf_counter()
        ig, s_x, s_b = _integrated(model, score, ids, steps, progress)
        log(
            f"integrated gradients ({steps} steps) in {time.perf_counter() - t0:.1f} s: "
            f"sum {float(ig.per_token().sum()):.4f} vs f(x) - f(baseline) {s_x - s_b:.4f}"
        )
        rows = _score_rows(model, len(tokens))
        sal = {"rollout": _pool_rows(roll, rows).tolist()}
        sal |= _flow_saliency(attns, rows, flow_tokens, log, progress)
        sal["gradient relevance"] = _pool_rows(rel - torch.eye(len(tokens)), rows).tolist()
        sal["integrated gradients"] = ig.per_token()[0].tolist()
        note = f"(score: {_score_name(model, tokens, against)})"
        files = write_explanation(out, tokens, attns, roll, sal, text=text, note=note)
    return Explanation(tokens, attns, sal, s_x, s_b, files)
