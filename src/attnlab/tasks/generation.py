"""Generation: a decoder-only language model on English sentences made by num2words and Babel.

Each sentence states a small fact in real language, so most of it follows from its start::

    we count forty-one, forty-two, forty-three
    four thousand, five hundred and six is written 4 5 0 6
    the day after February 28, 1996 is February 29, 1996
    in German November 21, 2026 is 21. November 2026
    the year 1 9 9 8 is read nineteen ninety-eight

Words are tokens (:class:`~attnlab.tasks.text.Vocab`). The held-out sentences never occur
in training. The model is scored by its perplexity on them, next to the perplexities of
a unigram and an interpolated bigram model counted on the training sentences.
"""

from __future__ import annotations

import datetime as dt
import itertools
import json
import math
import random
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnlab._validate import limit_or, nonnegative_int, positive_int
from attnlab.interpret import capture
from attnlab.models.lm import LanguageModel, LMConfig
from attnlab.tasks.options import DataOptions
from attnlab.tasks.registry import TaskSpec
from attnlab.tasks.report import Section, write_html
from attnlab.tasks.text import Vocab, pad_batch

__all__ = [
    "FAMILIES",
    "LOCALES",
    "SPEC",
    "GenerationTask",
    "NgramBaseline",
    "family",
    "finish",
    "make_sentences",
    "self_attention_picture",
]

LOCALES = {"fr": "French", "de": "German", "es": "Spanish", "it": "Italian", "pl": "Polish"}
_FIRST_DAY, _DAYS = dt.date(1950, 1, 1), 100 * 365 + 24  # dates in 1950 .. 2049


def _libs() -> tuple[Any, Any]:
    try:
        from babel.dates import format_date
        from num2words import num2words
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "the generation task needs num2words and Babel: pip install 'attnlab[tasks]'"
        ) from e
    return num2words, format_date


def _date(rng: random.Random) -> dt.date:
    return _FIRST_DAY + dt.timedelta(days=rng.randrange(_DAYS))


def _count(rng: random.Random) -> tuple[str, str]:
    n2w, _ = _libs()
    n = rng.randrange(10 ** rng.randrange(1, 6))
    first, *rest = (n2w(n + i, lang="en") for i in range(3))
    return f"we count {first},", ", ".join(rest)


def _digits(rng: random.Random) -> tuple[str, str]:
    n2w, _ = _libs()
    n = rng.randrange(10 ** rng.randrange(1, 6))
    return f"{n2w(n, lang='en')} is written", " ".join(str(n))


def _next_day(rng: random.Random) -> tuple[str, str]:
    _, fmt = _libs()
    d = _date(rng)
    after = fmt(d + dt.timedelta(days=1), "long", locale="en")
    return f"the day after {fmt(d, 'long', locale='en')} is", after


def _locale_date(rng: random.Random) -> tuple[str, str]:
    _, fmt = _libs()
    d, loc = _date(rng), rng.choice(sorted(LOCALES))
    return f"in {LOCALES[loc]} {fmt(d, 'long', locale='en')} is", fmt(d, "long", locale=loc)


def _year(rng: random.Random) -> tuple[str, str]:
    n2w, _ = _libs()
    y = rng.randrange(1100, 2100)
    return f"the year {' '.join(str(y))} is read", n2w(y, lang="en", to="year")


# name -> a draw of (prompt, completion): the completion follows from the prompt.
FAMILIES: dict[str, Callable[[random.Random], tuple[str, str]]] = {
    "count": _count,
    "digits": _digits,
    "next_day": _next_day,
    "locale_date": _locale_date,
    "year": _year,
}


def family(prompt: str) -> str:
    """The :data:`FAMILIES` name of a sentence, from its prompt.

    Example:
        >>> family("the day after May 19, 2016 is"), family("in Polish May 19, 2016 is")
        ('next_day', 'locale_date')
    """
    starts = {
        "we count": "count",
        "the day after": "next_day",
        "the year": "year",
        "in ": "locale_date",
    }
    for start, name in starts.items():
        if prompt.startswith(start):
            return name
    return "digits"


