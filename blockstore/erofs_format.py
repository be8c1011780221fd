"""Constants, record layouts and record parsers of the EROFS on-disk format.

Only the uncompressed subset: a superblock with a device table, compact
(32-byte) and extended (64-byte) inodes, flat and chunk-based data layouts,
inline xattrs and directory blocks. All integers are little-endian. The tar
layers' metadata writer and reader, the prefetch that walks an image before the
kernel does, and ``push``'s check of an image all take the format from here, so
that they cannot drift apart. The parsers take untrusted bytes: they return None
or raise ``ValueError``, never another exception.
"""

from __future__ import annotations

import stat
import struct
from typing import NamedTuple

BLOCK_SIZE = 512
"""The block size of the images the tar layers write (others may have up to 64 KiB)."""
BLOCK_BITS = 9
SUPER_OFFSET = 1024
SUPER_MAGIC = 0xE0F5E1E2

INODE_SLOT = 32
"""Inodes start on 32-byte slots, which nids count from the start of the metadata."""

COMPAT_MTIME = 0x00000002  # compact inodes carry mtime relative to the epoch
INCOMPAT_CHUNKED_FILE = 0x00000004
INCOMPAT_DEVICE_TABLE = 0x00000008

LAYOUT_FLAT_PLAIN = 0
LAYOUT_FLAT_INLINE = 2
LAYOUT_CHUNK_BASED = 4

CHUNK_FORMAT_BLKBITS_MASK = 0x001F
CHUNK_FORMAT_INDEXES = 0x0020
MAX_CHUNK_BITS = 31  # the blkbits field has five bits

# magic, checksum, feature_compat, blkszbits, sb_extslots, root_nid, inos,
# epoch, fixed_nsec, blocks, meta_blkaddr, xattr_blkaddr, uuid, volume_name,
# feature_incompat, compr/lz4 union, extra_devices, devt_slotoff, dirblkbits,
# xattr_prefix_count, xattr_prefix_start, packed_nid, then reserved to 128.
SUPER = struct.Struct("<IIIBBHQQIIII16s16sIHHHBBIQ24x")
DEVICE_SLOT = struct.Struct("<64sIIHH52x")
DEVICE_SLOT_SIZE = 128
# i_format, i_xattr_icount, i_mode, i_nlink, i_size, i_mtime, i_u, i_ino, i_uid, i_gid
INODE_COMPACT = struct.Struct("<HHHHIIIIHH4x")
# i_format, i_xattr_icount, i_mode, i_nb, i_size, i_u, i_ino, i_uid, i_gid,
# i_mtime, i_mtime_nsec, i_nlink
INODE_EXTENDED = struct.Struct("<HHHHQIIIIQII16x")
XATTR_IBODY_HEADER = struct.Struct("<IB7x")  # h_name_filter, h_shared_count
XATTR_ENTRY = struct.Struct("<BBH")  # e_name_len, e_name_index, e_value_size
CHUNK_INDEX = struct.Struct("<HHI")  # startblk_hi, device_id, startblk_lo
DIRENT = struct.Struct("<QHBx")  # nid, nameoff, file_type

# Xattr name prefixes the format stores as a one-byte index.
XATTR_PREFIXES: tuple[tuple[int, bytes], ...] = (
    (1, b"user."),
    (2, b"system.posix_acl_access"),
    (3, b"system.posix_acl_default"),
    (4, b"trusted."),
    (6, b"security."),
)


def split_xattr_name(name: bytes) -> tuple[int, bytes] | None:
    """(prefix index, rest of the name), or None for a namespace EROFS lacks."""
    for index, prefix in XATTR_PREFIXES:
        if name.startswith(prefix):
            return index, name[len(prefix) :]
    return None


def join_xattr_name(index: int, suffix: bytes) -> bytes:
    return dict(XATTR_PREFIXES)[index] + suffix


FT_REG_FILE, FT_DIR, FT_CHRDEV, FT_BLKDEV, FT_FIFO, FT_SOCK, FT_SYMLINK = 1, 2, 3, 4, 5, 6, 7
_FILE_TYPES = {
    stat.S_IFREG: FT_REG_FILE,
    stat.S_IFDIR: FT_DIR,
    stat.S_IFCHR: FT_CHRDEV,
    stat.S_IFBLK: FT_BLKDEV,
    stat.S_IFIFO: FT_FIFO,
    stat.S_IFSOCK: FT_SOCK,
    stat.S_IFLNK: FT_SYMLINK,
}


def file_type(mode: int) -> int:
    """The dirent file type code of an ``st_mode``."""
    return _FILE_TYPES[stat.S_IFMT(mode)]


