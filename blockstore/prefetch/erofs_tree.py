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

The parsing here is pure (bytes in, ranges and entries out); ``walk`` does
the reading through a callable, on a few threads.
"""

from __future__ import annotations

import heapq
import logging
import struct
import threading
from collections.abc import Callable

from .erofs import Geometry

log = logging.getLogger(__name__)

_FORMAT = struct.Struct("<HHH")  # i_format, i_xattr_icount, i_mode
_COMPACT_SIZE_U = struct.Struct("<I4xI")  # i_size, (i_mtime), i_u at offset 8
_EXTENDED_SIZE_U = struct.Struct("<QI")  # i_size, i_u at offset 8
_DIRENT = struct.Struct("<QHBx")  # nid, nameoff, file_type
FLAT_PLAIN, FLAT_INLINE = 0, 2
FT_DIR = 2
S_IFMT, S_IFDIR = 0o170000, 0o040000
INODE_READ = 64
"""Bytes read at an inode's place: an extended inode, or a compact one and the start of
what follows it (inline xattrs or data)."""
MAX_DIRECTORIES = 20_000
"""The walk stops after this many directories, however large the tree."""
WORKERS = 8


def directory_ranges(inode: bytes, offset: int, block: int) -> list[tuple[int, int]] | None:
    """The byte ranges holding a directory's entries, from its inode's first bytes.

    ``inode`` is read at ``offset``. None when the inode is not a directory
    or its layout is not a flat one (``mkfs.erofs`` writes directories flat).
    """
    if len(inode) < 32:
        return None
    i_format, xattr_count, mode = _FORMAT.unpack_from(inode)
    if mode & S_IFMT != S_IFDIR:
        return None
    extended = i_format & 1
    layout = (i_format >> 1) & 7
    if layout not in (FLAT_PLAIN, FLAT_INLINE):
        return None
    if extended:
        if len(inode) < 64:
            return None
        size, raw_blkaddr = _EXTENDED_SIZE_U.unpack_from(inode, 8)
        inode_size = 64
    else:
        size, raw_blkaddr = _COMPACT_SIZE_U.unpack_from(inode, 8)
        inode_size = 32
    xattrs = 12 + (xattr_count - 1) * 4 if xattr_count else 0
    if layout == FLAT_PLAIN:
        return [(raw_blkaddr * block, size)] if size else []
    full, tail = divmod(size, block)
    ranges = [(raw_blkaddr * block, full * block)] if full else []
    if tail:
        ranges.append((offset + inode_size + xattrs, tail))
    return ranges


def subdirectories(data: bytes, block: int) -> list[int]:
    """The nids of a directory's subdirectories, in on-disk order, from its entry blocks
    (``.`` and ``..`` left out). Malformed blocks end the list early, never raise."""
    out: list[int] = []
    for start in range(0, len(data), block):
        chunk = data[start : start + block]
        if len(chunk) < _DIRENT.size:
            break
        first_nameoff = _DIRENT.unpack_from(chunk)[1]
        count = first_nameoff // _DIRENT.size
        if not count or first_nameoff > len(chunk):
            break
        entries = [_DIRENT.unpack_from(chunk, i * _DIRENT.size) for i in range(count)]
        for i, (nid, nameoff, file_type) in enumerate(entries):
            if file_type != FT_DIR:
                continue
            end = entries[i + 1][1] if i + 1 < count else len(chunk)
            name = chunk[nameoff:end].rstrip(b"\0")
            if name not in (b".", b".."):
                out.append(nid)
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
