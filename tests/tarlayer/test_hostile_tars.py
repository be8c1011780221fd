"""Hostile tar layers, one at a time: each is represented as extraction leaves it, or
refused in one TarLayerError naming the entry, never read wrong or with a traceback."""

from __future__ import annotations

import gzip
import io
import re
import stat
import struct
import tarfile

import pytest

from blockstore.tarlayer import tree
from blockstore.tarlayer.erofs_reader import read_metadata
from blockstore.tarlayer.erofs_writer import write_metadata
from blockstore.tarlayer.layerindex import GZIP, index_compressed_tar, index_plain_tar
from blockstore.tarlayer.tarwalk import walk_tar
from blockstore.tarlayer.tree import TarLayerError, build_tree


def one_file(pax: dict[str, str], *, size: int = 0, fmt: int = tarfile.PAX_FORMAT) -> bytes:
    """A tar of one file ``f`` (its header claiming ``size`` bytes, none of them
    there) with the given PAX records, then the end marker."""
    info = tarfile.TarInfo("f")
    info.size, info.pax_headers = size, pax
    return info.tobuf(fmt) + bytes(1024)


@pytest.mark.parametrize("key", ["uid", "gid", "size", "mtime"])
def test_a_pax_number_of_thousands_of_digits_is_refused_not_read_as_zero(key):
    """Tried: a PAX ``uid``, ``gid``, ``size`` or ``mtime`` of 5,000 nines (past the
    4,300 digits Python's ``int`` parses), and of 64. Must hold: one TarLayerError
    naming the entry, saying the number is out of range, the message short. Before,
    tarfile took such a uid or gid for 0, so the file was root's, and the mtime raised
    a bare ValueError (a traceback); 64 digits are still read and judged by their
    value, and a number padded with zeros to 64 digits is read right."""
    with pytest.raises(TarLayerError, match=f"tar entry 'f': PAX {key} of 5000 digits is out"):
        list(walk_tar(io.BytesIO(one_file({key: "9" * 5000}))))
    with pytest.raises(TarLayerError, match=f"tar entry 'f': {key} 9{{64}} is out of range"):
        list(walk_tar(io.BytesIO(one_file({key: "9" * 64}))))
    padded = one_file({key: "0" * 63 + "7"}, size=7 if key == "size" else 0)
    [entry] = walk_tar(io.BytesIO(padded + bytes(512)))
    assert getattr(entry, key) == 7


@pytest.mark.parametrize(
    "tar",
    [
        one_file({"size": str(1 << 63)}),
        one_file({}, size=1 << 80, fmt=tarfile.GNU_FORMAT),
        one_file({}, size=-1, fmt=tarfile.GNU_FORMAT),
        one_file({}, size=-512, fmt=tarfile.GNU_FORMAT),
    ],
    ids=["pax-2^63", "base-256-2^80", "base-256-minus-1", "base-256-minus-512"],
)
def test_a_size_past_what_a_tar_can_hold_is_refused_by_name(tar, tmp_path):
    """Tried: a file whose size is 2^63 (a PAX record), 2^80, -1 or -512 (GNU
    base-256), indexed as a server indexes a plain tar layer (range reads), and read
    from a file as ``push`` reads one. Must hold: one TarLayerError naming the entry
    and the size, out of range (a file lies in a tar under 2 TiB). Before, the index
    of -1 failed in the image writer (struct.error, a traceback), -512 sent the walk
    back to the same header for good (an entry more each time, a core spinning), and
    ``push`` of the first two failed in tarfile's seek with OverflowError."""
    message = r"tar entry 'f': size -?\d+ is out of range"
    with pytest.raises(TarLayerError, match=message):
        index_plain_tar(lambda offset, length: tar[offset : offset + length], len(tar), "x")
    path = tmp_path / "layer.tar"
    path.write_bytes(tar)
    with path.open("rb") as raw, pytest.raises(TarLayerError, match=message):
        list(walk_tar(raw))


def test_a_pax_value_that_is_no_number_is_shown_cut_short():
    """Tried: a PAX uid of 512 KiB of letters. Must hold: refused naming the entry, the
    message showing 64 characters of the value, not all of them."""
    with pytest.raises(TarLayerError) as refused:
        list(walk_tar(io.BytesIO(one_file({"uid": "x" * (1 << 19)}))))
    assert str(refused.value) == f"tar entry 'f': PAX uid {'x' * 64!r}... is not a number"


