"""The models the explorer offers: the sentence encoder, and the trained task
checkpoints found under ``--runs``, each loaded once, on first use.

A request names a model; the name is looked up in :class:`Registry`'s table, built when
the server starts. No path is ever made from a request and no symlink under ``--runs``
is followed (a checkpoint file's no more than a folder's: one could point anywhere), so
nothing outside ``--runs`` can be read: a checkpoint is read through a descriptor opened
one folder at a time from ``--runs`` without following links (:func:`_opened`), so a
folder or file swapped for a link after the listing is refused, not read. Checkpoints of tasks that
:mod:`attnlab.tasks.inspect` cannot rebuild (the GAN, VAE and agent tasks) are left out
of the table; asked for by name, they are refused with the reason.
"""

from __future__ import annotations

import errno
import json
import os
import stat
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from attnlab.interpret import rollout
from attnlab.serve.encoder import EncoderModel
from attnlab.serve.limits import ApiError
from attnlab.serve.views import matrix_view, rounded
from attnlab.tasks import inspect_image, inspect_text
from attnlab.tasks.inspect import Inspection, RunModel, load_run, run_task_name
from attnlab.train import CheckpointError

__all__ = ["CHECKPOINTS", "RUNNERS", "Registry", "RunEntry", "find_runs"]

CHECKPOINTS = ("best.safetensors", "last.safetensors")  # preferred first
MAX_DEPTH = 3  # folders below --runs that are searched
#: task name -> its runner: the tasks whose checkpoints the explorer can open
RUNNERS: dict[str, type[RunModel]] = {**inspect_text.RUNNERS, **inspect_image.RUNNERS}


class RunEntry:
    """One trained task checkpoint, loaded on first use."""

    def __init__(self, name: str, path: Path, task: str, root: Path | None = None) -> None:
        self.name, self.path, self.task = name, path, task
        self.root = path.parent if root is None else root  # --runs: no link below it followed
        self._run: RunModel | None = None
        self._example: str | None = None
        self._lock = threading.RLock()  # both worker threads may run it

    @property
    def loaded(self) -> bool:
        return self._run is not None

    def load(self) -> RunModel:
        with self._lock:
            if self._run is None:
                with _opened(self.name, self.root, self.path) as read:  # (a link: refused)
                    try:
                        self._run = load_run(read)
                    except CheckpointError as e:  # (it named /proc/self/fd/N)
                        raise CheckpointError(str(e).replace(read, str(self.path))) from e
                    except ImportError as e:  # (a 500: the task's data needs an extra)
                        msg = f"model {self.name!r} cannot be loaded here: {e}"
                        raise ApiError(503, msg) from e
            return self._run

    def release(self) -> None:
        """Let go of the loaded model (the server has stopped; a later use loads again)."""
        with self._lock:
            self._run = None

    @property
    def kind(self) -> str:
        return RUNNERS[self.task].kind

    @property
    def input(self) -> str:
        return RUNNERS[self.task].input

    @property
    def methods(self) -> tuple[str, ...]:
        """Raw attention; rollout too where the model has a self-attention stack over its
        input (translation's encoder, generation's decoder). Vision's rollout comes with
        every attend answer, as its overlay."""
        return ("attention", "rollout") if self.task in _ROLLOUT else ("attention",)

    @property
    def example(self) -> str:
        """An input text the model reads (``""`` for image models), known without loading
        the weights: the example depends on the checkpoint's config only."""
        if self._run is not None:  # (no lock: a listing never waits for a running model)
            return self._run.example
        if self._example is None:
            try:
                with _opened(self.name, self.root, self.path) as read:
                    self._example = _config_example(read)
            except CheckpointError:  # (loading it says why)
                self._example = ""
        return self._example

    def count_tokens(self, text: str) -> int:
        with self._lock:
            return self.load().count_tokens(text)

    def inspect(self, text: str | None = None, image: Any = None) -> Inspection:
        with self._lock:
            return self.load().inspect(text=text, image=image)

    def explain(self, text: str, method: str, *, steps: int, top_k: int, report: Any) -> dict:
        """Rollout over the first self-attention stack (the only explanation a checkpoint
        offers besides its raw attention)."""
        t0 = time.perf_counter()
        ins = self.inspect(text=text)
        stack = next(s for s in ins.stacks if s.kind == "self")
        roll = rollout([w[None] for w in stack.weights])[0]  # (n, n)
        report(1.0)
        return {
            "method": method,
            "tokens": stack.queries,
            "saliency": rounded(roll.mean(0)),
            "matrix": matrix_view(roll, top_k),
            "seconds": round(time.perf_counter() - t0, 4),  # (it said 0.0)
        }


