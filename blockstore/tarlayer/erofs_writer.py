"""Write the EROFS metadata image of a tar layer: files point into the tar.

The image has 512-byte blocks, the alignment of tar data, so a regular file is
a chunk-based inode whose chunk indexes name device 1 at block
``data_offset / 512`` of the tar. Device 1 is the uncompressed tar itself; its
slot in the device table says it starts right after the metadata
(``uniaddr``), so ``metadata || tar`` is one device the kernel mounts with no
``device=`` option ("flat device" mode).

The output depends only on the tree and the tar size: inodes are laid out
depth-first in name order, no clock, no uuid, so two builds of one layer give
the same bytes (and the same digest, for sharing an index).

Layout: blocks 0-1 unused; the superblock at 1024 and the device slot after
it; inodes from there on, 32-byte aligned (a symlink's inline target never
crosses a block); then directory blocks and long symlink targets.
"""

from __future__ import annotations

import stat
from dataclasses import dataclass

from blockstore import erofs_format as f
from blockstore.tarlayer.tree import Inode, LayerTree, TarLayerError

DEVT_SLOT_OFFSET = f.align(f.SUPER_OFFSET + f.SUPER.size, f.DEVICE_SLOT_SIZE)
FIRST_INODE_OFFSET = DEVT_SLOT_OFFSET + f.DEVICE_SLOT_SIZE
MAX_TAR_BLOCKS = 1 << 32  # chunk indexes and the superblock hold 32-bit block numbers


@dataclass(eq=False)
class _Placed:
    """Where one inode goes and what follows its fixed-size part."""

    inode: Inode
    ino: int
    nlink: int
    extended: bool = False
    layout: int = f.LAYOUT_FLAT_PLAIN
    xattrs: bytes = b""
    offset: int = 0  # byte offset of the inode in the image
    data_blocks: int = 0  # blocks in the data area (directories, long symlinks)
    data_block: int = 0  # first of them
    size: int = 0  # i_size: a directory's is known only once its blocks are laid out
    parent: Inode | None = None
    path: bytes = b"/"  # the first path naming it, for messages

    @property
    def isize(self) -> int:
        return f.INODE_EXTENDED.size if self.extended else f.INODE_COMPACT.size


def _encode_xattrs(node: Inode, where: str) -> bytes:
    """Inline xattrs: the ibody header, then entries sorted by name."""
    if not node.xattrs:
        return b""
    out = [f.XATTR_IBODY_HEADER.pack(0, 0)]
    for name, value in sorted(node.xattrs.items()):
        split = f.split_xattr_name(name)
        if split is None:
            raise TarLayerError(
                f"{where}: xattr {name.decode('utf-8', 'backslashreplace')!r}"
                " has a namespace EROFS cannot store"
            )
        index, suffix = split
        if len(suffix) > 255 or len(value) > 0xFFFF:
            raise TarLayerError(f"{where}: xattr {name!r} is too long for EROFS")
        entry = f.XATTR_ENTRY.pack(len(suffix), index, len(value)) + suffix + value
        out.append(entry + b"\0" * (f.align(len(entry), 4) - len(entry)))
    return b"".join(out)


def _dir_blocks(entries: list[tuple[bytes, int, int]]) -> list[bytes]:
    """Pack sorted (name, nid, file_type) dirents into 512-byte directory blocks."""
    blocks: list[bytes] = []
    i = 0
    while i < len(entries):
        j, used = i, 0
        while j < len(entries) and used + f.DIRENT.size + len(entries[j][0]) <= f.BLOCK_SIZE:
            used += f.DIRENT.size + len(entries[j][0])
            j += 1
        if j == i:  # a name no block can hold: the tree's checks let none through
            raise TarLayerError(f"entry name of {len(entries[i][0])} bytes: too long for EROFS")
        batch = entries[i:j]
        nameoff = f.DIRENT.size * len(batch)
        heads, names = [], []
        for name, nid, ftype in batch:
            heads.append(f.DIRENT.pack(nid, nameoff, ftype))
            names.append(name)
            nameoff += len(name)
        blocks.append(b"".join(heads) + b"".join(names))
        i = j
    return blocks


def _dir_size(names: list[bytes]) -> tuple[int, int]:
    """(blocks, i_size) of a directory with these entry names, without the nids."""
    blocks = _dir_blocks([(n, 0, 0) for n in names])
    return len(blocks), (len(blocks) - 1) * f.BLOCK_SIZE + len(blocks[-1])


