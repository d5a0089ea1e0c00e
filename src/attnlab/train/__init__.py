"""Training: a deterministic loop, atomic safetensors checkpoints, a clean stop on
Ctrl-C/SIGTERM (:class:`TrainingInterrupted`, after a final checkpoint).

Example:
    >>> from attnlab.train import TrainConfig
    >>> TrainConfig(steps=10).batch_size
    64
"""

from __future__ import annotations

from attnlab.train.checkpoint import Checkpoint, CheckpointError, load_checkpoint, save_checkpoint
from attnlab.train.interrupt import TrainingInterrupted
from attnlab.train.loop import TrainConfig, Trainer, lr_factor
from attnlab.train.protocols import LossFn, Plugin, Task

__all__ = [
    "Checkpoint",
    "CheckpointError",
    "LossFn",
    "Plugin",
    "Task",
    "TrainConfig",
    "Trainer",
    "TrainingInterrupted",
    "load_checkpoint",
    "lr_factor",
    "save_checkpoint",
]
