"""The character-edit study: the dates model (written dates to ISO) under greedy typos.

The attack (:class:`~attnlab.robust.attacks.CharEditAttack`) edits the written date
within a budget of edits per word (swap two neighbouring characters, drop one, insert a
letter), never touching a digit, never joining two digit groups, never making a word
name another month of the locale (:func:`keeps_month`: ``"Jun"`` -> ``"Ju"`` ->
``"Jul"`` is refused, as is the weekday ``"mardi"`` -> ``"mai"``), so the right answer
stays the same: ``"21 novembre 2026"`` may become ``"21 novmebre 2026"`` or
``"21 nvembre 2026"``, never ``"2 novembre 2026"``. Each round it applies, per example,
the edit (of 48 drawn at random) that lowers the model's log-probability of the right
ISO date most, until the greedy answer is wrong or the budget is spent.

Rows: plain training; FreeLB on the character embeddings; training on randomly edited
sources (each word of a training source gets one random edit with probability 0.5, the
same kinds of edits as the attack's, under the same month rule, so that no edited source
means another date than its target); and adversarial training with edits
(:class:`AdversarialEditsTask`: of ``k`` randomly edited versions of each training source,
the one the current model finds hardest is trained on, a one-round version of the
attack's inner maximization). Measured on held-out days.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from functools import cache, partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnlab._validate import plain, positive_int, real_where
from attnlab.models.rnn import RNNSeq2Seq
from attnlab.nn._modes import eval_mode
from attnlab.robust.adversarial import FreeLB
from attnlab.robust.attacks import CharEditAttack, word_edits
from attnlab.robust.study import Row, check_methods, train_row, write_outputs
from attnlab.tasks.dates import DateExample, DatesBatch, DatesTask
from attnlab.tasks.dates_data import month_key, month_names
from attnlab.train import Plugin, TrainConfig

__all__ = [
    "METHODS",
    "AdversarialEditsTask",
    "EditedDatesTask",
    "attack_dates",
    "dates_plugins",
    "dates_study",
    "keeps_month",
]

METHODS = ("plain", "freelb", "edits", "adv_edits")


def letters(task: DatesTask) -> str:
    """The non-digit, non-space characters of the training sources (the insert alphabet)."""
    chars = {c for e in task.train for c in e.text}
    return "".join(sorted(c for c in chars if not c.isdigit() and not c.isspace()))


@cache
def keeps_month(locale: str) -> Callable[[str, str], bool]:
    """``allowed(word, edited)`` of ``locale``: False when ``edited`` names a month (any
    CLDR width and form, :func:`~attnlab.tasks.dates_data.month_names`) that ``word``
    does not, so an edit never makes a written date mean another one.

    Example:
        >>> ok = keeps_month("en_US")
        >>> ok("Jun", "Jnu"), ok("Jun", "Jul"), ok("Jun", "jun."), ok("Mon", "Nov")
        (True, False, True, False)
    """
    names = month_names(locale)
    none: frozenset[int] = frozenset()

    def allowed(word: str, edited: str) -> bool:
        months = names.get(month_key(edited))
        return months is None or months <= names.get(month_key(word), none)

    return allowed


def random_edits(
    text: str, rate: float, alphabet: str, rng: random.Random, *, locale: str | None = None
) -> str:
    """Each word of ``text`` gets one random edit (digits kept) with probability ``rate``;
    with ``locale``, none that names another month (:func:`keeps_month`).

    Example:
        >>> edited = random_edits("21 novembre 2026", 1.0, "x", random.Random(0))
        >>> [c for c in edited if c.isdigit()] == list("212026"), edited != "21 novembre 2026"
        (True, True)
    """
    words = text.split(" ")
    for j, w in enumerate(words):
        if rng.random() < rate:
            allowed = None if locale is None else partial(keeps_month(locale), w)
            options = word_edits(w, str.isdigit, alphabet, allowed=allowed)
            words[j] = rng.choice(options) if options else w
    return " ".join(words)


class EditedDatesTask(DatesTask):
    """:class:`~attnlab.tasks.dates.DatesTask` whose training sources get random edits
    (:func:`random_edits` at ``rate``, drawn from the trainer-seeded torch RNG).

    Example:
        >>> t = EditedDatesTask(train_size=20, test_size=4, locales=("fr_FR",))
        >>> t.batch(torch.arange(4)).src.shape[0]
        4
    """

    def __init__(self, *args: object, rate: float = 0.5, **kwargs: object) -> None:
        ok, want = (lambda r: 0 <= r <= 1), "a number in [0, 1] (a word's edit probability)"
        self.rate = real_where("rate", rate, ok, want)  # checked before the data is made
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.alphabet = letters(self)
        self.data_options["rate"] = self.rate

    def batch(self, indices: Tensor) -> DatesBatch:
        rng = random.Random(int(torch.randint(2**31, (1,))))
        examples = [self.train[i] for i in indices.tolist()]
        edited = [
            replace(e, text=random_edits(e.text, self.rate, self.alphabet, rng, locale=e.locale))
            for e in examples
        ]
        return self.test_batch(edited)


@dataclass(frozen=True)
class EditCandidates:
    """``k`` randomly edited versions of each example of a training batch."""

    examples: list[DateExample]
    texts: list[list[str]]  # (k, B)


class AdversarialEditsTask(EditedDatesTask):
    """Adversarial training with character edits: each training source comes in ``k``
    randomly edited versions (:func:`random_edits` at ``rate``), and the loss is taken on
    the version with the lowest log-probability of the right date under the current
    model (chosen without gradients): the greedy attack's inner maximization, one round
    over ``k`` draws. A step costs ``k`` extra forward passes.

    Example:
        >>> t = AdversarialEditsTask(train_size=20, test_size=4, locales=("fr_FR",), k=3)
        >>> b = t.batch(torch.arange(4))
        >>> len(b.texts), len(b.texts[0])
        (3, 4)
    """

    def __init__(self, *args: object, k: int = 4, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        n = plain(k)  # (np.int64 was refused; data_options are saved as JSON)
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"k must be an int >= 1 (edited versions per source), got {k!r}")
        self.k = self.data_options["k"] = n

    def batch(self, indices: Tensor) -> EditCandidates:  # type: ignore[override]
        rng = random.Random(int(torch.randint(2**31, (1,))))
        examples = [self.train[i] for i in indices.tolist()]
        texts = [
            [random_edits(e.text, self.rate, self.alphabet, rng, locale=e.locale) for e in examples]
            for _ in range(self.k)
        ]
        return EditCandidates(examples, texts)

    def loss(self, model: nn.Module, batch: EditCandidates) -> Tensor:  # type: ignore[override]
        assert isinstance(model, RNNSeq2Seq)
        with eval_mode(model):  # choose with the model as it predicts (no dropout)
            scores = torch.stack(
                [_log_prob(model, _sources(self, batch.examples, t)) for t in batch.texts]
            )  # (k, B)
        worst = scores.argmin(0).tolist()  # (B,)
        chosen = [batch.texts[j][i] for i, j in enumerate(worst)]
        return super().loss(model, _sources(self, batch.examples, chosen))


def dates_plugins(method: str) -> list[Plugin]:
    """The plug-ins of ``method``: FreeLB on the source characters' embeddings for
    ``"freelb"``; none for ``"plain"``, ``"edits"`` and ``"adv_edits"`` (the edits are in
    the data).

    Example:
        >>> [type(p).__name__ for p in dates_plugins("freelb")]
        ['FreeLB']
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    return [FreeLB(3.0, steps=3, embedding="src_embed")] if method == "freelb" else []


