"""Large zeroed CPU results that cost only the pages written, and a cache that reuses them.

Attention weights of a window or document mask are mostly zeros: ``(B, H, L, L)`` floats
whose band is all that is ever written. :func:`lazy_zeros` hands out such a result as an
anonymous memory map, so the OS backs (and zeroes) a page only when it is first written.
Each first write is a page fault, and unmapping the result costs again, which at 4096
tokens is a third of a weights call. So a map whose tensor has died goes back to a small
cache instead of to the OS, and the next request of the same size takes it after zeroing
just the pages that were written (``/proc/self/pagemap`` names them, whoever wrote them).

* ``ATTNLAB_ZEROS_CACHE_MB`` bounds the written memory the cache may keep (default 1024;
  ``0`` turns the cache off); :func:`empty_cache` gives it all back.
* At most :data:`MAX_KEPT` (16) maps are kept, the oldest making room, and a map with no
  written page is unmapped: it would save nothing (a new map faults no page either) and
  cost 0 under the limit, so all-padding weights at 600 lengths kept 600 maps (0 MiB
  written, 44 GiB of address space, ENOMEM under ``ulimit -v``).
* A map of which more than half was written (or read: reading maps zero pages, which
  look alike) is unmapped rather than kept: zeroing it would cost more than a new one.
* Without a readable ``pagemap`` nothing is cached.
* :func:`lazy_zeros_unzeroed` leaves the zeroing of a reused map's written pages to the
  caller, who may fold it into its own pass over the result (the weights kernel does).
"""

from __future__ import annotations

import math
import mmap
import threading
import weakref

import numpy as np
import torch
from torch import Tensor

from attnlab._validate import env_mib

__all__ = ["PAGE", "cache_info", "empty_cache", "lazy_zeros", "lazy_zeros_unzeroed"]

MIN_BYTES = 1 << 24  # smaller results are plain torch.zeros
MAX_KEPT = 16  # maps kept at most: the weights of a 12-layer model, each layer's map reused
PAGE = mmap.PAGESIZE  # bytes per page: the unit of lazy_zeros_unzeroed's dirty pages
_ENV = "ATTNLAB_ZEROS_CACHE_MB"


