"""The SDPA engine: :func:`torch.nn.functional.scaled_dot_product_attention`.

Used wherever torch computes the request exactly: dot-product scores, softmax, any mask
and bias (passed as one dense additive mask, or as ``is_causal`` for square causal
attention), dropout, grouped-query attention. It does not return weights or the
logsumexp; ``auto`` routes those requests elsewhere. Torch's fused kernels have a
first-order backward only: forward-mode AD and second derivatives that the forward can see
(``torch.func``) go elsewhere too, and a ``create_graph=True`` gradient through them
raises by name when differentiated (:func:`_sdpa`). Their backward recomputes the weights
from each row's logsumexp, which loses the row's sum where a bias puts the row far from 0
(an additive mask's padded row): calls with gradients and such a row go elsewhere
(:func:`~attnlab.engines._far.far_rows`), as do CPU calls whose scores may be that large
(:func:`~attnlab.engines._far.far_scores`). The engine keeps the dense form of the last
mask object (:class:`~attnlab.engines._dense_cache.DenseCache`): a model's layers share one.
It holds that one dense mask per engine instance, as the flex engine holds one block mask.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from attnlab._devices import to_device
from attnlab._eager import (
    compiling,
    higher_order,
    refuse_second_order,
    unreadable,
    vmapping,
)
from attnlab.engines._dense_cache import DenseCache, Parts
from attnlab.engines._far import far_plain, far_rows, far_scores
from attnlab.engines._nonfinite import any_nonfinite
from attnlab.engines.base import AttentionRequest, Engine, EngineResult
from attnlab.engines.blocked_choice import LONG, slow_half
from attnlab.masks import Mask

__all__ = ["SdpaEngine"]


class SdpaEngine(Engine):
    """torch SDPA for dot-product softmax attention with any mask and bias.

    Example:
        >>> import attnlab
        >>> from attnlab import masks
        >>> _ = torch.manual_seed(0)
        >>> q, k, v = torch.randn(3, 1, 2, 4, 8).unbind(0)
        >>> out = attnlab.attention(q, k, v, mask=masks.causal(), engine="sdpa")
        >>> torch.allclose(out, F.scaled_dot_product_attention(q, k, v, is_causal=True))
        True
        >>> attnlab.attention(q, k, v, engine="sdpa", return_weights=True)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ValueError: engine='sdpa' cannot compute this request: torch SDPA does not return ...
    """

    name = "sdpa"
    exact = True
    summary = (
        "dot score, softmax, any mask and bias (as a dense additive mask; square "
        "causal without one), dropout, GQA, autograd incl. learnable biases; "
        "no weights, no lse"
    )

    def __init__(self) -> None:
        self._masks = DenseCache()  # the last mask's dense form: one per engine instance

    def unsupported(self, req: AttentionRequest) -> str | None:
        if req.score != "dot":
            return f"torch SDPA computes dot-product scores only, not score={req.score!r}"
        if req.normalize != "softmax":
            return f"torch SDPA normalizes with softmax only, not {req.normalize!r}"
        if req.softcap is not None:
            return "torch SDPA has no logit soft-capping (softcap)"
        if req.sinks is not None:
            return "torch SDPA has no attention sinks (sinks)"
        if req.return_weights:
            return "torch SDPA does not return attention weights (return_weights=True)"
        if req.return_lse:
            return "torch SDPA does not return the logsumexp (return_lse=True)"
        if req.batch == 0 or req.lq == 0 or req.lk == 0:
            return "torch SDPA does not accept empty batches or sequences"
        if higher_order(req.q, req.k, req.v):
            return (
                "torch SDPA's fused kernels have no forward-mode AD (torch.func.jvp, jacfwd, "
                "forward_ad) and no second derivative (torch.func grad of grad, hessian); "
                "engine='reference' serves them"
            )
        if _unbatched(req.q):
            return "torch has no vmap batching rule for SDPA's CPU kernels (it warns and loops)"
        if not _keeps_nan(req.q, req.lk, req.dropout_p):  # one screen, whichever applies
            if any_nonfinite(req.q, req.k, req.v):
                hold = f"the inputs {_hold()} NaN or inf"
                return f"{hold}, which torch SDPA's fused kernels turn into 0 (NaN) or spread"
        elif _screens_hidden_nan(req) and any_nonfinite(req.k, req.v):  # 0 * inf is NaN
            hidden = "rows the mask hides it from"
            return f"k or v {_hold()} NaN or inf, which torch SDPA spreads to {hidden}"
        backward = "torch SDPA's backward"
        return far_rows(req, backward) or far_scores(req, backward)

    def prefers(self, req: AttentionRequest) -> bool:
        return not _one_tracked_key(req.q, req.k, req.v)

    def plain(self, q: Tensor, k: Tensor, v: Tensor, scale: float | None) -> Tensor | None:
        if 0 in q.shape[:3] or not _keeps_nan(q, k.shape[2], 0.0) or _unbatched(q):
            return None  # empty, a NaN screen to run, or vmapped: the request decides
        if _one_tracked_key(q, k, v) or higher_order(q, k, v):
            return None
        if (slow_half(q) and q.shape[2] * k.shape[2] >= LONG) or far_plain(q, k, v, scale):
            return None  # the request decides: the blocked engine, or declined (far_scores)
        gqa = q.shape[1] != k.shape[1]
        return _sdpa(q, k, v, scale=scale, enable_gqa=gqa)

    def forward(self, req: AttentionRequest) -> EngineResult:
        gqa = req.heads != req.k.shape[1]
        causal = req.mask is not None and req.mask.is_causal and req.bias is None
        if causal and req.lq == req.lk and req.scale > 0:  # is_causal: NaN rows at scale <= 0
            out = _sdpa(
                req.q,
                req.k,
                req.v,
                dropout_p=req.dropout_p,
                is_causal=True,
                scale=req.scale,
                enable_gqa=gqa,
            )
            return out, None, None
        attn_mask, empty_rows, single = _dense_mask(req, self._masks)
        out = _sdpa(
            req.q,
            req.k,
            req.v,
            attn_mask=attn_mask,
            dropout_p=req.dropout_p,
            scale=req.scale,
            enable_gqa=gqa,
        )  # (B, Hq, Lq, Ev)
        if single is not None:  # exact dQ = dK = 0 on rows that see one key
            out = _one_key_rows(out, req.v, single, attn_mask if req.bias is not None else None)
        if empty_rows is not None:
            out = out.masked_fill(empty_rows, 0.0)
        return out, None, None


def _sdpa(q: Tensor, k: Tensor, v: Tensor, **kwargs: object) -> Tensor:
    """``F.scaled_dot_product_attention(q, k, v, **kwargs)`` whose fused kernel's backward
    (it has no derivative) refuses by name a second-order gradient under
    ``create_graph=True``: torch raised "derivative for
    aten::_scaled_dot_product_flash_attention_for_cpu_backward is not implemented". The
    math path (a mask that wants grad, dropout on the CPU) is differentiable and kept."""
    out = F.scaled_dot_product_attention(q, k, v, **kwargs)  # type: ignore[arg-type]
    node = out.grad_fn
    if node is not None and node.name().startswith("ScaledDotProduct"):
        refuse_second_order(node, "the sdpa engine", "give such calls engine='reference'")
    return out


def _one_tracked_key(q: Tensor, k: Tensor, v: Tensor) -> bool:
    """Whether a call has one key and gradients: each weight is then exactly 1 and dQ and
    dK exactly 0, where torch SDPA's backward gives 1e-6 (float32, E=8); ``auto`` lets
    another engine take it."""
    tracked = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad)
    return k.shape[2] == 1 and tracked


def _keeps_nan(q: Tensor, lk: int, dropout_p: float) -> bool:
    """Whether torch's SDPA passes NaN inputs on to the rows that read them, so the NaN
    screen (a pass over the whole KV cache at every decoding step, and on a GPU a device
    sync that stalls the host on every call) can be skipped.

    Measured on torch's CPU kernels over float32, bfloat16 and float64, masks or none,
    ``is_causal``, GQA and head sizes 32-128: with at least 16 keys every NaN reaches
    its rows; with fewer and no mask, NaN queries and keys can come out as 0. On CUDA
    (an H200, torch 2.11.0+cu130) every kernel passed every NaN on, from one key up:
    18,936 calls of the default choice, flash, memory-efficient, cuDNN and math, in
    bfloat16, float16 and float32, 1-1000 keys, 1, 4 or all query rows, head sizes
    32-128, no mask, ``is_causal``, bool and float masks, GQA 4:1 or none.
    ``tests/test_attention.py`` and ``tests/test_gpu.py`` pin this, so a torch that
    changes it fails the suite (ROCm's kernels are not measured: they are screened).
    """
    if dropout_p != 0.0:
        return False
    if q.is_cuda:  # (is_cuda, is_cpu: no torch.device made, as .device.type does)
        return torch.version.hip is None
    return q.is_cpu and lk >= 16


def _screens_hidden_nan(req: AttentionRequest) -> bool:
    """Whether a masked call is screened for NaN in k and v, which torch SDPA spreads to
    rows the mask hides it from: on the CPU from 16 query rows on, where the pass over k
    and v is small beside the attention. A decoding step (a pass over the whole cache per
    step) and a GPU call (a device sync) are not screened."""
    masked = req.mask is not None or req.bias is not None
    return masked and req.q.is_cpu and req.lq >= 16


def _dense_mask(
    req: AttentionRequest, cache: DenseCache | None = None
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """The request's mask and bias as one SDPA ``attn_mask``, plus its fully masked rows
    and the key of each row it leaves exactly one key (:func:`_single_keys`).

    Fully masked rows are opened to every key (so torch never sees an all ``-inf`` row
    and its gradients stay finite) and their output is zeroed afterwards. Off the CPU a
    mask with exact row bounds answers both from bounds made on the CPU
    (:func:`_mask_by_bounds`): no device value is read back. Other masks are read on the
    device (one host-device sync per question on a GPU). ``cache`` keeps the mask's part
    for the next call with the same mask; the bias's part is made per call.
    """
    allowed = empty = single = None
    if req.mask is not None:
        allowed, empty, single = _mask_parts(req) if cache is None else cache.get(req, _mask_parts)
    if req.bias is None:
        return allowed, empty, single
    dtype = _bias_dtype(req.q)
    bias = req.bias.dense(
        req.lq, req.lk, batch=req.batch, heads=req.heads, device=req.q.device, dtype=dtype
    )  # (Bb, Hb, Lq, Lk)
    if allowed is not None:
        bias = bias.masked_fill(~allowed, float("-inf"))
    return bias, empty, single


def _bias_dtype(q: Tensor) -> torch.dtype:
    """The dtype of the dense bias handed to torch SDPA: float32 for half-precision ``q``
    on the CPU, whose kernels add a float32 mask as it is (the bias rounded to bfloat16
    gave 3.4x the error of torch's SDPA with the same float32 bias, and of the reference
    and blocked engines: 2.6e-2 for 7.8e-3, bias std 3, E=32); else ``q``'s dtype (CUDA's
    memory-efficient kernel raises "invalid dtype for bias - should match query's dtype").

    Example:
        >>> _bias_dtype(torch.ones(1, dtype=torch.bfloat16))
        torch.float32
    """
    half = q.dtype in (torch.float16, torch.bfloat16)
    return torch.float32 if half and q.is_cpu else q.dtype


def _mask_parts(req: AttentionRequest) -> Parts:
    """``(allowed, empty, single)`` of :func:`_dense_mask` for ``req.mask``, not None."""
    assert req.mask is not None
    bounds = _host_bounds(req)
    if bounds is not None:
        return _mask_by_bounds(req, *bounds)
    return _mask_by_evaluation(req.mask, req)


def _mask_by_evaluation(
    mask: Mask, req: AttentionRequest
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """``(allowed, empty, single)`` of :func:`_dense_mask` from the mask's dense form,
    read where it lies (on a GPU, ``bool()`` of a device tensor: a sync)."""
    allowed = _unbroadcast(
        mask.dense(req.lq, req.lk, batch=req.batch, heads=req.heads, device=req.q.device)
    )  # (Bm, Hm, Lq or 1, Lk or 1): SDPA broadcasts it
    single = _single_keys(mask, allowed, req)
    rows = ~allowed.any(dim=-1, keepdim=True)  # (Bm, Hm, Lq, 1)
    if unreadable(rows) or bool(rows.any()):  # (else no fully masked row)
        return allowed | rows, rows, single
    return allowed, None, single


def _host_bounds(req: AttentionRequest) -> tuple[Tensor, Tensor] | None:
    """The mask's exact row bounds ``lo, hi (Bm, Lq)`` on the CPU for a call off the CPU,
    or None: on the CPU (reading the dense form there costs no sync), for a mask without
    exact bounds (per head, gaps, split documents), and where no value can be read or a
    trace would keep Python's answers (meta, vmap, export, ``torch.compile``)."""
    if req.q.device.type in ("cpu", "meta"):
        return None
    return _exact_bounds(req)


