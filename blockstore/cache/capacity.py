"""How much one cache keeps: under its size cap, and within the disk that holds it.

Every store adds to the stored total and, over the cap, evicts the oldest
chunks in the same transaction; a full disk makes room step by step and
tries again. The cap, the stored total and what eviction may not take
(pinned layers, layers a server holds) are weighed here, so the store only
says what it added or dropped.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import lmdb

from blockstore.progress import human
from blockstore.throttledlog import ThrottledLog

from . import counters as counters_mod
from . import holds
from .env import CacheEnv
from .errors import DiskFull
from .evict import LOW_WATER, WORKING_SET, Evicted, evict
from .layout import CHUNK_SIZE, DB_COUNTERS, DB_LRU, DB_META, U64, chunk_count, meta_int

log = logging.getLogger(__name__)
_full_disk = ThrottledLog(
    log, "%d more times the disk holding the cache was full in the %.0f s after those logged"
)

T = TypeVar("T")

STORED_CHUNK = CHUNK_SIZE + 4096
"""What a stored chunk takes in the LMDB file: its value (checksums, then the bytes)
fills nine 4 KiB pages."""

# On a full disk, what is stored is evicted down to these shares of it, one step at a
# time until the write fits: at most half goes, as a store can need room for many chunks.
FULL_DISK_KEEP = (15 / 16, 7 / 8, 3 / 4, 1 / 2)


class Capacity:
    """The size cap and the disk's room of one store, and the eviction that keeps to both."""

    def __init__(self, env: CacheEnv, path: Path, size_cap: int):
        self.env = env
        self.dbs = env.dbs
        self.path = path
        self.size_cap = size_cap
        self._told_pins_crowd = False
        self._told_held = False

    def making_room(self, write: Callable[[], T], adding: int = 0) -> T:
        """``write()``; on a full disk, again after each step of ``FULL_DISK_KEEP``
        (raises ``DiskFull`` if the last does not make room enough).

        A disk that is just full costs the cache a sixteenth of what it stores,
        its oldest, not half of it: on a disk smaller than the cap, every store
        past the full point meets it again, and halving each time emptied the
        cache of everything but the layer being read. A write storing ``adding``
        bytes of chunks evicts at its first step at least the pages those take
        (within the last step's share), since the pages a commit frees are the
        only room left: a many-chunk commit otherwise failed step after step,
        writing its pages each time until the disk was full again.
        """
        try:
            return write()
        except DiskFull:
            stored = self._stored_bytes()
        targets = [int(stored * keep) for keep in FULL_DISK_KEEP]
        first = min(targets[0], stored - chunk_count(adding) * STORED_CHUNK)
        first = max(first, targets[-1])
        *steps, last = [first] + [target for target in targets[1:] if target < first]
        for target in steps:
            self._make_room(target)
            try:
                return write()
            except DiskFull:
                continue
        self._make_room(last)
        return write()

    def evict_target(self, txn: lmdb.Transaction, stored: int, cap: int, *, adding: int = 0) -> int:
        """What to evict down to: a little under the cap, unless pinned layers crowd it.

        Pinned chunks are not in the LRU index, so their bytes are about what is
        stored beyond its entries. Where they leave the unpinned layers less than
        ``WORKING_SET`` of the cap, the target keeps that much of them beyond the
        pins, over the cap (said once): evicting every unpinned chunk in the commit
        that stored it would make each read of them a fetch again.

        ``adding``: bytes counted in ``stored`` that are not stored yet (``room`` asks
        what storing them would evict): they are not in the index, nor pinned, and
        asking is no eviction, so nothing is said.
        """
        unpinned = txn.stat(self.dbs[DB_LRU])["entries"] * CHUNK_SIZE + adding
        pinned = max(0, stored - unpinned)
        floor = pinned + int(cap * WORKING_SET)
        target = int(cap * LOW_WATER)
        if floor <= target:
            return target
        if not self._told_pins_crowd and not adding:
            self._told_pins_crowd = True
            log.warning(
                "pinned layers hold about %s of the cache's %s cap: the others keep "
                "%s beyond them, over the cap (unpin some, or raise --cache-size)",
                human(pinned),
                human(cap),
                human(int(cap * WORKING_SET)),
            )
        return floor

    def current_cap(self, txn: lmdb.Transaction) -> int:
        """The cap the cache keeps now: another process (``cache gc --cache-size``) may
        have set a new one since this store opened."""
        self.size_cap = meta_int(txn, self.dbs[DB_META], b"size_cap", self.size_cap)
        return self.size_cap

    def add_stored(self, txn: lmdb.Transaction, delta: int) -> int:
        meta = self.dbs[DB_META]
        stored = max(0, meta_int(txn, meta, b"stored_bytes") + delta)
        txn.put(b"stored_bytes", U64.pack(stored), db=meta)
        return stored

    def evict(self, txn: lmdb.Transaction, stored: int, target: int) -> Evicted:
        done = evict(txn, self.dbs, stored, target, self.is_held)
        if done.chunks:
            self.add_stored(txn, -done.freed)
            counters_mod.persist(txn, self.dbs[DB_COUNTERS], {"evictions": done.chunks})
        if done.held and stored - done.freed > target and not self._told_held:
            self._told_held = True
            log.warning(
                "%d layers served from the cache alone (offline) are kept from eviction "
                "while they are served: the cache stays over its cap until they stop",
                len(done.held),
            )
        return done

    def is_held(self, digest: str) -> bool:
        """Whether a server (of any process) serves ``digest`` from the cache alone."""
        return holds.is_held(self.path, digest)

    def room(self, adding: int = 0) -> int:
        """Bytes the cache can still take, storing ``adding`` bytes of chunks, before the
        disk is full: the disk's free space, what the LMDB file holds beyond the chunks
        stored (pages eviction freed, reused before the file grows; each chunk takes
        ``STORED_CHUNK`` of it), and the pages of what storing them evicts under the cap,
        as it always does. An upper bound: the file's own tree pages count too, and
        layers held from eviction are not told."""
        with self.env.reader() as txn:
            stored = meta_int(txn, self.dbs[DB_META], b"stored_bytes")
            cap = meta_int(txn, self.dbs[DB_META], b"size_cap", self.size_cap)
            unpinned = txn.stat(self.dbs[DB_LRU])["entries"] * CHUNK_SIZE
            over = stored + adding - self.evict_target(txn, stored + adding, cap, adding=adding)
        evicted = min(unpinned, max(0, over)) // CHUNK_SIZE * STORED_CHUNK
        disk = os.statvfs(self.path)
        free = disk.f_bfree if os.geteuid() == 0 else disk.f_bavail  # root takes the reserve
        in_file = stored // CHUNK_SIZE * STORED_CHUNK
        return free * disk.f_frsize + max(0, self.env.file_size() - in_file) + evicted

    def _stored_bytes(self) -> int:
        with self.env.reader(DB_META) as txn:
            return meta_int(txn, self.dbs[DB_META], b"stored_bytes")

    def _make_room(self, target: int) -> None:
        """After a full disk: evict down to ``target`` stored bytes, and let LMDB reuse
        the pages freed.

        LMDB reuses pages freed by a transaction only after a later one has
        committed, hence the second, empty-ish commit.
        """

        def work(txn: lmdb.Transaction) -> Evicted:
            stored = meta_int(txn, self.dbs[DB_META], b"stored_bytes")
            return self.evict(txn, stored, min(stored, target))

        done = self.env.write(work)
        self.env.write(lambda txn: txn.put(b"reclaimed", b"", db=self.dbs[DB_META]))
        if done.freed:
            _full_disk.warning(
                "the disk holding the cache is full: evicted the oldest %.1f MiB",
                done.freed / 2**20,
            )
        else:
            _full_disk.warning(
                "the disk holding the cache is full, and nothing more can be evicted "
                "(what is left is pinned, or held by a server)"
            )
