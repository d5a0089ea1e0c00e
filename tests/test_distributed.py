"""Context-parallel attention (``attnlab.distributed``) against single-process attention.

Every test spawns local gloo processes through ``run_local`` (with a timeout, so a hang
fails). Each process runs many cases and compares its output shard and gradient shards
with single-process ``attnlab.attention`` on the whole sequence (the reference engine,
fp64), so one spawn covers the whole matrix of masks, biases and layouts.
"""

from __future__ import annotations

import functools
import itertools
import os
import pathlib
import re
import subprocess
import sys
import time
from collections.abc import Callable

import pytest
import torch
import torch.distributed as dist
from torch import Tensor

import attnlab
import attnlab.distributed as D
from attnlab import bias as B
from attnlab import masks
from attnlab.distributed import steps
from attnlab.distributed.launch import run_local

N = 13  # not divisible by 2P for P = 2, 3, 4
Case = tuple[str, Callable[[int], masks.Mask | None], Callable[[int], B.Bias | None], int]


def _docs(n: int) -> Tensor:
    """Two rows of document ids: boundaries inside shards, and on the zigzag/contiguous
    chunk edges of P = 2 (4 | 8 | ...)."""
    a = torch.tensor([0] * 3 + [1] * 5 + [2] * (n - 8))
    b = torch.tensor([0] * 4 + [1] * 3 + [2] * (n - 7))
    return torch.stack([a, b])


CASES: list[Case] = [
    ("dense", lambda n: None, lambda n: None, 2),
    ("causal", lambda n: masks.causal(), lambda n: None, 2),
    ("window narrow", lambda n: masks.causal() & masks.window(2), lambda n: None, 2),
    ("window wide two-sided", lambda n: masks.window(6, 4), lambda n: None, 2),
    ("documents", lambda n: masks.documents(_docs(n)) & masks.causal(), lambda n: None, 2),
    ("prefix", lambda n: masks.prefix(5), lambda n: None, 2),
    ("alibi causal", lambda n: masks.causal(), lambda n: B.alibi(4), 2),
    ("alibi dense MHA", lambda n: None, lambda n: B.alibi(4), 4),
    (
        "padding, fully masked rows",
        lambda n: masks.padding([n - 2, n - 6], [n, n - 4]),
        lambda n: None,
        2,
    ),
    (
        "custom mask (no intervals)",
        lambda n: masks.custom(lambda b, h, q, k: (q - k) % 3 == 0) & masks.causal(),
        lambda n: None,
        1,
    ),
    (
        "per-head custom mask",
        lambda n: masks.custom(lambda b, h, q, k: (q - k + h) % 3 == 0) & masks.causal(),
        lambda n: None,
        2,
    ),
    ("learned relative bias", lambda n: masks.causal(), lambda n: _learned(), 2),
    ("learned bias, window", lambda n: masks.window(3, 1), lambda n: _learned(), 2),
]


def _learned() -> B.Bias:
    torch.manual_seed(3)
    rel = B.relative_buckets(4, num_buckets=8, max_distance=16)
    with torch.no_grad():
        for p in rel.parameters():
            p.normal_()
    return rel.double()


def _run_case(
    rank: int, world: int, case: Case, layout: str, dtype: torch.dtype, strategy: str = "ring"
) -> list[float]:
    """Max errors of (out, dq, dk, dv, bias grads) of one case against one process."""
    _, make_mask, make_bias, hkv = case
    torch.manual_seed(0)
    q = torch.randn(2, 4, N, 8, dtype=torch.float64)
    k, v = (
        torch.randn(2, hkv, N, 8, dtype=torch.float64),
        torch.randn(2, hkv, N, 8, dtype=torch.float64),
    )
    g = torch.randn(2, 4, N, 8, dtype=torch.float64)
    mask, bias = make_mask(N), make_bias(N)
    ref = _single(q, k, v, g, mask, bias, torch.float64)
    ours = _sharded(rank, world, q, k, v, g, mask, bias, (layout, strategy), dtype)
    if dtype == torch.float64:
        return [(a - b).abs().max().item() for a, b in zip(ours, ref, strict=True)]
    plain = _single(q, k, v, g, mask, bias, dtype)  # plain PyTorch in the same dtype
    return [
        (a - r).abs().max().item() - 2 * (p - r).abs().max().item() - 1e-5
        for a, p, r in zip(ours, plain, ref, strict=True)
    ]


def _single(q, k, v, g, mask, bias, dtype) -> list[Tensor]:  # type: ignore[no-untyped-def]
    """Output and gradients of single-process attention on the whole sequence."""
    q, k, v = (t.to(dtype, copy=True).requires_grad_() for t in (q, k, v))
    b = None if bias is None else bias.to(dtype)
    out = attnlab.attention(q, k, v, mask=mask, bias=b, engine="reference")
    out.backward(g.to(dtype))
    extra = [] if b is None else [p.grad.double() for p in b.parameters()]
    grads = [t.grad.double() for t in (q, k, v)]  # type: ignore[union-attr]
    if b is not None:
        b.zero_grad()
    return [out.detach().double(), *grads, *extra]


def _sharded(rank, world, q, k, v, g, mask, bias, how, dtype, n=N) -> list[Tensor]:  # type: ignore[no-untyped-def]
    """Output and gradients of the context-parallel call, gathered to every rank."""
    layout, strategy = how
    qs, ks, vs = (
        D.shard(t, rank, world, layout=layout).to(dtype).requires_grad_() for t in (q, k, v)
    )
    b = None if bias is None else bias.to(dtype)
    out = D.attention(qs, ks, vs, mask=mask, bias=b, layout=layout, strategy=strategy)
    out.backward(D.shard(g, rank, world, layout=layout).to(dtype))
    shards = [_gather(t, world, layout, n) for t in (out.detach(), qs.grad, ks.grad, vs.grad)]
    extra = []
    if b is not None:
        for p in b.parameters():
            total = p.grad.double().clone()  # type: ignore[union-attr]
            dist.all_reduce(total)  # each rank holds its queries' share
            extra.append(total)
        b.zero_grad()
    return [*shards, *extra]


def _gather(t: Tensor, world: int, layout: str, n: int = N) -> Tensor:
    """The whole sequence of ``n`` from every rank's shard (shard lengths may differ)."""
    lengths = D.shard_lengths(n, world, layout)
    padded = torch.zeros(*t.shape[:2], max(lengths), t.shape[3], dtype=torch.float64)
    padded[:, :, : t.shape[2]] = t.double()
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return D.unshard([p[:, :, :n] for p, n in zip(parts, lengths, strict=True)], layout=layout)


def _matrix(rank: int, world: int, dtype: torch.dtype, names: list[str]) -> dict[str, float]:
    out = {}
    for case in CASES:
        if case[0] not in names:
            continue
        for layout in D.LAYOUTS:
            out[f"{case[0]} / {layout}"] = max(_run_case(rank, world, case, layout, dtype))
        if dtype == torch.float64:  # the other strategy, in the balanced layout
            errs = _run_case(rank, world, case, "zigzag", dtype, "all-gather")
            out[f"{case[0]} / zigzag / all-gather"] = max(errs)
        if dtype == torch.float64 and _ulysses_fits(case, world):  # heads split over ranks
            for layout in D.LAYOUTS:
                errs = _run_case(rank, world, case, layout, dtype, "ulysses")
                out[f"{case[0]} / {layout} / ulysses"] = max(errs)
        if dtype == torch.float64 and world == 2:  # every pair through the engine's path
            flash, steps._FLASH_BWD = steps._FLASH_BWD, None
            try:
                out[f"{case[0]} / engine backward"] = max(
                    _run_case(rank, world, case, "zigzag", dtype)
                )
            finally:
                steps._FLASH_BWD = flash
    return out


