"""The sentence encoder in the explorer: attention per layer and head, and the four
explanations of :mod:`attnlab.interpret` with progress reports.

Every number equals what the Python API gives for the same text:
:func:`attnlab.interpret.captured_attentions` for the heads, :func:`~attnlab.interpret.rollout`,
:func:`~attnlab.interpret.attention_flow`, :func:`~attnlab.interpret.gradient_relevance` and
:func:`~attnlab.interpret.integrated_gradients` of :func:`~attnlab.interpret.explained_score`
(the embedding along its own direction) for the rest, pooled into token scores the way
``attnlab explain`` pools them. The explorer reads up to 512 tokens (BERT's positions),
past the 256 at which the sentence embedding truncates.
"""

from __future__ import annotations

import copy
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from attnlab.interpret import (
    TextModel,
    attention_flow,
    captured_attentions,
    explained_score,
    gradient_relevance,
    integrated_gradients,
    rollout,
)
from attnlab.models import SentenceEncoder
from attnlab.models.sentence_folder import tokenizer_input
from attnlab.serve.views import matrix_view, rounded
from attnlab.tasks.encoder import text_model
from attnlab.tasks.inspect import AttentionStack, Inspection

__all__ = ["METHODS", "EncoderModel", "pooled_saliency"]

METHODS = ("attention", "rollout", "flow", "gradient", "integrated")
Report = Callable[..., None]


def pooled_saliency(matrix: Tensor, pooling: str) -> Tensor:
    """``(n, n)`` explanation -> ``(n,)`` token scores: row 0 for [CLS] pooling, else the
    mean of the rows (the tokens the model averages)."""
    return matrix[0] if pooling == "cls" else matrix.mean(0)


class EncoderModel:
    """A sentence-transformers encoder (default: the shipped all-MiniLM-L6-v2), loaded
    on first use.

    Example:
        >>> m = EncoderModel()
        >>> ins = m.inspect("Attention is all you need.")
        >>> ins.stacks[0].name, len(ins.stacks[0].weights), tuple(ins.stacks[0].weights[0].shape)
        ('encoder', 6, (12, 8, 8))
    """

    kind, input, task = "encoder", "text", None
    methods = METHODS
    example = "The cat sat on the mat because it was warm."

    def __init__(self, folder: str | Path | None = None, encoder: SentenceEncoder | None = None):
        self.folder = None if folder is None else Path(folder)
        self._given = encoder
        self._enc = encoder  # the template: copied for each thread, never run
        self._models: dict[int, TextModel] = {}  # one copy per thread
        self._tokenizer: Any = None
        self._lock = threading.Lock()

    @property
    def loaded(self) -> bool:
        return self._tokenizer is not None

    def load(self) -> TextModel:
        """The encoder as the explanations see it: loaded once, then one copy for each
        thread that asks (a job's gradients and hooks never touch another's model).

        The loaded (or given) encoder is a template that never runs: every thread, the
        first too, gets a deep copy of it, so no copy is taken of a model that another
        thread is running (a copy of one under :func:`~attnlab.interpret.capture` kept
        its hooks, or failed as they changed). This costs one model's memory more than
        the threads' own copies (about 90 MB for MiniLM)."""
        with self._lock:
            if self._tokenizer is None:
                enc = self._enc or SentenceEncoder.from_pretrained(self.folder)
                from tokenizers import Tokenizer

                tok = Tokenizer.from_str(enc.tokenizer.to_str())
                tok.enable_truncation(enc.bert.config.max_position_embeddings)
                self._enc, self._tokenizer = enc, tok
            me = threading.get_ident()
            if me not in self._models:
                assert self._enc is not None
                self._models[me] = text_model(copy.deepcopy(self._enc))
            return self._models[me]

    def release(self) -> None:
        """Let go of the threads' copies (and of a template loaded here, not given):
        the server has stopped; a later use loads again."""
        with self._lock:
            self._models.clear()
            self._enc, self._tokenizer = self._given, None

    def _encoding(self, text: str) -> Any:
        """The tokenizer's encoding of ``text`` (read as :class:`SentenceEncoder` reads it:
        lowercased by the same function if the model lowercases), truncated at
        512 tokens with the rest in its ``overflowing`` parts."""
        self.load()
        assert self._enc is not None
        return self._tokenizer.encode(tokenizer_input([text], self._enc.config.lowercase)[0])

    def ids(self, text: str) -> Tensor:
        """Token ids ``(1, n)`` of ``text``, [CLS] and [SEP] included, at most 512."""
        return torch.tensor([self._encoding(text).ids])

    @property
    def max_tokens(self) -> int:
        """The most tokens the model reads (its position table: 512); a longer text would
        be cut, so the server refuses it."""
        self.load()
        assert self._enc is not None
        return int(self._enc.bert.config.max_position_embeddings)

    def count_tokens(self, text: str) -> int:
        """How many tokens ``text`` has, untruncated (for the server's limit)."""
        enc = self._encoding(text)
        return len(enc.ids) + sum(len(o.ids) - 2 for o in enc.overflowing)

    def tokens(self, ids: Tensor) -> list[str]:
        model = self.load()
        return [model.token_name(int(i)) for i in ids[0]]

    def inspect(self, text: str | None = None, image: Any = None) -> Inspection:
        """Every layer's attention ``(H, n, n)`` on ``text``."""
        if image is not None or text is None:
            raise ValueError("the encoder reads text: give text, not image")
        ids = self.ids(text)  # (1, n)
        tokens = self.tokens(ids)
        attns = captured_attentions(self.load(), ids)  # per layer (H, n, n)
        return Inspection(None, [AttentionStack("encoder", "self", tokens, tokens, attns)], None)

    def explain(self, text: str, method: str, *, steps: int, top_k: int, report: Report) -> dict:
        """``method``'s result for ``text`` as ``GET /api/jobs/{id}`` returns it."""
        t0 = time.perf_counter()
        model, ids = self.load(), self.ids(text)
        report(0.0, f"{method}: {ids.shape[1]} tokens")
        matrix, saliency, extra = _EXPLAIN[method](self, model, ids, steps, report)
        return {
            "method": method,
            "tokens": self.tokens(ids),
            "saliency": rounded(saliency),
            "matrix": None if matrix is None else matrix_view(matrix, top_k),
            "seconds": round(time.perf_counter() - t0, 4),
            **extra,
        }


