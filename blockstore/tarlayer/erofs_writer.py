"""Write the EROFS metadata image of a tar layer: files point into the tar.

The image has 512-byte blocks, the alignment of tar data, so a regular file is
a chunk-based inode whose chunk indexes name device 1 at block
``data_offset / 512`` of the tar. Device 1 is the uncompressed tar itself; its
slot in the device table says where it starts (``uniaddr``): ``GAP`` bytes of
zeros after the metadata, so ``metadata || zeros || tar`` is one device the
kernel mounts with no ``device=`` option ("flat device" mode).

The output depends only on the tree and the tar size: inodes are laid out
depth-first in name order, no clock, no uuid, so two builds of one layer give
the same bytes (and the same digest, for sharing an index).

Layout: blocks 0-1 unused; the superblock at 1024 and the device slot after
it; inodes from there on, 32-byte aligned (a symlink's inline target never
crosses a block); then directory blocks and long symlink targets; zeros to the
end of a ``PAGE``.
"""

from __future__ import annotations

import io
import stat
from collections.abc import Iterator
from dataclasses import dataclass

from blockstore import erofs_format as f
from blockstore.tarlayer.tree import Inode, LayerTree, TarLayerError, show_path

PAGE = 4096
"""The image ends on a page's end: the kernel reads a file-backed image a page at a
time, and a page holding both the last inodes and the tar's first bytes could not be
read while those bytes were not cached or were damaged (offline, the whole tree)."""
GAP = 1 << 20
"""Zeros between the image and the tar, stored nowhere (the export serves them). The
kernel reads a file-backed image (the FUSE file of nbdfuse) ahead of the pages it asks
for, up to two windows of 128 KiB past the last directory block a listing reads: with
the tar right after the image, that readahead took in the tar's first bytes, which for
a gzip or zstd layer fetched and inflated a whole span for a listing."""
DEVT_SLOT_OFFSET = f.align(f.SUPER_OFFSET + f.SUPER.size, f.DEVICE_SLOT_SIZE)
FIRST_INODE_OFFSET = DEVT_SLOT_OFFSET + f.DEVICE_SLOT_SIZE
MAX_TAR_BLOCKS = 1 << 32  # chunk indexes and the superblock hold 32-bit block numbers


@dataclass(frozen=True, slots=True)
class _Shape:
    """How one inode is laid out, and what follows its fixed-size part. Worked out
    when the inode is placed and again when it is written, never kept for every
    inode of a layer in between."""

    extended: bool
    layout: int
    xattrs: bytes
    size: int  # i_size
    data_blocks: int  # blocks in the data area (directories, long symlinks)

    @property
    def isize(self) -> int:
        return f.INODE_EXTENDED.size if self.extended else f.INODE_COMPACT.size


def _names(root: Inode) -> Iterator[tuple[Inode, Inode, bytes, bytes]]:
    """Every name of the tree as (inode, its directory, the directory's path, name),
    depth-first in name order, the root first (its own directory, named ``/``). An
    inode with more names (a hard link) comes once for each."""
    stack: list[tuple[Inode, Inode, bytes, bytes]] = [(root, root, b"", b"/")]
    while stack:
        node, parent, directory, name = stack.pop()
        yield node, parent, directory, name
        if node.children is not None:
            path = directory + name if node is root else directory + name + b"/"
            for child_name in sorted(node.children, reverse=True):
                stack.append((node.children[child_name], node, path, child_name))


def _where(tree: LayerTree, node: Inode) -> str:
    """The first path naming ``node``, for messages: found again by a walk rather than
    kept for every inode."""
    path = next(directory + name for at, _, directory, name in _names(tree.root) if at is node)
    return f"tar entry {show_path(path)}"


