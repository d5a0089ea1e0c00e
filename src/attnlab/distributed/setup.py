"""What every rank knows about one context-parallel call: sizes, pieces, and which
(query piece, key piece) pairs the mask leaves empty.

The mask is asked through its public protocol: its global row intervals
(:meth:`~attnlab.masks.Mask.row_bounds`) decide in ``O(N)`` which pairs, and so which
peers, a rank needs. A mask without intervals is assumed to need every pair (exact, only
slower). Every rank computes the same answer, so sends and receives always match.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from attnlab.bias import Bias
from attnlab.distributed.comm import Group
from attnlab.distributed.layout import Piece, pieces
from attnlab.masks import Mask, RowBounds

__all__ = ["Setup", "make_setup"]


@dataclass(frozen=True)
class Setup:
    """One call's plan, the same on every rank.

    Attributes:
        group: the process group and this rank's place in it.
        n: the global sequence length.
        layout: ``"contiguous"`` or ``"zigzag"``.
        pieces: each rank's global ranges ``[start, stop)``, in shard order.
        strategy: ``"ring"``, ``"all-gather"`` or ``"ulysses"`` (``"auto"`` is resolved by
            the cost model's ``choose`` after this is made).
        mask, bias, scale, engine: as in :func:`attnlab.attention`, at global positions.
        bounds: the mask's global row intervals ``(Bm, N)``, or None.
        need: ``need[r][s]``: rank ``r``'s queries see some key of rank ``s``.
        keys: ``keys[r][s][j]``: the local key range ``[a, b)`` of rank ``s``'s piece ``j``
            that rank ``r``'s queries may see (None: none); only these rows travel.
        sizes: ``(B, Hq, Hkv, E, Ev)``.
        cpu: whether the shards are on the CPU.
    """

    group: Group
    n: int
    layout: str
    strategy: str
    pieces: list[list[Piece]]
    mask: Mask | None
    bias: Bias | None
    scale: float
    engine: str
    bounds: RowBounds | None
    need: list[list[bool]]
    keys: list[list[list[Piece | None]]]
    sizes: tuple[int, int, int, int, int]
    cpu: bool = True

    def span(self, q: Piece, k: Piece) -> Piece | None:
        """Local key range ``[a, b)`` of piece ``k`` that rows ``q`` may see, or None."""
        ks, ke = k
        if self.bounds is None:
            return (0, ke - ks)
        lo, hi = self.bounds.lo[:, q[0] : q[1]], self.bounds.hi[:, q[0] : q[1]]  # (Bm, T)
        lo, hi = lo.clamp(min=ks), hi.clamp(max=ke - 1)
        some = lo <= hi
        if not bool(some.any()):
            return None
        a = int(torch.where(some, lo, ke).min())
        b = int(torch.where(some, hi, ks - 1).max()) + 1
        return (a - ks, b - ks)

    def rows(self, q: Piece, k: Piece) -> Piece | None:
        """Local row range ``[a, b)`` of piece ``q`` whose rows may see a key of piece
        ``k``, or None (a window's neighbour pair: only the first ``w`` rows)."""
        qs, qe = q
        if self.bounds is None:
            return (0, qe - qs)
        lo, hi = self.bounds.lo[:, qs:qe], self.bounds.hi[:, qs:qe]  # (Bm, T)
        some = ((lo <= k[1] - 1) & (hi >= k[0]) & (lo <= hi)).any(0)  # (T,)
        idx = torch.nonzero(some).flatten()
        if idx.numel() == 0:
            return None
        return (int(idx[0]), int(idx[-1]) + 1)

    def full(self, q: Piece, k: Piece) -> bool:
        """Whether the mask allows every pair of rows ``q`` and keys ``k`` (exactly)."""
        if self.mask is None:
            return True
        if self.bounds is None or not self.bounds.exact:
            return False
        lo, hi = self.bounds.lo[:, q[0] : q[1]], self.bounds.hi[:, q[0] : q[1]]
        return bool((lo <= k[0]).all() and (hi >= k[1] - 1).all())

    def key_ranges(self, r: int, s: int) -> list[Piece | None]:
        """Per piece of rank ``s``: the union of the key spans rank ``r``'s pieces see."""
        out: list[Piece | None] = []
        for kp in self.pieces[s]:
            spans = [self.span(qp, kp) for qp in self.pieces[r] if qp[1] > qp[0]]
            found = [x for x in spans if x is not None] if kp[1] > kp[0] else []
            out.append((min(a for a, _ in found), max(b for _, b in found)) if found else None)
        return out


def make_setup(
    group: Group,
    n: int,
    layout: str,
    strategy: str,
    mask: Mask | None,
    bias: Bias | None,
    scale: float,
    engine: str,
    sizes: tuple[int, int, int, int, int],
) -> Setup:
    """The plan of a call with global length ``n`` and ``sizes = (B, Hq, Hkv, E, Ev)``."""
    b, hq = sizes[0], sizes[1]
    if mask is not None:
        mask.check(batch=b, heads=hq, lq=n, lk=n)
    if bias is not None:
        bias.check(batch=b, heads=hq, lq=n, lk=n)
    bounds = _bounds(mask, n, b)
    ps = [pieces(n, r, group.world, layout) for r in range(group.world)]
    setup = Setup(group, n, layout, strategy, ps, mask, bias, scale, engine, bounds, [], [], sizes)
    world = range(group.world)
    keys = [[setup.key_ranges(r, s) for s in world] for r in world]
    need = [[any(x is not None for x in keys[r][s]) for s in world] for r in world]
    return Setup(
        group, n, layout, strategy, ps, mask, bias, scale, engine, bounds, need, keys, sizes
    )


def _bounds(mask: Mask | None, n: int, batch: int) -> RowBounds | None:
    """The mask's global row intervals ``(Bm, N)`` (on the CPU), or None."""
    if mask is None or mask.per_head:
        return None
    bounds = mask.row_bounds(n, n, batch if mask.per_batch else 1, "cpu")
    if bounds is None:
        return None
    lo, hi = torch.broadcast_tensors(bounds.lo, bounds.hi)  # (Bm, N) each
    return RowBounds(lo.cpu(), hi.cpu(), bounds.exact)
