"""The ring strategy: key/value shards travel between ranks, one step per distance.

At step ``t`` rank ``r`` receives the keys and values of rank ``r - t`` and sends its own
to rank ``r + t`` (mod ``P``), but only where the mask lets the receiver's queries see
any of them (:attr:`Setup.need`): a window run exchanges with its neighbours only, packed
documents only with the ranks whose documents overlap. Step ``t + 1``'s messages are
posted before step ``t`` computes, so sending overlaps compute. Backward exchanges the
keys and values again (nothing but this rank's shard is kept) and sends each peer the
gradient of its keys and values.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import Tensor

from attnlab._eager import first_order_only
from attnlab.distributed.comm import all_gather_tensor, post, wait_all
from attnlab.distributed.layout import Piece
from attnlab.distributed.merge import Merge, Own
from attnlab.distributed.setup import Setup
from attnlab.distributed.steps import Keys, Rows, backward_pair, forward_pair, kernel_rows

__all__ = ["FUNCTIONS", "GatheredAttention", "RingAttention", "offsets", "segments"]


def offsets(s: Setup, rank: int) -> list[int]:
    """Where each of ``rank``'s pieces starts inside its shard."""
    out, at = [], 0
    for a, b in s.pieces[rank]:
        out.append(at)
        at += b - a
    return out


def segments(s: Setup, receiver: int, owner: int) -> list[tuple[int, int, int]]:
    """``(offset in owner's shard, length, global start)`` of the keys of ``owner`` that
    ``receiver`` needs: the rows that travel, in this order."""
    out = []
    for o, (p0, _), rng in zip(
        offsets(s, owner), s.pieces[owner], s.keys[receiver][owner], strict=True
    ):
        if rng is not None:
            out.append((o + rng[0], rng[1] - rng[0], p0 + rng[0]))
    return out


KeyPiece = tuple[Piece, Tensor, Tensor]  # global range, keys (B, Hkv, Ks, E), values


def _views(segs: list[tuple[int, int, int]], k: Tensor, v: Tensor, packed: bool) -> list[KeyPiece]:
    """Key pieces of ``k, v``: the owner's whole shard (``packed`` False) or a message."""
    out, at = [], 0
    for o, n, g in segs:
        i = at if packed else o
        out.append(((g, g + n), k[:, :, i : i + n], v[:, :, i : i + n]))
        at += n
    return out


def _pack(segs: list[tuple[int, int, int]], k: Tensor, v: Tensor) -> Tensor:
    """The needed rows of ``k`` and ``v``, concatenated along L, flattened into one."""
    ks = torch.cat([k[:, :, o : o + n] for o, n, _ in segs], 2)
    vs = torch.cat([v[:, :, o : o + n] for o, n, _ in segs], 2)
    return torch.cat([ks.reshape(-1), vs.reshape(-1)])


def _unpack(s: Setup, segs: list[tuple[int, int, int]], buf: Tensor) -> tuple[Tensor, Tensor]:
    b, _, hkv, e, ev = s.sizes
    n = sum(x[1] for x in segs)
    k, v = buf.split([b * hkv * n * e, b * hkv * n * ev])
    return k.view(b, hkv, n, e), v.view(b, hkv, n, ev)


def _size(s: Setup, segs: list[tuple[int, int, int]]) -> int:
    b, _, hkv, e, ev = s.sizes
    return b * hkv * sum(x[1] for x in segs) * (e + ev)


class _Exchange:
    """One step's messages: ``send`` to ``dst`` and a buffer from ``src`` (if needed)."""

    def __init__(
        self, s: Setup, dst: int, send: Tensor | None, src: int, size: int, like: Tensor, tag: int
    ) -> None:
        self.buf = like.new_empty(size) if size else None
        # an empty message (B = 0) is not sent: its receiver posts no receive for it
        send = send if send is not None and send.numel() else None
        self.send = send  # kept alive until the send completes
        self.works: list[Any] = post(
            s.group,
            [(send, dst)] if send is not None else [],
            [(self.buf, src)] if self.buf is not None else [],
            tag,
        )

    def result(self) -> Tensor | None:
        wait_all(self.works)
        self.send = None
        return self.buf


