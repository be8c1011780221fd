"""Sealing and verification: whole-blob digests, streamed chunk by chunk.

A blob whose chunks are all present is hashed (sha256 or whatever its
digest names) one chunk at a time, never loaded whole. A match seals it and
records every chunk's checksum, so a chunk evicted and fetched again later
is checked against what the digest vouched for. A mismatch drops the blob:
its bytes were not the blob's.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

from blockstore.errors import CacheError

from . import counters as counters_mod
from .layout import (
    CHUNK_KEY,
    DB_BLOBS,
    DB_CHUNKS,
    DB_COUNTERS,
    DB_META,
    DB_SUMS,
    SEALED,
    SUM_SIZE,
    U64,
    BlobRecord,
    chunk_key,
    chunk_length,
    meta_int,
    valid_chunk,
)

if TYPE_CHECKING:
    from .store import ChunkStore

log = logging.getLogger(__name__)

SCAN_BATCH = 256  # chunks per read transaction: short transactions let pages be reused


def _hasher(digest: str):
    algorithm, _, hexdigest = digest.partition(":")
    try:
        return hashlib.new(algorithm), hexdigest
    except (ValueError, TypeError):
        return None, hexdigest


def scan(store: ChunkStore, start: bytes = b"", stop: bytes | None = None) -> Iterator:
    """Yield (key, value) of stored chunks from ``start`` up to ``stop``, in short transactions.

    A value is valid only until the next item is asked for; the consumer
    must not write to the store while scanning.
    """
    last: bytes | None = None
    while True:
        with store.env.reader(DB_CHUNKS) as txn:
            cursor = txn.cursor()
            positioned = cursor.set_range(last or start)
            if positioned and last is not None and bytes(cursor.key()) == last:
                positioned = cursor.next()
            for _ in range(SCAN_BATCH):
                if not positioned:
                    return
                key = bytes(cursor.key())
                if stop is not None and key >= stop:
                    return
                yield key, cursor.value()
                last = key
                positioned = cursor.next()


def seal_blob(store: ChunkStore, digest: str, *, recheck: bool = False) -> bool | None:
    """Hash a complete blob and seal it; see ``ChunkStore.seal``.

    ``recheck`` hashes a sealed blob again (``verify``); it stays sealed
    meanwhile, so chunks fetched again are still checked.
    """
    with store.seal_lock:
        record = store.lookup(digest)
        if record is None:
            # Dropped by a seal that just ran here: say what it found.
            return False if digest in store.seal_failed else None
        if record.sealed and not recheck:
            return True
        if record.present < record.chunks:
            return None
        outcome = _seal(store, digest, record)
        if outcome is False:
            store.seal_failed.add(digest)
        return outcome


def _seal(store: ChunkStore, digest: str, record: BlobRecord) -> bool | None:
    """Hash the blob over short read transactions, then seal it if nothing changed.

    A chunk may be evicted and stored again while the blob is hashed; the
    sealing transaction therefore checks every stored chunk against the
    checksum that was hashed, so what is sealed is what matched the digest.
    """
    hasher, expected = _hasher(digest)
    if hasher is None:
        log.warning("cannot check %s: unknown digest algorithm", digest)
        return None
    sums = bytearray(record.chunks * SUM_SIZE)
    bad: list[int] = []
    prefix = U64.pack(record.blob_id)
    index = 0
    # Closed explicitly: the scan holds a read transaction until it is.
    with contextlib.closing(scan(store, prefix, U64.pack(record.blob_id + 1))) as chunks:
        for key, value in chunks:
            if store.closing:
                return None  # shutting down: the next run seals it
            if CHUNK_KEY.unpack(key)[1] != index:
                return None  # a chunk went missing (evicted) while hashing
            if not valid_chunk(value, chunk_length(record.size, index)):
                bad.append(index)
                break
            hasher.update(value[SUM_SIZE:])
            sums[index * SUM_SIZE : (index + 1) * SUM_SIZE] = value[:SUM_SIZE]
            index += 1
    if bad:
        store.counters.add(checksum_failures=store.drop_chunks(digest, bad))
        return None
    if index != record.chunks:
        return None
    if hasher.hexdigest() != expected:
        log.error("%s: the cached bytes do not match the digest; dropping the blob", digest)
        store.remove(digest)
        store.counters.add(seal_failures=1)
        return False

    def work(txn) -> bool | None:
        raw = txn.get(digest.encode(), db=store.dbs[DB_BLOBS])
        if raw is None:
            return None
        current = BlobRecord.unpack(raw)
        if current.blob_id != record.blob_id:
            return None
        if current.sealed:
            return True
        chunks_db = store.dbs[DB_CHUNKS]
        changed: list[tuple[bytes, int]] = []
        for i in range(record.chunks):
            key = chunk_key(record.blob_id, i)
            value = txn.get(key, db=chunks_db)
            if value is None:
                return None  # evicted after it was hashed: not whole any more
            if value[:SUM_SIZE] != sums[i * SUM_SIZE : (i + 1) * SUM_SIZE]:
                changed.append((key, len(value) - SUM_SIZE))
        if changed:
            # Stored again, with other bytes, after it was hashed: not the blob's.
            for key, length in changed:
                store.delete_chunk(txn, key, current, length)
            txn.put(digest.encode(), current.pack(), db=store.dbs[DB_BLOBS])
            counters_mod.persist(txn, store.dbs[DB_COUNTERS], {"checksum_failures": len(changed)})
            return None
        current.flags |= SEALED
        txn.put(digest.encode(), current.pack(), db=store.dbs[DB_BLOBS])
        txn.put(digest.encode(), bytes(sums), db=store.dbs[DB_SUMS])
        counters_mod.persist(txn, store.dbs[DB_COUNTERS], {"seals": 1})
        return True

    sealed = store.env.write(work)
    if sealed:
        log.info("sealed %s", digest)
    else:
        log.warning("%s changed while it was hashed; not sealed", digest)
    return sealed


class Sealer:
    """Seals blobs in the background, so the read that completed one is not held up."""

    def __init__(self, store: ChunkStore):
        self._store = store
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._queued: set[str] = set()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def submit(self, digest: str) -> None:
        with self._lock:
            if digest in self._queued:
                return
            self._queued.add(digest)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="cache-seal", daemon=True)
                self._thread.start()
        self._queue.put(digest)

    def stop(self) -> None:
        with self._lock:
            thread = self._thread
        if thread is not None:
            self._queue.put(None)
            thread.join()

    def _run(self) -> None:
        while (digest := self._queue.get()) is not None:
            with self._lock:
                self._queued.discard(digest)
            try:
                seal_blob(self._store, digest)
            except CacheError as exc:
                log.warning("sealing %s failed: %s", digest, exc)
            except Exception:
                log.exception("sealing %s failed", digest)


@dataclass
class VerifyReport:
    """What ``verify`` checked, found bad and dropped."""

    chunks_checked: int = 0
    bad_chunks: list[tuple[str, int]] = field(default_factory=list)
    orphan_chunks: int = 0
    blobs_checked: int = 0
    bad_blobs: list[str] = field(default_factory=list)
    newly_sealed: list[str] = field(default_factory=list)
    repaired_records: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.bad_chunks and not self.bad_blobs

    def to_dict(self) -> dict:
        return {**asdict(self), "ok": self.ok}


def verify_store(store: ChunkStore) -> VerifyReport:
    """Check every chunk (checksum, length, sealed checksum) and every complete blob.

    Safe while other processes use the cache: counts are only repaired if
    nothing was stored or evicted during the scan.
    """
    report = VerifyReport()
    store.flush()
    by_id: dict[int, tuple[str, BlobRecord]] = {}
    with store.env.reader() as txn:
        for digest, raw in txn.cursor(db=store.dbs[DB_BLOBS]):
            record = BlobRecord.unpack(raw)
            by_id[record.blob_id] = (bytes(digest).decode(), record)
        stored_before = meta_int(txn, store.dbs[DB_META], b"stored_bytes")
    sums = {d: store.sealed_sums(d) for d, r in by_id.values() if r.sealed}
    present: dict[int, int] = dict.fromkeys(by_id, 0)
    bad: list[bytes] = []
    orphans: list[bytes] = []
    stored = 0

    def good(key: bytes, value: memoryview) -> bool:
        blob_id, index = CHUNK_KEY.unpack(key)
        digest, record = by_id[blob_id]
        sealed_sums = sums.get(digest)
        return (
            index < record.chunks
            and valid_chunk(value, chunk_length(record.size, index))
            and (
                sealed_sums is None
                or sealed_sums[index * SUM_SIZE : (index + 1) * SUM_SIZE] == value[:SUM_SIZE]
            )
        )

    for key, value in scan(store):
        report.chunks_checked += 1
        blob_id, index = CHUNK_KEY.unpack(key)
        if blob_id not in by_id:
            orphans.append(key)
            continue
        digest = by_id[blob_id][0]
        if good(key, value):
            present[blob_id] += 1
            stored += len(value) - SUM_SIZE
        else:
            bad.append(key)
            report.bad_chunks.append((digest, index))
            log.warning("verify: %s chunk %d is bad; dropping it", digest, index)
    report.orphan_chunks = len(orphans)
    store.env.write(
        lambda txn: _repair(
            txn, store, by_id, present, bad, set(orphans), good, stored, stored_before, report
        )
    )
    for digest, record in by_id.values():
        if present[record.blob_id] != record.chunks:
            continue
        report.blobs_checked += 1
        outcome = seal_blob(store, digest, recheck=True)
        if outcome is False:
            report.bad_blobs.append(digest)
        elif outcome and not record.sealed:
            report.newly_sealed.append(digest)
    return report


def _repair(
    txn,
    store: ChunkStore,
    by_id: dict[int, tuple[str, BlobRecord]],
    present: dict[int, int],
    bad: list[bytes],
    orphans: set[bytes],
    good: Callable[[bytes, memoryview], bool],
    stored: int,
    stored_before: int,
    report: VerifyReport,
) -> None:
    """Drop bad and orphan chunks; if the cache was quiet meanwhile, fix drifted counts."""
    report.repaired_records.clear()  # this may run again if the map has to grow
    blobs, meta = store.dbs[DB_BLOBS], store.dbs[DB_META]
    quiet = meta_int(txn, meta, b"stored_bytes") == stored_before
    current: dict[int, BlobRecord] = {}
    dropped_bad = 0
    for key in [*bad, *orphans]:
        value = txn.get(key, db=store.dbs[DB_CHUNKS])
        if value is None or (key not in orphans and good(key, value)):
            continue  # dropped, or dropped and fetched again, by another reader meanwhile
        dropped_bad += key not in orphans
        blob_id = CHUNK_KEY.unpack(key)[0]
        if blob_id in by_id and blob_id not in current:
            raw = txn.get(by_id[blob_id][0].encode(), db=blobs)
            if raw is not None:
                current[blob_id] = BlobRecord.unpack(raw)
        store.delete_chunk(txn, key, current.get(blob_id), len(value) - SUM_SIZE)
    for blob_id, record in current.items():
        txn.put(by_id[blob_id][0].encode(), record.pack(), db=blobs)
    if quiet:
        for blob_id, (digest, _) in by_id.items():
            raw = txn.get(digest.encode(), db=blobs)
            if raw is None:
                continue
            record = BlobRecord.unpack(raw)
            if record.present != present[blob_id]:
                report.repaired_records.append(digest)
                record.present = present[blob_id]
                txn.put(digest.encode(), record.pack(), db=blobs)
        txn.put(b"stored_bytes", U64.pack(stored), db=meta)
    counters_mod.persist(txn, store.dbs[DB_COUNTERS], {"checksum_failures": dropped_bad})
