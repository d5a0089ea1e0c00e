"""Rows far from 0, whose gradients fused kernels get wrong: torch SDPA's and
FlexAttention's backward recompute the weights from each row's stored logsumexp, and a
logsumexp that large rounds away the log of the row's sum. A bias puts a row there
(:func:`far_rows`), and so do large scores (:func:`far_scores`)."""

from __future__ import annotations

import weakref

import torch
from torch import Tensor

from attnlab._eager import compiling, unreadable
from attnlab._grid import Grid
from attnlab.engines._versions import held_tensors
from attnlab.engines.base import AttentionRequest

__all__ = ["far_limit", "far_rows", "far_scores", "score_limit"]


def far_rows(req: AttentionRequest, backward: str) -> str | None:
    """Why ``backward`` (``"torch SDPA's backward"``) cannot give the gradients of
    ``req``: a row's largest bias over the keys its mask leaves is at least
    :func:`far_limit` from 0; None without gradients, without such a row, or where no value
    can be read (vmapped, exported, on the meta device).

    Example:
        >>> from attnlab.bias import tensor
        >>> q = torch.zeros(1, 1, 2, 8, requires_grad=True)
        >>> bias = tensor(torch.tensor([[0.0, 0.0], [-1e9, -1e9]]))  # row 1: additive mask
        >>> req = AttentionRequest(q, q, q, None, bias, 1.0, "dot", "softmax", 0.0,
        ...                        return_weights=False, return_lse=False)
        >>> print(far_rows(req, "the backward"))  # doctest: +ELLIPSIS
        the backward recomputes the weights from a logsumexp that rounds ... peaks at -1e+09 ...
    """
    if req.bias is None or not req.needs_grad or unreadable(req.q):
        return None
    limit = far_limit(req.q.dtype)
    if _near(req, limit):  # shown without the (B, H, Lq, Lk) bias: seconds on a GPU
        return None
    with torch.no_grad():
        b, h, dev = req.batch, req.heads, req.q.device
        bias = req.bias.dense(req.lq, req.lk, batch=b, heads=h, device=dev, dtype=req.q.dtype)
        if req.mask is not None:  # a row's largest score is over the keys it may see
            allowed = req.mask.dense(req.lq, req.lk, batch=b, heads=h, device=dev)
            bias = bias.masked_fill(~allowed, float("-inf"))
        top = bias.amax(dim=-1).flatten()  # (B' * H' * Lq,); -inf: no key reaches it
        top = torch.where(top.isfinite(), top, 0.0)
        peak = float(top[top.abs().argmax()])
    if abs(peak) < limit:
        return None
    seen = f"a bias row peaks at {peak:.3g} (|peak| >= {limit:g} in {_name(req)})"
    return _refusal(backward, seen, "go wrong (a row of finfo.min: weights 1, not 1/Lk)")


def _refusal(backward: str, seen: str, wrong: str) -> str:
    """Why ``backward`` is refused, where ``seen`` puts a row far from 0."""
    return (
        f"{backward} recomputes the weights from a logsumexp that rounds by up to "
        f"|row max| * eps: {seen}, where its gradients {wrong}; calls without "
        f"gradients keep it"
    )


def _name(req: AttentionRequest) -> str:
    """The name of the request's dtype: ``"float32"``."""
    return str(req.q.dtype).removeprefix("torch.")


def _near(req: AttentionRequest, limit: float) -> bool:
    """Whether no row of ``req`` can peak at ``limit``, shown without evaluating the whole
    bias: the bias's bound is below it with a margin of 1% (a sum of biases adds in its
    terms' dtype, float32 for float64 inputs too, and rounds past the sum of their bounds;
    a call at the margin takes the dense check), or it is ``-slopes[h] * |p - k|`` and
    every query row sees its own position (the row's largest bias is then 0)."""
    assert req.bias is not None
    bound = req.bias.magnitude_bound(req.lq, req.lk)  # (NaN compares False)
    if bound is not None and bound * 1.01 < limit:
        return True
    slopes = req.bias.linear_distance_slopes()  # (H,)
    return slopes is not None and bool((slopes >= 0).all()) and _sees_itself(req)


