"""Page a served blob's chunks in from the cache file ahead of its reader.

A hit reads its chunk straight from LMDB's memory map. When the page cache
does not hold those pages (after a reboot, or once memory pressure took
them), each page fault waits for the disk while the client waits for the
reply: a reader at depth one pays every disk read in turn. A server reading
an image file with ``pread`` does not, since the kernel reads a file read in
order ahead of it. The chunks of one blob are scattered over the cache file
in storing order, so that readahead cannot find them; a walk over the blob's
chunks can. Just after the first hit of an export, a thread looks up every
chunk of the blob in order: py-lmdb's lookup touches each page of the value
it finds, with the GIL released, and the kernel reads ``read_ahead_kb``
around each page fault. The reader's own faults then find the pages read.

Two limits keep it from costing what it does not save: all the blobs of a
process are walked within a share of the memory available, and a blob whose
chunks are in memory already (a sample of them is looked up first, and took
no read from the disk) is not walked at all: a warm sequential copy would
pay for the lookups (measured: 0.80x of nbdkit curl against 0.97x without).

Measured (``bench/README.md``): the mount stack with the page cache dropped
went from 0.90x to 0.96x of ``nbdkit file`` in one run of the harness.
"""

from __future__ import annotations

import logging
import resource
import threading
import time
from pathlib import Path

from blockstore.fetch import forks

from .errors import CacheError
from .layout import CHUNK_SIZE
from .store import ChunkStore

log = logging.getLogger(__name__)

START_AFTER = 0.1
"""Seconds from the first hit to the walk: a mount's first reads are its metadata,
one fault at a time, and the walk's reads queued before them at the disk made the
first listing later (measured: 0.08 to 0.15 s, against 0.08 to 0.10 s with this wait or none)."""
BATCH_CHUNKS = 64
"""Chunks taken from the budget at a time: 2 MiB."""
SAMPLE_CHUNKS = 16
"""Chunks, spread over the blob, looked up first: if that took no read from the disk
(no major page fault of this thread), the blob is taken to be in memory."""
MEMORY_SHARE = 4
"""All the blobs this process serves are walked within this fraction (1/N) of the
available memory: pages read in push others out, and past that a blob's later chunks
are left to the reader's own faults."""


def memory_available() -> int:
    """``MemAvailable`` of ``/proc/meminfo`` in bytes; 0 where it cannot be read."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def major_faults() -> int:
    """Page faults of this thread that had to wait for the disk, so far."""
    return resource.getrusage(resource.RUSAGE_THREAD).ru_majflt


class _Budget:
    """What the page-ins of this process hold: the bytes walked and not given back
    (their export closed), under ``MEMORY_SHARE`` of the memory available, and the
    blobs being walked, so that two exports of one blob walk it once."""

    def __init__(self) -> None:
        self.forget_threads()
        forks.register(self)

    def forget_threads(self) -> None:
        """In a forked child: no walk runs there (and a lock may have been held)."""
        self._lock = threading.Lock()
        self._taken = 0
        self._walking: set[tuple[Path, int]] = set()

    def claim(self, blob: tuple[Path, int]) -> bool:
        """Whether ``blob`` (cache, blob id) is this caller's to walk: no one walks it."""
        with self._lock:
            if blob in self._walking:
                return False
            self._walking.add(blob)
            return True

    def take(self, length: int) -> bool:
        with self._lock:
            if self._taken + length > memory_available() // MEMORY_SHARE:
                return False
            self._taken += length
            return True

    def give_back(self, length: int, blob: tuple[Path, int] | None) -> None:
        with self._lock:
            self._taken -= length
            self._walking.discard(blob)


_budget = _Budget()


class PageIn:
    """Pages in one blob's cached chunks once, on a thread of its own.

    ``start`` returns at once; ``stop`` ends the walk between two batches.
    Nothing here changes what is served: it only looks chunks up (every hit
    is still checked).
    """

    def __init__(self, store: ChunkStore, blob_id: int, chunks: int, description: str):
        self._store = store
        self._blob_id = blob_id
        self._key = (store.path, blob_id)
        self._chunks = chunks
        self._description = description
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._claimed = False
        """Whether this page-in is the one walking the blob (``_Budget.claim``)."""
        self.walked = 0
        """Bytes of the budget this page-in holds: its chunks looked up so far."""
        forks.register(self)

    def forget_threads(self) -> None:
        """In a forked child: the walk is the parent's; the child holds nothing."""
        self._lock = threading.Lock()
        self._stop.set()
        self._claimed = False
        self.walked = 0

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="page-in", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop between two batches, and give this blob's share of the budget back."""
        self._stop.set()
        with self._lock:
            _budget.give_back(self.walked, self._key if self._claimed else None)
            self.walked = 0
            self._claimed = False

    def join(self, timeout: float | None = None) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        if self._stop.wait(START_AFTER):
            return
        with self._lock:
            if self._stop.is_set() or not _budget.claim(self._key):
                return  # closed, or another export of the blob walks it
            self._claimed = True
        started = time.monotonic()
        try:
            if self._sample_in_memory():
                log.debug("%s is in memory already: not paged in", self._description)
                return
            for first in range(0, self._chunks, BATCH_CHUNKS):
                last = min(first + BATCH_CHUNKS, self._chunks) - 1
                length = (last - first + 1) * CHUNK_SIZE
                with self._lock:  # so that ``stop`` gives back all that was taken
                    if self._stop.is_set() or not _budget.take(length):
                        break
                    self.walked += length
                self._look_up(first, last)
        except CacheError as exc:  # the store closed under it, or could not be read
            log.debug("paging in %s stopped: %s", self._description, exc)
        log.debug(
            "paged in %.1f MiB of %s from the cache file in %.2f s",
            self.walked / (1 << 20),
            self._description,
            time.monotonic() - started,
        )

    def _sample_in_memory(self) -> bool:
        step = max(1, self._chunks // SAMPLE_CHUNKS)
        faults = major_faults()
        for index in range(step // 2, self._chunks, step):
            self._look_up(index, index)
            if major_faults() != faults:
                return False  # at the first read from the disk: the walk is due
        return True

    def _look_up(self, first: int, last: int) -> None:
        """Look chunks ``first..last`` up, each in a read transaction of its own: one
        holds the cache's gate (a map resize, a close, every hit behind them) for as
        long as its lookups wait for the disk."""
        store = self._store
        for index in range(first, last + 1):
            _, txn = store.read_chunks(self._blob_id, index, index)
            store.end_read(txn)
