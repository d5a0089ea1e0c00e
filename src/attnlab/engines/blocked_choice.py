"""When ``engine="auto"`` gives a call to the blocked engine (:meth:`BlockedEngine.prefers`).

The rules come from timing the blocked engine against the engine ``auto`` would pick
instead, in the same runs, on the CPU with its compiled kernel (``benchmarks/bench_auto.py``
prints those timings; ``README`` has the table):

* A call SDPA cannot compute (soft-capping, sinks, ``return_lse``, weights, cosine
  scores) goes to the reference engine otherwise, whose dense ``Lq x Lk`` scores lose
  from about 128 x 128 on in float32 (256 x 256 in half precision); weights only where
  the compiled forward writes them beside the output (an interval mask, no bias, float32),
  else from ``2**20`` pairs, and without the kernel only by the mask rule below.
* An ALiBi-like bias (linear in distance): SDPA reads it as a dense ``Hq x Lq x Lk``
  tensor, the kernel computes it in its tiles. Float32 from ``2**17`` (query, key) pairs.
* A few query rows against a long cache under an interval mask (a window, documents)
  whose tiles leave at most a quarter of the keys: the kernel reads (and in half
  precision converts) only those keys; in bfloat16 from 4096 keys (SDPA's fast kernel),
  one row in half precision from 1024 keys.
* Half precision with a gradient under an interval mask from ``2**16`` pairs (SDPA's
  half-precision backward on the CPU).
* float16 from ``2**18`` pairs on a CPU without float16 matrix products, any mask
  (:func:`_slow_half`), and plain causal calls without a gradient where the CPU makes
  SDPA's causal forward the slower one (:func:`_causal_forward`).
* Otherwise from ``2**18`` pairs, where the mask leaves at most 60% of the tiles (80%
  with an ALiBi-like bias, or from ``2**20`` pairs with any bias and no gradient); never
  for dense calls (SDPA's flash kernel is level with the kernel), but plain causal ones
  with a gradient (SDPA's causal backward is slower, with grouped heads or not; in
  bfloat16 on AMX only below ``2**20`` pairs: :func:`_causal_backward`). With the
  kernel and no bias, an interval mask (padding, a prefix, a two-sided window) whose
  batch items each leave less than 95% of their tiles on average (60% in bfloat16 on
  AMX: :func:`_item_limit`): SDPA's dense mask costs 1.3-2.4x (AVX512; 1.0-1.9x on AVX2)
  from padding to 90% to a two-sided window.

On a GPU the blocked engine runs eager torch: it takes only long calls SDPA cannot serve.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor

from attnlab._cpu import cpu_info
from attnlab.engines._far import far_scores
from attnlab.engines.base import AttentionRequest
from attnlab.engines.blocked_autograd import bias_leaves, kernel_ok
from attnlab.engines.blocked_plan import Plan

__all__ = ["LONG", "prefers", "slow_half"]

LONG = 1 << 18  # (query, key) pairs from which a masked call pays for its plan anywhere


class _Planner(Protocol):  # the blocked engine, as these rules see it
    block: int

    def plan(self, req: AttentionRequest) -> Plan: ...
    def intervals(self, req: AttentionRequest) -> bool: ...


def prefers(engine: _Planner, req: AttentionRequest) -> bool:
    """Whether ``auto`` should give ``req`` (not a decoding step) to the blocked engine.

    Example:
        >>> from dataclasses import replace
        >>> from attnlab import masks
        >>> from attnlab.engines import get_engine
        >>> q = torch.randn(1, 8, 256, 64)
        >>> req = AttentionRequest(q, q, q, masks.causal(), None, 0.125, "dot", "softmax",
        ...                        0.0, return_weights=False, return_lse=True)
        >>> blocked = get_engine("blocked")
        >>> prefers(blocked, req), prefers(blocked, replace(req, return_lse=False))
        (True, False)
    """
    pairs = req.lq * req.lk
    if pairs < 1 << 12 and not (_one_half_row(req) and req.lk >= 1 << 10):
        return False
    on_kernel = req.q.is_cpu and _kernel_rule(engine, req, pairs)  # then ask for the kernel
    if on_kernel and kernel_ok(req, bias_leaves(req.bias)):  # (a first call builds it)
        return True
    return _eager_rule(engine, req, pairs)


def _kernel_rule(engine: _Planner, req: AttentionRequest, pairs: int) -> bool:
    """The rule where the compiled kernel runs ``req`` on the CPU."""
    if _sdpa_lacks(req) or _sdpa_far(engine, req, pairs):
        return pairs >= _versus_reference(engine, req)
    linear = req.bias is not None and req.bias.linear_distance_slopes() is not None
    f32 = req.q.dtype == torch.float32
    if linear and pairs >= (1 << 17 if f32 else 1 << 20):
        return True  # (B, Hq, Lq, Lk) bias tensor for SDPA: 1.6-7.7x (f32), 1.7-5.7x (bf16)
    if pairs < LONG:
        return _few_rows(engine, req, linear) or _half_backward(engine, req, pairs)
    if _slow_half(req):
        return True
    if req.mask is None:
        return False  # SDPA's flash kernel is at the roofline for dense calls
    if req.mask.is_causal and req.bias is None:
        return _causal_backward(req, pairs) if req.needs_grad else _causal_forward(req, pairs)
    if linear:
        return _fraction(engine, req) < 0.8
    if req.bias is not None or not engine.intervals(req):
        return False
    return _item_fraction(engine, req) < _item_limit(req)


def _eager_rule(engine: _Planner, req: AttentionRequest, pairs: int) -> bool:
    """The rule wherever the blocked engine runs (the compiled kernel or not): long calls
    that SDPA cannot serve, and on the CPU long ones whose mask leaves most tiles empty."""
    if pairs < LONG:
        return False
    sdpa_cannot = req.softcap is not None or req.sinks is not None or req.score != "dot"
    if (sdpa_cannot or req.return_lse) and not req.return_weights:
        return True  # SDPA cannot: the reference engine's dense scores are the rest (cosine
        # scores went there: 1.8x the time of blocked at 2048 x 2048 in float64). Weights
        # only by the kernel's rule or the mask's below: blocked recomputes them per block,
        # 0.7-2.2x reference's time at 512 x 512 (slower in 22 of 24), float64 0.6-2.1x
        # to 2048 x 2048 (slower in 9 of 12)
    if not req.q.is_cpu:  # blocks in eager torch: 8-38x slower than SDPA on an H200
        return False
    if req.mask is None or (req.mask.is_causal and req.bias is None):
        return False
    if req.bias is not None and not req.needs_grad and pairs >= 1 << 20:
        return _fraction(engine, req) < 0.8  # per-tile bias vs a dense one: 1.4-2.6x
    return _fraction(engine, req) < 0.6


def _sdpa_lacks(req: AttentionRequest) -> bool:
    """Whether SDPA declines ``req`` for what it computes (the reference engine is next)."""
    extra = req.softcap is not None or req.sinks is not None or req.score != "dot"
    return extra or req.return_lse or req.return_weights


def _sdpa_far(engine: _Planner, req: AttentionRequest, pairs: int) -> bool:
    """A call with gradients whose scores SDPA declines as too large (:func:`far_scores`),
    long enough for the kernel to beat the reference engine, which ``auto`` tries next."""
    if not req.needs_grad or pairs < _versus_reference(engine, req):
        return False
    return far_scores(req, "") is not None


def _versus_reference(engine: _Planner, req: AttentionRequest) -> int:
    """The pairs from which the blocked engine beats the reference engine on ``req``."""
    if req.return_weights:  # recomputed per block unless the forward writes them
        fused = req.bias is None and req.q.dtype == torch.float32
        if fused and req.mask is not None and engine.intervals(req):
            return 1 << 14
        return 1 << 20
    return 1 << 14 if req.q.dtype == torch.float32 else 1 << 16


def _slow_half(req: AttentionRequest) -> bool:
    """float16 where oneDNN has no float16 products (AVX512-FP16, AMX-FP16), so SDPA
    computes it slowly, unless a bias comes with a gradient (the kernel takes ALiBi's by
    the linear-bias rule; a bias tensor with a gradient was not measured): SDPA took
    1.5-3.7x the kernel's time forward (dense, causal, 512-4096 tokens, AVX512; 1.2-3.1x
    AVX2 forced), 8.2-8.8x dense forward and backward, 1.3-6.8x forward and 12-29x
    forward and backward under a padding, prefix, documents or ALiBi (1024 tokens); with
    T5's table and a gradient 0.86x (one thread, AMD EPYC, 2026-12-05)."""
    return slow_half(req.q) and (req.bias is None or not req.needs_grad)


