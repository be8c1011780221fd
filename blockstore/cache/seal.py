"""Sealing and verification: whole-blob digests, streamed chunk by chunk.

A blob whose chunks are all present is hashed (sha256 or whatever its
digest names) one chunk at a time, never loaded whole. A match seals it and
records every chunk's checksum, so a chunk evicted and fetched again later
is checked against what the digest vouched for. A mismatch drops the blob:
its bytes were not the blob's.

``Sealer`` owns what sealing needs (one blob hashed at a time, the verdicts
of failed seals, the background queue); the store is its one collaborator,
handed in, and calls it, never the other way round at import time.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import queue
import threading
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Protocol

import lmdb

from blockstore.errors import CacheError

from . import counters as counters_mod
from . import parts
from .counters import Counters
from .env import CacheEnv
from .errors import DiskFull
from .integrity import (
    blob_seed,
    intact,
    matches_sealed,
    sealed_entry,
    sealed_list,
    stored_bytes,
    stored_length,
    stored_sum,
)
from .layout import (
    CHUNK_KEY,
    DB_BLOBS,
    DB_CHUNKS,
    DB_COUNTERS,
    DB_IDS,
    DB_META,
    DB_PARTS,
    DB_SUMS,
    SEALED,
    U64,
    BlobRecord,
    chunk_key,
    chunk_length,
    meta_int,
)

log = logging.getLogger(__name__)

SCAN_BATCH = 256  # chunks per read transaction: short transactions let pages be reused


class Store(Protocol):
    """What sealing asks of the chunk store."""

    env: CacheEnv
    dbs: dict[bytes, lmdb._Database]
    counters: Counters

    @property
    def closing(self) -> bool: ...
    @property
    def read_only(self) -> bool: ...
    @property
    def fate(self) -> str: ...
    def lookup(self, digest: str) -> BlobRecord | None: ...
    def sealed_sums(self, digest: str) -> bytes | None: ...
    def drop_chunks(self, digest: str, indices: Sequence[int]) -> int: ...
    def remove(self, digest: str) -> bool: ...
    def flush(self) -> None: ...
    def delete_chunk(
        self, txn: lmdb.Transaction, key: bytes, record: BlobRecord | None, length: int
    ) -> None: ...
    def drop_part(self, txn: lmdb.Transaction, key: bytes) -> int: ...


def _hasher(digest: str):
    algorithm, _, hexdigest = digest.partition(":")
    try:
        return hashlib.new(algorithm), hexdigest
    except (ValueError, TypeError):
        return None, hexdigest


def _part_good(value: bytes | memoryview, digest: str, record: BlobRecord, index: int) -> bool:
    """The part check, for a part stored under chunk ``index`` of this blob."""
    if index >= record.chunks:
        return False
    return parts.intact(value, blob_seed(digest), index, chunk_length(record.size, index))


def scan(env: CacheEnv, start: bytes = b"", stop: bytes | None = None) -> Iterator:
    """Yield (key, value) of stored chunks from ``start`` up to ``stop``, in short transactions.

    A value is valid only until the next item is asked for; the consumer
    must not write to the store while scanning.
    """
    last: bytes | None = None
    while True:
        with env.reader(DB_CHUNKS) as txn:
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
    damaged_records: list[str] = field(default_factory=list)  # dropped: offline or blob records
    damage: str | None = None  # the cache file itself was damaged (and moved aside)

    @property
    def ok(self) -> bool:
        return (
            not self.bad_chunks
            and not self.bad_blobs
            and not self.damaged_records
            and self.damage is None
        )

    def to_dict(self) -> dict:
        return {**asdict(self), "ok": self.ok}


@dataclass
class _Scan:
    """What one pass over every stored chunk found, for the repair that follows it."""

    by_id: dict[int, tuple[str, BlobRecord]]
    sums: dict[str, bytes | None]
    stored_before: int
    present: dict[int, int]
    bad: list[bytes] = field(default_factory=list)
    orphans: set[bytes] = field(default_factory=set)
    bad_parts: list[bytes] = field(default_factory=list)
    stored: int = 0

    def good(self, key: bytes, value: memoryview | bytes) -> bool:
        """The chunk check and, for a sealed blob, the sealed check."""
        blob_id, index = CHUNK_KEY.unpack(key)
        digest, record = self.by_id[blob_id]
        sums = self.sums.get(digest)
        return (
            index < record.chunks
            and intact(value, blob_seed(digest), index, chunk_length(record.size, index))
            and (sums is None or matches_sealed(sums, index, stored_sum(value)))
        )


class Sealer:
    """Seals and verifies the blobs of one store, now or in the background."""

    def __init__(self, store: Store):
        self._store = store
        self._lock = threading.Lock()  # one blob hashed at a time, never twice at once
        # Digests whose last seal found bytes not matching the digest (and dropped the
        # blob): a seal that finds the blob gone reports that. Forgotten when the digest
        # is stored again.
        self._failed: set[str] = set()
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._queued: set[str] = set()
        self._queue_lock = threading.Lock()
        self._thread: threading.Thread | None = None

    # --- now ---------------------------------------------------------------------

    def seal(self, digest: str, *, recheck: bool = False) -> bool | None:
        """Hash a complete blob and seal it; see ``ChunkStore.seal``.

        ``recheck`` hashes a sealed blob again (``verify``); it stays sealed
        meanwhile, so chunks fetched again are still checked.
        """
        with self._lock:
            record = self._store.lookup(digest)
            if record is None:
                # Dropped by a seal that just ran here: say what it found.
                return False if digest in self._failed else None
            if record.present < record.chunks:
                return None  # sealed once or not, it is not whole now
            if record.sealed and not recheck:
                return True
            outcome = self._seal(digest, record)
            if outcome is False:
                self._failed.add(digest)
            return outcome

    def forget(self, digest: str) -> None:
        """The blob is stored anew: an old seal's verdict no longer applies."""
        self._failed.discard(digest)

    def _seal(self, digest: str, record: BlobRecord) -> bool | None:
        """Hash the blob over short read transactions, then seal it if nothing changed.

        A chunk may be evicted and stored again while the blob is hashed; the
        sealing transaction therefore checks every stored chunk against the
        checksum that was hashed, so what is sealed is what matched the digest.
        """
        store = self._store
        hasher, expected = _hasher(digest)
        if hasher is None:
            log.warning("cannot check %s: unknown digest algorithm", digest)
            return None
        seed = blob_seed(digest)
        sums = bytearray()
        bad: list[int] = []
        prefix = U64.pack(record.blob_id)
        index = 0
        # Closed explicitly: the scan holds a read transaction until it is.
        with contextlib.closing(scan(store.env, prefix, U64.pack(record.blob_id + 1))) as chunks:
            for key, value in chunks:
                if store.closing:
                    return None  # shutting down: the next run seals it
                if CHUNK_KEY.unpack(key)[1] != index:
                    return None  # a chunk went missing (evicted) while hashing
                if not intact(value, seed, index, chunk_length(record.size, index)):
                    bad.append(index)
                    break
                hasher.update(stored_bytes(value))
                sums += sealed_entry(stored_sum(value))
                index += 1
        if store.read_only:
            whole = not bad and index == record.chunks
            return self._judge(digest, record, hasher.hexdigest() == expected, whole)
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
        sealed = store.env.write(lambda txn: self._commit_seal(txn, digest, record, bytes(sums)))
        if sealed:
            log.info("sealed %s", digest)
        else:
            log.warning(
                "%s changed while it was hashed (chunks evicted, dropped or removed "
                "meanwhile); not sealed",
                digest,
            )
        return sealed

    def _judge(self, digest: str, record: BlobRecord, matches: bool, whole: bool) -> bool | None:
        """A read-only cache's blob, hashed (``whole``: every chunk intact, in order):
        judged, never changed; bad chunks are verify's to report, and an unsealed blob
        that matches stays unsealed."""
        if not whole:
            return None
        if not matches:
            log.error("%s: the cached bytes do not match the digest: %s", digest, self._store.fate)
            return False
        return True if record.sealed else None

    def _commit_seal(
        self, txn: lmdb.Transaction, digest: str, record: BlobRecord, sums: bytes
    ) -> bool | None:
        """Seal, if every chunk stored now is the one that was hashed."""
        store = self._store
        raw = txn.get(digest.encode(), db=store.dbs[DB_BLOBS])
        if raw is None:
            return None
        current = BlobRecord.unpack(raw)
        if current.blob_id != record.blob_id or current.size != record.size:
            return None  # made anew, or grown, since it was hashed
        if current.sealed:
            return True
        chunks_db = store.dbs[DB_CHUNKS]
        changed: list[tuple[bytes, int]] = []
        for i in range(record.chunks):
            key = chunk_key(record.blob_id, i)
            value = txn.get(key, db=chunks_db)
            if value is None:
                return None  # evicted after it was hashed: not whole any more
            if not matches_sealed(sums, i, stored_sum(value)):
                changed.append((key, stored_length(value)))
        if changed:
            # Stored again, with other bytes, after it was hashed: not the blob's.
            for key, length in changed:
                store.delete_chunk(txn, key, current, length)
            txn.put(digest.encode(), current.pack(), db=store.dbs[DB_BLOBS])
            counters_mod.persist(txn, store.dbs[DB_COUNTERS], {"checksum_failures": len(changed)})
            return None
        current.flags |= SEALED
        txn.put(digest.encode(), current.pack(), db=store.dbs[DB_BLOBS])
        txn.put(
            digest.encode(),
            sealed_list(blob_seed(digest), record.size, sums),
            db=store.dbs[DB_SUMS],
        )
        counters_mod.persist(txn, store.dbs[DB_COUNTERS], {"seals": 1})
        return True

    # --- in the background ---------------------------------------------------------

    def submit(self, digest: str) -> None:
        """Seal ``digest`` soon, off the caller's thread (once, however often asked)."""
        with self._queue_lock:
            if digest in self._queued:
                return
            if self._thread is None:
                thread = threading.Thread(target=self._run, name="cache-seal", daemon=True)
                try:
                    thread.start()
                except RuntimeError as exc:  # out of threads: the next ask seals it
                    log.info("sealing %s put off: %s", digest, exc)
                    return
                self._thread = thread
            self._queued.add(digest)
        self._queue.put(digest)

    def stop(self) -> None:
        with self._queue_lock:
            thread = self._thread
        if thread is not None:
            self._queue.put(None)
            thread.join()

    def _run(self) -> None:
        while (digest := self._queue.get()) is not None:
            with self._queue_lock:
                self._queued.discard(digest)
            try:
                self.seal(digest)
            except CacheError as exc:
                log.warning("sealing %s failed: %s", digest, exc)
            except Exception:
                log.exception("sealing %s failed", digest)

    # --- verification --------------------------------------------------------------

    def verify(self) -> VerifyReport:
        """Check every chunk (checksum, length, sealed checksum) and every complete blob.

        Safe while other processes use the cache: counts are only repaired if
        nothing was stored or evicted during the scan.
        """
        store = self._store
        report = VerifyReport()
        store.flush()
        if not store.read_only:
            # First, so that the scan numbers each chunk by a record that names it.
            report.damaged_records += store.drop_disagreeing_records()
        found = self._scan(report)
        if not store.read_only:
            try:
                store.env.write(lambda txn: self._repair(txn, found, report))
            except DiskFull as exc:
                if not (found.bad or found.orphans or found.bad_parts):
                    raise
                # Dropping chunks copies the pages that hold them: a full disk can refuse it.
                raise DiskFull(
                    f"{exc}, so the bad data verify found could not be dropped: free space "
                    "there, then run verify again"
                ) from exc
        for digest, record in found.by_id.values():
            if found.present[record.blob_id] != record.chunks:
                continue
            report.blobs_checked += 1
            outcome = self.seal(digest, recheck=True)
            if outcome is False:
                report.bad_blobs.append(digest)
            elif outcome and not record.sealed:
                report.newly_sealed.append(digest)
        return report

    def _scan(self, report: VerifyReport) -> _Scan:
        store = self._store
        by_id: dict[int, tuple[str, BlobRecord]] = {}
        with store.env.reader() as txn:
            for digest, raw in txn.cursor(db=store.dbs[DB_BLOBS]):
                record = BlobRecord.unpack(raw)
                by_id[record.blob_id] = (bytes(digest).decode(), record)
            stored_before = meta_int(txn, store.dbs[DB_META], b"stored_bytes")
        found = _Scan(
            by_id=by_id,
            sums={d: store.sealed_sums(d) for d, r in by_id.values() if r.sealed},
            stored_before=stored_before,
            present=dict.fromkeys(by_id, 0),
        )
        for key, value in scan(store.env):
            report.chunks_checked += 1
            blob_id, index = CHUNK_KEY.unpack(key)
            if blob_id not in by_id:
                found.orphans.add(key)
                continue
            digest = by_id[blob_id][0]
            if found.good(key, value):
                found.present[blob_id] += 1
                found.stored += stored_length(value)
            else:
                found.bad.append(key)
                report.bad_chunks.append((digest, index))
                log.warning("verify: %s chunk %d is bad", digest, index)
        report.orphan_chunks = len(found.orphans)
        self._scan_parts(found, report)
        return found

    def _scan_parts(self, found: _Scan, report: VerifyReport) -> None:
        """Check the parts of chunks too: a bad or orphan part is dropped like a chunk."""
        with self._store.env.reader(DB_PARTS) as txn:
            for raw_key, value in txn.cursor():
                key = bytes(raw_key)
                blob_id, index = CHUNK_KEY.unpack(key)
                entry = found.by_id.get(blob_id)
                if entry is not None and _part_good(value, entry[0], entry[1], index):
                    found.stored += stored_length(value)
                    continue
                found.bad_parts.append(key)
                if entry is not None:
                    report.bad_chunks.append((entry[0], index))
                    log.warning("verify: %s part of chunk %d is bad", entry[0], index)

    def _still_bad(self, txn: lmdb.Transaction, key: bytes) -> bool:
        """A part the scan found bad is so still (not merged or replaced meanwhile)."""
        value = txn.get(key, db=self._store.dbs[DB_PARTS])
        if value is None:
            return False
        blob_id, index = CHUNK_KEY.unpack(key)
        digest = txn.get(U64.pack(blob_id), db=self._store.dbs[DB_IDS])
        raw = txn.get(digest, db=self._store.dbs[DB_BLOBS]) if digest is not None else None
        if raw is None:
            return True
        return not _part_good(value, bytes(digest).decode(), BlobRecord.unpack(raw), index)

    def _repair(self, txn: lmdb.Transaction, found: _Scan, report: VerifyReport) -> None:
        """Drop bad and orphan chunks; if the cache was quiet meanwhile, fix drifted counts."""
        store = self._store
        report.repaired_records.clear()  # this may run again if the map has to grow
        blobs, meta = store.dbs[DB_BLOBS], store.dbs[DB_META]
        by_id = found.by_id
        quiet = meta_int(txn, meta, b"stored_bytes") == found.stored_before
        current: dict[int, BlobRecord] = {}
        dropped_bad = 0
        for key in [*found.bad, *found.orphans]:
            orphan = key in found.orphans
            value = txn.get(key, db=store.dbs[DB_CHUNKS])
            if value is None or (not orphan and found.good(key, value)):
                continue  # dropped, or dropped and fetched again, by another reader meanwhile
            blob_id = CHUNK_KEY.unpack(key)[0]
            if orphan and txn.get(U64.pack(blob_id), db=store.dbs[DB_IDS]) is not None:
                continue  # its blob was stored after the scan listed the blobs: no orphan
            dropped_bad += not orphan
            if blob_id in by_id and blob_id not in current:
                raw = txn.get(by_id[blob_id][0].encode(), db=blobs)
                if raw is not None:
                    current[blob_id] = BlobRecord.unpack(raw)
            store.delete_chunk(txn, key, current.get(blob_id), stored_length(value))
        for blob_id, record in current.items():
            txn.put(by_id[blob_id][0].encode(), record.pack(), db=blobs)
        bad_parts = [key for key in found.bad_parts if self._still_bad(txn, key)]
        freed = sum(store.drop_part(txn, key) for key in bad_parts)
        if freed:
            stored = max(0, meta_int(txn, meta, b"stored_bytes") - freed)
            txn.put(b"stored_bytes", U64.pack(stored), db=meta)
        if quiet:
            for blob_id, (digest, _) in by_id.items():
                raw = txn.get(digest.encode(), db=blobs)
                if raw is None:
                    continue
                record = BlobRecord.unpack(raw)
                if record.present != found.present[blob_id]:
                    report.repaired_records.append(digest)
                    record.present = found.present[blob_id]
                    txn.put(digest.encode(), record.pack(), db=blobs)
            txn.put(b"stored_bytes", U64.pack(found.stored), db=meta)
        counters_mod.persist(txn, store.dbs[DB_COUNTERS], {"checksum_failures": dropped_bad})
