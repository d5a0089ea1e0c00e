"""The local steps: one (query piece, key piece) pair, forward and backward (their
partial results merge in :mod:`~attnlab.distributed.merge`).

Forward runs :func:`attnlab.functional.attention` with the global mask and bias restricted
to the pair (:class:`~attnlab.distributed.shifted.ShiftedMask`), so the local engine skips
what the mask leaves empty. Backward needs each pair's probabilities normalized by the
*global* logsumexp, which attnlab's engines do not take as an input (their ``lse`` is an
output only). :func:`backward_pair` gets it three ways: the blocked engine's compiled
kernel takes the global logsumexp and output as inputs and recomputes the pair's scores
as its forward made them (:func:`_kernel_step`, float32 and half on the CPU; its forward
hands the merge its logsumexp unrounded); torch's fused CPU flash backward takes them too,
for the pairs whose forward ran torch's flash kernel (:func:`_flash_step`); and the
blocked engine computes it given one extra "sink" key and one extra value column
(:func:`_engine_step`, in float64 both ways) everywhere else, which also carries gradients
of learnable biases.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from attnlab.bias import Bias
from attnlab.distributed.layout import Piece
from attnlab.distributed.merge import Own
from attnlab.distributed.setup import Setup
from attnlab.distributed.shifted import ShiftedBias, ShiftedMask
from attnlab.engines import get_engine
from attnlab.engines._leaves import holding
from attnlab.engines.blocked import BlockedEngine
from attnlab.functional import AttentionOutput, _request, attention, unsupported_by
from attnlab.masks import Mask

__all__ = ["Keys", "Rows", "backward_pair", "forward_pair", "kernel_rows", "local_engine"]

ROWS = 128  # query rows per backward call where the mask is not one interval per pair


def forward_pair(
    s: Setup, q: Tensor, qp: Piece, k: Tensor, v: Tensor, kp: Piece
) -> tuple[Tensor, Tensor]:
    """``(out (B, Hq, Tq, Ev), lse (B, Hq, Tq))`` of queries ``qp`` over keys ``kp``.

    On the CPU, half precision runs in float32 here (the engines compute in it anyway), so
    each pair's output reaches the merge unrounded: rounded to bfloat16 pair by pair, the
    merged output and the gradients from it carried up to 3x one process's error. A pair
    whose backward takes the sink path (:func:`_engine_step`) runs in its dtype, float64
    (:func:`sink_dtype`), both ways."""
    if s.cpu and q.dtype in (torch.bfloat16, torch.float16):
        q, k, v = (t.float() for t in (q, k, v))
    causal = _torch_pair(s, qp, kp, q, v)
    if causal is not None:  # torch's flash kernel, forward here and backward in backward_pair
        hq, hkv = q.shape[1], k.shape[1]
        k, v = (t.repeat_interleave(hq // hkv, 1) if hq != hkv else t for t in (k, v))
        out, lse = _FLASH_FWD(q, k, v, 0.0, causal, scale=s.scale)
        return out, lse
    mask, bias = restricted(s, qp, kp)
    engine = local_engine(s, q, k, v, mask, bias)
    if engine == "blocked":  # the kernel's own logsumexp, unrounded (see forward_given)
        req = _request(q, k, v, mask, bias, s.scale, "dot", "softmax", 0.0, False, True)
        given = _blocked().forward_given(req)
        if given is not None:
            return given
    # the backward's sink path recomputes this pair in float64: the forward's output and
    # logsumexp must hold the probabilities it makes (see _engine_step)
    q, k, v = (t.to(sink_dtype(s, t.dtype)) for t in (q, k, v))
    engine = local_engine(s, q, k, v, mask, bias)
    r = attention(q, k, v, mask=mask, bias=bias, scale=s.scale, engine=engine, return_lse=True)
    assert isinstance(r, AttentionOutput) and r.lse is not None
    return r.out, r.lse


@dataclass(frozen=True)
class Rows:
    """What a backward step reads of some query rows (accumulation dtype), and their dq."""

    q: Tensor  # (B, Hq, T, E)
    dout: Tensor  # (B, Hq, T, Ev)
    out: Tensor  # (B, Hq, T, Ev), the merged output
    lse: Tensor  # (B, Hq, T), the global logsumexp
    dq: Tensor  # (B, Hq, T, E), accumulated in place
    first: int  # the global position of row 0
    own: Own | None = None  # each row's heaviest key piece (see kernel_rows)


@dataclass(frozen=True)
class Keys:
    """One piece of keys and values and their gradient accumulators."""

    k: Tensor  # (B, Hkv, Ks, E)
    v: Tensor  # (B, Hkv, Ks, Ev)
    dk: Tensor  # like k, accumulated in place
    dv: Tensor  # like v, accumulated in place
    first: int  # the global position of key 0


def backward_pair(
    s: Setup, rw: Rows, kw: Keys, lse: Tensor, leaves: list[Tensor], dleaves: list[Tensor]
) -> None:
    """Add the rows' share of dq, dk, dv (and of bias gradients) over the keys.

    ``lse (B, Hq, T)`` is the pair's own logsumexp from the forward pass. A pair whose
    forward ran torch's flash kernel (:func:`_torch_pair`) runs its backward. Where the
    blocked kernel can run the pair (float32 or half on the CPU, a mask it plans, no
    learnable bias): its backward, given the global output and logsumexp
    (:func:`_kernel_step`). Otherwise the engine with a sink key (:func:`_engine_step`):
    one call when the mask stays an exact interval, else one per chunk of rows.
    """
    lq, lk = rw.q.shape[2], kw.k.shape[2]
    whole = ((rw.first, rw.first + lq), (kw.first, kw.first + lk))
    causal = None if leaves else _torch_pair(s, *whole, rw.q, kw.v)
    if causal is not None:  # its forward ran torch's flash kernel too
        _flash_step(s, rw, kw, causal=causal)
        return
    if not leaves and _kernel_step(s, rw, kw, (0, lq), (0, lk)):
        return  # the whole pair in one call: the kernel skips what the mask leaves empty
    # else the engine with a sink key (torch's flash backward here, against the blocked
    # engine's forward, put 3-7x plain PyTorch's float32 error into dV: an ALiBi pair)
    if _sink_mask(s, *whole) is None or _sink_exact(s, *whole):
        _engine_step(s, rw, kw, (0, lq), (0, lk), lse, leaves, dleaves)
        return
    for r0 in range(0, lq, ROWS):
        r1 = min(r0 + ROWS, lq)
        span = s.span((rw.first + r0, rw.first + r1), whole[1])
        if span is not None:
            _engine_step(s, rw, kw, (r0, r1), span, lse, leaves, dleaves)


# torch's fused CPU flash backward takes the logsumexp and output as inputs, so given the
# global ones it computes exactly this pair's share of the global gradient (a private op:
# guarded, with the engine path above as the fallback)
_FLASH_BWD: Any = getattr(
    torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None
)


_FLASH_FWD: Any = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


# head sizes where torch's CPU flash backward recomputes the scores as its forward made
# them (torch 2.13, measured: float32 gradients within 1.5x plain PyTorch's error with large
# scores); at 32, 40, 48, 80, 96 and 128 it missed by rounding, 4-9x in dV
TORCH_PAIR_HEAD_SIZES = (16, 64)


def _torch_pair(s: Setup, rows: Piece, keys: Piece, q: Tensor, v: Tensor) -> bool | None:
    """Whether a pair runs on torch's flash kernel, forward and backward: a full pair
    (False) or a causal one on the diagonal (True) of float32 on the CPU without a bias,
    at a head size of :data:`TORCH_PAIR_HEAD_SIZES`, where that kernel is at the roofline;
    None: the blocked engine. Both passes must be one kernel's: each recomputes the scores
    its own way, and the other's probabilities then miss the global logsumexp by rounding
    (3-8.5x plain PyTorch's float32 error in dQ, dK and dV with large scores)."""
    if not _torch_ok(s, q.dtype, q.shape[-1], v.shape[-1]) or not q.shape[2]:
        return None
    if s.full(rows, keys):
        return False
    return True if _diagonal(s, rows, keys) else None


def _torch_ok(s: Setup, dtype: torch.dtype, e: int, ev: int) -> bool:
    """Whether full pairs and causal ones on the diagonal run torch's flash kernel
    (:func:`_torch_pair`), given the pairs' dtype and head sizes."""
    if s.engine != "auto" or _FLASH_FWD is None or _FLASH_BWD is None or not s.cpu:
        return False  # a named step engine runs every pair's forward
    if s.bias is not None or s.scale < 0:  # (its causal form gave NaN at a negative scale)
        return False
    return dtype == torch.float32 and e == ev and e in TORCH_PAIR_HEAD_SIZES


def _diagonal(s: Setup, rows: Piece, keys: Piece) -> bool:
    """Whether the pair is a square block on the diagonal of a causal mask."""
    return rows == keys and s.mask is not None and s.mask.is_causal


def _flash_step(s: Setup, rw: Rows, kw: Keys, causal: bool) -> None:
    """A whole pair through torch's flash backward, given the global output and
    logsumexp: a full pair or a causal one on the diagonal, without a bias
    (:func:`_torch_pair`), so no mask or bias tile."""
    bsz, hq, hkv = s.sizes[:3]
    k, v = (t.repeat_interleave(hq // hkv, 1) if hq != hkv else t for t in (kw.k, kw.v))
    lse = torch.where(torch.isfinite(rw.lse), rw.lse, 0.0)  # (B, Hq, T), float64; P = 0
    rounded = lse.to(rw.q.dtype)
    # the kernel's P is off from the global logsumexp's by its rounding, c per row; dout
    # (and the delta made from it) takes c instead: dS and dV are linear in both
    c = torch.exp(rounded.double() - lse.double()).to(rw.dout.dtype).unsqueeze(-1)
    dq, dk, dv = _FLASH_BWD(
        (rw.dout * c).contiguous(),
        rw.q,
        k,
        v,
        rw.out.contiguous(),
        rounded.contiguous(),
        0.0,
        causal,
        scale=s.scale,
    )
    rw.dq.add_(dq)  # in place: the accumulators' views (the dataclasses are frozen)
    if hq != hkv:  # sum over the query heads that share a key/value head
        dk, dv = (t.view(bsz, hkv, hq // hkv, *t.shape[2:]).sum(2) for t in (dk, dv))
    kw.dk.add_(dk)
    kw.dv.add_(dv)


def _kernel_step(s: Setup, rw: Rows, kw: Keys, rr: Piece, kk: Piece) -> bool:
    """Rows ``rr`` over keys ``kk`` through the blocked kernel's backward, given the global
    output and logsumexp; False where the kernel cannot run the pair. The kernel made the
    pair's scores in the forward and makes them again bit for bit; torch's flash backward
    makes them its own way, and its probabilities then miss the global logsumexp by
    rounding: fp32 dQ, dK and dV came out 3-8.5x plain PyTorch's error with large scores.
    The rows whose heaviest key piece this is (``rw.own``) make their delta of the
    kernel's own probabilities (see :mod:`~attnlab.distributed.merge`)."""
    if s.engine not in ("auto", "blocked"):
        return False  # the pair's forward ran another engine
    (r0, r1), (a, b) = rr, kk
    mask, bias = restricted(s, (rw.first + r0, rw.first + r1), (kw.first + a, kw.first + b))
    q, k, v = rw.q[:, :, r0:r1], kw.k[:, :, a:b], kw.v[:, :, a:b]
    req = _request(q, k, v, mask, bias, s.scale, "dot", "softmax", 0.0, False, False)
    lse, dout = rw.lse[:, :, r0:r1], rw.dout[:, :, r0:r1]
    own = None if rw.own is None else rw.own.rows(r0, r1).of(kw.first + a, dout)
    grads = _blocked().backward_given(req, dout, rw.out[:, :, r0:r1], lse, own)
    if grads is None:
        return False
    rw.dq[:, :, r0:r1] += grads[0]
    kw.dk[:, :, a:b] += grads[1]
    kw.dv[:, :, a:b] += grads[2]
    return True


def kernel_rows(s: Setup, q: Tensor, v: Tensor) -> bool:
    """Whether some pairs of ``q`` (this rank's queries) may take the blocked kernel's
    backward (:func:`_kernel_step`: on the CPU, in float32 or half), so that the forward
    keeps each row's heaviest key piece apart (:class:`~attnlab.distributed.merge.Own`).
    Not where every pair runs torch's flash kernel (no mask or a causal one): there the
    merge stays as cheap as it was."""
    if not s.cpu or s.engine not in ("auto", "blocked") or q.dtype == torch.float64:
        return False
    flash = _torch_ok(s, torch.float32, q.shape[-1], v.shape[-1])  # half runs in float32
    return not (flash and (s.mask is None or s.mask.is_causal))


def _blocked() -> BlockedEngine:
    engine = get_engine("blocked")
    assert isinstance(engine, BlockedEngine)
    return engine


def restricted(
    s: Setup, rows: Piece, keys: Piece, sink: bool = False
) -> tuple[ShiftedMask | None, ShiftedBias | None]:
    """The global mask and bias on global ``rows`` x ``keys`` (None where nothing is left:
    no bias, or a mask that allows every pair), with a leading sink key if asked."""
    lq, lk = rows[1] - rows[0], keys[1] - keys[0] + int(sink)
    mask = bias = None
    if s.mask is not None and not s.full(rows, keys):
        mask = ShiftedMask(
            s.mask, n=s.n, qs=rows[0], ks=keys[0], lq=lq, lk=lk, sink=sink, bounds=s.bounds
        )
    if s.bias is not None:
        bias = ShiftedBias(s.bias, n=s.n, qs=rows[0], ks=keys[0], lq=lq, lk=lk, sink=sink)
    return mask, bias


def _sink_mask(s: Setup, rows: Piece, keys: Piece) -> ShiftedMask | None:
    return restricted(s, rows, keys, sink=True)[0]


def _sink_exact(s: Setup, rows: Piece, keys: Piece) -> bool:
    m = _sink_mask(s, rows, keys)
    bm = s.bounds.lo.shape[0] if s.bounds is not None else 1
    b = None if m is None else m.row_bounds(rows[1] - rows[0], keys[1] - keys[0] + 1, bm)
    return b is not None and b.exact


def _engine_step(
    s: Setup,
    rw: Rows,
    kw: Keys,
    rr: Piece,
    kk: Piece,
    pair_lse: Tensor,
    leaves: list[Tensor],
    dleaves: list[Tensor],
) -> None:
    """Rows ``rr`` over keys ``kk`` (local ranges) through an engine's backward.

    The engine sees one extra *sink* key that holds the probability mass of every other
    key of the sequence (score ``log(exp(LSE) - exp(lse))``, carried by an extra query
    dimension), so its softmax over this step's keys is the global one; an extra value
    column that is 1 on the sink lets the upstream gradient set the engine's
    ``rowsum(dout * out)`` to the global output's. The engine's gradients are then exactly
    this step's share of the global ones.

    The step runs in :func:`sink_dtype`, float64, as the pair's forward did: the sink's
    score ``beta``, the engine's scores and probabilities and its backward. In float32
    (the pair's logsumexp and ``beta`` rounded to it, the forward's scores made by another
    kernel) ALiBi pairs gave dQ 3.2x and dK 5.8x plain PyTorch's float32 error (B=2,
    Hq=4, Hkv=2, E=16, N=60, queries and keys of standard deviation 3, P=2).
    """
    (r0, r1), (a, b) = rr, kk
    wide = sink_dtype(s, rw.q.dtype)
    pl, lse = pair_lse[:, :, r0:r1].double(), rw.lse[:, :, r0:r1].double()
    w = torch.where(torch.isfinite(pl) & torch.isfinite(lse), torch.exp(pl - lse), 0.0)
    beta = torch.where(torch.isfinite(lse), lse + torch.log1p(-w.clamp(max=1.0)), 0.0)
    beta = torch.where(torch.isfinite(beta), beta, lse - 1e4)  # this step holds all mass
    sink = (beta / s.scale).to(wide).unsqueeze(-1)  # the sink's score, carried by q
    qx = torch.cat([rw.q[:, :, r0:r1].to(wide), sink], -1).requires_grad_()  # (B,Hq,T,E+1)
    kx, vx = (_with_sink(t[:, :, a:b].to(wide)).requires_grad_() for t in (kw.k, kw.v))
    rows, keys = (rw.first + r0, rw.first + r1), (kw.first + a, kw.first + b)
    mask, bias = restricted(s, rows, keys, sink=True)
    # the bias's tensors in the step's dtype too: a bfloat16 T5 table summed its gradient
    # over the pair's positions in bfloat16 (2.4x plain PyTorch's error, summed over pairs)
    wide_leaves = [t.detach().to(wide).requires_grad_() for t in leaves]
    with torch.enable_grad(), holding(s.bias, wide_leaves):
        out = attention(
            qx,
            kx,
            vx,
            mask=mask,
            bias=bias,
            scale=s.scale,
            engine=local_engine(s, qx, kx, vx, mask, bias),
        )
    assert isinstance(out, Tensor)
    do, ov = rw.dout[:, :, r0:r1].to(wide), out[..., :-1].detach()
    p_sink = out[..., -1].detach()
    num = (do * (rw.out[:, :, r0:r1].to(wide) - ov)).sum(-1)  # dout . (global out - step's)
    c = torch.where(p_sink > 1e-30, num / p_sink.clamp(min=1e-30), 0.0)
    upstream = torch.cat([do, c.unsqueeze(-1)], -1)
    grads = torch.autograd.grad(out, [qx, kx, vx, *wide_leaves], upstream, allow_unused=True)
    rw.dq[:, :, r0:r1] += grads[0][..., :-1]
    kw.dk[:, :, a:b] += grads[1][:, :, 1:, :-1]
    kw.dv[:, :, a:b] += grads[2][:, :, 1:, :-1]
    for acc, g in zip(dleaves, grads[3:], strict=True):
        if g is not None:
            acc += g


def sink_dtype(s: Setup, dtype: torch.dtype) -> torch.dtype:
    """The dtype of a pair on the sink path, forward and backward: float64 on the CPU
    whatever the inputs' (the path is taken there only by the pairs neither the compiled
    kernel nor torch's flash kernel runs), except under ``engine="flex"``, which runs
    float32 and half only; the inputs' own off the CPU, where every pair takes the path
    and float64 would be slow on most GPUs."""
    return dtype if s.engine == "flex" or not s.cpu else torch.float64


def _with_sink(t: Tensor) -> Tensor:
    """``(B, H, K, D) -> (B, H, 1 + K, D + 1)``: a first row ``[0, .., 0, 1]``, then
    ``t`` with a zero column."""
    x = torch.nn.functional.pad(t, (0, 1, 1, 0))
    x[:, :, 0, -1] = 1.0
    return x


def local_engine(
    s: Setup, q: Tensor, k: Tensor, v: Tensor, mask: Mask | None, bias: Bias | None
) -> str:
    """The engine of a local step (a ring pair, or Ulysses' head group on the CPU): the
    blocked one for ``auto`` where it can. ``auto`` alone would take SDPA for dense and
    causal calls, which has no logsumexp, and whose CPU flash backward at head size 32
    gave dV 5-12x plain PyTorch's float32 error (queries and keys of standard deviation 3)."""
    if s.engine == "auto" and unsupported_by("blocked", q, k, v, mask=mask, bias=bias) is None:
        return "blocked"
    return s.engine
