"""Turns at filling one cache, for prefetches whose layers do not fit it together.

Two prefetches of layers that each fit under the cap, but not both, evict each
other's chunks as they store their own, and neither layer ends whole. Every
prefetch holds a shared ``flock`` on ``leases/prefetch`` in the cache directory
from its first fetch until its layer is filled (one with nothing to fetch takes
none, so never waits), as do the background fill of a served layer (``--fill``)
and a compressed layer's span pump, which never take it alone; one that lost
chunks so takes it exclusively for its next rounds: it waits for the others in
flight to end, and fills alone, as if they had been run one after the other.
Layers that fit together are still filled at once. The kernel drops the lock of
a process that dies; one that makes no end (stopped, or filling a layer for
long) is waited for no longer than ``WAIT`` seconds, and the waiter then fills
as it would have without turns.
"""

from __future__ import annotations

import fcntl
import logging
import os
import threading
import time
from pathlib import Path

from blockstore.progress import PROGRESS_LOGGER

from .leases import LEASE_DIR

log = logging.getLogger(__name__)
progress = logging.getLogger(PROGRESS_LOGGER)

TURN_FILE = "prefetch"
"""The file under ``leases/`` whose lock is the turn (no blob's lease file has this name)."""
WAIT = 300.0
"""Seconds one prefetch waits for its turn."""
_POLL = 0.05


class PrefetchTurn:
    """One prefetch's place among those filling a cache, from ``join`` (or ``alone``) to
    the end of ``with``. Where no lock can be had (a file system without locks, a
    directory not ours) it fills as if alone, without waiting. ``stop`` set ends a wait
    at once, as if it were over."""

    def __init__(self, cache_dir: Path, stop: threading.Event | None = None):
        self._cache_dir = Path(cache_dir)
        self._stop = stop or threading.Event()
        self._fd: int | None = None
        self._joined = False

    def __enter__(self) -> PrefetchTurn:
        directory = self._cache_dir / LEASE_DIR
        try:
            directory.mkdir(exist_ok=True)
            self._fd = os.open(directory / TURN_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            log.debug("filling without turns among prefetches: %s", exc)
        return self

    def join(self) -> None:
        """Fill beside the other prefetches, once one filling alone has ended; called
        before the first fetch (again, it does nothing)."""
        if not self._joined:
            self._joined = True
            self._lock(fcntl.LOCK_SH, "another prefetch filling it alone")

    def alone(self) -> None:
        """Wait for the other prefetches in flight to end, then fill alone (the shared
        lock is let go while waiting, so two that ask at once do not wait for each other)."""
        self._joined = True
        self._lock(fcntl.LOCK_EX, "the other prefetches filling it")

    def _lock(self, kind: int, waited_for: str) -> None:
        if self._fd is None:
            return
        started = time.monotonic()
        told = False
        while True:
            try:
                fcntl.flock(self._fd, kind | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                pass
            except OSError as exc:  # ENOLCK: this file system keeps no locks
                log.debug("filling without turns among prefetches: %s", exc)
                return
            if not told:
                progress.info("the cache at %s: waiting for %s", self._cache_dir, waited_for)
                told = True
            if time.monotonic() - started >= WAIT:
                log.warning(
                    "the cache at %s: waited %.0f s for %s; filling without waiting longer",
                    self._cache_dir,
                    WAIT,
                    waited_for,
                )
                return
            if self._stop.wait(_POLL):
                return

    def __exit__(self, *exc: object) -> None:
        if self._fd is not None:
            os.close(self._fd)  # and the lock with it
            self._fd = None
