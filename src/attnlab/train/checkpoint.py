"""Checkpoints: one safetensors file with weights, config and optimizer state.

Nothing is pickled. Tensors go into the safetensors body under ``model.*``, ``optim.*``
and ``state.*``; the config, the optimizer's hyper-parameters and the trainer's counters
go into its string metadata as JSON, with a SHA-256 digest of the tensors and the rest of
the metadata (format 2; format 1's digest covered the tensors alone, and such files still
load). Writes are atomic: the file is written next to the
target under a temporary name, flushed to disk and renamed over it, so a crash during a
save leaves the previous checkpoint intact.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from attnlab._io import atomic_write, first_names
from attnlab._validate import instance_of
from attnlab.train._fit import model_misfits, optimizer_misfits

__all__ = [
    "FORMATS",
    "Checkpoint",
    "CheckpointError",
    "check_same_run",
    "load_checkpoint",
    "load_optimizer_state",
    "restore_task_state",
    "save_checkpoint",
    "task_state",
]

TASK_PREFIX = "task."  # a task's own entries in a checkpoint's state
FORMAT = "attnlab-checkpoint-2"  # the digest covers the tensors and the metadata
# what load_checkpoint reads; format 1's digest (none in the oldest files) covers only the
# tensors: a changed byte in its JSON (a step 4 -> 5) loaded silently
FORMATS = (FORMAT, "attnlab-checkpoint-1")


class CheckpointError(ValueError):
    """A checkpoint file that is missing, truncated, corrupt or does not fit the model.

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as d:
        ...     bad = Path(d) / "ck.safetensors"
        ...     _ = bad.write_bytes(b"not a checkpoint")
        ...     try:
        ...         load_checkpoint(bad)
        ...     except CheckpointError as e:  # a ValueError too
        ...         print(isinstance(e, ValueError), "truncated or corrupt" in str(e))
        True True
    """


@dataclass
class Checkpoint:
    """What a checkpoint holds.

    Attributes:
        model: the model's ``state_dict``.
        config: JSON-able model/task configuration (enough to rebuild the model).
        optimizer: the optimizer's ``state_dict`` (or None).
        state: trainer counters and extra tensors (``step``, the RNG state, ...).

    Example:
        >>> m = torch.nn.Linear(2, 1)
        >>> ck = Checkpoint(m.state_dict(), {"in": 2, "out": 1}, state={"step": 0})
        >>> sorted(ck.model), ck.optimizer
        (['bias', 'weight'], None)
    """

    model: dict[str, Tensor]
    config: dict[str, Any] = field(default_factory=dict)
    optimizer: dict[str, Any] | None = None
    state: dict[str, Any] = field(default_factory=dict)


def save_checkpoint(path: str | Path, ckpt: Checkpoint) -> Path:
    """Write ``ckpt`` to ``path`` atomically (temporary file, fsync, rename).

    Raises:
        ValueError: ``path`` is empty, a folder, in a "folder" that is a file, has a name
            too long, or does not end in ``.safetensors`` (the format written).

    Example:
        >>> import tempfile, torch
        >>> d = tempfile.mkdtemp()
        >>> m = torch.nn.Linear(2, 2)
        >>> p = save_checkpoint(f"{d}/ck.safetensors", Checkpoint(m.state_dict(), {"n": 2}))
        >>> load_checkpoint(p).config
        {'n': 2}
    """
    _check_path(path, saving=True)
    instance_of("ckpt", ckpt, Checkpoint, "a Checkpoint (model, config, optimizer, state)")
    if not isinstance(ckpt.model, dict) or not all(
        isinstance(k, str) and isinstance(v, Tensor) for k, v in ckpt.model.items()
    ):  # (an int: "'int' object has no attribute 'items'")
        raise TypeError(
            f"ckpt.model must be a state_dict (str -> Tensor), got {type(ckpt.model).__name__}"
        )
    instance_of("ckpt.config", ckpt.config, dict, "a dict (JSON-able)")  # (see _unflatten)
    try:
        json.dumps(ckpt.config)
    except (TypeError, ValueError) as e:  # (json's message named no argument)
        raise TypeError(f"ckpt.config must be JSON-able (str, numbers, lists, dicts): {e}") from e
    _check_state(ckpt.state)
    tensors, meta = _flatten(ckpt)
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Read a checkpoint written by :func:`save_checkpoint`.

    Raises:
        CheckpointError: the file is missing, truncated or corrupt, or is not an attnlab
            checkpoint; the message names the file and the cause.

    Example:
        >>> import tempfile
        >>> d, m = tempfile.mkdtemp(), torch.nn.Linear(2, 2)
        >>> opt = torch.optim.SGD(m.parameters(), lr=0.1)
        >>> state = {"step": 7, "seen": torch.arange(3)}  # counters and tensors
        >>> saved = Checkpoint(m.state_dict(), {"d": 2}, opt.state_dict(), state)
        >>> ck = load_checkpoint(save_checkpoint(f"{d}/ck.safetensors", saved))
        >>> ck.state["step"], ck.state["seen"].tolist(), ck.optimizer["param_groups"][0]["lr"]
        (7, [0, 1, 2], 0.1)
        >>> torch.equal(ck.model["weight"], m.weight)
        True
        >>> try:
        ...     load_checkpoint(f"{d}/none.safetensors")
        ... except CheckpointError as e:
        ...     print(str(e).replace(d, "<d>"))
        checkpoint '<d>/none.safetensors' does not exist
    """
    path = _check_path(path, saving=False)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    if not os.access(path, os.R_OK):  # (it was called truncated or corrupt)
        raise CheckpointError(f"checkpoint {str(path)!r} cannot be read (permission denied)")
    try:
        with safe_open(str(path), "pt") as f:  # one pass: metadata and tensors
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(
            f"checkpoint {str(path)!r} is truncated or corrupt and cannot be read ({e}); "
            "use an earlier checkpoint or train again"
        ) from e
    if meta.get("format") not in FORMATS:
        raise CheckpointError(f"{str(path)!r} is a safetensors file but not an attnlab checkpoint")
    _check_digest(path, tensors, meta)
    try:  # the metadata's JSON (a changed byte there raised a bare JSONDecodeError)
        return _unflatten(tensors, meta)
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(
            f"checkpoint {str(path)!r} has corrupt metadata ({type(e).__name__}: {e}); "
            "use an earlier checkpoint or train again"
        ) from e