class _Cache:
    """Maps whose tensors died, oldest first, each with its size and the indices of its
    written pages. A map that does not fit under the limit, or past :data:`MAX_KEPT` maps,
    evicts the oldest: a cache that kept the first sizes it saw was full of lengths no call
    asked for again (16 lengths of weights: 965 MiB held, 0 hits)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.free: list[tuple[int, mmap.mmap, np.ndarray]] = []  # (bytes, map, written pages)
        self.held = 0  # bytes of written pages in ``free``
        self.hits = 0
        self.misses = 0

    def limit(self) -> int:
        return env_mib(_ENV, 1024) << 20

    def take(self, nbytes: int) -> tuple[mmap.mmap, np.ndarray] | None:
        with self.lock:
            for i in range(len(self.free) - 1, -1, -1):  # the newest of that size
                if self.free[i][0] == nbytes:
                    _, mm, dirty = self.free.pop(i)
                    self.held -= dirty.size * PAGE
                    self.hits += 1
                    return mm, dirty
            self.misses += 1
            return None

    def give(self, mm: mmap.mmap, addr: int) -> None:
        """Called when the last tensor on ``mm`` dies: keep it (the oldest maps make room),
        or unmap it."""
        dirty = _written_pages(addr, len(mm) // PAGE)
        cost = len(mm) if dirty is None else dirty.size * PAGE
        close = [mm]
        if dirty is not None and 0 < 2 * cost <= len(mm):  # (unwritten: a new map is as cheap)
            with self.lock:
                limit = self.limit()
                if cost <= limit:
                    close.clear()
                    while self.free and (self.held + cost > limit or len(self.free) >= MAX_KEPT):
                        _, old, old_dirty = self.free.pop(0)
                        self.held -= old_dirty.size * PAGE
                        close.append(old)
                    self.free.append((len(mm), mm, dirty))
                    self.held += cost
        for m in close:
            m.close()

    def clear(self) -> None:
        with self.lock:
            maps = [mm for _, mm, _ in self.free]
            self.free.clear()
            self.held = 0
        for mm in maps:
            mm.close()


_CACHE = _Cache()


def _written_pages(addr: int, npages: int) -> np.ndarray | None:
    """Indices of the pages of ``[addr, addr + npages * PAGE)`` that are backed (present or
    swapped out), or None when ``/proc/self/pagemap`` cannot be read."""
    try:
        with open("/proc/self/pagemap", "rb") as fh:
            fh.seek(addr // PAGE * 8)
            raw = fh.read(npages * 8)
    except OSError:
        return None
    if len(raw) != npages * 8:
        return None
    entries = np.frombuffer(raw, dtype=np.uint64)  # bit 63: present, bit 62: swapped
    return np.flatnonzero(entries >> np.uint64(62))


def lazy_zeros(shape: tuple[int, ...], like: Tensor) -> Tensor:
    """Zeros of ``shape`` with ``like``'s dtype and device. A CPU result of 16 MiB or more
    is a private anonymous memory map (a page is backed only when written; reading the rest
    reads zeros), taken from the cache of dead ones when one of its size is there.

    Example:
        >>> lazy_zeros((2, 3), torch.ones(1, dtype=torch.bfloat16))
        tensor([[0., 0., 0.],
                [0., 0., 0.]], dtype=torch.bfloat16)
    """
    out, dirty, raw = _lazy(shape, like)
    if dirty.numel():  # (pages, PAGE / 4): whole pages back to 0
        raw.view(torch.float32).view(-1, PAGE // 4).index_fill_(0, dirty, 0.0)
    return out


def lazy_zeros_unzeroed(shape: tuple[int, ...], like: Tensor) -> tuple[Tensor, Tensor]:
    """:func:`lazy_zeros` without its zeroing pass: ``(result, dirty)``, where ``dirty``
    (int64, ascending) indexes the :data:`PAGE`-byte pages, counted from the result's first
    byte, that a cached map had written and that may hold anything. The caller must set to
    0 whatever it does not overwrite of them before anyone reads the result (attnlab's
    weights kernel does it while it writes the weights, in its own threads). Every other
    byte reads 0.

    Example:
        >>> out, dirty = lazy_zeros_unzeroed((2, 3), torch.ones(1))
        >>> out.tolist(), dirty.tolist()
        ([[0.0, 0.0, 0.0], [0.0, 0.0, 0.0]], [])
    """
    out, dirty, _ = _lazy(shape, like)
    return out, dirty


def _lazy(shape: tuple[int, ...], like: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The result of ``shape`` (a cached map, a new map or plain zeros), the indices of its
    pages that a cached map had written (not zeroed here) and the whole map's bytes."""
    none = torch.zeros(0, dtype=torch.long)
    nbytes = math.prod(shape) * like.element_size()
    if like.device.type != "cpu" or nbytes < MIN_BYTES:
        out = like.new_zeros(shape)
        return out, none, out
    size = -(-nbytes // PAGE) * PAGE  # whole pages
    caching = _CACHE.limit() > 0  # (reads the environment: once per call)
    cached = _CACHE.take(size) if caching else None
    mm = cached[0] if cached is not None else mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE)
    view = memoryview(mm)
    raw = torch.frombuffer(view, dtype=torch.uint8)  # holds ``view`` until its storage dies
    if caching:
        done = weakref.finalize(view, _CACHE.give, mm, raw.data_ptr())
        done.atexit = False
    dirty = torch.from_numpy(cached[1]).long() if cached is not None else none
    return raw[:nbytes].view(like.dtype).view(shape), dirty, raw


def empty_cache() -> None:
    """Unmap every cached result (see :data:`ATTNLAB_ZEROS_CACHE_MB`).

    Example:
        >>> empty_cache(); cache_info()["held_mib"]
        0.0
    """
    _CACHE.clear()


def cache_info() -> dict[str, float | int | bool]:
    """The cache's state: maps kept, written MiB they hold, hits and misses so far, its
    limit, and whether it can work here at all (``pagemap``: ``/proc/self/pagemap`` is
    readable, without which nothing is cached).

    Example:
        >>> sorted(cache_info())
        ['held_mib', 'hits', 'kept', 'limit_mib', 'misses', 'pagemap']
    """
    with _CACHE.lock:
        kept = len(_CACHE.free)
        info: dict[str, float | int | bool] = {
            "kept": kept,
            "held_mib": _CACHE.held / 2**20,
            "limit_mib": _CACHE.limit() >> 20,
            "hits": _CACHE.hits,
            "misses": _CACHE.misses,
        }
    probe = np.zeros(1)  # any mapped address
    info["pagemap"] = _written_pages(probe.ctypes.data // PAGE * PAGE, 1) is not None
    return info
