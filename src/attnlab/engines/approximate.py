"""Approximate engines: linear attention and Performer (FAVOR+), in O(L) time and memory.

Both replace ``softmax(q k^T * scale)`` by a kernel ``phi(q) phi(k)^T`` with a positive
feature map ``phi``, so attention factorizes::

    out_i = phi(q_i) (sum_j phi(k_j) v_j^T) / phi(q_i) (sum_j phi(k_j))

Non-causal attention sums over all keys once; causal attention takes prefix sums, in
chunks of ``chunk_size`` keys (a quadratic ``C x C`` product inside a chunk, one running
state per chunk), so memory is ``O(L F E / C)`` per head instead of ``O(L F E)``.

* ``"linear"`` (Katharopoulos et al. 2020): ``phi(x) = elu(x) + 1``. A different kernel
  from softmax, not an estimate of it: models are trained with it. ``scale`` is unused.
* ``"performer"`` (Choromanski et al. 2021, FAVOR+): positive orthogonal random features
  ``phi(x) = exp(W x - |x|^2 / 2) / sqrt(F)`` of ``x = sqrt(scale) * q`` (or ``k``):
  ``phi(q) . phi(k)`` estimates ``exp(scale q . k)`` without bias, and the attention's
  error falls like ``1 / sqrt(F)`` with ``num_features``. Its relative variance grows like
  ``exp(scale (|q|^2 + |k|^2))``: large queries and keys need many features.

Both support dot scores with softmax, no bias, the masks ``causal()``, ``padding(...)``
and ``causal() & padding(...)`` (padded keys get zero features; padded query rows give 0),
grouped-query attention and autograd. ``return_weights=True`` materializes the implied
``(B, Hq, Lq, Lk)`` weights and computes the output from them (quadratic, for inspection).

.. warning:: These engines are inexact. ``engine="auto"`` uses Performer only for calls
   with ``approximate=True`` (see :meth:`ApproximateEngine.prefers`), never ``linear``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor

from attnlab.engines.base import AttentionRequest, Engine, EngineResult
from attnlab.masks import Mask, _Causal, _Combined, _Padding
from attnlab.scores import grouped_matmul

__all__ = [
    "ApproximateEngine",
    "LinearEngine",
    "LinearOptions",
    "MaskPlan",
    "PerformerEngine",
    "PerformerOptions",
    "favor_features",
    "kernel_attention",
    "kernel_weights",
    "mask_reason",
    "option_field",
    "orthogonal_features",
    "padding_validity",
    "parse_options",
]

_T = TypeVar("_T")

# Elements of the per-token tensors of one block of heads on a CPU (4 MiB in fp32).
HEAD_BLOCK_ELEMENTS = 1 << 20


# -- options ------------------------------------------------------------------------------


def parse_options(cls: type[_T], options: Mapping[str, object], engine: str) -> _T:
    """Build the options dataclass ``cls`` from ``engine_options``, checking each value's
    type (that of the field's default) and its ``metadata["min"]``."""
    values: dict[str, Any] = {}
    for f in fields(cls):  # type: ignore[arg-type]
        if f.name not in options:
            continue
        val, kind = options[f.name], type(f.default)
        if isinstance(val, bool) != (kind is bool) or not isinstance(val, kind):
            raise TypeError(
                f"engine_options: engine {engine!r} option {f.name!r} must be "
                f"{kind.__name__}, got {val!r} ({type(val).__name__})"
            )
        low = f.metadata.get("min")
        if low is not None and val < low:
            raise ValueError(
                f"engine_options: engine {engine!r} option {f.name!r} must be >= {low}, got {val!r}"
            )
        values[f.name] = val
    return cls(**values)


def option_field(default: int | bool, *, minimum: int | None = None) -> Any:
    """A field of an options dataclass: its default fixes the type, ``minimum`` the range."""
    return field(default=default, metadata={} if minimum is None else {"min": minimum})


@dataclass(frozen=True)
class LinearOptions:
    """``engine_options`` of ``"linear"``.

    Attributes:
        chunk_size: keys per chunk of the causal prefix sums (memory/time trade-off).
    """

    chunk_size: int = option_field(128, minimum=1)


@dataclass(frozen=True)
class PerformerOptions:
    """``engine_options`` of ``"performer"``.

    Attributes:
        num_features: random features ``F``; the error falls like ``1/sqrt(F)``.
        seed: seed of the feature draw (the same features on every call).
        redraw: draw new features on every call from torch's global RNG (reproducible
            under ``torch.manual_seed``), as Performer training does; excludes ``seed``.
        chunk_size: keys per chunk of the causal prefix sums.
    """

    num_features: int = option_field(256, minimum=1)
    seed: int = option_field(0, minimum=0)
    redraw: bool = False
    chunk_size: int = option_field(128, minimum=1)


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
        pad = next((p for p in parts if isinstance(p, _Padding)), None)
        causal = any(isinstance(p, _Causal) for p in parts)
        if pad is None:
            return MaskPlan(causal, None, None)
        return MaskPlan(causal, *padding_validity(pad, req.lq, req.lk, req.q.device))


def padding_validity(
    mask: Mask, lq: int, lk: int, device: torch.device
) -> tuple[Tensor, Tensor | None]:
    """Key validity ``(B, 1, Lk, 1)`` and query validity ``(B, 1, Lq, 1)`` (None without
    query lengths) of a ``masks.padding(...)`` mask."""
    if not isinstance(mask, _Padding):
        raise TypeError(f"expected a masks.padding(...) mask, got {mask!r}")
    keys = torch.arange(lk, device=device) < mask.kl.to(device)[:, None]  # (B, Lk)
    queries = None
    if mask.ql is not None:
        queries = (torch.arange(lq, device=device) < mask.ql.to(device)[:, None])[:, None, :, None]
    return keys[:, None, :, None], queries


def _mask_parts(mask: Mask | None) -> list[Mask]:
    if mask is None:
        return []
    return list(mask.parts) if isinstance(mask, _Combined) and mask.op == "&" else [mask]


def mask_reason(mask: Mask | None, engine: str, causal_ok: bool) -> str | None:
    """Why ``engine`` cannot take ``mask`` (None if it is causal and/or padding)."""
    allowed = "masks.padding(...)"
    if causal_ok:
        allowed = "masks.causal(), masks.padding(...) and their '&'"
    pads = 0
    for part in _mask_parts(mask):
        pads += isinstance(part, _Padding)
        if isinstance(part, _Causal) and not causal_ok:
            return f"{engine} has no causal form (its landmarks mix all positions)"
        if not isinstance(part, _Causal | _Padding) or pads > 1:
            return f"{engine} supports {allowed} only, not mask={part._spec()}"
    return None


# -- the base of the approximate engines ----------------------------------------------


class ApproximateEngine(Engine):
    """Shared checks of the approximate engines: dot score, softmax, no bias/dropout/lse.

    Subclasses set ``name``, ``options``, ``settings_type``, ``causal_ok`` and implement
    :meth:`compute`.
    """

    exact = False
    settings_type: type = LinearOptions
    causal_ok: bool = True
    # ``auto`` (with approximate=True) uses the engine from this many (query, key) pairs
    # on, where its default settings are clearly faster than exact attention on a CPU.
    auto_min_pairs: int = 1 << 24

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
        plan, opts = MaskPlan.of(req), self.settings(req)
        if req.return_weights:
            out, weights = self.compute(req, plan, opts)
        else:
            out, weights = self._by_heads(req, plan, opts), None
        if plan.query_valid is not None:
            out = out * plan.query_valid  # padded query rows give 0
            weights = None if weights is None else weights * plan.query_valid
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


# -- kernelized attention -------------------------------------------------------------


def kernel_attention(
    qf: Tensor, kf: Tensor, v: Tensor, *, causal: bool, chunk_size: int = 128
) -> Tensor:
    """``out_i = sum_j (qf_i . kf_j) v_j / sum_j (qf_i . kf_j)`` in linear time.

    Args:
        qf: query features ``(B, Hq, Lq, F)``, nonnegative.
        kf: key features ``(B, Hkv, Lk, F)``, nonnegative (0 on padded keys).
        v: values ``(B, Hkv, Lk, Ev)``; ``Hq % Hkv == 0``.
        causal: sum over keys ``j <= i + Lk - Lq`` only (bottom-right aligned).
        chunk_size: keys per chunk of the causal prefix sums.

    Returns:
        ``(B, Hq, Lq, Ev)``; 0 where a query has no key (or all features vanish).

    Example:
        >>> qf, kf, v = torch.rand(1, 2, 5, 3), torch.rand(1, 1, 5, 3), torch.randn(1, 1, 5, 4)
        >>> out = kernel_attention(qf, kf, v, causal=True, chunk_size=2)
        >>> torch.allclose(out[:, :, 0], v[:, :, 0].expand(1, 2, 4))
        True
    """
    if causal:  # numerator and denominator together: v with a column of ones
        v1 = torch.cat([v, v.new_ones(*v.shape[:-1], 1)], dim=-1)  # (B, Hkv, Lk, Ev + 1)
        both = _causal_sums(qf, kf, v1, chunk_size)  # (B, Hq, Lq, Ev + 1)
        num, den = both[..., :-1], both[..., -1:]
    else:
        num = grouped_matmul(qf, kf.transpose(-1, -2) @ v)  # (B, Hq, Lq, Ev)
        den = grouped_matmul(qf, kf.sum(-2).unsqueeze(-1))  # (B, Hq, Lq, 1)
    return num / den.clamp_min(torch.finfo(den.dtype).tiny)


def _causal_sums(qf: Tensor, kf: Tensor, v1: Tensor, chunk: int) -> Tensor:
    """Causal ``sum_{j <= p(i)} (qf_i . kf_j) v1_j`` for bottom-right aligned rows."""
    b, hq, lq, f = qf.shape
    hkv, lk = kf.shape[1], kf.shape[2]
    qg = qf.reshape(b, hkv, hq // hkv, lq, f)  # (B, Hkv, G, Lq, F)
    shift = lk - lq  # query row i sits at key position i + shift
    state = None
    if shift > 0:  # keys every query sees
        state = kf[:, :, :shift].transpose(-1, -2) @ v1[:, :, :shift]  # (B, Hkv, F, Ev1)
        kf, v1 = kf[:, :, shift:], v1[:, :, shift:]
    elif shift < 0:  # rows before the first key see nothing
        qg = qg[:, :, :, -shift:]
    out = _chunked_prefix(qg, kf, v1, chunk, state)  # (B, Hkv, G, min(Lq, Lk), Ev1)
    if shift < 0:
        out = F.pad(out, (0, 0, -shift, 0))
    return out.reshape(b, hq, lq, -1)


def _chunked_prefix(qg: Tensor, kf: Tensor, v1: Tensor, chunk: int, state: Tensor | None) -> Tensor:
    """Square causal kernel sums by chunks: an exclusive running state per chunk plus a
    masked ``C x C`` product inside it."""
    b, hkv, g, n, f = qg.shape
    c = max(1, min(chunk, n))
    m = -(-n // c)
    pad = m * c - n
    if pad:
        qg, kf, v1 = (F.pad(t, (0, 0, 0, pad)) for t in (qg, kf, v1))
    qc = qg.reshape(b, hkv, g, m, c, f)  # (B, Hkv, G, M, C, F)
    kc = kf.reshape(b, hkv, 1, m, c, f)  # (B, Hkv, 1, M, C, F)
    vc = v1.reshape(b, hkv, 1, m, c, -1)  # (B, Hkv, 1, M, C, Ev1)
    kv = kc.transpose(-1, -2) @ vc  # (B, Hkv, 1, M, F, Ev1)
    prev = torch.cat([torch.zeros_like(kv[:, :, :, :1]), kv[:, :, :, :-1]], 3).cumsum(3)
    if state is not None:
        prev = prev + state[:, :, None, None]
    intra = (qc @ kc.transpose(-1, -2)).tril()  # (B, Hkv, G, M, C, C)
    out = qc @ prev + intra @ vc  # (B, Hkv, G, M, C, Ev1)
    return out.reshape(b, hkv, g, m * c, -1)[:, :, :, :n]


def kernel_weights(qf: Tensor, kf: Tensor, causal: bool) -> Tensor:
    """The weights ``(B, Hq, Lq, Lk)`` that :func:`kernel_attention` applies, dense."""
    a = grouped_matmul(qf, kf.transpose(-1, -2))  # (B, Hq, Lq, Lk)
    if causal:
        lq, lk = a.shape[-2:]
        a = a.tril(lk - lq)  # key j <= i + Lk - Lq
    return a / a.sum(-1, keepdim=True).clamp_min(torch.finfo(a.dtype).tiny)


def _kernel_result(
    req: AttentionRequest, qf: Tensor, kf: Tensor, causal: bool, chunk: int
) -> tuple[Tensor, Tensor | None]:
    if req.return_weights:
        w = kernel_weights(qf, kf, causal)  # (B, Hq, Lq, Lk)
        return grouped_matmul(w, req.v), w
    return kernel_attention(qf, kf, req.v, causal=causal, chunk_size=chunk), None


# -- linear attention -----------------------------------------------------------------


class LinearEngine(ApproximateEngine):
    """Linear attention (Katharopoulos et al. 2020) with ``phi(x) = elu(x) + 1``.

    Example:
        >>> import torch, attnlab
        >>> from attnlab import masks
        >>> q = k = v = torch.randn(1, 2, 1000, 16)
        >>> out = attnlab.attention(q, k, v, mask=masks.causal(), engine="linear")
        >>> out.shape
        torch.Size([1, 2, 1000, 16])
    """

    name = "linear"
    summary = (
        "linear attention, phi(x) = elu(x) + 1 (a different kernel, not a "
        "softmax estimate; scale unused); causal, padding, GQA; O(L)"
    )
    options = ("chunk_size",)
    settings_type = LinearOptions

    def compute(
        self, req: AttentionRequest, plan: MaskPlan, opts: LinearOptions
    ) -> tuple[Tensor, Tensor | None]:
        qf = F.elu(req.q).add_(1)  # (B, Hq, Lq, E); elu's backward keeps its input
        kf = F.elu(req.k).add_(1)  # (B, Hkv, Lk, E)
        if plan.key_valid is not None:
            kf = kf * plan.key_valid
        return _kernel_result(req, qf, kf, plan.causal, opts.chunk_size)


# -- Performer ------------------------------------------------------------------------


def orthogonal_features(
    num_features: int, dim: int, *, generator: torch.Generator | None = None
) -> Tensor:
    """FAVOR+'s random features ``W (F, E)``: blocks of ``E`` orthogonal rows, each row
    scaled to the length of a Gaussian vector (so ``W`` rows are marginally Gaussian).

    The QR factor is corrected by the signs of ``R``'s diagonal: LAPACK's sign convention
    alone makes the rows not uniformly oriented, and the estimate biased.

    Drawn in float64 on the CPU from ``generator`` (default: torch's global RNG).

    Example:
        >>> w = orthogonal_features(8, 4, generator=torch.Generator().manual_seed(0))
        >>> block = w[:4] / w[:4].norm(dim=1, keepdim=True)
        >>> torch.allclose(block @ block.T, torch.eye(4, dtype=torch.float64))
        True
    """
    blocks = []
    for _ in range(-(-num_features // dim)):
        q, r = torch.linalg.qr(torch.randn(dim, dim, generator=generator, dtype=torch.float64))
        blocks.append((q * r.diagonal().sign()).T)  # (E, E) Haar-random orthonormal rows
    w = torch.cat(blocks)[:num_features]  # (F, E)
    lengths = torch.randn(num_features, dim, generator=generator, dtype=torch.float64)
    return w * lengths.norm(dim=1, keepdim=True)


@functools.lru_cache(maxsize=32)
def _seeded_features(
    num_features: int, dim: int, seed: int, device: torch.device, dtype: torch.dtype
) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    return orthogonal_features(num_features, dim, generator=gen).to(device, dtype)


def favor_features(x: Tensor, w: Tensor, *, is_query: bool, valid: Tensor | None = None) -> Tensor:
    """FAVOR+'s positive random features ``exp(W x - |x|^2 / 2)`` of ``x (B, H, L, E)``,
    up to factors that cancel between the numerator and denominator of attention.

    A query's features are divided by any per-row constant (here the row maximum, which
    also absorbs ``|x|^2 / 2``); all keys' by one constant (the maximum over valid keys
    and features), so ``exp`` never overflows. The ``1 / sqrt(F)`` of the estimator is
    left out for the same reason. Padded keys (``valid`` False, ``(B, 1, L, 1)``) get 0.

    Returns:
        ``(B, H, L, F)``, entries in ``[0, 1]``.

    Example:
        >>> x, w = torch.randn(1, 1, 3, 4), torch.randn(8, 4)
        >>> favor_features(x, w, is_query=True).amax(-1).flatten().tolist()
        [1.0, 1.0, 1.0]
    """
    proj = x @ w.T  # (B, H, L, F); updated in place below (matmul keeps its inputs only)
    row_max = proj.detach().amax(-1, keepdim=True)  # (B, H, L, 1)
    if is_query:
        return proj.sub_(row_max).exp_()
    half_sq = x.square().sum(-1, keepdim=True) / 2  # (B, H, L, 1)
    top = row_max - half_sq.detach()
    if valid is not None:
        top = top.masked_fill(~valid, float("-inf"))
    shift = half_sq + top.amax(-2, keepdim=True)  # (B, H, L, 1)
    if valid is None:
        return proj.sub_(shift).exp_()
    return proj.sub_(torch.where(valid, shift, row_max)).exp_() * valid


class PerformerEngine(ApproximateEngine):
    """Performer's FAVOR+ estimate of softmax attention (Choromanski et al. 2021).

    Example:
        >>> import torch, attnlab
        >>> _ = torch.manual_seed(0)
        >>> q, k, v = torch.randn(3, 1, 2, 500, 16).double().unbind(0)
        >>> q, k = q / 2, k / 2  # the variance grows like exp(scale (|q|^2 + |k|^2))
        >>> opts = {"num_features": 1024, "seed": 0}
        >>> err = attnlab.approximation_error(q, k, v, engine="performer", engine_options=opts)
        >>> err["relative_fro"] < 0.25
        True
    """

    name = "performer"
    summary = (
        "FAVOR+ positive orthogonal random features, a random-feature estimate of "
        "softmax; causal, padding, GQA; options num_features, seed, redraw; O(L F E)"
    )
    options = ("num_features", "seed", "redraw", "chunk_size")
    settings_type = PerformerOptions

    def check_option_values(self, options: Mapping[str, object]) -> None:
        opts = parse_options(PerformerOptions, options, self.name)
        if opts.redraw and "seed" in options:
            raise ValueError(
                "engine_options: engine 'performer' takes either seed (fixed features) or "
                "redraw=True (new features each call from torch's RNG), not both"
            )

    def unsupported(self, req: AttentionRequest) -> str | None:
        if req.scale < 0:
            return f"FAVOR+ needs scale >= 0 (it splits sqrt(scale)), got {req.scale}"
        return super().unsupported(req)

    def compute(
        self, req: AttentionRequest, plan: MaskPlan, opts: PerformerOptions
    ) -> tuple[Tensor, Tensor | None]:
        w = self.features(opts, req.q.shape[-1], req.q.device, req.q.dtype)  # (F, E)
        root = math.sqrt(req.scale)
        qf = favor_features(req.q * root, w, is_query=True, valid=None)  # (B, Hq, Lq, F)
        kf = favor_features(req.k * root, w, is_query=False, valid=plan.key_valid)
        return _kernel_result(req, qf, kf, plan.causal, opts.chunk_size)

    def feature_dim(self, req: AttentionRequest, opts: PerformerOptions) -> int:
        return opts.num_features

    @staticmethod
    def features(
        opts: PerformerOptions, dim: int, device: torch.device, dtype: torch.dtype
    ) -> Tensor:
        """The random features ``(F, E)`` this call uses (fixed by seed, or redrawn)."""
        if opts.redraw:
            return orthogonal_features(opts.num_features, dim).to(device, dtype)
        return _seeded_features(opts.num_features, dim, opts.seed, device, dtype)
