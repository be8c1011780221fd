"""The metadata image writer against the independent reader: same tree back, valid structure."""

from __future__ import annotations

import contextlib
import stat

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from blockstore import erofs_format as f
from blockstore.tarlayer import erofs_writer
from blockstore.tarlayer.erofs_reader import ImageCheckError, _Walker, read_info, read_metadata
from blockstore.tarlayer.erofs_writer import GAP, write_metadata
from blockstore.tarlayer.tree import Inode, LayerTree, TarEntry, TarLayerError, build_tree

TAR_SIZE = 1 << 40  # room for any data offset the strategies make


def flatten(tree: LayerTree) -> tuple[dict, list]:
    """(path -> attributes, groups of paths sharing one inode) of a tree."""
    out: dict[bytes, tuple] = {}
    groups: dict[int, list[bytes]] = {}

    def visit(node: Inode, path: bytes) -> None:
        out[path] = (
            node.mode,
            node.uid,
            node.gid,
            node.mtime,
            node.mtime_ns,
            None if node.is_dir else node.size,
            node.data_offset if stat.S_ISREG(node.mode) and node.size else None,
            node.target,
            (node.rdev_major, node.rdev_minor),
            dict(node.xattrs),
        )
        if node.children is None:
            groups.setdefault(id(node), []).append(path)
            return
        for name, child in node.children.items():
            visit(child, path + b"/" + name)

    visit(tree.root, b"")
    return out, sorted(sorted(g) for g in groups.values() if len(g) > 1)


names = st.binary(min_size=1, max_size=40).filter(
    lambda n: (
        b"/" not in n and b"\0" not in n and n not in (b".", b"..") and not n.startswith(b".wh.")
    )
)
xattr_names = st.sampled_from([b"user.a", b"user.long" * 10, b"trusted.t", b"security.s"])
entries = st.lists(
    st.tuples(
        st.lists(names, min_size=1, max_size=3),
        st.sampled_from(["reg", "dir", "lnk", "chr", "fifo", "hard"]),
        st.integers(0, 1 << 33),  # uid/gid/size/offset source
        st.integers(-(1 << 33), 1 << 33),  # mtime
        st.integers(0, 999_999_999),
        st.dictionaries(xattr_names, st.binary(max_size=300), max_size=3),
        st.binary(min_size=1, max_size=1500),  # symlink target
    ),
    max_size=40,
)


def make_entries(raw) -> list[TarEntry]:
    out: list[TarEntry] = []
    files: list[bytes] = []
    for parts, kind, n, mtime, ns, xattrs, target in raw:
        path = b"/".join(parts)
        common = dict(
            path=path,
            uid=n % 100_000,
            gid=n % 70_000,
            mtime=mtime,
            mtime_ns=ns % 2 * ns,
            xattrs=tuple(sorted(xattrs.items())),
        )
        if kind == "reg":
            out.append(
                TarEntry(
                    mode=stat.S_IFREG | 0o640,
                    size=n % (1 << 33),
                    data_offset=(n % (1 << 30)) * 512,
                    **common,
                )
            )
            files.append(path)
        elif kind == "dir":
            out.append(TarEntry(mode=stat.S_IFDIR | 0o750, **common))
        elif kind == "lnk":
            out.append(
                TarEntry(mode=stat.S_IFLNK | 0o777, link=target.replace(b"\0", b"x"), **common)
            )
        elif kind == "chr":
            out.append(
                TarEntry(
                    mode=stat.S_IFCHR | 0o600,
                    rdev_major=n % 4096,
                    rdev_minor=n % (1 << 20),
                    **common,
                )
            )
        elif kind == "fifo":
            out.append(TarEntry(mode=stat.S_IFIFO | 0o600, **common))
        elif files:
            out.append(
                TarEntry(mode=stat.S_IFREG, link=files[n % len(files)], hardlink=True, **common)
            )
    return out


def tree_or_none(raw) -> LayerTree | None:
    try:
        return build_tree(make_entries(raw))
    except TarLayerError:
        return None  # e.g. a file where a directory must be: refused before any image


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(entries)
def test_any_tree_comes_back_from_its_image(raw):
    """For random trees (every file type, names of any bytes, ids and sizes beyond 16 and
    32 bits, negative and sub-second mtimes, xattrs, hard links, long symlinks), the
    reader accepts the image and returns the same paths, attributes and hard links."""
    tree = tree_or_none(raw)
    if tree is None:
        return
    image = write_metadata(tree, TAR_SIZE)
    assert flatten(read_metadata(image)) == flatten(tree)


def test_the_image_is_deterministic_and_describes_the_tar_device():
    """Two builds of one tree are identical bytes; the device slot puts the tar a
    ``GAP`` after the metadata and counts its blocks."""
    entries = [TarEntry(path=b"a/b", mode=stat.S_IFREG | 0o644, size=1000, data_offset=512)]
    one = write_metadata(build_tree(entries), 10240)
    two = write_metadata(build_tree(entries), 10240)
    assert one == two
    info = read_info(one)
    assert info.meta_blocks * 512 == len(one) + GAP and info.tar_blocks == 20


