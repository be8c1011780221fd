"""The directory tree of an EROFS image, walked ahead of a mount's first ``find``.

A listing descends one directory at a time: each level costs the kernel a
round trip for the directory's inode and its blocks, and ``mkfs.erofs``
spreads directories over the whole image, so no range read ahead of the
root covers them. The walk asks for the same inodes and blocks that a
listing asks for, and nothing else (no file's data), several directories
at once, in the order ``find`` visits them (depth first, each directory's
entries in their on-disk order, which EROFS keeps sorted by name). It
starts when the export opens, before the mount does, so the listing finds
its directories already fetched instead of waiting for each in turn.

The parsing here (and in ``erofs``) is pure: bytes in, ranges and entries out; ``walk`` does
the reading through a callable, on a few threads.
"""

from __future__ import annotations

import heapq
import logging
import threading
from collections.abc import Callable

from blockstore import erofs_format as f

from .erofs import Geometry, directory_ranges

log = logging.getLogger(__name__)

INODE_READ = 64
"""Bytes read at an inode's place: an extended inode, or a compact one and the start of
what follows it (inline xattrs or data)."""
MAX_DIRECTORIES = 20_000
"""The walk stops after this many directories, however large the tree."""
WORKERS = 8


def subdirectories(data: bytes, block: int) -> list[int]:
    """The nids of a directory's subdirectories, in on-disk order, from its entry blocks
    (``.`` and ``..`` left out). Malformed blocks end the list early, never raise."""
    out: list[int] = []
    for start in range(0, len(data), block):
        try:
            entries = f.directory_block(data[start : start + block])
        except ValueError:
            break
        out += [
            nid
            for name, nid, file_type in entries
            if file_type == f.FT_DIR and name not in (b".", b"..")
        ]
    return out


def walk(
    geometry: Geometry,
    read: Callable[[int, int], bytes],
    stop: threading.Event,
    *,
    workers: int = WORKERS,
    limit: int = MAX_DIRECTORIES,
) -> int:
    """Read every directory's inode and entries, depth first, ``workers`` at a time.

    ``read(offset, length)`` returns the bytes (fetching them); an error in
    one directory skips it. Returns the number of directories read.
    """
    tree = _Walk(geometry, read, stop, limit)
    threads = [
        threading.Thread(target=tree.work, name="erofs-walk", daemon=True) for _ in range(workers)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return tree.done


class _Walk:
    """The walk's shared state: directories to visit, keyed by their place in ``find``'s
    order (the path of entry positions from the root), the smallest first."""

    def __init__(
        self,
        geometry: Geometry,
        read: Callable[[int, int], bytes],
        stop: threading.Event,
        limit: int,
    ):
        self._geometry = geometry
        self._read = read
        self._stop = stop
        self._limit = limit
        self._lock = threading.Condition()
        self._queue: list[tuple[tuple[int, ...], int]] = [((), geometry.root_nid)]
        self._seen = {geometry.root_nid}
        self._busy = 0
        self.done = 0

    def _visit(self, nid: int) -> list[int]:
        offset = self._geometry.inode_offset(nid)
        block = self._geometry.block
        ranges = directory_ranges(self._read(offset, INODE_READ), offset, block)
        if not ranges:
            return []
        return subdirectories(b"".join(self._read(*r) for r in ranges), block)

    def _ready(self) -> bool:
        return bool(self._queue) or not self._busy or self._stop.is_set()

    def work(self) -> None:
        while True:
            with self._lock:
                self._lock.wait_for(self._ready)
                if not self._queue or self._stop.is_set() or self.done >= self._limit:
                    self._lock.notify_all()
                    return
                key, nid = heapq.heappop(self._queue)
                self._busy += 1
            try:
                children = self._visit(nid)
            except Exception as exc:  # best effort: the listing reads it itself
                log.debug("directory walk: nid %d skipped: %s", nid, exc)
                children = []
            with self._lock:
                self._busy -= 1
                self.done += 1
                for i, child in enumerate(children):
                    if child not in self._seen:
                        self._seen.add(child)
                        heapq.heappush(self._queue, ((*key, i), child))
                self._lock.notify_all()
