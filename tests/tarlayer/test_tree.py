"""Replaying tar entries into a tree: what extraction would leave, whiteouts as overlayfs wants."""

from __future__ import annotations

import gzip
import io
import stat
import tarfile

import pytest

from blockstore.tarlayer.tarwalk import walk_tar
from blockstore.tarlayer.tree import (
    IMPLIED_XATTR,
    MAX_XATTR_BYTES,
    OPAQUE_XATTR,
    ORIGIN_XATTR,
    TarEntry,
    TarLayerError,
    build_tree,
)

REG, DIR, LNK = stat.S_IFREG | 0o644, stat.S_IFDIR | 0o755, stat.S_IFLNK | 0o777


def reg(path: bytes, offset: int, size: int = 10, **kw) -> TarEntry:
    return TarEntry(path=path, mode=REG, size=size, data_offset=offset, **kw)


def test_later_entry_for_a_path_wins():
    """Two entries for ``a``: the second one's data offset and owner are what the tree
    holds, as ``tar x`` overwrites; a directory entry seen twice keeps its contents and
    takes the later metadata."""
    tree = build_tree(
        [
            TarEntry(path=b"d", mode=DIR, uid=1),
            reg(b"d/x", 512),
            reg(b"a", 1024, uid=5),
            reg(b"a", 2048, uid=6),
            TarEntry(path=b"d/", mode=stat.S_IFDIR | 0o700, uid=2),
        ]
    )
    a = tree.lookup([b"a"])
    assert (a.data_offset, a.uid) == (2048, 6)
    d = tree.lookup([b"d"])
    assert d.uid == 2 and stat.S_IMODE(d.mode) == 0o700 and list(d.children) == [b"x"]


def test_a_file_replaces_a_directory_and_back():
    """A later non-directory entry replaces a directory with everything under it."""
    tree = build_tree([reg(b"p/q", 512), reg(b"p", 1024), TarEntry(path=b"p", mode=DIR)])
    assert tree.lookup([b"p"]).children == {}


def test_a_symlink_is_0777_whatever_its_header_says():
    """A symlink whose tar header gives mode 0644 (Python's tarfile writes that) is
    0777 in the tree, as extraction leaves every symlink on Linux; its owner stays."""
    tree = build_tree([TarEntry(path=b"s", mode=stat.S_IFLNK | 0o644, link=b"target", uid=7)])
    s = tree.lookup([b"s"])
    assert (s.mode, s.uid, s.target) == (stat.S_IFLNK | 0o777, 7, b"target")


def test_hard_link_names_the_inode_written_earlier():
    """A hard link shares the inode of its target as it was then; replacing the target
    path later leaves the link pointing at the old inode (as link(2) at extraction does)."""
    tree = build_tree(
        [
            reg(b"f", 512),
            TarEntry(path=b"g", mode=REG, link=b"./f", hardlink=True),
            reg(b"f", 4096),
        ]
    )
    assert tree.lookup([b"g"]).data_offset == 512
    assert tree.lookup([b"f"]).data_offset == 4096


def test_missing_parents_are_created():
    tree = build_tree([reg(b"./a/b/c", 512)])
    assert tree.lookup([b"a", b"b"]).is_dir
    assert tree.lookup([b"a", b"b", b"c"]).data_offset == 512


def test_directories_the_layer_only_implies_are_marked_and_those_above_them():
    """Directories with no entry of their own (the root too) are marked ``y``, those
    above one ``n``, so that a mount walks only those paths; a directory with an entry,
    or made again after its whiteout (the lower one is gone), is not implied."""
    tree = build_tree(
        [
            TarEntry(path=b"./", mode=DIR),
            reg(b"a/b/file", 512),
            TarEntry(path=b"d", mode=DIR),
            reg(b"d/e/file", 512),
            TarEntry(path=b"x", mode=DIR),
            TarEntry(path=b".wh.gone", mode=REG),
            reg(b"gone/again", 512),
        ]
    )
    marks = {
        path: tree.lookup(path.split(b"/") if path else []).xattrs.get(IMPLIED_XATTR)
        for path in (b"", b"a", b"a/b", b"d", b"d/e", b"x", b"gone")
    }
    assert marks == {b"": b"n", b"a": b"y", b"a/b": b"y", b"d": b"n", b"d/e": b"y"} | {
        b"x": None,
        b"gone": None,
    }
    assert build_tree([reg(b"f", 512)]).root.xattrs == {IMPLIED_XATTR: b"y"}