def write_metadata(tree: LayerTree, tar_size: int) -> bytes:
    """The metadata image for ``tree``, whose files live in a tar of ``tar_size`` bytes."""
    tar_blocks = f.align(tar_size, f.BLOCK_SIZE) // f.BLOCK_SIZE
    placed = _collect(tree)
    epoch = min((p.inode.mtime for p in placed), default=0)
    epoch = max(epoch, 0)
    for p in placed:
        _plan(p, epoch)
    inodes_end = _place(placed)
    by_inode = {id(p.inode): p for p in placed}
    meta_end = _place_data(placed, inodes_end)
    meta_blocks = f.align(meta_end, f.BLOCK_SIZE) // f.BLOCK_SIZE
    if meta_blocks + tar_blocks >= MAX_TAR_BLOCKS:  # the superblock counts both
        raise TarLayerError(
            "the tar and its metadata are 2 TiB or larger: too large for 32-bit block numbers"
        )
    image = bytearray(meta_blocks * f.BLOCK_SIZE)
    root_nid = placed[0].offset // f.INODE_SLOT
    if root_nid > 0xFFFF:
        raise TarLayerError("the root inode does not fit a 16-bit nid")
    f.SUPER.pack_into(
        image,
        f.SUPER_OFFSET,
        f.SUPER_MAGIC,
        0,
        f.COMPAT_MTIME,
        f.BLOCK_BITS,
        0,
        root_nid,
        len(placed),
        epoch,
        0,
        meta_blocks + tar_blocks,
        0,
        0,
        b"\0" * 16,
        b"\0" * 16,
        f.INCOMPAT_CHUNKED_FILE | f.INCOMPAT_DEVICE_TABLE,
        0,
        1,
        DEVT_SLOT_OFFSET // f.DEVICE_SLOT_SIZE,
        0,
        0,
        0,
        0,
    )
    f.DEVICE_SLOT.pack_into(image, DEVT_SLOT_OFFSET, b"", tar_blocks, meta_blocks, 0, 0)
    for p in placed:
        _write_inode(image, p, epoch, by_inode)
    return bytes(image)


def _collect(tree: LayerTree) -> list[_Placed]:
    """Every inode once, depth-first in name order, root first; nlink counted."""
    order: list[_Placed] = []
    seen: dict[int, _Placed] = {}
    stack: list[tuple[Inode, Inode, bytes]] = [(tree.root, tree.root, b"/")]
    while stack:
        node, parent, path = stack.pop()
        known = seen.get(id(node))
        if known is not None:  # a hard link: one more name for an inode placed already
            known.nlink += 1
            continue
        p = _Placed(node, ino=len(order) + 1, nlink=1, parent=parent, path=path)
        seen[id(node)] = p
        order.append(p)
        if node.children is not None:
            p.nlink = 2 + sum(1 for c in node.children.values() if c.is_dir)
            for name in sorted(node.children, reverse=True):
                stack.append((node.children[name], node, path.rstrip(b"/") + b"/" + name))
    return order


def _plan(p: _Placed, epoch: int) -> None:
    node = p.inode
    where = f"tar entry {p.path.decode('utf-8', 'backslashreplace')!r}"
    p.xattrs = _encode_xattrs(node, where)
    if len(p.xattrs) > f.XATTR_IBODY_HEADER.size + 4 * 0xFFFE:
        raise TarLayerError(f"{where}: more xattrs than an EROFS inode can hold")
    p.size = node.size
    if node.children is not None:
        p.data_blocks, p.size = _dir_size(sorted([b".", b"..", *node.children]))
    delta = node.mtime - epoch
    p.extended = (
        p.size > 0xFFFFFFFF
        or node.uid > 0xFFFF
        or node.gid > 0xFFFF
        or p.nlink > 0xFFFF
        or not 0 <= delta <= 0xFFFFFFFF
        or node.mtime_ns != 0
    )
    if stat.S_ISREG(node.mode) and node.size > 0:
        if node.data_offset % f.BLOCK_SIZE:
            raise TarLayerError(f"{where}: file data not 512-byte aligned in the tar")
        p.layout = f.LAYOUT_CHUNK_BASED
    elif stat.S_ISLNK(node.mode):
        fixed = p.isize + len(p.xattrs) + len(node.target)
        if fixed <= f.BLOCK_SIZE:
            p.layout = f.LAYOUT_FLAT_INLINE
        else:
            p.data_blocks = f.align(len(node.target), f.BLOCK_SIZE) // f.BLOCK_SIZE