def _kv_exchange(s: Setup, t: int, k: Tensor, v: Tensor, tag: int) -> _Exchange:
    """Step ``t`` of the ring: own keys to ``r + t``, keys of ``r - t`` in."""
    r, world = s.group.rank, s.group.world
    src, dst = (r - t) % world, (r + t) % world
    out = segments(s, dst, r)
    send = _pack(out, k, v) if out else None
    return _Exchange(s, dst, send, src, _size(s, segments(s, r, src)), k, tag)


def _kv_steps(s: Setup, k: Tensor, v: Tensor, tag: int) -> Any:
    """Yield ``(t, src, key pieces)`` per step, posting step ``t + 1``'s messages before
    handing out step ``t``."""
    r, world = s.group.rank, s.group.world
    if s.strategy == "all-gather":
        yield from _gathered(s, k, v)
        return
    ahead = _kv_exchange(s, 1, k, v, tag + 1) if world > 1 else None
    try:
        yield 0, r, _views(segments(s, r, r), k, v, packed=False)
        for t in range(1, world):
            assert ahead is not None
            buf, ahead = ahead.result(), None
            ahead = _kv_exchange(s, t + 1, k, v, tag + t + 1) if t + 1 < world else None
            src = (r - t) % world
            segs = segments(s, r, src)
            yield t, src, [] if buf is None else _views(segs, *_unpack(s, segs, buf), packed=True)
    finally:  # closed early (a step raised): the posted messages are still waited on; a
        # dropped send or receive hung the group's next collective
        if ahead is not None:
            ahead.result()


def _gathered(s: Setup, k: Tensor, v: Tensor) -> Any:
    """The all-gather strategy's steps: every whole shard gathered at once (padded to the
    longest), then handed out in ring order."""
    r, world = s.group.rank, s.group.world
    b, _, hkv, e, ev = s.sizes
    width = max(b * hkv * sum(y - x for x, y in s.pieces[p]) * (e + ev) for p in range(world))
    own = torch.cat([k.reshape(-1), v.reshape(-1)])
    padded = torch.cat([own, own.new_zeros(width - own.numel())])
    every = all_gather_tensor(s.group, padded) if world > 1 else [padded]
    for t in range(world):
        src = (r - t) % world
        n = sum(y - x for x, y in s.pieces[src])
        ks, vs = every[src][: b * hkv * n * (e + ev)].split([b * hkv * n * e, b * hkv * n * ev])
        ks, vs = (k, v) if t == 0 else (ks.view(b, hkv, n, e), vs.view(b, hkv, n, ev))
        yield t, src, _views(segments(s, r, src), ks, vs, packed=False)


PairLse = dict[tuple[int, Piece], tuple[Piece, Tensor]]


def ring_forward(
    s: Setup, q: Tensor, k: Tensor, v: Tensor
) -> tuple[Tensor, Tensor, PairLse, Own | None]:
    """``out (B, Hq, L, Ev)`` and ``lse (B, Hq, L)`` of this rank's queries (accumulation
    dtype), and for each (query piece, key range) pair the rows that see it and their own
    logsumexp, for the backward. A pair runs only the rows that see some of its keys.
    Where pairs may take the blocked kernel's backward, also each row's heaviest key
    range (:class:`~attnlab.distributed.merge.Own`)."""
    acc = torch.promote_types(q.dtype, torch.float32)
    r = s.group.rank
    b, hq, _, _, ev = s.sizes
    parts = [
        Merge(
            q.new_zeros((b, hq, hi - lo, ev), dtype=acc),
            # the logsumexp in float64: rounded once per merge at |lse|, float32's would
            # put several ulps of it into every probability the backward recomputes
            q.new_full((b, hq, hi - lo), float("-inf"), dtype=torch.float64),
            own=kernel_rows(s, q, v),
        )
        for lo, hi in s.pieces[r]
    ]
    pair_lse: PairLse = {}
    qo = offsets(s, r)
    with contextlib.closing(_kv_steps(s, k, v, tag=0)) as steps:
        for _, _, key_pieces in steps:
            _forward_step(s, q, key_pieces, parts, pair_lse, qo)
    done = [p.result() for p in parts]
    out, lse = torch.cat([d[0] for d in done], 2), torch.cat([d[1] for d in done], 2)
    owns = [d[2] for d in done if d[2] is not None]
    if len(owns) < len(done):
        return out, lse, pair_lse, None
    own = Own(*(torch.cat([getattr(o, f) for o in owns], 2) for f in ("key", "mass", "rest")))
    return out, lse, pair_lse, own


