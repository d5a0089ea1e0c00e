"""The capture hook: observers see every :func:`attnlab.attention` / ``attend`` call of
their own thread.

:mod:`attnlab.interpret` registers an observer while a ``capture`` block is open; with no
observer the hook costs one truthiness check per call, and a block open in one thread
changes nothing in the others (their calls are neither seen nor made to return weights).
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor

from attnlab import _validate as V
from attnlab.engines import AttentionRequest, get_engine
from attnlab.engines.base import slice_weights

__all__ = [
    "LIVE_WEIGHTS",
    "OBSERVERS",
    "REWRITERS",
    "AttentionEvent",
    "live_weights",
    "notify",
    "observed_weights",
    "observing",
    "request_weights",
    "rewriter",
    "unobserved",
]


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
#: ``(thread, observer)``: the observer sees that thread's calls (``threading.get_ident()``).
OBSERVERS: list[tuple[int, Observer]] = []


def observing() -> bool:
    """Whether an observer is registered in this thread (cheap when none is anywhere)."""
    if not OBSERVERS:
        return False
    me = threading.get_ident()
    return any(t == me for t, _ in list(OBSERVERS))


#: The threads (``threading.get_ident()``) in which :func:`attnlab.attention` runs every call
#: on the reference engine with weights, so observers see the weights that computed the
#: output (gradient relevance needs d output / d weights). ``capture(..., grad=True)``
#: pushes its thread onto it; calls in other threads keep their engine.
LIVE_WEIGHTS: list[int] = []


def live_weights() -> bool:
    """Whether a ``capture(grad=True)`` block is open in this thread (cheap when none is)."""
    return bool(LIVE_WEIGHTS) and threading.get_ident() in LIVE_WEIGHTS


_QUIET = threading.local()


@contextmanager
def unobserved() -> Iterator[None]:
    """Calls in this block (in this thread) are not handed to observers: a layer that
    recomputes the weights of the call it just made, which a capture recorded twice.

    Example:
        >>> with unobserved():
        ...     notify(AttentionEvent(None, None, None, "attend"))  # seen by no observer
    """
    before = getattr(_QUIET, "on", False)
    _QUIET.on = True
    try:
        yield
    finally:
        _QUIET.on = before


def notify(event: AttentionEvent) -> None:
    """Hand ``event`` to every observer of this thread (none inside :func:`unobserved`)."""
    if getattr(_QUIET, "on", False):
        return
    me = threading.get_ident()
    for t, obs in list(OBSERVERS):
        if t == me:
            obs(event)


Rewriter = Callable[[AttentionRequest, Tensor], Tensor]

#: ``(thread, fn)``: in that thread, :func:`attnlab.attention` computes the weights on the
#: reference engine, hands them to ``fn(request, weights)`` and returns
#: ``fn(...) @ v`` with the weights ``fn`` gave (an intervention on the attention, as the
#: faithfulness tests of :mod:`attnlab.robust` make). The newest entry of a thread wins.
REWRITERS: list[tuple[int, Rewriter]] = []


def rewriter() -> Rewriter | None:
    """The weight rewriter of this thread, or None (cheap when there is none)."""
    if not REWRITERS:
        return None
    me = threading.get_ident()
    return next((fn for t, fn in reversed(REWRITERS) if t == me), None)


def request_weights(
    req: AttentionRequest, heads: list[int] | None = None, rows: tuple[int, int] | None = None
) -> Tensor:
    """Weights ``(B, len(heads), r1 - r0, Lk)`` of a validated request, without autograd.

    The one place weights are recomputed (for :func:`attention_weights` and for
    :mod:`attnlab.interpret`): by the blocked engine where it can (only the query blocks
    that overlap ``rows``), else by the reference engine. Dropout is not applied.

    Example:
        >>> import torch
        >>> q = k = v = torch.randn(1, 2, 5, 4)
        >>> from attnlab.functional import _request
        >>> req = _request(q, k, v, None, None, None, "dot", "softmax", 0.0, False, False)
        >>> request_weights(req, heads=[1], rows=(0, 2)).shape
        torch.Size([1, 1, 2, 5])
    """
    with torch.no_grad():
        plain = dataclasses.replace(
            req,
            q=req.q.detach(),
            k=req.k.detach(),
            v=req.v.detach(),
            dropout_p=0.0,
            return_weights=False,
            return_lse=False,
        )
        blocked = get_engine("blocked")
        engine = blocked if blocked.unsupported(plain) is None else get_engine("reference")
        return engine.weights(plain, heads, rows)


def observed_weights(
    event: AttentionEvent, heads: list[int] | None = None, rows: tuple[int, int] | None = None
) -> Tensor:
    """``(B, h, r, Lk)`` weights of an observed call: sliced from the weights the engine
    returned, else recomputed by :func:`request_weights`. ``rows`` are clipped to the
    call's queries, as a slice is (a decoding step has one); ``heads`` must exist."""
    if event.weights is None and event.request is None:
        raise ValueError("attend() hands its weights to observers; this event has none")
    n_heads, lq = (
        event.weights.shape[1:3]
        if event.weights is not None
        else (event.request.heads, event.request.lq)  # type: ignore[union-attr]
    )
    heads, rows = V.validate_selection(heads, rows, n_heads, lq, clip=True)
    if event.weights is not None:
        return slice_weights(event.weights, heads, rows)
    return request_weights(event.request, heads, rows)  # type: ignore[arg-type]