def _exact_bounds(req: AttentionRequest) -> tuple[Tensor, Tensor] | None:
    """:func:`_host_bounds` on any device (the tests run it on the CPU)."""
    mask = req.mask
    if mask is None or mask.per_head or unreadable(req.q) or compiling():
        return None
    bounds = mask.row_bounds(req.lq, req.lk, req.batch, "cpu")
    if bounds is None or not bounds.exact:
        return None
    return bounds.lo.cpu(), bounds.hi.cpu()


def _mask_by_bounds(
    req: AttentionRequest, lo: Tensor, hi: Tensor
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """``(allowed, empty, single)`` of :func:`_dense_mask` for a mask that allows exactly
    the keys ``lo..hi`` of each row (``(Bm, Lq)`` on the CPU): every question is answered
    on the CPU and only the answers travel to the device, copied without a sync. On an
    H200, ``causal() & window(128)`` at 1x8x1024x64 made a sync per call (380-510 us to
    return against 48 us for bare SDPA). ``single`` stays on the CPU, where
    :func:`_one_key_rows` finds its rows (``nonzero`` of a device tensor is a sync)."""
    device = req.q.device
    first, last = lo.clamp(min=0), hi.clamp(max=req.lk - 1)  # (Bm, Lq)
    allowed = _interval_mask(lo, hi, req.lk, device)  # (Bm, 1, Lq or 1, Lk)
    empty = None
    if bool((first > last).any()):
        empty = to_device((first > last)[:, None, :, None], device)  # (Bm, 1, Lq, 1)
        allowed = allowed | empty
    single = None  # kept on the CPU: _one_key_rows finds its rows there, unsynced
    if req.needs_grad and req.dropout_p == 0 and bool((first == last).any()):
        single = torch.where(first == last, first, -1).unsqueeze(1)
    return allowed, empty, single  # single: (Bm, 1, Lq) on the CPU


def _interval_mask(lo: Tensor, hi: Tensor, lk: int, device: torch.device) -> Tensor:
    """``(Bm, 1, Lq or 1, Lk)`` bool on ``device``: key ``k`` of row ``i`` allowed where
    ``lo[:, i] <= k <= hi[:, i]`` (``lo, hi (Bm, Lq)`` on the CPU); one row for all when
    every row has the same interval (a key padding mask stays ``(B, 1, 1, Lk)``)."""
    if bool((lo == lo[:, :1]).all()) and bool((hi == hi[:, :1]).all()):
        lo, hi = lo[:, :1], hi[:, :1]
    keys = torch.arange(lk, device=device)  # (Lk,)
    lo_d, hi_d = (to_device(t[:, None, :, None], device) for t in (lo, hi))
    return (keys >= lo_d) & (keys <= hi_d)


def _single_keys(mask: Mask, allowed: Tensor, req: AttentionRequest) -> Tensor | None:
    """For a call with gradients: ``(Bm, Hm or 1, Lq or 1)``, the one key of each row that
    ``mask`` (dense: ``allowed (Bm, Hm, Lq or 1, Lk or 1)``) leaves exactly one, -1
    elsewhere; None where no row has one (or under dropout, vmap, export or on the meta
    device, which keep torch's backward). An exact interval mask answers from its row
    bounds (causal & padding, B=4, 2048: counting the dense rows took 0.3 s of a 5.9 s
    forward and backward).
    """
    if not req.needs_grad or req.dropout_p > 0 or unreadable(allowed):
        return None
    if allowed.shape[-1] != req.lk:  # the same for every key: a row sees none or all
        return None
    bounds = None if mask.per_head else mask.row_bounds(req.lq, req.lk, req.batch, req.q.device)
    if bounds is not None and bounds.exact:
        lo = bounds.lo.clamp(min=0)  # (Bm, Lq)
        single, first = (bounds.hi.clamp(max=req.lk - 1) == lo).unsqueeze(1), lo.unsqueeze(1)
    else:
        single = allowed.sum(dim=-1) == 1  # (Bm, Hm, Lq or 1)
        first = allowed.to(torch.uint8).argmax(dim=-1) if bool(single.any()) else single
    return torch.where(single, first, -1) if bool(single.any()) else None


def _one_key_rows(out: Tensor, v: Tensor, single: Tensor, bias: Tensor | None) -> Tensor:
    """``out (B, Hq, Lq, Ev)`` with each row that sees one key (``single``, see
    :func:`_single_keys`) set to that key's value ``v (B, Hkv, Lk, Ev)``, unless ``bias
    (Bb, Hb, Lq, Lk)`` hides that key with ``-inf``: such a row sees no key and keeps
    ``out``'s row.

    The forward is the same (the row's weight is exactly 1); backward hands the row's
    upstream gradient to that value alone, so its dQ, dK and bias gradient are exactly 0,
    as softmax over one score gives. Torch SDPA's backward left its rounding there:
    ``dP - rowsum(dO * O)`` is about 1e-6, not 0. ``global_tokens([0])`` (every row but the
    first sees key 0 alone), 256 rows, float32: dQ 10x and dK 43x plain PyTorch's error
    vs float64 (1024 rows: 45x and 515x); an item of padding length 1: dK 5-26x;
    ``window(0)``: 1e-6 where plain PyTorch's is 0. Made exact here rather than routed
    elsewhere: row 0 of ``causal() & padding(...)`` sees one key too, and such calls stay
    with SDPA at the cost of a gather of those rows. The rows are found where ``single``
    lies: on the CPU when it came from row bounds (:func:`_mask_by_bounds`), so a GPU
    call reads nothing back.
    """
    b, hq, lq, _ = out.shape
    hkv, lk = v.shape[1], v.shape[2]
    item, head, row = torch.nonzero(single.expand(b, hq, lq) >= 0, as_tuple=True)
    key = single.expand(b, hq, lq)[item, head, row]
    flat = (item * hkv + head // (hq // hkv)) * lk + key  # (N,) rows of v (B * Hkv * Lk, Ev)
    keys, which = torch.unique(flat, return_inverse=True)
    if single.device != out.device:
        item, head, row, key, keys, which = (
            to_device(t, out.device) for t in (item, head, row, key, keys, which)
        )
    # each value once, then float64 for the backward's sum of many rows' gradients into
    # it (key 0 of global_tokens([0]) in float32: dV 2.1x plain PyTorch's error, not 0.8x)
    picked = v.flatten(0, 2)[keys].double()[which].to(out.dtype)  # (N, Ev)
    if bias is not None:  # a key the bias hides: the row keeps its output
        hidden = bias.expand(b, hq, lq, lk)[item, head, row, key] == float("-inf")  # (N,)
        picked = torch.where(hidden.unsqueeze(-1), out[item, head, row], picked)
    return out.index_put((item, head, row), picked)


def _unbroadcast(t: Tensor) -> Tensor:
    """``t`` with each broadcast (stride 0) dim narrowed to size 1: the same mask for
    SDPA, which broadcasts it, without SDPA materializing (and reading) every copy. A key
    padding mask ``(B, 1, 1, Lk)`` stays that size instead of ``(B, 1, Lq, Lk)``."""
    index = tuple(
        slice(0, 1) if t.stride(d) == 0 and t.shape[d] > 1 else slice(None) for d in range(t.dim())
    )
    return t[index]


def _hold() -> str:
    """How a refusal for NaN words it: held, or (vmapped, unread) maybe held."""
    return "may hold (vmapped, they cannot be screened)" if vmapping() else "hold"


def _unbatched(q: Tensor) -> bool:
    """Whether torch.func.vmap runs a call to the CPU, where torch has no batching rule
    for SDPA's kernels (forward and backward): it warned "there is a performance drop"
    and looped over the items."""
    return q.is_cpu and vmapping()