def _check_digest(path: Path, tensors: dict[str, Tensor], meta: dict[str, str]) -> None:
    """A :class:`CheckpointError` unless the digest saved in ``meta`` matches the tensors
    and, from format 2 on, the rest of the metadata."""
    if meta["format"] == FORMAT:
        ok, what = meta.get("digest") == digest(tensors, meta), "tensors or metadata"
    else:  # format 1: the tensors alone, and the oldest files have no digest
        ok, what = "digest" not in meta or meta["digest"] == digest(tensors), "tensors"
    if not ok:
        raise CheckpointError(
            f"checkpoint {str(path)!r} is corrupt: its {what} do not match the digest saved "
            "with them; use an earlier checkpoint or train again"
        )


def _check_state(state: object) -> None:
    """``ckpt.state``: a dict of str keys to tensors or JSON-able values, else a TypeError
    naming it (a numpy float raised json's bare "not JSON serializable"; an int key came
    back as a str)."""
    if not isinstance(state, dict):
        raise TypeError(f"ckpt.state must be a dict with str keys, got {type(state).__name__}")
    for k, v in state.items():
        if not isinstance(k, str):
            raise TypeError(
                f"ckpt.state must be a dict with str keys, got key {k!r} ({type(k).__name__})"
            )
        if isinstance(v, Tensor):
            continue
        try:
            json.dumps(v)
        except (TypeError, ValueError) as e:
            raise TypeError(
                f"ckpt.state[{k!r}] must be a tensor or JSON-able (str, numbers, lists, dicts; "
                f"a numpy number as float() or int()), got {type(v).__name__}: {e}"
            ) from e


def _check_path(path: object, *, saving: bool) -> Path:
    """``path`` as a checkpoint file (``Path(123)`` said "expected str, bytes or
    os.PathLike object"): not empty (read as ``'.'``), not a folder (said not to exist),
    a name the file system takes (a bare OSError); to save, in a folder that is not a
    file (``File exists``) and ending in ``.safetensors`` (``ck.pt`` got safetensors).
    A ValueError naming ``path`` (to load, a :class:`CheckpointError`)."""
    if not isinstance(path, str | os.PathLike):
        raise TypeError(f"path must be a str or Path, got {type(path).__name__}")
    text, error = os.fspath(path), ValueError if saving else CheckpointError
    if not text:
        raise error("path is an empty string; give a file such as runs/x/last.safetensors")
    p = Path(text)
    try:
        if p.is_dir():
            msg = f"is a folder; give a file, such as {str(p / 'last.safetensors')!r}"
            raise error(f"path {text!r} {msg}")
        above = next((d for d in p.absolute().parents if d.exists()), None) if saving else None
    except OSError as e:  # (a name past 255 bytes)
        raise error(f"path {text!r} cannot be reached ({e.strerror or e})") from None
    if above is not None and not above.is_dir():
        raise error(f"path {text!r} is in {str(above)!r}, a file, not a folder")
    if saving and p.suffix.lower() != ".safetensors":
        raise error(f"path {text!r} must end in .safetensors (the format written), got "
                    f"{p.suffix or 'no suffix'!r}")  # fmt: skip
    return p


