"""Storing what arrives with group commits, off the threads that receive it.

Every write transaction costs an fsync. Chunks that arrive while one
commit runs are stored together by the next, in one transaction however
scattered they are, so a lone chunk is stored at once (its reader waits
one commit) and a fast stream, or many small ranges at once (a trace
replayed), is stored in large batches: the link, not the disk, sets the
pace.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from blockstore.export import Buffer

from . import forks

log = logging.getLogger(__name__)

IDLE_EXIT = 30.0  # seconds without work after which the thread ends (it restarts on demand)
BATCH_AT_MOST = 256
"""Chunks (8 MiB) stored in one commit at most. A commit that evicts under the cap
frees its pages for the commits after the next one, not for itself (LMDB reuses a
page once no transaction can still see it), so the cache file runs above the cap by
about two commits: a commit of everything that waited (a whole layer, from a fast
source on a slow disk) needed a disk twice the layer's size beside the cap, and on a
disk with less it failed even after a full disk's eviction steps."""
STUCK_AFTER = 2.0
"""Seconds a store may wait for the cache's write lock before the cache is taken to be
stuck (the lock held by another process, stopped say): what arrives is then served
unkept. A store that is merely slow (a large commit, a slow disk) holds the lock and
is waited for, as ever."""


def adjacent_runs(items: list[tuple[int, Buffer]]) -> list[tuple[int, list[Buffer]]]:
    """(index, chunk) pairs as runs of consecutive indices, in index order."""
    out: list[tuple[int, list[Buffer]]] = []
    for index, chunk in sorted(items, key=lambda item: item[0]):
        if out and out[-1][0] + len(out[-1][1]) == index:
            out[-1][1].append(chunk)
        elif out and out[-1][0] + len(out[-1][1]) > index:
            continue  # the same chunk twice: the first one is kept
        else:
            out.append((index, [chunk]))
    return out


class Keeper:
    """Calls ``store(runs)`` with the runs of what was put meanwhile, on a daemon thread.

    While a store is stuck (``lock_wait``, the seconds it has waited for the cache's
    write lock, is ``STUCK_AFTER`` or more), what arrives is handed to ``dropped``
    instead, unkept (its readers have it already; the fetch that brought it ends at
    once), so a cache that takes no writes costs caching, not memory without bound,
    nor fetch workers waiting on a store that does not come.
    """

    def __init__(
        self,
        store: Callable[[list[tuple[int, list[Buffer]]]], None],
        dropped: Callable[[int], None] = lambda index: None,
        name: str = "",
        lock_wait: Callable[[], float] = lambda: 0.0,
    ):
        self._store = store
        self._dropped = dropped
        self._lock_wait = lock_wait
        self._name = name
        self.forget_threads()
        forks.register(self)

    def forget_threads(self) -> None:
        self._cond = threading.Condition()
        self._queued: list[tuple[int, Buffer]] = []
        self._busy = False
        self._dropping = False
        self._thread: threading.Thread | None = None

    def put(self, index: int, chunk: Buffer) -> None:
        with self._cond:
            if self._stuck():
                self._cond.release()
                try:
                    self._dropped(index)
                finally:
                    self._cond.acquire()
                return
            if self._thread is None:
                thread = threading.Thread(target=self._run, name="store", daemon=True)
                try:
                    thread.start()
                except RuntimeError:  # out of threads: stored on this one, one at a time
                    self._cond.release()
                    try:
                        self._store([(index, [chunk])])
                    finally:
                        self._cond.acquire()
                    return
                self._thread = thread
            self._queued.append((index, chunk))
            self._cond.notify_all()

    def _run(self) -> None:
        while True:
            with self._cond:
                if not self._cond.wait_for(lambda: self._queued, IDLE_EXIT):
                    self._thread = None
                    return
                items = self._queued[:BATCH_AT_MOST]
                del self._queued[:BATCH_AT_MOST]
                self._busy = True
            try:
                self._store(adjacent_runs(items))
            finally:
                with self._cond:
                    self._busy = False
                    if self._dropping:
                        self._dropping = False
                        log.warning("%s: the cache takes writes again", self._name)
                    self._cond.notify_all()

    def _stuck(self) -> bool:
        """With the lock held: whether to drop what arrives now (see the class)."""
        if not self._busy:
            return False
        waited = self._lock_wait()
        if waited < STUCK_AFTER:
            return False
        if not self._dropping:
            self._dropping = True
            log.warning(
                "%s: the cache has taken no write for %.0fs: what arrives is served "
                "without being kept until it does",
                self._name,
                waited,
            )
        return True

    def drain(self, timeout: float) -> bool:
        """Wait up to ``timeout`` until everything put is stored."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._queued and not self._busy, timeout)