def test_whiteouts_become_overlayfs_whiteouts():
    """``.wh.gone`` becomes a 0/0 character device named ``gone`` and marks its directory
    with an empty origin xattr; ``.wh..wh..opq`` makes its directory opaque and does not
    appear itself; other entries of that directory stay."""
    tree = build_tree(
        [
            TarEntry(path=b"etc/.wh.gone", mode=REG),
            TarEntry(path=b"var/.wh..wh..opq", mode=REG),
            reg(b"var/kept", 512),
        ]
    )
    gone = tree.lookup([b"etc", b"gone"])
    assert stat.S_ISCHR(gone.mode) and (gone.rdev_major, gone.rdev_minor) == (0, 0)
    assert tree.lookup([b"etc"]).xattrs == {ORIGIN_XATTR: b"", IMPLIED_XATTR: b"y"}
    var = tree.lookup([b"var"])
    assert var.xattrs == {OPAQUE_XATTR: b"y", IMPLIED_XATTR: b"y"}
    assert list(var.children) == [b"kept"]


def test_directory_entry_after_its_opaque_marker_keeps_the_marker():
    """Layers often list ``dir/.wh..wh..opq`` before ``dir/`` itself: the marker stays."""
    tree = build_tree(
        [
            TarEntry(path=b"d/.wh..wh..opq", mode=REG),
            TarEntry(path=b"d", mode=DIR, xattrs=((b"user.a", b"1"),)),
        ]
    )
    assert tree.lookup([b"d"]).xattrs == {OPAQUE_XATTR: b"y", b"user.a": b"1"}


def test_a_directory_made_again_after_its_whiteout_is_opaque():
    """``.wh.gone`` then ``gone/`` (or a file under an implied ``gone``) in one layer:
    the lower ``gone`` is deleted, so the new directory is opaque and none of the lower
    one's files show through. A directory in place of this layer's own file is too."""
    tree = build_tree(
        [
            TarEntry(path=b".wh.gone", mode=REG),
            TarEntry(path=b"gone", mode=DIR),
            reg(b"gone/new", 512),
            TarEntry(path=b"a/.wh.implied", mode=REG),
            reg(b"a/implied/x", 1024),
            reg(b"was-a-file", 2048),
            TarEntry(path=b"was-a-file", mode=DIR),
        ]
    )
    for parts in ([b"gone"], [b"a", b"implied"], [b"was-a-file"]):
        node = tree.lookup(parts)
        assert node.is_dir and node.xattrs.get(OPAQUE_XATTR) == b"y", parts
    assert list(tree.lookup([b"gone"]).children) == [b"new"]
    assert list(tree.lookup([b"a", b"implied"]).children) == [b"x"]


def test_a_whiteout_leaves_the_path_its_own_layer_wrote():
    """Whiteouts act on lower layers only (OCI image spec): ``f`` then ``.wh.f`` keeps
    ``f``; ``d/``, ``d/k`` then ``.wh.d`` keeps ``d`` with ``k``, made opaque, since the
    lower ``d`` is gone."""
    tree = build_tree(
        [
            reg(b"f", 512),
            TarEntry(path=b".wh.f", mode=REG),
            TarEntry(path=b"d", mode=DIR),
            reg(b"d/k", 1024),
            TarEntry(path=b".wh.d", mode=REG),
        ]
    )
    assert tree.lookup([b"f"]).data_offset == 512
    d = tree.lookup([b"d"])
    assert list(d.children) == [b"k"] and d.xattrs.get(OPAQUE_XATTR) == b"y"