def tar_of(*members: tarfile.TarInfo) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as archive:
        for member in members:
            archive.addfile(member)
    return out.getvalue()


def member(name: str, kind: bytes, **fields) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    for key, value in fields.items():
        setattr(info, key, value)
    return info


def test_user_xattrs_are_left_off_where_linux_allows_none():
    """Tried: a symlink, a fifo and a character device each carrying ``user.mark`` and
    ``trusted.mark`` (``SCHILY.xattr`` records), beside a file and a directory carrying
    the same. Must hold: the symlink, fifo and device have ``trusted.mark`` alone, as
    ``tar -x --xattrs`` (GNU tar 1.34, as root) and containerd leave them: Linux refuses
    ``user.*`` xattrs on all but files and directories (xattr(7)); the file and the
    directory keep both. Before, the image showed ``user.mark`` on all five, which no
    extraction leaves."""
    marks = {"SCHILY.xattr.user.mark": "u", "SCHILY.xattr.trusted.mark": "t"}
    tar = tar_of(
        member("s", tarfile.SYMTYPE, linkname="f", pax_headers=marks),
        member("p", tarfile.FIFOTYPE, pax_headers=marks),
        member("c", tarfile.CHRTYPE, devmajor=1, devminor=3, pax_headers=marks),
        member("f", tarfile.REGTYPE, pax_headers=marks),
        member("d", tarfile.DIRTYPE, pax_headers=marks),
    )
    root = build_tree(walk_tar(io.BytesIO(tar))).root
    assert root.children is not None
    xattrs = {name: dict(node.xattrs) for name, node in root.children.items()}
    both = {b"user.mark": b"u", b"trusted.mark": b"t"}
    trusted = {b"trusted.mark": b"t"}
    assert xattrs == {b"s": trusted, b"p": trusted, b"c": trusted, b"f": both, b"d": both}


def acl(*entries: tuple[int, int, int]) -> str:
    """A ``system.posix_acl_*`` xattr value of (tag, perm, id) entries, as a PAX value."""
    raw = struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *entry) for entry in entries)
    return raw.decode("utf-8", "surrogateescape")


def test_a_directory_listed_again_keeps_its_xattrs_and_its_acl_takes_the_new_mode():
    """Tried: ``d`` (0770) with ``user.a``, an access ACL naming uid 1000 (mask rwx) and
    a default ACL, then ``d/f``, then ``d`` again (0750) with no xattr, then again with
    ``user.b``. Must hold: what ``tar -x --xattrs`` (GNU tar 1.34, as root) and
    containerd leave: both ``user`` xattrs, the default ACL as it came, and the access
    ACL as chmod(2) to 0750 rewrites it (mask r-x); ``d/f`` stays. Before, each entry's
    xattrs replaced the directory's: ``user.a`` and both ACLs were gone."""
    none = 0xFFFFFFFF
    named = [(1, 7, none), (2, 5, 1000), (4, 5, none), (0x10, 7, none), (0x20, 0, none)]
    first = {
        "SCHILY.xattr.user.a": "1",
        "SCHILY.xattr.system.posix_acl_access": acl(*named),
        "SCHILY.xattr.system.posix_acl_default": acl(*named),
    }
    tar = tar_of(
        member("d", tarfile.DIRTYPE, mode=0o770, pax_headers=first),
        member("d/f", tarfile.REGTYPE),
        member("d", tarfile.DIRTYPE, mode=0o750),
        member("d", tarfile.DIRTYPE, mode=0o750, pax_headers={"SCHILY.xattr.user.b": "2"}),
    )
    d = build_tree(walk_tar(io.BytesIO(tar))).lookup([b"d"])
    assert d is not None and d.children is not None
    chmodded = [(1, 7, none), (2, 5, 1000), (4, 5, none), (0x10, 5, none), (0x20, 0, none)]
    assert (oct(d.mode), list(d.children)) == (oct(stat.S_IFDIR | 0o750), [b"f"])
    assert dict(d.xattrs) == {
        b"user.a": b"1",
        b"user.b": b"2",
        b"system.posix_acl_access": acl(*chmodded).encode("utf-8", "surrogateescape"),
        b"system.posix_acl_default": acl(*named).encode("utf-8", "surrogateescape"),
    }