def _flatten(ckpt: Checkpoint) -> tuple[dict[str, Tensor], dict[str, str]]:
    tensors = {f"model.{k}": v.detach().contiguous().cpu() for k, v in ckpt.model.items()}
    opt_meta: dict[str, Any] = {}
    if ckpt.optimizer is not None:
        opt_meta = {"param_groups": ckpt.optimizer["param_groups"], "state": {}}
        for pid, st in ckpt.optimizer["state"].items():
            opt_meta["state"][str(pid)] = _split_state(st, f"optim.{pid}.", tensors)
    state_meta = _split_state(ckpt.state, "state.", tensors)
    tensors = _unshared(tensors)  # tied weights, a state tensor that is a model tensor
    meta = {
        "format": FORMAT,
        "config": json.dumps(ckpt.config),
        "optimizer": json.dumps(opt_meta if ckpt.optimizer is not None else None),
        "state": json.dumps(state_meta),
    }
    return tensors, meta | {"digest": digest(tensors, meta)}


def digest(tensors: dict[str, Tensor], meta: dict[str, str] | None = None) -> str:
    """SHA-256 of the tensors' names, dtypes, shapes and bytes (safetensors keeps no
    checksum: damaged tensor bytes loaded as weights, 250 of them NaN), and of ``meta``'s
    keys and values but ``digest`` when given.

    Example:
        >>> import torch
        >>> digest({"w": torch.zeros(2)}) == digest({"w": torch.zeros(2)})
        True
        >>> digest({}, {"step": "4"}) == digest({}, {"step": "5"})
        False
    """
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():  # the bytes as a buffer, not a copy
            h.update(t.reshape(-1).view(torch.uint8).numpy().data)
    for key, value in sorted((meta or {}).items()):
        if key != "digest":  # with lengths: no two dicts give the same bytes
            h.update(f"meta|{len(key)}|{key}|{len(value)}|{value}".encode())
    return h.hexdigest()


def _split_state(d: dict[str, Any], prefix: str, tensors: dict[str, Tensor]) -> dict[str, Any]:
    """Move the tensors of ``d`` into ``tensors`` under ``prefix``; return the rest."""
    rest: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, Tensor):
            tensors[prefix + k] = v.detach().contiguous().cpu()
        else:
            rest[k] = v
    return rest


def _unshared(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """Tensors that share memory with an earlier one (tied weights: an output layer that
    reuses the embedding; a state tensor that is a model tensor) as copies: safetensors
    refuses to write shared memory."""
    seen: set[int] = set()
    out = {}
    for k, v in tensors.items():
        ptr = v.untyped_storage().data_ptr()
        out[k] = v.clone() if ptr in seen and v.numel() else v
        seen.add(ptr)
    return out


def _unflatten(tensors: dict[str, Tensor], meta: dict[str, str]) -> Checkpoint:
    def under(prefix: str) -> dict[str, Tensor]:
        return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}

    opt = json.loads(meta["optimizer"])
    if opt is not None:
        state = {}
        for pid, rest in opt["state"].items():
            state[int(pid)] = {**rest, **under(f"optim.{pid}.")}
        opt = {"param_groups": opt["param_groups"], "state": state}
    config = json.loads(meta["config"])
    if not isinstance(config, dict):  # (a list failed a resume: a bare AttributeError)
        raise TypeError(f"its config is a {type(config).__name__}, not a JSON object")
    return Checkpoint(
        model=under("model."),
        config=config,
        optimizer=opt,
        state={**json.loads(meta["state"]), **under("state.")},
    )


def check_same_run(
    ckpt: Checkpoint,
    config: dict,
    train_size: int,
    path: str | Path,
    defaults: dict[str, Any] | None = None,
) -> None:
    """A resume must continue the checkpoint's run: the same task config (a model of other
    heads but the same shapes loaded without a word; an empty saved config matches only
    an empty one) and training set size (another gave another vocabulary, or other data).
    ``defaults``: what an entry missing from the saved config means (one that a checkpoint
    saved before the task named it lacks), so that such a checkpoint resumes a task that
    uses the default.

    Example:
        >>> try:
        ...     check_same_run(Checkpoint({}, {"d": 4}), {"d": 8}, 10, "last.safetensors")
        ... except ValueError as e:
        ...     print(str(e).split(": ", 2)[2].split(";")[0])
        d: 4 -> 8
    """
    size = ckpt.state.get("train_size")
    if size is not None and int(size) != train_size:
        raise CheckpointError(
            f"resume: {path} was trained on {int(size)} training examples, this task has "
            f"{train_size}; build the task with the checkpoint's size to continue it"
        )
    was, ours = _flat(ckpt.config), _flat(json.loads(json.dumps(config)))
    if not was and ours:  # (it was taken for a match: a hand-made file, no config saved)
        raise CheckpointError(
            f"resume: {path} holds an empty config, so nothing shows it continues this "
            f"task's run (whose config names {', '.join(sorted(config)[:4])}); train afresh"
        )
    was = _flat(json.loads(json.dumps(defaults or {}))) | was
    if was != ours:
        keys = sorted(k for k in was.keys() | ours.keys() if was.get(k) != ours.get(k))
        shown = first_names([f"{k}: {was.get(k)!r} -> {ours.get(k)!r}" for k in keys], 3)
        raise CheckpointError(
            f"resume: {path} holds another configuration than this task's: {shown}; "
            "build the task as the checkpoint's was, or train afresh"
        )


