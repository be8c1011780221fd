"""The gate between this process's LMDB transactions and what must wait for none to run.

Changing the map size (growing it, or adopting another process's growth),
replacing the handle (after damage) or closing it, and a fork all need every
transaction of this process finished. Every transaction holds the gate
shared, and those take it exclusively; a hit never waits on a fetch, only
(rarely) on a resize.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager


class Gate:
    """Many holders at once, or one exclusive holder (writer-preferring).

    Shared holders must not nest: an exclusive waiter blocks new holders.
    The shared path takes no lock, as it is on every read: a holder adds
    itself to ``holders`` (a list append, atomic under the GIL) and only
    then looks at ``blocked``; an exclusive taker sets ``blocked`` and only
    then waits for ``holders`` to empty. Each sees the other's step, so a
    holder never overlaps an exclusive one.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self.holders: list[None] = []
        self.blocked = 0  # exclusive takers waiting or holding
        self._exclusive = False

    def acquire_shared(self) -> None:
        self.holders.append(None)
        if self.blocked:
            self.release_shared()
            self.wait_shared()

    def wait_shared(self) -> None:
        """The shared path found the gate blocked: wait for it to open, then take it."""
        with self._lock:  # exclusive takers change ``blocked`` only under it
            while self.blocked:
                self._cond.wait()
            self.holders.append(None)

    def release_shared(self) -> None:
        self.holders.pop()
        if self.blocked:
            self.wake()

    def wake(self) -> None:
        """A holder left while an exclusive taker waits: let it look again."""
        with self._lock:
            self._cond.notify_all()

    def acquire_exclusive(self) -> None:
        with self._lock:
            self.blocked += 1
            while self._exclusive or self.holders:
                self._cond.wait()
            self._exclusive = True

    def release_exclusive(self) -> None:
        with self._lock:
            self._exclusive = False
            self.blocked -= 1
            self._cond.notify_all()

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        self.acquire_exclusive()
        try:
            yield
        finally:
            self.release_exclusive()
