"""The shared base of the approximate engines (``linear``, ``performer``, ``nystrom``).

Every approximate engine computes dot scores with softmax (or a kernel in its place),
with no bias, dropout or logsumexp, and takes the masks ``causal()`` (where it has a
causal form), ``padding(...)`` and their ``&``: padded keys are left out, padded query
rows give 0. Its settings travel as ``engine_options`` and parse into a frozen dataclass
(:func:`parse_options`). The engines themselves live in :mod:`~attnlab.engines.linear`,
:mod:`~attnlab.engines.performer` and :mod:`~attnlab.engines.nystrom`; the kernelized
sums that ``linear`` and ``performer`` share in :mod:`~attnlab.engines.kernelized`.

.. warning:: These engines are inexact. ``engine="auto"`` uses them only for calls
   with ``approximate=True`` (see :meth:`ApproximateEngine.prefers`), never ``linear``.
"""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, TypeVar

import torch
from torch import Tensor

from attnlab._eager import autocast_dtype, no_autocast
from attnlab.engines._nonfinite import any_nonfinite
from attnlab.engines.base import AttentionRequest, Engine, EngineResult
from attnlab.masks import Mask

__all__ = [
    "ApproximateEngine",
    "MaskPlan",
    "mask_reason",
    "option_field",
    "padding_validity",
    "parse_options",
]


_T = TypeVar("_T")

# Elements of the per-token tensors of one block of heads on a CPU (4 MiB in fp32).
HEAD_BLOCK_ELEMENTS = 1 << 20


# -- options ------------------------------------------------------------------------------


def parse_options(cls: type[_T], options: Mapping[str, object], engine: str) -> _T:
    """Build the options dataclass ``cls`` from ``engine_options``, checking each value's
    type (that of the field's default) and its ``metadata["min"]`` and ``["max"]``."""
    values: dict[str, Any] = {}
    for f in fields(cls):  # type: ignore[arg-type]
        if f.name not in options:
            continue
        val, kind = options[f.name], type(f.default)
        if kind is int and isinstance(val, numbers.Integral) and not isinstance(val, bool):
            val = int(val)  # numpy's integers too
        if isinstance(val, bool) != (kind is bool) or not isinstance(val, kind):
            raise TypeError(
                f"engine_options: engine {engine!r} option {f.name!r} must be "
                f"{kind.__name__}, got {val!r} ({type(val).__name__})"
            )
        for key, op, outside in (("min", ">=", val < f.metadata.get("min", val)),
                                 ("max", "<=", val > f.metadata.get("max", val))):  # fmt: skip
            if outside:
                name = f"engine_options: engine {engine!r} option {f.name!r}"
                raise ValueError(f"{name} must be {op} {f.metadata[key]}, got {val!r}")
        values[f.name] = val
    return cls(**values)


def option_field(
    default: int | bool, *, minimum: int | None = None, maximum: int | None = None
) -> Any:
    """A field of an options dataclass: its default fixes the type, ``minimum`` and
    ``maximum`` the range."""
    bounds = {"min": minimum, "max": maximum}
    return field(default=default, metadata={k: v for k, v in bounds.items() if v is not None})


# -- masks --------------------------------------------------------------------------------


@dataclass(frozen=True)
class MaskPlan:
    """What an approximate engine needs of a mask: causality and padding validity.

    Attributes:
        causal: whether ``masks.causal()`` is part of the mask.
        key_valid: bool ``(B, 1, Lk, 1)``, False on padded keys, or None.
        query_valid: bool ``(B, 1, Lq, 1)``, False on padded query rows, or None.
    """

    causal: bool
    key_valid: Tensor | None
    query_valid: Tensor | None

    @staticmethod
    def of(req: AttentionRequest) -> MaskPlan:
        """The plan of ``req.mask`` (which :func:`mask_reason` accepted)."""
        parts = _mask_parts(req.mask)
        pad = next((p for p in parts if p.lengths() is not None), None)
        causal = any(p.is_causal for p in parts)
        if pad is None:
            return MaskPlan(causal, None, None)
        return MaskPlan(causal, *padding_validity(pad, req.lq, req.lk, req.q.device))