def _ulysses_fits(case: Case, world: int) -> bool:
    """Whether Ulysses can split this case's heads (4 query heads, ``case[3]`` key/value
    heads) over ``world`` ranks."""
    return 4 % world == 0 and case[3] % world == 0


ALL = [c[0] for c in CASES]


@pytest.mark.parametrize("world", [2, 3, 4])
def test_every_mask_and_bias_equals_one_process_in_fp64(world: int) -> None:
    results = run_local(_matrix, world, torch.float64, ALL, timeout=240)
    worst = {key: max(r[key] for r in results) for key in results[0]}
    ulysses = 2 * sum(_ulysses_fits(c, world) for c in CASES)
    assert len(worst) == (4 if world == 2 else 3) * len(CASES) + ulysses
    assert ulysses >= (2 if world == 4 else 0)  # per-head ALiBi over 4 ranks among them
    bad = {key: err for key, err in worst.items() if not err <= 1e-10}
    assert not bad, bad


def test_fp32_meets_the_2x_rule() -> None:
    names = ["causal", "window narrow", "documents", "alibi causal", "padding, fully masked rows"]
    results = run_local(_matrix, 2, torch.float32, names, timeout=120)
    bad = {key: e for r in results for key, e in r.items() if e > 0}
    assert not bad, f"error above 2 x plain PyTorch's (+1e-5) by {bad}"


def _large_scores(rank: int, world: int, e: int) -> dict[str, list[float]]:
    """Errors of out, dq, dk, dv (float32, 200 positions, head size ``e``, queries and keys
    of standard deviation 3) against fp64, beside plain PyTorch's: (ours, plain) pairs."""
    n, out = 200, {}
    for name, mask in [("dense", None), ("causal", masks.causal())]:
        g = torch.Generator().manual_seed(0)
        q, k, v, dout = (
            torch.randn(2, h, n, e, generator=g, dtype=torch.float64) for h in (4, 2, 2, 4)
        )
        q, k = q * 3, k * 3
        ref = _single(q, k, v, dout, mask, None, torch.float64)
        plain = _single(q, k, v, dout, mask, None, torch.float32)
        how = ("zigzag", "ring")
        ours = _sharded(rank, world, q, k, v, dout, mask, None, how, torch.float32, n)
        out[name] = [
            ((a - r).abs().max().item(), (p - r).abs().max().item())
            for a, p, r in zip(ours, plain, ref, strict=True)
        ]
    return out


@pytest.mark.parametrize("e", [40, 64])
def test_large_scores_keep_the_2x_rule_in_fp32(e: int) -> None:
    """Each pair's backward recomputes the scores as the pair's forward made them (the
    blocked kernel), against a global logsumexp merged in float64: torch's flash backward
    there, against a float32 merge, gave dQ, dK and dV 3-8.5x plain PyTorch's error."""
    (result,) = run_local(_large_scores, 2, e, timeout=120)[:1]
    bad = {
        f"{case} {name}": f"{ours:.2e} vs plain {plain:.2e}"
        for case, errs in result.items()
        for name, (ours, plain) in zip(["out", "dq", "dk", "dv"], errs, strict=True)
        if ours > 2 * plain + 1e-5  # the floor of test_fp32_meets_the_2x_rule
    }
    assert not bad, bad


def _flash_pairs(rank: int, world: int, seeds: list[int]) -> dict[int, list[float]]:
    """Ratios of our float32 errors to plain PyTorch's (both against fp64) of out, dq,
    dk, dv per seed: no mask, head size 16 (pairs on torch's flash kernel both ways),
    queries and keys of standard deviation 3, 200 positions, contiguous."""
    how = ("contiguous", "ring")
    return {seed: _std3_ratios(rank, world, seed, (2, 200, 16), None, how) for seed in seeds}


def _std3_ratios(
    rank: int,
    world: int,
    seed: int,
    size: tuple[int, int, int],
    mask: masks.Mask | None,
    how: tuple,
) -> list[float]:
    """Ratios of our float32 errors to plain PyTorch's (both against fp64) of out, dq, dk,
    dv: ``size`` (B, N, E), 4 query and 2 key/value heads, queries and keys of standard
    deviation 3, sharded as ``how`` (layout, strategy)."""
    (b, n, e), g = size, torch.Generator().manual_seed(seed)
    q, k, v, dout = (
        torch.randn(b, h, n, e, generator=g, dtype=torch.float64) for h in (4, 2, 2, 4)
    )
    q, k = q * 3, k * 3
    ref = _single(q, k, v, dout, mask, None, torch.float64)
    plain = _single(q, k, v, dout, mask, None, torch.float32)
    ours = _sharded(rank, world, q, k, v, dout, mask, None, how, torch.float32, n)
    return [
        (a - r).abs().max().item() / (p - r).abs().max().item()
        for a, p, r in zip(ours, plain, ref, strict=True)
    ]


def test_flash_pairs_take_the_rounding_of_the_global_logsumexp_out() -> None:
    """torch's flash backward takes the logsumexp in float32: its P missed the float64
    global one by that rounding, and dV came out 2.4-2.6x plain PyTorch's error on these
    seeds. The upstream gradient now takes the rounding instead, as ``backward_given``'s
    rows do (here at most 1.9x)."""
    (result,) = run_local(_flash_pairs, 2, [2, 3, 4], timeout=120)[:1]
    bad = {f"seed {seed} {n}": round(x, 2) for seed, rs in result.items()
           for n, x in zip(["out", "dq", "dk", "dv"], rs, strict=True) if not x <= 2}  # fmt: skip
    assert not bad, bad


def _very_large_scores(rank: int, world: int) -> dict[str, list[float]]:
    """Ratios of our float32 errors to plain PyTorch's (both against fp64) of out, dq,
    dk, dv at head size 32, queries and keys of standard deviation 6-8 (near one-hot
    rows: a rounding of a row's logsumexp shows whole in dV)."""
    ratios = {}
    cases = [("causal x8", masks.causal(), None, 8.0), ("alibi causal x6", masks.causal(),
             B.alibi(2), 6.0), ("causal x4", masks.causal(), None, 4.0)]  # fmt: skip
    for name, mask, bias, scale in cases:
        g = torch.Generator().manual_seed(0)
        q, k, v, dout = (
            torch.randn(1, h, 200, 32, generator=g, dtype=torch.float64) for h in (2, 1, 1, 2)
        )
        q, k = q * scale, k * scale
        ref = _single(q, k, v, dout, mask, bias, torch.float64)
        plain = _single(q, k, v, dout, mask, bias, torch.float32)
        ours = _sharded(rank, world, q, k, v, dout, mask, bias, ("zigzag", "ring"),
                        torch.float32, 200)  # fmt: skip
        ratios[name] = [
            (a - r).abs().max().item() / (p - r).abs().max().item()
            for a, p, r in zip(ours, plain, ref, strict=True)
        ]
    return ratios


