"""Reading a tar's member list: offsets, PAX xattrs, refusals, and no file data read."""

from __future__ import annotations

import base64
import io
import os
import stat
import struct
import subprocess
import tarfile

import pytest

from blockstore.tarlayer.layerindex import index_plain_tar
from blockstore.tarlayer.tarwalk import RangeFile, walk_tar
from blockstore.tarlayer.tree import TarLayerError


def test_header_walk_over_range_reads_skips_file_data(tmp_path):
    """Walking a GNU tar of two multi-MiB files and small ones through range reads asks
    for the 512-byte headers only: under 16 KiB in all, and of each file's data at most
    the one byte tarfile reads to check the archive is not cut short."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "big1").write_bytes(os.urandom(5 << 20))
    (src / "big2").write_bytes(os.urandom(3 << 20))
    for i in range(10):
        (src / f"small{i}").write_text("x" * i)
    tar = tmp_path / "l.tar"
    subprocess.run(["tar", "-cf", str(tar), "-C", str(src), "."], check=True)
    blob = tar.read_bytes()
    reads: list[tuple[int, int]] = []

    def read_range(offset: int, length: int) -> bytes:
        reads.append((offset, length))
        return blob[offset : offset + length]

    entries = list(walk_tar(RangeFile(read_range, len(blob))))
    by_name = {e.path: e for e in entries}
    big1 = by_name[b"./big1"]
    assert blob[big1.data_offset : big1.data_offset + big1.size] == (src / "big1").read_bytes()
    assert sum(length for _, length in reads) < 16 << 10
    for e in entries:
        if e.size:
            inside = [
                (o, n) for o, n in reads if o < e.data_offset + e.size - 1 and o + n > e.data_offset
            ]
            assert inside == [], f"{e.path!r}: data read at {inside}"


def _tar_of(files: list[tuple[str, bytes]]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.GNU_FORMAT) as archive:
        for name, data in files:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return out.getvalue()


def _counted(blob: bytes) -> tuple[list[tuple[int, int]], object]:
    reads: list[tuple[int, int]] = []

    def read_range(offset: int, length: int) -> bytes:
        reads.append((offset, length))
        return blob[offset : offset + length]

    return reads, read_range


def test_indexing_small_files_takes_few_range_reads():
    """Indexing a plain tar of 400 small files asks for few windows, not one range
    read per header: each read was one round trip to the registry, in sequence."""
    blob = _tar_of([(f"f{i:03}", bytes([i % 251]) * (200 + i)) for i in range(400)])
    reads, read_range = _counted(blob)
    index = index_plain_tar(read_range, len(blob), "sha256:" + "0" * 64)
    assert index.tar_size == len(blob)
    assert len(reads) < 20, f"{len(reads)} range reads for 400 headers"


def test_indexing_reads_at_most_one_window_of_a_large_file():
    """A 24 MiB file amid small ones: the windows read ahead over the small files,
    but of the large file's data at most the one window read with its header."""
    small = [(f"a{i:03}", b"s" * 700) for i in range(200)]
    blob = _tar_of([*small, ("big", os.urandom(24 << 20)), *[("b" + n, d) for n, d in small]])
    reads, read_range = _counted(blob)
    index_plain_tar(read_range, len(blob), "sha256:" + "0" * 64)
    with tarfile.open(fileobj=io.BytesIO(blob)) as archive:
        big = archive.getmember("big")
    start, end = big.offset_data, big.offset_data + big.size
    inside = sum(max(0, min(o + n, end) - max(o, start)) for o, n in reads)
    assert inside <= 1 << 20, f"{inside} bytes of the large file's data read"
    assert len(reads) < 40, f"{len(reads)} range reads for 401 headers"