@pytest.mark.parametrize(
    "names",
    [
        [b"a/.wh.x", b".wh.a"],
        [b"a/.wh..wh..opq", b".wh.a"],
        [b".wh.a", b"a/.wh.x"],
        [b".wh.a", b"a/.wh..wh..opq"],
        [b".wh.a", b"a/b/.wh.x"],
    ],
)
def test_a_directory_implied_only_for_whiteouts_under_its_own_whiteout_stays_gone(names):
    """The layer whites ``a`` out and writes nothing under it but whiteouts: extracting
    it deletes the lower ``a`` and makes nothing there, so ``a`` is a whiteout, not an
    empty directory, in whichever order the entries come."""
    tree = build_tree([TarEntry(path=name, mode=REG) for name in names])
    assert tree.lookup([b"a"]).is_whiteout
    assert tree.root.xattrs == {ORIGIN_XATTR: b"", IMPLIED_XATTR: b"y"}


def test_a_directory_with_a_file_of_the_layer_under_its_whiteout_is_kept():
    """The same, but with a file of the layer's own under ``a``: ``a`` is a directory,
    opaque, holding that file (and the whiteout, which hides nothing more)."""
    tree = build_tree([TarEntry(path=b".wh.a", mode=REG), reg(b"a/b/keep", 512)])
    a = tree.lookup([b"a"])
    assert a.is_dir and a.xattrs.get(OPAQUE_XATTR) == b"y"
    assert tree.lookup([b"a", b"b", b"keep"]).data_offset == 512


def test_a_symlink_of_the_layer_on_a_path_is_written_through_within_the_layer():
    """``lib -> usr/lib`` then ``lib/x``: extraction writes through the symlink, so
    ``x`` lands in ``usr/lib`` (made, as tar makes parents) and ``lib`` stays a
    symlink; a hard link to ``lib/x`` names that file. An absolute target starts at the
    layer's root and ``..`` stops there, as container runtimes resolve them: nothing
    leads out of the layer."""
    link = stat.S_IFLNK | 0o777
    tree = build_tree(
        [
            TarEntry(path=b"lib", mode=link, link=b"usr/lib"),
            reg(b"lib/x", 512),
            TarEntry(path=b"etc/abs", mode=link, link=b"/usr/lib"),
            reg(b"etc/abs/y", 1024),
            TarEntry(path=b"etc/up", mode=link, link=b"../../../usr/./lib/"),
            reg(b"etc/up/z", 1536),
            TarEntry(path=b"etc/hard", mode=REG, link=b"lib/x", hardlink=True),
        ]
    )
    assert sorted(tree.lookup([b"usr", b"lib"]).children) == [b"x", b"y", b"z"]
    assert tree.lookup([b"etc", b"hard"]) is tree.lookup([b"usr", b"lib", b"x"])
    assert tree.lookup([b"lib"]).target == b"usr/lib"
    assert sorted(tree.root.children) == [b"etc", b"lib", b"usr"]


@pytest.mark.parametrize(
    "entry",
    [
        reg(b"a\0b", 512),
        TarEntry(path=b"d\0x/f", mode=REG),
        TarEntry(path=b"s", mode=LNK, link=b"a\0/etc"),
        TarEntry(path=b"h", mode=REG, link=b"a\0b", hardlink=True),
    ],
)
def test_a_nul_byte_in_a_name_or_link_target_is_refused_by_name(entry):
    """Tried: a name, a directory on a path, a symlink target and a hard link target
    holding a NUL byte (a PAX ``path`` or ``linkpath`` record can hold one; Go's tar
    reader refuses it). Must hold: refused in one TarLayerError naming the entry.
    Before, ``a\\0b`` was kept as a name no path can reach, which the kernel listed as
    a second ``a`` beside the real one, and a target was cut short at its NUL when
    followed."""
    with pytest.raises(TarLayerError, match="a NUL byte"):
        build_tree([reg(b"a", 0), entry])