def test_very_large_scores_keep_the_2x_rule_in_fp32_without_a_floor() -> None:
    """Each pair's logsumexp reaches the merge in float64 from the kernel's own (rounded
    to float32 in natural-log units, it gave dV 4.96x plain PyTorch's error), the kernel's
    backward takes the rounding of the global one out of its rows (``backward_given``),
    and pairs off the kernel (ALiBi shifted to the pair) run the engine's backward with a
    sink key instead of torch's flash backward (dq 2.9x, dk 3.0x, dv 7.2x)."""
    (result,) = run_local(_very_large_scores, 2, timeout=120)[:1]
    names = ["out", "dq", "dk", "dv"]
    bad = {f"{case} {n}": round(x, 2) for case, rs in result.items()
           for n, x in zip(names, rs, strict=True) if x > 2}  # fmt: skip
    assert not bad, bad


def _alibi_ratios(rank: int, world: int, seeds: list[int]) -> dict[str, list[float]]:
    """Ratios of our float32 errors to plain PyTorch's (both against fp64) of out, dq, dk,
    dv with ALiBi, alone and under a causal mask, per seed, layout and strategy: B=2,
    Hq=4, Hkv=2, E=16, N=60, queries and keys of standard deviation 3. Only the pairs on
    the diagonal shift their ALiBi to the kernel; the others take the sink path."""
    ratios = {}
    for seed in seeds:
        torch.manual_seed(seed)
        q, k = (torch.randn(2, h, 60, 16, dtype=torch.float64) * 3 for h in (4, 2))
        v, dout = (torch.randn(2, h, 60, 16, dtype=torch.float64) for h in (2, 4))
        for name, mask in [("alibi", None), ("causal & alibi", masks.causal())]:
            ref = _single(q, k, v, dout, mask, B.alibi(4), torch.float64)
            plain = _single(q, k, v, dout, mask, B.alibi(4), torch.float32)
            for how in itertools.product(D.LAYOUTS, ["ring", "all-gather"]):
                ours = _sharded(rank, world, q, k, v, dout, mask, B.alibi(4), how,
                                torch.float32, 60)  # fmt: skip
                ratios[f"seed {seed} {name} {' '.join(how)}"] = [
                    (a - r).abs().max().item() / (p - r).abs().max().item()
                    for a, p, r in zip(ours, plain, ref, strict=True)
                ]
    return ratios


def test_alibi_pairs_off_the_kernel_keep_the_2x_rule_in_fp32() -> None:
    """ALiBi pairs whose bias the kernel cannot shift run the engine's sink path, in
    float64 both ways: with its float32 forward, pair logsumexp and sink score, the
    auditor's case (seed 16, contiguous) gave dQ 3.2x and dK 5.8x plain PyTorch's float32
    error, and each of these seeds failed (now at most 1.6x)."""
    (result,) = run_local(_alibi_ratios, 2, [16, 2, 11, 14], timeout=240)[:1]
    assert len(result) == 4 * 2 * 2 * 2
    names = ["out", "dq", "dk", "dv"]
    bad = {f"{case} {n}": round(x, 2) for case, rs in result.items()
           for n, x in zip(names, rs, strict=True) if not x <= 2}  # fmt: skip
    assert not bad, bad


def _ulysses_ratios(rank: int, world: int, seeds: list[int]) -> dict[str, list[float]]:
    """Ratios of Ulysses' float32 errors to plain PyTorch's (both against fp64) of out,
    dq, dk, dv per seed and mask: B=1, Hq=4, Hkv=2, E=32, N=64, queries and keys of
    standard deviation 3, zigzag."""
    ratios = {}
    cases = [("causal & window", masks.causal() & masks.window(8)),
             ("global tokens & causal", masks.global_tokens([0, 20]) & masks.causal())]  # fmt: skip
    for seed, (name, mask) in itertools.product(seeds, cases):
        how = ("zigzag", "ulysses")
        ratios[f"seed {seed} {name}"] = _std3_ratios(rank, world, seed, (1, 64, 32), mask, how)
    return ratios


def test_ulysses_keeps_the_2x_rule_in_fp32() -> None:
    """Ulysses' local attention under ``engine="auto"`` runs the blocked kernel on the CPU,
    as the ring's steps do: it took torch's SDPA there, whose CPU flash backward at head
    size 32 gave dV 5-12x and dQ, dK 2-5x plain PyTorch's float32 error on these seeds."""
    (result,) = run_local(_ulysses_ratios, 2, [0, 1, 2, 3], timeout=120)[:1]
    assert len(result) == 4 * 2
    names = ["out", "dq", "dk", "dv"]
    bad = {f"{case} {n}": round(x, 2) for case, rs in result.items()
           for n, x in zip(names, rs, strict=True) if not x <= 2}  # fmt: skip
    assert not bad, bad


def _global_token_ratios(rank: int, world: int, seeds: list[int]) -> dict[str, list[float]]:
    """Ratios of the ring's and all-gather's float32 errors to plain PyTorch's (both
    against fp64) of out, dq, dk, dv per seed, layout and strategy: global tokens 0 and 20
    and causal, B=1, Hq=4, Hkv=2, E=16, N=64, queries and keys of standard deviation 3."""
    mask = masks.global_tokens([0, 20]) & masks.causal()
    ratios = {}
    for seed, lay, strat in itertools.product(seeds, D.LAYOUTS, ["ring", "all-gather"]):
        how = (lay, strat)
        ratios[f"seed {seed} {lay} {strat}"] = _std3_ratios(
            rank, world, seed, (1, 64, 16), mask, how
        )
    return ratios


def test_heaviest_keys_make_their_own_delta() -> None:
    """Rows 1-19 of this mask see key 0 alone (exact dQ 0, no share of dK) and the others
    mostly one key: each pair's delta made of the merged output missed the kernel's dP by
    rounding, and dK came out up to 4.4x plain PyTorch's float32 error (dQ 3.7x) on these
    seeds, in both layouts. Each row's heaviest key range now makes its delta of its own
    P and dP, given the other ranges' share (``merge.Own``): at most 1.9x over seeds 0-15."""
    (result,) = run_local(_global_token_ratios, 2, [1, 2, 7], timeout=240)[:1]
    assert len(result) == 3 * 2 * 2
    names = ["out", "dq", "dk", "dv"]
    bad = {f"{case} {n}": round(x, 2) for case, rs in result.items()
           for n, x in zip(names, rs, strict=True) if not x <= 2}  # fmt: skip
    assert not bad, bad


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_meets_the_2x_rule(dtype: torch.dtype) -> None:
    """Each pair runs in float32 on the CPU, so only the merged result is rounded: rounded
    pair by pair, these cases gave up to 3.2x one process's error."""
    names = ["dense", "window narrow", "window wide two-sided", "prefix", "alibi causal"]
    names += ["padding, fully masked rows", "learned relative bias", "learned bias, window"]
    results = run_local(_matrix, 2, dtype, names, timeout=120)
    bad = {key: e for r in results for key, e in r.items() if e > 0}
    assert not bad, f"error above 2 x plain PyTorch's (+1e-5) by {bad}"


