"""Is the attention an explanation here? The faithfulness tests on two trained models.

* classification: the hierarchical classifier's sentence attention
  (``han.sentence_attention``), outputs the class distribution;
* dates: the seq2seq model's Bahdanau attention (``attention``, one call per output
  character, teacher-forced on the reference), outputs one distribution per character.

For each: test accuracy; the same model trained and evaluated with that attention frozen
to uniform (Wiegreffe & Pinter); Jain & Wallace's adversarial attention (median JSD, in
nats of at most ln 2 = 0.693, of the most different attention found that moves no output
distribution by more than 0.01 in total variation, and the share of examples where it
reaches 0.5); their permutation test (median over examples of the median TVD of the output
when the attention rows are shuffled).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from attnlab._validate import positive_int
from attnlab.robust.faithfulness import (
    adversarial_attention,
    median,
    permutation_test,
    uniform_attention,
)
from attnlab.robust.study import Row, check_methods, train_row, write_outputs
from attnlab.tasks.classification import DocumentTask
from attnlab.tasks.dates import DatesTask
from attnlab.train import LossFn, TrainConfig

__all__ = ["Uniform", "faithfulness_row", "faithfulness_study"]

MODELS = ("classification", "dates")


class Uniform:
    """Plug-in: the step runs with the attention module ``site(model)`` frozen to uniform.

    Example:
        >>> Uniform(lambda m: m.attention).site.__name__
        '<lambda>'
    """

    def __init__(self, site: Callable[[nn.Module], nn.Module]) -> None:
        self.site = site

    def step(self, model: nn.Module, batch: Any, loss_fn: LossFn) -> Tensor:
        with uniform_attention(self.site(model)):
            return loss_fn(model, batch)


def _sentence_site(model: nn.Module) -> nn.Module:
    """The hierarchical classifier's sentence attention."""
    return model.get_submodule("han.sentence_attention")


def _decoder_site(model: nn.Module) -> nn.Module:
    """The dates model's Bahdanau attention."""
    return model.get_submodule("attention")


def _setup(
    name: str, smoke: bool, seed: int = 0
) -> tuple[Any, Callable[[nn.Module], nn.Module], TrainConfig]:
    if name == "classification":
        task: Any = DocumentTask(200, 40) if smoke else DocumentTask(8000, 1000)
        site, steps = _sentence_site, 400
    else:
        size: dict[str, Any] = dict(train_size=400, test_size=20, hidden=16) if smoke else {}
        task, site, steps = DatesTask(**size), _decoder_site, 450
    steps = 5 if smoke else steps
    cfg = TrainConfig(
        steps=steps, batch_size=64, lr=3e-3, warmup=min(50, steps // 10), eval_every=steps,
        progress=False, threads=1, seed=seed,
    )  # fmt: skip
    return task, site, cfg


def _runner(name: str, task: Any, n: int) -> Callable[[nn.Module], Tensor]:
    """``run(model) -> logits`` on the first ``n`` test examples."""
    if name == "classification":
        ids = task.encode(task.test_docs[:n]).ids
        return lambda m: m(ids).logits
    b = task.test_batch(task.test[:n])
    return lambda m: m(b.src, b.lengths, b.tgt_in)


def _accuracy(name: str, task: Any, model: nn.Module) -> float:
    with torch.no_grad():
        scores = (
            task.evaluate(model) if name == "classification" else task.evaluate(model, limit=1000)
        )
    return float(scores["accuracy" if name == "classification" else "exact"])


def faithfulness_row(name: str, *, examples: int = 200, smoke: bool = False, seed: int = 0) -> Row:
    """Train the ``name`` model (``"classification"`` or ``"dates"``) normally and with
    uniform attention (both from ``seed``), and run the tests on ``examples`` held-out
    examples."""
    if not isinstance(name, str) or name not in MODELS:
        raise ValueError(f"name must be one of {MODELS}, got {name!r}")
    examples = positive_int("examples", examples)
    task, site, cfg = _setup(name, smoke, seed)
    model, seconds = train_row(task, cfg)
    frozen, _ = train_row(task, cfg, [Uniform(site)])
    with uniform_attention(site(frozen)):
        uniform_acc = _accuracy(name, task, frozen)
    run = _runner(name, task, 8 if smoke else examples)
    search = adversarial_attention(
        model, site(model), run, tolerance=0.01, steps=10 if smoke else 100
    )
    perm = permutation_test(model, site(model), run, permutations=20)
    metrics = {
        "accuracy": _accuracy(name, task, model),
        "uniform_accuracy": uniform_acc,
        "adv_jsd_median": round(float(median(search.jsd)), 3),
        "adv_jsd>0.5_%": round(100.0 * float((search.jsd > 0.5).float().mean()), 1),
        "perm_tvd_median": round(float(median(perm["median_tvd"])), 3),
        "max_attention_median": round(float(median(perm["max_attention"])), 3),
    }
    return Row(name, metrics, round(seconds, 1))


COLUMNS = [
    "accuracy",
    "uniform_accuracy",
    "adv_jsd_median",
    "adv_jsd>0.5_%",
    "perm_tvd_median",
    "max_attention_median",
]


def faithfulness_study(
    names: tuple[str, ...] = ("classification", "dates"),
    *,
    seed: int = 0,
    smoke: bool = False,
    out: Path | None = None,
) -> list[Row]:
    """:func:`faithfulness_row` for each model (trained from ``seed``; ``--seed`` was
    ignored), then the table and report."""
    names = check_methods("names", names, MODELS)
    rows = []
    for name in names:
        rows.append(faithfulness_row(name, smoke=smoke, seed=seed))
        print(rows[-1].line(), flush=True)
    if out is not None:
        notes = [
            "accuracy: held-out accuracy / exact match (%); uniform_accuracy: the same model "
            "trained and evaluated with the attention frozen to uniform (Wiegreffe & Pinter); "
            "adv_jsd_median: median JSD (nats, max 0.693) between the model's attention and "
            "the most different attention found that moves no output distribution by more "
            "than 0.01 TVD (Jain & Wallace); adv_jsd>0.5_%: examples where it exceeds 0.5; "
            "perm_tvd_median: median output TVD when the attention rows are shuffled; "
            "max_attention_median: median of the largest attention weight."
        ]
        settings = {"seed": seed, "smoke": smoke}
        write_outputs(
            out, "Is the attention an explanation?", rows, COLUMNS, notes, settings=settings
        )
    return rows
