"""Turning chunk misses into backend reads: single-flight, coalesced, parallel.

The backend is never asked for a chunk that is already on its way: a caller
that misses a chunk another caller is fetching waits for that fetch.
Adjacent misses go out as one range read, split so no read exceeds
``max_request`` bytes, and the pieces run on a small thread pool. What
arrives is handed to ``on_arrival`` (check) before anyone waiting is woken,
so a waiter never sees bytes that were not checked; then to ``keep``
(store), while the chunks still count as in flight, so nobody asks the
backend for them again before they are stored.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor

from blockstore.errors import BlobReadError
from blockstore.export import Buffer
from blockstore.source import BlobSource

log = logging.getLogger(__name__)

# on_arrival(first_index, data) -> {index: chunk bytes} for the chunks in data;
# raises to refuse them.
Arrival = Callable[[int, bytes], Mapping[int, Buffer]]
# keep(first_index, chunks): store what arrived; must not raise.
Keep = Callable[[int, Mapping[int, Buffer]], None]

DEFAULT_MAX_REQUEST = 4 << 20
DEFAULT_WORKERS = 4


def runs(indices: Iterable[int], limit: int) -> list[tuple[int, int]]:
    """Sorted chunk indices as (first, count) runs of adjacent chunks, at most ``limit`` long."""
    out: list[tuple[int, int]] = []
    for index in sorted(indices):
        if out and out[-1][0] + out[-1][1] == index and out[-1][1] < limit:
            out[-1] = (out[-1][0], out[-1][1] + 1)
        else:
            out.append((index, 1))
    return out


class Flights:
    """The chunks of one blob on their way, shared by every fetcher of that blob.

    Two exports of one blob (an image that lists a layer twice) share this
    table, so the backend still sees each chunk asked for once at a time.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.pending: dict[int, Future] = {}


class Fetcher:
    """Fetches chunks of one blob from its source, each at most once at a time."""

    def __init__(
        self,
        source: BlobSource,
        chunk_size: int,
        on_arrival: Arrival,
        keep: Keep,
        *,
        flights: Flights | None = None,
        max_request: int = DEFAULT_MAX_REQUEST,
        workers: int = DEFAULT_WORKERS,
    ):
        self._source = source
        self._chunk_size = chunk_size
        self._on_arrival = on_arrival
        self._keep = keep
        self._run_limit = max(1, max_request // chunk_size)
        self._flights = flights if flights is not None else Flights()
        self._lock = self._flights.lock
        self._inflight = self._flights.pending
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="fetch")

    def fetch(self, indices: Iterable[int]) -> dict[int, Buffer]:
        """Return the bytes of the given chunks, fetching those nobody is fetching yet.

        Raises the ``BlobReadError`` of a failed fetch; a chunk whose fetch
        failed is asked for again by the next caller.
        """
        waits: dict[int, Future] = {}
        mine: list[int] = []
        with self._lock:
            for index in indices:
                future = self._inflight.get(index)
                if future is None:
                    future = self._inflight[index] = Future()
                    mine.append(index)
                waits[index] = future
        pieces = runs(mine, self._run_limit)
        # The last piece runs in this thread: no hand-off for the common single miss.
        started = []
        for first, count in pieces[:-1]:
            try:
                started.append(self._pool.submit(self._fetch_run, first, count))
            except RuntimeError:  # closed: no pool, but waiters must still be answered
                self._fetch_run(first, count)
        if pieces:
            self._fetch_run(*pieces[-1])
        chunks = {index: future.result() for index, future in waits.items()}
        # What this caller fetched is stored before it returns; callers who only
        # joined a fetch got the bytes as soon as they were checked.
        for piece in started:
            piece.result()
        return chunks

    def _fetch_run(self, first: int, count: int) -> None:
        with self._lock:
            futures = [self._inflight[i] for i in range(first, first + count)]
        try:
            offset = first * self._chunk_size
            want = min(count * self._chunk_size, self._source.size - offset)
            data = self._source.read_range(offset, want)
            if len(data) != want:
                raise BlobReadError(
                    f"{self._source.digest}: asked for {want} bytes at {offset}, got {len(data)}"
                )
            chunks = self._on_arrival(first, data)
            for i, future in enumerate(futures):
                future.set_result(chunks[first + i])
            self._keep(first, chunks)
        except BaseException as exc:
            waiting = [future for future in futures if not future.done()]
            for future in waiting:
                future.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
            if not waiting:
                log.exception("%s: storing fetched chunks failed", self._source.digest)
        finally:
            with self._lock:
                for i in range(first, first + count):
                    self._inflight.pop(i, None)

    def close(self) -> None:
        # Queued pieces still run: readers may be waiting on them.
        self._pool.shutdown(wait=False)