def _table_ratios(rank: int, world: int, dtype: torch.dtype) -> list[float]:
    """A causal T5 table's gradient error over plain PyTorch's in ``dtype`` (both against
    fp64), per seed: B=2, Hq=4, Hkv=2, E=16, N=60, contiguous ring."""
    ratios = []
    for seed in range(3):
        torch.manual_seed(seed)
        q, g = (torch.randn(2, 4, 60, 16, dtype=torch.float64) for _ in range(2))
        k, v = (torch.randn(2, 2, 60, 16, dtype=torch.float64) for _ in range(2))
        rel = B.relative_buckets(4, num_buckets=8, max_distance=16, bidirectional=False)
        with torch.no_grad():
            rel.table.normal_()
        rel, how, mask = rel.double(), ("contiguous", "ring"), masks.causal()
        ref = _single(q, k, v, g, mask, rel, torch.float64)[-1]
        plain = _single(q, k, v, g, mask, rel, dtype)[-1]
        ours = _sharded(rank, world, q, k, v, g, mask, rel, how, dtype, 60)[-1]
        ratios.append(float((ours - ref).abs().max() / (plain - ref).abs().max()))
    return ratios


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_half_precision_table_gradient_meets_the_2x_rule(dtype: torch.dtype) -> None:
    """Each pair's share of the table's gradient was summed in the table's dtype, within
    the pair and across pairs: 0.42-1.17x plain PyTorch's error here (2.4x bfloat16 and
    2.3x float16 in an audit's call); summed in float64 within a pair and float32 across
    them, 0.05-0.32x. One process now reads a half table through a float32 copy, so its
    own sums are float32 too (0.58-1.43x here, AMD EPYC)."""
    (ratios, _) = run_local(_table_ratios, 2, dtype, timeout=120)
    assert max(ratios) <= 2.0, ratios


def _errors(rank: int, world: int) -> dict[str, str]:
    """Each bad call's error on this rank, then a good call on the same group."""
    q, long, odd = torch.randn(1, 2, 6, 4), torch.randn(1, 2, 8, 4), torch.randn(1, 3, 6, 4)
    cut = long[:, :, : 5 + 2 * rank]  # 5 and 7 positions: the layout wants 6 and 6
    seen = {}
    calls: dict[str, Callable[[], object]] = {
        "lengths": lambda: D.attention(cut, cut, cut),
        "heads": lambda: D.attention(q[:, : 1 + rank], q[:, : 1 + rank], q[:, : 1 + rank]),
        "layout": lambda: D.attention(q, q, q, layout=D.LAYOUTS[rank]),
        # the dtype, layout and strategy were printed as codes ("[1, 0]")
        "dtype": lambda: D.attention(*[q.double() if rank else q] * 3),
        "strategy": lambda: D.attention(q, q, q, strategy=D.STRATEGIES[rank]),
        "one rank's bad input": lambda: D.attention(q if rank else q[0], q, q),
        "tensor mask": lambda: D.attention(q, q, q, mask=torch.ones(12, 12, dtype=torch.bool)),
        "mask size": lambda: D.attention(q, q, q, mask=masks.documents(torch.zeros(20).long())),
        "not in group": lambda: D.attention(q, q, q, group=dist.new_group([0])),
        "ulysses heads": lambda: D.attention(odd, odd[:, :1], odd[:, :1], strategy="ulysses"),
        "scale": lambda: D.attention(q, q, q, scale=float("nan")),
        "scale type": lambda: D.attention(q, q, q, scale="x"),  # type: ignore[arg-type]
        "engine": lambda: D.attention(q, q, q, engine="bogus"),
        "engine without lse": lambda: D.attention(q, q, q, engine="performer"),
        "batch": lambda: D.attention(q.expand(2, -1, -1, -1), q.expand(3, -1, -1, -1), q),
        "str mask": lambda: D.attention(q, q, q, mask="causal"),  # type: ignore[arg-type]
        # gloo aborted the process ("Received data size doesn't match"): other messages
        "masks": lambda: D.attention(q, q, q, mask=masks.window(1 + 2 * rank)),
        "bias": lambda: D.attention(q, q, q, bias=B.alibi(2) if rank else None),
        "no heads": lambda: D.attention(q[:, :0], q[:, :0], q[:, :0]),  # ZeroDivisionError
        # the spec names documents(...) by its count: gloo aborted, or a wrong result
        "document ids": lambda: D.attention(q, q, q, mask=masks.documents(ids[rank])),
        "bias values": lambda: D.attention(q, q, q, bias=tables[rank]),
        # a custom mask is named by its function's name: other code or closed-over
        # numbers on two ranks gave a wrong result silently
        "mask code": lambda: D.attention(q, q, q, mask=masks.custom(codes[rank])),
        "mask closure": lambda: D.attention(q, q, q, mask=masks.custom(_every(2 + rank))),
        # raised inside a ring step on every rank: its posted messages hung the group
        "step error": lambda: _raises_in_a_step(q),
        # failed in the first step, after messages had moved (no logsumexp there)
        "flex on the CPU": lambda: D.attention(q, q, q, engine="flex"),
        # rank 0's backward waited for rank 1's forever
        "backward": lambda: D.attention(q.clone().requires_grad_(rank == 0), q, q),
        # q's batch alone was compared: gloo aborted the process (other k, v batches)
        "kv batch": lambda: D.attention(q, *[q.expand(3 - rank, -1, -1, -1)] * 2),
        # a closed-over tensor that requires grad got no gradient, silently (ring, gather)
        "closure grad": lambda: D.attention(q, q, q, bias=B.custom(lambda h, i, j: w[h] * (i - j))),
        "group list": lambda: D.attention(q, q, q, group=[0, 1]),  # "unhashable type"
    }
    w = torch.ones(2, requires_grad=True)
    ids = [torch.tensor([0, 1] * 6), torch.tensor([0, 0, 1, 1] * 3)]
    codes = [lambda b, h, i, j: (i - j) % 2 == 0, lambda b, h, i, j: (i - j) % 3 == 0]
    tables = [B.relative_buckets(2), B.relative_buckets(2)]
    with torch.no_grad():
        tables[1].table.add_(1.0)  # the same class and sizes, other values
    for name, call in calls.items():
        try:
            call()
            seen[name] = "no error"
        except (ValueError, TypeError) as e:
            seen[name] = f"{type(e).__name__}: {e}"
    out = D.attention(q, q, q, mask=masks.causal())  # positive control: the group still works
    seen["control"] = str(tuple(out.shape))
    out = D.attention(q, q[:, :1].repeat(1, 2, 1, 1), q, strategy="ulysses")  # 2 heads fit
    seen["ulysses control"] = str(tuple(out.shape))
    return seen


def _every(n: int) -> Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]:
    """A custom mask's function: every ``n``-th key behind a query."""
    return lambda b, h, i, j: (i - j) % n == 0


def _raises_in_a_step(q: Tensor) -> None:
    def broken(b: Tensor, h: Tensor, i: Tensor, j: Tensor) -> Tensor:
        raise RuntimeError("a mask function that fails inside a step")

    try:
        D.attention(q, q, q, mask=masks.custom(broken))
    except RuntimeError as e:  # (the same on every rank; the calls after it must run)
        raise ValueError(str(e)) from e