def test_directories_entries_imply_count_toward_the_entries_a_layer_may_hold(monkeypatch):
    """Tried: a layer of ten files, each under 3,000 directories no entry makes
    (``x0/a/a/.../f``, ``x1/a/a/.../f``, ...), with the entries taken (``MAX_ENTRIES``,
    ten million) set to 10,000. Must hold: refused at ``x3``, whose path takes the
    count past the limit, naming the entry; no entry after it read. Before, only tar
    entries were counted: 200 such files (7 KB of gzip) held 540 MB while indexed, and
    ten thousand would have held some 27 GB."""
    monkeypatch.setattr(tree, "MAX_ENTRIES", 10_000)
    deep = "a/" * 3_000
    tar = tar_of(*(member(f"x{i}/{deep}f", tarfile.REGTYPE) for i in range(10)))
    read: list[object] = []
    with pytest.raises(
        TarLayerError, match=r"tar entry 'x3/[a/]+'\.\.\. \(6,004 bytes\): the directories"
    ):
        build_tree(read.append(entry) or entry for entry in walk_tar(io.BytesIO(tar)))
    assert len(read) == 4


@pytest.mark.parametrize(
    ("target", "reason"),
    [("../f", "'..' in a path"), ("d/" + "n" * 300, "a name is longer than 255 bytes")],
    ids=["dot-dot", "long-name"],
)
def test_a_hard_link_to_a_path_no_entry_may_have_is_refused_naming_the_link(target, reason):
    """Tried: hard link ``h`` to ``../f``, and to a path with a name of 300 bytes.
    Must hold: one TarLayerError naming the entry ``h`` and its target, and why. Before,
    the message named the target as if it were the entry (``tar entry '../f'``), so the
    entry to look for in the layer went unnamed."""
    tar = tar_of(member("f", tarfile.REGTYPE), member("h", tarfile.LNKTYPE, linkname=target))
    with pytest.raises(TarLayerError) as refused:
        build_tree(walk_tar(io.BytesIO(tar)))
    assert str(refused.value).startswith(f"tar entry 'h': hard link to {target!r}: {reason}")


@pytest.mark.parametrize(
    ("name", "why"),
    [
        ("user.a\0b", "a NUL byte in its name"),
        ("user.", "no name after its namespace"),
        ("trusted.", "no name after its namespace"),
        ("user." + "n" * 251, "a name longer than 255 bytes"),
        ("system.posix_acl_accessX", "a name that is no ACL's"),
    ],
    ids=["nul", "bare-user", "bare-trusted", "256-bytes", "acl-suffix"],
)
def test_an_xattr_name_linux_refuses_is_refused_by_entry(name, why):
    """Tried: a file carrying an xattr (a ``SCHILY.xattr`` record) whose name holds a
    NUL byte, is a namespace alone, is 256 bytes long, or is an ACL's with more after
    it. Must hold: one TarLayerError naming the entry, the xattr and why, as extraction
    fails to set such a name (containerd fails the layer); a name of 255 bytes is kept.
    Before, each was written into the image: ``user.a\\0b`` listed as two names, the
    second (``b``) one no file has."""
    tar = tar_of(member("f", tarfile.REGTYPE, pax_headers={f"SCHILY.xattr.{name}": "v"}))
    with pytest.raises(TarLayerError) as refused:
        list(walk_tar(io.BytesIO(tar)))
    assert str(refused.value).startswith("tar entry 'f': xattr ")
    assert str(refused.value).endswith(f": {why}, which Linux refuses")
    longest = "user." + "n" * 250
    tar = tar_of(member("f", tarfile.REGTYPE, pax_headers={f"SCHILY.xattr.{longest}": "v"}))
    [entry] = walk_tar(io.BytesIO(tar))
    assert entry.xattrs == ((longest.encode(), b"v"),)


NO_ID = 0xFFFFFFFF
KEPT_ACL = [(1, 6, NO_ID), (2, 4, 1000), (4, 4, NO_ID), (0x10, 4, NO_ID), (0x20, 4, NO_ID)]


