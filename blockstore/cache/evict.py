"""Eviction: drop the least recently used chunks of unpinned blobs.

A policy apart from the store: it walks the ``lru`` index from the old end
inside the caller's write transaction, so storing new chunks and making
room for them commit together. Sealed blobs keep their per-chunk checksums
when their chunks go, so a chunk fetched again is still checked. Parts of
chunks (``parts``) age in the same index and go the same way.
"""

from __future__ import annotations

import lmdb

from .integrity import stored_length
from .layout import (
    CHUNK_KEY,
    DB_BLOBS,
    DB_CHUNKS,
    DB_IDS,
    DB_LRU,
    DB_PARTS,
    DB_TICKS,
    U64,
    BlobRecord,
)
from .parts import is_part_key

# Evicting down to a little below the cap keeps eviction from running on
# every store once the cache is full.
LOW_WATER = 0.9
# The share of the cap unpinned layers keep, beyond the pins, when pins crowd the cap.
WORKING_SET = 0.25


def evict(
    txn: lmdb.Transaction,
    dbs: dict[bytes, lmdb._Database],
    stored: int,
    target: int,
) -> tuple[int, int]:
    """Evict oldest unpinned chunks until ``stored`` bytes are at most ``target``.

    Returns (chunks evicted, bytes freed).
    """
    records: dict[int, tuple[bytes, BlobRecord] | None] = {}
    evicted = freed = 0
    cursor = txn.cursor(db=dbs[DB_LRU])
    positioned = cursor.first()
    while positioned and stored - freed > target:
        key = bytes(cursor.key()[8:])
        part = is_part_key(key)
        blob_id = CHUNK_KEY.unpack_from(key)[0]
        if blob_id not in records:
            records[blob_id] = _record(txn, dbs, blob_id)
        entry = records[blob_id]
        if entry is not None and entry[1].pinned:
            positioned = cursor.next()  # not expected: pinned chunks leave the index
            continue
        stored_key, db = (key[: CHUNK_KEY.size], dbs[DB_PARTS]) if part else (key, dbs[DB_CHUNKS])
        value = txn.get(stored_key, db=db)
        if value is not None:
            freed += stored_length(value)
            evicted += 1
            txn.delete(stored_key, db=db)
            if entry is not None and not part:
                entry[1].present -= 1
        txn.delete(key, db=dbs[DB_TICKS])
        cursor.delete()
        positioned = bool(cursor.key())
    for entry in records.values():
        if entry is not None:
            txn.put(entry[0], entry[1].pack(), db=dbs[DB_BLOBS])
    return evicted, freed


def _record(
    txn: lmdb.Transaction, dbs: dict[bytes, lmdb._Database], blob_id: int
) -> tuple[bytes, BlobRecord] | None:
    digest = txn.get(U64.pack(blob_id), db=dbs[DB_IDS])
    if digest is None:
        return None
    raw = txn.get(digest, db=dbs[DB_BLOBS])
    return (bytes(digest), BlobRecord.unpack(raw)) if raw is not None else None