def test_many_entries_fill_several_directory_blocks():
    """2000 names in one directory need many directory blocks; all come back, sorted."""
    tree = build_tree(
        TarEntry(path=b"d/%05d" % i, mode=stat.S_IFREG, size=1, data_offset=512 * i)
        for i in range(2000)
    )
    image = write_metadata(tree, 2000 * 512)
    back = read_metadata(image).lookup([b"d"])
    assert list(back.children) == [b"%05d" % i for i in range(2000)]
    assert back.children[b"01999"].data_offset == 1999 * 512


def test_file_beyond_chunk_limits_gets_several_chunk_indexes():
    """A 3 TiB-long file (as the header says) needs more than one chunk of the largest
    chunk size; the reader checks them contiguous and inside the device... which a 2 TiB
    tar cannot hold: the writer refuses such a tar."""
    big = TarEntry(path=b"huge", mode=stat.S_IFREG, size=3 << 40, data_offset=512)
    with pytest.raises(TarLayerError, match="2 TiB"):
        write_metadata(build_tree([big]), (3 << 40) + 1024)


def test_a_tar_just_under_2_tib_is_refused_with_its_metadata_counted():
    """Tried: a tar 1 KiB short of 2 TiB (one file filling it), whose blocks fit 32 bits
    but not with the metadata's before them: the superblock counts both. Must hold: a
    TarLayerError saying so, as for a tar of 2 TiB. Before, the superblock's packing
    failed with a bare struct.error ("'I' format requires 0 <= number <= 4294967295")."""
    tar_size = (2 << 40) - 1024
    big = TarEntry(path=b"big", mode=stat.S_IFREG, size=tar_size - 2048, data_offset=512)
    with pytest.raises(TarLayerError, match="2 TiB or larger"):
        write_metadata(build_tree([big]), tar_size)


def test_extended_inodes_only_where_needed():
    """A plain file gets a 32-byte compact inode, one with a uid beyond 16 bits a 64-byte
    extended one (the i_format version bit)."""
    tree = build_tree(
        [
            TarEntry(path=b"small", mode=stat.S_IFREG, size=1, data_offset=0, mtime=5),
            TarEntry(path=b"wide", mode=stat.S_IFREG, size=1, data_offset=0, uid=70000, mtime=5),
        ]
    )
    image = write_metadata(tree, 512)
    walker = _Walker(image, read_info(image))
    assert walker.walk().lookup([b"wide"]).uid == 70000
    versions = {
        name: int.from_bytes(image[nid * 32 : nid * 32 + 2], "little") & 1
        for name, nid, _ in walker.dirents[read_info(image).root_nid]
    }
    assert versions[b"small"] == 0 and versions[b"wide"] == 1


def test_unstorable_xattr_namespace_is_refused():
    tree = build_tree([TarEntry(path=b"f", mode=stat.S_IFREG, xattrs=((b"other.x", b"1"),))])
    with pytest.raises(TarLayerError, match=r"'/f'.*namespace EROFS cannot store"):
        write_metadata(tree, 512)


@pytest.mark.parametrize(
    ("offset", "byte"),
    [
        (f.SUPER_OFFSET, 0x00),  # magic
        (f.SUPER_OFFSET + 12, 12),  # 4 KiB blocks
        (f.SUPER_OFFSET + 0x56, 2),  # two extra devices
    ],
)
def test_reader_refuses_a_damaged_superblock(offset, byte):
    """A flipped superblock field gives one ImageCheckError, never a wrong tree."""
    image = bytearray(write_metadata(build_tree([]), 512))
    image[offset] = byte
    with pytest.raises(ImageCheckError):
        read_metadata(bytes(image))


@settings(max_examples=200, deadline=None)
@given(st.integers(1024, 4095), st.integers(0, 255))
def test_reader_never_crashes_on_a_damaged_image(position, value):
    """Any byte changed in an image's metadata gives either a tree or ImageCheckError,
    never another exception."""
    tree = build_tree(
        [
            TarEntry(
                path=b"d/f",
                mode=stat.S_IFREG,
                size=700,
                data_offset=512,
                xattrs=((b"user.k", b"v"),),
            ),
            TarEntry(path=b"d/l", mode=stat.S_IFLNK | 0o777, link=b"f"),
        ]
    )
    image = bytearray(write_metadata(tree, 4096))
    if position < len(image):
        image[position] = value
    with contextlib.suppress(ImageCheckError):
        read_metadata(bytes(image))


def test_a_name_no_directory_block_can_hold_is_refused_not_looped_on():
    """Tried: packing a directory entry whose name is longer than a 512-byte block holds
    (the tree's checks stop such names first; this is the writer's own guard). Must hold:
    a TarLayerError naming the length. Before, the writer added empty blocks for ever."""
    with pytest.raises(TarLayerError, match="600 bytes"):
        erofs_writer._dir_size([b"x" * 600])
