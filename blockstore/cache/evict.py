"""Eviction: drop the least recently used chunks of unpinned blobs.

A policy apart from the store: it walks the ``lru`` index from the old end
inside the caller's write transaction, so storing new chunks and making
room for them commit together. Blobs a server holds (``holds``: served from
the cache alone, where an evicted chunk could not be fetched again) are
passed over while held. Sealed blobs keep their per-chunk checksums
when their chunks go, so a chunk fetched again is still checked. Parts of
chunks (``parts``) age in the same index and go the same way.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import lmdb

from .integrity import stored_length
from .layout import (
    CHUNK_KEY,
    DB_BLOBS,
    DB_CHUNKS,
    DB_LRU,
    DB_PARTS,
    DB_TICKS,
    BlobRecord,
    record_of_id,
)
from .parts import is_part_key

# Evicting down to a little below the cap keeps eviction from running on
# every store once the cache is full.
LOW_WATER = 0.9
# The share of the cap unpinned layers keep, beyond the pins, when pins crowd the cap.
WORKING_SET = 0.25


class Evicted(NamedTuple):
    chunks: int
    """Chunks and parts of chunks evicted."""
    freed: int
    """The bytes they held."""
    held: list[str]
    """Digests of held blobs passed over, each once."""


def evict(
    txn: lmdb.Transaction,
    dbs: dict[bytes, lmdb._Database],
    stored: int,
    target: int,
    held: Callable[[str], bool],
) -> Evicted:
    """Evict oldest unpinned, unheld chunks until ``stored`` bytes are at most
    ``target``; ``held(digest)`` says whether a server holds that blob now."""
    records: dict[int, tuple[bytes, BlobRecord] | None] = {}
    passed_over: dict[int, str] = {}
    evicted = freed = 0
    cursor = txn.cursor(db=dbs[DB_LRU])
    positioned = cursor.first()
    while positioned and stored - freed > target:
        key = bytes(cursor.key()[8:])
        part = is_part_key(key)
        blob_id = CHUNK_KEY.unpack_from(key)[0]
        if blob_id not in records:
            entry = records[blob_id] = record_of_id(txn, dbs, blob_id)
            if entry is not None and held(digest := entry[0].decode()):
                passed_over[blob_id] = digest
        entry = records[blob_id]
        if blob_id in passed_over or (entry is not None and entry[1].pinned):
            # Pinned chunks are not expected here (they leave the index).
            positioned = cursor.next()
            continue
        stored_key, db = (key[: CHUNK_KEY.size], dbs[DB_PARTS]) if part else (key, dbs[DB_CHUNKS])
        value = txn.get(stored_key, db=db)
        if value is not None:
            freed += stored_length(value)
            evicted += 1
            txn.delete(stored_key, db=db)
            if entry is not None and not part:
                entry[1].forget_one()
        txn.delete(key, db=dbs[DB_TICKS])
        cursor.delete()
        positioned = bool(cursor.key())
    for blob_id, entry in records.items():
        if entry is not None and blob_id not in passed_over:
            txn.put(entry[0], entry[1].pack(), db=dbs[DB_BLOBS])
    return Evicted(evicted, freed, list(passed_over.values()))
