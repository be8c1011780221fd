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
_COMPACT = struct.Struct("<HHHHIIIIHHI")  # 32-byte inode
FLAT_PLAIN, FLAT_INLINE = 0, 2


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
    if where is None or len(inode) < _COMPACT.size:
        return 0, min(size, HEAD)
    offset, block = where
    i_format = struct.unpack_from("<H", inode)[0]
    extended = i_format & 1
    layout = (i_format >> 1) & 7
    if extended:
        if len(inode) < 64:
            return 0, min(size, max(HEAD, offset + 64))
        i_size, raw_blkaddr = struct.unpack_from("<QI", inode, 8)
        inode_len = 64
    else:
        i_size, raw_blkaddr = struct.unpack_from("<I4xI", inode, 8)
        inode_len = 32
    end = offset + inode_len
    if layout in (FLAT_PLAIN, FLAT_INLINE):
        full_blocks = i_size // block if layout == FLAT_INLINE else -(-i_size // block)
        if full_blocks:
            end = max(end, raw_blkaddr * block + full_blocks * block)
        if layout == FLAT_INLINE:
            end = max(end, offset + inode_len + i_size % block)
    end = min(size, max(end, HEAD))
    if end > MAX_SPAN:
        end = min(size, max(HEAD, offset + inode_len))
    return 0, end
