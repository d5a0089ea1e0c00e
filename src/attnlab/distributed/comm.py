"""Communication of context-parallel attention: the group, counted point-to-point traffic,
and the metadata every rank checks before any data moves.

Every message goes through :func:`post` or :func:`all_gather_tensor`, which add its bytes
and peer to :data:`TRAFFIC`, so tests can hold the traffic against
:func:`attnlab.distributed.plan` and assert that a window run talks only to neighbours.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from attnlab._validate import broadcast_batch_size

__all__ = ["TRAFFIC", "Group", "Traffic", "gather_meta", "post", "wait_all"]

_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


@dataclass
class Traffic:
    """Bytes and peers (ranks in the group) of this process's messages since :meth:`reset`.

    Example:
        >>> t = Traffic()
        >>> t.count(sent=8, to=1)
        >>> t.sent, sorted(t.peers)
        (8, [1])
    """

    sent: int = 0
    received: int = 0
    peers: set[int] = field(default_factory=set)

    def count(self, *, sent: int = 0, received: int = 0, to: int | None = None) -> None:
        self.sent += sent
        self.received += received
        if to is not None:
            self.peers.add(to)

    def reset(self) -> None:
        self.sent, self.received, self.peers = 0, 0, set()


#: The traffic of this process's context-parallel calls (reset it before a measurement).
TRAFFIC = Traffic()


@dataclass(frozen=True)
class Group:
    """A process group with this rank's place in it."""

    handle: Any  # a torch.distributed ProcessGroup, or None for the default group
    rank: int
    world: int

    @staticmethod
    def of(group: Any) -> Group:
        """The group (default: the world), checked to be initialized and to hold this rank."""
        ok = group is None or not dist.is_available() or isinstance(group, dist.ProcessGroup)
        outside = not ok and type(group) is int and group == dist.GroupMember.NON_GROUP_MEMBER
        if not ok and not outside:  # (outside: new_group's answer on a rank outside it)
            raise TypeError(  # (a list was "unhashable", a name torch's "not registered")
                f"group must be a torch.distributed ProcessGroup (dist.new_group(...)) or None "
                f"for the world, got {type(group).__name__}"
            )
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError(
                "attnlab.distributed needs torch.distributed initialized "
                "(torch.distributed.init_process_group, or torchrun)"
            )
        rank = dist.get_rank(group)
        if rank < 0:
            raise ValueError(
                f"group does not contain this process (global rank {dist.get_rank()}); "
                "pass a group that every rank of the call belongs to"
            )
        return Group(group, rank, dist.get_world_size(group))

    def global_rank(self, r: int) -> int:
        return r if self.handle is None else dist.get_global_rank(self.handle, r)


def post(
    g: Group, sends: list[tuple[Tensor, int]], recvs: list[tuple[Tensor, int]], tag: int
) -> list[Any]:
    """Start sends and receives ``(tensor, peer rank in the group)``; returns the works."""
    works = []
    for t, peer in recvs:
        TRAFFIC.count(received=t.numel() * t.element_size(), to=peer)
        works.append(dist.irecv(t, src=g.global_rank(peer), group=g.handle, tag=tag))
    for t, peer in sends:
        TRAFFIC.count(sent=t.numel() * t.element_size(), to=peer)
        works.append(dist.isend(t, dst=g.global_rank(peer), group=g.handle, tag=tag))
    return works


def wait_all(works: list[Any]) -> None:
    for w in works:
        w.wait()


def all_gather_tensor(g: Group, t: Tensor) -> list[Tensor]:
    """Every rank's ``t`` (all the same shape), counted as received from each peer."""
    out = [torch.empty_like(t) for _ in range(g.world)]
    dist.all_gather(out, t.contiguous(), group=g.handle)
    nbytes = t.numel() * t.element_size()
    for peer in range(g.world):
        if peer != g.rank:
            TRAFFIC.count(sent=nbytes, received=nbytes, to=peer)
    return out


def gather_meta(g: Group, q: Tensor, k: Tensor, v: Tensor, flags: tuple[int, ...]) -> Tensor:
    """Every rank's ``(B, Hq, Hkv, L, E, Ev, dtype, *flags)`` as an int64 ``(P, 7 + F)``.

    Sent before any data, not counted in :data:`TRAFFIC`: every rank then checks the same
    table and raises the same error, so a bad call fails everywhere instead of hanging.
    """
    code = _DTYPES.index(q.dtype) if q.dtype in _DTYPES else len(_DTYPES)
    # the batch the call runs (a batch of 1 broadcasts): q's alone let ranks whose k and v
    # differed pass, and gloo aborted the process ("Received data size doesn't match")
    batch = broadcast_batch_size(q, k, v)
    row = torch.tensor(
        [batch, q.shape[1], k.shape[1], q.shape[2], q.shape[3], v.shape[3], code, *flags],
        dtype=torch.long,
        device=q.device,
    )
    rows = [torch.empty_like(row) for _ in range(g.world)]
    dist.all_gather(rows, row, group=g.handle)
    return torch.stack(rows)


def meta_dtype(code: int) -> str:
    """The dtype a :func:`gather_meta` row's ``code`` stands for, by name.

    Example:
        >>> meta_dtype(1), meta_dtype(9)
        ('float32', 'another dtype')
    """
    return (
        str(_DTYPES[code]).removeprefix("torch.") if 0 <= code < len(_DTYPES) else "another dtype"
    )
