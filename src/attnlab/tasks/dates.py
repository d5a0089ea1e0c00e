"""Dates: written dates in several locales (Babel) to ISO ``YYYY-MM-DD``.

``"[fr_FR] 21 novembre 2026"`` -> ``"2026-11-21"``, ``"[en_US] Nov 21, 2026"`` -> the
same, with a Bahdanau-attention GRU encoder-decoder (:class:`attnlab.models.RNNSeq2Seq`).

Data and split (:mod:`attnlab.tasks.dates_data`). Each example is a date of 1900-2099
written by Babel in one locale and one CLDR width; the test days are drawn first and no
training example is written from any of them, so every held-out score is on days the
model never saw.

Tokens. Characters, plus one leading locale token (``<en_US>``). Characters because
several widths have no word boundaries (``21.11.2026``), because a closed set of ~100
characters leaves nothing unknown at test time, and because the task is then about
alignment: output digits must find their source digits and the month must be read from a
name's letters. The locale token is needed: ``04/03/1907`` is 4 March in en_GB and
April 3 in en_US.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnlab._validate import limit_or, nonnegative_int, positive_int
from attnlab.interpret import capture
from attnlab.models.rnn import RNNSeq2Seq, RNNSeq2SeqConfig
from attnlab.tasks.dates_data import (
    FORMATS,
    LOCALES,
    DateExample,
    date_pattern,
    draw_examples,
    render,
    split_dates,
    writing_styles,
)
from attnlab.tasks.options import DataOptions
from attnlab.tasks.registry import TaskSpec
from attnlab.tasks.report import Section, write_html
from attnlab.tasks.text import SPECIALS, pad_batch

__all__ = [
    "FORMATS",
    "LOCALES",
    "SPEC",
    "CharVocab",
    "DateExample",
    "DatesBatch",
    "DatesTask",
    "date_pattern",
    "field_alignment",
    "finish",
    "render",
    "split_dates",
]

# output characters of each field in "YYYY-MM-DD"
ISO_ROWS = {"year": range(0, 4), "month": range(5, 7), "day": range(8, 10)}


class CharVocab:
    """Characters (and whole-token tags) <-> ids; ids 0-3 are ``<pad> <bos> <eos> <unk>``.

    Example:
        >>> v = CharVocab(["<fr_FR>", *"21 nov"])
        >>> v.encode("21 nov", tag="<fr_FR>")
        [4, 5, 6, 7, 8, 9, 10]
        >>> v.decode([5, 6, 2, 9])
        '21'
    """

    def __init__(self, tokens: Sequence[str]) -> None:
        self.tokens = [*SPECIALS, *dict.fromkeys(t for t in tokens if t not in SPECIALS)]
        self.index = {t: i for i, t in enumerate(self.tokens)}

    def __len__(self) -> int:
        return len(self.tokens)

    def encode(self, text: str, *, tag: str | None = None) -> list[int]:
        """Ids of ``tag`` (if any) then of each character (unknown -> 3)."""
        return ([self.index[tag]] if tag else []) + [self.index.get(c, 3) for c in text]

    def decode(self, ids: Sequence[int]) -> str:
        """The characters of ``ids`` up to the first EOS, skipping special tokens."""
        ids = list(ids)
        ids = ids[: ids.index(2)] if 2 in ids else ids
        return "".join(self.tokens[i] for i in ids if len(SPECIALS) <= i < len(self.tokens))


@dataclass
class DatesBatch:
    src: Tensor  # (B, Ls): locale token + characters
    lengths: Tensor  # (B,)
    tgt_in: Tensor  # (B, 11): BOS + YYYY-MM-DD
    tgt_out: Tensor  # (B, 11): YYYY-MM-DD + EOS


class DatesTask(DataOptions):
    """Written dates -> ISO dates, for :class:`attnlab.train.Trainer`.

    Args:
        train_size: training examples (days of the training split, with replacement, each
            in a random locale and width).
        test_size: held-out days, one example each.
        eval_size: test examples decoded at each periodic evaluation (all at the end).
        seed: picks the split and the examples (the model's seed is the trainer's).
        locales, formats: the Babel locales and CLDR widths to write dates in.
        embed_dim, hidden, decoder_hidden, attn_dim, dropout: model size
            (:class:`attnlab.models.RNNSeq2SeqConfig`).

    Example:
        >>> task = DatesTask(train_size=20, test_size=5, locales=("de_DE",))
        >>> task.num_train(), len(task.test), task.train[0].target in task.test_days
        (20, 5, False)
    """

    name = "dates"

    def __init__(
        self,
        train_size: int = 40_000,
        test_size: int = 5000,
        *,
        eval_size: int = 500,
        seed: int = 1234,
        locales: Sequence[str] = LOCALES,
        formats: Sequence[str] = FORMATS,
        embed_dim: int = 32,
        hidden: int = 64,
        decoder_hidden: int = 128,
        attn_dim: int = 64,
        dropout: float = 0.0,
    ) -> None:
        positive_int("train_size", train_size)
        test_size = positive_int("test_size", test_size)  # ('5', 2.5 failed in split_dates)
        self.eval_size = positive_int("eval_size", eval_size)
        sizes = RNNSeq2SeqConfig(  # the vocabularies' sizes come with the data, the model's now
            1,  # (they were checked in build_model, after drawing every example)
            1,
            embed_dim=embed_dim,
            hidden=hidden,
            decoder_hidden=decoder_hidden,
            attn_dim=attn_dim,
            dropout=dropout,
        )
        sizes.check_sizes()
        self.styles = writing_styles(locales, formats)
        self.locales = sorted({loc for loc, _ in self.styles})
        seed = nonnegative_int("seed", seed)  # (None and "a" failed inside torch)
        train_days, test_days = split_dates(test_size, seed)
        g = torch.Generator().manual_seed(seed + 1)
        self.test = draw_examples(test_days, len(test_days), self.styles, g)
        self.train = draw_examples(train_days, train_size, self.styles, g)
        self.test_days = {d.isoformat() for d in test_days}
        self.src_vocab = CharVocab(
            [f"<{loc}>" for loc, _ in self.styles] + sorted({c for e in self.train for c in e.text})
        )
        self.tgt_vocab = CharVocab(list("0123456789-"))
        self.data_options = {"test_size": test_size, "eval_size": self.eval_size, "seed": seed}
        self.model_cfg = replace(
            sizes, src_vocab=len(self.src_vocab), tgt_vocab=len(self.tgt_vocab)
        )
        self._src = [self.encode_source(e) for e in self.train]
        self._tgt = [self.tgt_vocab.encode(e.target) for e in self.train]

    def encode_source(self, ex: DateExample) -> list[int]:
        """Source ids: the locale token, then the characters (a locale the task was not
        built with is a ValueError naming it: a bare KeyError '<fr_FR>' before)."""
        if ex.locale not in self.locales:
            raise ValueError(
                f"example {ex.text!r} is in locale {ex.locale!r}, which this task was not "
                f"built with; its locales: {self.locales}"
            )
        return self.src_vocab.encode(ex.text, tag=f"<{ex.locale}>")

    def build_model(self) -> nn.Module:
        return RNNSeq2Seq(self.model_cfg)

    def config(self) -> dict[str, Any]:
        return {
            "task": self.name,
            "model": self.model_cfg.__dict__,
            "styles": [list(s) for s in self.styles],
            "src_vocab": self.src_vocab.tokens,
            "tgt_vocab": self.tgt_vocab.tokens,
            "data": self.data_options,
        }

    def num_train(self) -> int:
        return len(self._src)

    def batch(self, indices: Tensor) -> DatesBatch:
        idx = indices.tolist()
        return self._batch([self._src[i] for i in idx], [self._tgt[i] for i in idx])

    def _batch(self, src: list[list[int]], tgt: list[list[int]]) -> DatesBatch:
        s, lengths = pad_batch(src)
        tgt_in, _ = pad_batch([[1, *t] for t in tgt])
        tgt_out, _ = pad_batch([[*t, 2] for t in tgt])
        return DatesBatch(s, lengths, tgt_in, tgt_out)

    def test_batch(self, examples: Sequence[DateExample]) -> DatesBatch:
        """A batch of any examples (e.g. held-out ones)."""
        return self._batch(
            [self.encode_source(e) for e in examples],
            [self.tgt_vocab.encode(e.target) for e in examples],
        )

    def loss(self, model: nn.Module, batch: DatesBatch) -> Tensor:
        logits = model(batch.src, batch.lengths, batch.tgt_in)  # (B, Lt, V)
        return F.cross_entropy(logits.flatten(0, 1), batch.tgt_out.flatten(), ignore_index=0)

    def convert(
        self, model: RNNSeq2Seq, examples: Sequence[DateExample], *, batch_size: int = 500
    ) -> list[str]:
        """Greedy ISO dates for ``examples``, ``batch_size`` (>= 1) at a time."""
        batch_size = positive_int("batch_size", batch_size)  # -1 gave [], 0 a range() error
        out: list[str] = []
        for i in range(0, len(examples), batch_size):
            b = self.test_batch(examples[i : i + batch_size])
            out += [self.tgt_vocab.decode(r) for r in model.generate(b.src, b.lengths, max_len=12)]
        return out

    def evaluate(self, model: nn.Module, *, limit: int | None = None) -> dict[str, float]:
        """Exact match (%) on the first ``limit`` held-out dates; ``score`` is exact / 100."""
        if not isinstance(model, RNNSeq2Seq):
            raise TypeError(f"model must be an RNNSeq2Seq, got {type(model).__name__}")
        examples = self.test[: limit_or(limit, self.eval_size)]
        hyps = self.convert(model, examples)
        hits = sum(h == e.target for h, e in zip(hyps, examples, strict=True))
        return {"exact": round(100 * hits / len(examples), 2), "score": hits / len(examples)}


# ---------------------------------------------------------------------------------------
# alignment: which source characters each output character attends to


def alignment_rows(task: DatesTask, model: RNNSeq2Seq, examples: Sequence[DateExample]) -> Tensor:
    """Attention of each output character over the source, teacher-forced on the reference:
    ``(B, 11, Ls)`` (rows: ``YYYY-MM-DD`` then end of sentence; column 0: locale token).

    Read with :class:`attnlab.interpret.capture`: one ``attention`` call per decoder step.
    """
    b = task.test_batch(examples)
    with torch.no_grad(), capture(model, layers=["attention"]) as cap:
        model(b.src, b.lengths, b.tgt_in)
    return torch.cat([w[:, 0] for w in cap.weights("attention")], 1)  # (B, Lt, Ls)


def field_alignment(
    task: DatesTask, model: RNNSeq2Seq, examples: Sequence[DateExample], *, threshold: float = 0.5
) -> dict[str, float]:
    """How often the year, month and day output characters attend to their source field.

    A field is aligned in an example when its output characters' attention mass on the
    source span of that field, averaged over those characters, is at least ``threshold``.
    Output characters that the source does not write are left out: the leading ``0`` of
    day ``04`` in ``"4 March"`` has nothing to align to.

    Returns:
        ``{"year", "month", "day", "all"}``: % of examples with that field aligned (all: all
        three), and ``"mass_<field>"``: the mean attention mass on the field's span.

    Example:
        >>> task = DatesTask(train_size=20, test_size=4, hidden=8, decoder_hidden=8)
        >>> a = field_alignment(task, task.build_model().eval(), task.test)
        >>> sorted(a), 0 <= a["all"] <= a["year"] <= 100
        (['all', 'day', 'mass_day', 'mass_month', 'mass_year', 'month', 'year'], True)
    """
    mass: dict[str, list[Tensor]] = {k: [] for k in ISO_ROWS}
    for i in range(0, len(examples), 500):
        chunk = examples[i : i + 500]
        w = alignment_rows(task, model, chunk)  # (B, 11, Ls)
        for name in ISO_ROWS:
            span, rows = _field_masks(chunk, name, w.shape[-1])  # (B, Ls), (B, 11)
            on_span = (w * span[:, None]).sum(-1)  # (B, 11)
            mass[name].append((on_span * rows).sum(-1) / rows.sum(-1))  # (B,)
    per = {k: torch.cat(v) for k, v in mass.items()}  # (N,) each
    ok = {k: v >= threshold for k, v in per.items()}
    scores = {k: round(100.0 * float(v.float().mean()), 2) for k, v in ok.items()}
    everything = torch.stack(list(ok.values())).all(0)
    scores["all"] = round(100.0 * float(everything.float().mean()), 2)
    return scores | {f"mass_{k}": round(float(v.mean()), 3) for k, v in per.items()}


def _field_masks(examples: Sequence[DateExample], name: str, ls: int) -> tuple[Tensor, Tensor]:
    """Source span ``(B, Ls)`` (after the locale token) and the output rows ``(B, 11)`` of
    field ``name`` that the source writes (a one-digit ``4`` writes only the ``4`` of ``04``)."""
    span, rows = torch.zeros(len(examples), ls), torch.zeros(len(examples), 11)
    out = list(ISO_ROWS[name])
    for j, e in enumerate(examples):
        s0, s1 = e.spans[name]
        span[j, 1 + s0 : 1 + s1] = 1.0  # +1: the locale token
        short = s1 - s0 < len(out) and e.text[s0:s1].isdigit()
        rows[j, out[len(out) - (s1 - s0) :] if short else out] = 1.0
    return span, rows


def _labels(ex: DateExample) -> tuple[list[str], list[str]]:
    src = [f"<{ex.locale}>", *(c if c != " " else "\u2423" for c in ex.text)]
    return src, [*ex.target, "</s>"]


def write_report(
    task: DatesTask,
    model: RNNSeq2Seq,
    rows: list[tuple[DateExample, str]],
    scores: dict[str, float],
    folder: Path,
) -> Path:
    """Alignment PNGs and a self-contained ``report.html`` (images inlined) in ``folder``."""
    from attnlab.interpret.plot import alignment

    folder.mkdir(parents=True, exist_ok=True)
    sections = []
    weights = alignment_rows(task, model, [e for e, _ in rows])  # (B, 11, Ls)
    for i, (ex, hyp) in enumerate(rows):
        src, tgt = _labels(ex)
        w = weights[i, :, : len(src)]
        png = alignment(
            w, src, tgt, folder / f"alignment_{i}.png", title=f"{ex.text} ({ex.locale})"
        )
        ok = "correct" if hyp == ex.target else f"expected {ex.target}"
        sections.append(Section(f"{ex.text} [{ex.locale}, {ex.width}]", f"{hyp} ({ok})", [png]))
    title = "Written dates (Babel, several locales) to ISO, Bahdanau-attention GRU"
    return write_html(folder / "report.html", title, scores, sections)


def _showcase(task: DatesTask, n: int) -> list[DateExample]:
    """``n`` held-out examples in different locales, with a month name if possible."""
    chosen: dict[str, DateExample] = {}
    for e in task.test:
        named = not e.text[slice(*e.spans["month"])].isdigit()
        if e.locale not in chosen and (named or e.width == "short"):
            chosen[e.locale] = e
    return list(chosen.values())[:n]


def finish(task: DatesTask, model: nn.Module, folder: Path) -> dict[str, float]:
    """Exact match on every held-out date, the alignment check, samples and a report."""
    if not isinstance(model, RNNSeq2Seq):
        raise TypeError(f"model must be an RNNSeq2Seq, got {type(model).__name__}")
    hyps = task.convert(model, task.test)
    right = [h == e.target for h, e in zip(hyps, task.test, strict=True)]
    scores = {"exact": round(100.0 * sum(right) / len(right), 2)}
    aligned = field_alignment(task, model, task.test)
    scores |= {f"aligned_{k}": v for k, v in aligned.items()}
    print(f"held-out dates ({len(task.test)}, never in training):", json.dumps(scores))
    wrong = [(e, h) for e, h, r in zip(task.test, hyps, right, strict=True) if not r]
    shown = [(e, task.convert(model, [e])[0]) for e in _showcase(task, 6)]
    seen = {id(e) for e, _ in shown}  # a showcased example that is wrong: shown once
    for ex, hyp in shown + [(e, h) for e, h in wrong if id(e) not in seen][:4]:
        mark = "ok " if hyp == ex.target else "BAD"
        print(
            f"  {mark} [{ex.locale}] {ex.text!r} -> {hyp}"
            + ("" if mark == "ok " else f" (expected {ex.target})")
        )
    write_report(task, model, shown[:4], scores, folder)
    return scores


SPEC = TaskSpec(
    summary="written dates in 10 locales (Babel) to ISO, Bahdanau-attention GRU seq2seq",
    build=lambda n: DatesTask(40_000 if n is None else n),
    defaults={
        "steps": 450,
        "batch_size": 64,
        "lr": 3e-3,
        "warmup": 50,
        "eval_every": 150,
        "threads": 1,
    },
    finish=finish,
    score_range=(0.0, 1.0),
)
