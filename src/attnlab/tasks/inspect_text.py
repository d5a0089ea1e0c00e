"""The text tasks' runners for :func:`attnlab.tasks.inspect.load_run`: translation, dates,
generation and classification, each rebuilt from its checkpoint's config.

Outputs are decoded as the tasks' own code decodes them (greedy): ``translate``'s length
limit ``2 * Ls + 8``, ``convert``'s 12 characters, ``complete``'s 48 tokens. Unknown
words (characters for dates) become the task's ``<unk>`` token and are labelled so.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from attnlab.interpret import capture
from attnlab.models.document import DocumentClassifier
from attnlab.models.lm import LanguageModel, LMConfig
from attnlab.models.rnn import RNNSeq2Seq, RNNSeq2SeqConfig
from attnlab.models.seq2seq import Seq2Seq, Seq2SeqConfig
from attnlab.tasks.classification import currency_name, sentence_ids, split_sentences
from attnlab.tasks.dates import CharVocab
from attnlab.tasks.inspect import (
    AttentionStack,
    Inspection,
    RunModel,
    head_layer_mean,
    labels,
    stack,
    steps_stack,
)
from attnlab.tasks.text import Vocab, pad_batch

__all__ = ["RUNNERS", "ClassificationRun", "DatesRun", "GenerationRun", "TranslationRun"]


def _first_readable(run: RunModel, candidates: Sequence[str]) -> str:
    """The first candidate with no unknown token (else the first one)."""
    return next((c for c in candidates if 3 not in run._tokens(c)), candidates[0])


class TranslationRun(RunModel):
    """French number words -> English: encoder, decoder and cross-attention stacks."""

    model: Seq2Seq
    task, kind = "translation", "seq2seq"

    def __init__(self, model: Seq2Seq, config: dict[str, Any]) -> None:
        super().__init__(model, config)
        self.src_vocab, self.tgt_vocab = Vocab(config["src_vocab"]), Vocab(config["tgt_vocab"])
        examples = ("quatre-vingt-dix-sept mille trois cent deux", "deux cent un", "vingt et un")
        self.example = _first_readable(self, examples)

    @classmethod
    def build(cls, config: dict[str, Any]) -> TranslationRun:
        return cls(Seq2Seq(Seq2SeqConfig(**config["model"])), config)

    def _tokens(self, text: str) -> list[int]:
        return self.src_vocab.encode(text)

    def _run_text(self, text: str) -> Inspection:
        ids = self._tokens(text)
        src, lengths = pad_batch([ids])  # (1, Ls), (1,)
        max_len = len(ids) * 2 + 8  # as TranslationTask.translate
        out = self.model.generate(src, lengths, max_len=max_len)[0]
        with capture(self.model) as cap:  # teacher-forced on the output: every row at once
            self.model(src, lengths, torch.tensor([[1, *out]]))
        s_lab, t_lab = labels(self.src_vocab, ids), labels(self.tgt_vocab, [1, *out])
        produced = [*t_lab[1:], "</s>" if len(out) < max_len else "(next)"]
        stacks = [
            stack(cap, "*encoder.layers.*.self_attn", "encoder", "self", s_lab, s_lab),
            stack(cap, "*decoder.layers.*.self_attn", "decoder", "self", t_lab, t_lab),
            stack(cap, "*decoder.layers.*.cross_attn", "cross", "cross", t_lab, s_lab),
        ]
        alignment = head_layer_mean(stacks[2], "alignment", produced)
        return Inspection(self.tgt_vocab.decode(out), stacks, alignment)


_TAGGED = re.compile(r"\s*\[([^\]]*)\]\s*(.*?)\s*", re.S)


class DatesRun(RunModel):
    """``"[fr_FR] 21 novembre 2026"`` -> ``"2026-11-21"``: the Bahdanau attention of each
    decoding step (one layer, one head)."""

    model: RNNSeq2Seq
    task, kind = "dates", "seq2seq"

    def __init__(self, model: RNNSeq2Seq, config: dict[str, Any]) -> None:
        super().__init__(model, config)
        self.src_vocab = CharVocab(config["src_vocab"])
        self.tgt_vocab = CharVocab(config["tgt_vocab"])
        self.locales = list(dict.fromkeys(loc for loc, _ in config["styles"]))
        self.example = _first_readable(self, self._examples(config["styles"]))

    @classmethod
    def build(cls, config: dict[str, Any]) -> DatesRun:
        return cls(RNNSeq2Seq(RNNSeq2SeqConfig(**config["model"])), config)

    @staticmethod
    def _examples(styles: Sequence[Sequence[str]]) -> list[str]:
        import datetime as dt

        from attnlab.tasks.dates_data import render

        day = dt.date(2026, 11, 21)
        return [f"[{loc}] {render(day, loc, width).text}" for loc, width in styles]

    def _split(self, text: str) -> tuple[str, str]:
        """``(locale, date text)`` of ``"[locale] date"``."""
        m = _TAGGED.fullmatch(text)
        if m is None or m.group(1) not in self.locales or not m.group(2):
            seen = (
                "no [locale] tag"
                if m is None
                else f"unknown locale {m.group(1)!r}"
                if m.group(1) not in self.locales
                else "no date after the tag"
            )
            raise ValueError(
                f"text must be a locale tag then a date, e.g. {self.example!r}, with a locale "
                f"among {self.locales}; got {text!r} ({seen})"
            )
        return m.group(1), m.group(2)

    def _tokens(self, text: str) -> list[int]:
        locale, date = self._split(text)
        return self.src_vocab.encode(date, tag=f"<{locale}>")

    def _run_text(self, text: str) -> Inspection:
        ids = self._tokens(text)
        src, lengths = pad_batch([ids])  # (1, Ls), (1,)
        with capture(self.model, layers=["attention"]) as cap:  # one call per step
            out = self.model.generate(src, lengths, max_len=12)[0]  # as DatesTask.convert
        produced = labels(self.tgt_vocab, out) + ["</s>"] * (len(cap.records) > len(out))
        s = steps_stack(cap, "attention", "attention", produced, labels(self.src_vocab, ids))
        return Inspection(self.tgt_vocab.decode(out), [s], s)


class GenerationRun(RunModel):
    """A prompt continued greedily; the attention of one forward pass over prompt +
    continuation (rows: ``<bos>``, the prompt's words, the continuation's)."""

    model: LanguageModel
    task, kind = "generation", "lm"
    max_new_tokens = 48  # as GenerationTask.complete

    def __init__(self, model: LanguageModel, config: dict[str, Any]) -> None:
        super().__init__(model, config)
        self.vocab = Vocab(config["vocab"])
        examples = ("the day after May 19, 2016 is", "we count forty-one,", "the year 1 9 9 8 is")
        self.example = _first_readable(self, examples)

    @classmethod
    def build(cls, config: dict[str, Any]) -> GenerationRun:
        return cls(LanguageModel(LMConfig(**config["model"])), config)

    def _tokens(self, text: str) -> list[int]:
        return [1, *self.vocab.encode(text)]

    def _run_text(self, text: str) -> Inspection:
        ids = self._tokens(text)
        gen = self.model.generate(
            torch.tensor([ids]), self.max_new_tokens, temperature=0.0, eos_id=2
        )[0, len(ids) :].tolist()
        cont = gen[: gen.index(2)] if 2 in gen else gen
        with capture(self.model) as cap:  # one full pass, not the cached steps
            self.model(torch.tensor([ids + cont]))
        lab = labels(self.vocab, ids + cont)
        s = stack(cap, "decoder.layers.*.self_attn", "decoder", "self", lab, lab)
        return Inspection(self.vocab.decode(cont), [s], None)


class ClassificationRun(RunModel):
    """Sentences, one per line as the task writes its documents (``St.`` and ``U.S.`` are
    words of its country names, not sentence ends) -> the currency: the word attention of
    each sentence and the sentence attention of the document."""

    model: DocumentClassifier
    task, kind = "classification", "classifier"

    def __init__(self, model: DocumentClassifier, config: dict[str, Any]) -> None:
        super().__init__(model, config)
        self.vocab, self.classes = Vocab(config["vocab"]), list(config["classes"])
        self.example = _first_readable(
            self,
            (
                "the customer does not live in France\nthe customer lives in Senegal\n"
                "the warehouse in Chad counted six hundred and twelve boxes",
                "the customer lives in France",
            ),
        )

    @classmethod
    def build(cls, config: dict[str, Any]) -> ClassificationRun:
        return cls(DocumentClassifier(**config["model"]), config)

    def _tokens(self, text: str) -> list[int]:
        return [i for s in split_sentences(text) for i in self.vocab.encode(s)]

    def _run_text(self, text: str) -> Inspection:
        texts = split_sentences(text)  # as the task's documents: one sentence per line
        if not texts:
            raise ValueError(f"text must hold at least one sentence with a word, got {text!r}")
        ids = sentence_ids(self.vocab, [texts])  # (1, S, W), 0 = padding; as DocumentTask.encode
        with capture(self.model) as cap:
            probs = self.model(ids).logits[0].softmax(-1)  # (C,)
        k = int(probs.argmax())
        code = self.classes[k]
        output = f"{code} {currency_name(code)} (p={float(probs[k]):.2f})"
        rows = [self.vocab.encode(s) for s in texts]
        words = [w for r in rows for w in labels(self.vocab, r)]
        per_word = _block_rows(cap.weights("han.word_attention")[0], [len(r) for r in rows])
        stacks = [
            AttentionStack("words", "cross", texts, words, [per_word[None]]),
            stack(cap, "han.sentence_attention", "sentences", "cross", ["document"], texts),
        ]
        return Inspection(output, stacks, None)


def _block_rows(weights: Tensor, lengths: list[int]) -> Tensor:
    """Word weights ``(S, 1, 1, W)`` of each sentence as ``(S, sum(lengths))``: row ``j``
    holds sentence ``j``'s weights at its own words' columns, 0 elsewhere.

    Example:
        >>> _block_rows(torch.tensor([0.5, 0.5, 1.0, 0.0]).view(2, 1, 1, 2), [2, 1])
        tensor([[0.5000, 0.5000, 0.0000],
                [0.0000, 0.0000, 1.0000]])
    """
    out = torch.zeros(len(lengths), sum(lengths))
    start = 0
    for j, n in enumerate(lengths):
        out[j, start : start + n] = weights[j, 0, 0, :n].float()
        start += n
    return out


RUNNERS: dict[str, type[RunModel]] = {
    r.task: r for r in (TranslationRun, DatesRun, GenerationRun, ClassificationRun)
}
