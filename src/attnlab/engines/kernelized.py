"""Kernelized attention, shared by the linear and Performer engines.

Both replace ``softmax(q k^T * scale)`` by a kernel ``phi(q) phi(k)^T`` with a positive
feature map ``phi``, so attention factorizes::

    out_i = phi(q_i) (sum_j phi(k_j) v_j^T) / phi(q_i) (sum_j phi(k_j))

Non-causal attention sums over all keys once; causal attention takes prefix sums, in
chunks of ``chunk_size`` keys (a quadratic ``C x C`` product inside a chunk, one running
state per chunk), so memory is ``O(L F E / C)`` per head instead of ``O(L F E)``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from attnlab._eager import unreadable, vmapping
from attnlab.engines._nonfinite import any_nonfinite
from attnlab.engines.base import AttentionRequest, weighted_values
from attnlab.scores import grouped_matmul

__all__ = [
    "kernel_attention",
    "kernel_result",
    "kernel_result_if",
    "kernel_sums",
    "kernel_weights",
    "last_keys",
]


def kernel_attention(
    qf: Tensor,
    kf: Tensor,
    v: Tensor,
    *,
    causal: bool,
    chunk_size: int = 128,
    log_scale: Tensor | None = None,
) -> Tensor:
    """``out_i = sum_j (qf_i . kf_j) v_j / sum_j (qf_i . kf_j)`` in linear time.

    Args:
        qf: query features ``(B, Hq, Lq, F)``, nonnegative.
        kf: key features ``(B, Hkv, Lk, F)``, nonnegative (0 on padded keys).
        v: values ``(B, Hkv, Lk, Ev)``; ``Hq % Hkv == 0``.
        causal: sum over keys ``j <= i + Lk - Lq`` only (bottom-right aligned).
        chunk_size: keys per chunk of the causal prefix sums.
        log_scale: (causal) each key's feature scale ``a (B, Hkv, Lk)``, detached, ``-inf``
            on padded keys: its features are ``kf_j exp(a_j)``, summed against each row's
            running maximum of ``a`` (a row's result then depends on its own keys only;
            one scale for all keys, the largest, let later keys underflow earlier rows').

    Returns:
        ``(B, Hq, Lq, Ev)``; 0 where a query has no key (or all features vanish).

    Example:
        >>> qf, kf, v = torch.rand(1, 2, 5, 3), torch.rand(1, 1, 5, 3), torch.randn(1, 1, 5, 4)
        >>> out = kernel_attention(qf, kf, v, causal=True, chunk_size=2)
        >>> torch.allclose(out[:, :, 0], v[:, :, 0].expand(1, 2, 4))
        True
    """
    num, den = kernel_sums(qf, kf, v, causal=causal, chunk=chunk_size, log_scale=log_scale)
    return _safe_ratio(num, den)


def kernel_sums(
    qf: Tensor, kf: Tensor, v: Tensor, *, causal: bool, chunk: int, log_scale: Tensor | None
) -> tuple[Tensor, Tensor]:
    """:func:`kernel_attention`'s numerator ``(B, Hq, Lq, Ev)`` and denominator
    ``(B, Hq, Lq, 1)``, before they are divided."""
    if causal:  # numerator and denominator together: v with a column of ones
        # (B, Hkv, Lk, Ev): where v holds NaN or inf (none read under vmap; one read
        # otherwise); the rows that read one get NaN
        nan = ~torch.isfinite(v) if not vmapping() and any_nonfinite(v) else None
        if nan is not None:
            v = v.masked_fill(nan, 0.0)  # a chunk's 0 * NaN (0 * inf) reached the rows before it
        v1 = torch.cat([v, v.new_ones(*v.shape[:-1], 1)], dim=-1)  # (B, Hkv, Lk, Ev + 1)
        if log_scale is not None:
            both = _scaled_causal_sums(qf, kf, v1, chunk, log_scale)
        else:
            both = _causal_sums(qf, kf, v1, chunk)  # (B, Hq, Lq, Ev + 1)
        num = both[..., :-1]
        if nan is not None and v.shape[2]:
            num = num.masked_fill(_reads(nan, qf.shape[1], qf.shape[2]), float("nan"))
        return num, both[..., -1:]
    num = grouped_matmul(qf, kf.transpose(-1, -2) @ v)  # (B, Hq, Lq, Ev)
    den = grouped_matmul(qf, kf.sum(-2).unsqueeze(-1))  # (B, Hq, Lq, 1)
    return num, den


def _safe_ratio(num: Tensor, den: Tensor) -> Tensor:
    """``num / den`` where ``den`` is a normal float or NaN (a row that read a NaN keeps
    it), 0 elsewhere (a row with no key, or whose features all vanish), with 0 gradient
    there: dividing by a clamped ``den`` instead gives such rows gradients ``1 / tiny``
    that overflow, and their ``0 * inf`` (through the zeroed features of padded keys) NaN."""
    ok = (den >= torch.finfo(den.dtype).tiny) | den.isnan()  # den >= 0: nonnegative features
    return torch.where(ok, num / torch.where(ok, den, 1), 0)


def last_keys(lq: int, lk: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Each causal row's last key (bottom-right aligned), clamped into ``[0, Lk)``, and
    whether the row sees a key at all: two ``(Lq,)`` tensors.

    Example:
        >>> [t.tolist() for t in last_keys(3, 2, torch.device("cpu"))]
        [[0, 0, 1], [False, True, True]]
    """
    last = torch.arange(lq, device=device) + (lk - lq)  # (Lq,)
    return last.clamp(0, max(lk - 1, 0)), last >= 0


def _reads(nan: Tensor, hq: int, lq: int) -> Tensor:
    """Bool ``(B, Hq, Lq, Ev)``: the causal rows (bottom-right aligned) whose keys include
    a NaN in that column of the values ``nan (B, Hkv, Lk, Ev)``."""
    idx, sees = last_keys(lq, nan.shape[2], nan.device)
    seen = nan.cumsum(2).gt(0)[:, :, idx] & sees.view(1, 1, lq, 1)  # (B, Hkv, Lq, Ev)
    return seen.repeat_interleave(hq // nan.shape[1], 1)


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


def _scaled_causal_sums(
    qf: Tensor, kf: Tensor, v1: Tensor, chunk: int, log_scale: Tensor
) -> Tensor:
    """Causal ``sum_{j <= p(i)} exp(a_j - M_i) (qf_i . kf_j) v1_j`` with ``M_i`` the
    running maximum of ``a`` over row ``i``'s keys, by chunks as :func:`_causal_sums`:
    each chunk's keys scaled to the running maximum at its end, the carried states
    rescaled as that grows (a loop of elementwise steps over chunks), and the ``C x C``
    products inside a chunk weighted by ``exp(a_j - M_i) <= 1``. ``(B, Hq, Lq, Ev1)``."""
    b, hq, lq, f = qf.shape
    hkv, lk = kf.shape[1], kf.shape[2]
    qg = qf.reshape(b, hkv, hq // hkv, lq, f)  # (B, Hkv, G, Lq, F)
    peak = torch.cummax(log_scale, -1).values if lk else log_scale  # (B, Hkv, Lk): M
    shift, state, top = lk - lq, None, None
    if shift > 0:  # keys every query sees: the first state, scaled to their maximum
        top = _finite(peak[..., shift - 1 : shift])  # (B, Hkv, 1)
        w = torch.exp(log_scale[..., :shift] - top).unsqueeze(-1)  # (B, Hkv, shift, 1)
        state = (kf[:, :, :shift] * w).transpose(-1, -2) @ v1[:, :, :shift]  # (B,Hkv,F,Ev1)
        kf, v1 = kf[:, :, shift:], v1[:, :, shift:]
        log_scale, peak = log_scale[..., shift:], peak[..., shift:]
    elif shift < 0:  # rows before the first key see nothing
        qg = qg[:, :, :, -shift:]
    out = _scaled_chunks(qg, kf, v1, chunk, log_scale, peak, state, top)
    if shift < 0:
        out = F.pad(out, (0, 0, -shift, 0))
    return out.reshape(b, hq, lq, -1)


def _scaled_chunks(
    qg: Tensor,
    kf: Tensor,
    v1: Tensor,
    chunk: int,
    a: Tensor,
    peak: Tensor,
    state: Tensor | None,
    top: Tensor | None,
) -> Tensor:
    """The square part of :func:`_scaled_causal_sums`: ``qg (B, Hkv, G, n, F)`` over
    ``kf (B, Hkv, n, F)``, key scales ``a`` and their running maximum ``peak``
    ``(B, Hkv, n)``, after a carried ``state (B, Hkv, F, Ev1)`` scaled to ``top``."""
    b, hkv, g, n, f = qg.shape
    c = max(1, min(chunk, n))
    m = -(-n // c)
    pad = m * c - n
    if pad:  # padded keys weigh 0 (a = -inf); padded rows are cut off below
        qg, kf, v1 = (F.pad(t, (0, 0, 0, pad)) for t in (qg, kf, v1))
        a = F.pad(a, (0, pad), value=float("-inf"))
        peak = F.pad(peak, (0, pad), mode="replicate") if n else F.pad(peak, (0, pad))
    qc = qg.reshape(b, hkv, g, m, c, f)  # (B, Hkv, G, M, C, F)
    kc = kf.reshape(b, hkv, 1, m, c, f)  # (B, Hkv, 1, M, C, F)
    vc = v1.reshape(b, hkv, 1, m, c, -1)  # (B, Hkv, 1, M, C, Ev1)
    ac = a.reshape(b, hkv, 1, m, c)  # (B, Hkv, 1, M, C)
    rows = _finite(peak.reshape(b, hkv, 1, m, c))  # (B, Hkv, 1, M, C): each row's M_i
    ends = rows[..., -1]  # (B, Hkv, 1, M): the running maximum at each chunk's end
    own = (kc * torch.exp(ac - ends.unsqueeze(-1)).unsqueeze(-1)).transpose(-1, -2) @ vc
    prev, tops = _carried(own, ends, state, top)  # (B, Hkv, 1, M, F, Ev1), (B, Hkv, 1, M)
    inter = torch.exp(tops.unsqueeze(-1) - rows).clamp(max=1).unsqueeze(-1) * (qc @ prev)
    seen = torch.ones(c, c, dtype=torch.bool, device=qg.device).tril()  # (C, C)
    gap = torch.exp(ac.unsqueeze(-2) - rows.unsqueeze(-1))  # (B, Hkv, G?, M, C, C)
    # keys after a row weigh 0 by where, not by a factor: 0 * NaN of a NaN key reached it
    intra = torch.where(seen, (qc @ kc.transpose(-1, -2)) * gap, 0.0) @ vc
    return (inter + intra).reshape(b, hkv, g, m * c, -1)[:, :, :, :n]


def _carried(
    own: Tensor, ends: Tensor, state: Tensor | None, top: Tensor | None
) -> tuple[Tensor, Tensor]:
    """The state before each chunk ``(B, Hkv, 1, M, F, Ev1)``, scaled to the running
    maximum before it (returned, ``(B, Hkv, 1, M)``): ``sum_(c' < c) exp(t_c' - t_(c-1))
    own_c'``, as one prefix sum in float64 against the last maximum (its factors
    underflow only past a spread of 700 in the keys' scales; float32's did past 87), or,
    past a spread of :data:`SCAN_SPREAD`, chunk by chunk (:func:`_carried_scan`)."""
    t_prev = torch.cat([_start(ends, top), ends[..., :-1]], -1)  # (B, Hkv, 1, M)
    acc = torch.float64
    spread = ends.amax() - torch.cat([t_prev, ends], -1).amin()
    if unreadable(ends) or not bool(spread <= SCAN_SPREAD):  # (vmap, meta: no value read)
        return _carried_scan(own, ends, state, top), t_prev
    last = ends[..., -1:].to(acc)  # (B, Hkv, 1, 1)
    weights = torch.exp(ends.to(acc) - last)[..., None, None]  # (B, Hkv, 1, M, 1, 1)
    sums = (own.to(acc) * weights).cumsum(3)  # (B, Hkv, 1, M, F, Ev1)
    first = torch.zeros_like(sums[:, :, :, :1])  # (B, Hkv, 1, 1, F, Ev1)
    if state is not None and top is not None:  # the keys before the square part
        factor = torch.exp(top.unsqueeze(2).to(acc) - last)[..., None, None]
        first = first + state.to(acc)[:, :, None, None] * factor
    prev = torch.cat([first, sums[:, :, :, :-1] + first], 3)  # exclusive
    back = torch.exp(last - t_prev.to(acc))[..., None, None]  # (B, Hkv, 1, M, 1, 1)
    return (prev * back).to(own.dtype), t_prev


SCAN_SPREAD = 600.0  # exp(-600) is normal in float64; past it the prefix sum's factors are 0


def _carried_scan(own: Tensor, ends: Tensor, state: Tensor | None, top: Tensor | None) -> Tensor:
    """:func:`_carried`'s states by the running-maximum recurrence, one chunk at a time:
    each step rescales by ``exp(t_(c-1) - t_c) <= 1`` (the maximum never falls), so
    nothing underflows whatever the spread (the prefix sum zeroed rows past about 700)."""
    acc = torch.float64
    run_top = _start(ends, top)[..., 0].to(acc)  # (B, Hkv, 1)
    run = torch.zeros_like(own[:, :, :, 0], dtype=acc)  # (B, Hkv, 1, F, Ev1)
    if state is not None and top is not None:  # the keys before, scaled to ``top``
        run = run + state.to(acc)[:, :, None]
    states = []
    for c in range(own.shape[3]):
        states.append(run)
        new_top = ends[..., c].to(acc)  # (B, Hkv, 1)
        run = run * torch.exp(run_top - new_top)[..., None, None] + own[:, :, :, c].to(acc)
        run_top = new_top
    return torch.stack(states, 3).to(own.dtype)  # (B, Hkv, 1, M, F, Ev1)


def _start(ends: Tensor, top: Tensor | None) -> Tensor:
    """The maximum the first chunk's carried state is scaled to ``(B, Hkv, 1, 1)``."""
    return ends[..., :1] if top is None else top.unsqueeze(2)


def _finite(m: Tensor) -> Tensor:
    """A running maximum with 0 where no key was seen (``-inf``: ``exp(-inf - -inf)``)."""
    return torch.where(torch.isfinite(m), m, torch.zeros_like(m))


def kernel_weights(qf: Tensor, kf: Tensor, causal: bool, log_scale: Tensor | None = None) -> Tensor:
    """The weights ``(B, Hq, Lq, Lk)`` that :func:`kernel_attention` applies, dense."""
    a = _kernel_matrix(qf, kf, causal, log_scale)  # (B, Hq, Lq, Lk)
    return _safe_ratio(a, a.sum(-1, keepdim=True))


def _kernel_matrix(qf: Tensor, kf: Tensor, causal: bool, log_scale: Tensor | None) -> Tensor:
    """:func:`kernel_weights` before each row is divided by its sum."""
    a = grouped_matmul(qf, kf.transpose(-1, -2))  # (B, Hq, Lq, Lk)
    lq, lk = a.shape[-2:]
    if causal and log_scale is not None and lk:  # exp(a_j - M_i), M_i: the row's running max
        s = log_scale.repeat_interleave(qf.shape[1] // kf.shape[1], 1)  # (B, Hq, Lk)
        last = last_keys(lq, lk, a.device)[0]  # rows' p(i)
        m = _finite(torch.cummax(s, -1).values[..., last])  # (B, Hq, Lq)
        a = a * torch.exp((s.unsqueeze(-2) - m.unsqueeze(-1)).clamp(max=0))
    if causal:
        a = a.tril(lk - lq)  # key j <= i + Lk - Lq
    return a


def kernel_result(
    req: AttentionRequest,
    qf: Tensor,
    kf: Tensor,
    causal: bool,
    chunk: int,
    log_scale: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """``(out, weights)`` of features ``qf``, ``kf`` (and the keys' ``log_scale``, see
    :func:`kernel_attention`): the weights ``(B, Hq, Lq, Lk)`` materialized only when
    ``req.return_weights`` asks (else None, in linear time)."""
    res = kernel_result_if(req, qf, kf, causal, chunk, log_scale, accept=None)
    assert res is not None  # nothing to refuse
    return res


def kernel_result_if(
    req: AttentionRequest,
    qf: Tensor,
    kf: Tensor,
    causal: bool,
    chunk: int,
    log_scale: Tensor | None,
    *,
    accept: Callable[[Tensor], bool] | None,
) -> tuple[Tensor, Tensor | None] | None:
    """:func:`kernel_result`, or None when ``accept`` refuses the rows' denominators
    ``(B, Hq, Lq, 1)`` (before they divide anything)."""
    if req.return_weights:
        a = _kernel_matrix(qf, kf, causal, log_scale)  # (B, Hq, Lq, Lk)
        den = a.sum(-1, keepdim=True)  # (B, Hq, Lq, 1)
        if accept is not None and not accept(den):
            return None
        w = _safe_ratio(a, den)
        lq, lk = a.shape[-2:]  # a NaN value reaches the rows that see its key (not 0 * NaN)
        allowed = torch.ones(lq, lk, dtype=torch.bool, device=a.device).tril(lk - lq)
        return weighted_values(w, req.v, allowed if causal else None), w
    num, den = kernel_sums(qf, kf, req.v, causal=causal, chunk=chunk, log_scale=log_scale)
    if accept is not None and not accept(den):
        return None
    return _safe_ratio(num, den), None