def slow_half(q: Tensor) -> bool:
    """``q`` is float16 on a CPU whose oneDNN has no float16 products (:func:`_slow_half`;
    the sdpa engine passes plain calls of at least ``LONG`` pairs on to the request)."""
    return q.dtype == torch.float16 and q.is_cpu and not cpu_info().onednn_fp16


def _causal_backward(req: AttentionRequest, pairs: int) -> bool:
    """Plain causal attention with a gradient: SDPA's causal backward took, forward and
    backward, 1.3-2.0x the kernel's time (AVX512, AMD EPYC), 1.1-1.8x with AVX2 forced, and
    1.1-1.5x in float32 and float16 on an Intel Xeon with AMX (512-2048). In bfloat16 on
    AMX, SDPA's matrix units win from 1024 x 1024 (0.89x / 0.97x the kernel's time at 1024
    on 8 / 2 key/value heads, 0.60x at 2048; 1.45x and 1.20x at 256 and 512); one thread."""
    return not (req.q.dtype == torch.bfloat16 and cpu_info().amx and pairs >= 1 << 20)


def _causal_forward(req: AttentionRequest, pairs: int) -> bool:
    """Plain causal attention without a gradient: SDPA's causal forward took 1.2-1.5x the
    kernel's time in float32 and bfloat16 (512-8192 tokens, 8 or 32 query heads on 8 or 2,
    E 64 and 128; AVX512, one thread, AMD EPYC), 1.2-1.5x in float32 and 1.2-1.6x in
    float16 on an Intel Xeon with AVX512-FP16 (512-4096); with AVX2 1.05-1.2x up to 2048
    tokens and 0.94-1.0x from 4096 (float16 there: 0.6-0.8x from 1024, SDPA's oneDNN
    products keep AVX512-FP16). In bfloat16 on AMX, torch's SDPA runs on the matrix units
    (1.7x faster than the kernel on that Xeon); float16 on AMX-FP16 is left to SDPA too
    (not measured)."""
    info, dtype = cpu_info(), req.q.dtype
    if dtype == torch.float16:
        return info.capability == "AVX512" and not info.amx_fp16
    if dtype == torch.bfloat16 and info.amx:
        return False
    if dtype != torch.float32 and dtype != torch.bfloat16:
        return False
    return info.capability == "AVX512" or pairs <= 1 << 22


