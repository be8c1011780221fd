"""Which range fetch runs next: demand first, prefetch within its budget.

Jobs wait in one priority queue served by a few daemon worker threads.
A client's read (``DEMAND``) always starts at once on a free worker; a
prefetch job (readahead, trace replay, CACHE, the EROFS start) starts only
while fewer prefetch ranges run than the link's window allows, and
background fill (``FILL``) only after both. Prefetch is bounded in bytes
queued or in flight: a hint beyond that budget is refused, not queued.

Stopping cancels: queued jobs are failed at once and running ones see
``cancelled`` between two chunks, so nothing waits on a registry that is
slow to answer. Workers are daemons; nothing joins them without a bound.
"""

from __future__ import annotations

import heapq
import itertools
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from blockstore.errors import BlobReadError, OutOfResources

from . import forks
from .window import Window

DEMAND = 0
PREFETCH = 1
FILL = 2

DEFAULT_WORKERS = 12
DEFAULT_PREFETCH_BUDGET = 64 << 20
LOOK_AHEAD = 9
"""Queued jobs a free worker weighs, best first, before it waits: a pick stays cheap
however long the queue of prefetch and fill jobs grows."""


@dataclass(order=True)
class Job:
    """One range of adjacent chunks to fetch, ``count`` chunks from ``first``."""

    priority: int
    seq: int
    first: int = field(compare=False)
    count: int = field(compare=False)
    nbytes: int = field(compare=False)
    started: bool = field(default=False, compare=False)
    budget: int = field(default=0, compare=False)
    """Prefetch bytes this job holds of the scheduler's budget until it ends."""
    waited: bool = field(default=False, compare=False)
    """A reader waits on its chunks (set under the flights lock, as it joins them)."""
    scheduler: Scheduler | None = field(default=None, compare=False, repr=False)
    """The scheduler that runs it: a reader of another fetcher of the blob promotes it
    there."""

    def __hash__(self) -> int:  # identity: the priority changes while queued
        return id(self)


