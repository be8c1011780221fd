"""Page a served blob's chunks in from the cache file ahead of its reader.

A hit reads its chunk straight from LMDB's memory map. When the page cache
does not hold those pages (after a reboot, or once memory pressure took
them), each page fault waits for the disk while the client waits for the
reply: a reader at depth one pays every disk read in turn. A server reading
an image file with ``pread`` does not, since the kernel reads a file read in
order ahead of it. The chunks of one blob are scattered over the cache file
in storing order, so that readahead cannot find them; this module can, from
the chunks' own addresses in the map: on the first hit of an export it asks
the kernel (``madvise(MADV_WILLNEED)``, which reads asynchronously) for every
cached chunk of the blob in order, within a budget of memory shared by every
blob the process serves. The kernel's
block queue paces the requests; the reader's own faults then find the pages
read or in flight.

Measured (``bench/README.md``): the mount stack with the page cache dropped
went from 0.91x to 0.98x of ``nbdkit file`` in one interleaved run.
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import threading
import time
from pathlib import Path

from .errors import CacheError
from .layout import CHUNK_SIZE
from .store import ChunkStore

log = logging.getLogger(__name__)

BATCH_CHUNKS = 64
"""Chunks looked up (in one read transaction) and advised at a time: 2 MiB."""
MEMORY_SHARE = 4
"""All the blobs this process serves are paged in within this fraction (1/N) of the
available memory: pages the kernel reads in push others out, and past that a blob's
later chunks are left to the reader's own faults."""

_PAGE = mmap.PAGESIZE


class _PyBuffer(ctypes.Structure):
    """CPython's ``Py_buffer``: the address of a read-only view is not exposed in
    Python (``ctypes.c_char.from_buffer`` wants a writable one)."""

    _fields_ = (
        ("buf", ctypes.c_void_p),
        ("obj", ctypes.c_void_p),
        ("len", ctypes.c_ssize_t),
        ("itemsize", ctypes.c_ssize_t),
        ("readonly", ctypes.c_int),
        ("ndim", ctypes.c_int),
        ("format", ctypes.c_char_p),
        ("shape", ctypes.c_void_p),
        ("strides", ctypes.c_void_p),
        ("suboffsets", ctypes.c_void_p),
        ("internal", ctypes.c_void_p),
    )


_get_buffer = ctypes.pythonapi.PyObject_GetBuffer
_get_buffer.argtypes = (ctypes.py_object, ctypes.POINTER(_PyBuffer), ctypes.c_int)
_get_buffer.restype = ctypes.c_int
_release_buffer = ctypes.pythonapi.PyBuffer_Release
_release_buffer.argtypes = (ctypes.POINTER(_PyBuffer),)
_release_buffer.restype = None
_madvise = ctypes.CDLL(None, use_errno=True).madvise
_madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
_madvise.restype = ctypes.c_int


def address_of(view: memoryview) -> int:
    """Where ``view``'s bytes are in this process's memory."""
    buffer = _PyBuffer()
    _get_buffer(view, ctypes.byref(buffer), 0)  # raises if the view was released
    try:
        return buffer.buf or 0
    finally:
        _release_buffer(ctypes.byref(buffer))


def page_runs(views: list[memoryview | None]) -> list[tuple[int, int]]:
    """The page-aligned ``(start, length)`` ranges of memory holding ``views``, those
    that follow each other in the map merged (storing order is mostly blob order)."""
    runs: list[list[int]] = []
    for view in views:
        if view is None:
            continue
        at = address_of(view)
        start = at - at % _PAGE
        end = at + len(view)
        if runs and runs[-1][0] <= start <= runs[-1][1] + _PAGE:
            runs[-1][1] = max(runs[-1][1], end)
        else:
            runs.append([start, end])
    return [(start, end - start) for start, end in runs]


def memory_available() -> int:
    """``MemAvailable`` of ``/proc/meminfo`` in bytes; 0 where it cannot be read."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


class _Budget:
    """The bytes the page-ins of this process have asked for and not given back (their
    blob closed): held under ``MEMORY_SHARE`` of the memory available."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._taken = 0

    def take(self, length: int) -> bool:
        with self._lock:
            if self._taken + length > memory_available() // MEMORY_SHARE:
                return False
            self._taken += length
            return True

    def give_back(self, length: int) -> None:
        with self._lock:
            self._taken -= length


_budget = _Budget()


class PageIn:
    """Pages in one blob's cached chunks once, on a thread of its own.

    ``start`` returns at once; ``stop`` ends the walk between two batches.
    Nothing here changes what is served: a chunk advised and then evicted, or
    a page advised that LMDB reused meanwhile, costs a wasted read, never a
    wrong byte (every hit is still checked).
    """

    def __init__(self, store: ChunkStore, blob_id: int, chunks: int, description: str):
        self._store = store
        self._blob_id = blob_id
        self._chunks = chunks
        self._description = description
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self.advised = 0
        """Bytes of the budget this page-in holds: its chunks advised so far."""

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="page-in", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop between two batches, and give this blob's share of the budget back."""
        self._stop.set()
        with self._lock:
            _budget.give_back(self.advised)
            self.advised = 0

    def join(self, timeout: float | None = None) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        started = time.monotonic()
        try:
            for first in range(0, self._chunks, BATCH_CHUNKS):
                last = min(first + BATCH_CHUNKS, self._chunks) - 1
                length = (last - first + 1) * CHUNK_SIZE
                with self._lock:  # so that ``stop`` gives back all that was taken
                    if self._stop.is_set() or not _budget.take(length):
                        break
                    self.advised += length
                self._advise(first, last)
        except CacheError as exc:  # the store closed under it, or could not be read
            log.debug("paging in %s stopped: %s", self._description, exc)
        log.debug(
            "paged in %.1f MiB of %s from the cache file in %.2f s",
            self.advised / (1 << 20),
            self._description,
            time.monotonic() - started,
        )

    def _advise(self, first: int, last: int) -> None:
        """Ask the kernel for chunks ``first..last``. Not paced: the block queue takes
        the requests as fast as the disk does, and holding batches back until the ones
        before are read in (measured) slowed the mount stack without making its first
        listing any sooner."""
        store = self._store
        views, txn = store.read_chunks(self._blob_id, first, last)
        try:
            for start, length in page_runs(views):
                _madvise(start, length, mmap.MADV_WILLNEED)
        finally:
            store.end_read(txn)