def test_bad_input_fails_on_every_rank_without_hanging() -> None:
    results = run_local(_errors, 2, timeout=60)
    want = {
        "lengths": "shards have lengths \\[5, 7\\].*gives \\[6, 6\\]",
        "heads": "ranks disagree on the query heads: \\[1, 2\\]",
        "layout": "ranks disagree on the layout: rank 0: contiguous, rank 1: zigzag$",
        "dtype": "ranks disagree on the dtype: rank 0: float32, rank 1: float64$",
        "strategy": "ranks disagree on the strategy: rank 0: ring, rank 1: all-gather$",
        "tensor mask": "dense tensor mask",
        "mask size": "20",
        "ulysses heads": "^ValueError: strategy='ulysses' .* divide by 2; got Hq=3, Hkv=1",
        # these used to fail only inside the first step, with its messages posted: a hang
        "scale": "^ValueError: scale must be finite, got nan",
        "scale type": "^TypeError: scale must be a finite float or None, got str",
        "engine": "^ValueError: engine='bogus' cannot run a context-parallel step",
        "engine without lse": "^ValueError: engine='performer' cannot run a context-parallel",
        "batch": "^ValueError: batch sizes of q, k, v must match or be 1; got \\[2, 3, 1\\]",
        "str mask": "^TypeError: mask must be an attnlab.masks mask .* got str",
        "masks": "^ValueError: ranks disagree on the mask, bias, scale or engine",
        "bias": "^ValueError: ranks disagree on the mask, bias, scale or engine",
        "no heads": "^ValueError: q and k must have at least 1 head each",
        "document ids": "^ValueError: ranks disagree on the mask, bias, scale or engine",
        "bias values": "^ValueError: ranks disagree on the mask, bias, scale or engine",
        "mask code": "^ValueError: ranks disagree on the mask, bias, scale or engine",
        "mask closure": "^ValueError: ranks disagree on the mask, bias, scale or engine",
        "step error": "^ValueError: a mask function that fails inside a step",
        "flex on the CPU": "^ValueError: engine='flex' cannot run a context-parallel step on",
        "backward": "^ValueError: ranks disagree on the backward .*: \\[1, 0\\]",
        "kv batch": "^ValueError: ranks disagree on the batch: \\[3, 2\\]",
        "closure grad": "^ValueError: the bias's function reads a tensor that requires grad .*"
        "strategy='ulysses'",
        "group list": "^TypeError: group must be a torch.distributed ProcessGroup .* got list",
    }
    for rank, seen in enumerate(results):
        for name, pattern in want.items():
            assert re.search(pattern, seen[name]), (rank, name, seen[name])
        assert seen["control"] == seen["ulysses control"] == "(1, 2, 6, 4)"
    assert re.search("must be a \\(B, H, L_r, E\\) shard", results[0]["one rank's bad input"])
    assert re.search("invalid arguments on rank\\(s\\) \\[0\\]", results[1]["one rank's bad input"])
    assert "does not contain this process" in results[1]["not in group"]


def _traffic(rank: int, world: int) -> dict[str, tuple[int, ...]]:
    """Counted bytes (forward out/in, backward out/in) and peers of several calls."""
    n, seen = 64, {}
    docs = torch.tensor([0] * 20 + [1] * 30 + [2] * 14)
    cases = {
        "causal": masks.causal(),
        "window": masks.causal() & masks.window(5),
        "documents": masks.documents(docs) & masks.causal(),
    }
    for (name, mask), layout, strategy in itertools.product(cases.items(), D.LAYOUTS, D.STRATEGIES):
        q = torch.randn(2, 4, D.shard_lengths(n, world, layout)[rank], 8, requires_grad=True)
        hkv = 4 if strategy == "ulysses" else 2  # Ulysses needs Hkv % P == 0 at P = 4
        k, v = (torch.randn(2, hkv, q.shape[2], 8, requires_grad=True) for _ in range(2))
        D.TRAFFIC.reset()
        out = D.attention(q, k, v, mask=mask, layout=layout, strategy=strategy)
        fwd = (D.TRAFFIC.sent, D.TRAFFIC.received)
        D.TRAFFIC.reset()
        out.sum().backward()
        bwd = (D.TRAFFIC.sent, D.TRAFFIC.received)
        seen[f"{name}/{layout}/{strategy}"] = (*fwd, *bwd, *sorted(D.TRAFFIC.peers))
    return seen


@pytest.mark.parametrize("world", [2, 4])
def test_counted_bytes_equal_the_plan_and_windows_talk_to_neighbours(world: int) -> None:
    results = run_local(_traffic, world, timeout=120)
    docs = torch.tensor([0] * 20 + [1] * 30 + [2] * 14)
    cases = {
        "causal": masks.causal(),
        "window": masks.causal() & masks.window(5),
        "documents": masks.documents(docs) & masks.causal(),
    }
    for key in results[0]:
        name, layout, strategy = key.split("/")
        p = D.plan(
            64,
            world,
            mask=cases[name],
            batch=2,
            heads=4,
            kv_heads=4 if strategy == "ulysses" else 2,
            head_dim=8,
            layout=layout,
            strategy=strategy,
        )
        for rank, (seen, cost) in enumerate(zip(results, p.ranks, strict=True)):
            want = (
                cost.forward_sent,
                cost.forward_received,
                cost.backward_sent,
                cost.backward_received,
            )
            assert seen[key][:4] == want, (key, rank, seen[key], want)
            if strategy == "ring":
                assert set(seen[key][4:]) == cost.peers, (key, rank)
    for rank in range(world):  # a contiguous window talks to its neighbours only
        peers = set(results[rank]["window/contiguous/ring"][4:])
        assert peers and peers <= {rank - 1, rank + 1}, (rank, peers)
    last = results[-1]  # the last rank's queries see every shard under causal
    window, causal = last["window/contiguous/ring"][1], last["causal/contiguous/ring"][1]
    assert 0 < window == 2 * 2 * 5 * 16 * 4 < causal  # (B, Hkv, w keys, E + Ev) float32


def _half_backward_traffic(rank: int, world: int) -> tuple[int, int]:
    """Bytes a bfloat16 causal call's backward sent and received on this rank."""
    q = D.shard(torch.randn(1, 2, 64, 8), rank, world).bfloat16().requires_grad_()
    out = D.attention(q, q, q, mask=masks.causal())
    D.TRAFFIC.reset()
    out.sum().backward()
    return D.TRAFFIC.sent, D.TRAFFIC.received


def test_the_plan_counts_the_backward_of_half_precision_in_float32() -> None:
    """(The backward sends float32: the plan counted it at 2 bytes, half the bytes.)"""
    seen = run_local(_half_backward_traffic, 2, timeout=60)
    p = D.plan(64, 2, mask=masks.causal(), heads=2, head_dim=8, element_size=2)
    assert seen == [(c.backward_sent, c.backward_received) for c in p.ranks]


def _moved(p: D.CallPlan) -> int:
    """The busiest rank's bytes, forward and backward, sent and received."""
    return max(
        c.forward_sent + c.forward_received + c.backward_sent + c.backward_received for c in p.ranks
    )


