"""Turning chunk misses into streamed range reads: single-flight, prioritised.

The backend is never asked for a chunk that is already on its way: a
caller that misses a chunk another caller (or a prefetch) is fetching waits
for that chunk, and a queued prefetch it waits on is promoted to demand.
Adjacent misses go out as one range read, cut to the window's request
size so several run at once. Each chunk of a range is checked
(``on_arrival``) and handed to its waiters as soon as its bytes are in;
chunks are stored (``keep``) in batches while they still count as in
flight, so nobody asks for them again before they are stored.

Across processes, a range is fetched under a lease (``leases``); a process
that finds part of a range leased elsewhere waits for those chunks to
appear in the cache (``load``), and fetches them itself if the other
process gives up or dies.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, InvalidStateError
from typing import Protocol

from blockstore.errors import BlobReadError
from blockstore.export import Buffer
from blockstore.source import BlobSource

from .flights import Flights
from .keeper import Keeper
from .scheduler import DEMAND, PREFETCH, Job, Scheduler
from .stream import chunks_of
from .window import Window

log = logging.getLogger(__name__)

# on_arrival(index, chunk) -> the chunk's bytes as they may be served; raises to refuse.
Arrival = Callable[[int, memoryview], Buffer]
# keep(runs): store runs (first, consecutive chunks) of checked chunks, in one commit if it
# can; must not raise.
Keep = Callable[[list[tuple[int, list[Buffer]]]], None]
# load(indices) -> {index: bytes} of those chunks the cache holds now.
Load = Callable[[Sequence[int]], dict[int, Buffer]]

STORE_WAIT = 60.0
"""Bound on how long a reader waits for its chunks to be stored after they arrived."""
READER_STORE_WAIT = 1.0
"""The same for a client's read: a cache that takes no writes (its write lock held by
a stopped process) must not cost every miss a long wait; its bytes are right anyway."""
STOP_WAIT = 3.0
"""Seconds close() waits for running ranges to store what arrived (one chunk each)."""
LEASE_POLL = 0.02
"""Seconds between looks at the cache while another process holds a range's lease."""


class Leases(Protocol):
    def try_take(self, first: int, count: int) -> bool: ...

    def give_back(self, first: int, count: int) -> None: ...


def runs(indices: Iterable[int], limit: int) -> list[tuple[int, int]]:
    """Sorted chunk indices as (first, count) runs of adjacent chunks, at most ``limit`` long."""
    out: list[tuple[int, int]] = []
    for index in sorted(indices):
        if out and out[-1][0] + out[-1][1] == index and out[-1][1] < limit:
            out[-1] = (out[-1][0], out[-1][1] + 1)
        else:
            out.append((index, 1))
    return out


def _resolve(future: Future, value: Buffer | None = None, error: BaseException | None = None):
    """Answer a waiter once; a future already answered (cancelled by close) stays so."""
    try:
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(value)
    except InvalidStateError:
        pass


