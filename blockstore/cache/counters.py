"""Counters a user and a benchmark read: kept in memory, persisted in batches.

Counting in memory keeps the hit path free of write transactions; the store
adds the pending deltas to the persisted totals in its periodic flush, so
``blockstore cache stats`` in another process sees them within a second.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import lmdb

from .layout import U64

COUNTER_NAMES = (
    "hits",
    "misses",
    "bytes_served",
    "bytes_fetched",
    "requests_fetched",
    "checksum_failures",
    "seals",
    "seal_failures",
    "evictions",
)


class Counters:
    """Pending counter deltas of this process.

    The hit path's ``served((hits, misses, nbytes))`` is the list's own
    append (atomic in CPython, no lock, no Python frame); the other
    counters, counted rarely, take a lock.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pending: dict[str, int] = dict.fromkeys(COUNTER_NAMES, 0)
        self._served: list[tuple[int, int, int]] = []
        self.served: Callable[[tuple[int, int, int]], None] = self._served.append

    def add(self, **deltas: int) -> None:
        with self._lock:
            for name, delta in deltas.items():
                self._pending[name] += delta

    def _fold(self, pending: dict[str, int]) -> None:
        """Move the served reads noted so far into ``pending`` (under the lock)."""
        noted = self._served
        served = noted[:]
        del noted[: len(served)]  # appends land after these: none is lost
        for hits, misses, nbytes in served:
            pending["hits"] += hits
            pending["misses"] += misses
            pending["bytes_served"] += nbytes

    def pending(self) -> dict[str, int]:
        with self._lock:
            self._fold(self._pending)
            return dict(self._pending)

    def take(self) -> dict[str, int]:
        with self._lock:
            self._fold(self._pending)
            taken = {k: v for k, v in self._pending.items() if v}
            self._pending = dict.fromkeys(COUNTER_NAMES, 0)
            return taken

    def give_back(self, taken: dict[str, int]) -> None:
        """Return deltas whose flush failed, so they are not lost."""
        self.add(**taken)


def persist(txn: lmdb.Transaction, db: lmdb._Database, deltas: dict[str, int]) -> None:
    for name, delta in deltas.items():
        if not delta:
            continue  # no write: a cache looked at (``verify`` finding nothing) stays as it is
        key = name.encode()
        raw = txn.get(key, db=db)
        total = (U64.unpack(raw)[0] if raw is not None else 0) + delta
        txn.put(key, U64.pack(max(0, total)), db=db)


def load(txn: lmdb.Transaction, db: lmdb._Database) -> dict[str, int]:
    totals = dict.fromkeys(COUNTER_NAMES, 0)
    for key, raw in txn.cursor(db=db):
        totals[bytes(key).decode()] = U64.unpack(raw)[0]
    return totals
