"""Record the attention weights of every attnlab attention call inside a model.

``capture`` listens on the hook in :mod:`attnlab.functional` and names each call by the
innermost module running when it happened (``"encoder.layers.0.self_attn"``). Engines
that return no weights (``sdpa``, ``blocked`` without ``return_weights``) are not asked
to: the weights of only the requested layers, heads and query rows are recomputed from
the call's own inputs afterwards (by the blocked engine, tile by tile, for softmax), so a
long sequence costs ``rows x Lk`` per head rather than ``Lq x Lk`` for every head.

A capture records the calls of the thread that opened it only, so two threads may each
capture their own model at the same time (the explorer's worker threads do).
"""

from __future__ import annotations

import fnmatch
import numbers
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from attnlab._eager import as_written
from attnlab._observe import LIVE_WEIGHTS, OBSERVERS, AttentionEvent
from attnlab._validate import validate_flag
from attnlab.functional import observed_weights

__all__ = ["Captured", "capture"]


@dataclass(frozen=True)
class Captured:
    """The weights of one attention call.

    Attributes:
        name: the module that made the call (``""`` outside any module of the model).
        call: how many earlier calls this module made during the capture (decoding steps).
        weights: ``(B, h, r, Lk)``: the requested heads and query rows.
        engine: the engine that computed the call's output.

    Example:
        >>> import torch, attnlab
        >>> with capture() as cap:  # no model: calls are unnamed
        ...     _ = attnlab.attention(*torch.randn(3, 1, 2, 4, 8).unbind(0))
        >>> c = cap.records[0]
        >>> c.name, c.call, tuple(c.weights.shape), c.engine
        ('', 0, (1, 2, 4, 4), 'sdpa')
        >>> torch.allclose(c.weights.sum(-1), torch.ones(1, 2, 4))  # recomputed, normalized
        True
    """

    name: str
    call: int
    weights: Tensor
    engine: str


