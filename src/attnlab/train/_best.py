"""``best.safetensors`` holds the model that ``last.safetensors`` names as the run's best.

An evaluation that improves the score writes ``last`` first, which records the best
model's step and a digest of its weights, then ``best``: a crash between the two leaves a
``last`` whose own model is the best one, so a resume writes ``best`` from it (the two
files of one evaluation are the same checkpoint). The other order, ``best`` first, left a
``best`` newer than ``last`` after such a crash: the recorded best model was overwritten,
and only a bit-exact replay of the lost steps could make it again. A ``best`` that holds
no model the record names (an earlier run's in the same folder, a damaged or removed one)
cannot be recovered: the resume removes it and the run's next evaluation writes a new one.
"""

from __future__ import annotations

from pathlib import Path

from torch import Tensor

from attnlab.train.checkpoint import (
    Checkpoint,
    CheckpointError,
    digest,
    load_checkpoint,
    save_checkpoint,
)

__all__ = ["model_digest", "resumed_best"]

UNREADABLE = ""  # the digest of a file that cannot be read: it matches no record


def model_digest(state_dict: dict[str, Tensor]) -> str:
    """SHA-256 of a model's weights (names, dtypes, shapes, bytes): what ``last`` records
    of the best model, to recognise it in ``best.safetensors``.

    Example:
        >>> import torch
        >>> a, b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
        >>> model_digest(a.state_dict()) == model_digest(a.state_dict())
        True
        >>> model_digest(a.state_dict()) == model_digest(b.state_dict())
        False
    """
    return digest({k: v.detach().cpu() for k, v in state_dict.items()})


def resumed_best(path: Path, last: Checkpoint) -> tuple[int | None, str | None] | None:
    """The ``(step, weight digest)`` of the best model of the run that ``last`` continues,
    with ``path`` (its ``best.safetensors``) made to hold that model: as it is, or written
    from ``last`` when ``last`` is the best (a crash stopped the save of ``best``);
    ``(None, None)``: the run has no best yet, and no file. None: ``path`` held no model of
    the record (another run's, damaged, removed): it is removed, the best model is lost.

    A ``last`` written before the record existed (no ``best_digest``) keeps the file it
    finds, as resumes did then, unless that file cannot be read.
    """
    step, want = last.state.get("best_step"), last.state.get("best_digest")
    found = _read(path)
    if "best_digest" not in last.state:  # an older checkpoint: take the file on trust
        step, want = found if found is not None and found[1] != UNREADABLE else (None, None)
    have = None if found is None else found[1]
    if have == want:
        return step, want
    if want is not None and model_digest(last.model) == want:
        save_checkpoint(path, last)  # the same checkpoint that evaluation's best was
        return step, want
    path.unlink(missing_ok=True)
    return None


def _read(path: Path) -> tuple[int | None, str] | None:
    """``(step, weight digest)`` of the checkpoint at ``path``; None: no file there; the
    digest :data:`UNREADABLE`: a file that cannot be read."""
    if not path.exists():
        return None
    try:
        ckpt = load_checkpoint(path)
    except CheckpointError:
        return None, UNREADABLE
    step = ckpt.state.get("step")
    return (step if isinstance(step, int) else None), model_digest(ckpt.model)