class Scheduler:
    """Runs jobs on daemon workers in priority order, within the link's window."""

    def __init__(
        self,
        run: Callable[[Job], None],
        fail: Callable[[Job, BaseException], None],
        window: Window,
        *,
        workers: int = DEFAULT_WORKERS,
        prefetch_budget: int = DEFAULT_PREFETCH_BUDGET,
    ):
        self._run = run
        self._fail = fail
        self.window = window
        self._max_workers = workers
        self.prefetch_budget = prefetch_budget
        self._seq = itertools.count()
        self.cancelled = False
        self.forget_threads()
        forks.register(self)

    def forget_threads(self) -> None:
        """Empty and idle (also in a forked child, where the parent's workers are not)."""
        self._cond = threading.Condition()
        self._queue: list[Job] = []
        self._workers = 0
        self._idle = 0
        self._running = {DEMAND: 0, PREFETCH: 0, FILL: 0}
        self._running_bytes = {DEMAND: 0, PREFETCH: 0, FILL: 0}
        self._prefetch_bytes = 0  # queued or running, PREFETCH and FILL

    def job(self, priority: int, first: int, count: int, nbytes: int) -> Job:
        return Job(priority, next(self._seq), first, count, nbytes, scheduler=self)

    def room(self) -> int:
        """Prefetch bytes that may still be queued."""
        with self._cond:
            return max(0, self.prefetch_budget - self._prefetch_bytes)

    def wait_room(self, nbytes: int, timeout: float) -> bool:
        """Block (up to ``timeout``) until ``nbytes`` of prefetch fit; False if stopped."""
        with self._cond:
            self._cond.wait_for(
                lambda: self.cancelled or self._prefetch_bytes + nbytes <= self.prefetch_budget,
                timeout,
            )
            return not self.cancelled and self._prefetch_bytes + nbytes <= self.prefetch_budget

    def submit(self, job: Job) -> None:
        """Queue ``job``, starting a worker if none is idle. If no worker runs and none
        can be started (the process is out of threads), the job fails at once: queued,
        it would wait for ever, and its readers with it."""
        failure: BaseException | None = None
        with self._cond:
            if self.cancelled:
                failure = _stopped()
            else:
                if job.priority != DEMAND:
                    job.budget = job.nbytes
                    self._prefetch_bytes += job.budget
                heapq.heappush(self._queue, job)
                if self._idle == 0 and self._workers < self._max_workers:
                    failure = self._start_worker(job)
                self._cond.notify_all()
        if failure is not None:
            self._fail(job, failure)

    def _start_worker(self, job: Job) -> BaseException | None:
        """Under the lock: one more worker; if none can start and none runs, ``job``
        is taken off the queue again and what to fail it with is returned."""
        self._workers += 1
        try:
            threading.Thread(target=self._work, name="fetch", daemon=True).start()
        except RuntimeError as exc:  # "can't start new thread"
            self._workers -= 1
            if self._workers:
                return None  # the running workers take it in turn
            self._queue.remove(job)
            heapq.heapify(self._queue)
            self._prefetch_bytes -= job.budget
            job.budget = 0
            return _no_thread(exc)
        return None

    def promote(self, job: Job) -> None:
        """A demand read waits on ``job``: run it as demand if it has not started."""
        with self._cond:
            if job.started or job.priority == DEMAND:
                return
            job.priority = DEMAND
            heapq.heapify(self._queue)
            self._cond.notify_all()

    def _eligible(self) -> Job | None:
        """Under the lock: the best job allowed to start now, taken off the queue."""
        window = self.window.ranges
        for job in heapq.nsmallest(LOOK_AHEAD, self._queue):
            if job.priority == DEMAND:
                allowed = True
            elif job.priority == PREFETCH:
                # Within the window's count of ranges, or of its bytes: small ranges (a
                # trace's blocks) then run many at once, as a round trip each needs.
                allowed = (
                    self._running[PREFETCH] < window
                    or self._running_bytes[PREFETCH] + job.nbytes <= self.window.bytes
                )
            else:
                allowed = self._running[PREFETCH] + self._running[FILL] < max(1, window // 2)
            if allowed:
                self._queue.remove(job)
                heapq.heapify(self._queue)
                return job
        return None

    def _work(self) -> None:
        while True:
            with self._cond:
                self._idle += 1
                job = None
                while not self.cancelled and (job := self._eligible()) is None:
                    if not self._cond.wait(timeout=30) and not self._queue:
                        self._idle -= 1
                        self._workers -= 1
                        return  # idle for long: let the thread go
                self._idle -= 1
                if self.cancelled:
                    self._workers -= 1
                    return
                job.started = True
                kind = job.priority
                self._running[kind] += 1
                self._running_bytes[kind] += job.nbytes
            try:
                self._run(job)
            finally:
                with self._cond:
                    self._running[kind] -= 1
                    self._running_bytes[kind] -= job.nbytes
                    self._prefetch_bytes -= job.budget
                    job.budget = 0
                    self._cond.notify_all()

    def wait_idle(self, timeout: float) -> bool:
        """Wait up to ``timeout`` for running jobs to end; True if none runs."""
        with self._cond:
            return self._cond.wait_for(lambda: not any(self._running.values()), timeout)

    def close(self) -> None:
        """Cancel: fail queued jobs now; running ones stop at their next chunk."""
        with self._cond:
            self.cancelled = True
            queued, self._queue = self._queue, []
            self._cond.notify_all()
        for job in queued:
            self._fail(job, _stopped())


def _stopped() -> BaseException:
    return BlobReadError("the fetch was cancelled: the export is closing")


def _no_thread(exc: RuntimeError) -> BaseException:
    error = BlobReadError(f"no thread could be started to fetch it ({exc})")
    error.__cause__ = OutOfResources(f"out of threads ({exc})")
    return error