def padding_validity(
    mask: Mask, lq: int, lk: int, device: torch.device
) -> tuple[Tensor, Tensor | None]:
    """Key validity ``(B, 1, Lk, 1)`` and query validity ``(B, 1, Lq, 1)`` (None without
    query lengths) of a ``masks.padding(...)`` mask."""
    lengths = mask.lengths()
    if lengths is None:
        raise TypeError(f"expected a masks.padding(...) mask, got {mask!r}")
    key_lengths, query_lengths = lengths  # (B,), (B,) or None
    keys = torch.arange(lk, device=device) < key_lengths.to(device)[:, None]  # (B, Lk)
    queries = None
    if query_lengths is not None:
        rows = torch.arange(lq, device=device) < query_lengths.to(device)[:, None]  # (B, Lq)
        queries = rows[:, None, :, None]
    return keys[:, None, :, None], queries


def _hidden_zeroed(req: AttentionRequest, plan: MaskPlan) -> AttentionRequest:
    """``req`` with padded keys, values and query rows set to 0 when some of them hold NaN
    or inf (an unwritten cache slot), which then stays out of the rows that do not read it
    (``0 * NaN`` and ``0 * inf`` in the features, the sums and the landmarks spread it to
    every row);
    ``req`` itself when there is none (one read of each tensor, no copy)."""
    q, k, v = req.q, req.k, req.v
    if plan.key_valid is not None and any_nonfinite(k, v):  # (B, 1, Lk, 1)
        k, v = torch.where(plan.key_valid, k, 0.0), torch.where(plan.key_valid, v, 0.0)
    if plan.query_valid is not None and any_nonfinite(q):  # (B, 1, Lq, 1)
        q = torch.where(plan.query_valid, q, 0.0)
    return req if q is req.q and k is req.k else dataclasses.replace(req, q=q, k=k, v=v)


def _mask_parts(mask: Mask | None) -> tuple[Mask, ...]:
    return () if mask is None else mask.conjuncts


def mask_reason(mask: Mask | None, engine: str, causal_ok: bool) -> str | None:
    """Why ``engine`` cannot take ``mask`` (None if it is causal and/or padding)."""
    allowed = "masks.padding(...)"
    if causal_ok:
        allowed = "masks.causal(), masks.padding(...) and their '&'"
    pads = 0
    for part in _mask_parts(mask):
        is_padding = part.lengths() is not None
        pads += is_padding
        if part.is_causal and not causal_ok:
            return f"{engine} has no causal form (its landmarks mix all positions)"
        if not (part.is_causal or is_padding) or pads > 1:
            return f"{engine} supports {allowed} only, not mask={part.spec()}"
    return None


# -- the base of the approximate engines ----------------------------------------------