def task_state(task: object) -> dict[str, Any]:
    """What a task keeps in each checkpoint, through its optional ``task_state()`` (tensors
    go into the safetensors body, the rest into the JSON metadata), under ``task.``.

    Example:
        >>> class T:
        ...     def task_state(self):
        ...         return {"seen": torch.arange(2), "count": 2}
        >>> sorted(task_state(T())), task_state(object())  # a task without one: nothing
        (['task.count', 'task.seen'], {})
    """
    get = getattr(task, "task_state", None)
    return {} if get is None else {TASK_PREFIX + k: v for k, v in get().items()}


def restore_task_state(task: Any, ckpt: Checkpoint, path: str | Path) -> None:
    """Give a resumed task what :func:`task_state` saved (nothing from a checkpoint older
    than it) and the checkpoint's config, through its optional ``load_task_state(state,
    config)``, then check that it continues the checkpoint's run (:func:`check_same_run`,
    with what the task's optional ``config_defaults()`` says an entry missing from an older
    checkpoint's config means): a task may take up a setting it drew itself (an agent's
    rollout seed) before the check.

    Example:
        >>> class T:
        ...     def config(self): return {"d": 4}
        ...     def num_train(self): return 2
        ...     def load_task_state(self, state, config): print(state, config)
        >>> ck = Checkpoint({}, {"d": 4}, state={"step": 3, "task.n": 2})
        >>> restore_task_state(T(), ck, "last.safetensors")
        {'n': 2} {'d': 4}
    """
    load = getattr(task, "load_task_state", None)
    if load is not None:
        n = len(TASK_PREFIX)
        saved = {k[n:]: v for k, v in ckpt.state.items() if k.startswith(TASK_PREFIX)}
        try:
            load(saved, ckpt.config)
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(
                f"checkpoint {str(path)!r} holds task state this task cannot take up "
                f"({type(e).__name__}: {e}); use an earlier checkpoint or train again"
            ) from e
    defaults = getattr(task, "config_defaults", None)
    check_same_run(ckpt, task.config(), task.num_train(), path, defaults and defaults())


def _flat(d: dict, prefix: str = "") -> dict[str, object]:
    """``{"model": {"d": 4}}`` -> ``{"model.d": 4}`` (lists stay whole)."""
    out: dict[str, object] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        out.update(_flat(v, f"{key}.") if isinstance(v, dict) else {key: v})
    return out


def load_optimizer_state(opt: torch.optim.Optimizer, ckpt: Checkpoint, path: str | Path) -> None:
    """Load the checkpoint's optimizer state into ``opt`` (none: leave it), turning a state
    that does not fit (a bare ``KeyError: 'params'``) into a :class:`CheckpointError`."""
    if ckpt.optimizer is None:
        return
    try:
        opt.load_state_dict(ckpt.optimizer)
        bad = optimizer_misfits(opt, ckpt.optimizer)  # int8 moments were cast silently
        if bad:
            raise ValueError(f"{first_names(bad)} cannot be its state")
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as e:
        raise CheckpointError(
            f"checkpoint {str(path)!r} holds an optimizer state that does not fit this "
            f"model ({type(e).__name__}: {e}); use an earlier checkpoint or train again"
        ) from e


def load_model_state(model: nn.Module, ckpt: Checkpoint, path: str | Path = "") -> None:
    """Load weights, turning key or shape mismatches into a :class:`CheckpointError`."""
    bad = model_misfits(model, ckpt.model)  # (load_state_dict casts an int8 to float)
    if bad:
        msg = f"{first_names(bad)} are not floating-point; expected float32 (float16, bfloat16 fit)"
        raise CheckpointError(f"checkpoint {str(path)!r} does not fit this model: {msg}")
    try:
        model.load_state_dict(ckpt.model)
    except RuntimeError as e:
        raise CheckpointError(f"checkpoint {str(path)!r} does not fit this model: {e}") from e
