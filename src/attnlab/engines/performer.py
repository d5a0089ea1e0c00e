"""Performer (Choromanski et al. 2021, FAVOR+): a random-feature estimate of softmax.

Positive orthogonal random features ``phi(x) = exp(W x - |x|^2 / 2) / sqrt(F)`` of
``x = sqrt(scale) * q`` (or ``k``): ``phi(q) . phi(k)`` estimates ``exp(scale q . k)``
without bias, and the attention's error falls like ``1 / sqrt(F)`` with
``num_features``. Its relative variance grows like ``exp(scale (|q|^2 + |k|^2))``: large
queries and keys need many features. Causal attention takes chunked prefix sums
(:func:`~attnlab.engines.kernelized.kernel_attention`).

.. warning:: Inexact. ``engine="auto"`` uses it only for calls with ``approximate=True``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from attnlab._eager import unreadable
from attnlab.engines.approximate import ApproximateEngine, MaskPlan, option_field, parse_options
from attnlab.engines.base import AttentionRequest
from attnlab.engines.kernelized import kernel_result, kernel_result_if, last_keys

__all__ = [
    "PerformerEngine",
    "PerformerOptions",
    "favor_features",
    "favor_pair",
    "orthogonal_features",
]


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
    seed: int = option_field(0, minimum=0, maximum=2**64 - 1)  # torch's generator seeds
    redraw: bool = False
    chunk_size: int = option_field(128, minimum=1)


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
    if dim == 0:  # q . k = 0: every feature is exp(0) = 1, and attention is uniform
        return torch.zeros(num_features, 0, dtype=torch.float64)
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
    """The cached features of ``seed``: built outside inference mode, since a tensor made
    under ``torch.inference_mode`` cannot be saved for a later call's backward."""
    with torch.inference_mode(False), torch.no_grad():
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