def test_pax_xattrs_of_libarchive_and_gnu_tar(tmp_path):
    """``SCHILY.xattr.NAME`` (GNU tar, star) carries raw bytes; ``LIBARCHIVE.xattr.NAME``
    (bsdtar) a URL-encoded name and a base64 value: both become the same xattrs."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as out:
        for name, pax in [
            ("gnu", {"SCHILY.xattr.user.k": "v\udcff"}),
            ("bsd", {"LIBARCHIVE.xattr.user.k%20x": base64.b64encode(b"v\xff\x00").decode()}),
        ]:
            info = tarfile.TarInfo(name)
            info.pax_headers = pax
            out.addfile(info, io.BytesIO())
    buf.seek(0)
    got = {e.path: e.xattrs for e in walk_tar(buf)}
    assert got == {b"gnu": ((b"user.k", b"v\xff"),), b"bsd": ((b"user.k x", b"v\xff\x00"),)}


@pytest.mark.parametrize("fmt", ["gnu", "posix"])
def test_sparse_files_are_refused_by_name(tmp_path, fmt):
    """A GNU sparse member (old GNU 'S' type, or PAX GNU.sparse records) is refused
    with a message naming it: its data is not one contiguous run of the tar."""
    src = tmp_path / "src"
    src.mkdir()
    with open(src / "holes", "wb") as fh:
        fh.seek(10 << 20)
        fh.write(b"end")
    tar = tmp_path / "l.tar"
    subprocess.run(
        ["tar", f"--format={fmt}", "--sparse", "-cf", str(tar), "-C", str(src), "holes"],
        check=True,
    )
    with open(tar, "rb") as fh, pytest.raises(TarLayerError, match=r"'holes'.*sparse"):
        list(walk_tar(fh))


def test_not_a_tar_is_one_clear_error():
    with pytest.raises(TarLayerError, match="not a readable tar"):
        list(walk_tar(io.BytesIO(b"\x1f\x8b" + b"junk" * 300)))


def two_members(end: bytes = bytes(1024)) -> bytes:
    """A tar of ``x`` (700 bytes) and ``y``; ``y``'s header starts at byte 1536."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as archive:
        for name, data in ((b"x", b"x" * 700), (b"y", b"yy")):
            info = tarfile.TarInfo(name.decode())
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    raw = out.getvalue()
    members_end = raw.rstrip(b"\0")
    members_end += bytes(-len(members_end) % 512)
    return members_end + end


def test_a_lone_zero_block_before_more_entries_is_refused_not_taken_for_the_end():
    """Tried: a zero block between ``x`` and ``y`` (a tar cut and spliced, a writer's
    bug). Must hold: refused, naming the byte, as Go's tar reader refuses it; before,
    tarfile stopped at the zero block and the layer lost ``y`` with no word. A single
    zero block that ends the stream, and two zero blocks then zeros, are ends."""
    raw = two_members()
    y_header = 1536
    spliced = raw[:y_header] + bytes(512) + raw[y_header:]
    with pytest.raises(TarLayerError, match=f"a lone zero block at byte {y_header} is followed"):
        list(walk_tar(io.BytesIO(spliced)))
    ends = raw.rstrip(b"\0")
    ends += bytes(-len(ends) % 512)
    for end in (bytes(512), bytes(1024), bytes(10240)):
        assert [e.path for e in walk_tar(io.BytesIO(ends + end))] == [b"x", b"y"]


@pytest.mark.parametrize("kind", [tarfile.XHDTYPE, tarfile.GNUTYPE_LONGNAME])
def test_an_extended_header_record_claiming_too_much_is_refused_not_read(kind):
    """Tried: a PAX (or GNU long-name) record whose header claims 2^60 bytes, before a
    member. Must hold: refused, naming the byte and the size, before anything is read
    into memory; before, tarfile read it whole: a MemoryError, which a mount reported
    as the bare "MemoryError" (exit 14)."""
    from test_compressed import header_claiming

    member = tarfile.TarInfo("p")
    member.size = 3
    raw = header_claiming(1 << 60, kind, "././@x") + b"10 path=q\n".ljust(512, b"\0")
    raw += member.tobuf(tarfile.USTAR_FORMAT) + b"abc".ljust(512, b"\0") + bytes(1024)
    with pytest.raises(TarLayerError, match=f"at byte 0 claims a {1 << 60}-byte extended"):
        list(walk_tar(io.BytesIO(raw)))