_ROLLOUT = ("translation", "generation")


def _config_example(path: str) -> str:
    """The ``example`` of the runner that ``path``'s config builds, its model made on the
    meta device (no weights read, no memory taken); ``""`` if the config cannot build one
    (loading it then says why)."""
    try:
        with safe_open(path, "pt") as f:
            config = json.loads((f.metadata() or {})["config"])
        with torch.device("meta"):
            return RUNNERS[config["task"]].build(config).example
    except (SafetensorError, OSError, KeyError, TypeError, ValueError, RuntimeError, ImportError):
        return ""  # (an ImportError failed the whole listing: /api/models answered 500)


def find_runs(runs: Path) -> dict[str, RunEntry]:
    """Checkpoints under ``runs`` (up to :data:`MAX_DEPTH` folders down), named by their
    folder relative to ``runs``; files that are not attnlab task checkpoints, and symlinks
    (to a file or a folder, wherever they point), are skipped.
    (Checkpoints of tasks without a runner in :data:`RUNNERS` are found too: the
    :class:`Registry` leaves them out.)

    Example:
        >>> import tempfile
        >>> find_runs(Path(tempfile.mkdtemp()))
        {}
    """
    found: dict[str, RunEntry] = {}
    for folder in sorted(_folders(runs, MAX_DEPTH)):
        path = next((folder / f for f in CHECKPOINTS if _plain_file(folder / f)), None)
        if path is None:
            continue
        try:
            task = run_task_name(path)
        except (CheckpointError, OSError, ValueError):
            continue
        name = folder.relative_to(runs).as_posix()
        name = folder_name(runs, "runs") if name == "." else name
        found[name] = RunEntry(name, path, task, runs)
    return found


# where an open descriptor can be opened again by name (the file, not a path to it)
_FD_DIR = next((d for d in ("/proc/self/fd", "/dev/fd") if os.path.isdir(d)), None)
_NO_LINKS = hasattr(os, "O_NOFOLLOW") and os.open in os.supports_dir_fd and bool(_FD_DIR)


@contextmanager
def _opened(name: str, root: Path, path: Path) -> Iterator[str]:
    """A path that reads ``path`` (a file under ``root``) as it is now, reached without
    following a link: each folder below ``root``, and the file, opened with
    ``O_NOFOLLOW`` relative to the one above, then read through its descriptor, so the
    file checked is the file read (checking ``path.is_symlink()`` missed a folder swapped
    for a link after the listing, and a swap between the check and the read).
    A :class:`CheckpointError` naming the run if a part is a link or the file is not a
    plain file (a FIFO would block the read).
    """
    if not _NO_LINKS:  # (no O_NOFOLLOW or /dev/fd: check, then read by name)
        rel = path.relative_to(root)
        inside = Path(os.path.realpath(path)).is_relative_to(Path(os.path.realpath(root)))
        if any((root / p).is_symlink() for p in (rel, *rel.parents)[:-1]) or not inside:
            raise CheckpointError(f"{name!r}: its checkpoint is now a symlink or behind one")
        yield str(path)
        return
    fds: list[int] = []
    try:
        fds.append(_open_part(name, str(root), os.O_RDONLY | os.O_DIRECTORY, None))
        parts = path.relative_to(root).parts
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            flags = os.O_RDONLY | os.O_NOFOLLOW | (os.O_NONBLOCK if last else os.O_DIRECTORY)
            fds.append(_open_part(name, part, flags, fds[-1]))
        if not stat.S_ISREG(os.fstat(fds[-1]).st_mode):
            raise CheckpointError(f"{name!r}: its checkpoint is now not a plain file")
        yield f"{_FD_DIR}/{fds[-1]}"
    finally:
        for fd in fds:
            os.close(fd)