@pytest.mark.parametrize(
    ("heads", "kv_heads", "world", "window", "want"),
    [
        (8, 8, 4, None, "ulysses"),  # MHA, heads divide: 2 all-to-alls beat the ring
        (8, 8, 2, None, "ulysses"),
        (32, 4, 4, None, "all-gather"),  # GQA: few key/value heads, causal needs them all
        (4, 2, 2, None, "all-gather"),
        (8, 8, 4, 64, "ring"),  # a window: the ring talks to neighbours only
        (8, 2, 4, 64, "ring"),  # GQA, but the window skips rank pairs
        (6, 6, 4, None, "ring"),  # heads do not divide by P, MHA
    ],
)
def test_auto_picks_what_the_rule_says(
    heads: int, kv_heads: int, world: int, window: int | None, want: str
) -> None:
    mask = masks.causal() if window is None else masks.causal() & masks.window(window)
    layout = "zigzag" if window is None else "contiguous"

    def planned(strategy: str) -> D.CallPlan:
        return D.plan(
            4096, world, mask=mask, heads=heads, kv_heads=kv_heads, strategy=strategy, layout=layout
        )

    auto = planned("auto")
    assert auto.strategy == want
    ring = _moved(planned("ring"))
    if want == "ulysses":  # the rule's reason, from the plan's own bytes
        assert _moved(planned("ulysses")) < ring
    elif heads % world == 0 and kv_heads % world == 0:
        assert _moved(planned("ulysses")) >= ring
    assert _moved(auto) == _moved(planned(want))


def test_plan_refuses_ulysses_with_indivisible_heads() -> None:
    with pytest.raises(ValueError, match="divisible by world=4, got heads=4, kv_heads=2"):
        D.plan(64, 4, heads=4, kv_heads=2, strategy="ulysses")
    assert D.plan(64, 4, heads=4, kv_heads=4, strategy="ulysses").strategy == "ulysses"


def _big(rank: int, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Tensors of a few MiB: they travel as shared memory unless pickled by value."""
    x = torch.full((1, 4, 500, 32), float(rank), requires_grad=True)
    (x * 2).sum().backward()
    return (x * world).detach(), x.grad  # type: ignore[return-value]


def test_run_local_returns_tensors_after_the_ranks_exit() -> None:
    """A rank's tensors outlive it: a tensor put on the queue as it is was read from
    shared memory the exited child had freed (FileNotFoundError, now and then)."""
    for _ in range(2):
        results = run_local(_big, 2, timeout=120)
        for rank, (y, g) in enumerate(results):
            assert torch.equal(y, torch.full((1, 4, 500, 32), 2.0 * rank))
            assert torch.equal(g, torch.full_like(g, 2.0))


def test_run_local_checks_its_backend() -> None:
    with pytest.raises(ValueError, match="backend must be 'gloo' or 'nccl', got 'mpi'"):
        run_local(_errors, 2, backend="mpi")
    if torch.cuda.device_count() < 2:
        with pytest.raises(ValueError, match="needs one GPU per rank"):
            run_local(_errors, 2, backend="nccl")


def _broadcast(rank: int, world: int) -> dict[str, float]:
    """A batch of 1 on one side, as attnlab.attention broadcasts it: forward and every
    gradient against one process in fp64 (the ring used to size its messages from q)."""
    errs = {}
    for qb, kb in ((2, 1), (1, 2)):
        for strategy in ("ring", "all-gather", "ulysses"):
            torch.manual_seed(0)
            q = torch.randn(qb, 4, 10, 8, dtype=torch.float64, requires_grad=True)
            k = torch.randn(kb, 2, 10, 8, dtype=torch.float64, requires_grad=True)
            v = torch.randn(kb, 2, 10, 8, dtype=torch.float64, requires_grad=True)
            mask = masks.causal() & masks.window(4)
            ref = attnlab.attention(q, k, v, mask=mask, engine="reference")
            g = torch.randn_like(ref)
            want = torch.autograd.grad(ref, (q, k, v), g)
            parts = [D.shard(t.detach(), rank, world).requires_grad_() for t in (q, k, v)]
            out = D.attention(*parts, mask=mask, strategy=strategy)
            got = torch.autograd.grad(out, parts, D.shard(g, rank, world))
            err = (out - D.shard(ref.detach(), rank, world)).abs().max().item()
            for gg, w in zip(got, want, strict=True):  # each rank's shard of each gradient
                err = max(err, (gg - D.shard(w, rank, world)).abs().max().item())
            errs[f"q batch {qb}, k batch {kb}, {strategy}"] = err
    return errs


def test_a_batch_of_one_broadcasts_as_in_one_process() -> None:
    for errs in run_local(_broadcast, 2, timeout=120):
        assert all(e < 1e-12 for e in errs.values()), errs


def _empty(rank: int, world: int) -> dict[str, tuple]:
    shapes = {}
    for strategy in ("ring", "all-gather", "ulysses"):
        x = torch.randn(0, 4, 6, 8, requires_grad=True)
        out = D.attention(x, x, x, mask=masks.causal(), strategy=strategy)
        out.sum().backward()
        shapes[strategy] = (tuple(out.shape), tuple(x.grad.shape))  # type: ignore[union-attr]
    return shapes


def test_an_empty_batch_gives_an_empty_output_on_every_strategy() -> None:
    """(The ring hung: a rank sent its empty keys, and its peer posted no receive.)"""
    for shapes in run_local(_empty, 2, timeout=60):
        assert set(shapes.values()) == {((0, 4, 6, 8), (0, 4, 6, 8))}, shapes


def _penalty_grads(q: Tensor, k: Tensor, v: Tensor, attend: Callable[..., Tensor]) -> list[Tensor]:
    """``dq`` (with ``create_graph=True``) and the gradients of ``out.sum() + |dq|^2``."""
    out = attend(q, k, v, mask=masks.causal(), engine="reference")
    (dq,) = torch.autograd.grad(out.sum(), q, create_graph=True)
    (out.sum() + (dq**2).sum()).backward()
    return [dq.detach(), *(t.grad for t in (q, k, v))]  # type: ignore[misc]


def _second_order(rank: int, world: int) -> dict[str, object]:
    """Per strategy: the largest error of a gradient penalty's dq, dq/dk/dv against one
    process (fp64, N=8), or the error its second backward raised."""
    torch.manual_seed(0)
    whole = [torch.randn(1, 2, 8, 4, dtype=torch.float64) for _ in range(3)]
    ref = _penalty_grads(*(t.clone().requires_grad_() for t in whole), attnlab.attention)
    seen: dict[str, object] = {}
    for strategy in ("ring", "all-gather", "ulysses"):
        qkv = [D.shard(t, rank, world).requires_grad_() for t in whole]
        attend = functools.partial(D.attention, strategy=strategy)
        try:
            ours = _penalty_grads(*qkv, attend)
        except RuntimeError as e:
            out = attend(*qkv, mask=masks.causal(), engine="reference")  # first order still
            (dq,) = torch.autograd.grad(out.sum(), qkv[0], create_graph=True)
            seen[strategy] = (str(e), (dq - D.shard(ref[0], rank, world)).abs().max().item())
            continue
        seen[strategy] = max(
            (a - D.shard(b, rank, world)).abs().max().item() for a, b in zip(ours, ref, strict=True)
        )
    return seen


def test_second_order_gradients_are_exact_through_ulysses_and_refused_elsewhere() -> None:
    """A gradient penalty through the context-parallel call: ring and all-gather gave a
    ``create_graph=True`` dq with no graph, so the penalty was dropped silently (q.grad off
    by up to 1.19); Ulysses with engine="reference" gave the pieces other ranks sent no
    history (as far off). Now Ulysses is exact and the others raise by name."""
    for seen in run_local(_second_order, 2, timeout=60):
        assert isinstance(seen["ulysses"], float) and seen["ulysses"] < 1e-12, seen
        for strategy in ("ring", "all-gather"):
            msg, dq_error = seen[strategy]  # type: ignore[misc]
            assert f"attention(strategy='{strategy}'): its backward is not" in msg, msg
            assert "strategy='ulysses' with engine='reference' serves it" in msg, msg
            assert dq_error < 1e-12, seen  # create_graph=True's first order is served


def _autocast(rank: int, world: int) -> dict[str, tuple[str, float]]:
    """Per strategy (and one process): the output's dtype under CPU bfloat16 autocast
    and its largest error against fp64 (float32 inputs, causal, N=8)."""
    torch.manual_seed(0)
    whole = [torch.randn(1, 2, 8, 4) for _ in range(3)]
    ref = attnlab.attention(*(t.double() for t in whole), mask=masks.causal())
    seen = {}
    for strategy in ("ring", "all-gather", "ulysses", "one process"):
        if strategy == "one process":
            qkv, attend = whole, attnlab.attention
        else:
            qkv = [D.shard(t, rank, world) for t in whole]
            attend = functools.partial(D.attention, strategy=strategy)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = attend(*qkv, mask=masks.causal())
        if strategy == "one process":
            out = D.shard(out, rank, world)
        err = (out.double() - D.shard(ref, rank, world)).abs().max().item()
        seen[strategy] = (str(out.dtype), err)
    return seen


def test_under_autocast_every_strategy_returns_its_dtype() -> None:
    """The ring and all-gather returned float32 under bfloat16 autocast, beside Ulysses'
    and one process's bfloat16; now bfloat16 too, computed as before (rounded once)."""
    for seen in run_local(_autocast, 2, timeout=60):
        assert {dtype for dtype, _ in seen.values()} == {"torch.bfloat16"}, seen
        for strategy in ("ring", "all-gather"):
            assert seen[strategy][1] <= 2 * seen["one process"][1], seen


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: D.plan(64, 2, strategy="x"), "strategy must be one of"),
        (lambda: D.plan(64, 0), "world must be a positive int, got 0"),
        (lambda: D.plan(-5, 2), "n must be an int >= 0, got -5"),
        (lambda: D.shard_lengths(8, 0), "world must be an int >= 1, got 0"),
        (lambda: D.simulate(D.plan(64, 2), bandwidth=0, flops=1e9), "bandwidth must be a "),
        (lambda: run_local(_mark, 0), "world must be a positive int, got 0"),
        (lambda: run_local(_mark, 2, timeout=-5), "timeout must be a number of seconds > 0"),
        (lambda: run_local(_mark, 2, threads=0), "threads must be a positive int, got 0"),
        # these were accepted (GQA that does not fit) or raised AttributeError, TypeError
        # or IndexError from inside
        (lambda: D.plan(10, 2, heads=8, kv_heads=3), "heads must be a multiple of kv_heads"),
        (lambda: D.plan(10, 2, mask="causal"), "mask must be an attnlab.masks mask or None"),
        (lambda: D.shard(torch.arange(8), 1.0, 2, dim=0), "rank must be an int in"),
        (lambda: D.shard(torch.arange(8), 0, 2, dim=5), r"dim must be an int in \[-1, 1\)"),
        (lambda: D.shard([1, 2, 3], 0, 2), "x must be a Tensor, got list"),
        # a negative or NaN latency predicted a perfect 1.0; the others raised from inside
        (lambda: _simulate(latency=-1e-4), "latency must be a finite number >= 0, got -0.0001"),
        (lambda: _simulate(latency=float("nan")), "latency must be a finite number >= 0"),
        (lambda: _simulate(latency="a"), "latency must be a number, got str"),
        (lambda: _simulate(backward=1), "backward must be a bool, got int"),
        (lambda: D.simulate("plan", bandwidth=1e9, flops=1e9), "p must be a plan"),  # type: ignore[arg-type]
        (lambda: D.unshard([[1, 2], [3, 4]]), r"shards\[0\] must be a Tensor, got list"),
        (lambda: D.unshard([]), "shards must be a non-empty list"),
        (
            lambda: D.unshard([torch.zeros(1, 1, 2, 1)] * 2, dim=5),
            r"dim must be an int in \[-4, 4\)",
        ),
        (  # torch.cat's "Sizes of tensors must match except in dimension 2"
            lambda: D.unshard([torch.zeros(1, 2, 8, 4), torch.zeros(1, 1, 8, 4)]),
            r"shards must match outside dim 2 in shape, dtype and device, got \[\(\(1, 2, 8, 4\)",
        ),
        (  # (torch.cat promoted the float32 shard to float64 silently)
            lambda: D.unshard([torch.zeros(1, 2, 8, 4), torch.zeros(1, 2, 8, 4).double()]),
            r"shards must match outside dim 2 .* 'float32', 'cpu'\), \(\(1, 2, 8, 4\), 'float64'",
        ),
    ],
)
def test_plans_and_launches_check_their_sizes(call: Callable[[], object], match: str) -> None:
    """(A plan of 0 ranks or of strategy "x" was made; 0 ranks ran nothing; threads=0 killed
    the ranks with "exited with code 1"; bandwidth=0 divided by zero.)"""
    with pytest.raises((ValueError, TypeError), match=match):
        call()
    assert D.plan(64, 2).strategy == "ring" and D.shard_lengths(10, 4) == [3, 3, 2, 2]


