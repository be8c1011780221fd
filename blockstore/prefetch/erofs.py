"""EROFS-aware start: where the metadata a mount reads first lies, from the superblock.

A mount reads the superblock (at 1024), then the root inode, then the
root directory's blocks. All three can be known from the first block, so
they are fetched in one request at open, before the kernel asks for them
one round trip at a time. Pure functions over bytes: no I/O here.
"""

from __future__ import annotations

import stat
from dataclasses import dataclass

from blockstore import erofs_format as f

HEAD = 4096
"""Bytes to read first: the superblock, and the root inode in the usual layouts."""
MAX_SPAN = 8 << 20
"""The start request never exceeds this, however the metadata is spread."""


@dataclass(frozen=True)
class Geometry:
    """Where inodes are, from the superblock."""

    block: int
    meta: int  # byte offset of nid 0
    root_nid: int

    def inode_offset(self, nid: int) -> int:
        return self.meta + nid * f.INODE_SLOT


def geometry(head: bytes) -> Geometry | None:
    """The image's geometry if ``head`` (its first block at least) starts an EROFS image."""
    if len(head) < f.SUPER_OFFSET + f.SUPER.size:
        return None
    fields = f.SUPER.unpack_from(head, f.SUPER_OFFSET)
    magic, blkszbits, root_nid, meta_blkaddr = fields[0], fields[3], fields[5], fields[10]
    if magic != f.SUPER_MAGIC or not 9 <= blkszbits <= 16:
        return None
    block = 1 << blkszbits
    return Geometry(block, meta_blkaddr * block, root_nid)


def root_inode_offset(head: bytes) -> tuple[int, int] | None:
    """(offset of the root inode, block size) if ``head`` starts an EROFS image."""
    found = geometry(head)
    return None if found is None else (found.inode_offset(found.root_nid), found.block)


def start_span(head: bytes, inode: bytes, size: int) -> tuple[int, int]:
    """The one range to fetch at open: from 0 through the root directory's blocks.

    ``head`` is the image's first bytes, ``inode`` the 64 bytes at the root
    inode's offset (see ``root_inode_offset``). Falls back to the first
    block when the root directory lies too far away or is not flat.
    """
    where = root_inode_offset(head)
    if where is None or len(inode) < f.INODE_COMPACT.size:
        return 0, min(size, HEAD)
    offset, block = where
    inode_end = offset + f.inode_size(int.from_bytes(inode[:2], "little"))
    ranges = directory_ranges(inode, offset, block) or []
    end = max([inode_end] + [start + length for start, length in ranges])
    end = min(size, max(end, HEAD))
    if end > MAX_SPAN:
        end = min(size, max(HEAD, inode_end))
    return 0, end


def directory_ranges(inode: bytes, offset: int, block: int) -> list[tuple[int, int]] | None:
    """The byte ranges holding a directory's entries, from its inode's first bytes.

    ``inode`` is read at ``offset``. None when the inode is not a directory
    or its layout is not a flat one (``mkfs.erofs`` writes directories flat).
    """
    record = f.read_inode(inode, 0)
    if record is None or not stat.S_ISDIR(record.mode):
        return None
    if record.layout not in (f.LAYOUT_FLAT_PLAIN, f.LAYOUT_FLAT_INLINE):
        return None
    return f.flat_ranges(record, offset + record.xattr_end, block)