def _encode_xattrs(tree: LayerTree, node: Inode) -> bytes:
    """Inline xattrs: the ibody header, then entries sorted by name."""
    if not node.xattrs:
        return b""
    out = [f.XATTR_IBODY_HEADER.pack(0, 0)]
    for name, value in sorted(node.xattrs.items()):
        split = f.split_xattr_name(name)
        if split is None:
            raise TarLayerError(
                f"{_where(tree, node)}: xattr {name.decode('utf-8', 'backslashreplace')!r}"
                " has a namespace EROFS cannot store"
            )
        index, suffix = split
        if len(suffix) > 255 or len(value) > 0xFFFF:
            raise TarLayerError(f"{_where(tree, node)}: xattr {name!r} is too long for EROFS")
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
    layout = _Layout(tree)
    meta_blocks = f.align(layout.end, PAGE) // f.BLOCK_SIZE
    tar_start = meta_blocks + GAP // f.BLOCK_SIZE  # in blocks
    if tar_start + tar_blocks >= MAX_TAR_BLOCKS:  # the superblock counts all
        raise TarLayerError(
            "the tar and its metadata are 2 TiB or larger: too large for 32-bit block numbers"
        )
    # Written in place into the bytes object ``getvalue`` returns (a ``BytesIO`` that
    # alone holds its bytes shares them): a ``bytearray`` would be copied out whole
    # at the end, one more image's size held beside the tree.
    buffer = io.BytesIO(bytes(meta_blocks * f.BLOCK_SIZE))
    image = buffer.getbuffer()
    root_nid = layout.nids[tree.root]
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
        len(layout.order),
        layout.epoch,
        0,
        tar_start + tar_blocks,
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
    f.DEVICE_SLOT.pack_into(image, DEVT_SLOT_OFFSET, b"", tar_blocks, tar_start, 0, 0)
    for ino, node in enumerate(layout.order, 1):
        layout.write(image, node, ino)
    image.release()
    return buffer.getvalue()


