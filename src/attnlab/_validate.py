"""Input validation for the public entry points.

Each helper raises ``TypeError`` or ``ValueError`` whose message names the argument, what
was seen and what was expected. No asserts: validation survives ``python -O``.
"""

from __future__ import annotations

import numbers
import os
from collections.abc import Callable
from typing import Any, TypeVar

import torch
from torch import Tensor

from attnlab._scalars import choice as choice
from attnlab._scalars import nonnegative_int as nonnegative_int
from attnlab._scalars import plain as plain
from attnlab._scalars import plain_fields as plain_fields
from attnlab._scalars import positive_int as positive_int
from attnlab._scalars import positive_real as positive_real
from attnlab._scalars import real_where as real_where
from attnlab._scalars import validate_dropout as validate_dropout
from attnlab._scalars import validate_flag as validate_flag
from attnlab._scalars import validate_scale as validate_scale
from attnlab._scalars import validate_softcap as validate_softcap
from attnlab.normalize import NORMALIZERS
from attnlab.scores import SCORES

LAYOUT = "(B, H, L, E)"

T = TypeVar("T")


def float_dtype(name: str, value: object) -> torch.dtype:
    """``value`` if it is a floating-point ``torch.dtype``, or a TypeError naming ``name``
    (a str or None raised AttributeError on ``.is_floating_point``)."""
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise TypeError(f"{name} must be a floating-point torch.dtype, got {value!r}")
    return value


def instance_of(name: str, value: object, kind: type[T], expected: str) -> T:
    """``value`` if it is a ``kind``, or a TypeError naming ``name``, what was expected and
    the type seen.

    Example:
        >>> instance_of("steps", 3, int, "an int")
        3
        >>> instance_of("cfg", {"steps": 2}, int, "a TrainConfig")
        Traceback (most recent call last):
        TypeError: cfg must be a TrainConfig, got dict
    """
    if not isinstance(value, kind):
        raise TypeError(f"{name} must be {expected}, got {type(value).__name__}")
    return value


def limit_or(limit: object, default: int) -> int:
    """How many held-out items an ``evaluate(limit=...)`` scores: ``limit``, an int >= 1,
    or ``default`` when it is None; a TypeError/ValueError naming ``limit`` otherwise (0 or
    a negative number used to mean the default or silently score fewer).

    Example:
        >>> limit_or(None, 400), limit_or(5, 400)
        (400, 5)
    """
    return default if limit is None else positive_int("limit", limit)


def env_mib(name: str, default: int) -> int:
    """The environment variable ``name`` as a whole number of MiB >= 0 (0: off), or
    ``default`` when unset; a ValueError naming it otherwise.

    Example:
        >>> env_mib("ATTNLAB_NO_SUCH_LIMIT_MB", 64)
        64
    """
    seen = os.environ.get(name, str(default))
    if not seen.strip().isdigit():
        raise ValueError(f"{name} must be a whole number of MiB >= 0 (0: off), got {seen!r}")
    return int(seen)


def validate_qkv(q: object, k: object, v: object, *, same_dim: bool) -> tuple[Tensor, ...]:
    """Check q ``(B, Hq, Lq, E)``, k ``(B, Hkv, Lk, E)``, v ``(B, Hkv, Lk, Ev)``; broadcast
    a batch of 1 and return the three tensors.

    Each tensor's shape, dtype and device are read once: this runs on every attention
    call, and a decoding step is only tens of microseconds.
    """
    ts = _autocast((_rank4("q", q), _rank4("k", k), _rank4("v", v)))
    _same_dtype_device(ts)
    qs, ks, vs = ts[0].shape, ts[1].shape, ts[2].shape  # (no generator: every call)
    if ks[1] != vs[1] or ks[2] != vs[2]:
        raise ValueError(
            f"k and v must have the same heads and length (B, Hkv, Lk, .); got "
            f"k {tuple(ks)} and v {tuple(vs)}"
        )
    if same_dim and qs[3] != ks[3]:
        raise ValueError(
            f"q and k must have the same head dim E; got q {tuple(qs)} and k {tuple(ks)}"
        )
    hq, hkv = qs[1], ks[1]
    if hq == 0 or hkv == 0:
        raise _no_heads("q", hq, "k/v", hkv)
    if hq % hkv != 0:
        raise ValueError(
            f"query heads must be a multiple of key/value heads (GQA); got "
            f"q heads {hq} and k/v heads {hkv}"
        )
    if qs[0] == ks[0] == vs[0]:
        return ts
    return _broadcast_batch(*ts)