def _sources(task: DatesTask, examples: Sequence[DateExample], texts: Sequence[str]) -> DatesBatch:
    return task.test_batch([replace(e, text=t) for e, t in zip(examples, texts, strict=True)])


@torch.no_grad()
def _log_prob(model: RNNSeq2Seq, b: DatesBatch) -> Tensor:
    """Teacher-forced log-probability of each row's target: ``(B,)``."""
    logp = F.log_softmax(model(b.src, b.lengths, b.tgt_in), -1)  # (B, Lt, V)
    tok = logp.gather(-1, b.tgt_out[..., None])[..., 0]  # (B, Lt)
    return (tok * (b.tgt_out != 0)).sum(-1)


def attack_dates(
    task: DatesTask,
    model: RNNSeq2Seq,
    examples: Sequence[DateExample],
    budget: int,
    *,
    max_candidates: int = 48,
    seed: int = 0,
) -> tuple[float, list[str]]:
    """Exact match (%) under the greedy character-edit attack with ``budget`` edits per
    word, and the attacked texts. No edit names another month (:func:`keeps_month`)."""

    def score(idx: list[int], texts: list[str]) -> Tensor:
        chunks = range(0, len(idx), 2000)
        return torch.cat(
            [
                _log_prob(
                    model,
                    _sources(task, [examples[i] for i in idx[c : c + 2000]], texts[c : c + 2000]),
                )
                for c in chunks
            ]
        )

    def wrong(idx: list[int], texts: list[str]) -> list[bool]:
        chosen = [examples[i] for i in idx]
        hyps = task.convert(model, [replace(e, text=t) for e, t in zip(chosen, texts, strict=True)])
        return [h != e.target for h, e in zip(hyps, chosen, strict=True)]

    attack = CharEditAttack(
        budget, letters(task), protect=str.isdigit, max_candidates=max_candidates, seed=seed
    )

    def allowed(i: int, word: str, edited: str) -> bool:
        return keeps_month(examples[i].locale)(word, edited)

    results = attack.attack([e.text for e in examples], score, wrong, allowed)
    accuracy = 100.0 * sum(not r.success for r in results) / len(results)
    return round(accuracy, 2), [r.text for r in results]


