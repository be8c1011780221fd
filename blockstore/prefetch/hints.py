"""Prefetch hints handed off the read path: readahead and CACHE.

A hint costs the thread that gives it one non-blocking queue put; a daemon
thread turns it into fetches (it looks up which chunks are missing, which
takes a cache read). When the queue is full a hint is dropped: it is a
hint, not a promise, and a reader that needs the bytes fetches them itself.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
from collections.abc import Callable

from blockstore.fetch import forks

log = logging.getLogger(__name__)

STOP_WAIT = 2.0  # seconds stop() waits for the thread; it is a daemon either way


class HintQueue:
    """Runs ``handle(offset, length, priority)`` for each hint on one daemon thread."""

    def __init__(self, handle: Callable[[int, int, int], None], *, backlog: int = 64):
        self._handle = handle
        self._backlog = backlog
        self._stopped = False
        self.forget_threads()
        forks.register(self)

    def forget_threads(self) -> None:
        self._queue: queue.Queue[tuple[int, int, int] | None] = queue.Queue(self._backlog)
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def submit(self, offset: int, length: int, priority: int) -> None:
        with self._lock:
            if self._stopped:
                return
            if self._thread is None:
                thread = threading.Thread(target=self._run, name="prefetch", daemon=True)
                try:
                    thread.start()
                except RuntimeError:  # out of threads: a hint is best effort
                    return
                self._thread = thread
        with contextlib.suppress(queue.Full):
            self._queue.put_nowait((offset, length, priority))

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            try:
                self._handle(*item)
            except Exception as exc:  # the reader will fetch (and report) it itself
                log.debug("prefetch of %d+%d failed: %s", item[0], item[1], exc)

    def stop(self) -> None:
        with self._lock:
            self._stopped = True
            thread = self._thread
        if thread is None:
            return
        with contextlib.suppress(queue.Empty):
            while True:
                self._queue.get_nowait()
        with contextlib.suppress(queue.Full):
            self._queue.put_nowait(None)
        thread.join(STOP_WAIT)
