"""The blocked engine's decoding steps: which calls its compiled ``decode`` op serves (a few
query rows per key/value head against a long cache, float32, bfloat16 or float16, no
autograd), and which of the half-precision ones ``auto`` gives it.

The kernel reads half-precision keys and values a chunk at a time into float32 (no copy
of the cache) and sums in float32, as torch's SDPA does; its output is in q's dtype.

Example:
    >>> q, k = torch.randn(1, 8, 1, 64).bfloat16(), torch.randn(1, 2, 100, 64).bfloat16()
    >>> decodes(q, k, k, masked=False), kernel_wins(q, k, None)
    (True, True)
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from attnlab._cpu import cpu_info
from attnlab._eager import forward_mode, vmapping
from attnlab.engines import blocked_autograd
from attnlab.engines._native import ops
from attnlab.engines.base import AttentionRequest
from attnlab.engines.blocked_autograd import kernel
from attnlab.masks import Mask, RowBounds

__all__ = ["DECODE_ROWS", "decode_op", "decodes", "exact_bounds", "kernel_wins", "plain_request"]

#: the most query rows per key/value head (``Hq / Hkv * Lq``) of a decoding call
DECODE_ROWS = 8

_F32 = torch.float32
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def decodes(q: Tensor, k: Tensor, v: Tensor, *, masked: bool) -> bool:
    """Whether the compiled decoding kernel serves ``q, k, v``: float32, bfloat16 or float16
    (one dtype; half precision only where the kernel is built) on the CPU without
    autograd, at most :data:`DECODE_ROWS` query rows per key/value head, 16 keys or more,
    the last dimensions contiguous; in float32 without a mask only where query heads share
    key/value heads (one query head per key/value head: SDPA is as fast in float32).

    Example:
        >>> q, k = torch.randn(1, 8, 1, 64), torch.randn(1, 2, 100, 64)
        >>> decodes(q, k, k, masked=False), decodes(q[:, :2], k, k, masked=False)
        (True, False)
    """
    # the cheapest checks first: this runs on every decoding step, mostly out of cache
    qs, ks = q.shape, k.shape
    group = qs[1] // ks[1]
    if ks[2] < 16 or group * qs[2] > DECODE_ROWS:
        return False
    if group == 1 and not masked and q.dtype is _F32:  # (SDPA's half precision is slower)
        return False
    if not qs[0] or not qs[2]:  # empty: the kernel divided by 0 heads (SIGFPE)
        return False
    dtype = q.dtype
    if k.dtype is not dtype or v.dtype is not dtype or not q.is_cpu:
        return False
    if dtype is not _F32 and dtype not in _DTYPES:
        return False
    if k.stride(-1) != 1 or v.stride(-1) != 1:
        return False
    grads = (q.requires_grad or k.requires_grad or v.requires_grad) and torch.is_grad_enabled()
    if grads or vmapping() or forward_mode(q, k, v):  # vmap: no batching rule (torch looped)
        return False
    return blocked_autograd.USE_KERNEL and (bool(_DECODE) or kernel() is not None)


def kernel_wins(q: Tensor, k: Tensor, bounds: RowBounds | None) -> bool:
    """Whether ``auto`` gives a decoding step (:func:`decodes`) of ``q`` against keys ``k``
    under a mask's row ``bounds`` (None: no mask) to the kernel: every one but, in
    bfloat16, more than four rows of one query head per key/value head whose widest
    interval holds more than half the keys (a tie with SDPA's bfloat16 kernel: 0.95-1.05x
    at 8 rows over 256-32768 keys on AVX512, 0.84-1.0x on AVX2; 4 rows 0.82-0.91x).

    Timed against SDPA (``benchmarks/bench_auto.py``; AMD EPYC, AVX512 and AVX2 forced, 2
    threads, E = 64): 8 and 32 query heads on 2 and 8, one or two rows, 256-32768 keys,
    no mask or causal, 0.1-0.65x in bfloat16 and 0.02-0.2x in float16 (SDPA's float16 is
    slow on the CPU); one query head per key/value head, causal, 1-2 rows 0.2-0.8x.

    On a CPU with AMX tiles, where SDPA runs bfloat16 on them, the same holds from one row:
    one row of 8 heads on 8 took the kernel 1.4-2.0x SDPA's time at 256-16384 keys (2
    threads; 2.0-2.6x at one thread), 4 rows 1.1x, 2 rows 0.93x; under a window of at most
    half the keys the kernel was 1.2-3.2x faster (Intel Xeon, 2026-12-05). Grouped heads
    stay with the kernel there (0.89-1.03x at 256-4096 keys, 0.79x at 16384, 2 threads).

    Example:
        >>> q, k = torch.randn(1, 8, 8, 64).bfloat16(), torch.randn(1, 8, 512, 64).bfloat16()
        >>> kernel_wins(q, k, None), kernel_wins(q[:, :, :4], k, None) != cpu_info().amx
        (False, True)
    """
    if q.dtype is not torch.bfloat16 or q.shape[1] != k.shape[1]:
        return True
    if q.shape[2] <= 4 and not cpu_info().amx:
        return True
    if bounds is None:
        return False
    lk = k.shape[2]
    widest = int((bounds.hi.clamp(max=lk - 1) - bounds.lo.clamp(min=0)).max()) + 1
    return 2 * widest <= lk


def decode_op() -> Any:
    """The kernel's ``decode`` overload, looked up once (callers have checked the kernel)."""
    if not _DECODE:
        _DECODE.append(ops().decode.default)
    return _DECODE[0]


_DECODE: list[Any] = []


def exact_bounds(mask: Mask, req: AttentionRequest) -> RowBounds | None:
    """``mask``'s row bounds ``(1 or B, Lq)`` as int64 where it allows exactly one key
    interval per row, the same for every head; else None."""
    if mask.per_head:
        return None
    bounds = mask.row_bounds(req.lq, req.lk, req.batch if mask.per_batch else 1, "cpu")
    if bounds is None or not bounds.exact:
        return None
    if bounds.lo.dtype != torch.long or bounds.hi.dtype != torch.long:
        bounds = RowBounds(bounds.lo.long(), bounds.hi.long(), exact=True)
    return bounds


def plain_request(req: AttentionRequest, *, named: bool = False) -> bool:
    """Whether ``req`` asks the decoding kernel's computation of its q, k, v (mask aside;
    soft-capping and sinks without a gradient included); ``named``: also a maskless call
    without grouped heads, which ``auto`` leaves to SDPA but the kernel computes as well."""
    if req.score != "dot" or req.normalize != "softmax" or req.bias is not None:
        return False
    if req.dropout_p or req.return_weights or req.return_lse:
        return False
    if req.sinks is not None and req.sinks.requires_grad and torch.is_grad_enabled():
        return False
    extra = req.softcap is not None or req.sinks is not None  # SDPA has neither
    return decodes(req.q, req.k, req.v, masked=named or req.mask is not None or extra)