@pytest.mark.parametrize(
    "value",
    [
        "v",
        acl((1, 6, NO_ID), (1, 6, NO_ID), (4, 4, NO_ID), (0x20, 4, NO_ID)),
        acl((4, 4, NO_ID), (1, 6, NO_ID), (0x20, 4, NO_ID)),
        acl((1, 8, NO_ID), (4, 4, NO_ID), (0x20, 4, NO_ID)),
        acl((1, 6, NO_ID), (4, 4, NO_ID), (0x20, 4, NO_ID), (0x40, 4, NO_ID)),
        acl((1, 6, NO_ID), (2, 4, 1000), (4, 4, NO_ID), (0x20, 4, NO_ID)),
    ],
    ids=["no-acl", "owner-twice", "out-of-order", "perm-8", "unknown-tag", "no-mask"],
)
def test_a_binary_acl_linux_would_not_keep_is_refused_by_entry(value):
    """Tried: a file whose ``SCHILY.xattr.system.posix_acl_access`` is no ACL, holds the
    owner's entry twice, has its entries out of the kernel's order, a perm of 8, an
    unknown tag, or a named user and no mask. Must hold: one TarLayerError naming the
    entry and the record, as extraction fails to set such an ACL (the kernel refuses
    it); a valid one is kept. Before, the image held it, and the kernel read the
    first as EINVAL: the mounted file could be opened by no one but its owner."""
    record = "SCHILY.xattr.system.posix_acl_access"
    tar = tar_of(member("f", tarfile.REGTYPE, pax_headers={record: value}))
    with pytest.raises(TarLayerError, match=f"tar entry 'f': PAX record {record}: not an ACL"):
        list(walk_tar(io.BytesIO(tar)))
    tar = tar_of(member("f", tarfile.REGTYPE, pax_headers={record: acl(*KEPT_ACL)}))
    [entry] = walk_tar(io.BytesIO(tar))
    assert dict(entry.xattrs) == {
        record[13:].encode(): acl(*KEPT_ACL).encode("utf-8", "surrogateescape")
    }


def capability(revision: int, size: int) -> str:
    """A ``security.capability`` value of ``revision`` (effective: net_bind_service)."""
    raw = struct.pack("<II", revision << 24 | 1, 1 << 10).ljust(size, b"\0")
    return raw.decode("utf-8", "surrogateescape")


@pytest.mark.parametrize(
    "value",
    ["v", capability(1, 20), capability(2, 21), capability(2, 12), capability(4, 24)],
    ids=["no-capability", "v1-of-20", "v2-of-21", "v2-of-12", "revision-4"],
)
def test_a_file_capability_linux_would_not_keep_is_refused_by_entry(value):
    """Tried: a file whose ``SCHILY.xattr.security.capability`` is no capability, or of
    a size its revision does not have, or of an unknown revision. Must hold: one
    TarLayerError naming the entry and the record, as extraction fails to set it
    (GNU tar: Invalid argument; containerd fails the layer); capabilities of revision
    1, 2 and 3 at their sizes are kept. Before, the image held it, and the kernel
    refused to run the mounted file (EINVAL; exit 126 from a shell)."""
    record = "SCHILY.xattr.security.capability"
    tar = tar_of(member("f", tarfile.REGTYPE, pax_headers={record: value}))
    with pytest.raises(TarLayerError, match=f"tar entry 'f': PAX record {record}: not a file cap"):
        list(walk_tar(io.BytesIO(tar)))
    for revision, size in ((1, 12), (2, 20), (3, 24)):
        kept = capability(revision, size)
        [entry] = walk_tar(
            io.BytesIO(tar_of(member("f", tarfile.REGTYPE, pax_headers={record: kept})))
        )
        assert entry.xattrs == ((b"security.capability", kept.encode("utf-8", "surrogateescape")),)


LONG_PATH = ("n" * 199 + "/") * 4_000


@pytest.mark.parametrize(
    ("name", "pax", "why"),
    [
        (LONG_PATH + "n" * 300, {}, "a name is longer than 255 bytes"),
        (LONG_PATH + "f", {"uid": "x"}, "PAX uid 'x' is not a number"),
        (LONG_PATH + "f", {"SCHILY.xattr.system.x": "v"}, "has a namespace EROFS cannot store"),
    ],
    ids=["tree", "walk", "image"],
)
def test_an_entry_named_by_a_mib_of_path_is_refused_in_a_short_message(name, pax, why):
    """Tried: entries whose PAX path is 800 KB (4,000 names of 199 bytes), refused for
    a name over 255 bytes, a uid that is no number, and an xattr namespace EROFS lacks
    (found while the tree is built, the tar walked, the image written). Must hold: one
    TarLayerError saying why, whose message shows 4 KiB of the path and its length, not
    all of it. Before, each message held the whole path: one line of 800 KB."""
    tar = tar_of(member(name, tarfile.REGTYPE, pax_headers=pax))
    with pytest.raises(TarLayerError) as refused:
        write_metadata(build_tree(walk_tar(io.BytesIO(tar))), len(tar))
    message = str(refused.value)
    assert why in message and re.search(r"\.\.\. \(800,[0-9]{3} bytes\)", message)
    assert len(message) < 4_400