def _sees_itself(req: AttentionRequest) -> bool:
    """Whether the mask leaves every query row the key at its own position (False where
    a row has no such key, ``Lq > Lk``, or the mask must be evaluated tile by tile).
    Evaluated where the mask keeps its tensors, the CPU for attnlab's own: on a GPU the
    answer read back was a host-device sync on every call with gradients (a mask that
    holds a device tensor, a dense one say, is still read there rather than copied)."""
    mask = req.mask
    if req.lq > req.lk or (mask is not None and not mask.elementwise):
        return False
    if mask is None:
        return True
    held = {t.device for t in held_tensors(mask)}
    dev = held.pop() if len(held) == 1 else torch.device("cpu")
    pos = torch.arange(req.lk - req.lq, req.lk, device=dev).view(1, 1, -1, 1)  # (1, 1, Lq, 1)
    b = torch.arange(req.batch if mask.per_batch else 1, device=dev).view(-1, 1, 1, 1)
    h = torch.arange(req.heads if mask.per_head else 1, device=dev).view(1, -1, 1, 1)
    return bool(mask(Grid(b, h, pos, pos, req.lq, req.lk)).all())  # (Bm, Hm, Lq, 1)


def far_limit(dtype: torch.dtype) -> float:
    """The ``|row max|`` of a bias from which a fused kernel's backward is refused: where
    the logsumexp's rounding, ``|row max| * eps / 2`` in its dtype (float32; float64 for
    float64 inputs), passes ``max(2**-18, eps of dtype) / 2``. 32 in float32, 8192 in
    float16, 65536 in bfloat16, 2**34 in float64.

    The backward recomputes each weight as ``exp(s - lse)``, so the rounding of ``lse``
    scales every weight of the row alike. Past ``log(Lk)`` it rounds away the whole log of
    the sum: a row with bias ``finfo(float32).min`` on every key got weights 1, not 1/Lk
    (Lk = 2: dV [1, 1], not [0.5, 0.5]; Lk 4-300: dQ up to 55 off). Torch SDPA's CPU
    kernels, against float64 (whole rows at +-2**e, 2-300 keys, queries of std 0.001-3;
    the worst gradient's error over 2x plain PyTorch's plus the tests' floor): float32
    0.8-1.4 to 2**6 (1.4 where q.k adds 3 sigma), 2-20 at 2**10, 1e5 at 2**24; float64
    0.9 at 2**34, 1.7-2.5 at 2**35-2**36; bfloat16 0.5 at 2**16, 1.0 at 2**18; float16 0.4
    at 2**13.

    Example:
        >>> far_limit(torch.float32), far_limit(torch.bfloat16), far_limit(torch.float64)
        (32.0, 65536.0, 17179869184.0)
    """
    lse = torch.float64 if dtype == torch.float64 else torch.float32
    return max(2.0**-18, torch.finfo(dtype).eps) / torch.finfo(lse).eps


#: The bound on ``|q_i . k_j| * scale`` from which torch SDPA's CPU backward is refused
#: (see :func:`score_limit`); float64 is not measured and not checked.
_SCORE_LIMITS = {torch.float32: 2.0**5, torch.float16: 2.0**12, torch.bfloat16: 2.0**15}


def far_scores(req: AttentionRequest, backward: str) -> str | None:
    """Why ``backward`` cannot give the gradients of ``req``: its scores may reach
    :func:`score_limit`, by the bound ``|scale| * max_i ||q_i|| * max_j ||k_j||``
    (Cauchy-Schwarz: two norms over E, no ``Lq x Lk`` work, one value read). None without
    gradients, below the limit, in float64, where no value can be read (vmapped,
    exported, compiled, on the meta device) and off the CPU, where the read would be a
    host-device sync on every call with gradients and the error is not measured.

    Example:
        >>> q = torch.ones(1, 1, 4, 16, requires_grad=True)  # ||q_i|| = 4: scores 2 * 16
        >>> req = AttentionRequest(q, q, q, None, None, 2.0, "dot", "softmax", 0.0,
        ...                        return_weights=False, return_lse=False)
        >>> print(far_scores(req, "the backward"))  # doctest: +ELLIPSIS
        the backward recomputes the weights from a logsumexp ... scores may reach 32 ...
    """
    limit = _checked_limit(req.q, req.needs_grad)
    if limit is None:
        return None
    bound = _bound(req)
    if not bound >= limit:  # (NaN: the NaN screen's concern)
        return None
    seen = (
        f"scores may reach {bound:.3g} (|scale| * max ||q_i|| * max ||k_j|| >= {limit:g} "
        f"in {_name(req)})"
    )
    return _refusal(backward, seen, "pass 2x plain PyTorch's error")