def _no_heads(a: str, ha: int, b: str, hb: int) -> ValueError:
    """A batch or a length of 0 is data (an empty batch, an empty prompt): the output is
    empty. Heads are the model's structure, and the GQA group ``Hq / Hkv`` needs
    ``Hkv >= 1``: 0 heads is an error."""
    return ValueError(
        f"{a} and {b} must have at least 1 head each (only the batch and the lengths may be "
        f"0, for an empty output); got {a} heads {ha} and {b} heads {hb}"
    )


_AUTOCAST_DEVICES = frozenset(("cpu", "cuda", "xpu", "mps", "hpu"))


def _autocast(ts: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    """Under ``torch.autocast`` for the inputs' device, q, k and v in its dtype, as torch
    SDPA and eager attention's matmuls take them (float64 stays: autocast leaves it).
    RoPE in a transformers model, say, leaves q and k in float32 beside a bfloat16 v."""
    kind = "cpu" if ts[0].is_cpu else ts[0].device.type  # (is_cpu: no torch.device made)
    if kind not in _AUTOCAST_DEVICES or not torch.is_autocast_enabled(kind):
        return ts
    low = torch.get_autocast_dtype(kind)
    return tuple(t if t.dtype in (low, torch.float64) else t.to(low) for t in ts)


def autocast_inputs(*ts: Tensor) -> tuple[Tensor, ...]:
    """``ts`` in ``torch.autocast``'s dtype where it is on for the first one's device
    (float64 stays), as autocast's matmuls would take them; ``ts`` themselves otherwise.

    Example:
        >>> with torch.autocast("cpu", dtype=torch.bfloat16):
        ...     [t.dtype for t in autocast_inputs(torch.zeros(1), torch.zeros(1).double())]
        [torch.bfloat16, torch.float64]
    """
    return _autocast(ts)


def same_dtype(name: str, x: Tensor, dtype: torch.dtype | None) -> Tensor:
    """``x`` if of the model's ``dtype`` (or under ``torch.autocast``, which casts for the
    model), else a TypeError naming ``name``: float64 into a float32 model raised torch's
    bare "mat1 and mat2 must have the same dtype". ``dtype`` None leaves it to the module.

    Example:
        >>> same_dtype("images", torch.zeros(1), torch.float64)
        Traceback (most recent call last):
        TypeError: images must be of the model's dtype torch.float64, got torch.float32
    """
    kind = x.device.type
    autocast = kind in _AUTOCAST_DEVICES and torch.is_autocast_enabled(kind)
    if dtype is None or x.dtype == dtype or autocast:
        return x
    raise TypeError(f"{name} must be of the model's dtype {dtype}, got {x.dtype}")


_FLOATS = frozenset((torch.float64, torch.float32, torch.float16, torch.bfloat16))


def _rank4(name: str, x: object, layout: str = LAYOUT) -> Tensor:
    """``x`` if a floating-point tensor of rank 4 (``layout`` names its dims)."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {layout}, got {type(x).__name__}")
    if x.is_nested or x.layout != torch.strided:  # (torch's own errors named neither)
        seen = "a nested tensor" if x.is_nested else f"layout {x.layout}"
        raise TypeError(f"{name} must be a strided (dense) tensor, got {seen}")
    if x.dim() != 4:
        raise ValueError(f"{name} must have shape {layout} (rank 4), got shape {tuple(x.shape)}")
    if x.dtype not in _FLOATS:
        kinds = "float64, float32, float16 or bfloat16"  # (float8: no engine computes in it)
        raise TypeError(f"{name} must be a floating-point tensor ({kinds}), got dtype {x.dtype}")
    return x


def _same_dtype_device(ts: tuple[Tensor, ...]) -> None:
    names = ("q", "k", "v")
    q, k, v = ts
    if not q.dtype == k.dtype == v.dtype:
        seen = ", ".join(f"{n} {t.dtype}" for n, t in zip(names, ts, strict=True))
        raise TypeError(f"q, k and v must share one dtype; got {seen}")
    if not q.device == k.device == v.device:
        seen = ", ".join(f"{n} {t.device}" for n, t in zip(names, ts, strict=True))
        raise ValueError(f"q, k and v must be on one device; got {seen}")


def broadcast_batch_size(*ts: Tensor) -> int:
    """The batch ``ts`` broadcast to, a batch of 1 to any other: the first size that is not
    1 (no check: :func:`_broadcast_batch` checks that the others match it).

    Example:
        >>> broadcast_batch_size(torch.zeros(1, 2), torch.zeros(3, 2), torch.zeros(1, 2))
        3
    """
    return next((t.shape[0] for t in ts if t.shape[0] != 1), 1)


def _broadcast_batch(*ts: Tensor) -> tuple[Tensor, ...]:
    sizes = [t.shape[0] for t in ts]
    if len({s for s in sizes if s != 1}) > 1:
        raise ValueError(f"batch sizes of q, k, v must match or be 1; got {sizes}")
    b = broadcast_batch_size(*ts)
    return tuple(_expand_batch(t, b) if t.shape[0] != b else t for t in ts)


_OURS = "attnlab.broadcast_batch"  # the key marking our batch expand's autograd node


def _expand_batch(t: Tensor, b: int) -> Tensor:
    """``t (1, ...)`` expanded to ``(b, ...)``; where autograd records it, its node marked
    as ours (:func:`batch_broadcast_here`). Not under torch.compile (unmarked then)."""
    out = t.expand(b, *t.shape[1:])
    if out.grad_fn is not None and not torch.compiler.is_compiling():
        _marks(out.grad_fn)[_OURS] = True
    return out


def _marks(node: Any) -> dict[str, bool]:
    """An autograd node's metadata dict (an attribute at run time, a method in the stubs)."""
    marks: dict[str, bool] = node.metadata
    return marks


def batch_broadcast_here(t: Tensor) -> bool:
    """Whether ``t`` is the batch broadcast of a batch of 1 that :func:`validate_qkv` made
    itself, with autograd recording it: nobody else holds ``t``, so no gradient of ``t``
    itself is asked for, only of the tensor it broadcast (which its expand's backward sums
    over the batch). An engine that computes such a batch once may put its gradient on
    index 0 of ``t``'s batch. False for a tensor a caller expanded.

    Example:
        >>> x = torch.zeros(1, 2, 3, 4, requires_grad=True)
        >>> q, k, v = validate_qkv(torch.zeros(5, 2, 3, 4), x, x, same_dim=True)
        >>> batch_broadcast_here(k), batch_broadcast_here(x.expand(5, -1, -1, -1))
        (True, False)
    """
    return t.grad_fn is not None and _marks(t.grad_fn).get(_OURS, False)


def check_broadcast(
    what: str | Callable[[], str], out: Tensor, coords: tuple[Tensor, ...], kind: str
) -> None:
    """Raise a ValueError naming ``what`` (or what it returns, called only then: torch 2.9's
    dynamo cannot trace a module's ``repr``) unless ``out``, the result of a user's function
    of the index tensors ``coords`` (b, h, q_pos, k), broadcasts to their shape.

    The shape is the coordinates' own, not a grid's: under FlexAttention's vmap they are
    0-dim and so is a right result.

    Example:
        >>> b, h = torch.zeros(1, 1, 1, 1), torch.zeros(1, 2, 1, 1)
        >>> q, k = torch.zeros(1, 1, 3, 1), torch.zeros(1, 1, 1, 4)
        >>> check_broadcast("mask=m", torch.zeros(3, 1), (b, h, q, k), "a bool tensor")
        >>> check_broadcast("mask=m", torch.zeros(3), (b, h, q, k), "a bool tensor")
        ... # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ValueError: mask=m: fn returned shape (3,), expected a bool tensor broadcastable to ...
    """
    want = torch.broadcast_shapes(*(c.shape for c in coords))
    try:
        seen = torch.broadcast_shapes(out.shape, want)
    except RuntimeError:
        seen = None
    if seen != want:
        raise ValueError(
            f"{what() if callable(what) else what}: fn returned shape {tuple(out.shape)}, "
            f"expected {kind} broadcastable to {tuple(want)} (batch, heads, queries, keys)"
        )


def validate_selection(
    heads: object, rows: object, n_heads: int, lq: int, *, clip: bool = False
) -> tuple[list[int] | None, tuple[int, int] | None]:
    """``heads`` (query head indices) and ``rows`` (``(r0, r1)``, clipped to ``lq`` with
    ``clip``) of a weights request, each an error naming it where it does not fit.

    Example:
        >>> validate_selection([1], (0, 9), 4, 5, clip=True)
        ([1], (0, 5))
    """
    hs = None if heads is None else _ints("heads", heads, "a list of query head indices (ints)")
    if hs is not None and any(not 0 <= h < n_heads for h in hs):
        raise ValueError(f"heads={heads} must be query head indices in [0, {n_heads})")
    rs = None if rows is None else _ints("rows", rows, "a pair (r0, r1) of ints")
    if rs is not None and len(rs) != 2:
        raise TypeError(f"rows must be a pair (r0, r1) of ints, got {rows!r}")
    r = None if rs is None else (min(rs[0], lq), min(rs[1], lq)) if clip else (rs[0], rs[1])
    if r is not None and not 0 <= r[0] <= r[1] <= lq:
        raise ValueError(f"rows={rows} must satisfy 0 <= r0 <= r1 <= Lq={lq}")
    return hs, r


def _ints(name: str, x: object, what: str) -> list[int]:
    """``x``, a list, tuple or range of ints, as a list (1.5 was taken as head 1)."""
    if not isinstance(x, list | tuple | range) or not all(
        isinstance(i, numbers.Integral) and not isinstance(i, bool) for i in x
    ):
        raise TypeError(f"{name} must be {what}, got {x!r}")
    return [int(i) for i in x]


def validate_sinks(sinks: object, q: Tensor, normalize: str) -> Tensor | None:
    """``None`` or a float tensor on q's device (attention sinks, softmax only): ``(Hq,)``,
    one logit per query head, or ``(B or 1, Hq, Lq)``, one per query row."""
    if sinks is None:
        return None
    if not isinstance(sinks, Tensor) or not sinks.is_floating_point():
        seen = getattr(sinks, "dtype", type(sinks).__name__)
        raise TypeError(f"sinks must be a float tensor (Hq,) or (B, Hq, Lq), or None, got {seen}")
    b, h, lq = q.shape[0], q.shape[1], q.shape[2]
    if tuple(sinks.shape) != (h,) and not (
        sinks.dim() == 3 and sinks.shape[0] in (1, b) and tuple(sinks.shape[1:]) == (h, lq)
    ):
        raise ValueError(
            f"sinks must have shape (Hq,) = ({h},), one logit per query head, or "
            f"(B or 1, Hq, Lq) = ({b} or 1, {h}, {lq}), one per query row; "
            f"got {tuple(sinks.shape)}"
        )
    if sinks.device != q.device:
        raise ValueError(f"sinks must be on q's device {q.device}, got {sinks.device}")
    if normalize != "softmax":
        raise ValueError(f"sinks join a softmax's denominator; normalize={normalize!r}")
    return sinks


def validate_score(score: object) -> str | Callable[[Tensor, Tensor], Tensor]:
    """A known score name or a callable ``fn(q, k) -> (B, Hq, Lq, Lk)``."""
    if callable(score):
        return score
    if not isinstance(score, str):
        raise TypeError(f"score must be a str or a callable fn(q, k), got {type(score).__name__}")
    if score not in SCORES:
        known = ", ".join(map(repr, SCORES))
        raise ValueError(
            f"score={score!r} is not a known score; expected one of {known} or "
            f"a callable fn(q, k) -> (B, H, Lq, Lk)"
        )
    return score


def validate_normalize(normalize: object, return_lse: bool) -> str:
    """A known normalizer name; the logsumexp exists for softmax only."""
    if not isinstance(normalize, str):
        raise TypeError(f"normalize must be a str, got {type(normalize).__name__}")
    if normalize not in NORMALIZERS:
        known = ", ".join(map(repr, NORMALIZERS))
        raise ValueError(
            f"normalize={normalize!r} is not a known normalizer; expected one of {known}"
        )
    if return_lse and normalize != "softmax":
        raise ValueError(
            f"return_lse=True needs normalize='softmax'; the logsumexp is not "
            f"defined for normalize={normalize!r}"
        )
    return normalize


def callable_or_none(name: str, value: object, signature: str) -> None:
    """A TypeError naming ``name`` and ``signature`` unless ``value`` is None or callable
    (an int progress failed as "'int' object is not callable" after the first batch)."""
    if value is not None and not callable(value):
        got = type(value).__name__
        raise TypeError(f"{name} must be a callable {signature} or None, got {got}")


def validate_scores(scores: object, v: Tensor) -> tuple[Tensor, Tensor]:
    """Precomputed scores ``(B, Hq, Lq, Lk)`` that fit ``v (B, Hkv, Lk, Ev)``, both in
    ``torch.autocast``'s dtype where it is on (a Linear's scores come out in it beside
    values that do not)."""
    s, v = _autocast((_rank4("scores", scores, "(B, Hq, Lq, Lk)"), _rank4("v", v)))
    if s.dtype != v.dtype or s.device != v.device:
        raise TypeError(
            f"scores and v must share dtype and device; got {s.dtype}/{s.device} "
            f"and {v.dtype}/{v.device}"
        )
    if s.shape[1] == 0 or v.shape[1] == 0:
        raise _no_heads("scores", s.shape[1], "v", v.shape[1])
    batch_fits = s.shape[0] == v.shape[0] or 1 in (s.shape[0], v.shape[0])
    if s.shape[3] != v.shape[2] or s.shape[1] % v.shape[1] or not batch_fits:
        raise ValueError(
            f"scores (B, Hq, Lq, Lk) {tuple(s.shape)} do not fit v (B, Hkv, Lk, "
            f"Ev) {tuple(v.shape)}: need equal Lk, Hq % Hkv == 0 and batches that are "
            "equal or 1"
        )
    return s, v