def _simulate(**kwargs: object) -> float:
    return D.simulate(D.plan(64, 2), **{"bandwidth": 1e9, "flops": 1e9, **kwargs})  # type: ignore[arg-type]


def _plain(
    q: Tensor, k: Tensor, v: Tensor, allowed: Tensor, scale: float, dtype: torch.dtype
) -> Tensor:
    """Plain PyTorch attention in ``dtype``."""
    s = (q.to(dtype) @ k.to(dtype).transpose(-1, -2)) * scale
    return torch.softmax(s.masked_fill(~allowed, float("-inf")), -1) @ v.to(dtype)


def _negative_scale(rank: int, world: int) -> dict[str, float]:
    """A causal call at a negative scale in float32: its error against fp64, over plain
    PyTorch float32's (torch's flash op, which served the diagonal pairs, gave NaN)."""
    ratios = {}
    allowed = torch.ones(16, 16, dtype=torch.bool).tril()
    for e in (16, 64):
        torch.manual_seed(0)
        q, k, v = (torch.randn(1, 2, 16, e, dtype=torch.float64) for _ in range(3))
        ref, p32 = (_plain(q, k, v, allowed, -0.7, dt) for dt in (torch.float64, torch.float32))
        parts = [D.shard(t.float(), rank, world) for t in (q, k, v)]
        got = D.attention(*parts, mask=masks.causal(), scale=-0.7)
        err = (got.double() - D.shard(ref, rank, world)).abs().max().item()
        floor = (p32.double() - ref).abs().max().item()
        ratios[f"E={e}"] = err / max(floor, 1e-7)
    return ratios


def test_a_negative_scale_keeps_the_2x_rule_in_fp32() -> None:
    for ratios in run_local(_negative_scale, 2, timeout=60):
        assert all(r <= 2.0 for r in ratios.values()), ratios  # (NaN before)


def _mark(rank: int, world: int) -> str | None:
    return os.environ.get("ATTNLAB_TEST_MARK")