class _Layout:
    """Where each inode of a tree goes: inodes depth-first in name order, root first,
    from ``FIRST_INODE_OFFSET``; then the data blocks of directories and long symlinks,
    in the same order. Kept for each inode: its nid; for a directory, its parent; for
    an inode with a data block, which; for one with more names, how many. A layer has
    millions of inodes: nothing else is held for each."""

    def __init__(self, tree: LayerTree):
        self.tree = tree
        self.order: list[Inode] = []
        self.nids: dict[Inode, int] = {}
        self.links: dict[Inode, int] = {}  # names of the inodes with more than one
        self.parents: dict[Inode, Inode] = {}  # of directories
        self._collect()
        self.epoch = max(min((node.mtime for node in self.order), default=0), 0)
        self.data: dict[Inode, int] = {}  # first data block, of those that have one
        self.end = self._place_data(*self._place())

    def _collect(self) -> None:
        for node, parent, _, _ in _names(self.tree.root):
            if node in self.nids:  # a hard link: one more name for an inode placed already
                self.links[node] = self.links.get(node, 1) + 1
                continue
            self.nids[node] = 0
            self.order.append(node)
            if node.children is not None:
                self.parents[node] = parent

    def nlink(self, node: Inode) -> int:
        if node.children is not None:
            return 2 + sum(1 for c in node.children.values() if c.is_dir)
        return self.links.get(node, 1)

    def shape(self, node: Inode) -> _Shape:
        xattrs = _encode_xattrs(self.tree, node)
        if len(xattrs) > f.XATTR_IBODY_HEADER.size + 4 * 0xFFFE:
            raise TarLayerError(
                f"{_where(self.tree, node)}: more xattrs than an EROFS inode can hold"
            )
        size, data_blocks, layout = node.size, 0, f.LAYOUT_FLAT_PLAIN
        if node.children is not None:
            data_blocks, size = _dir_size(sorted([b".", b"..", *node.children]))
        delta = node.mtime - self.epoch
        extended = (
            size > 0xFFFFFFFF
            or node.uid > 0xFFFF
            or node.gid > 0xFFFF
            or self.nlink(node) > 0xFFFF
            or not 0 <= delta <= 0xFFFFFFFF
            or node.mtime_ns != 0
        )
        if stat.S_ISREG(node.mode) and node.size > 0:
            if node.data_offset % f.BLOCK_SIZE:
                raise TarLayerError(
                    f"{_where(self.tree, node)}: file data not 512-byte aligned in the tar"
                )
            layout = f.LAYOUT_CHUNK_BASED
        elif stat.S_ISLNK(node.mode):
            isize = f.INODE_EXTENDED.size if extended else f.INODE_COMPACT.size
            if isize + len(xattrs) + len(node.target) <= f.BLOCK_SIZE:
                layout = f.LAYOUT_FLAT_INLINE
            else:
                data_blocks = f.align(len(node.target), f.BLOCK_SIZE) // f.BLOCK_SIZE
        return _Shape(extended, layout, xattrs, size, data_blocks)

    def _place(self) -> tuple[int, int]:
        """Give each inode its nid, and those with data blocks their place among them
        (from 0); return where the inode area ends and how many data blocks follow."""
        pos, block = FIRST_INODE_OFFSET, 0
        for node in self.order:
            shape = self.shape(node)
            head = shape.isize + len(shape.xattrs)
            tail = _tail_size(node, shape)
            if shape.layout == f.LAYOUT_FLAT_INLINE and pos % f.BLOCK_SIZE + head + tail > (
                f.BLOCK_SIZE
            ):
                pos = f.align(pos, f.BLOCK_SIZE)  # inline data must stay in the inode's block
            self.nids[node] = pos // f.INODE_SLOT
            end = pos + head
            if shape.layout == f.LAYOUT_CHUNK_BASED:
                end = f.align(end, f.CHUNK_INDEX.size)
            pos = f.align(end + tail, f.INODE_SLOT)
            if shape.data_blocks:
                self.data[node] = block
                block += shape.data_blocks
        return pos, block

    def _place_data(self, inodes_end: int, blocks: int) -> int:
        """Move the ``blocks`` data blocks to after the inodes; return the image's end."""
        start = f.align(inodes_end, f.BLOCK_SIZE) // f.BLOCK_SIZE
        for node, block in self.data.items():
            self.data[node] = start + block
        return (start + blocks) * f.BLOCK_SIZE

    def write(self, image: memoryview, node: Inode, ino: int) -> None:
        """Write one inode, and its data blocks if it has any."""
        shape = self.shape(node)
        offset = self.nids[node] * f.INODE_SLOT
        icount = 0 if not shape.xattrs else (len(shape.xattrs) - f.XATTR_IBODY_HEADER.size) // 4 + 1
        i_u = 0
        bits, count = _chunking(node.size) if shape.layout == f.LAYOUT_CHUNK_BASED else (0, 0)
        if shape.layout == f.LAYOUT_CHUNK_BASED:
            i_u = f.CHUNK_FORMAT_INDEXES | bits
        elif stat.S_ISCHR(node.mode) or stat.S_ISBLK(node.mode):
            i_u = f.encode_dev(node.rdev_major, node.rdev_minor)
        elif shape.data_blocks:
            i_u = self.data[node]
        i_format = int(shape.extended) | (shape.layout << 1)
        mode = node.mode & 0xFFFF
        nlink = self.nlink(node)
        if shape.extended:
            f.INODE_EXTENDED.pack_into(
                image,
                offset,
                i_format,
                icount,
                mode,
                0,
                shape.size,
                i_u,
                ino,
                node.uid,
                node.gid,
                node.mtime & 0xFFFFFFFFFFFFFFFF,
                node.mtime_ns,
                nlink,
            )
        else:
            f.INODE_COMPACT.pack_into(
                image,
                offset,
                i_format,
                icount,
                mode,
                nlink,
                shape.size,
                node.mtime - self.epoch,
                i_u,
                ino,
                node.uid,
                node.gid,
            )
        pos = offset + shape.isize
        image[pos : pos + len(shape.xattrs)] = shape.xattrs
        pos += len(shape.xattrs)
        if shape.layout == f.LAYOUT_CHUNK_BASED:
            pos = f.align(pos, f.CHUNK_INDEX.size)
            first = node.data_offset // f.BLOCK_SIZE
            per_chunk = 1 << bits
            for i in range(count):
                f.CHUNK_INDEX.pack_into(image, pos + 8 * i, 0, 1, first + i * per_chunk)
        elif shape.layout == f.LAYOUT_FLAT_INLINE:
            image[pos : pos + len(node.target)] = node.target
        elif stat.S_ISLNK(node.mode):
            start = self.data[node] * f.BLOCK_SIZE
            image[start : start + len(node.target)] = node.target
        elif node.children is not None:
            self._write_directory(image, node)

    def _write_directory(self, image: memoryview, node: Inode) -> None:
        assert node.children is not None
        entries = [
            (b".", self.nids[node], f.FT_DIR),
            (b"..", self.nids[self.parents[node]], f.FT_DIR),
        ]
        for name, child in node.children.items():
            entries.append((name, self.nids[child], f.file_type(child.mode)))
        entries.sort()
        start = self.data[node] * f.BLOCK_SIZE
        for i, block in enumerate(_dir_blocks(entries)):
            image[start + i * f.BLOCK_SIZE : start + i * f.BLOCK_SIZE + len(block)] = block


def _chunking(size: int) -> tuple[int, int]:
    """(chunk bits above the block size, chunk count) for one file."""
    bits = max(0, (size - 1).bit_length() - f.BLOCK_BITS)
    bits = min(bits, f.MAX_CHUNK_BITS)
    chunk = 1 << (bits + f.BLOCK_BITS)
    return bits, -(-size // chunk)


def _tail_size(node: Inode, shape: _Shape) -> int:
    """Bytes after the xattrs: chunk indexes (8-aligned) or an inline target."""
    if shape.layout == f.LAYOUT_CHUNK_BASED:
        return f.CHUNK_INDEX.size * _chunking(node.size)[1]
    if shape.layout == f.LAYOUT_FLAT_INLINE:
        return len(node.target)
    return 0
