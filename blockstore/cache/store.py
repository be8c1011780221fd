"""The chunk store: 32 KiB chunks of blobs in LMDB, checked, counted, evicted.

``ChunkStore`` owns one cache directory; several processes may open the
same one. It stores and drops chunks, keeps blob records and counters,
hands readers the stored values of a run of chunks (``read_chunks``), and
runs two small background jobs: a flush of counters and recency every
second, and sealing of blobs that became complete (``Sealer``). References
and manifests for offline use are ``images`` (``ImageRecords``); keeping
under the size cap and within the disk, evicting as it must, is
``capacity`` (``Capacity``). Checking and serving bytes is ``CachedBlob``'s
job.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
import weakref
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

import lmdb

from blockstore.errors import CacheError
from blockstore.export import Buffer
from blockstore.fetch import Flights
from blockstore.progress import human
from blockstore.throttledlog import ThrottledLog

from . import counters as counters_mod
from . import parts as parts_mod
from . import recency as recency_mod
from .capacity import STORED_CHUNK, Capacity
from .env import CacheEnv
from .errors import CacheDamaged, ChunkIntegrityError
from .evict import LOW_WATER, Evicted
from .holds import BlobHold, image_key
from .integrity import (
    blob_seed,
    chunk_sum,
    intact,
    matches_sealed,
    sealed_list_intact,
    stored_length,
)
from .layout import (
    CHUNK_KEY,
    CHUNK_SIZE,
    DB_BLOBS,
    DB_CHUNKS,
    DB_COUNTERS,
    DB_IDS,
    DB_LRU,
    DB_META,
    DB_PARTS,
    DB_SUMS,
    DB_TICKS,
    FORMAT_VERSION,
    PINNED,
    U64,
    BlobRecord,
    blob_keys,
    chunk_count,
    chunk_key,
    chunk_length,
    meta_int,
)
from .listing import BlobInfo, blob_infos
from .refs import ImageRecords
from .seal import Sealer, VerifyReport
from .write_lock_watch import unless_stuck

log = logging.getLogger(__name__)

_read_only_damage = ThrottledLog(
    log,
    "%d more lookups in the %.0f s after those logged met damaged records of a "
    "read-only cache, not logged one by one",
)
"""A damaged record of a read-only cache is met at every lookup of its blob."""
atexit.register(_read_only_damage.flush)

STATS_WAIT = 1.0  # seconds ``stats`` waits for a flush in flight

T = TypeVar("T")

DEFAULT_SIZE_CAP = 10 << 30
READ_ONLY_FATE = "left as it is, the cache being read-only here"
"""What becomes of bad data found in a read-only cache, as messages say it."""


class ChunkStore:
    """A persistent, integrity-checked store of blob chunks in one directory."""

    def __init__(
        self,
        path: str | Path,
        size_cap: int | None = None,
        *,
        offline: bool = False,
        replace_older: bool = False,
        flush_interval: float = 1.0,
        goes_on: bool = True,
    ):
        """``offline``: a damaged cache is an error (``CacheDamaged``), as there is no
        registry to refill an empty one from; online it is moved aside and replaced.
        ``replace_older``: this store will be filled (a server, a prefetch), so an
        older version's cache no process has open is moved aside for a new one; else
        it is refused and left as it is (``OtherFormat``). ``goes_on``: on without a cache
        found damaged that cannot be moved aside (``CacheEnv.lost``), taken for empty, as
        a server does; else that loss is an error."""
        self.path = Path(path)
        self._counting = threading.Lock()  # a flush's counts in flight, or a total read
        self.env = CacheEnv.open(
            self.path, offline=offline, replace_older=replace_older, goes_on=goes_on
        )
        self.dbs = self.env.dbs
        self.counters = counters_mod.Counters()
        self.recency = recency_mod.Recency()
        self._hit_path()
        self.end_read = self.env.end_read
        try:
            self.capacity = Capacity(self.env, self.path, self._open_meta(size_cap))
        except BaseException:
            self.env.close()
            raise
        self.images = ImageRecords(self.env)
        self._sealer = Sealer(self)
        self._flights: weakref.WeakValueDictionary[str, Flights] = weakref.WeakValueDictionary()
        self._flights_lock = threading.Lock()
        self._unstored: dict[str, CacheError] = {}  # digest -> why its last store failed
        self._closing = threading.Event()
        self._flush_interval = flush_interval
        self._flush_failing = False  # said once; every flush tries again until one saves
        self._start_flusher()
        _open_stores.add(self)

    def _hit_path(self) -> None:
        """What a hit calls, bound once: ``touch((blob_id, first, last))`` notes a use of
        chunks for eviction order, ``served((hits, misses, nbytes))`` counts a read; both
        are list appends, flushed later."""
        self.touch = self.recency.touch
        self.served = self.counters.served

    def _start_flusher(self) -> None:
        self._flusher = threading.Thread(
            target=self._flush_loop, args=(self._flush_interval,), name="cache-flush", daemon=True
        )
        self._flusher.start()

    def _forked(self) -> None:
        """In a fork's child: only the forking thread lives on, and locks other threads
        held at the fork stay held; start this store's own locks and threads anew."""
        self.counters = counters_mod.Counters()
        self.recency = recency_mod.Recency()
        self._hit_path()
        self._sealer = Sealer(self)
        self._flights = weakref.WeakValueDictionary()
        self._flights_lock = threading.Lock()
        closing, self._closing = self._closing.is_set(), threading.Event()
        if closing:
            self._closing.set()
        else:
            self._start_flusher()

    # --- lifecycle -------------------------------------------------------

    def _open_meta(self, size_cap: int | None) -> int:
        """The size cap in force; a read-only cache keeps the one it was written with."""
        if self.env.read_only:
            with self.env.reader(DB_META) as txn:
                return meta_int(txn, self.dbs[DB_META], b"size_cap", DEFAULT_SIZE_CAP)
        return self.env.write(lambda txn: self._init_meta(txn, size_cap))

    def _init_meta(self, txn: lmdb.Transaction, size_cap: int | None) -> int:
        meta = self.dbs[DB_META]
        # Write only what changes: an unchanged cache opens even on a full disk.
        # (The environment has refused another format already.)
        wanted = {b"format": FORMAT_VERSION, b"chunk_size": CHUNK_SIZE}
        stored_cap = meta_int(txn, meta, b"size_cap", DEFAULT_SIZE_CAP)
        if size_cap is not None and size_cap != stored_cap:
            wanted[b"size_cap"] = size_cap
        for name, value in wanted.items():
            if txn.get(name, db=meta) != U64.pack(value):
                txn.put(name, U64.pack(value), db=meta)
        self._recount_if_past_the_file(txn)
        return size_cap if size_cap is not None else stored_cap

    def _recount_if_past_the_file(self, txn: lmdb.Transaction) -> None:
        """A stored total larger than the file holding the chunks cannot be (a bit flipped
        on the disk): left so, every store would evict as over the cap, taking what it
        stored with the rest. It is counted again from what is stored."""
        meta = self.dbs[DB_META]
        stored = meta_int(txn, meta, b"stored_bytes")
        if stored <= self.env.file_size():
            return
        counted = sum(stored_length(v) for _, v in txn.cursor(db=self.dbs[DB_CHUNKS]))
        counted += sum(stored_length(v) for _, v in txn.cursor(db=self.dbs[DB_PARTS]))
        txn.put(b"stored_bytes", U64.pack(counted), db=meta)
        log.warning(
            "the cache at %s counted %s stored, more than its file holds: counted again, %s",
            self.path,
            human(stored),
            human(counted),
        )

    def close(self) -> None:
        """Seal, flush and close; writes stuck behind another process's write lock are
        left to this process's exit, with the handle, said once."""
        if self._closing.is_set():
            return
        self._closing.set()
        if not unless_stuck(self._close_now, self.env.write_lock_wait):
            log.warning(
                "the cache at %s was left with writes waiting for its write lock, which "
                "another process holds (one stopped, as by Ctrl-Z, holds it until it goes "
                "on): what they held is not kept",
                self.path,
            )

    def _close_now(self) -> None:
        self._sealer.stop()
        self._flusher.join()
        self.flush()
        self.env.close()

    def __enter__(self) -> ChunkStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def closing(self) -> bool:
        """True once close() has begun: long background work should give up."""
        return self._closing.is_set()

    @property
    def read_only(self) -> bool:
        """This process cannot write the cache (see ``write_access.cannot_write``): it serves what
        the cache holds, and keeps nothing it fetches."""
        return self.env.read_only

    @property
    def read_only_because(self) -> str | None:
        """Why this process cannot write the cache, None if it can."""
        return self.env.read_only_because

    def write_lock_wait(self) -> float:
        """Seconds a write of this process has been waiting for the cache's write lock
        (``CacheEnv.write_lock_wait``)."""
        return self.env.write_lock_wait()

    @property
    def fate(self) -> str:
        """What becomes of bad data found here, as messages say it."""
        return READ_ONLY_FATE if self.read_only else "dropped"

    @property
    def size_cap(self) -> int:
        return self.capacity.size_cap

    # --- background flush -------------------------------------------------

    def _flush_loop(self, interval: float) -> None:
        told_replaced = False
        while not self._closing.wait(interval):
            try:
                self.flush()
            except Exception:  # a flush must never kill the store
                log.exception("flushing cache counters failed")
            if not told_replaced and self.env.replaced():
                told_replaced = True
                log.warning(
                    "the cache directory %s was deleted or replaced while this process uses "
                    "it: what it keeps now goes to the old file, which no other process "
                    "sees and whose disk space stays taken until this process stops; "
                    "restart it to use the cache at that path",
                    self.path,
                )

    def flush(self) -> None:
        """Persist pending counters and recency in one transaction."""
        # Taken from pending, the counts are in neither place until the commit: ``stats``
        # waits for it, or a total read meanwhile would go down (a counter reset, to
        # whatever scrapes the metrics).
        with self._counting:
            tick = recency_mod.now_tick()
            if self.env.read_only:  # nothing can be saved: counts stay in this process
                self.recency.take(tick)
                self.counters.pending()
                return
            deltas = self.counters.take()
            touched = self.recency.take(tick)
            if not deltas and not touched:
                return

            def work(txn: lmdb.Transaction) -> None:
                counters_mod.persist(txn, self.dbs[DB_COUNTERS], deltas)
                recency_mod.apply(txn, self.dbs, touched, tick)

            try:
                self.env.write(work)
            except CacheError as exc:
                self.counters.give_back(deltas)
                if not self._flush_failing:
                    log.warning(
                        "cache counters not saved: %s (tried again each flush, not said again "
                        "until saved)",
                        exc,
                    )
                self._flush_failing = True
            else:
                if self._flush_failing:
                    log.info("cache counters saved again")
                self._flush_failing = False
                self.recency.placed(touched)

    # --- blobs and chunks ---------------------------------------------------

    def flights(self, digest: str) -> Flights:
        """The in-flight table every export of ``digest`` in this process shares."""
        with self._flights_lock:
            flights = self._flights.get(digest)
            if flights is None:
                flights = self._flights[digest] = Flights()
            return flights

    def lookup(self, digest: str) -> BlobRecord | None:
        """The blob's record; None if the cache has none, or none that agrees with the
        rest of the cache (``_disagreement``), which is then dropped with its chunks."""

        def question() -> tuple[BlobRecord | None, bool]:
            with self.env.reader(DB_BLOBS) as txn:
                raw = txn.get(digest.encode())
                if raw is None:
                    return None, True
                record = BlobRecord.unpack(raw)
                return record, self._disagreement(txn, digest, record) is None

        record, agrees = self.env.ask(question, lambda: (None, True))
        if agrees:
            return record
        if self.read_only:
            _read_only_damage.warning(
                "the cache's record of %s is damaged; the cache is read-only here, so it "
                "is left, and the blob served as if it were not cached",
                digest,
            )
            return None
        try:
            # The record as the write finds it: dropped, or made anew meanwhile.
            return self.env.write(lambda txn: self._record(txn, digest))
        except CacheError as exc:  # left for the next writer (``_record``) to drop
            log.warning("the cache's damaged record of %s could not be dropped: %s", digest, exc)
            return None

    def sealed_sums(self, digest: str) -> bytes | None:
        """Every chunk's sealed entry (packed, see ``integrity``), once the blob is sealed."""

        def question() -> bytes | None:
            with self.env.reader(DB_SUMS) as txn:
                raw = txn.get(digest.encode())
                return bytes(raw) if raw is not None else None

        return self.env.ask(question, lambda: None)

    def missing(self, blob_id: int | None, indices: range | list[int]) -> list[int]:
        """Which of ``indices`` have no stored chunk (presence only, unchecked; a part of a
        chunk is not the chunk)."""
        if blob_id is None:
            return list(indices)

        def question() -> list[int]:
            with self.env.reader(DB_CHUNKS) as txn:
                get = txn.get
                return [i for i in indices if get(chunk_key(blob_id, i)) is None]

        return self.env.ask(question, lambda: list(indices))

    def missing_by_digest(self, digest: str, indices: range) -> list[int]:
        """``missing`` for the blob ``digest`` names now: all of ``indices`` if it has no
        record, none if its record says it is whole, without a question per chunk
        (393,216 for a 12 GiB tar, a read held for seconds)."""
        record = self.lookup(digest)
        if record is None:
            return list(indices)
        if record.present == record.chunks:
            return []
        return self.missing(record.blob_id, indices)

    def lost(self) -> str | None:
        """Why this process goes on without the cache (``CacheEnv.lost``), or None. A handle
        found damaged is replaced first, so damage found by the last store is answered."""
        self.env.renew()
        return self.env.lost

    def over_cap(self, digest: str, size: int, *, passed: bool = False) -> str | None:
        """Why blob ``digest`` (of ``size`` bytes) cannot be kept whole under the size cap,
        or None: it is not pinned, and larger than eviction keeps the cache to. Storing
        it whole would evict the rest of the cache, then its own first chunks. ``passed``:
        ``size`` is what an indexing pass has made of the tar so far, not its whole size."""
        if size <= self.size_cap * LOW_WATER:
            return None
        record = self.lookup(digest)
        if record is not None and record.pinned:
            return None
        if passed:
            passing = f"its tar passed {human(size)} as it was indexed"
            return f"{digest} is larger than {self.kept_to()}: {passing}"
        return f"{digest} ({human(size)}) is larger than {self.kept_to()}"

    def kept_to(self) -> str:
        """The limit ``over_cap`` refuses past, in words: not the cap itself but the low-water
        mark below it, which a blob between the two would still be evicted past."""
        low = human(int(self.size_cap * LOW_WATER))
        return f"the {low} eviction keeps the cache to under its {human(self.size_cap)} cap"

    def cannot_keep_whole(self, digest: str, size: int) -> str | None:
        """Why blob ``digest`` (of ``size`` bytes) cannot be stored whole without costing
        the rest of the cache, or None: it is over the cap (``over_cap``), or the disk
        has no room for it (``no_room``). Asked before a fill that nobody waits on."""
        return self.over_cap(digest, size) or self.no_room(digest, size)

    def no_room(self, digest: str, size: int) -> str | None:
        """Why the disk holding the cache cannot take the rest of blob ``digest`` (of
        ``size`` bytes), or None.

        Asked before a prefetch or a fill stores a byte: each store that finds the
        disk full evicts the oldest of the cache, the layers prefetched for offline
        use first, and a blob too large would still not fit (it would lose itself too)."""
        missing = self._missing_count(digest, size)
        need = missing * STORED_CHUNK
        room = self.room(missing * CHUNK_SIZE)
        if need <= room:
            return None
        return (
            f"{digest} needs about {human(need)} more in the cache at "
            f"{self.path}, and the disk holding it has room for {human(room)}: "
            "free space there, or make room with `cache rm` or `cache gc --cache-size`"
        )

    def _missing_count(self, digest: str, size: int) -> int:
        """How many chunks of blob ``digest`` (of ``size`` bytes) are not stored, from its
        record's count, not a question per chunk: the size is the registry's word, and
        one that lies (16 TiB: 512M chunks) must be judged before it costs anything."""
        record = self.lookup(digest)
        if record is None:
            return chunk_count(size)
        return max(chunk_count(size) - record.present, 0)

    def read_parts(self, blob_id: int, indices: Sequence[int]) -> dict[int, bytes]:
        """The stored parts (unchecked, see ``parts``) of those of ``indices`` that have one."""

        def question() -> dict[int, bytes]:
            with self.env.reader(DB_PARTS) as txn:
                found = ((i, txn.get(chunk_key(blob_id, i))) for i in indices)
                return {i: bytes(value) for i, value in found if value is not None}

        return self.env.ask(question, dict)

    def store_parts(
        self, digest: str, size: int, blocks: dict[int, dict[int, Buffer]]
    ) -> BlobRecord | None:
        """Keep blocks of chunks (chunk index -> block number -> bytes) as parts, merged
        with the parts already stored; a chunk whose blocks are now all there is stored
        whole. Chunks stored whole already are left alone, and so is a sealed blob (its
        chunks are checked whole): None then."""
        seed = blob_seed(digest)

        def work(txn: lmdb.Transaction) -> BlobRecord | None:
            record = self._record_for(txn, digest, size)
            if record.sealed:
                return None
            added = 0
            tick = recency_mod.now_tick()
            for index, new in sorted(blocks.items()):
                key = chunk_key(record.blob_id, index)
                if txn.get(key, db=self.dbs[DB_CHUNKS]) is not None:
                    continue
                length = chunk_length(size, index)
                old = txn.get(key, db=self.dbs[DB_PARTS])
                part, whole = parts_mod.merged(seed, index, length, old, new)
                added -= self.drop_part(txn, key)
                if whole is not None:
                    checksum = chunk_sum(seed, index, whole)
                    added += self._put_chunk(txn, record, key, checksum, whole, tick)
                else:
                    txn.put(key, part, db=self.dbs[DB_PARTS])
                    added += stored_length(part)
                    part_key = parts_mod.part_lru_key(key)
                    recency_mod.place(txn, self.dbs, part_key, tick, pinned=record.pinned)
            return self._settle(txn, digest, record, added, tick)

        return self._write_making_room(work)

    def drop_part(self, txn: lmdb.Transaction, key: bytes) -> int:
        """In a write transaction: drop chunk ``key``'s part, if any, and its recency entry;
        the bytes it held (the caller counts them off the stored total)."""
        old = txn.pop(key, db=self.dbs[DB_PARTS])
        if old is None:
            return 0
        part_key = parts_mod.part_lru_key(key)
        tick = txn.pop(part_key, db=self.dbs[DB_TICKS])
        if tick is not None:
            txn.delete(bytes(tick) + part_key, db=self.dbs[DB_LRU])
        return stored_length(old)

    def read_chunks(
        self, blob_id: int, first: int, last: int
    ) -> tuple[list[memoryview | None], lmdb.Transaction]:
        """The stored values (checksum and bytes, unchecked) of chunks ``first..last``,
        None where absent, and the read transaction they belong to. The values are
        LMDB's own buffers, valid until ``end_read(txn)``, which the caller must call
        (in a ``finally``): check and copy them before. The transaction keeps its reader
        slot until it is freed: drop it before waiting on anything. A pair, not a context manager:
        this is the hit path, where a ``with`` costs as much as the lookup.

        A read-only cache is read without a reader slot, so a writer appearing through
        another path may reuse a page while it is looked at: there the values are copies,
        so what is checked is what is served (a copy torn by a writer fails its check)."""
        env = self.env
        txn = env.begin_read(DB_CHUNKS)
        try:
            get = txn.get
            if first == last:
                values = [get(CHUNK_KEY.pack(blob_id, first))]
            else:
                pack = CHUNK_KEY.pack
                values = [get(pack(blob_id, index)) for index in range(first, last + 1)]
            if env.read_only:
                values = [memoryview(bytes(v)) if v is not None else None for v in values]
            return values, txn
        except lmdb.Error as exc:
            env.end_read(txn)
            raise env.damaged(exc) from exc
        except BaseException:
            env.end_read(txn)
            raise

    def store_chunks(
        self, digest: str, size: int, first: int, chunks: Sequence[Buffer]
    ) -> BlobRecord:
        """Store consecutive chunks from index ``first``, evicting to stay under the cap.

        On a full disk, evicts harder and tries once more; then raises
        ``DiskFull``, leaving the cache as it was. Chunks of a sealed blob
        that do not match its sealed checksums are refused with
        ``ChunkIntegrityError``, nothing stored.
        """
        return self.store_runs(digest, size, [(first, chunks)])

    def store_runs(
        self, digest: str, size: int, runs: Sequence[tuple[int, Sequence[Buffer]]]
    ) -> BlobRecord:
        """Store several runs of consecutive chunks in one commit (one fsync), as
        ``store_chunks`` does one; a run refused as not matching the sealed blob is
        left out and the others stored, then ``ChunkIntegrityError`` is raised."""

        def work(txn: lmdb.Transaction) -> BlobRecord:
            record = None
            for first, chunks in runs:
                record = self._store(txn, digest, size, first, chunks)
            assert record is not None
            return record

        adding = sum(len(chunk) for _, chunks in runs for chunk in chunks)
        try:
            record = self._write_making_room(work, adding)
        except CacheError as exc:
            self._unstored[digest] = exc
            raise
        except ChunkIntegrityError:
            if len(runs) == 1:
                self.counters.add(checksum_failures=1)
                raise
        else:
            self._unstored.pop(digest, None)
            return record
        refused: ChunkIntegrityError | None = None
        for first, chunks in runs:
            try:
                self.store_runs(digest, size, [(first, chunks)])
            except ChunkIntegrityError as exc:
                refused = exc
        assert refused is not None
        raise refused

    def unstored(self, digest: str) -> CacheError | None:
        """Why the last store of ``digest``'s chunks in this process failed, if it did (a
        full or read-only disk): a prefetch that could not keep the blob whole says it."""
        return self._unstored.get(digest)

    def _record(self, txn: lmdb.Transaction, digest: str) -> BlobRecord | None:
        """The blob's record in write transaction ``txn``; None if the cache has none, or
        none that agrees with the rest of the cache (``_disagreement``): that one is dropped."""
        raw = txn.get(digest.encode(), db=self.dbs[DB_BLOBS])
        if raw is None:
            return None
        record = BlobRecord.unpack(raw)
        why = self._disagreement(txn, digest, record)
        if why is None:
            return record
        self._drop_disagreeing(txn, digest, why)
        return None

    def drop_disagreeing_records(self) -> list[str]:
        """Drop every blob record that disagrees with the rest of the cache
        (``_disagreement``), with its chunks; the digests of those dropped."""

        def work(txn: lmdb.Transaction) -> list[str]:
            digests = [bytes(key).decode() for key, _ in txn.cursor(db=self.dbs[DB_BLOBS])]
            return [digest for digest in digests if self._record(txn, digest) is None]

        return self.env.write(work)

    def _disagreement(self, txn: lmdb.Transaction, digest: str, record: BlobRecord) -> str | None:
        """Why a blob's record disagrees with what else the cache keeps of the blob, or
        None if its id names the blob back and, sealed, its sealed list is intact and of
        its size.

        A bit of a record flipped on the disk could otherwise point it at another
        blob's chunks, which fail this blob's checks and would be deleted as bad, or
        pass a blob never checked against its digest as sealed."""
        if txn.get(U64.pack(record.blob_id), db=self.dbs[DB_IDS]) != digest.encode():
            return "its id names another blob"
        if record.sealed:
            sums = txn.get(digest.encode(), db=self.dbs[DB_SUMS])
            if sums is None or not sealed_list_intact(blob_seed(digest), record.size, sums):
                return "sealed, without an intact sealed list of its size and chunks"
        return None

    def _drop_disagreeing(self, txn: lmdb.Transaction, digest: str, why: str) -> None:
        """Drop a blob whose record disagrees (``why``): the record, its sealed entries,
        and the chunks of every id that names the blob, which are found from the ids,
        not from the record. Nothing of another blob, and never the cache.

        Said once dropped: a write tried first in a read transaction (``looking``) runs
        up to its first change, then again as a writer, and would say it twice."""
        ids = self.dbs[DB_IDS]
        named = digest.encode()
        own = [bytes(key) for key, value in txn.cursor(db=ids) if value == named]
        for key in own:
            self._drop_stored(txn, BlobRecord(blob_id=U64.unpack(key)[0], size=0))
            txn.delete(key, db=ids)
        txn.delete(named, db=self.dbs[DB_BLOBS])
        txn.delete(named, db=self.dbs[DB_SUMS])
        self._sealer.forget(digest)
        log.warning(
            "the cache's record of %s is damaged (%s): dropped it with the chunks stored "
            "for it, which are fetched again as they are read",
            digest,
            why,
        )

    def _write_making_room(self, work: Callable[[lmdb.Transaction], T], adding: int = 0) -> T:
        """``work`` in a write transaction, storing ``adding`` bytes of chunks, making room
        as the disk asks (``making_room``)."""
        return self.making_room(lambda: self.env.write(work), adding)

    def making_room(self, write: Callable[[], T], adding: int = 0) -> T:
        """``write()``, storing ``adding`` bytes of chunks, evicting on a full disk
        (``Capacity.making_room``)."""
        return self.capacity.making_room(write, adding)

    def room(self, adding: int = 0) -> int:
        """Bytes the cache can still take before the disk is full (``Capacity.room``)."""
        return self.capacity.room(adding)

    def is_held(self, digest: str) -> bool:
        """Whether a server (of any process) serves ``digest`` from the cache alone."""
        return self.capacity.is_held(digest)

    def hold_image(self, reference: str) -> BlobHold | None:
        """Hold the image ``reference`` while this process serves it from the cache
        alone (``release`` the hold when done); None for a read-only cache, from
        which nothing is removed here."""
        return None if self.read_only else BlobHold.take(self.path, image_key(reference))

    def image_is_held(self, reference: str) -> bool:
        """Whether a server (of any process) serves image ``reference`` from the cache alone."""
        return self.capacity.is_held(image_key(reference))

    def _record_for(self, txn: lmdb.Transaction, digest: str, size: int) -> BlobRecord:
        record = self._record(txn, digest)
        if record is not None:
            if record.size != size:
                raise CacheError(
                    f"{digest} has size {record.size} in the cache, but {size} was given"
                )
            return record
        self._sealer.forget(digest)  # a new record: an old seal's verdict is void
        meta = self.dbs[DB_META]
        # A new cache (also one that replaced a damaged cache under running readers)
        # numbers its blobs from the clock, so an id a reader still holds from the old
        # cache names nothing here; and a chunk's checksum would refuse it anyway.
        blob_id = meta_int(txn, meta, b"next_id", recency_mod.now_tick())
        txn.put(b"next_id", U64.pack(blob_id + 1), db=meta)
        txn.put(U64.pack(blob_id), digest.encode(), db=self.dbs[DB_IDS])
        return BlobRecord(blob_id=blob_id, size=size)

    def _store(
        self,
        txn: lmdb.Transaction,
        digest: str,
        size: int,
        first: int,
        chunks: Sequence[Buffer],
    ) -> BlobRecord:
        """Store chunks in one write transaction.

        The sealed check is made here, in the transaction that stores: a
        check made earlier could miss a seal committed in between (by
        another thread or process), and a wrong chunk of a sealed blob
        would then be served forever.
        """
        record = self._record_for(txn, digest, size)
        sums = txn.get(digest.encode(), db=self.dbs[DB_SUMS]) if record.sealed else None
        seed = blob_seed(digest)
        tick = recency_mod.now_tick()
        added = 0
        for offset, data in enumerate(chunks):
            index = first + offset
            checksum = chunk_sum(seed, index, data)
            if sums is not None and not matches_sealed(sums, index, checksum):
                raise ChunkIntegrityError(
                    f"{digest}: chunk {index} does not match the sealed blob; not stored"
                )
            key = chunk_key(record.blob_id, index)
            added += self._put_chunk(txn, record, key, checksum, data, tick)
        return self._settle(txn, digest, record, added, tick)

    def _put_chunk(
        self,
        txn: lmdb.Transaction,
        record: BlobRecord,
        key: bytes,
        checksum: bytes,
        data: Buffer,
        tick: int,
    ) -> int:
        """Store a chunk the blob lacks (one it has is left as it is): counted present,
        young in the LRU, any part of it dropped. The stored total's change."""
        if not txn.put(key, checksum + data, db=self.dbs[DB_CHUNKS], overwrite=False):
            return 0
        record.present += 1
        recency_mod.place(txn, self.dbs, key, tick, pinned=record.pinned)
        return len(data) - self.drop_part(txn, key)

    def _settle(
        self, txn: lmdb.Transaction, digest: str, record: BlobRecord, added: int, tick: int
    ) -> BlobRecord:
        """After storing: the blob's record and the stored total written, and room made
        under the cap; the record as it is after eviction."""
        record.last_use = tick / 1e6
        txn.put(digest.encode(), record.pack(), db=self.dbs[DB_BLOBS])
        capacity = self.capacity
        stored = capacity.add_stored(txn, added)
        cap = capacity.current_cap(txn)
        if stored > cap:
            capacity.evict(txn, stored, capacity.evict_target(txn, stored, cap))
            evicted = self._record(txn, digest)
            assert evicted is not None  # eviction drops chunks, never a record
            record = evicted
        return record

    def drop_chunks(self, digest: str, indices: Sequence[int], *, recheck: bool = True) -> int:
        """Delete chunks found bad; a chunk fixed meanwhile by another process stays.

        ``recheck=False`` drops them whatever their own checksum says: the
        caller found them bad by another measure (a chunk index).
        """

        def work(txn: lmdb.Transaction) -> int:
            record = self._record(txn, digest)
            if record is None:
                return 0
            seed = blob_seed(digest)
            dropped = 0
            for index in indices:
                key = chunk_key(record.blob_id, index)
                value = txn.get(key, db=self.dbs[DB_CHUNKS])
                if value is None or (
                    recheck and intact(value, seed, index, chunk_length(record.size, index))
                ):
                    continue
                self.delete_chunk(txn, key, record, stored_length(value))
                dropped += 1
            txn.put(digest.encode(), record.pack(), db=self.dbs[DB_BLOBS])
            return dropped

        return self.env.write(work)

    def delete_chunk(
        self, txn: lmdb.Transaction, key: bytes, record: BlobRecord | None, length: int
    ) -> None:
        """In a write transaction: drop a chunk and its LRU entries, keeping counts right."""
        txn.delete(key, db=self.dbs[DB_CHUNKS])
        tick = txn.get(key, db=self.dbs[DB_TICKS])
        if tick is not None:
            txn.delete(bytes(tick) + key, db=self.dbs[DB_LRU])
            txn.delete(key, db=self.dbs[DB_TICKS])
        if record is not None:
            record.forget_one()
        self.capacity.add_stored(txn, -length)

    def resize(self, digest: str, size: int) -> None:
        """Make an unsealed blob ``size`` bytes long, keeping its stored chunks: for a tar
        whose length came from a gzip trailer, which gives it modulo 4 GiB (the tar is
        longer), and of the last member alone (it is shorter: what the pass made).
        Longer, a short last chunk of the old length, no longer the last, goes; shorter
        is refused if a chunk or part is stored where the new length ends or beyond (it
        would be of the old)."""

        def work(txn: lmdb.Transaction) -> None:
            record = self._record(txn, digest)
            if record is None:
                return  # nothing stored yet: the first store makes it at its size
            shorter = size < record.size
            if (
                record.sealed
                or size == record.size
                or (shorter and self._stored_from(txn, record.blob_id, size // CHUNK_SIZE))
            ):
                change = "shrink" if shorter else "grow"
                raise CacheError(f"{digest} cannot {change} from {record.size} to {size} bytes")
            if not shorter and record.size % CHUNK_SIZE:
                key = chunk_key(record.blob_id, record.chunks - 1)
                value = txn.get(key, db=self.dbs[DB_CHUNKS])
                if value is not None:
                    self.delete_chunk(txn, key, record, stored_length(value))
            record.size = size
            txn.put(digest.encode(), record.pack(), db=self.dbs[DB_BLOBS])

        self.env.write(work)

    def _stored_from(self, txn: lmdb.Transaction, blob_id: int, index: int) -> bool:
        """Whether a chunk or part of blob ``blob_id`` is stored at ``index`` or beyond."""
        first = chunk_key(blob_id, index)
        for db in (DB_CHUNKS, DB_PARTS):
            cursor = txn.cursor(db=self.dbs[db])
            if cursor.set_range(first) and cursor.key()[:8] == first[:8]:
                return True
        return False

    def drop_unproven(self, digest: str) -> bool:
        """Drop every chunk and part of a blob not sealed, keeping its record (and pin):
        bytes no digest has judged, which a pass over them found wrong somewhere. False
        for a sealed blob, whose chunks are proven and stay."""

        def work(txn: lmdb.Transaction) -> bool:
            record = self._record(txn, digest)
            if record is None:
                return True  # nothing kept (the seal may have just dropped it)
            if record.sealed:
                return False
            self._drop_stored(txn, record)
            txn.put(digest.encode(), record.pack(), db=self.dbs[DB_BLOBS])
            return True

        return self.env.write(work)

    def _drop_stored(self, txn: lmdb.Transaction, record: BlobRecord) -> None:
        """In a write transaction: delete every chunk and part of a blob, keeping the
        stored total and ``record.present`` right (the caller writes or drops it)."""
        chunks = [
            (key, stored_length(value))
            for key, value in blob_keys(txn.cursor(db=self.dbs[DB_CHUNKS]), record.blob_id)
        ]
        for key, length in chunks:
            self.delete_chunk(txn, key, record, length)
        parts = [key for key, _ in blob_keys(txn.cursor(db=self.dbs[DB_PARTS]), record.blob_id)]
        for key in parts:
            self.capacity.add_stored(txn, -self.drop_part(txn, key))

    def remove(self, digest: str) -> bool:
        """Remove a blob, its chunks and its checksums; False if it was not cached."""

        def work(txn: lmdb.Transaction) -> bool:
            record = self._record(txn, digest)
            if record is None:
                return False
            self._drop_stored(txn, record)
            txn.delete(digest.encode(), db=self.dbs[DB_BLOBS])
            txn.delete(U64.pack(record.blob_id), db=self.dbs[DB_IDS])
            txn.delete(digest.encode(), db=self.dbs[DB_SUMS])
            return True

        self._sealer.forget(digest)
        return self.env.write(work)

    def _set_flag(self, digest: str, flag: int, on: bool, size: int | None) -> None:
        def work(txn: lmdb.Transaction) -> None:
            record = self._record(txn, digest)
            if record is None:
                if size is None:
                    raise CacheError(f"{digest} is not in the cache")
                record = self._record_for(txn, digest, size)
            was_pinned = record.pinned
            record.flags = record.flags | flag if on else record.flags & ~flag
            txn.put(digest.encode(), record.pack(), db=self.dbs[DB_BLOBS])
            if record.pinned != was_pinned:
                recency_mod.set_pinned(txn, self.dbs, record.blob_id, record.pinned)

        self.env.write(work)

    def renew(self, digest: str) -> None:
        """Make the chunks the blob has the youngest in the cache (``recency.renew``): a
        prefetch filling it alone then evicts the rest of the cache for the chunks it
        lacks, not the ones it has, which it stored interleaved with another's. A
        read-only cache keeps nothing it fetches, so it has no order to change."""
        if self.read_only:
            return

        def work(txn: lmdb.Transaction) -> None:
            record = self._record(txn, digest)
            if record is not None and not record.pinned:
                recency_mod.renew(txn, self.dbs, record.blob_id, recency_mod.now_tick())

        self.env.write(work)

    def pin(self, digest: str, size: int | None = None) -> None:
        """Keep a blob's chunks from eviction; ``size`` lets a blob not yet cached be pinned."""
        self._set_flag(digest, PINNED, True, size)

    def unpin(self, digest: str) -> None:
        self._set_flag(digest, PINNED, False, None)

    def gc(self) -> dict[str, int]:
        """Evict down to the size cap now (after saving recency)."""
        self.flush()

        def work(txn: lmdb.Transaction) -> Evicted:
            stored = meta_int(txn, self.dbs[DB_META], b"stored_bytes")
            cap = self.capacity.current_cap(txn)
            if stored <= cap:
                return Evicted(0, 0, [])
            # Asked for by name: the cap is kept, though pins leave the others nothing;
            # only what a server holds (served from the cache alone) is passed over.
            return self.capacity.evict(txn, stored, int(cap * LOW_WATER))

        done = self.env.write(work)
        self.flush()
        return {"evicted_chunks": done.chunks, "freed_bytes": done.freed, "held": done.held}

    # --- sealing and verification ------------------------------------------

    def seal(self, digest: str, size: int | None = None) -> bool | None:
        """Check a complete blob against its digest and seal it now.

        True: sealed (or already was), and whole. False: the bytes did not
        match and the blob was dropped. None: not complete (a sealed blob
        evicted in part included) or not checkable yet.
        ``size`` lets an empty blob, which no chunk ever records, be sealed.
        """
        if size == 0:
            self.store_chunks(digest, 0, 0, [])
        return self._sealer.seal(digest)

    def seal_later(self, digest: str) -> None:
        self._sealer.submit(digest)

    def verify(self) -> VerifyReport:
        """Re-check every chunk and every complete blob, dropping what is bad.

        Damage to the file itself (found now, or when this store opened it)
        is reported too; the damaged file was moved aside.
        """
        try:
            report = self._sealer.verify()
            report.damaged_records += self.images.drop_damaged()
        except CacheDamaged as exc:
            report = VerifyReport()
            if self.read_only:
                report.damage = str(exc)  # nothing is moved aside, nor can be
            self.env.renew()  # moves the damaged file aside now, so the report is true
        if self.env.moved_aside:
            report.damage = "; ".join(self.env.moved_aside)
        return report

    # --- reporting -----------------------------------------------------------

    def blobs(self) -> list[BlobInfo]:
        return self.env.ask(lambda: blob_infos(self.env), list)

    def stats(self) -> dict:
        """Counters (persisted plus this process's pending ones) and totals; a cache this
        process goes on without (``CacheEnv.lost``) counts as empty, so a scrape of a
        server that lost it still answers."""
        return self.env.ask(self._stats, self._stats)

    def _stats(self) -> dict:
        # A flush stuck on the write lock (another process stopped while writing) holds
        # the counts up: after a second, they are read without it.
        counting = self._counting.acquire(timeout=STATS_WAIT)
        try:
            totals = dict.fromkeys(counters_mod.COUNTER_NAMES, 0)
            stored = chunks = parts = mapped = 0
            if self.env.lost is None:
                with self.env.reader() as txn:
                    totals = counters_mod.load(txn, self.dbs[DB_COUNTERS])
                    meta = self.dbs[DB_META]
                    stored = meta_int(txn, meta, b"stored_bytes")
                    chunks = txn.stat(self.dbs[DB_CHUNKS])["entries"]
                    parts = txn.stat(self.dbs[DB_PARTS])["entries"]
                    mapped = self.env.map_size()
            pending = self.counters.pending()
        finally:
            if counting:
                self._counting.release()
        for name, delta in pending.items():
            totals[name] += delta
        infos = self.blobs()
        totals.update(
            blobs=len(infos),
            sealed_blobs=sum(i.sealed for i in infos),
            pinned_blobs=sum(i.pinned for i in infos),
            chunks=chunks,
            parts=parts,
            stored_bytes=stored,
            size_cap=self.capacity.size_cap,
            file_bytes=self.env.file_size(),
            map_bytes=mapped,
            chunk_size=CHUNK_SIZE,
        )
        return totals


_open_stores: weakref.WeakSet[ChunkStore] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for store in list(_open_stores):
        store._forked()


os.register_at_fork(after_in_child=_after_fork_in_child)
