"""How far long work has got, said every few seconds on one logger.

The first open of a large tar layer reads and inflates all of it before the
server is ready, which can take minutes. A mount waiting for that server
hears these lines (``nbdfront.mount.readiness`` forwards them), so it waits
for as long as the server is at work, rather than a fixed time.
"""

from __future__ import annotations

import logging
import time

PROGRESS_LOGGER = "blockstore.progress"
EVERY = 2.0
"""Seconds between two lines of one piece of work."""

log = logging.getLogger(PROGRESS_LOGGER)


def human(n: float) -> str:
    """A byte count as people read it: 512 B, 1.5 MiB."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


class Progress:
    """Bytes of one piece of work done, out of ``total`` (None: not known before the end),
    said every ``EVERY`` seconds."""

    def __init__(self, what: str, total: int | None):
        self._what = what
        self._total = total
        self._done = 0
        self._said = time.monotonic()

    def reached(self, done: int) -> None:
        """``done`` bytes are done (never fewer than said before)."""
        self._done = max(self._done, done)
        now = time.monotonic()
        if now - self._said >= EVERY:
            self._said = now
            if self._total is None:
                log.info("%s: %s so far", self._what, human(self._done))
                return
            share = self._done / self._total if self._total else 1.0
            log.info(
                "%s: %s of %s (%.0f%%)",
                self._what,
                human(self._done),
                human(self._total),
                100 * share,
            )