def make_sentences(n: int, seed: int) -> list[tuple[str, str]]:
    """``n`` distinct ``(prompt, completion)`` sentences, the families in turn, from ``seed``.

    A family whose sentences are all drawn (years) leaves the rotation.

    Example:
        >>> for p, c in make_sentences(5, seed=3):
        ...     print(p, "|", c)
        we count seventy-five, | seventy-six, seventy-seven
        seventeen thousand and ninety-four is written | 1 7 0 9 4
        the day after May 19, 2016 is | May 20, 2016
        in Polish January 22, 2035 is | 22 stycznia 2035
        the year 1 1 6 7 is read | eleven sixty-seven
    """
    n = nonnegative_int("n", n)  # (-1 gave [], "5" a bare TypeError)
    rng, seen = random.Random(nonnegative_int("seed", seed)), set()  # (it takes abs(seed))
    out: list[tuple[str, str]] = []
    draws = list(FAMILIES.values())
    while len(out) < n and draws:
        draw = draws[len(out) % len(draws)]
        pair = next((p for p in (draw(rng) for _ in range(200)) if p not in seen), None)
        if pair is None:  # exhausted
            draws.remove(draw)
            continue
        seen.add(pair)
        out.append(pair)
    if len(out) < n:
        raise ValueError(f"n={n} is more than the {len(out)} distinct sentences there are")
    return out


def _text(pair: tuple[str, str]) -> str:
    return f"{pair[0]} {pair[1]}"


class NgramBaseline:
    """Unigram and interpolated bigram models counted on token-id sentences.

    A sentence ``w_1 .. w_n`` is scored as ``<bos> w_1 .. w_n <eos>`` (the ``n + 1``
    predictions a language model makes). The unigram model is add-one smoothed over the
    vocabulary; the bigram is ``lam * c(v, w) / c(v) + (1 - lam) * P_unigram(w)``, and
    ``P_unigram(w)`` after a context ``v`` never seen in training (``c(v) = 0``, e.g.
    ``<unk>``), so that each context's probabilities sum to 1.

    Example:
        >>> base = NgramBaseline([[4, 5], [4, 6]], vocab_size=7)
        >>> uni, bi = base.perplexity([[4, 5]], order=1), base.perplexity([[4, 5]], lam=0.0)
        >>> round(uni, 6) == round(bi, 6), base.perplexity([[4, 5]], lam=0.9) < uni
        (True, True)
    """

    def __init__(
        self, sentences: Sequence[Sequence[int]], vocab_size: int, bos: int = 1, eos: int = 2
    ):
        self.vocab_size, self.bos, self.eos = vocab_size, bos, eos
        self.unigram: Counter[int] = Counter()
        self.bigram: Counter[tuple[int, int]] = Counter()
        self.context: Counter[int] = Counter()
        for s in sentences:
            seq = [bos, *s, eos]
            self.unigram.update(seq[1:])
            self.bigram.update(itertools.pairwise(seq))
            self.context.update(seq[:-1])
        self._total = sum(self.unigram.values())

    def p_unigram(self, w: int) -> float:
        """Add-one smoothed unigram probability (ids ``< 2`` are never predicted)."""
        return (self.unigram[w] + 1) / (self._total + self.vocab_size - 2)

    def perplexity(
        self, sentences: Sequence[Sequence[int]], *, order: int = 2, lam: float = 0.9
    ) -> float:
        """Per-token perplexity of ``sentences`` (eos included) under the unigram
        (``order=1``) or the interpolated bigram (``order=2``)."""
        nll, count = 0.0, 0
        for s in sentences:
            seq = [self.bos, *s, self.eos]
            for v, w in itertools.pairwise(seq):
                p = self.p_unigram(w)
                if order == 2:
                    c = self.context[v]  # 0: an unseen context backs off to the unigram
                    p = (1 - lam) * p + lam * self.bigram[v, w] / c if c else p
                nll -= math.log(p)
                count += 1
        return math.exp(nll / count)

    def best_bigram(self, sentences: Sequence[Sequence[int]]) -> tuple[float, float]:
        """``(perplexity, lam)`` of the best interpolation weight on ``sentences``: the
        bigram's best case (its weight tuned on the very data it is scored on)."""
        grid = (0.5, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99, 0.995)
        return min((self.perplexity(sentences, lam=lam), lam) for lam in grid)


@dataclass
class LMBatch:
    inputs: Tensor  # (B, L): <bos> + sentence
    targets: Tensor  # (B, L): sentence + <eos>, 0 = padding


