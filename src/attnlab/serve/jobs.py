"""The explorer's two worker threads: all model work runs there, off the event loop.

Quick calls (attend, compare) run one at a time on one thread; slow jobs (explanations)
run one at a time, in order, on the other, so a long integrated-gradients job never
holds up a click on a head. A :class:`Job` reports its progress and stops at its next
progress report once cancelled. (Attention capture records the calls of its own thread
only, and each thread works on its own copy of a model, so the two never mix.)

Example:
    >>> w = Worker()
    >>> w.call(lambda: 6 * 7).result(timeout=5)
    42
    >>> job = w.submit(lambda report: [report(i / 3) for i in range(3)] and "done")
    >>> w.wait(job, timeout=5).state, job.result, job.progress
    ('done', 'done', 1.0)
    >>> w.close()
"""

from __future__ import annotations

import queue
import threading
import time
import uuid
import weakref
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Cancelled", "Job", "Worker"]

Tasks = queue.Queue[Callable[[], None] | None]  # a thread's tasks; None: stop


class Cancelled(Exception):
    """Raised inside a job's work by its progress report once the job was cancelled."""


@dataclass
class Job:
    """One slow computation: its state, progress (0..1), message and result.

    ``state`` goes ``queued -> running -> done | error | cancelled``, or straight from
    ``queued`` to ``cancelled``; the two ways out of ``queued`` are taken under one lock,
    so a cancelled job never runs and a running one ends only when its work has.
    """

    work: Callable[[Callable[..., None]], Any]
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    state: str = "queued"
    progress: float = 0.0
    message: str = ""
    result: Any = None
    error: str | None = None
    started: float | None = None
    ended: float | None = None
    cancel_event: threading.Event = field(default_factory=threading.Event)
    done_event: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def report(self, progress: float, message: str = "") -> None:
        """Record progress; raises :class:`Cancelled` once the job was cancelled."""
        if self.cancel_event.is_set():
            raise Cancelled
        self.progress = min(1.0, max(self.progress, float(progress)))
        if message:
            self.message = message

    @property
    def seconds(self) -> float:
        """Seconds spent running so far (0 while queued)."""
        if self.started is None:
            return 0.0
        return (self.ended or time.perf_counter()) - self.started

    def cancel(self) -> None:
        """Ask the job to stop (a queued job never starts)."""
        self.cancel_event.set()
        with self._lock:
            if self.state == "queued":
                self._finish("cancelled")

    def run(self) -> None:
        """Run the work in this thread, recording the outcome (never raises)."""
        with self._lock:
            if self.state != "queued":
                return
            self.state, self.started = "running", time.perf_counter()
        try:
            self.result = self.work(self.report)
            self.progress = 1.0
            self._finish("done")
        except Cancelled:
            self._finish("cancelled")
        except Exception as e:
            self.error = f"{type(e).__name__}: {e}"
            self._finish("error")

    def _finish(self, state: str) -> None:
        self.state, self.ended = state, time.perf_counter()
        self.done_event.set()

    def as_dict(self) -> dict[str, Any]:
        """The job as ``GET /api/jobs/{id}`` answers."""
        return {
            "job": self.id,
            "state": self.state,
            "progress": round(self.progress, 4),
            "message": self.message,
            "seconds": round(self.seconds, 3),
            "result": self.result if self.state == "done" else None,
            "error": self.error,
        }


class Worker:
    """Two daemon threads: one for quick calls, one for jobs, each in order of arrival;
    started on first use, stopped by :meth:`close` or when the worker is dropped.

    Args:
        keep: how many jobs to remember (the oldest finished ones are forgotten).
    """

    def __init__(self, keep: int = 64) -> None:
        self._queues: list[Tasks] = []  # (quick, slow) while the threads run
        self._jobs: OrderedDict[str, Job] = OrderedDict()
        self._keep = keep
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._closed = False
        # a worker dropped unclosed (an app whose lifespan never ran) stops its threads
        weakref.finalize(self, _stop, self._queues)

    def _put(self, slow: bool, task: Callable[[], None]) -> None:
        """Queue ``task`` (on the jobs thread if ``slow``), starting the two threads on
        first use (a worker never used starts none); RuntimeError once the worker was
        closed and not reopened."""
        with self._lock:  # (under the lock: a task is never queued behind close's stop)
            if self._closed:
                raise RuntimeError("the worker is closed (the server has shut down)")
            if not self._threads:  # fresh queues: a thread close left running keeps its own
                self._queues[:] = [queue.Queue(), queue.Queue()]
                # (the threads hold their queue only, never the worker: it stays collectable)
                self._threads = [
                    threading.Thread(target=self._loop, args=(q,), name=f"attnlab-{n}", daemon=True)
                    for q, n in zip(self._queues, ("quick", "jobs"), strict=True)
                ]
                for t in self._threads:
                    t.start()
            self._queues[slow].put(task)

    def reopen(self) -> None:
        """Accept work again after :meth:`close` (a server started again)."""
        with self._lock:
            self._closed = False

    def call(self, fn: Callable[[], Any]) -> Future[Any]:
        """Run ``fn()`` on the quick thread; its future."""
        fut: Future[Any] = Future()

        def task() -> None:
            if fut.set_running_or_notify_cancel():
                try:
                    fut.set_result(fn())
                except BaseException as e:
                    fut.set_exception(e)

        self._put(False, task)
        return fut

    def submit(self, work: Callable[[Callable[..., None]], Any]) -> Job:
        """Queue ``work(report)`` as a :class:`Job`; ``report(progress, message="")``."""
        job = Job(work)
        with self._lock:  # (listed first: a close from here on cancels it)
            self._jobs[job.id] = job
            self._forget_old()
        try:
            self._put(True, job.run)
        except RuntimeError:
            with self._lock:
                self._jobs.pop(job.id, None)
            raise
        return job

    def job(self, job_id: str) -> Job | None:
        """The job with this id, or None (unknown or forgotten)."""
        with self._lock:
            return self._jobs.get(job_id)

    def active(self) -> int:
        """How many jobs are queued or running."""
        with self._lock:
            return sum(j.state in ("queued", "running") for j in self._jobs.values())

    def wait(self, job: Job, timeout: float | None = None) -> Job:
        """Block until ``job`` has ended (or ``timeout`` seconds passed); the job."""
        job.done_event.wait(timeout)
        return job

    def close(self) -> None:
        """Cancel every job and stop the threads once their current task ends; later
        calls and submits raise RuntimeError until :meth:`reopen`."""
        with self._lock:
            self._closed = True
            jobs, threads, self._threads = list(self._jobs.values()), self._threads, []
            _stop(self._queues)
        for j in jobs:
            j.cancel()
        for t in threads:
            t.join(timeout=30)

    def _forget_old(self) -> None:
        ended = [k for k, j in self._jobs.items() if j.state not in ("queued", "running")]
        for k in ended[: max(0, len(self._jobs) - self._keep)]:
            del self._jobs[k]

    @staticmethod
    def _loop(tasks: Tasks) -> None:
        while (task := tasks.get()) is not None:
            task()
            del task  # (not kept while waiting: it holds its work, and the work its app)


def _stop(queues: list[Tasks]) -> None:
    """Tell each queue's thread to end after the tasks queued before; forget the queues."""
    for q in queues:
        q.put(None)
    queues.clear()