class capture:
    """Context manager recording the attention weights of a model's attnlab calls.

    Args:
        model: the model whose module names label the calls (None: calls are unnamed).
        layers: module names or glob patterns to keep (``"*.self_attn"``); default all.
        heads: query heads to keep; default all.
        rows: ``(r0, r1)`` query rows to keep, clipped to each call's queries (as a
            slice is); default all.
        grad: keep the weights that computed the output, still in the autograd graph, so
            ``torch.autograd.grad(score, [c.weights for c in cap])`` gives d score / d
            weights (gradient relevance). Every call then runs on the ``reference`` engine;
            ``heads`` and ``rows`` must be left out. With activation checkpointing, run
            the backward inside the block too, so its recomputed calls take the same
            engine (calls a backward recomputes are never recorded twice).

    Example:
        >>> import torch
        >>> from attnlab.nn import Encoder, EncoderLayer, LayerConfig
        >>> enc = Encoder(EncoderLayer(LayerConfig(32, 4, 64, dropout=0.0)), 2).eval()
        >>> with capture(enc, heads=[0]) as cap:
        ...     _ = enc(torch.randn(1, 6, 32))
        >>> [(c.name, tuple(c.weights.shape)) for c in cap.records]
        [('layers.0.self_attn', (1, 1, 6, 6)), ('layers.1.self_attn', (1, 1, 6, 6))]
    """

    def __init__(
        self,
        model: nn.Module | None = None,
        *,
        layers: Sequence[str] | None = None,
        heads: Sequence[int] | None = None,
        rows: tuple[int, int] | None = None,
        grad: bool = False,
    ) -> None:
        if model is not None and not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module or None, got {type(model).__name__}")
        if validate_flag("grad", grad) and (heads is not None or rows is not None):
            raise ValueError(
                f"capture(grad=True) keeps whole weight tensors in the graph; got heads={heads} "
                f"and rows={rows}, expected both None (slice the records afterwards)"
            )
        self.grad = grad
        self.model, self.layers = model, _names("layers", layers)
        self.heads, self.rows = _heads(heads), _rows(rows)
        self.records: list[Captured] = []
        self._stack: list[str] = []
        self._handles: list[RemovableHandle] = []
        self._calls: dict[str, int] = {}
        self._thread = 0

    def __enter__(self) -> capture:
        self._thread = threading.get_ident()
        # a compiled model's modules by their own names (its wrapper prefixes "_orig_mod.")
        compiled = type(self.model).__name__ == "OptimizedModule"  # torch.compile's wrapper
        model: Any = self.model._orig_mod if compiled else self.model  # type: ignore[union-attr]
        for name, module in model.named_modules() if model is not None else []:
            self._handles.append(module.register_forward_pre_hook(self._push(name)))
            self._handles.append(module.register_forward_hook(self._pop, always_call=True))
        OBSERVERS.append((self._thread, self._observe))
        if self.grad:
            LIVE_WEIGHTS.append(self._thread)
        return self

    def __exit__(self, *exc: object) -> None:
        OBSERVERS.remove((self._thread, self._observe))
        if self.grad:
            LIVE_WEIGHTS.remove(self._thread)
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _push(self, name: str) -> Callable[..., None]:
        @as_written("reads the thread id")  # which dynamo cannot trace (it warned so)
        def hook(module: nn.Module, args: Any) -> None:
            if threading.get_ident() == self._thread:
                self._stack.append(name)

        return hook

    @as_written("reads the thread id")
    def _pop(self, module: nn.Module, args: Any, out: Any) -> None:
        if self._stack and threading.get_ident() == self._thread:
            self._stack.pop()

    def _wanted(self, name: str) -> bool:
        return self.layers is None or any(fnmatch.fnmatchcase(name, p) for p in self.layers)

    def _observe(self, event: AttentionEvent) -> None:
        if threading.get_ident() != self._thread:
            return  # another thread's call
        if torch._C._current_graph_task_id() != -1:  # activation checkpointing's recompute,
            return  # run by the backward: the forward's call, recorded already
        name = self._stack[-1] if self._stack else ""
        if not self._wanted(name):
            return
        call = self._calls.get(name, 0)
        self._calls[name] = call + 1
        if self.grad:
            if event.weights is None:
                raise RuntimeError(f"{event.engine} returned no weights under capture(grad=True)")
            w = event.weights
        else:
            w = observed_weights(event, self.heads, self.rows).detach()
        self.records.append(Captured(name, call, w, event.engine))

    def weights(self, name: str) -> list[Tensor]:
        """Weights of every call ``name`` made, in order."""
        return [c.weights for c in self.records if c.name == name]

    def __iter__(self) -> Iterator[Captured]:
        return iter(self.records)


def _names(name: str, value: Sequence[str] | None) -> list[str] | None:
    """A list of module names or patterns; a bare str is refused, not split into letters."""
    if value is None:
        return None
    if isinstance(value, str) or not all(isinstance(v, str) for v in value):
        raise TypeError(f"{name} must be a list of module names or patterns, got {value!r}")
    return list(value)


def _heads(heads: Sequence[int] | None) -> list[int] | None:
    """Query head indices >= 0 (each call checks them against its own head count)."""
    if heads is None:
        return None
    want = "heads must be a list of query head indices >= 0"
    if isinstance(heads, str | bytes) or not isinstance(heads, Iterable):  # (3: not iterable)
        raise TypeError(f"{want}, got {type(heads).__name__} {heads!r}")
    if not all(
        isinstance(h, numbers.Integral) and not isinstance(h, bool) and h >= 0 for h in heads
    ):
        raise ValueError(f"{want}, got {heads!r}")
    return [int(h) for h in heads]


def _rows(rows: tuple[int, int] | None) -> tuple[int, int] | None:
    """Query rows ``(r0, r1)`` with ``0 <= r0 <= r1`` (clipped to each call's queries)."""
    if rows is None:
        return None
    ok = isinstance(rows, tuple | list) and len(rows) == 2
    if not ok or not all(
        isinstance(r, numbers.Integral) and not isinstance(r, bool) for r in rows
    ):  # (numpy's ints too: np.bool_ is no Integral)
        raise ValueError(f"rows must be a pair of ints (r0, r1), got {rows!r}")
    r0, r1 = int(rows[0]), int(rows[1])
    if not 0 <= r0 <= r1:
        raise ValueError(f"rows={(r0, r1)} must satisfy 0 <= r0 <= r1")
    return (r0, r1)
