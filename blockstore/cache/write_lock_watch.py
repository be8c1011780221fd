"""Timing the waits for a cache's write lock, and saying so when one is long.

LMDB's write lock gives a waiter no error and no end while another process
holds it, as a stopped one does: the log tells a user why a write hangs, and
the fetcher's keeper (``CacheEnv.write_lock_wait``) stops queueing arrivals
for a store that does not come.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

from blockstore.progress import PROGRESS_LOGGER

log = logging.getLogger(__name__)
progress = logging.getLogger(PROGRESS_LOGGER)

T = TypeVar("T")

WRITE_LOCK_WARN = 5.0
"""Seconds a transaction may wait for the cache's write lock before that is logged."""


class WriteLockWatch:
    """Says so in the log when a write has waited long for the cache's write lock.

    LMDB's lock is a mutex that another process holds for as long as its write
    transaction runs, and a stopped process (Ctrl-Z on a prefetch) holds it until
    it goes on: its wait has no end and no error. A daemon thread (started on first
    use, again after a fork) looks at the waits once a second and names the cache.
    """

    def __init__(self) -> None:
        self.forked()

    def forked(self) -> None:
        """A fresh start (in a fork's child: its parent's thread and lock are not its own)."""
        self._lock = threading.Lock()
        self._waits: dict[int, tuple[float, Path]] = {}
        self._warned: set[int] = set()
        self._ids = 0
        self._thread: threading.Thread | None = None

    @contextmanager
    def waiting(self, path: Path) -> Iterator[None]:
        with self._lock:
            self._ids += 1
            wait = self._ids
            self._waits[wait] = (time.monotonic(), path)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._watch, name="write-lock-watch", daemon=True
                )
                self._thread.start()
        try:
            yield
        finally:
            with self._lock:
                since, _ = self._waits.pop(wait)
                warned = wait in self._warned
                self._warned.discard(wait)
            if warned:
                log.warning(
                    "got the write lock of the cache at %s after %.0fs",
                    path,
                    time.monotonic() - since,
                )

    def longest(self, path: Path) -> float:
        """Seconds the longest wait for the write lock of the cache at ``path`` has run."""
        now = time.monotonic()
        with self._lock:
            return max((now - since for since, p in self._waits.values() if p == path), default=0.0)

    def any_waiting(self) -> bool:
        """Whether a thread of this process waits for a cache's write lock, in LMDB."""
        with self._lock:
            return bool(self._waits)

    def _watch(self) -> None:
        idle = 0
        while True:
            time.sleep(1.0)
            now = time.monotonic()
            with self._lock:
                idle = 0 if self._waits else idle + 1
                if idle >= 60:  # no write for a minute: the next one starts it again
                    self._thread = None
                    return
                late = [
                    (wait, path, now - since)
                    for wait, (since, path) in self._waits.items()
                    if now - since >= WRITE_LOCK_WARN and wait not in self._warned
                ]
                self._warned.update(wait for wait, _, _ in late)
            for _, path, waited in late:
                said = (
                    f"waiting {waited:.0f}s so far for the write lock of the cache at {path}: "
                    "another process holds it (one stopped, as by Ctrl-Z, holds it until it "
                    "goes on)"
                )
                log.warning("%s", said)
                # Also as progress: a mount waiting for its server to be ready says it.
                progress.info("%s", said)


STOP_LOCK_WAIT = 2.0
"""Seconds a closing process waits on writes stuck behind another process's write lock
before it leaves them to its exit: a stop never hangs on a stopped process."""


def interruptibly(work: Callable[[], T]) -> T:
    """``work``, which waits for the write lock, run where a signal still ends the wait.

    LMDB's lock is a mutex no signal interrupts, and Python runs a signal's handler
    (Ctrl-C, a stop) only in the main thread: there ``work`` runs in a thread of its
    own, which the main thread waits for as signals allow. Elsewhere it runs here.
    ``work`` must begin and end its transactions itself: LMDB's write lock belongs to
    the thread that took it, and only that thread can give it back.
    """
    if threading.current_thread() is not threading.main_thread():
        return work()
    beside = _Beside(work)
    if beside.thread.ident is not None:  # started: run there, not here
        beside.thread.join()
    if beside.errors:
        raise beside.errors[0]
    return beside.results[0]


def unless_stuck(work: Callable[[], object], waited: Callable[[], float]) -> bool:
    """Whether ``work`` (a close's last writes) ended; False, left running, once a
    write has waited ``STOP_LOCK_WAIT`` for the write lock (``waited``): another
    process holds it, stopped perhaps, and may never let go."""
    beside = _Beside(work)
    while beside.thread.is_alive() and waited() < STOP_LOCK_WAIT:
        beside.thread.join(0.05)
    if beside.errors:
        raise beside.errors[0]
    if beside.thread.is_alive():
        _left_running.add(beside.thread)
        return False
    return True


_left_running: set[threading.Thread] = set()


def closes_left_running() -> bool:
    """Whether work ``unless_stuck`` gave up on still runs: a close that may go on at any
    moment, starting threads (a layer's) and closing a cache as the process ends."""
    return any(thread.is_alive() for thread in _left_running)


class _Beside:
    """``work`` started in a daemon thread; its result or exception for the thread
    waiting on it."""

    def __init__(self, work: Callable[[], T]) -> None:
        self.results: list[T] = []
        self.errors: list[BaseException] = []
        self._work = work
        self.thread = threading.Thread(target=self._run, name="cache-write-lock-wait", daemon=True)
        try:
            self.thread.start()
        except RuntimeError:  # out of threads, or at the interpreter's exit: run here
            self._run()

    def _run(self) -> None:
        try:
            self.results.append(self._work())
        except BaseException as exc:  # handed to the waiting thread, raised there
            self.errors.append(exc)
