"""The logsumexp merge of partial attention results over disjoint keys (the forward of
context parallelism), and each row's heaviest part kept apart from the others for the
backward (:class:`Own`).

A pair's backward makes ``dS = P (dP - delta)``; where ``delta`` is made of the merged
output it misses the kernel's ``P`` and ``dP`` by rounding, and the keys that hold most of
a row's probability carry that miss whole: a row of one key, whose exact dQ is 0, got a
dQ of rounding, and dK 4.4x plain PyTorch's float32 error (global tokens, queries and keys
of standard deviation 3). The blocked kernel makes the delta of its own ``P`` and ``dP``
given the other parts' share of it, which :class:`Own` holds to the precision of that
share.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["Merge", "Own", "Partial"]


@dataclass
class Partial:
    """A running merge of partial attention results of some query rows.

    Attributes:
        out: ``(B, Hq, T, Ev)`` in the accumulation dtype.
        lse: ``(B, Hq, T)``, ``-inf`` where no key has been seen.
    """

    out: Tensor
    lse: Tensor
    empty: bool = True

    def merge(self, out: Tensor, lse: Tensor, rows: tuple[int, int] | None = None) -> None:
        """Fold in another partial result over disjoint keys, of all rows or of rows
        ``[a, b)`` (``out (B, Hq, b - a, Ev)``, ``lse (B, Hq, b - a)``)."""
        a, b = rows or (0, self.out.shape[2])
        if self.empty and (a, b) == (0, self.out.shape[2]):  # nothing to rescale
            self.out, self.lse, self.empty = out.to(self.out.dtype), lse.to(self.lse.dtype), False
            return
        old_out, old_lse = self.out[:, :, a:b], self.lse[:, :, a:b]
        new = torch.logaddexp(old_lse, lse)  # (B, Hq, b - a)
        safe = torch.where(torch.isfinite(new), new, torch.zeros_like(new))
        wa, wb = (torch.exp(x - safe).to(old_out.dtype).unsqueeze(-1) for x in (old_lse, lse))
        merged = old_out * wa + out.to(self.out.dtype) * wb
        if (a, b) == (0, self.out.shape[2]):
            self.out, self.lse = merged, new
        else:  # in place: only these rows change (self.out is this merge's own tensor)
            self.out[:, :, a:b], self.lse[:, :, a:b] = merged, new
        self.empty = False


@dataclass(frozen=True)
class Own:
    """Of some query rows: the key piece that holds most of each row's probability, and
    what the other pieces hold, for that piece's backward to make its rows' delta itself.

    Attributes:
        key: ``(B, Hq, T)`` int64, the global start of the heaviest key piece (-1: none).
        mass: ``(B, Hq, T)`` float64, that piece's share of its row's probability.
        rest: ``(B, Hq, T, Ev)``, the other pieces' ``sum_j p_ij v_j`` (global ``p``).
    """

    key: Tensor
    mass: Tensor
    rest: Tensor

    def rows(self, a: int, b: int) -> Own:
        """Rows ``[a, b)``."""
        return Own(self.key[:, :, a:b], self.mass[:, :, a:b], self.rest[:, :, a:b])

    def of(self, first: int, dout: Tensor) -> tuple[Tensor, Tensor] | None:
        """``(mass, shift)`` of the rows whose heaviest piece starts at ``first`` (mass 0
        elsewhere), given their upstream gradient ``dout (B, Hq, T, Ev)``: ``shift`` is
        the other pieces' ``sum_j P_ij dP_ij``. None where no row's is."""
        mine = self.key == first  # (B, Hq, T)
        if not bool(mine.any()):
            return None
        shift = (dout.double() * self.rest.double()).sum(-1)  # (B, Hq, T)
        return torch.where(mine, self.mass, 0.0), torch.where(mine, shift, 0.0)


class Merge:
    """The merge of some query rows' partial results; with ``own``, each row's heaviest
    key piece kept apart from the others (:class:`Own`), and merged last.

    Args:
        out: zeros ``(B, Hq, T, Ev)`` in the accumulation dtype.
        lse: ``-inf`` ``(B, Hq, T)`` (float64).
        own: whether to keep each row's heaviest piece apart.
    """

    def __init__(self, out: Tensor, lse: Tensor, own: bool) -> None:
        self.rest = Partial(out, lse)
        self.top = Partial(out.clone(), lse.clone()) if own else None
        self.key = torch.full(lse.shape, -1, dtype=torch.int64, device=lse.device)

    def merge(self, out: Tensor, lse: Tensor, rows: tuple[int, int], key: int) -> None:
        """Fold in rows ``[a, b)``'s result over the key piece that starts at ``key``."""
        top = self.top
        if top is None:
            self.rest.merge(out, lse, rows)
            return
        (a, b), n = rows, top.out.shape[2]
        out, lse = out.to(top.out.dtype), lse.to(top.lse.dtype)
        if top.empty and (a, b) == (0, n):  # every row's first piece: nothing to compare
            top.out, top.lse, top.empty = out, lse, False
            self.key.fill_(key)  # (a row without keys here has mass 0: key unused)
            return
        top_out, top_lse, top_key = top.out[:, :, a:b], top.lse[:, :, a:b], self.key[:, :, a:b]
        wins = lse > top_lse  # (B, Hq, T): the new piece is this row's heaviest so far
        up = wins.unsqueeze(-1)
        # new tensors (torch.where): the rest's merge may keep what it is given
        self.rest.merge(torch.where(up, top_out, out), torch.where(wins, top_lse, lse), rows)
        new = torch.where(up, out, top_out), torch.where(wins, lse, top_lse)
        new_key = torch.where(wins, key, top_key)
        if (a, b) == (0, n):
            (top.out, top.lse), self.key = new, new_key
        else:  # in place: only these rows change (top.out is this merge's own tensor)
            for dst, src in zip((top_out, top_lse, top_key), (*new, new_key), strict=True):
                dst.copy_(src)
        top.empty = False

    def result(self) -> tuple[Tensor, Tensor, Own | None]:
        """``out (B, Hq, T, Ev)``, ``lse (B, Hq, T)`` and, with ``own``, the heaviest
        pieces (:class:`Own`)."""
        rest = self.rest
        if self.top is None:
            return rest.out, rest.lse, None
        top = self.top
        if rest.empty:  # one piece per row: nothing else holds any of its probability
            mass = torch.isfinite(top.lse).to(torch.float64)
            return top.out, top.lse, Own(self.key, mass, torch.zeros_like(top.out))
        lse = torch.logaddexp(top.lse, rest.lse)  # (B, Hq, T)
        safe = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
        mass, other = torch.exp(top.lse - safe), torch.exp(rest.lse - safe)
        kept = rest.out * other.to(rest.out.dtype).unsqueeze(-1)  # (B, Hq, T, Ev)
        out = top.out * mass.to(top.out.dtype).unsqueeze(-1) + kept
        return out, lse, Own(self.key, mass, kept)
