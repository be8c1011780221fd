"""Read back and check a metadata image of the kind ``erofs_writer`` makes.

The kernel parses these images, and the fsck.erofs of older erofs-utils
predates 512-byte blocks, so this is the independent check: it walks the
image from the superblock, checks every structure the kernel relies on
(sorted directory blocks, ``.`` and ``..``, link counts, inline data within
one block, chunk addresses inside the tar device) and returns the tree it
describes, so a test can compare it with the tree it was built from. It
also judges an index that came from elsewhere before it is mounted.
"""

from __future__ import annotations

import stat
from dataclasses import dataclass
from typing import NoReturn

from blockstore import erofs_format as f
from blockstore.tarlayer.erofs_writer import GAP
from blockstore.tarlayer.tree import Inode, LayerTree, TarLayerError


class ImageCheckError(TarLayerError):
    """The metadata image is malformed or outside what this engine writes."""


@dataclass(frozen=True)
class ImageInfo:
    """What the superblock and device table say."""

    root_nid: int
    inodes: int
    meta_blocks: int  # where the tar device starts, in blocks: the image's end, or GAP past it
    tar_blocks: int


def _need(cond: bool, what: str) -> None:
    if not cond:
        _fail(what)


def _fail(what: str) -> NoReturn:
    """Refuse the image. The per-inode checks call this behind their own ``if``, so that
    the message, which names the inode, is only formatted for an image that fails."""
    raise ImageCheckError(f"metadata image: {what}")


def read_info(image: bytes) -> ImageInfo:
    _need(len(image) >= f.SUPER_OFFSET + f.SUPER.size, "shorter than a superblock")
    sb = f.SUPER.unpack_from(image, f.SUPER_OFFSET)
    (magic, _crc, _compat, blkbits, extslots, root_nid, inos, _epoch, _nsec, _blocks) = sb[:10]
    meta_blkaddr, xattr_blkaddr = sb[10], sb[11]
    incompat, _u1, extra_devices, devt_slotoff = sb[14], sb[15], sb[16], sb[17]
    _need(magic == f.SUPER_MAGIC, "bad magic")
    _need(blkbits == f.BLOCK_BITS, f"block size 2^{blkbits}, not 512")
    _need(extslots == 0 and meta_blkaddr == 0 and xattr_blkaddr == 0, "unexpected layout")
    known = f.INCOMPAT_CHUNKED_FILE | f.INCOMPAT_DEVICE_TABLE
    _need(incompat & ~known == 0, f"unsupported incompatible features {incompat:#x}")
    _need(extra_devices == 1, f"{extra_devices} extra devices, not 1")
    slot = devt_slotoff * f.DEVICE_SLOT_SIZE
    _need(slot >= f.SUPER_OFFSET + f.SUPER.size, "device table overlaps the superblock")
    _need(slot + f.DEVICE_SLOT_SIZE <= len(image), "device table outside the image")
    _tag, blocks_lo, uniaddr_lo, blocks_hi, uniaddr_hi = f.DEVICE_SLOT.unpack_from(image, slot)
    tar_blocks = blocks_lo | blocks_hi << 32
    meta_blocks = uniaddr_lo | uniaddr_hi << 32
    _need(
        meta_blocks * f.BLOCK_SIZE in (len(image), len(image) + GAP),
        "the tar device starts neither at its end nor a gap after it",
    )
    return ImageInfo(root_nid, inos, meta_blocks, tar_blocks)


def tar_start(image: bytes) -> int:
    """Where the tar starts on ``image || zeros || tar``, as the image's device slot says."""
    return read_info(image).meta_blocks * f.BLOCK_SIZE