def favor_pair(xq: Tensor, xk: Tensor, w: Tensor, valid: Tensor | None) -> tuple[Tensor, Tensor]:
    """FAVOR+ features of queries ``xq (B, Hq, Lq, E)`` and keys ``xk (B, Hkv, Lk, E)``
    for attention in which every row reads every valid key, scaled per feature.

    Each feature ``f`` of the keys is divided by its largest value over the valid keys,
    ``exp(m_f)``, and the queries' feature ``f`` multiplied by it, so the factors cancel
    in ``qf_i . kf_j``; each query row is then divided by its largest feature. A row's
    denominator ``sum_j qf_i . kf_j`` is at least 1 (its largest feature meets the key that
    set that feature's scale), so it never underflows, however little a query's and the
    keys' features overlap. (One scale for all keys, and one per query row, gave rows of
    0 in float32 once that overlap fell below ``exp(-87)``: queries and keys of large norm.)
    Padded keys (``valid`` False, ``(B, 1, Lk, 1)``) get 0.

    Returns:
        ``(qf (B, Hq, Lq, F), kf (B, Hkv, Lk, F))``, entries in ``[0, 1]``.

    Example:
        >>> x, w = torch.randn(1, 1, 3, 4), torch.randn(8, 4)
        >>> qf, kf = favor_pair(x, x, w, None)
        >>> want = torch.exp(x @ w.T - x.square().sum(-1, keepdim=True) / 2)
        >>> a = qf @ kf.transpose(-1, -2)
        >>> b = want @ want.transpose(-1, -2)
        >>> torch.allclose(a / a.sum(-1, keepdim=True), b / b.sum(-1, keepdim=True))
        True
    """
    log_k = xk @ w.T - xk.square().sum(-1, keepdim=True) / 2  # (B, Hkv, Lk, F)
    if valid is not None:
        log_k = log_k.masked_fill(~valid, float("-inf"))
    top = log_k.detach().amax(-2, keepdim=True)  # (B, Hkv, 1, F): m_f
    top = torch.where(top == float("-inf"), 0.0, top)  # no valid key: every kf is 0
    kf = (log_k - top).exp()  # (B, Hkv, Lk, F)
    log_q = xq @ w.T + top.repeat_interleave(xq.shape[1] // xk.shape[1], 1)  # (B,Hq,Lq,F)
    qf = (log_q - log_q.detach().amax(-1, keepdim=True)).exp()  # (B, Hq, Lq, F)
    return qf, kf


def causal_key_features(x: Tensor, w: Tensor, valid: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Keys' FAVOR+ features for causal attention, each key divided by its own largest
    feature: ``(kf (B, H, L, F)`` in ``[0, 1]``, ``log_scale (B, H, L))``, detached, with
    ``kf_j exp(log_scale_j) = exp(W x_j - |x_j|^2 / 2)``. One constant for all keys (the
    largest, as :func:`favor_features` takes) let a later key of large norm underflow an
    earlier row's only keys: its output became 0 instead of its value.

    Example:
        >>> x, w = torch.randn(1, 1, 3, 4), torch.randn(8, 4)
        >>> kf, a = causal_key_features(x, w)
        >>> want = torch.exp(x @ w.T - x.square().sum(-1, keepdim=True) / 2)
        >>> torch.allclose(kf * a.exp().unsqueeze(-1), want)
        True
    """
    proj = x @ w.T  # (B, H, L, F)
    row_max = proj.detach().amax(-1, keepdim=True)  # (B, H, L, 1)
    half_sq = x.square().sum(-1, keepdim=True) / 2  # (B, H, L, 1)
    scale = (row_max - half_sq.detach()).squeeze(-1)  # (B, H, L)
    kf = (proj - half_sq - scale.unsqueeze(-1)).exp()  # (B, H, L, F), max 1 per key
    if valid is None:
        return kf, scale
    keep = valid.squeeze(-1)  # (B, 1, L)
    return kf * valid, scale.masked_fill(~keep, float("-inf"))


SPREAD = 60.0  # keys' log-scales this close share one scale without underflow in float32


def _narrow(scale: Tensor, top: Tensor) -> bool:
    """Whether the keys' scales ``(B, H, L)`` (``-inf`` on padded keys) lie within
    :data:`SPREAD` of their maximum ``top`` in every row (then the features of one
    shift by ``top`` stay normal in float32); False where it cannot be read (vmap, meta)."""
    if not scale.numel():
        return True
    if unreadable(scale):
        return False
    if bool(scale.isnan().any()):  # a NaN key: one scale would spread it to every row
        return False
    low = torch.where(torch.isfinite(scale), scale, top).amin(-1, keepdim=True)
    return bool(((top - low).nan_to_num(0.0) <= SPREAD).all())


def _rows_with_keys(plan: MaskPlan, lq: int, lk: int, device: torch.device) -> Tensor:
    """Bool ``(B or 1, 1, Lq, 1)``: causal rows that see at least one valid key."""
    idx, sees = last_keys(lq, lk, device)  # (Lq,), (Lq,)
    seen = sees.view(1, 1, lq, 1)
    if plan.key_valid is None or not lk:
        return seen
    count = plan.key_valid.long().cumsum(2)[:, :, idx]  # (B, 1, Lq, 1)
    return seen & (count > 0)


def _in_range(keys: Tensor) -> Callable[[Tensor], bool]:
    """A test of denominators ``(B, Hq, Lq, 1)``: no row with keys near or below the
    dtype's smallest normal number (with a margin for the chunks' rounding)."""

    def accept(den: Tensor) -> bool:
        low = den < torch.finfo(den.dtype).tiny * 2.0**24
        return not bool((low & keys).any())

    return accept


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
        "softmax; causal, padding, GQA; O(L F E)"
    )
    options = ("num_features", "seed", "redraw", "chunk_size")
    settings_type = PerformerOptions
    float16_in_float32 = True  # exp's range ends at e^-9.7 there (row 0 gave 0)

    def check_option_values(self, options: Mapping[str, object]) -> None:
        opts = parse_options(PerformerOptions, options, self.name)
        if opts.redraw and "seed" in options:
            raise ValueError(
                "engine_options: engine 'performer' takes either seed (fixed features) or "
                "redraw=True (new features each call from torch's RNG), not both"
            )

    def settings(self, req: AttentionRequest) -> PerformerOptions:
        """The call's options; with ``redraw``, one seed drawn from torch's RNG for the
        whole call (every block of heads, :meth:`_by_heads`, then uses the same features;
        each block drew its own, so a call's result changed with its number of heads)."""
        opts: PerformerOptions = super().settings(req)
        if not opts.redraw:
            return opts
        return replace(opts, seed=int(torch.randint(0, 2**63 - 1, (), dtype=torch.int64)))

    def unsupported(self, req: AttentionRequest) -> str | None:
        if req.scale < 0:
            return f"FAVOR+ needs scale >= 0 (it splits sqrt(scale)), got {req.scale}"
        return super().unsupported(req)

    def compute(
        self, req: AttentionRequest, plan: MaskPlan, opts: PerformerOptions
    ) -> tuple[Tensor, Tensor | None]:
        w = self.features(opts, req.q.shape[-1], req.q.device, req.q.dtype)  # (F, E)
        root = math.sqrt(req.scale)
        if not plan.causal:  # every row reads every key: one scale per feature
            qf, kf = favor_pair(req.q * root, req.k * root, w, plan.key_valid)
            return kernel_result(req, qf, kf, False, opts.chunk_size)
        qf = favor_features(req.q * root, w, is_query=True, valid=None)  # (B, Hq, Lq, F)
        kf, scale = causal_key_features(req.k * root, w, plan.key_valid)  # each key its own
        if unreadable(req.q):  # (vmap, export, meta: no value can be read to choose a path)
            return kernel_result(req, qf, kf, True, opts.chunk_size, scale)
        test = _in_range(_rows_with_keys(plan, req.lq, req.lk, req.q.device))
        top = scale.amax(-1, keepdim=True)  # (B, Hkv, 1)
        if _narrow(scale, top):  # one scale for all keys: the fast path, unless a row's
            # sum then falls out of range (queries' and keys' features barely overlap:
            # large norms); the row gave 0
            one = kf * torch.exp(scale - top.nan_to_num(neginf=0.0)).unsqueeze(-1)
            fast = kernel_result_if(req, qf, one, True, opts.chunk_size, None, accept=test)
            if fast is not None:
                return fast
        if req.q.dtype == torch.float64:
            return kernel_result(req, qf, kf, True, opts.chunk_size, scale)
        res = kernel_result_if(req, qf, kf, True, opts.chunk_size, scale, accept=test)
        return res if res is not None else self._in_float64(req, plan, opts)

    def _in_float64(
        self, req: AttentionRequest, plan: MaskPlan, opts: PerformerOptions
    ) -> tuple[Tensor, Tensor | None]:
        """:meth:`compute` in float64, returned in the call's dtype: a causal row whose
        query and keys' features overlap less than float32's range (below ``exp(-87)``
        of the largest) gave 0 even with each key its own scale; float64 reaches
        ``exp(-708)``."""
        wide = replace(req, q=req.q.double(), k=req.k.double(), v=req.v.double())
        out, weights = self.compute(wide, plan, opts)
        return out.to(req.q.dtype), None if weights is None else weights.to(req.q.dtype)

    def feature_dim(self, req: AttentionRequest, opts: PerformerOptions) -> int:
        return opts.num_features

    @staticmethod
    def features(
        opts: PerformerOptions, dim: int, device: torch.device, dtype: torch.dtype
    ) -> Tensor:
        """The random features ``(F, E)`` of ``opts.seed``: the same on every call, or
        with ``redraw`` the seed :meth:`settings` drew for this call (not cached)."""
        if opts.redraw:
            gen = torch.Generator().manual_seed(opts.seed)
            return orthogonal_features(opts.num_features, dim, generator=gen).to(device, dtype)
        return _seeded_features(opts.num_features, dim, opts.seed, device, dtype)