def _open_part(name: str, part: str, flags: int, dir_fd: int | None) -> int:
    """``part`` of run ``name``'s checkpoint path opened in ``dir_fd`` with ``flags``; a
    :class:`CheckpointError` if it is a link (``O_NOFOLLOW``) or cannot be opened."""
    try:
        return os.open(part, flags, dir_fd=dir_fd)
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENOTDIR, errno.EMLINK):  # (EMLINK: FreeBSD's)
            raise CheckpointError(
                f"{name!r}: its checkpoint is now a symlink or behind one ({part!r})"
            ) from e
        raise CheckpointError(f"{name!r}: its checkpoint cannot be opened ({e.strerror})") from e


def folder_name(path: Path, fallback: str) -> str:
    """The name a folder is offered under: its resolved name (``Path(".").name`` is ``""``,
    which the explorer could not ask for), ``fallback`` for ``/``.

    Example:
        >>> folder_name(Path("/"), "runs"), folder_name(Path("/a/b/."), "runs")
        ('runs', 'b')
    """
    return path.resolve().name or fallback


def _plain_file(path: Path) -> bool:
    """``path`` is a file, not a symlink to one (``is_file`` follows links: a
    ``best.safetensors`` linking outside ``--runs`` was listed and loaded)."""
    return path.is_file() and not path.is_symlink()


def _folders(root: Path, depth: int) -> list[Path]:
    """``root`` and its sub-folders down to ``depth`` levels (symlinks not followed)."""
    out = [root]
    if depth > 0:
        for child in sorted(root.iterdir()):
            if child.is_dir() and not child.is_symlink():
                out += _folders(child, depth - 1)
    return out


class Registry:
    """Name -> model: ``"minilm"`` (or the ``--model`` folder's name) and every run of a
    task in :data:`RUNNERS`; ``refused`` holds, by name, why each other run is not offered.

    Example:
        >>> r = Registry()
        >>> [m["name"] for m in r.info()], r.default
        (['minilm'], 'minilm')
    """

    def __init__(
        self, model: str | Path | None = None, runs: str | Path | None = None, encoder: Any = None
    ) -> None:
        self.default = "minilm" if model is None else folder_name(Path(model), "model")
        self.models: dict[str, Any] = {self.default: EncoderModel(model, encoder)}
        self.refused: dict[str, str] = {}
        for name, entry in ({} if runs is None else find_runs(Path(runs))).items():
            name = name if name not in self.models else f"runs/{name}"
            if entry.task in RUNNERS:
                self.models[name] = entry
            else:
                self.refused[name] = (
                    f"model {name!r} is a {entry.task!r} checkpoint, which the explorer cannot "
                    f"open (it opens {sorted(RUNNERS)})"
                )

    def get(self, name: str) -> Any:
        """The model called ``name``; KeyError (with the reason and the choices) for any
        other name."""
        if name not in self.models:
            why = self.refused.get(name, f"unknown model {name!r}")
            raise KeyError(f"{why}; choose one of {sorted(self.models)}")
        return self.models[name]

    def release(self) -> None:
        """Let go of every loaded model (the server has stopped)."""
        for m in self.models.values():
            m.release()

    def info(self) -> list[dict[str, Any]]:
        """What ``GET /api/models`` lists (every text model with its example)."""
        return [
            {
                "name": name,
                "kind": m.kind,
                "task": m.task,
                "input": m.input,
                "methods": list(m.methods),
                "loaded": m.loaded,
                "example": m.example,
            }
            for name, m in self.models.items()
        ]