class _Walker:
    def __init__(self, image: bytes, info: ImageInfo):
        self.image = image
        self.info = info
        self.epoch, self.fixed_nsec = f.SUPER.unpack_from(image, f.SUPER_OFFSET)[7:9]
        self.inodes: dict[int, Inode] = {}
        self.nlinks: dict[int, int] = {}
        self.refs: dict[int, int] = {}
        self.dirents: dict[int, list[tuple[bytes, int, int]]] = {}

    def inode(self, nid: int) -> Inode:
        """Decode the inode at ``nid`` (once), with its data."""
        if nid in self.inodes:
            return self.inodes[nid]
        img = self.image
        pos = nid * f.INODE_SLOT
        record = f.read_inode(img, pos)
        if record is None:
            _fail(f"nid {nid} outside the image")
        if record.i_format >> 4 != 0:
            _fail(f"nid {nid}: unknown i_format bits {record.i_format:#x}")
        mtime, nsec = record.mtime, record.mtime_nsec
        if not record.extended:
            mtime, nsec = self.epoch + mtime, self.fixed_nsec
        mode, size, layout, i_u = record.mode, record.size, record.layout, record.i_u
        node = Inode(
            mode=mode, uid=record.uid, gid=record.gid, mtime=mtime, mtime_ns=nsec, size=size
        )
        self.inodes[nid] = node
        self.nlinks[nid] = record.nlink
        xpos = pos + record.length
        tail = pos + record.xattr_end
        if tail > len(img):
            _fail(f"nid {nid}: xattrs outside the image")
        node.xattrs = self._xattrs(img[xpos:tail], nid)
        kind = stat.S_IFMT(mode)
        if layout == f.LAYOUT_CHUNK_BASED:
            if kind != stat.S_IFREG:
                _fail(f"nid {nid}: chunks on a non-regular file")
            node.data_offset = self._chunks(nid, i_u, size, f.align(tail, f.CHUNK_INDEX.size))
        elif layout in (f.LAYOUT_FLAT_PLAIN, f.LAYOUT_FLAT_INLINE):
            data = self._flat(nid, record, tail)
            if kind == stat.S_IFDIR:
                node.children = {}
                self._dirents(nid, data)
            elif kind == stat.S_IFLNK:
                if not (0 < len(data) <= 4095):
                    _fail(f"nid {nid}: symlink length {len(data)}")
                node.target = data
            elif kind in (stat.S_IFCHR, stat.S_IFBLK):
                node.rdev_major, node.rdev_minor = f.decode_dev(i_u)
            else:
                if size != 0:
                    _fail(f"nid {nid}: a {kind:o} inode with flat data")
        else:
            raise ImageCheckError(f"metadata image: nid {nid}: unsupported layout {layout}")
        return node

    def _xattrs(self, body: bytes, nid: int) -> dict[bytes, bytes]:
        if not body:
            return {}
        _filter, shared = f.XATTR_IBODY_HEADER.unpack_from(body, 0)
        _need(shared == 0, f"nid {nid}: shared xattrs")
        out: dict[bytes, bytes] = {}
        pos = f.XATTR_IBODY_HEADER.size
        while pos < len(body):
            _need(pos + f.XATTR_ENTRY.size <= len(body), f"nid {nid}: truncated xattr")
            name_len, index, value_size = f.XATTR_ENTRY.unpack_from(body, pos)
            end = pos + f.XATTR_ENTRY.size + name_len + value_size
            _need(end <= len(body), f"nid {nid}: xattr runs past its inode's xattr area")
            _need(index in dict(f.XATTR_PREFIXES), f"nid {nid}: xattr name index {index}")
            start = pos + f.XATTR_ENTRY.size
            name = f.join_xattr_name(index, body[start : start + name_len])
            _need(name not in out, f"nid {nid}: xattr {name!r} twice")
            out[name] = body[start + name_len : end]
            pos = f.align(end, 4)
        return out

    def _chunks(self, nid: int, i_u: int, size: int, pos: int) -> int:
        """Check the chunk indexes of a file; return its offset in the tar."""
        fmt = i_u & 0xFFFF
        if fmt & ~(f.CHUNK_FORMAT_INDEXES | f.CHUNK_FORMAT_BLKBITS_MASK) != 0:
            _fail("chunk format")
        if not fmt & f.CHUNK_FORMAT_INDEXES:
            _fail(f"nid {nid}: block map instead of indexes")
        bits = fmt & f.CHUNK_FORMAT_BLKBITS_MASK
        per_chunk = 1 << bits
        count = -(-size // (per_chunk * f.BLOCK_SIZE))
        if count <= 0:
            _fail(f"nid {nid}: chunk-based file of size 0")
        if pos + 8 * count > len(self.image):
            _fail(f"nid {nid}: chunk indexes outside the image")
        first = None
        for i in range(count):
            hi, device, lo = f.CHUNK_INDEX.unpack_from(self.image, pos + 8 * i)
            blk = lo | hi << 32
            if device != 1:
                _fail(f"nid {nid}: chunk {i} on device {device}, not the tar")
            if first is None:
                first = blk
            if blk != first + i * per_chunk:
                _fail(f"nid {nid}: chunks not contiguous")
        assert first is not None
        end = first * f.BLOCK_SIZE + size
        if end > self.info.tar_blocks * f.BLOCK_SIZE:
            _fail(f"nid {nid}: data beyond the tar")
        return first * f.BLOCK_SIZE

    def _flat(self, nid: int, record: f.InodeRecord, tail: int) -> bytes:
        img = self.image
        ranges = f.flat_ranges(record, tail, f.BLOCK_SIZE)
        if any(start + length > len(img) for start, length in ranges):
            _fail(f"nid {nid}: data outside the image")
        inline = record.size % f.BLOCK_SIZE if record.layout == f.LAYOUT_FLAT_INLINE else 0
        if tail % f.BLOCK_SIZE + inline > f.BLOCK_SIZE:
            _fail(f"nid {nid}: inline data crosses a block")
        return b"".join(img[start : start + length] for start, length in ranges)

    def _dirents(self, nid: int, data: bytes) -> None:
        """Decode one directory's blocks; children are filled in by ``walk``."""
        names: list[tuple[bytes, int, int]] = []
        for start in range(0, len(data), f.BLOCK_SIZE):
            try:
                entries = f.directory_block(data[start : start + f.BLOCK_SIZE])
            except ValueError as exc:
                _fail(f"nid {nid}: {exc}")
            for name, _, _ in entries:
                if not name or b"/" in name:
                    _fail(f"nid {nid}: bad name {name!r}")
            names += entries
        order = [n for n, _, _ in names]
        if order != sorted(set(order)):
            _fail(f"nid {nid}: directory entries not sorted or repeated")
        self.dirents[nid] = names

    def walk(self) -> LayerTree:
        root_nid = self.info.root_nid
        root = self.inode(root_nid)
        if root.children is None:
            _fail("the root is not a directory")
        tree = LayerTree()
        tree.root = root
        todo = [(root_nid, root_nid)]
        seen_dirs = set()
        while todo:
            nid, parent = todo.pop()
            if nid in seen_dirs:
                _fail(f"nid {nid}: directory reached twice")
            seen_dirs.add(nid)
            node = self.inodes[nid]
            assert node.children is not None
            subdirs = 0
            for name, child_nid, ftype in self.dirents[nid]:
                if name == b".":
                    if child_nid != nid:
                        _fail(f"nid {nid}: '.' points elsewhere")
                    continue
                if name == b"..":
                    if child_nid != parent:
                        _fail(f"nid {nid}: '..' points elsewhere")
                    continue
                child = self.inode(child_nid)
                if ftype != f.file_type(child.mode):
                    _fail(f"nid {nid}: {name!r} has a wrong type")
                node.children[name] = child
                if child.children is not None:
                    subdirs += 1
                    todo.append((child_nid, nid))
                else:
                    self.refs[child_nid] = self.refs.get(child_nid, 0) + 1
            if self.nlinks[nid] != 2 + subdirs:
                _fail(f"nid {nid}: directory link count")
        for child_nid, count in self.refs.items():
            if self.nlinks[child_nid] != count:
                _fail(f"nid {child_nid}: link count")
        if len(self.inodes) != self.info.inodes:
            _fail("inode count in the superblock")
        return tree


def read_metadata(image: bytes) -> LayerTree:
    """The tree a metadata image describes, after checking its structure."""
    try:
        walker = _Walker(image, read_info(image))
        return walker.walk()
    except (IndexError, KeyError, ValueError) as exc:  # struct errors on short data
        raise ImageCheckError(f"metadata image: malformed ({exc})") from exc
