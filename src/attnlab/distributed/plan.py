"""The cost model: per rank and per ring step, the bytes a call sends and receives and the
useful FLOPs it computes, a simulation of parallel efficiency from them, and the rule
(:func:`choose`) by which ``strategy="auto"`` picks ring, all-gather or Ulysses.

:func:`plan` needs no process group: it runs the same need-matrix logic as
:func:`attnlab.distributed.attention`, so its bytes equal what a run counts in
:data:`~attnlab.distributed.TRAFFIC` (the tests check it exactly at P = 2 and 4).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from attnlab._grid import Grid
from attnlab._validate import nonnegative_int, plain, positive_int
from attnlab.distributed.comm import Group
from attnlab.distributed.layout import validate_layout
from attnlab.distributed.ring import segments
from attnlab.distributed.setup import Setup, make_setup
from attnlab.masks import Mask

__all__ = ["CallPlan", "RankCost", "Step", "choose", "plan", "simulate"]

BACKWARD_FLOPS = 2.5  # backward recomputes S, then dP, dV, dQ, dK: 5 matmuls to forward's 2


@dataclass(frozen=True)
class Step:
    """One ring step of one rank: keys of ``src`` in, own keys out to ``dst``.

    Attributes:
        src, dst: peers of the step (this rank itself at step 0).
        received, sent: forward bytes of the step's key/value messages.
        flops: useful forward FLOPs on ``src``'s keys (allowed pairs x 4 x E x Hq).
    """

    src: int
    dst: int
    received: int
    sent: int
    flops: float


@dataclass(frozen=True)
class RankCost:
    """One rank's totals: forward and backward bytes, useful forward FLOPs, peers.

    Example:
        >>> from attnlab import masks
        >>> c = plan(1024, 2, mask=masks.causal(), heads=8, layout="contiguous").ranks[1]
        >>> [(s.src, s.received) for s in c.steps]  # its own keys, then rank 0's
        [(1, 0), (0, 2097152)]
        >>> c.forward_received, sorted(c.peers), c.flops
        (2097152, [0], 805830656.0)
    """

    steps: tuple[Step, ...]
    forward_sent: int
    forward_received: int
    backward_sent: int
    backward_received: int
    peers: frozenset[int]

    @property
    def flops(self) -> float:
        return sum(s.flops for s in self.steps)


@dataclass(frozen=True)
class CallPlan:
    """What a call costs on every rank (see :func:`plan`).

    Example:
        >>> from attnlab import masks
        >>> print(plan(1024, 2, mask=masks.causal(), heads=8, layout="contiguous"))
        ring, contiguous, P=2
          rank 0: fwd 2.10/0.00 MB out/in, bwd 2.10/2.10 MB, 0.27 GFLOP, peers [1]
          rank 1: fwd 0.00/2.10 MB out/in, bwd 2.10/2.10 MB, 0.81 GFLOP, peers [0]
        >>> [round(c.flops / 1e9, 2) for c in plan(1024, 2, mask=masks.causal()).ranks]  # zigzag
        [0.54, 0.54]
    """

    strategy: str
    layout: str
    ranks: tuple[RankCost, ...]

    def __str__(self) -> str:
        lines = [f"{self.strategy}, {self.layout}, P={len(self.ranks)}"]
        for r, c in enumerate(self.ranks):
            lines.append(
                f"  rank {r}: fwd {c.forward_sent / 1e6:.2f}/{c.forward_received / 1e6:.2f} MB "
                f"out/in, bwd {c.backward_sent / 1e6:.2f}/{c.backward_received / 1e6:.2f} MB, "
                f"{c.flops / 1e9:.2f} GFLOP, peers {sorted(c.peers)}"
            )
        return "\n".join(lines)


def plan(
    n: int,
    world: int,
    *,
    mask: Mask | None = None,
    batch: int = 1,
    heads: int = 8,
    kv_heads: int | None = None,
    head_dim: int = 64,
    element_size: int = 4,
    strategy: str = "ring",
    layout: str = "zigzag",
) -> CallPlan:
    """Per-rank bytes and useful FLOPs of :func:`attnlab.distributed.attention`.

    Args:
        n: global sequence length; world: number of ranks.
        mask: the global mask (asked for its row intervals, as the call does).
        batch, heads, kv_heads, head_dim: ``B``, ``Hq``, ``Hkv`` (default ``Hq``), ``E``.
        element_size: bytes per element (4 for float32; backward sends float32 at least).
        strategy, layout: as in :func:`~attnlab.distributed.attention` (``"auto"``:
            the strategy :func:`choose` picks, named in the returned plan).

    Example:
        >>> from attnlab import masks
        >>> p = plan(4096, 4, mask=masks.causal() & masks.window(128), layout="contiguous")
        >>> sorted(p.ranks[1].peers), p.ranks[1].forward_received
        ([0, 2], 524288)
    """
    validate_layout(layout)
    nonnegative_int("n", n)
    if mask is not None and not isinstance(mask, Mask):
        raise TypeError(f"mask must be an attnlab.masks mask or None, got {type(mask).__name__}")
    counts = {"world": world, "batch": batch, "heads": heads, "head_dim": head_dim}
    for name, value in {**counts, "element_size": element_size}.items():
        positive_int(name, value)
    names = ("ring", "all-gather", "ulysses", "auto")  # api.STRATEGIES (api imports this)
    if strategy not in names:
        raise ValueError(f"strategy must be one of {names}, got {strategy!r}")
    hkv = heads if kv_heads is None else positive_int("kv_heads", kv_heads)
    if heads % hkv:
        raise ValueError(
            f"heads must be a multiple of kv_heads (each key/value head serves a group of "
            f"query heads), got heads={heads}, kv_heads={hkv}"
        )
    if strategy == "ulysses" and (heads % world or hkv % world):
        raise ValueError(
            f"strategy='ulysses' needs heads and kv_heads divisible by world={world}, "
            f"got heads={heads}, kv_heads={hkv}"
        )
    sizes = (batch, heads, hkv, head_dim, head_dim)
    s = make_setup(Group(None, 0, world), n, layout, strategy, mask, None, 1.0, "auto", sizes)
    if strategy == "auto":
        s = replace(s, strategy=choose(s))
    if s.strategy == "ulysses":
        total = sum(_flops(s, r, src) for r in range(world) for src in range(world))
        ranks = tuple(_ulysses(s, r, element_size, total / world) for r in range(world))
        return CallPlan(s.strategy, layout, ranks)
    ranks = tuple(_rank(s, r, element_size) for r in range(world))
    return CallPlan(s.strategy, layout, ranks)


def choose(s: Setup) -> str:
    """The strategy ``strategy="auto"`` runs for the call planned in ``s``.

    The rule, from this module's byte counts (the same on every rank):

    1. ``"ulysses"`` if ``Hq`` and ``Hkv`` both divide by ``P`` and its busiest rank moves
       fewer bytes (forward + backward, sent + received) than the ring's busiest rank;
    2. else ``"all-gather"`` if there are fewer key/value heads than query heads (GQA/MQA:
       the gathered keys are small) and the mask needs every rank's keys on every rank
       (so gathering everything wastes nothing the ring would skip);
    3. else ``"ring"``.

    Example:
        >>> from attnlab import masks
        >>> from attnlab.distributed.setup import make_setup
        >>> s = make_setup(Group(None, 0, 4), 4096, "zigzag", "auto", masks.causal(), None,
        ...                1.0, "auto", (1, 32, 4, 64, 64))
        >>> choose(s)
        'all-gather'
    """
    world, (_, hq, hkv, _, _) = s.group.world, s.sizes
    ring = max(_busiest(_bytes(s, r, 4)) for r in range(world))  # (float32 units)
    if hq % world == 0 and hkv % world == 0:
        uly = max(_busiest(_ulysses_bytes(s, r, 4)) for r in range(world))
        if uly < ring:
            return "ulysses"
    if hkv < hq and all(all(row) for row in s.need):
        return "all-gather"
    return "ring"


def _busiest(b: tuple[int, int, int, int]) -> int:
    return sum(b)


def _bytes(s: Setup, r: int, element_size: int) -> tuple[int, int, int, int]:
    """Rank ``r``'s ring or all-gather bytes: forward sent, received, backward sent,
    received (the backward's in float32 at least: half precision is summed in it)."""
    world = s.group.world
    b, _, hkv, e, ev = s.sizes

    def elements(receiver: int, owner: int) -> int:
        rows = sum(x[1] for x in segments(s, receiver, owner))
        return b * hkv * rows * (e + ev)

    ring_in = sum(elements(r, (r - t) % world) for t in range(1, world))
    ring_out = sum(elements((r + t) % world, r) for t in range(1, world))
    if s.strategy == "all-gather":
        shard = [b * hkv * sum(y - x for x, y in s.pieces[p]) * (e + ev) for p in range(world)]
        fwd_in = fwd_out = (world - 1) * max(shard)
    else:
        fwd_in, fwd_out = ring_in, ring_out
    # backward: the keys again as forward, plus each peer's key gradients sent back
    back = max(element_size, 4)
    return (
        fwd_out * element_size,
        fwd_in * element_size,
        (fwd_out + ring_in) * back,
        (fwd_in + ring_out) * back,
    )


def _ulysses_bytes(s: Setup, r: int, element_size: int) -> tuple[int, int, int, int]:
    """Rank ``r``'s Ulysses bytes: q, k, v out by head group, the output back; backward
    is the same all-to-alls reversed (gradients in the input dtype)."""
    world = s.group.world
    b, hq, hkv, e, ev = s.sizes
    own = sum(y - x for x, y in s.pieces[r])
    others = s.n - own
    per_row = (hq * e + hkv * (e + ev)) // world  # q, k, v of one position, one head group
    out_row = hq // world * ev
    sent = ((world - 1) * own * per_row + others * out_row) * b * element_size
    received = (others * per_row + (world - 1) * own * out_row) * b * element_size
    return sent, received, received, sent


def _ulysses(s: Setup, r: int, element_size: int, flops: float) -> RankCost:
    """One rank's Ulysses cost: one all-to-all step, a ``1/P`` share of the useful work."""
    fwd_out, fwd_in, bwd_out, bwd_in = _ulysses_bytes(s, r, element_size)
    peers = (
        frozenset(p for p in range(s.group.world) if p != r) if fwd_out + fwd_in else frozenset()
    )
    step = Step(r, r, fwd_in, fwd_out, flops)
    return RankCost((step,), fwd_out, fwd_in, bwd_out, bwd_in, peers)


def _rank(s: Setup, r: int, element_size: int) -> RankCost:
    """One rank's steps: the rows of keys that travel (:func:`segments`), both ways."""
    world = s.group.world
    b, _, hkv, e, ev = s.sizes

    def nbytes(receiver: int, owner: int) -> int:
        rows = sum(x[1] for x in segments(s, receiver, owner))
        return b * hkv * rows * (e + ev) * element_size

    steps = []
    for t in range(world):
        src, dst = (r - t) % world, (r + t) % world
        got, gave = (nbytes(r, src), nbytes(dst, r)) if t else (0, 0)
        steps.append(Step(src, dst, got, gave, _flops(s, r, src)))
    peers = frozenset(x.src for x in steps if x.received) | {x.dst for x in steps if x.sent}
    return RankCost(tuple(steps), *_bytes(s, r, element_size), peers)


def _flops(s: Setup, r: int, src: int) -> float:
    """Useful forward FLOPs of rank ``r``'s queries on rank ``src``'s keys."""
    b, hq, _, e, ev = s.sizes
    pairs = 0
    for qp in s.pieces[r]:
        for kp in s.pieces[src]:
            if qp[1] > qp[0] and kp[1] > kp[0] and s.span(qp, kp) is not None:
                pairs += _allowed(s, qp, kp)
    bm, hm = _extent(s)  # what _allowed summed over; the rest repeats it
    return float(pairs * (b // bm) * (hq // hm) * 2 * (e + ev))


def _extent(s: Setup) -> tuple[int, int]:
    """The batch rows and heads :func:`_allowed` sums over: those the mask varies by
    (a padding mask's interval rows; a per-head tensor mask's heads), else 1."""
    if s.mask is None:
        return 1, 1
    if s.bounds is not None and s.bounds.exact:
        return s.bounds.lo.shape[0], 1
    b, hq = s.sizes[0], s.sizes[1]
    return (b if s.mask.per_batch else 1), (hq if s.mask.per_head else 1)


def _allowed(s: Setup, q: tuple[int, int], k: tuple[int, int]) -> int:
    """Allowed (query, key) pairs of one piece pair, summed over :func:`_extent` (only
    batch 0 and head 0 of a per-batch or per-head mask were counted)."""
    if s.mask is None:
        return (q[1] - q[0]) * (k[1] - k[0])
    if s.bounds is not None and s.bounds.exact:
        lo = s.bounds.lo[:, q[0] : q[1]].clamp(min=k[0])
        hi = s.bounds.hi[:, q[0] : q[1]].clamp(max=k[1] - 1)
        return int((hi - lo + 1).clamp(min=0).sum())
    bm, hm = _extent(s)
    total = 0
    for a in range(q[0], q[1], 256):
        rows, keys = torch.arange(a, min(a + 256, q[1])), torch.arange(*k)
        grid = Grid.tile(rows, keys, lq=s.n, lk=s.n, batch=bm, heads=hm)
        total += int(torch.broadcast_to(s.mask(grid), (bm, hm, len(rows), len(keys))).sum())
    return total


def _rate(name: str, value: object, low: bool = False) -> float:
    """``value`` as a finite float > 0 (>= 0 where ``low``; numpy's numbers too), or an
    error naming ``name`` (a negative or NaN latency predicted a perfect 1.0)."""
    number = plain(value)
    if isinstance(number, bool) or not isinstance(number, int | float):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not (number >= 0 if low else number > 0) or number == float("inf"):
        raise ValueError(f"{name} must be a finite number {'>=' if low else '>'} 0, got {value!r}")
    return float(number)


def simulate(
    p: CallPlan, *, bandwidth: float, flops: float, latency: float = 0.0, backward: bool = True
) -> float:
    """Predicted parallel efficiency of a plan: ideal time over the slowest rank's time.

    Each ring step takes ``max(compute, the next step's transfer)`` (sends overlap
    compute); ``bandwidth`` is bytes/s per direction of a rank's link, ``flops`` its
    attention compute rate, ``latency`` seconds added to every step that moves data.
    Backward computes ``BACKWARD_FLOPS`` x forward's work and moves keys in and key
    gradients out at every step.

    Example:
        >>> from attnlab import masks
        >>> e = simulate(plan(8192, 4, mask=masks.causal()), bandwidth=1e9, flops=1e11)
        >>> 0.9 < e <= 1.0
        True
    """
    if not isinstance(p, CallPlan):
        raise TypeError(f"p must be a plan(...) result, got {type(p).__name__}")
    bandwidth, flops = _rate("bandwidth", bandwidth), _rate("flops", flops)
    latency = _rate("latency", latency, low=True)
    if not isinstance(backward, bool):
        raise TypeError(f"backward must be a bool, got {type(backward).__name__}")
    factor = 1 + (BACKWARD_FLOPS if backward else 0)
    total = sum(c.flops for c in p.ranks) * factor
    ideal = total / (len(p.ranks) * flops)
    if p.strategy in ("all-gather", "ulysses"):  # collectives before and after compute
        times = [
            (c.forward_received + (c.backward_received if backward else 0)) / bandwidth
            + c.flops * factor / flops
            for c in p.ranks
        ]
    else:
        times = [_rank_time(c, bandwidth, flops, latency, backward) for c in p.ranks]
    return ideal / max(times) if max(times) > 0 else 1.0  # (nothing to do: none is lost)


def _rank_time(
    c: RankCost, bandwidth: float, flops: float, latency: float, backward: bool
) -> float:
    steps = c.steps
    moves = [
        max(s.received, s.sent) / bandwidth + (latency if s.received or s.sent else 0.0)
        for s in steps
    ] + [0.0]
    time = 0.0
    for t, s in enumerate(steps):
        time += max(s.flops / flops, moves[t + 1])
    if backward:
        for t, s in enumerate(steps):
            time += max(BACKWARD_FLOPS * s.flops / flops, moves[t + 1] + moves[t])
    return time