def test_the_names_a_layer_s_paths_walk_in_all_are_held_to_a_limit(monkeypatch):
    """Tried: a layer of 30 files in one directory 2,040 names deep (16 bytes of gzip a
    file, each walked name by name: 2 ms an entry, so a 16 MB layer indexed for most of
    an hour), with the names walked in all (``MAX_NAMES_WALKED``, a billion) set to
    50,000. Must hold: refused at the 25th file, whose path takes the count past the
    limit, naming it; at 100,000 names, indexed. Before, no limit held the names
    walked in all."""
    monkeypatch.setattr(tree, "MAX_NAMES_WALKED", 50_000)
    deep = "d/" * 2_040
    tar = tar_of(*(member(f"{deep}f{i}", tarfile.REGTYPE) for i in range(30)))
    with pytest.raises(TarLayerError) as refused:
        build_tree(walk_tar(io.BytesIO(tar)))
    assert "/f24'" in str(refused.value)
    assert "paths walk more than 50,000 names in all" in str(refused.value)
    monkeypatch.setattr(tree, "MAX_NAMES_WALKED", 100_000)
    assert len(build_tree(walk_tar(io.BytesIO(tar))).lookup([b"d"] * 2_040).children) == 30


def test_overlay_xattrs_a_tar_carries_are_dropped_those_the_engine_writes_kept(tmp_path):
    """Tried: a directory carrying ``trusted.overlay.opaque=y``, ``.origin`` and the
    engine's own ``trusted.overlay.blockstore.implied=y`` (``SCHILY.xattr`` records), a
    file carrying ``trusted.overlay.metacopy`` and ``trusted.overlay.redirect``
    (``LIBARCHIVE.xattr``, base64), beside a real ``.wh..wh..opq`` and a whiteout.
    Must hold: the image read back has no ``trusted.overlay.*`` xattr a record set;
    the other xattrs stay, and the opaque marker and origin the whiteouts make are
    there: overlayfs takes the image as a lower layer, so such xattrs steer what a
    mount shows (hide the lower directory, redirect to another path, show the lower
    one's attributes), which extraction by containerd never leaves."""
    tricks = {
        "SCHILY.xattr.trusted.overlay.opaque": "y",
        "SCHILY.xattr.trusted.overlay.origin": "",
        "SCHILY.xattr.trusted.overlay.blockstore.implied": "y",
        "SCHILY.xattr.trusted.kept": "k",
    }
    libarchive = {
        "LIBARCHIVE.xattr.trusted.overlay.metacopy": "",
        "LIBARCHIVE.xattr.trusted.overlay.redirect": "L290aGVy",  # /other
    }
    tar = tar_of(
        member("d", tarfile.DIRTYPE, pax_headers=tricks),
        member("f", tarfile.REGTYPE, pax_headers=libarchive),
        member("o", tarfile.DIRTYPE),
        member("o/.wh..wh..opq", tarfile.REGTYPE),
        member("w", tarfile.DIRTYPE),
        member("w/.wh.gone", tarfile.REGTYPE),
    )
    image = write_metadata(build_tree(walk_tar(io.BytesIO(tar))), len(tar))
    root = read_metadata(image).root
    assert root.children is not None
    xattrs = {name: dict(node.xattrs) for name, node in root.children.items()}
    assert xattrs[b"d"] == {b"trusted.kept": b"k"}
    assert xattrs[b"f"] == {}
    assert xattrs[b"o"] == {tree.OPAQUE_XATTR: b"y"}
    assert xattrs[b"w"] == {tree.ORIGIN_XATTR: b""}


