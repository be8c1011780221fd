"""Warnings that one cause makes by the thousand, logged a few at a time, then counted."""

from __future__ import annotations

import logging
import threading
import time
import weakref


class ThrottledLog:
    """Warnings of one kind, at most ``BURST`` each ``PERIOD`` seconds.

    One cause makes them by the thousand (a tree read offline where it was
    never cached, a registry gone, a fleet of clients that hang up mid-request):
    the first say why, the rest are counted and the count logged with the next
    warning after the period, or at shutdown.
    """

    BURST = 10
    PERIOD = 10.0

    def __init__(self, logger: logging.Logger, more: str):
        self._log = logger
        self._more = more
        """The count's line: ``"%d more ... in the %.0f s after those logged"``."""
        self._lock = threading.Lock()
        self._since = -self.PERIOD
        self._logged = 0
        self._held = 0
        _every.add(self)

    def warning(self, message: str, *args: object) -> None:
        now = time.monotonic()
        with self._lock:
            if now - self._since >= self.PERIOD:
                self._flush()
                self._since, self._logged = now, 0
            if self._logged >= self.BURST:
                self._held += 1
                return
            self._logged += 1
        self._log.warning(message, *args)

    def flush(self) -> None:
        with self._lock:
            self._flush()

    def _flush(self) -> None:
        if self._held:
            self._log.warning(self._more, self._held, self.PERIOD)
            self._held = 0


_every: weakref.WeakSet[ThrottledLog] = weakref.WeakSet()


def flush_all() -> None:
    """Say every count held back now: before a command's final error, which must be the
    last line it says, not followed by counts said at exit."""
    for throttled in list(_every):
        throttled.flush()