class GenerationTask(DataOptions):
    """Word-level language modelling of generated English sentences.

    Args:
        train_size, test_size: distinct sentences in each split (disjoint).
        eval_size: held-out sentences scored at each periodic evaluation (all at the end).
        seed: draws the sentences (the model's seed is the trainer's).
        d_model, num_heads, layers, dim_feedforward, dropout: model size.

    Example:
        >>> task = GenerationTask(train_size=60, test_size=10, d_model=16, num_heads=2)
        >>> b = task.batch(torch.arange(2))
        >>> task.num_train(), len(task.test_pairs), b.inputs[:, 0].tolist()
        (60, 10, [1, 1])
    """

    name = "generation"

    def __init__(
        self,
        train_size: int = 40_000,
        test_size: int = 1000,
        *,
        eval_size: int = 400,
        seed: int = 1234,
        d_model: int = 128,
        num_heads: int = 4,
        layers: int = 2,
        dim_feedforward: int = 384,
        dropout: float = 0.0,
    ) -> None:
        seed = nonnegative_int("seed", seed)  # (random.Random gave -7 seed 7's sentences)
        positive_int("train_size", train_size)
        test_size = positive_int("test_size", test_size)
        eval_size = positive_int("eval_size", eval_size)
        sizes = LMConfig(  # its vocab_size comes with the vocabulary, its sizes are named now
            1,  # (they were checked in build_model, after drawing every sentence: 8 s)
            d_model=d_model,
            num_heads=num_heads,
            num_layers=positive_int("layers", layers),
            dim_feedforward=dim_feedforward,
            dropout=dropout,
        )
        sizes.layer_config()
        pairs = make_sentences(train_size + test_size, seed)
        random.Random(seed).shuffle(pairs)  # the test split has the families' proportions
        self.test_pairs, self.train_pairs = pairs[:test_size], pairs[test_size:]
        self.vocab = Vocab.build(_text(p) for p in self.train_pairs)
        self.eval_size = eval_size
        self.data_options = {"test_size": test_size, "eval_size": eval_size, "seed": seed}
        self.model_cfg = replace(sizes, vocab_size=len(self.vocab))
        self._train = [self.vocab.encode(_text(p)) for p in self.train_pairs]
        self._test = [self.vocab.encode(_text(p)) for p in self.test_pairs]

    def build_model(self) -> nn.Module:
        return LanguageModel(self.model_cfg)

    def config(self) -> dict[str, Any]:
        model, data = self.model_cfg.__dict__, self.data_options
        return {"task": self.name, "model": model, "vocab": self.vocab.tokens, "data": data}

    def num_train(self) -> int:
        return len(self._train)

    def batch(self, indices: Tensor) -> LMBatch:
        return _lm_batch([self._train[i] for i in indices.tolist()])

    def loss(self, model: nn.Module, batch: LMBatch) -> Tensor:
        logits = model(batch.inputs)  # (B, L, V)
        return F.cross_entropy(logits.flatten(0, 1), batch.targets.flatten(), ignore_index=0)

    @torch.no_grad()
    def perplexity(self, model: nn.Module, *, limit: int | None = None) -> float:
        """Per-token perplexity (eos included) of the held-out sentences."""
        rows = self._test[: limit_or(limit, len(self._test))]
        nll, count = 0.0, 0
        for i in range(0, len(rows), 256):
            b = _lm_batch(rows[i : i + 256])
            logits = model(b.inputs)  # (B, L, V)
            wide = torch.promote_types(logits.dtype, torch.float32)  # fp64 stays fp64
            nll += float(
                F.cross_entropy(
                    logits.flatten(0, 1).to(wide),
                    b.targets.flatten(),
                    ignore_index=0,
                    reduction="sum",
                )
            )
            count += int((b.targets != 0).sum())
        return math.exp(nll / count)

    def evaluate(self, model: nn.Module, *, limit: int | None = None) -> dict[str, float]:
        """Held-out perplexity; ``score = 1 / perplexity`` (1 = every token certain)."""
        ppl = self.perplexity(model, limit=limit_or(limit, self.eval_size))
        return {"perplexity": round(ppl, 4), "score": 1.0 / ppl}

    def baselines(self) -> dict[str, float]:
        """Unigram and best-case interpolated bigram perplexities on the held-out split."""
        base = NgramBaseline(self._train, len(self.vocab))
        bigram, lam = base.best_bigram(self._test)
        return {
            "unigram_perplexity": round(base.perplexity(self._test, order=1), 3),
            "bigram_perplexity": round(bigram, 3),
            "bigram_lambda": lam,
        }

    def complete(
        self,
        model: LanguageModel,
        prompts: Sequence[str],
        *,
        max_new_tokens: int = 48,
        **sampling: Any,
    ) -> list[str]:
        """Continue each prompt to the end of its sentence (eos); prompts of one length run
        as one batch. ``sampling``: ``temperature``, ``top_k``, ``top_p``, ``generator``."""
        ids = [[1, *self.vocab.encode(p)] for p in prompts]
        out: list[str] = [""] * len(ids)
        by_len: dict[int, list[int]] = {}
        for i, row in enumerate(ids):
            by_len.setdefault(len(row), []).append(i)
        for length, idx in by_len.items():
            gen = model.generate(
                torch.tensor([ids[i] for i in idx]), max_new_tokens, eos_id=2, **sampling
            )
            for i, row in zip(idx, gen[:, length:].tolist(), strict=True):
                out[i] = self.vocab.decode(row[: row.index(2)] if 2 in row else row)
        return out

    def completion_exact(self, model: LanguageModel, per_family: int = 100) -> dict[str, float]:
        """Greedy completions equal to the reference (%) on up to ``per_family`` held-out
        sentences of each family; a family with none in the test split (a small
        ``test_size`` leaves some out) has no score and no key."""
        per_family = positive_int("per_family", per_family)
        scores = {}
        for name in FAMILIES:
            pairs = [p for p in self.test_pairs if family(p[0]) == name][:per_family]
            if not pairs:  # 0 of 0 is no accuracy (a ZeroDivisionError)
                continue
            hyps = self.complete(model, [p for p, _ in pairs], temperature=0.0)
            hits = sum(
                h == self.vocab.decode(self.vocab.encode(c))
                for h, (_, c) in zip(hyps, pairs, strict=True)
            )
            scores[f"exact_{name}"] = round(100.0 * hits / len(pairs), 1)
        return scores


