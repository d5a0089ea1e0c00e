"""The engine contract: one request type, one result type, one registry.

Every engine receives a validated :class:`AttentionRequest` and returns
``(out, weights | None, lse | None)``. An engine declares what it can compute
through :meth:`Engine.unsupported`, which returns ``None`` or the reason it cannot, and
the settings it takes through :attr:`Engine.options`; ``engine="auto"`` picks the first
exact engine in preference order that can. Inexact (approximate) engines are candidates
of ``auto`` only when the call opts in with ``approximate=True``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

import torch
from torch import Tensor

from attnlab._eager import any_nan
from attnlab.bias import Bias
from attnlab.engines._nonfinite import any_nonfinite, finite_part, inf_products
from attnlab.engines._registry import registered
from attnlab.masks import Mask
from attnlab.scores import ScoreFn, grouped_matmul

__all__ = [
    "AttentionRequest",
    "Engine",
    "EngineResult",
    "available_engines",
    "get_engine",
    "may_hold_nan",
    "plain_attention",
    "register_engine",
    "select_engine",
    "sink_rows",
    "slice_weights",
    "validate_options",
    "with_sinks",
]

EngineResult = tuple[Tensor, Tensor | None, Tensor | None]


@dataclass(frozen=True)
class AttentionRequest:
    """A validated attention call. Tensors are ``(B, H, L, E)``; batch already broadcast.

    Attributes:
        q: queries ``(B, Hq, Lq, E)``.
        k: keys ``(B, Hkv, Lk, E)``.
        v: values ``(B, Hkv, Lk, Ev)``.
        mask: a :class:`~attnlab.masks.Mask` already checked against the sizes, or None.
        bias: a :class:`~attnlab.bias.Bias` already checked against the sizes, or None.
        scale: the multiplier of the raw scores (resolved; never None).
        score: ``"dot"``, ``"cosine"`` or a callable ``fn(q, k) -> (B, Hq, Lq, Lk)``.
        normalize: ``"softmax"``, ``"sparsemax"`` or ``"entmax15"``.
        dropout_p: dropout probability on the weights.
        return_weights: whether weights ``(B, Hq, Lq, Lk)`` are wanted.
        return_lse: whether the per-row logsumexp ``(B, Hq, Lq)`` is wanted.
        options: settings for the named engine (``engine_options``), read-only; checked
            against :attr:`Engine.options` when the engine is selected.
        approximate: whether ``engine="auto"`` may pick an inexact engine.
        softcap: logit soft-capping: the scaled scores become ``softcap * tanh(s / softcap)``
            before the bias and mask (Gemma 2, Grok), or None.
        sinks: attention sinks ``(Hq,)``: a learned logit per query head that joins the
            softmax denominator (gpt-oss) and takes weight from the keys, or ``(B or 1, Hq,
            Lq)``, one per query row (Inkling 2's sinks computed from each token), or None.

    Example:
        >>> from attnlab import masks
        >>> q = torch.randn(1, 2, 4, 8)
        >>> req = AttentionRequest(q, q, q, masks.causal(), None, 8**-0.5, "dot", "softmax",
        ...                        0.0, return_weights=True, return_lse=False)
        >>> req.batch, req.heads, req.lq, req.lk
        (1, 2, 4, 4)
        >>> out, w, lse = get_engine("reference").forward(req)  # an EngineResult
        >>> tuple(out.shape), w[0, 0, 0].tolist(), lse is None
        ((1, 2, 4, 8), [1.0, 0.0, 0.0, 0.0], True)
    """

    q: Tensor
    k: Tensor
    v: Tensor
    mask: Mask | None
    bias: Bias | None
    scale: float
    score: str | ScoreFn
    normalize: str
    dropout_p: float
    return_weights: bool
    return_lse: bool
    options: Mapping[str, object] = field(
        default_factory=lambda: MappingProxyType({}), hash=False
    )  # not hashed: a request stays hashable, as before options existed
    approximate: bool = False
    softcap: float | None = None
    sinks: Tensor | None = field(default=None, hash=False)

    @property
    def batch(self) -> int:
        return self.q.shape[0]

    @property
    def heads(self) -> int:
        return self.q.shape[1]

    @property
    def lq(self) -> int:
        return self.q.shape[2]

    @property
    def lk(self) -> int:
        return self.k.shape[2]

    @property
    def needs_grad(self) -> bool:
        """Whether autograd will need gradients through this call."""
        held = [*self.bias.parameters(), *self.bias.buffers()] if self.bias else []
        leaves = [self.q, self.k, self.v, *held]  # a tensor bias is a buffer that may want grad
        leaves += [] if self.sinks is None else [self.sinks]
        return torch.is_grad_enabled() and any(t.requires_grad for t in leaves)


class Engine:
    """Base class of engines. Subclasses set ``name`` and ``exact`` and implement
    :meth:`unsupported` and :meth:`forward`; an engine with settings lists their names in
    ``options`` and checks their values in :meth:`check_option_values`.

    Example:
        >>> get_engine("flex").options  # the settings its engine_options may carry
        ('compile',)
        >>> get_engine("flex").check_options({"chunk": 1})
        Traceback (most recent call last):
        ValueError: engine_options: 'chunk' is not an option of engine 'flex'; it accepts 'compile'
    """

    name: str = "engine"
    exact: bool = True
    summary: str = ""
    options: tuple[str, ...] = ()

    def check_options(self, options: Mapping[str, object]) -> None:
        """``ValueError`` naming an option this engine does not take, or a bad value."""
        for key in options:
            if key not in self.options:
                accepted = ", ".join(map(repr, self.options)) or "none"
                raise ValueError(
                    f"engine_options: {key!r} is not an option of engine {self.name!r}; "
                    f"it accepts {accepted}"
                )
        self.check_option_values(options)

    def check_option_values(self, options: Mapping[str, object]) -> None:
        """``ValueError``/``TypeError`` for a bad option value (names already checked)."""

    def unsupported(self, req: AttentionRequest) -> str | None:
        """``None`` if this engine can compute ``req`` (exactly, if it is exact), else the
        reason it cannot."""
        raise NotImplementedError

    def forward(self, req: AttentionRequest) -> EngineResult:
        """Compute ``(out (B, Hq, Lq, Ev), weights | None, lse | None)``."""
        raise NotImplementedError

    #: True when :meth:`prefers` is False for every plain call (see :meth:`plain`) that
    #: this engine's :meth:`plain` does not answer itself, so ``auto`` moves on to the next
    #: engine for them without building a request.
    passes_plain: bool = False

    def prefers(self, req: AttentionRequest) -> bool:
        """Whether ``auto`` should pick this engine for ``req`` (given it is supported)."""
        return True

    def declines(self, req: AttentionRequest) -> bool:
        """Whether :meth:`prefers` is False, told cheaply before :meth:`unsupported`."""
        return False

    def plain(self, q: Tensor, k: Tensor, v: Tensor, scale: float | None) -> Tensor | None:
        """``out (B, Hq, Lq, Ev)`` of a plain call, or None to have a request built.

        A plain call asks for dot-product softmax attention and nothing else: no mask,
        bias, dropout, weights, logsumexp, soft-capping, sinks or engine options (a
        decoding step). ``q, k, v`` are validated and share a batch. An engine returns a
        result only where its :meth:`unsupported` and :meth:`prefers` would let ``auto``
        pick it for the same call; ``auto`` asks the engines of its order up to the first
        that does not pass plain calls by, and an engine that does (:attr:`passes_plain`)
        answers None to pass the call on. This default always asks for the request.
        """
        return None

    def weights(
        self,
        req: AttentionRequest,
        heads: list[int] | None = None,
        rows: tuple[int, int] | None = None,
    ) -> Tensor:
        """Normalized weights ``(B, len(heads), r1 - r0, Lk)`` of some heads and query rows.

        This default computes every weight with :meth:`forward` and slices; an engine that
        can compute only the asked part (``blocked``: only the query blocks that overlap
        ``rows``) overrides it. ``ValueError`` if the engine returns no weights.
        """
        _, w, _ = self.forward(dataclasses.replace(req, return_weights=True))
        if w is None:
            raise ValueError(f"engine {self.name!r} returns no attention weights")
        return slice_weights(w, heads, rows)

    def __repr__(self) -> str:
        return f"<engine {self.name!r}{'' if self.exact else ' (approximate)'}>"


def slice_weights(w: Tensor, heads: list[int] | None, rows: tuple[int, int] | None) -> Tensor:
    """``w (B, H, Lq, Lk)`` restricted to ``heads`` and query ``rows`` (None: all).

    Example:
        >>> slice_weights(torch.zeros(1, 4, 6, 6), [1, 3], (2, 5)).shape
        torch.Size([1, 2, 3, 6])
    """
    w = w if heads is None else w[:, heads]
    return w if rows is None else w[:, :, rows[0] : rows[1]]


def sink_rows(sinks: Tensor) -> Tensor:
    """Attention sinks as one logit per row: ``(H,)`` -> ``(1, H, 1)``; ``(B or 1, H, L)``
    stays. Either broadcasts against a logsumexp ``(B, H, L)``.

    Example:
        >>> sink_rows(torch.zeros(4)).shape, sink_rows(torch.zeros(1, 4, 3)).shape
        (torch.Size([1, 4, 1]), torch.Size([1, 4, 3]))
    """
    return sinks.view(1, -1, 1) if sinks.dim() == 1 else sinks


def with_sinks(out: Tensor, lse: Tensor, sinks: Tensor | None) -> tuple[Tensor, Tensor]:
    """Attention sinks (``(H,)`` or per row ``(B or 1, H, L)``) joined to a finished softmax:
    ``out (B, H, L, Ev)`` (or its weights ``(B, H, L, Lk)``) scaled by ``exp(lse - lse')``
    and ``lse (B, H, L)`` raised to ``lse' = logaddexp(lse, sink)``.

    Exact whatever computed ``out`` and ``lse``; fully masked rows (``lse = -inf``) stay 0.

    Example:
        >>> out, lse = with_sinks(torch.ones(1, 1, 1, 1), torch.zeros(1, 1, 1), torch.zeros(1))
        >>> out.item(), round(lse.item(), 4)
        (0.5, 0.6931)
    """
    if sinks is None:
        return out, lse
    sink = sink_rows(sinks).to(lse.dtype)
    # a row with no key and a sink of -inf (none) has nothing at all: 0, with gradient 0
    dead = torch.isneginf(lse) & torch.isneginf(sink)  # (B, H, L)
    lse_, sink_ = lse.masked_fill(dead, 0.0), sink.masked_fill(dead, 0.0)
    total = torch.logaddexp(lse_, sink_)  # (B, H, L), finite where dead
    share = torch.exp(lse_ - total).masked_fill(dead, 0.0)
    return out * share.unsqueeze(-1).to(out.dtype), total.masked_fill(dead, float("-inf"))


def weighted_values(w: Tensor, v: Tensor, allowed: Tensor | None) -> Tensor:
    """``w (B, Hq, Lq, Lk) @ v (B, Hkv, Lk, Ev)`` where a NaN or infinite value reaches
    only the rows ``allowed (., ., Lq, Lk)`` (None: every key) lets see its key, as plain
    math gives it there: a masked-out weight is 0, and ``0 * NaN`` or ``0 * inf`` would
    spread it to every row (an uninitialized cache slot, say).

    Example:
        >>> v = torch.tensor([[[[1.0], [float("inf")]]]])
        >>> allowed = torch.tensor([[[[True, False], [True, True]]]])
        >>> weighted_values(torch.tensor([[[[1.0, 0.0], [0.5, 0.5]]]]), v, allowed).flatten()
        tensor([1., inf])
    """
    if not any_nonfinite(v):
        return grouped_matmul(w, v)
    bad = ~torch.isfinite(v)  # (B, Hkv, Lk, Ev)
    out = grouped_matmul(w, finite_part(v, bad))  # (B, Hq, Lq, Ev)
    return out + inf_products(w, v.masked_fill(~bad, 0.0), allowed).to(out.dtype)


def may_hold_nan(*ts: Tensor) -> bool:
    """Cheap NaN screen (:func:`attnlab._eager.any_nan`): a sum is NaN when an element is
    (one pass; ``amax`` then tells NaN from ``inf - inf``; a screen reads a whole KV cache).

    Example:
        >>> may_hold_nan(torch.ones(3)), may_hold_nan(torch.tensor([1.0, float("nan")]))
        (False, True)
    """
    return any_nan(*ts)  # (False while exporting; True under vmap: no value to read)


def validate_options(options: object) -> Mapping[str, object]:
    """``engine_options``: ``None`` or a mapping with str keys, returned read-only.

    Example:
        >>> dict(validate_options({"seed": 0}))
        {'seed': 0}
    """
    if options is None:
        return MappingProxyType({})
    if not isinstance(options, Mapping):
        raise TypeError(
            f"engine_options must be a mapping of option names to values or None, "
            f"got {type(options).__name__}"
        )
    bad = [key for key in options if not isinstance(key, str)]
    if bad:
        raise TypeError(f"engine_options keys must be str option names, got {bad[0]!r}")
    return MappingProxyType(dict(options))


_REGISTRY: dict[str, Engine] = {}
_AUTO_ORDER: list[str] = []
_APPROX_ORDER: list[str] = []
_PLAIN: list[Engine] = []  # the engines ``auto`` asks for a plain call, in its order


def register_engine(engine: Engine, *, auto_rank: int | None = None) -> Engine:
    """Add ``engine`` to the registry; with ``auto_rank``, ``auto`` considers it at that
    position in its preference order (0 = tried first; past the end: last). An approximate
    engine with an ``auto_rank`` joins a separate order that ``auto`` tries first, but only
    for calls with ``approximate=True``; without one, ``auto`` never picks it.

    ``engine`` must be an :class:`Engine` (a subclass implementing ``unsupported`` and
    ``forward``) with a str ``name`` other than ``"auto"``; a TypeError/ValueError naming
    what is wrong leaves the registry and ``auto``'s orders unchanged.

    Example:
        >>> from attnlab.engines import get_engine
        >>> get_engine("reference").name
        'reference'
    """
    orders = registered(engine, auto_rank, _REGISTRY, (_AUTO_ORDER, _APPROX_ORDER))
    _REGISTRY[engine.name] = engine  # checked: nothing below raises
    _AUTO_ORDER[:], _APPROX_ORDER[:], _PLAIN[:] = orders
    return engine


def plain_attention(q: Tensor, k: Tensor, v: Tensor, scale: float | None) -> Tensor | None:
    """What ``engine="auto"`` computes for a plain call (see :meth:`Engine.plain`) when
    the engine it would pick can say so without a request, else None.

    Example:
        >>> q, k = torch.randn(1, 4, 1, 8), torch.randn(1, 2, 32, 8)
        >>> plain_attention(q, k, k, None).shape  # on the CPU from 16 keys on
        torch.Size([1, 4, 1, 8])
        >>> plain_attention(q, k[:, :, :8], k[:, :, :8], None) is None  # 8 keys: a request
        True
    """
    for engine in _PLAIN:
        out = engine.plain(q, k, v, scale)
        if out is not None or not engine.passes_plain:
            return out
    return None  # every engine passed the call on: the request decides


def available_engines() -> dict[str, Engine]:
    """All registered engines by name (a copy: changing it registers nothing).

    Example:
        >>> sorted(name for name, e in available_engines().items() if not e.exact)
        ['linear', 'nystrom', 'performer']
    """
    return dict(_REGISTRY)


def get_engine(name: str) -> Engine:
    """The engine registered under ``name``; ``ValueError`` listing the registered names
    (``"auto"`` is no engine: ``attention(engine="auto")`` and :func:`select_engine`
    resolve it per call).

    Example:
        >>> e = get_engine("performer")
        >>> e, e.options[:2]
        (<engine 'performer' (approximate)>, ('num_features', 'seed'))
        >>> get_engine("fast")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ValueError: engine='fast' is not a known engine; expected one of 'reference', ...
    """
    if not isinstance(name, str):
        raise TypeError(f"engine must be a str, got {type(name).__name__}")
    if name not in _REGISTRY:
        known = ", ".join(map(repr, _REGISTRY))
        why = f"engine={name!r} is not a known engine; expected one of {known}"
        if name == "auto":
            why = f"engine='auto' names no single engine; get_engine takes one of {known}"
        per_call = "attention() and select_engine also take 'auto', which picks one per call"
        raise ValueError(f"{why} ({per_call})")
    return _REGISTRY[name]


def select_engine(name: str, req: AttentionRequest) -> Engine:
    """Resolve ``name`` (or ``"auto"``) to an engine that can compute ``req``.

    ``auto`` tries the ranked approximate engines first when ``req.approximate`` is set
    (each declines unless it :meth:`~Engine.prefers` the request), then the exact ones.
    Raises ``ValueError`` saying what is unsupported and which engines can do it, or
    naming a bad engine option.

    Example:
        >>> from dataclasses import replace
        >>> from attnlab import masks
        >>> q = torch.randn(1, 2, 4, 8)
        >>> req = AttentionRequest(q, q, q, masks.causal(), None, 8**-0.5, "dot", "softmax",
        ...                        0.0, return_weights=False, return_lse=False)
        >>> weights = replace(req, return_weights=True)
        >>> select_engine("auto", req).name, select_engine("auto", weights).name
        ('sdpa', 'reference')
        >>> try:
        ...     select_engine("sdpa", weights)
        ... except ValueError as e:
        ...     print(str(e).split(". ")[-1])
        Engines that can: 'reference', 'blocked'
    """
    if name == "auto":
        return _select_auto(req)
    engine = get_engine(name)
    engine.check_options(req.options)
    reason = engine.unsupported(req)
    if reason is None:
        return engine
    able = [  # suggest approximations only to a caller who chose one
        n
        for n, e in _REGISTRY.items()
        if (e.exact or not engine.exact) and e.unsupported(req) is None
    ]
    raise ValueError(
        f"engine={name!r} cannot compute this request: {reason}. "
        f"Engines that can: {', '.join(map(repr, able)) or 'none'}"
    )


def _select_auto(req: AttentionRequest) -> Engine:
    if req.options:
        raise ValueError(
            f"engine_options={dict(req.options)} need a named engine (for example "
            f"engine='performer'); engine='auto' chooses among engines with different options"
        )
    order = [*_APPROX_ORDER, *_AUTO_ORDER] if req.approximate else _AUTO_ORDER
    for eng in (_REGISTRY[cand] for cand in order):
        if not eng.declines(req) and eng.unsupported(req) is None and eng.prefers(req):
            return eng
    why = _reasons(req, _AUTO_ORDER)
    raise ValueError(f"no registered exact engine supports this request: {why}")


def _reasons(req: AttentionRequest, names: list[str]) -> str:
    return "; ".join(f"{n}: {_REGISTRY[n].unsupported(req)}" for n in names)