def test_a_damaged_header_mid_stream_is_refused_not_taken_for_the_end():
    """``y``'s header with its checksum overwritten: tarfile alone would stop there as if
    the archive ended, and the layer would lose ``y`` (and everything after it) with no
    word. It is refused, naming the byte; GNU tar reports the same header."""
    raw = bytearray(two_members())
    raw[1536 + 148 : 1536 + 156] = b"0000000\0"
    with pytest.raises(TarLayerError, match="tar header at byte 1536 is damaged"):
        list(walk_tar(io.BytesIO(bytes(raw))))


@pytest.mark.parametrize(
    "end",
    [bytes(1024), bytes(512), b"", bytes(1024) + b"junk after the end marker"],
    ids=["end-marker", "one-zero-block", "no-marker", "junk-after-marker"],
)
def test_every_way_a_tar_may_end_is_taken(end):
    """An end marker, a lone zero block, no marker at all, or junk after the marker
    (which tar ignores too): both members are there."""
    entries = list(walk_tar(io.BytesIO(two_members(end))))
    assert [e.path for e in entries] == [b"x", b"y"]


def one_member(fmt: int = tarfile.PAX_FORMAT, **fields) -> bytes:
    """A tar of one member ``odd`` with the given TarInfo fields."""
    info = tarfile.TarInfo("odd")
    for key, value in fields.items():
        setattr(info, key, value)
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=fmt) as archive:
        archive.addfile(info, io.BytesIO(b"") if info.isreg() else None)
    return out.getvalue()


@pytest.mark.parametrize(
    ("tar", "message"),
    [
        (one_member(uid=2**32 + 5), "uid 4294967301 is out of range"),
        (one_member(tarfile.GNU_FORMAT, uid=-1), "uid -1 is out of range"),
        (one_member(gid=2**40), "gid 1099511627776 is out of range"),
        (one_member(uid=2**32 - 1), r"uid 4294967295 is out of range \(0 to 4294967294\)"),
        (one_member(gid=2**32 - 1), r"gid 4294967295 is out of range \(0 to 4294967294\)"),
        (one_member(pax_headers={"mtime": "1e3"}), "PAX mtime '1e3' is not a number"),
        (one_member(pax_headers={"mtime": "--5"}), "PAX mtime '--5' is not a number"),
        (one_member(pax_headers={"mtime": "1.\u00b2"}), "PAX mtime '1.\u00b2' is not a number"),
        (one_member(pax_headers={"mtime": str(2**63 + 10)}), "mtime 9223372036854775818 is out"),
        (one_member(type=tarfile.CHRTYPE, devmajor=5000, devminor=2), "device major 5000 is"),
        (one_member(type=tarfile.BLKTYPE, devmajor=1, devminor=1 << 20), "device minor 1048576"),
        (one_member(type=tarfile.SYMTYPE, linkname="t" * 4096), "a symlink target of 4096 bytes"),
    ],
    ids=[
        "pax-uid",
        "gnu-negative-uid",
        "pax-gid",
        "uid-minus-one",
        "gid-minus-one",
        "mtime-1e3",
        "mtime-double-minus",
        "mtime-superscript",
        "mtime-2^63",
        "major",
        "minor",
        "link",
    ],
)
def test_values_the_image_cannot_hold_are_refused_by_name(tar, message):
    """A uid, gid, mtime or device number past what the image's fields hold, an mtime
    that is no number, or a symlink target longer than Linux makes: one TarLayerError
    naming the entry and the value, never a value wrapped around or a traceback (tar
    refuses each of these at extraction too). An id of 2^32-1 is Linux's -1: extraction
    leaves such a file root's, the image would show it as nobody's, so it is refused
    too (before, it was kept, and shown as 65534). The largest values that fit pass."""
    with pytest.raises(TarLayerError, match=f"tar entry 'odd': {message}"):
        list(walk_tar(io.BytesIO(tar)))
    largest = [
        one_member(uid=2**32 - 2, gid=2**32 - 2),
        one_member(type=tarfile.CHRTYPE, devmajor=4095, devminor=(1 << 20) - 1),
        one_member(type=tarfile.SYMTYPE, linkname="t" * 4095),
    ]
    for fits in largest:
        assert len(list(walk_tar(io.BytesIO(fits)))) == 1


