"""How the cache is laid out: its directory's files, LMDB's database names, keys and records.

One place knows the byte layout so the store, eviction, sealing and
verification agree on it. Blobs get a small integer id when they are first
stored; chunk keys are ``id || index`` (both big-endian, so a blob's chunks
are adjacent and ordered), which keeps keys short whatever the digest.
Ids are never reused: a stale id held by a reader can never name another
blob's chunks.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import lmdb

CHUNK_SIZE = 32768
# 3: a checksum for each 4 KiB block of a chunk, seeded with the block's identity
# (blob digest, chunk index, block); sealed blobs keep one hash of each chunk's.
# 4: parts of chunks (the blocks of a chunk a replayed trace read), see cache/parts.py.
# 5: a sealed list ends with a sum of its entries and of the blob's size (integrity.py),
# which versions of format 4 took for damage, dropping the blob.
FORMAT_VERSION = 5
UPGRADED_IN_PLACE = frozenset({3, 4})
"""Formats brought to this one in place by the first open that can write: 3 lacks the
database of parts, which that open makes; sealed lists with no sum of their own (3, 4)
are read as they are."""

# The files of a cache directory.
LMDB_DATA_FILE = "data.mdb"
"""LMDB's file of the cache's pages, in the cache directory."""
LMDB_LOCK_FILE = "lock.mdb"
"""What a process with the cache open has open and mapped, of whatever version; one of
this version only waiting for ``in_use.hold_in_use`` has opened ``data.mdb`` alone."""


def holds_cache(path: Path) -> bool:
    """Whether a cache is at ``path`` (its data file): for those that only look, as
    opening one where there is none makes an empty one there."""
    return (path / LMDB_DATA_FILE).is_file()


COMPACT_COPY = "data.mdb.compacting"
"""The copy ``compact.py`` writes beside ``data.mdb``; one left by a compaction that was
killed is removed by the next process to open the cache (none runs meanwhile: a
compaction holds the file's lock exclusively)."""

# Named databases.
DB_META = b"meta"  # name -> value (format, chunk size, next id, stored bytes, cap)
DB_BLOBS = b"blobs"  # digest -> BlobRecord
DB_IDS = b"ids"  # blob id -> digest
DB_CHUNKS = b"chunks"  # chunk key -> checksum (see integrity) || chunk bytes
DB_SUMS = b"sums"  # digest -> every chunk's checksum, packed, kept once sealed
DB_TICKS = b"ticks"  # chunk key -> last-use tick (8 bytes BE)
DB_LRU = b"lru"  # tick || chunk key -> b"" (oldest first)
DB_COUNTERS = b"counters"  # counter name -> u64
DB_REFS = b"refs"  # reference \0 platform -> JSON record
DB_MANIFESTS = b"manifests"  # digest -> raw manifest bytes
DB_TRACES = b"traces"  # layer digest -> JSON access trace (see cache/traces.py)
DB_PARTS = b"parts"  # chunk key -> the blocks of a chunk stored without the rest (parts.py)
ALL_DBS = (
    DB_META,
    DB_BLOBS,
    DB_IDS,
    DB_CHUNKS,
    DB_SUMS,
    DB_TICKS,
    DB_LRU,
    DB_COUNTERS,
    DB_REFS,
    DB_MANIFESTS,
    DB_TRACES,
    DB_PARTS,
)

CHUNK_KEY = struct.Struct(">QQ")
U64 = struct.Struct(">Q")

PINNED = 1
SEALED = 2


def meta_int(txn: lmdb.Transaction, db: lmdb._Database, name: bytes, default: int = 0) -> int:
    """A u64 kept in the meta database (``default`` if unset)."""
    raw = txn.get(name, db=db)
    return U64.unpack(raw)[0] if raw is not None else default


def stored_format(txn: lmdb.Transaction, meta: lmdb._Database) -> tuple[int, int]:
    """The format and chunk size the cache was written with (this version's where unset:
    a cache just made)."""
    return meta_int(txn, meta, b"format", FORMAT_VERSION), meta_int(
        txn, meta, b"chunk_size", CHUNK_SIZE
    )


def upgraded_in_place(version: int, chunk_size: int) -> bool:
    """Whether a cache of this format and chunk size is brought to this format in place."""
    return version in UPGRADED_IN_PLACE and chunk_size == CHUNK_SIZE


def chunk_key(blob_id: int, index: int) -> bytes:
    return CHUNK_KEY.pack(blob_id, index)


def lru_key(tick: int, key: bytes) -> bytes:
    return U64.pack(tick) + key


def blob_keys(cursor: lmdb.Cursor, blob_id: int) -> Iterator[tuple[bytes, bytes | memoryview]]:
    """(key, value) of one blob's entries, in order, in a database keyed by chunk key."""
    prefix = U64.pack(blob_id)
    if cursor.set_range(prefix):
        for key, value in cursor:
            if key[:8] != prefix:
                return
            yield bytes(key), value


def chunk_count(size: int) -> int:
    return (size + CHUNK_SIZE - 1) // CHUNK_SIZE


def chunk_length(size: int, index: int) -> int:
    return min(CHUNK_SIZE, size - index * CHUNK_SIZE)


@dataclass
class BlobRecord:
    """What the cache knows of one blob besides its chunks."""

    blob_id: int
    size: int
    present: int = 0  # chunks stored
    flags: int = 0
    last_use: float = 0.0  # seconds since the epoch

    _FORMAT = struct.Struct("<QQQBd")

    @property
    def pinned(self) -> bool:
        return bool(self.flags & PINNED)

    @property
    def sealed(self) -> bool:
        return bool(self.flags & SEALED)

    @property
    def chunks(self) -> int:
        return chunk_count(self.size)

    def forget_one(self) -> None:
        """Count one stored chunk fewer. Never below none: a count already too low (a
        record damaged on the disk) would otherwise go negative, which no record can
        hold, and a failed write of one record would cost the whole cache; ``verify``
        counts the chunks again."""
        if self.present > 0:
            self.present -= 1

    def pack(self) -> bytes:
        return self._FORMAT.pack(self.blob_id, self.size, self.present, self.flags, self.last_use)

    @classmethod
    def unpack(cls, raw: bytes | memoryview) -> BlobRecord:
        return cls(*cls._FORMAT.unpack(raw))


def record_of_id(
    txn: lmdb.Transaction, dbs: dict[bytes, lmdb._Database], blob_id: int
) -> tuple[bytes, BlobRecord] | None:
    """The digest and record of the blob ``blob_id`` names; None if there is none, or if
    its record does not name this id back (a damaged one, not this chunk's blob)."""
    digest = txn.get(U64.pack(blob_id), db=dbs[DB_IDS])
    raw = txn.get(digest, db=dbs[DB_BLOBS]) if digest is not None else None
    if raw is None:
        return None
    record = BlobRecord.unpack(raw)
    return (bytes(digest), record) if record.blob_id == blob_id else None