def test_a_pax_global_header_applies_to_no_entry():
    """Tried: a PAX global header (``g``) of ``path=evil``, ``uid``, ``mtime`` and an
    xattr, then files ``a`` and ``b`` (as ``tarfile`` writes ``pax_headers=`` given to
    ``open``); a tar of a global header alone; one whose global record does not
    parse. Must hold: ``a`` and ``b`` as their own headers say, none of the global
    records applied, as Go's archive/tar (Docker's, containerd's) returns a global
    header as an entry of its own that extraction skips; a global header alone is an
    empty layer; a record that does not parse is refused naming the header's byte
    offset, as Go refuses it. Before, both files were indexed as the one file
    ``evil``, root's and carrying the xattr; a gzip layer is indexed alike."""
    records = {"path": "evil", "uid": "7", "mtime": "5", "SCHILY.xattr.trusted.g": "g"}
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT, pax_headers=records) as t:
        for name in ("a", "b"):
            t.addfile(member(name, tarfile.REGTYPE, uid=1000, mtime=1_700_000_000))
    entries = list(walk_tar(io.BytesIO(out.getvalue())))
    assert [(e.path, e.uid, e.mtime, e.xattrs) for e in entries] == [
        (b"a", 1000, 1_700_000_000, ()),
        (b"b", 1000, 1_700_000_000, ()),
    ]
    index = index_compressed_tar(
        io.BytesIO(gzip.compress(out.getvalue())), GZIP, blob_digest=None, diff_id=None
    )
    assert sorted(read_metadata(index.metadata).root.children or {}) == [b"a", b"b"]
    alone = member("g", tarfile.XGLTYPE).tobuf(tarfile.USTAR_FORMAT) + bytes(1024)
    assert list(walk_tar(io.BytesIO(alone))) == []
    bad = b"8 path=x\n"  # a length one short of the record's
    header = member("g", tarfile.XGLTYPE, size=len(bad)).tobuf(tarfile.USTAR_FORMAT)
    tar = header + bad.ljust(512, b"\0") + tar_of(member("f", tarfile.REGTYPE)) + bytes(1024)
    with pytest.raises(TarLayerError, match="the PAX global header at byte 0 has a record"):
        list(walk_tar(io.BytesIO(tar)))


def _refusals(tar: bytes) -> list[str]:
    """What walking ``tar`` from a file, indexing it as a plain layer (range reads) and
    as a gzip one (a stream) each refuse it with."""
    said = []
    for read in (
        lambda: list(walk_tar(io.BytesIO(tar))),
        lambda: index_plain_tar(
            lambda offset, length: tar[offset : offset + length], len(tar), "x"
        ),
        lambda: index_compressed_tar(
            io.BytesIO(gzip.compress(tar)), GZIP, blob_digest=None, diff_id=None
        ),
    ):
        with pytest.raises(TarLayerError) as refused:
            read()
        said.append(str(refused.value))
    return said


def test_a_tar_cut_inside_an_entry_s_data_is_refused_naming_the_entry():
    """Tried: a tar of ``a`` (2,000 bytes) and ``big`` (5,000), cut 100 bytes into
    ``big``'s data; read from a file, as a plain layer and as a gzip one. Must hold:
    each refusal names ``big`` and where its data lies, as the other refusals name
    their entry. Before, each said "unexpected end of data", naming nothing."""
    a, big = member("a", tarfile.REGTYPE, size=2000), member("big", tarfile.REGTYPE, size=5000)
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as archive:
        archive.addfile(a, io.BytesIO(b"a" * 2000))
        archive.addfile(big, io.BytesIO(b"b" * 5000))
    cut = out.getvalue()[: 3072 + 100]
    said = "tar entry 'big': the tar ends inside its data (5000 bytes from byte 3072)"
    assert _refusals(cut) == [said] * 3


def test_an_extended_header_that_does_not_parse_is_refused_naming_its_offset():
    """Tried: a PAX header whose record's length is one short, first in the tar and
    after a file of 700 bytes; and a PAX header then a header whose checksum fails.
    Must hold: each refusal names the byte offset of the header (no entry has a name
    yet: the name may be in the record), read from a file, as a plain layer and as a
    gzip one alike. Before, the first said "invalid header" and the last "bad
    checksum", naming nothing."""
    pax = member("f", tarfile.REGTYPE, pax_headers={"comment": "x"}).tobuf(tarfile.PAX_FORMAT)
    bad = pax.replace(b"13 comment=x\n", b"12 comment=x\n")
    assert bad != pax
    first = bad + bytes(1024)
    said = "the tar header at byte 0 has an extended header record that does not parse"
    assert _refusals(first) == [said] * 3
    x = tar_of(member("x", tarfile.REGTYPE, size=700))[:1536]  # x's data left out by tarfile
    later = x[:512] + bytes(1024) + bad + bytes(1024)
    assert _refusals(later) == [said.replace("byte 0", "byte 1536")] * 3
    spoilt = pax[:1024] + b"\xff" + pax[1025:] + bytes(1024)
    said = "the tar header after the extended header at byte 0 is damaged (bad checksum)"
    assert _refusals(spoilt) == [said] * 3
