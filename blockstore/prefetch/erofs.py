"""EROFS-aware start: where the metadata a mount reads first lies, from the superblock.

A mount reads the superblock (at 1024), then the root inode, then the
root directory's blocks. All three can be known from the first block, so
they are fetched in one request at open, before the kernel asks for them
one round trip at a time. Pure functions over bytes: no I/O here.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

SUPERBLOCK_OFFSET = 1024
MAGIC = 0xE0F5E1E2
HEAD = 4096
"""Bytes to read first: the superblock, and the root inode in the usual layouts."""
MAX_SPAN = 8 << 20
"""The start request never exceeds this, however the metadata is spread."""

_SB = struct.Struct("<IIIBBHQQIIII")  # magic .. meta_blkaddr, xattr_blkaddr
_FORMAT = struct.Struct("<HHH")  # i_format, i_xattr_icount, i_mode
_COMPACT_SIZE_U = struct.Struct("<I4xI")  # i_size, (i_mtime), i_u at offset 8
_EXTENDED_SIZE_U = struct.Struct("<QI")  # i_size, i_u at offset 8
FLAT_PLAIN, FLAT_INLINE = 0, 2
S_IFMT, S_IFDIR = 0o170000, 0o040000


@dataclass(frozen=True)
class Geometry:
    """Where inodes are, from the superblock."""

    block: int
    meta: int  # byte offset of nid 0
    root_nid: int

    def inode_offset(self, nid: int) -> int:
        return self.meta + nid * 32


def geometry(head: bytes) -> Geometry | None:
    """The image's geometry if ``head`` (its first block at least) starts an EROFS image."""
    if len(head) < SUPERBLOCK_OFFSET + _SB.size:
        return None
    fields = _SB.unpack_from(head, SUPERBLOCK_OFFSET)
    magic, blkszbits, root_nid, meta_blkaddr = fields[0], fields[3], fields[5], fields[10]
    if magic != MAGIC or not 9 <= blkszbits <= 16:
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
    if where is None or len(inode) < 32:
        return 0, min(size, HEAD)
    offset, block = where
    inode_end = offset + (64 if _FORMAT.unpack_from(inode)[0] & 1 else 32)
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