def test_ranks_see_the_callers_environment_as_it_is_at_the_call(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The ranks fork from a server started at the first call; the environment they run
    under is still the caller's at each call."""
    monkeypatch.delenv("ATTNLAB_TEST_MARK", raising=False)
    assert run_local(_mark, 2, timeout=60) == [None, None]
    monkeypatch.setenv("ATTNLAB_TEST_MARK", "set later")
    assert run_local(_mark, 2, timeout=60) == ["set later", "set later"]


def _one_rank_fails(rank: int, world: int, how: str) -> None:
    """Rank 1 fails (raises, or dies without a word) while rank 0 is busy for long."""
    if rank == 1 and how == "dies":
        os._exit(3)
    if rank == 1:
        raise ValueError("rank 1 gave up")
    time.sleep(1000)


@pytest.mark.parametrize("how", ["raises", "dies"])
def test_run_local_fails_fast_when_a_rank_fails(how: str) -> None:
    """One failed rank ends the run within seconds, naming it, and the busy rank is
    stopped. Before, the call waited out its whole timeout."""
    start = time.monotonic()
    with pytest.raises(RuntimeError) as info:
        run_local(_one_rank_fails, 2, how, timeout=100)
    assert time.monotonic() - start < 50
    text = str(info.value)
    want = "ValueError: rank 1 gave up" if how == "raises" else "exited with code 3"
    assert f"rank 1: {want}" in text
    assert "rank 0: stopped: no result 3.0 s after rank 1 failed" in text


def test_a_script_without_a_main_guard_fails_fast(tmp_path: pathlib.Path) -> None:
    """A script that calls run_local without ``if __name__ == "__main__":`` makes each
    rank run it again as it starts, and fail there: the caller learns of it at once, not
    after the call's timeout. (The timeout was 100 s and the limit 60 s from the script's
    start, which a loaded machine's three imports of torch came near: 27 s seen here
    beside 3 busy processes; now the timeout is 600 s, the limit half of it.)"""
    script = tmp_path / "no_guard.py"
    script.write_text(
        "from attnlab.distributed.launch import run_local\n"
        "def f(rank, world):\n    return rank\n"
        "print(run_local(f, 2, timeout=600))\n"
    )
    start = time.monotonic()
    res = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert time.monotonic() - start < 300  # (waiting out the timeout takes 600 s)
    assert res.returncode == 1 and "TimeoutError" not in res.stderr
    assert "rank 0: exited with code 1 before giving a result" in res.stderr


def _zero_scale(rank: int, world: int, dtype: torch.dtype, e: int) -> list[float]:
    """Errors of out, dq, dk, dv with ``scale=0.0`` against one process in float64."""
    torch.manual_seed(0)
    q, k, v, g = (torch.randn(1, 2, N, e, dtype=torch.float64) for _ in range(4))
    qs, ks, vs = (D.shard(t, rank, world).to(dtype).requires_grad_() for t in (q, k, v))
    out = D.attention(qs, ks, vs, mask=masks.causal(), scale=0.0)
    out.backward(D.shard(g, rank, world).to(dtype))
    ours = [_gather(t, world, "zigzag") for t in (out.detach(), qs.grad, ks.grad, vs.grad)]
    q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
    ref = attnlab.attention(q, k, v, mask=masks.causal(), scale=0.0, engine="reference")
    ref.backward(g)
    want = [ref.detach(), q.grad, k.grad, v.grad]
    return [(a - b).abs().max().item() for a, b in zip(ours, want, strict=True)]


@pytest.mark.parametrize(("dtype", "e"), [(torch.float64, 8), (torch.float32, 16)])
def test_a_zero_scale_is_the_mean_of_the_values_seen(dtype: torch.dtype, e: int) -> None:
    """(The steps divided by the scale: NaN gradients; torch's flash op gave NaN.)"""
    for errors in run_local(_zero_scale, 2, dtype, e, timeout=120):
        assert max(errors) < (1e-12 if dtype == torch.float64 else 1e-5), errors


def _zero_heads(rank: int, world: int, e: int, ev: int) -> tuple[tuple[int, ...], ...]:
    qs, ks = (torch.randn(1, 2, 6, e, requires_grad=True) for _ in range(2))
    vs = torch.randn(1, 2, 6, ev, requires_grad=True)
    out = D.attention(qs, ks, vs, mask=masks.causal())
    (out.sum() + 0 * (qs.sum() + ks.sum() + vs.sum())).backward()
    return tuple(out.shape), *(tuple(t.grad.shape) for t in (qs, ks, vs))  # type: ignore[union-attr]


@pytest.mark.parametrize(("e", "ev"), [(4, 0), (0, 3)])
def test_zero_head_sizes_run(e: int, ev: int) -> None:
    """(E = 0: the default scale raised ZeroDivisionError; Ev = 0: the kernel's backward
    raised std::bad_alloc.)"""
    for shapes in run_local(_zero_heads, 2, e, ev, timeout=120):
        assert shapes == ((1, 2, 6, ev), (1, 2, 6, e), (1, 2, 6, e), (1, 2, 6, ev))


@pytest.mark.parametrize("strategy", ["ring", "all-gather", "ulysses"])
def test_plan_counts_every_head_and_batch_row_of_a_mask_that_varies_by_them(strategy: str) -> None:
    """(Only batch 0 / head 0 of a per-head or per-batch mask was counted and repeated; a
    plan with nothing to do made simulate() divide by zero.) Against a dense count."""
    torch.manual_seed(0)
    t = torch.rand(2, 4, 64, 64) < 0.3  # (B, H, Lq, Lk), every head and row different
    per_pair = 2 * (8 + 8)  # QK^T and PV FLOPs of one allowed pair, E = Ev = 8
    for layout in ("zigzag", "contiguous"):
        p = D.plan(64, 2, mask=masks.tensor(t), batch=2, heads=4, head_dim=8,
                   strategy=strategy, layout=layout)  # fmt: skip
        assert sum(c.flops for c in p.ranks) == int(t.sum()) * per_pair
    fn = masks.custom(lambda b, h, q, k: (k <= q) & (h == 0), per_head=True)
    p = D.plan(64, 2, mask=fn, heads=4, head_dim=8, strategy=strategy)
    assert sum(c.flops for c in p.ranks) == 64 * 65 // 2 * per_pair  # head 0 only: causal
    for empty in (D.plan(0, 2, strategy=strategy), D.plan(4, 2, mask=masks.padding([0]))):
        assert D.simulate(empty, bandwidth=1e9, flops=1e9) == 1.0


def _master_port(rank: int, world: int) -> str:
    return os.environ["MASTER_PORT"]


def test_the_ranks_join_a_store_the_caller_holds_from_before_they_start(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The ranks' store port was found free, then bound by rank 0 once the ranks started:
    a port taken meanwhile failed the run, and a concurrent run's rank could join another's
    store (gloo's "connectFullMesh failed ... Connection closed by peer", seen once under
    ``pytest -n 2``). The caller makes the store, listening, before the ranks start, and
    the ranks' port is its port."""
    from attnlab.distributed import launch

    made: list[tuple[int, bool]] = []
    real = launch.dist.TCPStore

    def recorded(*args: object, **kwargs: object) -> object:
        store = real(*args, **kwargs)
        made.append((store.port, bool(kwargs.get("is_master"))))
        return store

    monkeypatch.setattr(launch.dist, "TCPStore", recorded)  # (the caller's: ranks fork apart)
    ports = run_local(_master_port, 2, timeout=60)
    assert len(made) == 1 and made[0][1], made  # one store, made here as the master
    assert ports == [str(made[0][0])] * 2
