"""Readahead: a policy that guesses what a sequential reader wants next.

Kept apart from the cache: ``CachedBlob`` tells the policy about each read
and hands what the policy asks for to ``BackgroundFill``, which brings it
into the cache on a thread of its own, so the reader never waits for it.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)


class Readahead:
    """Sequential-read detection with a window that doubles, like the kernel's.

    A read that starts near where the previous one ended is sequential: the
    window grows up to ``maximum`` and the range just past the reader is
    asked for. Any other read resets the window. Reads arriving slightly
    out of order (several requests in flight) still count as sequential.
    ``maximum=0`` turns readahead off.
    """

    def __init__(self, initial: int = 128 << 10, maximum: int = 4 << 20):
        self._initial = initial
        self._maximum = maximum
        self._window = initial
        self._next = -1
        self._ahead = 0  # end of what was already asked for
        self._lock = threading.Lock()

    def advise(self, offset: int, length: int, size: int) -> tuple[int, int] | None:
        """Note a read; return a range (offset, length) worth fetching now, if any."""
        if not self._maximum:
            return None
        with self._lock:
            sequential = self._next >= 0 and abs(offset - self._next) <= self._window
            end = offset + length
            self._next = max(end, self._next) if sequential else end
            if not sequential:
                self._window = self._initial
                self._ahead = end
                return None
            if self._ahead - self._next > self._window // 2:
                return None  # still well ahead of the reader
            self._window = min(self._window * 2, self._maximum)
            start = max(self._ahead, self._next)
            stop = min(size, self._next + self._window)
            self._ahead = max(self._ahead, stop)
            return (start, stop - start) if stop > start else None


class BackgroundFill:
    """Brings ranges into the cache on one daemon thread; drops hints when behind."""

    def __init__(self, fill: Callable[[int, int], None], *, backlog: int = 8):
        self._fill = fill
        self._queue: queue.Queue[tuple[int, int] | None] = queue.Queue(maxsize=backlog)
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def submit(self, offset: int, length: int) -> None:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="readahead", daemon=True)
                self._thread.start()
        with contextlib.suppress(queue.Full):  # a hint, not a promise
            self._queue.put_nowait((offset, length))

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            try:
                self._fill(*item)
            except Exception as exc:  # the reader will fetch (and report) it itself
                log.debug("readahead of %d+%d failed: %s", item[0], item[1], exc)

    def stop(self) -> None:
        with self._lock:
            thread = self._thread
        if thread is not None:
            while True:
                try:
                    self._queue.get_nowait()
                except queue.Empty:
                    break
            self._queue.put(None)
            thread.join()
