"""The chunks of one blob on their way: single-flight within a process.

Each chunk being fetched has one future, resolved with its checked bytes
the moment they arrive, and kept in the table until the chunk is stored,
so nobody asks the backend for it again in between. The job that owns the
chunk is remembered too, so a demand read that joins a queued prefetch can
raise that job's priority instead of sending a second request.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterable
from concurrent.futures import Future
from typing import Any

from . import forks


class Flights:
    """The in-flight table of one blob, shared by every fetcher of that blob.

    Two exports of one blob (an image that lists a layer twice) share this
    table, so the backend still sees each chunk asked for once at a time.
    """

    def __init__(self, locked_with: Flights | None = None) -> None:
        """``locked_with``: a table whose lock this one shares, so that a claim in one can
        look at the other and be sure it does not change meanwhile (a blob's chunks, and
        the blocks a trace replay fetches of it)."""
        self.leases: Any = None
        """The blob's cross-process leases, opened once per process by its first fetcher."""
        self._locked_with = locked_with
        self._blocks: Flights | None = None
        self.forget_threads()
        forks.register(self)

    def blocks(self) -> Flights:
        """The table of this blob's 4 KiB blocks on their way (a trace replay's), shared by
        every block fetcher of the blob in this process, under this table's lock."""
        with self.lock:
            if self._blocks is None:
                self._blocks = Flights(locked_with=self)
            return self._blocks

    @property
    def blocks_if_any(self) -> Flights | None:
        return self._blocks

    def on_their_way(self, indices: Iterable[int]) -> set[int]:
        """Those of ``indices`` being fetched now (queued or running)."""
        with self.lock:
            return {i for i in indices if i in self.pending}

    def join(self, indices: Iterable[int]) -> dict[int, Any]:
        """The bytes of those of ``indices`` on their way now, waited for (their queued
        jobs run as demand); never asks for anything. A failed one is left out."""
        with self.lock:
            waits = {i: self.pending[i] for i in indices if i in self.pending}
            jobs = {self.owner[i] for i in waits if self.owner.get(i) is not None}
            for job in jobs:
                job.waited = True
        for job in jobs:
            job.scheduler.promote(job)
        got: dict[int, Any] = {}
        for index, future in waits.items():
            with contextlib.suppress(Exception):
                got[index] = future.result()
        return got

    def wait_settled(self, indices: Iterable[int], timeout: float) -> bool:
        """Wait (bounded) until none of ``indices`` is on its way: stored, or failed."""
        wanted = list(indices)
        with self.lock:
            return self.settled.wait_for(
                lambda: not any(i in self.pending for i in wanted), timeout
            )

    @property
    def lock(self) -> threading.Lock:
        return self._locked_with.lock if self._locked_with is not None else self._lock

    @property
    def settled(self) -> threading.Condition:
        """Notified whenever entries leave the table (stored, or failed)."""
        return self._locked_with.settled if self._locked_with is not None else self._settled

    def forget_threads(self) -> None:
        """Nothing in flight (also in a forked child: the parent's fetches never end there)."""
        self._lock = threading.Lock()
        self._settled = threading.Condition(self._lock)
        self.pending: dict[int, Future] = {}
        self.owner: dict[int, Any] = {}
        """Chunk index -> the job fetching it (a ``scheduler.Job``)."""

    def claim(self, indices: list[int], job: Any) -> None:
        """Under ``lock``: register new futures for chunks nobody is fetching yet."""
        for index in indices:
            self.pending[index] = Future()
            self.owner[index] = job

    def release(self, indices: range | list[int]) -> None:
        """Under ``lock``: forget chunks that are stored, or whose fetch failed."""
        for index in indices:
            self.pending.pop(index, None)
            self.owner.pop(index, None)
        self.settled.notify_all()