def _few_rows(engine: _Planner, req: AttentionRequest, linear: bool) -> bool:
    """A call of a few rows over enough key tiles (:func:`_few_rows_tiles`) whose interval
    mask leaves at most a quarter of them: the kernel reads only those keys, SDPA every key
    (and in half precision the kernel converts only the keys it reads)."""
    tiles = _few_rows_tiles(req)
    if req.mask is None or tiles is None or req.lk < tiles * engine.block:
        return False
    if req.bias is not None and not linear:
        return False
    return engine.intervals(req) and _fraction(engine, req) <= 0.25


def _half_backward(engine: _Planner, req: AttentionRequest, pairs: int) -> bool:
    """Half precision with a gradient under an interval mask, no bias, from ``2**16``
    pairs: SDPA took 1.5-3.0x the kernel's time forward and backward in bfloat16 at
    256 x 256 (causal, documents, a window; AVX512 and AVX2), 9.6x in float16."""
    half = req.q.dtype in (torch.bfloat16, torch.float16)
    if not half or not req.needs_grad or pairs < 1 << 16 or req.bias is not None:
        return False
    return engine.intervals(req)


def _few_rows_tiles(req: AttentionRequest) -> int | None:
    """The key tiles from which a few rows pay for the plan: four in float32 (2-10x SDPA)
    and float16 (1.2-390x: SDPA's float16 is slow on the CPU), 32 in bfloat16, where SDPA
    has a fast kernel (2 rows: 0.4-1.3x at 512-2048 keys, 1.7-3.4x at 4096; one row from
    4096 keys: 7-390x), but eight for one row (:func:`_one_half_row`); None for float64,
    which the kernel does not compute."""
    if req.q.dtype == torch.bfloat16:
        return 8 if _one_half_row(req) else 32
    return 4 if req.q.dtype in (torch.float32, torch.float16) else None


def _one_half_row(req: AttentionRequest) -> bool:
    """One query row in half precision, where SDPA is slow on the CPU: under a causal
    window of 64, 8 query heads, 1024-2048 keys, 1.0-1.4x the kernel's time in bfloat16
    and 2.0-4.3x in float16 (AVX512 and AVX2)."""
    return req.lq == 1 and req.q.dtype in (torch.bfloat16, torch.float16)


def _fraction(engine: _Planner, req: AttentionRequest) -> float:
    """The fraction of ``req``'s tiles the plan computes."""
    return engine.plan(req).computed_fraction


def _item_limit(req: AttentionRequest) -> float:
    """The :func:`_item_fraction` below which the kernel takes a long interval mask: 0.95,
    but 0.6 in bfloat16 on AMX, where SDPA runs on the matrix units (Intel Xeon, 1024-2048
    tokens, 8 heads, one thread; SDPA's time over the kernel's forward: 0.59-0.72x at 0.75
    and 0.875, 0.89-1.15x at 0.5, 1.17-1.36x at 0.375, 1.29-1.77x at 0.25; forward and
    backward 0.76-0.95x at 0.75 and 0.875, 1.2-1.36x at 0.5). The rule for long calls
    without the kernel keeps 0.6 as well."""
    amx_bf16 = req.q.dtype == torch.bfloat16 and cpu_info().amx
    return 0.6 if amx_bf16 else 0.95


def _item_fraction(engine: _Planner, req: AttentionRequest) -> float:
    """The fraction of tiles the kernel computes, batch item by batch item: SDPA reads a
    non-causal mask as a dense tensor and slows down under it (padding to 90% of 2048
    keys: 1.25-1.3x the kernel's time on AVX512, even on AVX2), so an interval mask that
    leaves any tile empty in most items pays for the plan."""
    return engine.plan(req).item_fraction