_last: list[tuple[weakref.ref[AttentionRequest], float]] = []  # auto asks blocked, then sdpa


def _bound(req: AttentionRequest) -> float:
    """:func:`_bound_of` the request, read once per request."""
    last = _last[0] if _last else None  # (one read: another thread may replace it)
    if last is not None and last[0]() is req:
        return last[1]
    bound = _bound_of(req.q, req.k, req.scale)
    _last[:] = [(weakref.ref(req), bound)]
    return bound


def _bound_of(q: Tensor, k: Tensor, scale: float) -> float:
    """``|scale| * max_i ||q_i|| * max_j ||k_j||``: two norms over E, one read."""
    with torch.no_grad():  # (Hq, Lq) and (Hkv, Lk) norms, accumulated in float32
        norms = [torch.linalg.vector_norm(t, dim=-1, dtype=torch.float32) for t in (q, k)]
        qn, kn = torch.stack([n.amax() for n in norms]).tolist()  # the one read
    return abs(scale) * qn * kn  # (a Python float: past float32's range too)


def far_plain(q: Tensor, k: Tensor, v: Tensor, scale: float | None) -> bool:
    """Whether :func:`far_scores` would refuse a plain call (q, k, v and a scale, no
    request): the same bound, where gradients are wanted, on the CPU.

    Example:
        >>> q = torch.ones(1, 1, 4, 16, requires_grad=True)
        >>> d = q.detach()  # no gradient wanted: SDPA's forward is fine
        >>> far_plain(q, q, q, 2.0), far_plain(q, q, q, None), far_plain(d, d, d, 2.0)
        (True, False, False)
    """
    grads = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    limit = _checked_limit(q, grads)
    if limit is None:
        return False
    return _bound_of(q, k, q.shape[-1] ** -0.5 if scale is None else scale) >= limit


def _checked_limit(q: Tensor, grads: bool) -> float | None:
    """:func:`score_limit` where the bound is checked: gradients wanted (``grads``), on
    the CPU, values readable (not vmapped, exported, compiled or on the meta device)."""
    limit = score_limit(q.dtype)
    if limit is None or not grads or not q.is_cpu:
        return None
    return None if unreadable(q) or compiling() else limit


def score_limit(dtype: torch.dtype) -> float | None:
    """The bound on a call's scores from which :func:`far_scores` refuses torch SDPA's
    CPU backward, None where none is (float64). 32 in float32, 4096 in float16, 32768
    in bfloat16: the first power of 2 where the worst gradient of SDPA's CPU kernels
    passed 2x plain PyTorch's error plus the tests' floor against float64 (queries and
    keys of random directions, standard deviation 1 and 3, head sizes 8-128, 40 and 200
    rows, causal and not, 2 seeds; AVX512 EPYC, torch 2.13): below it 0.99x at most,
    past it the error doubles with the bound (E=16, 40 rows, causal, scale 1000: dQ 3e-3
    where plain PyTorch's is 1e-9; scale 1e8: inf). Rows whose query matches its own key
    (saturated, exact in plain PyTorch) or scores sharing a large offset pass 2x sooner:
    float32 from 8-32, float16 and bfloat16 from 16-256.

    Example:
        >>> score_limit(torch.float32), score_limit(torch.bfloat16), score_limit(torch.float64)
        (32.0, 32768.0, None)
    """
    return _SCORE_LIMITS.get(dtype)
