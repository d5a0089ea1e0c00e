"""The shortcut study: a cue the attention can be taught to ignore.

The classification task (which currency does the customer pay in?) with one more
sentence in every document, ``"the invoice was printed on <colour> paper"``: each colour
stands for a class. In 95% of the training documents the colour names the document's own
class; in every test document it names another one (the cue is reversed). A model that
learned the colour fails the test set; one that reads the deciding sentence does not.

Rows: plain training, entropy regularization of the attention (EAR: mean row entropy
pushed up), and supervised attention (the sentence attention's cross-entropy against
the deciding sentence). Measured: accuracy on the reversed-cue test set, on the same test
documents with the cue agreeing, how often the sentence attention's largest weight is on
the deciding sentence, and the mean attention on the cue sentence.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F

from attnlab.robust.regularize import EntropyRegularizer, SupervisedAttention
from attnlab.robust.study import Row, check_methods, train_row, write_outputs
from attnlab.tasks.classification import CURRENCIES, Document, DocumentBatch, DocumentTask
from attnlab.tasks.text import Vocab
from attnlab.train import Plugin, TrainConfig

__all__ = ["COLOURS", "METHODS", "ShortcutTask", "add_cue", "shortcut_plugins", "shortcut_study"]

COLOURS = ("amber", "cobalt", "crimson", "ivory", "jade", "olive", "scarlet", "violet")
METHODS = ("plain", "entropy", "supervised")


def add_cue(docs: Sequence[Document], agree: float, seed: int) -> list[tuple[Document, int]]:
    """Each document with a cue sentence at a random position (``agree``: the share whose
    colour names the document's class, the others name another class) and the cue's index.

    Example:
        >>> from attnlab.tasks.classification import make_documents
        >>> doc, cue = add_cue(make_documents(1, seed=0), agree=1.0, seed=0)[0]
        >>> COLOURS[doc.label] in doc.sentences[cue], doc.deciding != cue
        (True, True)
    """
    rng, out = random.Random(seed), []
    for d in docs:
        colour = d.label
        if rng.random() >= agree:
            colour = rng.choice([c for c in range(len(CURRENCIES)) if c != d.label])
        pos = rng.randint(0, len(d.sentences))
        cue = f"the invoice was printed on {COLOURS[colour]} paper"
        sentences = (*d.sentences[:pos], cue, *d.sentences[pos:])
        deciding = d.deciding + (pos <= d.deciding)
        out.append((replace(d, sentences=sentences, deciding=deciding), pos))
    return out


class ShortcutTask(DocumentTask):
    """:class:`~attnlab.tasks.classification.DocumentTask` with the colour cue: agreeing in
    ``agree`` of the training documents, against the label in every test document.

    Example:
        >>> t = ShortcutTask(train_size=40, test_size=8)
        >>> sum(COLOURS[d.label] in " ".join(d.sentences) for d in t.test_docs)
        0
    """

    name = "shortcut"

    def __init__(
        self,
        train_size: int = 8000,
        test_size: int = 1000,
        *,
        agree: float = 0.95,
        seed: int = 1234,
    ) -> None:
        super().__init__(train_size, test_size, seed=seed)
        train = add_cue(self.train_docs, agree, seed + 1)
        test = add_cue(self.test_docs, 0.0, seed + 2)
        self.train_docs = [d for d, _ in train]
        self.test_docs, self.test_cues = [d for d, _ in test], [c for _, c in test]
        self.agreeing_docs = _swap_cue(self.test_docs, self.test_cues)
        self.vocab = Vocab.build(s for d in self.train_docs for s in d.sentences)
        self.model_cfg["vocab_size"] = len(self.vocab)
        self.data_options["agree"] = float(agree)

    def measure(self, model: torch.nn.Module) -> dict[str, float]:
        """Accuracy (%) with the cue reversed and agreeing, attention on the deciding
        sentence (% of documents where it is the largest) and on the cue (mean weight)."""
        pred, weights = self.predict(model, self.test_docs)
        truth = torch.tensor([d.label for d in self.test_docs])
        deciding = torch.tensor([d.deciding for d in self.test_docs])
        cue = torch.tensor(self.test_cues)
        agree_pred, _ = self.predict(model, self.agreeing_docs)
        rows = torch.arange(len(cue))
        return {
            "reversed": round(100.0 * float((pred == truth).float().mean()), 2),
            "agreeing": round(100.0 * float((agree_pred == truth).float().mean()), 2),
            "attn_deciding": round(
                100.0 * float((weights.argmax(-1) == deciding).float().mean()), 2
            ),
            "attn_on_cue": round(float(weights[rows, cue].mean()), 3),
        }


def _swap_cue(docs: Sequence[Document], cues: Sequence[int]) -> list[Document]:
    """The same documents with the cue sentence's colour set to the document's class."""
    out = []
    for d, c in zip(docs, cues, strict=True):
        s = list(d.sentences)
        s[c] = f"the invoice was printed on {COLOURS[d.label]} paper"
        out.append(replace(d, sentences=tuple(s)))
    return out


def _deciding(batch: DocumentBatch) -> torch.Tensor:
    """One-hot ``(B, S)`` at each document's deciding sentence."""
    return F.one_hot(batch.deciding, batch.ids.shape[1]).float()


def shortcut_plugins(method: str) -> list[Plugin]:
    """The plug-ins of ``method`` (one of :data:`METHODS`).

    Example:
        >>> [type(p).__name__ for p in shortcut_plugins("supervised")]
        ['SupervisedAttention']
    """
    if method == "plain":
        return []
    if method == "entropy":
        return [EntropyRegularizer(0.1)]
    if method == "supervised":
        return [SupervisedAttention("han.sentence_attention", _deciding, weight=1.0)]
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")


def shortcut_study(
    methods: Sequence[str] = METHODS,
    *,
    steps: int = 400,
    seed: int = 0,
    smoke: bool = False,
    out: Path | None = None,
) -> list[Row]:
    """Train each method from scratch (same seed and settings) and measure it."""
    methods = check_methods("methods", methods, METHODS)
    task = ShortcutTask(200, 50) if smoke else ShortcutTask()
    steps = 10 if smoke else steps
    cfg = TrainConfig(
        steps=steps, batch_size=64, lr=3e-3, warmup=min(50, steps // 10), seed=seed,
        eval_every=steps, progress=False, threads=1,
    )  # fmt: skip
    rows = []
    for method in methods:
        model, seconds = train_row(task, cfg, shortcut_plugins(method))
        rows.append(Row(method, task.measure(model), round(seconds, 1)))
        print(rows[-1].line(), flush=True)
    if out is not None:
        notes = [
            f"{len(task.test_docs)} held-out documents. reversed: accuracy (%) when the colour "
            "cue names a wrong class (every test document); agreeing: the same documents with "
            "the cue naming the right class; attn_deciding: % of documents whose largest "
            "sentence weight is on the deciding sentence; attn_on_cue: mean sentence weight "
            f"on the cue. Training: {task.num_train()} documents, cue agreeing in 95%, "
            f"{steps} steps of 64, seed {seed}, every row from scratch."
        ]
        columns = ["reversed", "agreeing", "attn_deciding", "attn_on_cue"]
        write_outputs(out, "A shortcut cue", rows, columns, notes, settings=cfg.__dict__)
    return rows