def _lm_batch(rows: Sequence[Sequence[int]]) -> LMBatch:
    inputs, _ = pad_batch([[1, *r] for r in rows])  # (B, L)
    targets, _ = pad_batch([[*r, 2] for r in rows])  # (B, L)
    return LMBatch(inputs, targets)


def self_attention_picture(
    task: GenerationTask, model: LanguageModel, text: str, path: Path
) -> Path:
    """The last layer's self-attention (mean over heads) on one sentence, as a PNG."""
    from attnlab.interpret.plot import alignment

    ids = torch.tensor([[1, *task.vocab.encode(text)]])  # (1, L)
    last = f"decoder.layers.{task.model_cfg.num_layers - 1}.self_attn"
    with torch.no_grad(), capture(model, layers=[last]) as cap:
        model(ids)
    w = cap.records[0].weights[0].mean(0)  # (L, L)
    toks = ["<bos>", *(task.vocab.tokens[i] for i in ids[0, 1:].tolist())]
    title = f"{text}\n(last layer, mean over heads; row i predicts token i + 1)"
    return alignment(w, toks, toks, path, title=title)


def finish(task: GenerationTask, model: nn.Module, folder: Path) -> dict[str, float]:
    """Held-out perplexity vs the n-gram baselines, greedy completion accuracy, samples at
    temperature 0.8 with top-k 20 and top-p 0.95, an attention picture and the report."""
    assert isinstance(model, LanguageModel)
    scores = {"perplexity": round(task.perplexity(model), 4)} | task.baselines()
    scores |= task.completion_exact(model)
    print(f"held-out ({len(task.test_pairs)} sentences):", json.dumps(scores))
    g = torch.Generator().manual_seed(0)
    prompts = ["we count", "in Polish", "the day after", "the year", "seven hundred and"]
    sampled = task.complete(model, prompts * 2, temperature=0.8, top_k=20, top_p=0.95, generator=g)
    print("samples (temperature 0.8, top-k 20, top-p 0.95):")
    rows = [f"{p} | {s}" for p, s in zip(prompts * 2, sampled, strict=True)]
    for r in rows:
        print("  " + r)
    folder.mkdir(parents=True, exist_ok=True)
    pictures = []
    for i, (p, c) in enumerate(task.test_pairs[1:3]):
        pictures.append(
            self_attention_picture(task, model, f"{p} {c}", folder / f"attention_{i}.png")
        )
    sections = [
        Section("Samples (temperature 0.8, top-k 20, top-p 0.95)", "; ".join(rows)),
        Section("Self-attention", "last layer, mean over heads, on held-out sentences", pictures),
    ]
    write_html(
        folder / "report.html", "Language model on num2words/Babel sentences", scores, sections
    )
    return scores


SPEC = TaskSpec(
    summary="decoder-only LM (RoPE) on num2words/Babel sentences, perplexity vs n-grams",
    build=lambda n: GenerationTask(40_000 if n is None else n),
    # its families hold about 370,000 distinct sentences (seed 1234), less the test split:
    # past that it failed after making them all (100 s)
    max_train_size=300_000,
    defaults={
        "threads": 1,
        "steps": 1500,
        "batch_size": 64,
        "lr": 3e-3,
        "warmup": 100,
        "eval_every": 250,
    },
    finish=finish,
    score_range=(0.0, 1.0),  # 1/perplexity
)
