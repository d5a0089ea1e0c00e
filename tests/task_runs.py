"""Tiny trained checkpoints of every task, made in seconds, for tests that need a run
folder (``attnlab serve --runs``, :mod:`attnlab.tasks.inspect`).

Each is a task built small and trained for a few steps by :class:`attnlab.train.Trainer`,
which writes ``best.safetensors`` and ``last.safetensors`` into the folder, as
``attnlab train TASK --out FOLDER`` does (without the final report). The models are
barely trained: their outputs are valid token sequences, not good ones.

Example:
    >>> import tempfile
    >>> from pathlib import Path
    >>> make_tiny_run("generation", Path(tempfile.mkdtemp())).name
    'best.safetensors'
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from attnlab.train import TrainConfig, Trainer
from attnlab.train.loop import Task

__all__ = ["TINY_TASKS", "make_tiny_run", "tiny_task", "train_tiny"]


def _translation() -> Task:
    from attnlab.tasks.translation import TranslationTask

    return TranslationTask(
        150, 5, eval_size=5, d_model=32, num_heads=4, layers=2, dim_feedforward=64, dropout=0.0
    )


def _dates() -> Task:
    from attnlab.tasks.dates import DatesTask

    return DatesTask(64, 5, eval_size=5, embed_dim=8, hidden=16, decoder_hidden=16, attn_dim=16)


def _generation() -> Task:
    from attnlab.tasks.generation import GenerationTask

    return GenerationTask(64, 8, eval_size=8, d_model=32, num_heads=4, layers=2, dim_feedforward=64)


def _classification() -> Task:
    from attnlab.tasks.classification import DocumentTask

    return DocumentTask(64, 8, embed_dim=16, word_hidden=8, sentence_hidden=8)


def _vision() -> Task:
    from attnlab.tasks.vision import DigitsTask

    return DigitsTask(64, d_model=16, num_heads=2, layers=2, dim_feedforward=32)


def _captioning() -> Task:
    from attnlab.tasks.captioning import CaptioningTask

    return CaptioningTask(64, 4, eval_size=4, d_model=16, hidden_dim=16)


#: task name -> a builder of the task at a tiny size
TINY_TASKS: dict[str, Callable[[], Task]] = {
    "translation": _translation,
    "dates": _dates,
    "generation": _generation,
    "classification": _classification,
    "vision": _vision,
    "captioning": _captioning,
}


def tiny_task(name: str) -> Task:
    """Task ``name`` (one of :data:`TINY_TASKS`) built tiny: its data in well under a second."""
    if name not in TINY_TASKS:
        raise ValueError(f"name must be one of {sorted(TINY_TASKS)}, got {name!r}")
    return TINY_TASKS[name]()


def train_tiny(task: Task, folder: Path, steps: int | None = None) -> Trainer:
    """Train ``task`` for ``steps`` steps of 16 examples on one thread (default: 10 for
    translation, whose outputs are then free of special tokens at learning rate 5e-3 with
    no warmup, else 2), one evaluation at the end, writing ``folder/best.safetensors`` and
    ``folder/last.safetensors``; the trainer (its model in eval mode) is returned."""
    steps = steps or (10 if task.name == "translation" else 2)
    cfg = TrainConfig(
        steps=steps,
        threads=1,
        batch_size=16,
        lr=5e-3,
        warmup=0,
        eval_every=steps,
        progress=False,
        out_dir=str(folder),
    )
    trainer = Trainer(task, cfg)
    trainer.fit()
    trainer.model.eval()
    return trainer


def make_tiny_run(task: str, folder: Path) -> Path:
    """A tiny trained checkpoint of ``task`` in ``folder`` (created if needed): the path of
    ``folder/best.safetensors`` (``last.safetensors`` is beside it)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    train_tiny(tiny_task(task), folder)
    return folder / "best.safetensors"