@pytest.mark.parametrize("path", [b".wh..", b"a/.wh...", b"a/./.wh..."])
def test_a_whiteout_of_dot_or_dot_dot_is_refused_by_name(path):
    """Tried: a whiteout entry hiding ``.`` or ``..`` (``.wh..``, ``a/.wh...``), which
    names no entry a lower layer could have. Must hold: refused in one TarLayerError
    naming the entry. Before, the tree kept a whiteout named ``.`` or ``..``: the
    kernel listed a second ``.`` in the root and a second ``..`` in ``a``, entries that
    are no part of the tree."""
    with pytest.raises(TarLayerError, match=f"tar entry {path.decode()!r}: a whiteout of '"):
        build_tree([TarEntry(path=b"a", mode=DIR), TarEntry(path=path, mode=REG)])


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        ([reg(b"../escape", 512)], "'..' in a path"),
        ([TarEntry(path=b"g", mode=REG, link=b"nope", hardlink=True)], "hard link to 'nope'"),
        ([reg(b"f", 512), reg(b"f/under", 1024)], "'f' is not a directory"),
        (
            [
                TarEntry(path=b".wh.w", mode=REG),
                TarEntry(path=b"g", mode=REG, link=b"w", hardlink=True),
            ],
            "hard link to 'w'",
        ),
        ([TarEntry(path=b"s", mode=LNK)], "symlink with no target"),
        ([TarEntry(path=b"s", mode=LNK, link=b"s"), reg(b"s/x", 512)], "too many symlinks"),
        ([reg(b"f", 512), TarEntry(path=b"s", mode=LNK, link=b"f"), reg(b"s/x", 1024)], "'f' is"),
        (
            [
                TarEntry(path=b"d", mode=DIR),
                TarEntry(path=b"s0", mode=LNK, link=b"/".join([b"d", b".."] * 680)),
                TarEntry(path=b"s1", mode=LNK, link=b"s0/s0/s0/s0"),
                reg(b"s1/x", 512),
            ],
            "'s1/x': its path walks more than 4096 names through symlinks",
        ),
        (
            [TarEntry(path=b"s", mode=LNK, link=b"d/" + b"n" * 600), reg(b"s/x", 512)],
            "'s/x': its path through symlink 's' has a name longer than 255 bytes",
        ),
        ([TarEntry(path=b"sock", mode=stat.S_IFSOCK | 0o644)], "unsupported file type"),
    ],
)
def test_entries_that_cannot_be_represented_are_refused_by_name(entries, message):
    """Each refusal is one TarLayerError whose message names the entry and the reason."""
    with pytest.raises(TarLayerError, match=message):
        build_tree(entries)


def gzip_layer_of_xattrs(count: int, value: object) -> bytes:
    """A gzip tar of ``count`` empty files, each with 15 xattrs of ``value(i, k)``."""
    out = io.BytesIO()
    with (
        gzip.GzipFile(fileobj=out, mode="wb", mtime=0) as compressed,
        tarfile.open(fileobj=compressed, mode="w", format=tarfile.PAX_FORMAT) as tar,
    ):
        for i in range(count):
            member = tarfile.TarInfo(f"f{i}")
            member.pax_headers = {f"SCHILY.xattr.user.{k}": value(i, k) for k in range(15)}
            tar.addfile(member)
    return out.getvalue()


def test_xattrs_that_inflate_a_small_layer_are_refused_not_held():
    """Tried: a gzip layer of 1.4 MB whose 300 files each carry 15 xattrs of 64 KB of one
    letter (a different last byte each: 275 MiB of distinct values), then one of 300
    files all carrying the same 15 values (275 MiB counted per file). Must hold: the
    first is refused once the layer's distinct xattr bytes pass ``MAX_XATTR_BYTES``,
    naming the entry; the second builds, holding each value once. Before, every value
    was held per file: a layer of a few MB took GBs of memory to index (1,000 such
    files, 1.4 MB of gzip: 1.9 GB of RSS)."""
    spread = gzip_layer_of_xattrs(300, lambda i, k: "A" * 64000 + f"{i}.{k}")
    assert len(spread) < 2 << 20 and MAX_XATTR_BYTES < 300 * 15 * 64000
    with pytest.raises(TarLayerError, match=r"tar entry 'f\d+': the layer's xattrs .* MiB"):
        build_tree(walk_tar(gzip.GzipFile(fileobj=io.BytesIO(spread))))
    alike = gzip_layer_of_xattrs(300, lambda i, k: "B" * 64000 + str(k))
    tree = build_tree(walk_tar(gzip.GzipFile(fileobj=io.BytesIO(alike))))
    values = {id(v) for f in tree.root.children.values() for v in f.xattrs.values()}
    assert len(tree.root.children) == 300 and len(values) == 15