Result = tuple[Tensor | None, Tensor, dict[str, Any]]


def _rollout(self: EncoderModel, model: TextModel, ids: Tensor, steps: int, rep: Report) -> Result:
    roll = rollout([a[None] for a in captured_attentions(model, ids)])[0]  # (n, n)
    return roll, pooled_saliency(roll, model.pooling), {}


def _flow(self: EncoderModel, model: TextModel, ids: Tensor, steps: int, rep: Report) -> Result:
    """Attention flow, a chunk of output rows at a time (progress and cancel between)."""
    layers = [a[None] for a in captured_attentions(model, ids)]  # (1, H, n, n) each
    n = ids.shape[1]
    rows = [0] if model.pooling == "cls" else list(range(n))
    parts = []
    for start in range(0, len(rows), 8):
        chunk = rows[start : start + 8]
        parts.append(attention_flow(layers, outputs=chunk, normalize=True)[0])  # (r, n)
        rep((start + len(chunk)) / len(rows), f"flow: {start + len(chunk)} of {len(rows)} rows")
    flow = torch.cat(parts)  # (len(rows), n)
    matrix = flow if len(rows) == n else None
    return matrix, flow.mean(0), {}


def _gradient(self: EncoderModel, model: TextModel, ids: Tensor, steps: int, rep: Report) -> Result:
    score = explained_score(model, ids)
    rel = gradient_relevance(model.network, lambda: score(ids))[0]  # (n, n)
    sal = pooled_saliency(rel - torch.eye(ids.shape[1]), model.pooling)
    return rel, sal, {}


def _integrated(
    self: EncoderModel, model: TextModel, ids: Tensor, steps: int, rep: Report
) -> Result:
    """Integrated gradients from a padding baseline (as ``attnlab explain``); progress
    is reported, and a cancel takes effect, before each chunk of the path and each of
    captum's other calls. Only the path's points count as steps: the chunks that run with
    gradients (captum also scores the input and the baseline, without)."""
    score = explained_score(model, ids)
    done = [0]  # path points scored so far

    def counted(t: Tensor) -> Tensor:
        rep(0.99 * done[0] / steps, f"integrated gradients: {done[0]} of {steps} steps")
        if torch.is_grad_enabled():
            done[0] = min(steps, done[0] + t.shape[0])
        return score(t)

    base = ids.clone()
    base[:, 1:-1] = model.pad_id  # keep [CLS] and [SEP]
    ig = integrated_gradients(
        counted, ids, base, layer=model.input_embeddings, steps=steps, internal_batch_size=8
    )
    with torch.no_grad():
        gap = float(score(ids)) - float(score(base))
    extra = {"score_gap": round(gap, 6), "attribution_sum": round(float(ig.per_token().sum()), 6)}
    return None, ig.per_token()[0], extra


_EXPLAIN: dict[str, Callable[..., Result]] = {
    "rollout": _rollout,
    "flow": _flow,
    "gradient": _gradient,
    "integrated": _integrated,
}
