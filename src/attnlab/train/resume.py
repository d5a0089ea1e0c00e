"""The settings a resumed run takes from its checkpoint, whatever it is given: those that
decide which steps it takes (the data order, the schedule, the update). Both the
:class:`~attnlab.train.Trainer` (``resume=True``) and ``attnlab train --resume`` keep
them, and each warns about every one it was given otherwise.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from attnlab.train.checkpoint import CheckpointError

if TYPE_CHECKING:
    from attnlab.train.loop import TrainConfig

__all__ = ["RUN_SETTINGS", "kept_message", "resumed_config"]

# the TrainConfig fields a resumed run keeps from its checkpoint (the others, such as steps,
# eval_every, target, patience and threads, are the new run's to choose)
RUN_SETTINGS = ("seed", "batch_size", "lr", "weight_decay", "warmup", "min_lr_ratio", "clip")


def resumed_config(
    cfg: TrainConfig, state: Mapping[str, Any], path: str | Path
) -> tuple[TrainConfig, dict[str, tuple[Any, Any]]]:
    """``cfg`` with the :data:`RUN_SETTINGS` that the checkpoint ``state`` (at ``path``)
    records, and each that ``cfg`` gave otherwise, as ``{name: (kept, given)}``: a changed
    seed or batch size took another data order, a changed lr another schedule, and the
    optimizer's weight decay was the checkpoint's whatever ``cfg`` said.

    Raises:
        CheckpointError: the checkpoint records a setting out of range.

    Example:
        >>> from attnlab.train import TrainConfig
        >>> cfg, changed = resumed_config(TrainConfig(lr=0.1), {"train": {"lr": 0.01}}, "last")
        >>> cfg.lr, changed
        (0.01, {'lr': (0.01, 0.1)})
    """
    saved = state.get("train")
    if not isinstance(saved, dict):  # (a hand-made checkpoint: nothing to keep)
        return cfg, {}
    kept = {k: saved[k] for k in RUN_SETTINGS if saved.get(k) is not None}
    try:
        out = dataclasses.replace(cfg, **kept)
    except (TypeError, ValueError) as e:
        raise CheckpointError(
            f"checkpoint {str(path)!r} records training settings out of range ({e}); "
            "use an earlier checkpoint or train again"
        ) from e
    changed = {k: (getattr(out, k), getattr(cfg, k)) for k in kept}
    return out, {k: v for k, v in changed.items() if v[0] != v[1]}


def kept_message(name: str, kept: object, given: object, afresh: str) -> str:
    """The warning about one setting given otherwise than the checkpoint's.

    Example:
        >>> print(kept_message("--seed", 3, 4, "or train afresh"))
        --seed 4 is not the checkpoint's 3: the resumed run keeps 3 (or train afresh with 4)
    """
    return (
        f"{name} {given} is not the checkpoint's {kept}: the resumed run keeps {kept} "
        f"({afresh} with {given})"
    )