def test_modes_links_and_devices(tmp_path):
    """Type bits come from the entry type; hard links carry their target and no size."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as out:
        f = tarfile.TarInfo("f")
        f.size = 3
        f.mode = 0o4755
        out.addfile(f, io.BytesIO(b"abc"))
        h = tarfile.TarInfo("h")
        h.type, h.linkname = tarfile.LNKTYPE, "f"
        out.addfile(h)
        c = tarfile.TarInfo("c")
        c.type, c.devmajor, c.devminor = tarfile.CHRTYPE, 1, 5
        out.addfile(c)
    buf.seek(0)
    got = {e.path: e for e in walk_tar(buf)}
    assert got[b"f"].mode == stat.S_IFREG | 0o4755 and got[b"f"].size == 3
    assert got[b"h"].hardlink and got[b"h"].link == b"f" and got[b"h"].size == 0
    assert stat.S_ISCHR(got[b"c"].mode) and (got[b"c"].rdev_major, got[b"c"].rdev_minor) == (1, 5)


def _acl_tree(tmp_path):
    """A file with an access ACL (two users) and a directory with a default ACL, of
    numeric ids (none of them named on this machine); skipped where ACLs cannot be set."""
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    (src / "f").write_text("acl\n")
    try:
        # Users whose ids and permissions sort in opposite orders: the kernel keeps
        # entries by tag and id, whatever their permissions.
        acl = "u:54321:r,u:54320:rwx,g:54322:r"
        subprocess.run(["setfacl", "-m", acl, str(src / "f")], check=True)
        subprocess.run(["setfacl", "-d", "-m", "u:54321:rwx", str(src / "d")], check=True)
    except subprocess.CalledProcessError:  # a file system without ACLs; a missing tool fails
        pytest.skip("setfacl cannot set ACLs here")
    return src


def _getfattr(path) -> dict[bytes, bytes]:
    out = subprocess.run(
        ["getfattr", "-d", "-m", "^system.posix_acl", "-e", "hex", str(path)],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    pairs = (line.split("=", 1) for line in out.splitlines() if "=0x" in line)
    return {name.encode(): bytes.fromhex(value[2:]) for name, value in pairs}


@pytest.mark.parametrize("flags", [["--acls"], ["--acls", "--xattrs", "--xattrs-include=*"]])
def test_gnu_tar_acls_become_the_xattrs_linux_keeps_them_in(tmp_path, flags):
    """GNU tar ``--acls`` writes ACLs as text only (``SCHILY.acl.*``): they are made
    into the ``system.posix_acl_*`` xattrs, byte for byte what the files hold. With
    ``--xattrs`` those xattrs are in the tar too, and the text is not read."""
    src = _acl_tree(tmp_path)
    tar = tmp_path / "l.tar"
    subprocess.run(["tar", *flags, "-cf", str(tar), "-C", str(src), "."], check=True)
    with tar.open("rb") as f:
        by_name = {e.path: dict(e.xattrs) for e in walk_tar(f)}
    assert by_name[b"./f"] == _getfattr(src / "f") != {}
    assert by_name[b"./d"] == _getfattr(src / "d") != {}


def test_an_acl_naming_a_user_is_refused_by_entry():
    """An ACL text entry of a user's name (tar writes names it can resolve) means an
    id on the machine that made the tar: refused, naming the entry and the record."""
    info = tarfile.TarInfo("f")
    info.pax_headers = {"SCHILY.acl.access": "user::rw-\nuser:nobody:r--\ngroup::r--\nother::r--\n"}
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as archive:
        archive.addfile(info)
    with pytest.raises(TarLayerError, match=r"'f'.*SCHILY.acl.access.*'user:nobody:r--'"):
        list(walk_tar(io.BytesIO(out.getvalue())))


def test_acl_text_of_star_and_of_a_twice_named_entry():
    """star writes ``user:name:perms:id``: the id is taken, the name left. An ACL that
    names one (tag, id) twice is no ACL the kernel would keep: refused."""

    def walked(acl: str) -> list:
        info = tarfile.TarInfo("f")
        info.pax_headers = {"SCHILY.acl.access": acl}
        out = io.BytesIO()
        with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as archive:
            archive.addfile(info)
        return [dict(e.xattrs) for e in walk_tar(io.BytesIO(out.getvalue()))]

    (xattrs,) = walked("user::rw-\nuser:joe:r--:1001\ngroup::r--\nmask::r--\nother::---\n")
    value = xattrs[b"system.posix_acl_access"]
    entries = [struct.unpack_from("<HHI", value, 4 + 8 * i) for i in range((len(value) - 4) // 8)]
    assert (2, 4, 1001) in entries and entries == sorted(entries, key=lambda e: (e[0], e[2]))
    with pytest.raises(TarLayerError, match="not an ACL Linux would keep"):
        walked("user::rw-\nuser:7:r--\nuser:7:rw-\ngroup::r--\nmask::rw-\nother::---\n")


def _one_entry(pax: dict[str, str], *, mode: int = 0o644, directory: bool = False):
    info = tarfile.TarInfo("d" if directory else "f")
    info.type = tarfile.DIRTYPE if directory else tarfile.REGTYPE
    info.mode = mode
    info.pax_headers = pax
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as archive:
        archive.addfile(info)
    (entry,) = walk_tar(io.BytesIO(out.getvalue()))
    return entry


def test_an_access_acl_sets_the_mode_as_extracting_does():
    """A header mode of 0644 with an access ACL whose mask is r-- and other ---: tar,
    extracting, sets the ACL, which sets the mode to 0640; so must the image, or
    ``stat`` disagrees with the access the kernel grants. The same from the xattr
    form of the ACL, and from an ACL of the owner, group and other alone (kept in no
    xattr: the mode is all there is of it)."""
    acl = "user::rw-\nuser:1000:r--\ngroup::r--\nmask::r--\nother::---\n"
    assert stat.S_IMODE(_one_entry({"SCHILY.acl.access": acl}).mode) == 0o640
    binary = struct.pack("<I", 2) + b"".join(
        struct.pack("<HHI", tag, perm, ident)
        for tag, perm, ident in ((1, 7, 2**32 - 1), (2, 7, 7), (4, 5, 2**32 - 1),
                                 (0x10, 0, 2**32 - 1), (0x20, 0, 2**32 - 1))
    )  # fmt: skip
    xattr = {"SCHILY.xattr.system.posix_acl_access": binary.decode("utf-8", "surrogateescape")}
    assert stat.S_IMODE(_one_entry(xattr).mode) == 0o700
    plain = "user::rwx\ngroup::---\nother::---\n"
    entry = _one_entry({"SCHILY.acl.access": plain})
    assert stat.S_IMODE(entry.mode) == 0o700 and dict(entry.xattrs) == {}


@pytest.mark.parametrize(
    "pax",
    [
        {"SCHILY.acl.access": "user::rw-\nuser:1000:rwx\ngroup::r--\nother::r--\n"},
        {"SCHILY.acl.access": "user:1000:rwx\nmask::rwx\nother::r--\n"},
        {"SCHILY.acl.default": "user::rwx\ngroup::r-x\nother::r-x\n"},
    ],
    ids=["named-entry-without-mask", "no-owner-or-group", "default-acl-on-a-file"],
)
def test_an_acl_linux_would_not_keep_is_refused_by_entry(pax):
    """What tar, extracting, fails to set (``acl_set_file: Invalid argument``): a named
    user without a mask, an ACL with no owner or group entry, a default ACL on a file.
    Served, the kernel would meet an ACL it never makes: refused, naming the entry."""
    with pytest.raises(TarLayerError, match="'f'"):
        _one_entry(pax)