class Fetcher:
    """Fetches chunks of one blob from its source, each at most once at a time."""

    def __init__(
        self,
        source: BlobSource,
        chunk_size: int,
        on_arrival: Arrival,
        keep: Keep,
        load: Load,
        *,
        flights: Flights | None = None,
        leases: Leases | None = None,
        lease_wait: float | None = None,
        window: Window | None = None,
        on_request: Callable[[], None] | None = None,
        brought_by_others: Callable[[int], bool] | None = None,
        lock_wait: Callable[[], float] | None = None,
        keeps_nothing: Callable[[], bool] | None = None,
    ):
        """``brought_by_others(index)``: asked under the flights lock when prefetch
        claims an index; True leaves it out (another fetch brings those bytes).
        ``lock_wait``: how long a store has waited for the cache's write lock (see
        ``Keeper``). ``keeps_nothing()``: True once nothing fetched is kept (a lost
        cache): a queued prefetch or fill that no reader waits on is then dropped when
        its turn comes, rather than fetched for nothing."""
        self._source = source
        self._chunk_size = chunk_size
        self._on_arrival = on_arrival
        self._keep = keep
        self._load = load
        self._leases = leases
        self._lease_wait = lease_wait
        self._on_request = on_request or (lambda: None)
        self._brought_by_others = brought_by_others or (lambda index: False)
        self._keeps_nothing = keeps_nothing or (lambda: False)
        self._flights = flights if flights is not None else Flights()
        self.window = window if window is not None else Window()
        self.scheduler = Scheduler(self._run, self._fail, self.window)
        self._keeper = Keeper(
            self._keep_and_release, self._not_kept, self.digest, lock_wait or (lambda: 0.0)
        )
        self._live: set[Job] = set()

    @property
    def digest(self) -> str:
        return self._source.digest

    def _request_chunks(self) -> int:
        return max(1, self.window.request // self._chunk_size)

    def _nbytes(self, first: int, count: int) -> int:
        return max(0, min(count * self._chunk_size, self._source.size - first * self._chunk_size))

    # --- asking -----------------------------------------------------------------

    def fetch(
        self, indices: Iterable[int], ahead: Iterable[int] = (), store_wait: float = STORE_WAIT
    ) -> dict[int, Buffer]:
        """The bytes of the given chunks, fetching those nobody is fetching yet (demand).

        A caller that only joined chunks on their way gets them the moment
        they are checked; the caller whose misses started the fetch returns
        once its chunks are also stored (group commits keep that to a
        millisecond or two), so what it read is in the cache when it
        returns, or once ``store_wait`` has passed (a cache that takes no
        writes: what it read is then served, not kept). Raises the
        ``BlobReadError`` of a failed fetch; a chunk whose fetch failed is
        asked for again by the next caller.

        ``ahead`` are chunks the reader will want next (readahead on a
        miss): fetched in the same requests, not waited for. ``store_wait``
        bounds the wait for the store.
        """
        flights = self._flights
        waits: dict[int, Future] = {}
        mine: list[int] = []
        joined: set[Job] = set()
        with flights.lock:
            for index in indices:
                future = flights.pending.get(index)
                if future is None:
                    mine.append(index)
                    continue
                waits[index] = future
                owner = flights.owner.get(index)
                if owner is not None:
                    owner.waited = True
                    joined.add(owner)
            extra = [i for i in ahead if i not in flights.pending and i not in waits]
            jobs = self._claim(DEMAND, runs(set(mine).union(extra), self._request_chunks()))
            for index in mine:
                waits[index] = flights.pending[index]
        for job in joined:
            job.scheduler.promote(job)
        for job in jobs:
            self.scheduler.submit(job)
        chunks = {index: future.result() for index, future in waits.items()}
        if mine:
            with flights.lock:
                flights.settled.wait_for(
                    lambda: all(flights.pending.get(i) is not waits[i] for i in mine),
                    STOP_WAIT if self.scheduler.cancelled else store_wait,
                )
        return chunks

    def prefetch(
        self, indices: Iterable[int], priority: int = PREFETCH, *, wait: float = 0.0
    ) -> bool:
        """Queue chunks for fetching at ``priority`` and return at once.

        True when every chunk was handed over (queued now, or already on its
        way). Within the prefetch budget: with ``wait=0`` what does not fit
        is dropped (a hint, not a promise); otherwise each range waits up to
        ``wait`` seconds for room (trace replay and fill pace themselves so).
        """
        for first, count in runs(indices, self._request_chunks()):
            nbytes = self._nbytes(first, count)
            if wait:
                if not self.scheduler.wait_room(nbytes, wait):
                    return False
            elif self.scheduler.room() < nbytes:
                return False
            with self._flights.lock:
                pending, others = self._flights.pending, self._brought_by_others
                free = [
                    i for i in range(first, first + count) if i not in pending and not others(i)
                ]
                jobs = self._claim(priority, runs(free, count))
            for job in jobs:
                self.scheduler.submit(job)
        return True

    def in_flight(self) -> int:
        """Chunks of this blob on their way now."""
        with self._flights.lock:
            return len(self._flights.pending)

    def _claim(self, priority: int, pieces: list[tuple[int, int]]) -> list[Job]:
        """Under the flights lock: new jobs for these runs, their chunks registered."""
        jobs = []
        for first, count in pieces:
            job = self.scheduler.job(priority, first, count, self._nbytes(first, count))
            self._flights.claim(list(range(first, first + count)), job)
            self._live.add(job)
            jobs.append(job)
        return jobs

    # --- running (on a scheduler worker) -------------------------------------

    def _owned(self, job: Job) -> dict[int, Future]:
        """Under the flights lock: the chunks ``job`` fetches, and their futures."""
        return {
            i: self._flights.pending[i]
            for i in range(job.first, job.first + job.count)
            if self._flights.owner.get(i) is job
        }

    def _dropped(self, job: Job) -> bool:
        """Drop ``job`` if it fetches ahead for a cache that keeps nothing and no reader
        waits on it: whether one waits is decided under the lock readers join under, so
        one that comes later fetches for itself. Whether the cache keeps anything is
        asked before that lock is taken: the question may replace a damaged cache's
        handle (``ChunkStore.lost``), which no reader of the blob must wait for; a job
        promoted meanwhile has a reader waiting."""
        if job.priority == DEMAND or not self._keeps_nothing():
            return False
        with self._flights.lock:
            if job.waited:
                return False
            futures = self._owned(job)
            self._flights.release(list(futures))
        error = BlobReadError(f"{self.digest}: not fetched ahead: the cache keeps nothing")
        for future in futures.values():
            _resolve(future, error=error)
        self._live.discard(job)
        return True

    def _run(self, job: Job) -> None:
        if self._dropped(job):
            return
        with self._flights.lock:
            futures = self._owned(job)
        try:
            span, pieces = self._lease(futures)
            try:
                for first, count in pieces:
                    self._stream(futures, first, count)
                if span is not None:
                    # Held until stored: a process that takes it next finds the chunks.
                    # (Not after a failure: nothing is coming, and readers wait for _fail.)
                    self._wait_stored(futures)
            finally:
                if span is not None and self._leases is not None:
                    self._leases.give_back(*span)
            self.window.completed(job.nbytes)
        except Exception as exc:
            if not self.scheduler.cancelled:
                self.window.failed()
                log.debug("%s: chunks %d+%d failed: %s", self.digest, job.first, job.count, exc)
            self._fail(job, exc)
        except BaseException as exc:
            self._fail(job, exc)
            raise
        finally:
            self._live.discard(job)

    def _lease(
        self, futures: dict[int, Future]
    ) -> tuple[tuple[int, int] | None, list[tuple[int, int]]]:
        """The leased span and the runs of the job's chunks still to fetch under it.

        Chunks another process stored meanwhile are answered from the cache;
        while another process holds part of the span, its chunks are picked
        up as they appear, and the rest is fetched once its lease is free
        (at the latest when that process dies), or without the lease once
        ``lease_wait`` has passed: a reader is not held to another process's
        slower registry, or to one stopped mid-fetch.
        """
        wanted = sorted(futures)
        started = time.monotonic()
        while True:
            if self.scheduler.cancelled:
                raise BlobReadError(f"{self.digest}: the fetch was cancelled")
            wanted = self._answer_from_cache(futures, wanted)
            if not wanted:
                return None, []
            span = (wanted[0], wanted[-1] - wanted[0] + 1)
            if self._leases is None:
                return None, runs(wanted, span[1])
            if self._leases.try_take(*span):
                # Whoever held it may have stored these chunks just before letting go.
                wanted = self._answer_from_cache(futures, wanted)
                return span, runs(wanted, span[1])
            if self._lease_wait is not None and time.monotonic() - started >= self._lease_wait:
                log.info(
                    "%s: chunks %d+%d leased by another process for %.0fs: fetching them here",
                    self.digest, span[0], span[1], self._lease_wait,
                )  # fmt: skip
                return None, runs(wanted, span[1])
            time.sleep(LEASE_POLL)

    def _wait_stored(self, futures: dict[int, Future]) -> None:
        """Wait (bounded) until none of these chunks is in flight as this job's."""
        flights = self._flights
        with flights.lock:
            flights.settled.wait_for(
                lambda: all(flights.pending.get(i) is not f for i, f in futures.items()),
                STOP_WAIT,
            )

    def _answer_from_cache(self, futures: dict[int, Future], wanted: list[int]) -> list[int]:
        """Answer the wanted chunks the cache holds now; the ones still missing."""
        found = self._load(wanted)
        if found:
            with self._flights.lock:
                self._flights.release(list(found))
            for index, data in found.items():
                _resolve(futures[index], data)
        return [i for i in wanted if i not in found and not futures[i].done()]

    def _stream(self, futures: dict[int, Future], first: int, count: int) -> None:
        """Fetch one run, answering each chunk's waiters the moment it is checked."""
        self._on_request()
        asked = time.monotonic()
        got_first = False
        for index, chunk in chunks_of(self._source, first, count, self._chunk_size):
            if self.scheduler.cancelled:
                raise BlobReadError(f"{self.digest}: the fetch was cancelled")
            if not got_first:
                self.window.first_byte(time.monotonic() - asked)
                got_first = True
            checked = self._on_arrival(index, chunk)
            future = futures.get(index)
            if future is not None:
                _resolve(future, checked)
            self.window.delivered(len(chunk))
            self._keeper.put(index, checked)

    def _not_kept(self, index: int) -> None:
        """A chunk the keeper would not queue (the cache is stuck): it is no longer on
        its way to the cache, so a later read fetches it again."""
        with self._flights.lock:
            self._flights.release([index])

    def _keep_and_release(self, runs: list[tuple[int, list[Buffer]]]) -> None:
        try:
            self._keep(runs)
        except Exception:
            log.exception("%s: storing fetched chunks failed", self.digest)
        with self._flights.lock:
            for first, chunks in runs:
                self._flights.release(range(first, first + len(chunks)))

    def _fail(self, job: Job, exc: BaseException) -> None:
        """Answer the job's unanswered waiters with ``exc`` and forget its chunks."""
        with self._flights.lock:
            owned = self._owned(job)
            waiting = [f for f in owned.values() if not f.done()]
            self._flights.release([i for i, f in owned.items() if not f.done()])
        for future in waiting:
            _resolve(future, error=exc)
        self._live.discard(job)

    def close(self) -> None:
        """Cancel: queued jobs fail now, running ones stop at their next chunk, and every
        reader still waiting on this fetcher is answered at once.

        Then waits, a bounded while, for running jobs to store what they
        already have, so the cache is not closed under them.
        """
        self.cancel()
        self.wait_stopped()

    def cancel(self) -> None:
        """``close``'s first half: what it does at once (several fetchers of one blob are
        all cancelled before any is waited for, so no reader turns to another meanwhile)."""
        self.scheduler.close()
        for job in list(self._live):
            self._fail(job, BlobReadError(f"{self.digest}: the fetch was cancelled"))

    def wait_stopped(self, until: float | None = None) -> None:
        """``close``'s second half: running jobs end and store what they have, until the
        monotonic time ``until`` (default: ``STOP_WAIT`` from now) in all. Fetchers
        closed together share one ``until``: a stalled registry then costs that wait
        once, not once for each fetcher and again for each one's store."""
        if until is None:
            until = time.monotonic() + STOP_WAIT
        self.scheduler.wait_idle(max(0.0, until - time.monotonic()))
        self._keeper.drain(max(0.0, until - time.monotonic()))