def encode_dev(major: int, minor: int) -> int:
    """The kernel's new_encode_dev: what i_u holds for a device inode."""
    return (minor & 0xFF) | (major << 8) | ((minor & ~0xFF) << 12)


def decode_dev(rdev: int) -> tuple[int, int]:
    return (rdev & 0xFFF00) >> 8, (rdev & 0xFF) | ((rdev >> 12) & 0xFFF00)


def xattr_ibody_size(icount: int) -> int:
    """Bytes of inline xattrs that ``i_xattr_icount`` announces."""
    return 0 if icount == 0 else XATTR_IBODY_HEADER.size + 4 * (icount - 1)


def align(value: int, unit: int) -> int:
    return -(-value // unit) * unit


def inode_size(i_format: int) -> int:
    """Bytes of an inode's fixed part: the low bit of ``i_format`` marks an extended one."""
    return INODE_EXTENDED.size if i_format & 1 else INODE_COMPACT.size


class InodeRecord(NamedTuple):
    """The fixed part of an inode, compact or extended alike."""

    i_format: int
    xattr_count: int
    mode: int
    nlink: int
    size: int
    i_u: int
    uid: int
    gid: int
    mtime: int
    """Seconds after the superblock's epoch in a compact inode, after 1970 in an extended one."""
    mtime_nsec: int
    """0 in a compact inode, whose nanoseconds are the superblock's ``fixed_nsec``."""

    @property
    def extended(self) -> bool:
        return bool(self.i_format & 1)

    @property
    def layout(self) -> int:
        return (self.i_format >> 1) & 7

    @property
    def length(self) -> int:
        return inode_size(self.i_format)

    @property
    def xattr_end(self) -> int:
        """Bytes from the inode's start to the end of its inline xattrs."""
        return self.length + xattr_ibody_size(self.xattr_count)


def read_inode(data: bytes, pos: int) -> InodeRecord | None:
    """The inode at ``pos`` in ``data``; None if ``data`` ends before the inode does."""
    if pos + INODE_COMPACT.size > len(data):
        return None
    i_format = int.from_bytes(data[pos : pos + 2], "little")
    if pos + inode_size(i_format) > len(data):
        return None
    if i_format & 1:
        (_, icount, mode, _nb, size, i_u, _ino, uid, gid, mtime, nsec, nlink) = (
            INODE_EXTENDED.unpack_from(data, pos)
        )
        if mtime >= 1 << 63:  # stored as its 64-bit two's complement
            mtime -= 1 << 64
        return InodeRecord(i_format, icount, mode, nlink, size, i_u, uid, gid, mtime, nsec)
    (_, icount, mode, nlink, size, mtime, i_u, _ino, uid, gid) = INODE_COMPACT.unpack_from(
        data, pos
    )
    return InodeRecord(i_format, icount, mode, nlink, size, i_u, uid, gid, mtime, 0)


def flat_ranges(inode: InodeRecord, tail: int, block: int) -> list[tuple[int, int]]:
    """(offset, length) of a flat inode's data in the image, in order: whole blocks from
    block ``i_u`` on, then, in the inline layout, the last partial block at ``tail`` (the
    end of the inode's xattrs)."""
    start = inode.i_u * block
    if inode.layout != LAYOUT_FLAT_INLINE:
        return [(start, inode.size)] if inode.size else []
    full, rest = divmod(inode.size, block)
    ranges = [(start, full * block)] if full else []
    if rest:
        ranges.append((tail, rest))
    return ranges


def directory_block(block: bytes) -> list[tuple[bytes, int, int]]:
    """(name, nid, file type) of each entry of one directory block, in on-disk order.

    Raises ``ValueError`` when the block's name offsets do not describe names inside it.
    """
    if len(block) < DIRENT.size:
        raise ValueError("short directory block")
    first = DIRENT.unpack_from(block, 0)[1]
    if not (first % DIRENT.size == 0 and 0 < first < len(block)):
        raise ValueError(f"first name at {first} in a block of {len(block)}")
    count = first // DIRENT.size
    heads = [DIRENT.unpack_from(block, i * DIRENT.size) for i in range(count)]
    entries = []
    for i, (nid, start, kind) in enumerate(heads):
        end = heads[i + 1][1] if i + 1 < count else len(block)
        if not start < end <= len(block):
            raise ValueError("bad name offsets")
        name = block[start:end]
        if i + 1 == count:  # the last name runs to the block's end, padded with zeros
            name = name.split(b"\0", 1)[0]
        entries.append((name, nid, kind))
    return entries
