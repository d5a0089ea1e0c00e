"""The models the explorer offers: the sentence encoder, and the trained task
checkpoints found under ``--runs``, each loaded once, on first use.

A request names a model; the name is looked up in :class:`Registry`'s table, built when
the server starts. No path is ever made from a request, so nothing outside ``--runs``
can be read.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from attnlab.interpret import rollout
from attnlab.serve.encoder import EncoderModel
from attnlab.serve.views import matrix_view, rounded
from attnlab.tasks.inspect import Inspection, RunModel, load_run, run_task_name
from attnlab.train import CheckpointError

__all__ = ["CHECKPOINTS", "Registry", "RunEntry", "find_runs"]

CHECKPOINTS = ("best.safetensors", "last.safetensors")  # preferred first
MAX_DEPTH = 3  # folders below --runs that are searched


class RunEntry:
    """One trained task checkpoint, loaded on first use."""

    def __init__(self, name: str, path: Path, task: str) -> None:
        self.name, self.path, self.task = name, path, task
        self._run: RunModel | None = None
        self._lock = threading.RLock()  # both worker threads may run it

    @property
    def loaded(self) -> bool:
        return self._run is not None

    def load(self) -> RunModel:
        with self._lock:
            if self._run is None:
                self._run = load_run(self.path)
            return self._run

    @property
    def kind(self) -> str:
        return _KINDS.get(self.task, "seq2seq")

    @property
    def input(self) -> str:
        return "image" if self.kind in ("image", "caption") else "text"

    @property
    def methods(self) -> tuple[str, ...]:
        """Raw attention; rollout too where the model has a self-attention stack over its
        input (translation's encoder, generation's decoder). Vision's rollout comes with
        every attend answer, as its overlay."""
        return ("attention", "rollout") if self.task in _ROLLOUT else ("attention",)

    @property
    def example(self) -> str:
        return self.load().example if self.input == "text" else ""

    def count_tokens(self, text: str) -> int:
        with self._lock:
            return self.load().count_tokens(text)

    def inspect(self, text: str | None = None, image: Any = None) -> Inspection:
        with self._lock:
            return self.load().inspect(text=text, image=image)

    def explain(self, text: str, method: str, *, steps: int, top_k: int, report: Any) -> dict:
        """Rollout over the first self-attention stack (the only explanation a checkpoint
        offers besides its raw attention)."""
        ins = self.inspect(text=text)
        stack = next(s for s in ins.stacks if s.kind == "self")
        roll = rollout([w[None] for w in stack.weights])[0]  # (n, n)
        report(1.0)
        return {
            "method": method,
            "tokens": stack.queries,
            "saliency": rounded(roll.mean(0)),
            "matrix": matrix_view(roll, top_k),
            "seconds": 0.0,
        }


_ROLLOUT = ("translation", "generation")
_KINDS = {
    "translation": "seq2seq",
    "dates": "seq2seq",
    "generation": "lm",
    "classification": "classifier",
    "vision": "image",
    "captioning": "caption",
}


def find_runs(runs: Path) -> dict[str, RunEntry]:
    """Checkpoints under ``runs`` (up to :data:`MAX_DEPTH` folders down), named by their
    folder relative to ``runs``; files that are not attnlab checkpoints are skipped.

    Example:
        >>> import tempfile
        >>> find_runs(Path(tempfile.mkdtemp()))
        {}
    """
    found: dict[str, RunEntry] = {}
    for folder in sorted(_folders(runs, MAX_DEPTH)):
        path = next((folder / f for f in CHECKPOINTS if (folder / f).is_file()), None)
        if path is None:
            continue
        try:
            task = run_task_name(path)
        except (CheckpointError, OSError, ValueError):
            continue
        name = folder.relative_to(runs).as_posix()
        name = runs.name if name == "." else name
        found[name] = RunEntry(name, path, task)
    return found


def _folders(root: Path, depth: int) -> list[Path]:
    """``root`` and its sub-folders down to ``depth`` levels (symlinks not followed)."""
    out = [root]
    if depth > 0:
        for child in sorted(root.iterdir()):
            if child.is_dir() and not child.is_symlink():
                out += _folders(child, depth - 1)
    return out


class Registry:
    """Name -> model: ``"minilm"`` (or the ``--model`` folder's name) and every run.

    Example:
        >>> r = Registry()
        >>> [m["name"] for m in r.info()], r.default
        (['minilm'], 'minilm')
    """

    def __init__(
        self, model: str | Path | None = None, runs: str | Path | None = None, encoder: Any = None
    ) -> None:
        self.default = "minilm" if model is None else Path(model).name
        self.models: dict[str, Any] = {self.default: EncoderModel(model, encoder)}
        for name, entry in ({} if runs is None else find_runs(Path(runs))).items():
            self.models[name if name not in self.models else f"runs/{name}"] = entry

    def get(self, name: str) -> Any:
        """The model called ``name``; KeyError (with the choices) for any other name."""
        if name not in self.models:
            raise KeyError(f"unknown model {name!r}; choose one of {sorted(self.models)}")
        return self.models[name]

    def info(self) -> list[dict[str, Any]]:
        """What ``GET /api/models`` lists (examples only of models already loaded)."""
        return [
            {
                "name": name,
                "kind": m.kind,
                "task": m.task,
                "input": m.input,
                "methods": list(m.methods),
                "loaded": m.loaded,
                "example": m.example if m.loaded or m.kind == "encoder" else "",
            }
            for name, m in self.models.items()
        ]
