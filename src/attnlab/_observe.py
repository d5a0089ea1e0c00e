"""The capture hook: observers see every :func:`attnlab.attention` / ``attend`` call.

:mod:`attnlab.interpret` registers an observer while a ``capture`` block is open; with no
observer the hook costs one truthiness check per call.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor

from attnlab.engines import AttentionRequest

__all__ = ["LIVE_WEIGHTS", "OBSERVERS", "AttentionEvent", "live_weights", "notify"]


@dataclass(frozen=True)
class AttentionEvent:
    """One attention call as an observer sees it.

    Attributes:
        request: the validated request (None for :func:`attnlab.attend`, whose scores
            were computed by the caller).
        weights: ``(B, H, Lq, Lk)`` if the engine returned them (always for ``attend``).
        lse: ``(B, H, Lq)`` logsumexp if the engine returned it.
        engine: the engine's name (``"attend"`` for :func:`attnlab.attend`).
    """

    request: AttentionRequest | None
    weights: Tensor | None
    lse: Tensor | None
    engine: str


Observer = Callable[[AttentionEvent], None]
OBSERVERS: list[Observer] = []

#: The threads (``threading.get_ident()``) in which :func:`attnlab.attention` runs every call
#: on the reference engine with weights, so observers see the weights that computed the
#: output (gradient relevance needs d output / d weights). ``capture(..., grad=True)``
#: pushes its thread onto it; calls in other threads keep their engine.
LIVE_WEIGHTS: list[int] = []


def live_weights() -> bool:
    """Whether a ``capture(grad=True)`` block is open in this thread (cheap when none is)."""
    return bool(LIVE_WEIGHTS) and threading.get_ident() in LIVE_WEIGHTS


def notify(event: AttentionEvent) -> None:
    """Hand ``event`` to every registered observer."""
    for obs in list(OBSERVERS):
        obs(event)