def _forward_step(
    s: Setup,
    q: Tensor,
    key_pieces: list[tuple[Piece, Tensor, Tensor]],
    parts: list[Merge],
    pair_lse: PairLse,
    qo: list[int],
) -> None:
    """One ring step of :func:`ring_forward`: this rank's query pieces over ``key_pieces``.
    Each pair's own logsumexp is kept in float64 (the sink path's ``beta`` is made from it:
    see :func:`~attnlab.distributed.steps._engine_step`)."""
    for kp, kj, vj in key_pieces:
        for i, qp in enumerate(s.pieces[s.group.rank]):
            rr = s.rows(qp, kp) if qp[1] > qp[0] else None
            if rr is None:
                continue
            qi = q[:, :, qo[i] + rr[0] : qo[i] + rr[1]]  # only the rows that see kp
            out, lse = forward_pair(s, qi, (qp[0] + rr[0], qp[0] + rr[1]), kj, vj, kp)
            pair_lse[(i, kp)] = (rr, lse.to(torch.float64, copy=True))
            parts[i].merge(out, lse, rr, key=kp[0])


def ring_backward(
    s: Setup,
    saved: tuple[Tensor, ...],
    pair_lse: PairLse,
    dout: Tensor,
    leaves: list[Tensor],
    own: Own | None = None,
) -> tuple[Tensor, Tensor, Tensor, list[Tensor]]:
    """``dq, dk, dv`` of this rank's shard and the bias leaves' gradients (``own``: each
    row's heaviest key range, from :func:`ring_forward`)."""
    q, k, v, out, lse = saved
    acc = out.dtype
    q, dout = q.to(acc), dout.to(acc)
    dq = torch.zeros_like(q)
    # the bias's gradients summed over pairs in float32 at least, returned in its dtypes
    dleaves = [
        torch.zeros_like(t, dtype=torch.promote_types(t.dtype, torch.float32)) for t in leaves
    ]
    r, world = s.group.rank, s.group.world
    rows = []
    for o, (a, b) in zip(offsets(s, r), s.pieces[r], strict=True):
        q_, do_, out_, lse_, dq_ = (x[:, :, o : o + b - a] for x in (q, dout, out, lse, dq))
        own_ = None if own is None else own.rows(o, o + b - a)
        rows.append(Rows(q_, do_, out_, lse_, dq_, first=a, own=own_))
    own_dk, own_dv = torch.zeros_like(k, dtype=acc), torch.zeros_like(v, dtype=acc)
    returns: list[tuple[_Exchange, list[tuple[int, int, int]]]] = []
    try:
        with contextlib.closing(_kv_steps(s, k.to(acc), v.to(acc), tag=world)) as steps:
            for t, src, key_pieces in steps:
                _backward_step(s, t, src, key_pieces, rows, pair_lse, (own_dk, own_dv),
                               (leaves, dleaves), returns)  # fmt: skip
    except BaseException:  # the gradients already posted are still waited on (a dropped
        for ex, _ in returns:  # message hung the group's next collective)
            ex.result()
        raise
    for ex, mine in returns:
        buf = ex.result()
        if buf is not None:
            for (_, dk_r, dv_r), (o, n, _) in zip(
                _views(mine, *_unpack(s, mine, buf), packed=True), mine, strict=True
            ):
                own_dk[:, :, o : o + n] += dk_r
                own_dv[:, :, o : o + n] += dv_r
    return dq, own_dk, own_dv, [d.to(t.dtype) for d, t in zip(dleaves, leaves, strict=True)]


