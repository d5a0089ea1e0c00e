"""Run a function on several local gloo processes, with a timeout: for tests, benchmarks
and trying things out without ``torchrun``.
"""

from __future__ import annotations

import os
import pickle
import queue
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from attnlab._validate import plain, positive_int

__all__ = ["run_local"]


def _child(
    rank: int,
    world: int,
    port: int,
    threads: int,
    timeout: float,
    backend: str,
    env: dict[str, str],
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    out: Any,
) -> None:
    os.environ.clear()  # the caller's environment now, not the forkserver's at its start
    os.environ.update(env, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(threads)
    try:
        if backend == "nccl":  # one GPU per rank
            torch.cuda.set_device(rank)
        wait = timedelta(seconds=timeout)  # the caller's store (run_local), as a client
        store = dist.TCPStore("127.0.0.1", port, world, is_master=False, timeout=wait)
        dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=wait)
        # pickled here, by value: a tensor put on the queue as it is travels as shared
        # memory that vanishes when this process exits, before the parent may read it
        out.put((rank, True, pickle.dumps(fn(rank, world, *args))))
    except BaseException as e:  # reported to the parent, which raises
        out.put((rank, False, f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_local(
    fn: Callable[..., Any],
    world: int,
    *args: Any,
    timeout: float = 120.0,
    threads: int = 1,
    backend: str = "gloo",
) -> list[Any]:
    """Run ``fn(rank, world, *args)`` on ``world`` spawned processes on 127.0.0.1, over
    ``backend``: ``"gloo"`` (CPU) or ``"nccl"`` (rank ``r`` on GPU ``r``).

    ``fn`` must be importable (a module-level function) and return something picklable.
    Returns the per-rank results in rank order. A rank that raises, or dies without a
    result, makes this raise ``RuntimeError`` with every rank's error within seconds
    (ranks still running 3 s later are stopped); a run that takes longer than
    ``timeout`` seconds in all is killed and raises ``TimeoutError`` (collectives time
    out too, so no rank waits forever).

    Ranks start from a forkserver that imports torch and ``attnlab.distributed`` once per
    calling process (where the platform has one; else they are spawned), so a call after
    the first starts its ranks in well under a second. Each rank gets the caller's
    environment as it is at the call, but what torch reads as it is imported (such as
    ``ATEN_CPU_CAPABILITY``) is as it was at the first call.

    Example:
        >>> run_local(_rank_times_two, 2, timeout=60)
        [0, 2]
    """
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"backend must be 'gloo' or 'nccl', got {backend!r}")
    world, threads = positive_int("world", world), positive_int("threads", threads)
    number = plain(timeout)  # (numpy's numbers too, passed on as Python's)
    if isinstance(number, bool) or not isinstance(number, int | float) or not number > 0:
        raise ValueError(f"timeout must be a number of seconds > 0, got {timeout!r}")
    timeout = number
    if backend == "nccl" and torch.cuda.device_count() < world:
        raise ValueError(
            f"backend='nccl' needs one GPU per rank: world={world}, "
            f"{torch.cuda.device_count()} GPU(s) visible"
        )
    ctx = _context()
    out = ctx.Queue()
    # the ranks' store, held here from before they start: a port chosen free and bound by
    # rank 0 later could be taken meanwhile (a concurrent run's rank joined this one:
    # gloo's "connectFullMesh failed ... Connection closed by peer" under pytest -n 2)
    store = dist.TCPStore("127.0.0.1", 0, world, is_master=True, wait_for_workers=False)
    conf = (store.port, threads, timeout, backend, dict(os.environ))
    procs = [
        ctx.Process(target=_child, args=(r, world, *conf, fn, args, out)) for r in range(world)
    ]
    for p in procs:
        p.start()
    results: dict[int, tuple[bool, Any]] = {}
    try:
        results = _collect(procs, out, timeout)
    finally:  # ranks that gave a result get 5 s in all to exit; the others none
        ok = all(r in results and results[r][0] for r in range(world))
        end = time.monotonic() + (5.0 if ok else 0.0)
        for p in procs:
            p.join(timeout=max(0.0, end - time.monotonic()))
            if p.is_alive():
                p.kill()
                p.join()
    errors = {r: v for r, (ok, v) in results.items() if not ok}
    if errors:
        raise RuntimeError("\n".join(f"rank {r}: {v}" for r, v in sorted(errors.items())))
    return [pickle.loads(results[r][1]) for r in range(world)]  # our own ranks pickled these


_POLL = 0.2  # seconds between looks at the ranks' exit codes
_GRACE = 3.0  # seconds the other ranks get to report once one has failed


def _collect(procs: list[Any], out: Any, timeout: float) -> dict[int, tuple[bool, Any]]:
    """Every rank's ``(ok, value)``, gathered within ``timeout`` seconds in all. A rank
    that dies without a result (a crash, or a failed start such as a script without an
    ``if __name__ == "__main__":`` guard) counts as failed at once; once one rank has
    failed, the others get ``_GRACE`` seconds (they may be waiting for it in a
    collective) before they count as stopped."""
    world, deadline = len(procs), time.monotonic() + timeout
    results: dict[int, tuple[bool, Any]] = {}
    failed_at: float | None = None
    while len(results) < world:
        now = time.monotonic()
        if failed_at is not None and now - failed_at > _GRACE:
            break
        if now >= deadline:
            missing = sorted(set(range(world)) - set(results))
            raise TimeoutError(f"run_local: ranks {missing} gave no result within {timeout} s")
        try:
            rank, ok, value = out.get(timeout=min(_POLL, deadline - now))
            results[rank] = (ok, value)
        except queue.Empty:
            _note_the_dead(procs, out, results)
        if failed_at is None and any(not ok for ok, _ in results.values()):
            failed_at = time.monotonic()
    first = min((r for r, (ok, _) in results.items() if not ok), default=None)
    for r in set(range(world)) - set(results):
        results[r] = (False, f"stopped: no result {_GRACE} s after rank {first} failed")
    return results


def _note_the_dead(procs: list[Any], out: Any, results: dict[int, tuple[bool, Any]]) -> None:
    """Record as failed each rank that has exited without a result, after reading what
    the dead ranks may still have left in the queue."""
    dead = [r for r, p in enumerate(procs) if r not in results and p.exitcode is not None]
    if not dead:
        return
    try:  # a rank that exits has flushed its result into the queue's pipe
        while True:
            rank, ok, value = out.get(timeout=1.0)
            results[rank] = (ok, value)
    except queue.Empty:
        pass
    for r in dead:
        if r not in results:
            code = procs[r].exitcode
            results[r] = (
                False,
                f"exited with code {code} before giving a result "
                "(its own error, if any, is on stderr)",
            )


def _context() -> Any:
    """A forkserver that has imported torch and attnlab once (each rank then starts in
    well under a second, where a spawned one imports torch again); spawn where there is
    no forkserver (Windows)."""
    if "forkserver" not in mp.get_all_start_methods():
        return mp.get_context("spawn")
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "attnlab.distributed"])
    return ctx


def _rank_times_two(rank: int, world: int) -> int:
    return 2 * rank
