"""The chunks of one blob on their way: single-flight within a process.

Each chunk being fetched has one future, resolved with its checked bytes
the moment they arrive, and kept in the table until the chunk is stored,
so nobody asks the backend for it again in between. The job that owns the
chunk is remembered too, so a demand read that joins a queued prefetch can
raise that job's priority instead of sending a second request.
"""

from __future__ import annotations

import threading
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
        self.forget_threads()
        forks.register(self)

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