def dates_study(
    methods: Sequence[str] = METHODS,
    *,
    steps: int = 450,
    examples: int = 300,
    seed: int = 0,
    smoke: bool = False,
    out: Path | None = None,
) -> list[Row]:
    """Train each method from scratch and measure exact match, clean and under 1 and 2
    edits per word, on the first ``examples`` held-out dates."""
    methods = check_methods("methods", methods, METHODS)
    examples = positive_int("examples", examples)
    size = dict(train_size=400, test_size=20, hidden=16, decoder_hidden=16) if smoke else {}
    steps, examples = (5, 8) if smoke else (steps, examples)
    cfg = TrainConfig(
        steps=steps, batch_size=64, lr=3e-3, warmup=min(50, steps // 10), seed=seed,
        eval_every=steps, progress=False, threads=1,
    )  # fmt: skip
    rows, samples = [], []
    for method in methods:
        kinds: dict[str, type[DatesTask]] = {
            "edits": EditedDatesTask,
            "adv_edits": AdversarialEditsTask,
        }
        task = kinds.get(method, DatesTask)(**size)  # type: ignore[arg-type]
        model, seconds = train_row(task, cfg, dates_plugins(method))
        assert isinstance(model, RNNSeq2Seq)
        test = task.test[:examples]
        metrics = {"clean": task.evaluate(model, limit=examples)["exact"]}
        for budget in (1, 2):
            metrics[f"edits={budget}"], texts = attack_dates(task, model, test, budget)
            samples += [
                f"{method}, {budget}: {e.text!r} -> {t!r}"
                for e, t in zip(test[:3], texts[:3], strict=True)
            ]
        rows.append(Row(method, metrics, round(seconds, 1)))
        print(rows[-1].line(), flush=True)
    if out is not None:
        notes = [
            f"Exact match (%) on the first {examples} held-out dates (days never trained on), "
            "clean and under the greedy character-edit attack with 1 and 2 edits per word "
            "(digits never edited, no word made to name another month). Every row trained "
            f"from scratch, {steps} steps of 64, seed {seed}. Samples: " + "; ".join(samples[:6])
        ]
        columns = ["clean", "edits=1", "edits=2"]
        write_outputs(
            out, "Dates under character edits", rows, columns, notes, settings=cfg.__dict__
        )
    return rows