class ApproximateEngine(Engine):
    """Shared checks of the approximate engines: dot score, softmax, no bias/dropout/lse.

    Subclasses set ``name``, ``options``, ``settings_type``, ``causal_ok`` and implement
    :meth:`compute`.
    """

    exact = False
    settings_type: type  # the engine's options dataclass
    causal_ok: bool = True
    # ``auto`` (with approximate=True) uses the engine from this many (query, key) pairs
    # on, where its default settings are clearly faster than exact attention on a CPU.
    auto_min_pairs: int = 1 << 24
    # float16 inputs computed in float32 (sums or exponentials out of float16's range)
    float16_in_float32: bool = False

    def settings(self, req: AttentionRequest) -> Any:
        """The validated options dataclass of ``req.options``."""
        return parse_options(self.settings_type, req.options, self.name)

    def check_option_values(self, options: Mapping[str, object]) -> None:
        parse_options(self.settings_type, options, self.name)

    def unsupported(self, req: AttentionRequest) -> str | None:
        n = self.name
        if req.score != "dot":
            return f"{n} approximates dot-product scores only, not score={req.score!r}"
        if req.normalize != "softmax":
            return f"{n} approximates softmax only, not normalize={req.normalize!r}"
        if req.bias is not None:
            return f"{n} cannot add a bias to scores it never forms"
        if req.softcap is not None:
            return f"{n} cannot soft-cap scores it never forms (softcap)"
        if req.sinks is not None:
            return f"{n} has no softmax denominator for attention sinks (sinks)"
        if req.dropout_p > 0:
            return f"{n} has no weights to drop out (dropout_p > 0)"
        if req.return_lse:
            return f"{n} does not compute the logsumexp (return_lse=True)"
        if req.batch == 0 or req.lq == 0 or req.lk == 0:
            return f"{n} does not accept empty batches or sequences"
        return mask_reason(req.mask, n, self.causal_ok)

    def prefers(self, req: AttentionRequest) -> bool:
        """``auto`` uses it only with ``approximate=True``, for long sequences, no weights."""
        big = req.lq * req.lk >= self.auto_min_pairs
        return req.approximate and big and not req.return_weights

    def forward(self, req: AttentionRequest) -> EngineResult:
        kind = req.q.device.type
        if autocast_dtype(kind) is not None:
            # q, k, v come in its dtype: they run as such inputs do (its float16 matmuls
            # undid the float32 steps below; linear's sums overflowed, rows gave 0)
            with no_autocast(kind):
                return self.forward(req)
        if self.float16_in_float32 and req.q.dtype == torch.float16:
            wide = dataclasses.replace(req, q=req.q.float(), k=req.k.float(), v=req.v.float())
            out, weights, _ = self.forward(wide)
            return out.half(), None if weights is None else weights.half(), None
        plan, opts = MaskPlan.of(req), self.settings(req)
        req = _hidden_zeroed(req, plan)
        if req.return_weights:
            out, weights = self.compute(req, plan, opts)
        else:
            out, weights = self._by_heads(req, plan, opts), None
        if plan.query_valid is not None:
            valid = plan.query_valid  # padded query rows give 0 (also where a NaN is read)
            out = torch.where(valid, out, 0.0)
            weights = None if weights is None else torch.where(valid, weights, 0.0)
        return out, weights, None

    def compute(
        self, req: AttentionRequest, plan: MaskPlan, opts: Any
    ) -> tuple[Tensor, Tensor | None]:
        """``(out (B, Hq, Lq, Ev), weights (B, Hq, Lq, Lk) if req.return_weights)``."""
        raise NotImplementedError

    def feature_dim(self, req: AttentionRequest, opts: Any) -> int:
        """Width of the per-token tensors the engine makes (features, landmarks)."""
        return int(req.q.shape[-1])

    def _by_heads(self, req: AttentionRequest, plan: MaskPlan, opts: Any) -> Tensor:
        """:meth:`compute` over blocks of key/value heads (with their query heads) small
        enough that a block's per-token tensors stay in a CPU cache (the same result;
        memory-bound steps run ~3x faster once a whole call's tensors outgrow it)."""
        hkv = req.k.shape[1]
        g = req.heads // hkv
        per_head = req.batch * max(req.lq * g, req.lk) * self.feature_dim(req, opts)
        step = max(1, HEAD_BLOCK_ELEMENTS // max(1, per_head))
        if step >= hkv or req.q.device.type != "cpu":
            return self.compute(req, plan, opts)[0]
        outs = []
        for h in range(0, hkv, step):
            q, kv = req.q[:, h * g : (h + step) * g], slice(h, h + step)
            sub = dataclasses.replace(req, q=q, k=req.k[:, kv], v=req.v[:, kv])
            outs.append(self.compute(sub, plan, opts)[0])  # (B, step * G, Lq, Ev)
        return torch.cat(outs, dim=1)  # (B, Hq, Lq, Ev)
