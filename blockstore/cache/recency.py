"""Least-recently-used bookkeeping without a write transaction per read.

Reads note which chunks they touched in memory (one dict entry per read
call); the store's periodic flush moves those chunks to the young end of
the ``lru`` index in one transaction. Eviction walks that index from the
old end. Recency is advisory: a touch lost in a crash only makes a chunk
look older than it is.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import lmdb

from .layout import (
    DB_BLOBS,
    DB_CHUNKS,
    DB_LRU,
    DB_PARTS,
    DB_TICKS,
    U64,
    BlobRecord,
    blob_keys,
    chunk_key,
    lru_key,
    record_of_id,
)
from .parts import part_lru_key

# A chunk used again within this many microseconds keeps its place: a
# streaming reader would otherwise rewrite the LRU index for every chunk it
# reads, every second. Eviction order is only as fine as this (and half again:
# ``PLACED_WINDOW_US``).
RESOLUTION_US = 10_000_000


def now_tick() -> int:
    """Microseconds since the epoch: comparable between processes."""
    return time.time_ns() // 1000


PLACED_WINDOW_US = RESOLUTION_US // 2
"""How long this process remembers the ranges it placed, so that a range read again
and again (a streaming reader's, a copy's) costs the flush no lookups: each of its
chunks would keep its place anyway. A chunk's place is then at most 1.5 times
``RESOLUTION_US`` old."""
PLACED_MOST = 1 << 16
"""Ranges remembered at most (a few MiB); past that the flush looks each one up."""


class Recency:
    """Chunk ranges touched by this process since the last flush.

    ``touch((blob_id, first, last))`` is the list's own append (atomic in
    CPython, no lock, no clock, no Python frame on the hit path): the flush
    stamps everything it takes with its own time.
    """

    def __init__(self) -> None:
        self._touched: list[tuple[int, int, int]] = []
        self.touch: Callable[[tuple[int, int, int]], None] = self._touched.append
        self._placed: set[tuple[int, int, int]] = set()
        self._placed_since = 0

    def take(self, tick: int) -> set[tuple[int, int, int]]:
        """What was touched since the last take, less what ``placed`` said was placed
        within ``PLACED_WINDOW_US`` of ``tick``; a touch made meanwhile is kept for the
        next take."""
        touched = self._touched
        taken = touched[:]
        del touched[: len(taken)]  # appends land after these: none is lost
        if tick - self._placed_since >= PLACED_WINDOW_US or len(self._placed) > PLACED_MOST:
            self._placed.clear()
            self._placed_since = tick
        return set(taken).difference(self._placed)

    def placed(self, ranges: set[tuple[int, int, int]]) -> None:
        """``ranges``, taken, are now placed (their flush committed)."""
        self._placed |= ranges


def place(
    txn: lmdb.Transaction,
    dbs: dict[bytes, lmdb._Database],
    key: bytes,
    tick: int,
    *,
    pinned: bool = False,
) -> None:
    """Note a chunk's use at ``tick``, moving it in the LRU index.

    A pinned blob's chunks keep their tick but stay out of the index, so
    eviction never has to walk past them.
    """
    old = txn.get(key, db=dbs[DB_TICKS])
    if old is not None:
        old_tick = U64.unpack(old)[0]
        if old_tick >= tick - RESOLUTION_US:
            return
        txn.delete(lru_key(old_tick, key), db=dbs[DB_LRU])
    if not pinned:
        txn.put(lru_key(tick, key), b"", db=dbs[DB_LRU])
    txn.put(key, U64.pack(tick), db=dbs[DB_TICKS])


def set_pinned(
    txn: lmdb.Transaction, dbs: dict[bytes, lmdb._Database], blob_id: int, pinned: bool
) -> None:
    """Take a blob's chunks out of the LRU index (pinned) or put them back at their ticks."""
    entries = [bytes(tick) + key for key, tick in blob_keys(txn.cursor(db=dbs[DB_TICKS]), blob_id)]
    for entry in entries:
        if pinned:
            txn.delete(entry, db=dbs[DB_LRU])
        else:
            txn.put(entry, b"", db=dbs[DB_LRU])


def renew(txn: lmdb.Transaction, dbs: dict[bytes, lmdb._Database], blob_id: int, tick: int) -> None:
    """Place every stored chunk of an unpinned blob at ``tick``, however recently it was
    placed (``RESOLUTION_US`` aside): eviction then takes the rest of the cache before
    any of it."""
    entries = [(key, bytes(old)) for key, old in blob_keys(txn.cursor(db=dbs[DB_TICKS]), blob_id)]
    for key, old in entries:
        txn.delete(old + key, db=dbs[DB_LRU])
        txn.put(lru_key(tick, key), b"", db=dbs[DB_LRU])
        txn.put(key, U64.pack(tick), db=dbs[DB_TICKS])


def apply(
    txn: lmdb.Transaction,
    dbs: dict[bytes, lmdb._Database],
    touched: set[tuple[int, int, int]],
    tick: int,
) -> None:
    """Move touched chunks that are still stored to the young end of the LRU (``tick``),
    and the touched parts of chunks (``parts``) that are stored instead."""
    records: dict[int, tuple[bytes, BlobRecord]] = {}
    for blob_id in {blob_id for blob_id, _, _ in touched}:
        if (entry := record_of_id(txn, dbs, blob_id)) is not None:
            records[blob_id] = entry
    for blob_id, first, last in touched:
        if blob_id not in records:
            continue  # removed meanwhile
        pinned = records[blob_id][1].pinned
        for index in range(first, last + 1):
            key = chunk_key(blob_id, index)
            if txn.get(key, db=dbs[DB_CHUNKS]) is not None:
                place(txn, dbs, key, tick, pinned=pinned)
            elif txn.get(key, db=dbs[DB_PARTS]) is not None:
                place(txn, dbs, part_lru_key(key), tick, pinned=pinned)
    for digest, record in records.values():
        record.last_use = max(record.last_use, tick / 1e6)
        txn.put(digest, record.pack(), db=dbs[DB_BLOBS])