def _backward_step(
    s: Setup,
    t: int,
    src: int,
    key_pieces: list[tuple[Piece, Tensor, Tensor]],
    rows: list[Rows],
    pair_lse: PairLse,
    own: tuple[Tensor, Tensor],
    bias: tuple[list[Tensor], list[Tensor]],
    returns: list[tuple[_Exchange, list[tuple[int, int, int]]]],
) -> None:
    """One ring step of :func:`ring_backward`: the gradients of ``src``'s keys from this
    rank's rows, sent back to ``src`` (their exchange appended to ``returns``)."""
    r, world = s.group.rank, s.group.world
    (own_dk, own_dv), (leaves, dleaves) = own, bias
    segs = segments(s, r, src)
    if t == 0:
        grads = _views(segs, own_dk, own_dv, packed=False)
    else:
        dk_all = own_dk.new_zeros((s.sizes[0], s.sizes[2], sum(x[1] for x in segs), s.sizes[3]))
        dv_all = own_dk.new_zeros((*dk_all.shape[:3], s.sizes[4]))
        grads = _views(segs, dk_all, dv_all, packed=True)
    for (kp, kj, vj), (_, dkj, dvj) in zip(key_pieces, grads, strict=True):
        keys = Keys(kj, vj, dkj, dvj, first=kp[0])
        for i in range(len(s.pieces[r])):
            if (i, kp) in pair_lse:
                rr, pl = pair_lse[(i, kp)]
                backward_pair(s, _row_slice(rows[i], rr), keys, pl, leaves, dleaves)
    if t > 0:  # the gradients of src's keys go back to src; ours come from r + t
        dst = (r + t) % world
        mine = segments(s, dst, r)
        send = torch.cat([dk_all.reshape(-1), dv_all.reshape(-1)]) if segs else None
        ex = _Exchange(s, src, send, dst, _size(s, mine), own_dk, 2 * world + t)
        returns.append((ex, mine))


def _row_slice(rw: Rows, rr: Piece) -> Rows:
    """Rows ``[a, b)`` of ``rw`` (views: ``dq`` still accumulates in place)."""
    a, b = rr
    if (a, b) == (0, rw.q.shape[2]):
        return rw
    q, do, out, lse, dq = (x[:, :, a:b] for x in (rw.q, rw.dout, rw.out, rw.lse, rw.dq))
    own = None if rw.own is None else rw.own.rows(a, b)
    return Rows(q, do, out, lse, dq, first=rw.first + a, own=own)


# what serves a second-order gradient instead of the ring's own backward
_INSTEAD = (
    "strategy='ulysses' with engine='reference' serves it (query and key/value heads "
    "divisible by the ranks), as attnlab.attention(..., engine='reference') does on the "
    "whole sequence"
)


def _what(strategy: str) -> str:
    return f"attnlab.distributed.attention(strategy={strategy!r})"


def _backward(ctx: Any, dout: Tensor) -> tuple[Tensor | None, ...]:
    """:meth:`RingAttention.backward` (first order only: see its refusal)."""
    q, k, v, out, lse, *leaves = ctx.saved_tensors
    saved = (q, k, v, out, lse)
    dq, dk, dv, dleaves = ring_backward(ctx.setup, saved, ctx.pair_lse, dout, leaves, ctx.own)
    dq, dk, dv = (g.to(d) for g, d in zip((dq, dk, dv), ctx.dtypes, strict=True))
    return (dq, dk, dv, None, *dleaves)


class RingAttention(torch.autograd.Function):
    """Ring attention over a :class:`Setup`: logsumexp merge forward, global-logsumexp
    recompute backward. Inputs ``q, k, v`` are this rank's shards ``(B, H, L_r, E)``.
    The backward is not differentiable: differentiating its gradients again (a
    ``create_graph=True`` gradient penalty, a Hessian) raises, naming what serves it
    (it returned them with no graph, so the second-order term was dropped silently)."""

    @staticmethod
    def forward(ctx: Any, q: Tensor, k: Tensor, v: Tensor, s: Setup, *leaves: Tensor) -> Tensor:
        out, lse, pair_lse, own = ring_forward(s, q, k, v)
        ctx.save_for_backward(q, k, v, out, lse, *leaves)
        ctx.setup, ctx.pair_lse, ctx.own = s, pair_lse, own
        ctx.dtypes = q.dtype, k.dtype, v.dtype
        return out.to(v.dtype)

    backward = staticmethod(first_order_only(_what("ring"), _INSTEAD)(_backward))


class GatheredAttention(RingAttention):
    """:class:`RingAttention` for the all-gather strategy, which its refusal names."""

    backward = staticmethod(first_order_only(_what("all-gather"), _INSTEAD)(_backward))


#: The autograd Function of each strategy that runs the ring's steps.
FUNCTIONS: dict[str, type[RingAttention]] = {"ring": RingAttention, "all-gather": GatheredAttention}