def _chunking(size: int) -> tuple[int, int]:
    """(chunk bits above the block size, chunk count) for one file."""
    bits = max(0, (size - 1).bit_length() - f.BLOCK_BITS)
    bits = min(bits, f.MAX_CHUNK_BITS)
    chunk = 1 << (bits + f.BLOCK_BITS)
    return bits, -(-size // chunk)


def _tail_size(p: _Placed) -> int:
    """Bytes after the xattrs: chunk indexes (8-aligned) or an inline target."""
    if p.layout == f.LAYOUT_CHUNK_BASED:
        return f.CHUNK_INDEX.size * _chunking(p.inode.size)[1]
    if p.layout == f.LAYOUT_FLAT_INLINE:
        return len(p.inode.target)
    return 0


def _place(placed: list[_Placed]) -> int:
    """Give each inode its offset; return where the inode area ends."""
    pos = FIRST_INODE_OFFSET
    for p in placed:
        head = p.isize + len(p.xattrs)
        if p.layout == f.LAYOUT_FLAT_INLINE and pos % f.BLOCK_SIZE + head + _tail_size(p) > (
            f.BLOCK_SIZE
        ):
            pos = f.align(pos, f.BLOCK_SIZE)  # inline data must stay in the inode's block
        p.offset = pos
        end = pos + head
        if p.layout == f.LAYOUT_CHUNK_BASED:
            end = f.align(end, f.CHUNK_INDEX.size)
        pos = f.align(end + _tail_size(p), f.INODE_SLOT)
    return pos


def _place_data(placed: list[_Placed], start: int) -> int:
    """Give directories and long symlinks their blocks; return the image's end."""
    block = f.align(start, f.BLOCK_SIZE) // f.BLOCK_SIZE
    for p in placed:
        if p.data_blocks:
            p.data_block = block
            block += p.data_blocks
    return block * f.BLOCK_SIZE


def _write_inode(image: bytearray, p: _Placed, epoch: int, by_inode: dict[int, _Placed]) -> None:
    node = p.inode
    icount = 0 if not p.xattrs else (len(p.xattrs) - f.XATTR_IBODY_HEADER.size) // 4 + 1
    i_u = 0
    bits, count = _chunking(node.size) if p.layout == f.LAYOUT_CHUNK_BASED else (0, 0)
    if p.layout == f.LAYOUT_CHUNK_BASED:
        i_u = f.CHUNK_FORMAT_INDEXES | bits
    elif stat.S_ISCHR(node.mode) or stat.S_ISBLK(node.mode):
        i_u = f.encode_dev(node.rdev_major, node.rdev_minor)
    elif p.data_blocks:
        i_u = p.data_block
    i_format = int(p.extended) | (p.layout << 1)
    mode = node.mode & 0xFFFF
    if p.extended:
        f.INODE_EXTENDED.pack_into(
            image,
            p.offset,
            i_format,
            icount,
            mode,
            0,
            p.size,
            i_u,
            p.ino,
            node.uid,
            node.gid,
            node.mtime & 0xFFFFFFFFFFFFFFFF,
            node.mtime_ns,
            p.nlink,
        )
    else:
        f.INODE_COMPACT.pack_into(
            image,
            p.offset,
            i_format,
            icount,
            mode,
            p.nlink,
            p.size,
            node.mtime - epoch,
            i_u,
            p.ino,
            node.uid,
            node.gid,
        )
    pos = p.offset + p.isize
    image[pos : pos + len(p.xattrs)] = p.xattrs
    pos += len(p.xattrs)
    if p.layout == f.LAYOUT_CHUNK_BASED:
        pos = f.align(pos, f.CHUNK_INDEX.size)
        first = node.data_offset // f.BLOCK_SIZE
        per_chunk = 1 << bits
        for i in range(count):
            f.CHUNK_INDEX.pack_into(image, pos + 8 * i, 0, 1, first + i * per_chunk)
    elif p.layout == f.LAYOUT_FLAT_INLINE:
        image[pos : pos + len(node.target)] = node.target
    elif stat.S_ISLNK(node.mode):
        start = p.data_block * f.BLOCK_SIZE
        image[start : start + len(node.target)] = node.target
    elif node.children is not None:
        assert p.parent is not None
        entries = [
            (b".", p.offset // f.INODE_SLOT, f.FT_DIR),
            (b"..", by_inode[id(p.parent)].offset // f.INODE_SLOT, f.FT_DIR),
        ]
        for name, child in node.children.items():
            nid = by_inode[id(child)].offset // f.INODE_SLOT
            entries.append((name, nid, f.file_type(child.mode)))
        entries.sort()
        start = p.data_block * f.BLOCK_SIZE
        for i, block in enumerate(_dir_blocks(entries)):
            image[start + i * f.BLOCK_SIZE : start + i * f.BLOCK_SIZE + len(block)] = block
