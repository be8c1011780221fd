"""The index a fixed layer gets is pinned to ``INDEX_FORMAT``.

Caches keep metadata images, and images carry attached ones, under the
format number that wrote them: a change of what the writer makes (a mode
taken from an ACL, a symlink's mode, a new xattr) served under the old
number would keep serving the old rules from every upgraded cache and every
index attached before. This test makes such a change fail until the number
is bumped and the new digest pinned under it.
"""

from __future__ import annotations

import hashlib
import io
import tarfile

from blockstore.tarlayer.layerindex import INDEX_FORMAT, index_plain_tar

PINNED = {
    3: "a12e2935703473a2e9bf81016eb9b7a4d93f20900cd19522cff0624110687b85",
    4: "2546383ad306b30ed973865214adac164d7edfc862785bfa6e864ece8aada956",  # implied dirs marked
    5: "adce335a5c4d474a2d8a8b42f89545567650f6e28213bc9515f4768a3bb555a1",  # AUFS files skipped
    # gzip spans may cross a member's end (the metadata image is unchanged)
    6: "adce335a5c4d474a2d8a8b42f89545567650f6e28213bc9515f4768a3bb555a1",
    7: "4ef8fe3a4db60f9531d5ffe478511763970c567af67e6190e18f7d9c47c09e60",  # ends on a page
    8: "df2c34238ff59bc867f2d9a625722d4ddaf4fba06624349735e35285001575d2",  # the tar a gap on
    # no user.* xattr on a symlink; a directory listed again keeps its xattrs (two
    # entries added to the layer for them, so the digests above are of the layer before)
    9: "05821a469305b229946443ce1e006bc28e2e5ef680af87f5addc7e9e758aebdc",
    # no trusted.overlay.* xattr from the tar; a PAX global header applies to no entry
    # (both added to the layer, so the digests above are of the layer before)
    10: "b8952a6b8a7286d7f83b55b5c94c8fa22ed18734709757a9fd28f3067fb0b99c",
}
"""sha256 of the metadata image of ``_layer()``, by index format."""

MTIME = 1_700_000_000
_USER = {"SCHILY.xattr.user.note": "set"}
_GLOBAL = {"uid": "4242", "SCHILY.xattr.user.global": "g"}


def _add(archive: tarfile.TarFile, name: str, kind: bytes = tarfile.REGTYPE, **fields) -> None:
    data = fields.pop("data", b"")
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mtime = fields.pop("mtime", MTIME)
    info.mode = fields.pop("mode", 0o644)
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    for key, value in fields.items():
        setattr(info, key, value)
    archive.addfile(info, io.BytesIO(data) if data else None)


def _layer() -> bytes:
    """A tar with one of each thing the metadata image describes, built the same way
    every time (fixed times, owners and order), after a PAX global header."""
    out = io.BytesIO()
    with tarfile.open(
        fileobj=out, mode="w", format=tarfile.PAX_FORMAT, pax_headers=_GLOBAL
    ) as archive:
        _add(archive, "etc", tarfile.DIRTYPE, mode=0o755)
        _add(archive, "etc/passwd", data=b"root:x:0:0:root:/root:/bin/sh\n")
        _add(archive, "etc/big", data=bytes(range(256)) * 40, uid=70_000, gid=70_001)
        _add(archive, "empty", mode=0o600)
        _add(archive, "suid", mode=0o4755, data=b"#!/bin/sh\n")
        _add(
            archive,
            "xattr",
            data=b"x",
            pax_headers={"SCHILY.xattr.user.comment": "kept", "SCHILY.xattr.security.x": "y"},
        )
        _add(
            archive,
            "acl",
            data=b"a",
            mode=0o644,
            pax_headers={"SCHILY.acl.access": "user::rw-\ngroup::---\nother::---\n"},
        )
        _add(
            archive,
            "acl-named",
            data=b"n",
            mode=0o640,
            pax_headers={
                "SCHILY.acl.access": "user::rw-\nuser:1000:r--\ngroup::r--\nmask::r--\nother::---\n"
            },
        )
        _add(archive, "link", tarfile.SYMTYPE, linkname="etc/passwd", mode=0o644)
        _add(archive, "hard", tarfile.LNKTYPE, linkname="etc/passwd")
        _add(archive, "fifo", tarfile.FIFOTYPE, mode=0o600)
        _add(archive, "null", tarfile.CHRTYPE, devmajor=1, devminor=3, mode=0o666)
        _add(archive, ".wh.gone")
        _add(archive, "opq", tarfile.DIRTYPE, mode=0o700, mtime=MTIME + 5)
        _add(archive, "opq/.wh..wh..opq")
        _add(archive, "opq/kept", data=b"k")
        _add(archive, "d" * 120 + "/" + "f" * 120, data=b"long")
        _add(archive, ".wh..wh.aufs")
        _add(archive, ".wh..wh.plnk/262.1183", data=b"kept by aufs")
        _add(archive, "aufs-hard", tarfile.LNKTYPE, linkname=".wh..wh.plnk/262.1183")
        _add(archive, "etc/passwd", data=b"root:x:0:0:later wins:/root:/bin/sh\n")
        _add(archive, "user-xattr-link", tarfile.SYMTYPE, linkname="etc", pax_headers=_USER)
        _add(archive, "twice", tarfile.DIRTYPE, mode=0o755, pax_headers=_USER)
        _add(archive, "twice", tarfile.DIRTYPE, mode=0o750)
        _add(
            archive,
            "not-opaque",
            tarfile.DIRTYPE,
            pax_headers={"SCHILY.xattr.trusted.overlay.opaque": "y"},
        )
    return out.getvalue()


def test_the_index_of_a_fixed_layer_is_the_one_pinned_for_this_index_format():
    """Tried: index a fixed tar holding one of each kind of entry, ACL, xattr, link and
    whiteout. Must hold: the metadata image is, byte for byte, the one pinned for this
    ``INDEX_FORMAT``. If the writer's output changed, bump ``INDEX_FORMAT`` (so indexes
    kept in caches and attached to images by the old rules are rebuilt, not served)
    and pin the new digest under the new number."""
    tar = _layer()
    index = index_plain_tar(lambda offset, length: tar[offset : offset + length], len(tar), "x")
    made = hashlib.sha256(index.metadata).hexdigest()
    assert INDEX_FORMAT in PINNED, f"pin index format {INDEX_FORMAT}: {made}"
    assert made == PINNED[INDEX_FORMAT], (
        f"the metadata image of the fixed layer changed ({made}): bump INDEX_FORMAT "
        "and pin the new digest under it"
    )
