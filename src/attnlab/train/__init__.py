"""Training: a deterministic loop and atomic safetensors checkpoints.

Example:
    >>> from attnlab.train import TrainConfig
    >>> TrainConfig(steps=10).batch_size
    64
"""

from __future__ import annotations

from attnlab.train.checkpoint import Checkpoint, CheckpointError, load_checkpoint, save_checkpoint
from attnlab.train.loop import Task, TrainConfig, Trainer, lr_factor

__all__ = [
    "Checkpoint",
    "CheckpointError",
    "Task",
    "TrainConfig",
    "Trainer",
    "load_checkpoint",
    "lr_factor",
    "save_checkpoint",
]
