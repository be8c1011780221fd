"""Read the member list of an uncompressed tar: names, metadata, data offsets.

``tarfile`` does the header parsing (ustar, GNU long names, PAX); this module
turns its members into ``TarEntry`` records, maps PAX xattr records to xattrs
and refuses what an image cannot hold (GNU sparse files, volume headers),
naming the entry. Over a seekable file, ``tarfile`` seeks past member data, so
``RangeFile`` over a blob reads the 512-byte headers and nothing else.
"""

from __future__ import annotations

import base64
import io
import os
import re
import stat
import tarfile
import urllib.parse
from collections.abc import Callable, Iterator
from typing import IO

from blockstore.erofs_format import BLOCK_SIZE, XATTR_PREFIXES, split_xattr_name
from blockstore.tarlayer import posix_acl as acl
from blockstore.tarlayer.erofs_writer import MAX_TAR_BLOCKS
from blockstore.tarlayer.tree import DamagedTar, TarEntry, TarLayerError, show_path

_KINDS = {
    tarfile.REGTYPE: stat.S_IFREG,
    tarfile.AREGTYPE: stat.S_IFREG,
    tarfile.CONTTYPE: stat.S_IFREG,
    tarfile.DIRTYPE: stat.S_IFDIR,
    tarfile.SYMTYPE: stat.S_IFLNK,
    tarfile.CHRTYPE: stat.S_IFCHR,
    tarfile.BLKTYPE: stat.S_IFBLK,
    tarfile.FIFOTYPE: stat.S_IFIFO,
    tarfile.LNKTYPE: stat.S_IFREG,
}


class RangeFile(io.RawIOBase):
    """A seekable read-only file over ``read_range(offset, length)``."""

    def __init__(self, read_range: Callable[[int, int], bytes], size: int):
        self._read_range = read_range
        self._size = size
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self._pos, os.SEEK_END: self._size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def tell(self) -> int:
        return self._pos

    def readinto(self, buffer) -> int:  # type: ignore[no-untyped-def]
        want = min(len(buffer), self._size - self._pos)
        if want <= 0:
            return 0
        data = self._read_range(self._pos, want)
        buffer[: len(data)] = data
        self._pos += len(data)
        return len(data)


class WindowedReads:
    """Range reads of a tar walk that fetch a window ahead of each miss.

    A header walk asks for one header at a time, and each one's position is known
    only once the one before it is read: read one by one, a layer of small files
    costs a round trip per header. Each miss here asks for a window instead, so
    the headers that follow it come in the same round trip; the bytes between
    them are small files, which a mount is likely to read anyway. The window
    doubles while the walk's next miss lands within a window past the last one
    (the files skipped were small), and falls back to ``smallest`` when it jumps
    further (a large file): of a large file's data at most one window is read.
    Windows end on a multiple of ``smallest`` (the cache's chunk), which a range
    read fetches whole anyway.
    """

    def __init__(
        self,
        read_range: Callable[[int, int], bytes],
        size: int,
        *,
        smallest: int = 32 << 10,
        largest: int = 1 << 20,
    ):
        self._read_range = read_range
        self._size = size
        self._smallest = smallest
        self._largest = largest
        self._window = smallest
        self._start = 0
        self._data = b""

    def read(self, offset: int, length: int) -> bytes:
        """The bytes at ``offset``, from the last window if it holds them all."""
        start, end = offset - self._start, offset + length - self._start
        if start >= 0 and end <= len(self._data):
            return self._data[start:end]
        self._adapt(offset)
        self._data = self._read_range(offset, self._until(offset, length) - offset)
        self._start = offset
        return self._data[:length]

    def _until(self, offset: int, length: int) -> int:
        """Where a window from ``offset`` ends: past the read, on a chunk's end."""
        ahead = offset + max(length, self._window)
        return min(self._size, -(-ahead // self._smallest) * self._smallest)

    def _adapt(self, offset: int) -> None:
        """Grow the window if the walk went on to ``offset`` from near the last one's end."""
        skipped = offset - (self._start + len(self._data))
        if self._data and skipped < self._window:
            self._window = min(self._largest, self._window * 2)
        else:
            self._window = self._smallest


def _show(name: str) -> str:
    return show_path(os.fsencode(name))


def _xattrs(member: tarfile.TarInfo) -> tuple[tuple[bytes, bytes], ...]:
    """Xattrs from PAX records: GNU tar/star's SCHILY.xattr.* and libarchive's."""
    found: dict[bytes, bytes] = {}
    records: dict[bytes, str] = {}  # the PAX record of each, for messages
    for key, value in member.pax_headers.items():
        if key.startswith("SCHILY.xattr."):
            name = key[len("SCHILY.xattr.") :].encode("utf-8", "surrogateescape")
            found[name], records[name] = value.encode("utf-8", "surrogateescape"), key
        elif key.startswith("LIBARCHIVE.xattr."):
            name = urllib.parse.unquote_to_bytes(key[len("LIBARCHIVE.xattr.") :])
            records[name] = key
            try:
                found[name] = _libarchive_base64(value)
            except ValueError as exc:
                raise TarLayerError(f"tar entry {_show(member.name)}: bad xattr {key}") from exc
        elif key in _ACL_XATTRS:
            continue  # taken below, once the binary form is known to be missing
        elif key.startswith("SCHILY.acl.") or key.startswith("GNU.sparse."):
            raise TarLayerError(
                f"tar entry {_show(member.name)}: PAX record {key} cannot be represented"
            )
    found = {name: value for name, value in found.items() if not _steers_overlayfs(name)}
    for key, name in _ACL_XATTRS.items():
        text = member.pax_headers.get(key)
        if text is not None and name not in found:
            value = _acl_xattr(text, access=key == "SCHILY.acl.access", where=(member.name, key))
            if value is not None:
                found[name] = value
    if b"system.posix_acl_default" in found and not member.isdir():
        raise TarLayerError(
            f"tar entry {_show(member.name)}: a default ACL, which only a directory can have"
        )
    for name, value in found.items():
        _refuse_name_linux_refuses(member, name)
        if name in _ACL_XATTRS.values() and name in records:
            _refuse_acl_linux_refuses(acl.entries_of(value), (member.name, records[name]))
        if name == CAPABILITY_XATTR and not _is_capability(value):
            raise TarLayerError(
                f"tar entry {_show(member.name)}: PAX record {records[name]}: not a file"
                " capability Linux would keep (not of a size and revision it reads)"
            )
    return tuple(sorted(found.items()))


OVERLAY_XATTR_PREFIX = b"trusted.overlay."


def _steers_overlayfs(name: bytes) -> bool:
    """An xattr overlayfs reads on a lower layer (opaque, redirect, metacopy, origin,
    the engine's own marks): set by a tar, it would hide, move or restyle what a mount
    shows. They are dropped silently: they are overlayfs's own metadata, which no tree
    a layer is extracted to carries for a user."""
    return name.startswith(OVERLAY_XATTR_PREFIX)


CAPABILITY_XATTR = b"security.capability"
_CAPABILITY_SIZES = {1: 12, 2: 20, 3: 24}
"""The size of a ``vfs_cap_data`` of each revision (the top byte of its first word)."""


def _is_capability(value: bytes) -> bool:
    """Whether ``value`` is a file capability the kernel reads: extraction fails to set
    any other, and the kernel refuses to run a file that carries one (EINVAL)."""
    if len(value) < 4:
        return False
    revision = int.from_bytes(value[:4], "little") >> 24
    return _CAPABILITY_SIZES.get(revision) == len(value)


XATTR_NAME_MAX = 255
"""The longest xattr name Linux takes, its namespace included (ERANGE beyond)."""
_ACL_INDEXES = frozenset(
    index for index, prefix in XATTR_PREFIXES if prefix.startswith(b"system.posix_acl_")
)
"""EROFS's name indexes of the two ACLs, whose names are the whole prefix."""


def _refuse_name_linux_refuses(member: tarfile.TarInfo, name: bytes) -> None:
    """Refuse an xattr name no Linux file can have, as extraction fails to set it
    (containerd fails the layer): the image would hold it all the same, and one with a
    NUL byte would list as two names, the second one no file has."""
    why = _why_linux_refuses(name)
    if why is not None:
        shown = name.decode("utf-8", "backslashreplace")
        raise TarLayerError(
            f"tar entry {_show(member.name)}: xattr {shown!r}: {why}, which Linux refuses"
        )


def _why_linux_refuses(name: bytes) -> str | None:
    if b"\0" in name:
        return "a NUL byte in its name"
    if len(name) > XATTR_NAME_MAX:
        return f"a name longer than {XATTR_NAME_MAX} bytes"
    split = split_xattr_name(name)
    if split is None:
        return None  # a namespace EROFS lacks: the image writer refuses it
    index, suffix = split
    if index in _ACL_INDEXES:
        return "a name that is no ACL's" if suffix else None
    return None if suffix else "no name after its namespace"


def _libarchive_base64(value: str) -> bytes:
    """A ``LIBARCHIVE.xattr`` value: libarchive writes base64 without its ``=`` padding,
    so any value whose length is no multiple of 3 would fail a strict decoder."""
    return base64.b64decode(value + "=" * (-len(value) % 4), validate=False)


def _acl_mode(member: tarfile.TarInfo, xattrs: tuple[tuple[bytes, bytes], ...]) -> int:
    """The entry's permission bits: its header's, or those its access ACL sets."""
    mode = stat.S_IMODE(member.mode)
    value = dict(xattrs).get(b"system.posix_acl_access")
    entries = acl.entries_of(value) if value is not None else None
    text = member.pax_headers.get("SCHILY.acl.access")
    if entries is None and value is None and text is not None:
        entries = _acl_entries(text, (member.name, "SCHILY.acl.access"))
    return _mode_from_acl(mode, entries) if entries else mode


# GNU tar's ``--acls`` text records, and the xattr each ACL is kept in on Linux. With
# ``--xattrs`` it writes that xattr too: the text then says the same and is ignored.
_ACL_XATTRS = {
    "SCHILY.acl.access": b"system.posix_acl_access",
    "SCHILY.acl.default": b"system.posix_acl_default",
}
# Each text tag's binary tags: without a qualifier, and with one (None: it takes none).
_ACL_TAGS = {
    "user": (acl.USER_OBJ, acl.USER),
    "group": (acl.GROUP_OBJ, acl.GROUP),
    "mask": (acl.MASK, None),
    "other": (acl.OTHER, None),
}
_ACL_SHORT = {"u": "user", "g": "group", "m": "mask", "o": "other"}
_ACL_BASE = (acl.USER_OBJ, acl.GROUP_OBJ, acl.OTHER)
"""The entries every ACL has once, which alone say no more than the file's mode."""


def _acl_xattr(text: str, *, access: bool, where: tuple[str, str]) -> bytes | None:
    """The xattr value of an ACL in ``acl_to_text`` form (``user:1000:rw-`` lines), or
    None for an access ACL of the owner, group and other entries alone: that is the
    file's mode, which Linux keeps in no xattr. A name, not a number, is refused:
    it means an id in the machine that made the tar, not in the image."""
    entries = _acl_entries(text, where)
    if access and all(tag in _ACL_BASE for tag, _, _ in entries):
        return None
    return acl.packed(entries)


def _acl_entries(text: str, where: tuple[str, str]) -> list[acl.Entry]:
    """The entries of an ACL's text, in the order the kernel keeps (by tag, then id),
    refused unless they make an ACL the kernel would take (as tar, extracting, could
    not set one): each (tag, id) once; the owner, group and other entries; and a
    mask wherever a user or group is named."""
    entries = sorted((_acl_entry(line, where) for line in _acl_lines(text)), key=_tag_and_id)
    _refuse_acl_linux_refuses(entries, where)
    return entries


def _refuse_acl_linux_refuses(entries: list[acl.Entry] | None, where: tuple[str, str]) -> None:
    """Refuse an ACL the kernel would not take (so tar, extracting, could not set it):
    one that does not parse, or not each (tag, id) once, in the kernel's order (by tag,
    then id), with perms of three bits; not the owner, group and other entries once
    each, or no mask where a user or group is named. A binary one the image held was
    read by the kernel as EINVAL: a file no one but its owner could open."""
    tags = [tag for tag, _, _ in entries or ()]
    masks = tags.count(acl.MASK)
    valid = (
        entries is not None
        and len(set(map(_tag_and_id, entries))) == len(entries)
        and entries == sorted(entries, key=_tag_and_id)
        and all(tag in acl.TAGS and perm <= 7 for tag, perm, _ in entries)
        and all(tags.count(tag) == 1 for tag in _ACL_BASE)
        and masks <= 1
        and (masks == 1 or not any(tag in (acl.USER, acl.GROUP) for tag in tags))
    )
    if not valid:
        name, key = where
        raise TarLayerError(
            f"tar entry {_show(name)}: PAX record {key}: not an ACL Linux would keep "
            "(not its format, an entry twice or out of order, or no owner, group, other,"
            " or mask beside named entries)"
        )


def _mode_from_acl(mode: int, entries: list[acl.Entry]) -> int:
    """The mode an access ACL sets, as extracting sets it: the owner's and others'
    bits from their entries, the group bits from the mask (the group entry without
    one). The kernel checks access against the ACL; ``stat`` must agree with it."""
    perms = {tag: perm for tag, perm, _ in entries}
    group = perms.get(acl.MASK, perms.get(acl.GROUP_OBJ, 0))
    return mode & ~0o777 | perms.get(acl.USER_OBJ, 0) << 6 | group << 3 | perms.get(acl.OTHER, 0)


def _tag_and_id(entry: acl.Entry) -> tuple[int, int]:
    return entry[0], entry[2]


def _acl_lines(text: str) -> list[str]:
    """The entries of an ACL's text, comments (``#effective:``) and blank lines dropped."""
    lines = (line.split("#", 1)[0].strip() for line in text.replace(",", "\n").splitlines())
    return [line for line in lines if line]


def _acl_entry(line: str, where: tuple[str, str]) -> acl.Entry:
    """One ``tag:qualifier:perms`` entry as (tag, perm, id); star's
    ``tag:name:perms:id`` gives the id after the name, which is taken."""
    name, key = where
    parts = line.split(":")
    if len(parts) == 4 and re.fullmatch(r"[0-9]{1,10}", parts[3]):
        parts = [parts[0], parts[3], parts[2]]
    tags = _ACL_TAGS.get(_ACL_SHORT.get(parts[0], parts[0])) if len(parts) == 3 else None
    if tags is None or not re.fullmatch(r"[r-][w-][x-]", parts[2]):
        raise TarLayerError(f"tar entry {_show(name)}: PAX record {key}: bad ACL entry {line!r}")
    perm = sum(bit for letter, bit in zip(parts[2], (4, 2, 1), strict=True) if letter != "-")
    qualifier = parts[1]
    if not qualifier:
        return tags[0], perm, acl.NO_ID
    numeric = re.fullmatch(r"[0-9]{1,10}", qualifier) and int(qualifier) < acl.NO_ID
    if tags[1] is None or not numeric:
        raise TarLayerError(
            f"tar entry {_show(name)}: PAX record {key}: ACL entry {line!r} names no numeric id"
            " (a name cannot be mapped to the image's ids; tar --xattrs writes them as numbers)"
        )
    return tags[1], perm, int(qualifier)


_PAX_TIME = re.compile(r"-?[0-9]+(?:\.[0-9]*)?")
"""A PAX time: decimal seconds, a fraction optional (ASCII digits: ``int`` takes more)."""
_PAX_NUMBER = re.compile(r"-?[0-9]+")
"""A PAX uid, gid or size: a decimal integer in ASCII digits, as tar and Go's reader take."""
PAX_DIGITS = 64
"""The most characters taken in a PAX number (its fraction aside): every field it
fills holds 20 digits at most. ``tarfile`` takes a uid, gid or size of more than 4,300
digits (past Python's ``int`` limit) for 0, and ``int`` raises on such an mtime."""


def _refuse_long_pax_number(member: tarfile.TarInfo, key: str, digits: str) -> None:
    """Refuse a number too long for any field, before anything reads it as 0 or fails."""
    if len(digits) > PAX_DIGITS:
        raise TarLayerError(
            f"tar entry {_show(member.name)}: PAX {key} of {len(digits)} digits is out of range"
        )


def _pax_value(raw: str) -> str:
    """A PAX value for a message: a record may hold a MiB."""
    return repr(raw) if len(raw) <= PAX_DIGITS else f"{raw[:PAX_DIGITS]!r}..."


def _refuse_bad_pax_numbers(member: tarfile.TarInfo) -> None:
    """``tarfile`` takes a PAX uid, gid or size it cannot parse for 0: a file of uid
    ``1e3``, or of a uid of 5,000 nines, would be root's, where tar and Docker refuse
    the header."""
    for key in ("uid", "gid", "size"):
        raw = member.pax_headers.get(key)
        if raw is None:
            continue
        if not _PAX_NUMBER.fullmatch(raw):
            raise TarLayerError(
                f"tar entry {_show(member.name)}: PAX {key} {_pax_value(raw)} is not a number"
            )
        _refuse_long_pax_number(member, key, raw)


def _mtime(member: tarfile.TarInfo) -> tuple[int, int]:
    raw = member.pax_headers.get("mtime")
    if raw is None:
        return int(member.mtime), 0
    if not _PAX_TIME.fullmatch(raw):
        raise TarLayerError(
            f"tar entry {_show(member.name)}: PAX mtime {_pax_value(raw)} is not a number"
        )
    whole, _, frac = raw.partition(".")
    _refuse_long_pax_number(member, "mtime", whole)
    seconds = int(whole)
    nanos = int((frac + "000000000")[:9]) if frac else 0
    if raw.startswith("-") and nanos:
        seconds, nanos = seconds - 1, 1_000_000_000 - nanos
    return seconds, nanos


# What the metadata image's fields hold: EROFS ids are 32-bit, times signed 64-bit, a
# file lies in a tar of under 2 TiB (32-bit block numbers; past 2^63 bytes, ``tarfile``
# failed to seek over its data with an OverflowError), and a device number is Linux's
# 32-bit encoding (12-bit major, 20-bit minor). An id of 2^32-1 is Linux's -1, no
# owner: chown(2) takes it as "leave as it is", so extraction leaves such a file
# root's, where the image would show it as the overflow id (nobody).
_LIMITS = {
    "uid": (0, (1 << 32) - 2),
    "gid": (0, (1 << 32) - 2),
    "mtime": (-(1 << 63), (1 << 63) - 1),
    "size": (0, MAX_TAR_BLOCKS * BLOCK_SIZE - 1),
    "device major": (0, (1 << 12) - 1),
    "device minor": (0, (1 << 20) - 1),
}
SYMLINK_MAX = 4095
"""The longest symlink target Linux makes (PATH_MAX less its NUL): extraction fails beyond."""


def _refuse_what_cannot_be_held(entry: TarEntry, name: str) -> None:
    """A value the image cannot hold is refused, naming the entry, never wrapped around."""
    values = {"uid": entry.uid, "gid": entry.gid, "mtime": entry.mtime, "size": entry.size}
    if stat.S_ISCHR(entry.mode) or stat.S_ISBLK(entry.mode):
        values |= {"device major": entry.rdev_major, "device minor": entry.rdev_minor}
    for what, value in values.items():
        low, high = _LIMITS[what]
        if not low <= value <= high:
            raise TarLayerError(
                f"tar entry {_show(name)}: {what} {value} is out of range ({low} to {high})"
            )
    if stat.S_ISLNK(entry.mode) and len(entry.link) > SYMLINK_MAX:
        raise TarLayerError(
            f"tar entry {_show(name)}: a symlink target of {len(entry.link)} bytes"
            f" (at most {SYMLINK_MAX})"
        )


def entry_of(member: tarfile.TarInfo) -> TarEntry:
    """The ``TarEntry`` of one tarfile member, or an error naming it."""
    if member.sparse is not None or member.type == tarfile.GNUTYPE_SPARSE:
        raise TarLayerError(f"tar entry {_show(member.name)}: GNU sparse files are not supported")
    _refuse_bad_pax_numbers(member)
    kind = _KINDS.get(member.type)
    if kind is None:
        raise TarLayerError(
            f"tar entry {_show(member.name)}: entry type {member.type!r} cannot be represented"
        )
    seconds, nanos = _mtime(member)
    xattrs = _xattrs(member)
    entry = TarEntry(
        path=os.fsencode(member.name),
        mode=kind | _acl_mode(member, xattrs),
        uid=member.uid,
        gid=member.gid,
        mtime=seconds,
        mtime_ns=nanos,
        size=member.size if kind == stat.S_IFREG and not member.islnk() else 0,
        data_offset=member.offset_data,
        link=os.fsencode(member.linkname),
        hardlink=member.islnk(),
        rdev_major=member.devmajor,
        rdev_minor=member.devminor,
        xattrs=xattrs,
    )
    _refuse_what_cannot_be_held(entry, member.name)
    return entry


MAX_HEADER_RECORD = 1 << 20
"""The largest PAX or GNU long-name record taken (Go's tar reader, Docker's and
containerd's, takes no more): one claiming more is damage, never read into memory."""

_RECORD_TYPES = frozenset(
    (tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE, *tarfile.GNU_TYPES)
) - {tarfile.GNUTYPE_SPARSE}


class BoundedTarInfo(tarfile.TarInfo):
    """A member header whose extended-header records are held to ``MAX_HEADER_RECORD``:
    ``tarfile`` reads a PAX or long-name record whole, whatever size its header
    claims, so one of 2^60 bytes was a MemoryError. GNU sparse records that are no
    numbers are refused as damage too: ``tarfile`` parses them with a bare ``int``,
    whose ValueError is no TarError. So is a run of some hundreds of extended headers
    in a row, which ``tarfile`` reads each within the one before, past Python's
    recursion limit. An extended header whose records, or the header after it, do not
    parse is refused naming its byte offset, where ``tarfile`` named nothing.
    (``_proc_member`` is where ``tarfile`` hands a header to the code for its type.)"""

    def _proc_member(self, tarfile_: tarfile.TarFile) -> tarfile.TarInfo:
        if self.type in _RECORD_TYPES and self.size > MAX_HEADER_RECORD:
            raise DamagedTar(
                f"the tar header at byte {self.offset} claims a {self.size}-byte "
                f"extended header record, more than the {MAX_HEADER_RECORD} taken"
            )
        if self.type == tarfile.XGLTYPE:
            return self._global_header(tarfile_)
        try:
            return super()._proc_member(tarfile_)  # type: ignore[misc]
        except tarfile.SubsequentHeaderError as exc:
            raise DamagedTar(
                f"the tar header after the extended header at byte {self.offset} is damaged ({exc})"
            ) from exc
        except tarfile.HeaderError as exc:
            raise DamagedTar(
                f"the tar header at byte {self.offset} has an extended header record"
                " that does not parse"
            ) from exc
        except ValueError as exc:
            raise DamagedTar(
                f"the tar header at byte {self.offset} has GNU sparse records that do not"
                " parse (GNU sparse files are not supported)"
            ) from exc
        except RecursionError as exc:
            raise DamagedTar(
                f"the tar header at byte {self.offset} follows more extended headers in a"
                " row than can be read"
            ) from exc

    def _global_header(self, tarfile_: tarfile.TarFile) -> tarfile.TarInfo:
        """A PAX global header as a member of its own, its records applied to none:
        Go's tar reader (Docker's, containerd's) returns it so and extraction skips it,
        where ``tarfile`` would apply it to every member after it (all of them one
        path). Records that do not parse are refused, as Go refuses them."""
        self.offset_data = tarfile_.fileobj.tell()
        if not _pax_records_parse(tarfile_.fileobj.read(self.size)):
            raise DamagedTar(
                f"the PAX global header at byte {self.offset} has a record that does not parse"
            )
        tarfile_.offset = self.offset_data + self._block(self.size)  # type: ignore[attr-defined]
        return self


_PAX_LENGTH = re.compile(rb"([0-9]{1,20}) ")


def _pax_records_parse(records: bytes) -> bool:
    """Whether PAX records (``LENGTH KEY=VALUE\\n``, up to a NUL) parse as ``tarfile``
    parses an extended header's."""
    pos = 0
    while pos < len(records) and records[pos] != 0:
        match = _PAX_LENGTH.match(records, pos)
        if match is None:
            return False
        end = pos + int(match.group(1)) - 1  # where the record's newline must be
        if end < pos + 4 or end >= len(records) or records[end] != 0x0A:
            return False
        keyword, equals, _ = records[match.end() : end].partition(b"=")
        if not keyword or not equals:
            return False
        pos = end + 1
    return True


END_LOOKED_AT = 2 * tarfile.BLOCKSIZE
"""What ``check_end`` is given of the stream where ``tarfile`` stopped: the end marker."""


def check_end(offset: int, blocks: bytes | None) -> None:
    """Refuse a tar whose member list ``tarfile`` ended at ``offset`` on damage.

    ``tarfile`` takes the first header it cannot parse, or the first zero block, for
    the end of the archive; tar reports a damaged header and skips on. A layer ends
    only at two zero blocks (the end marker) or at the end of the stream: anything
    else there would be served as a tree silently missing every entry after it, as
    Go's tar reader (Docker's, containerd's) refuses a zero block that more data
    follows. ``blocks``: the ``END_LOOKED_AT`` bytes at ``offset`` (fewer at the end;
    None if they could not be looked at).
    """
    block = tarfile.BLOCKSIZE
    if blocks is None or blocks[:block].strip(b"\0"):
        raise DamagedTar(
            f"the tar header at byte {offset} is damaged (bad checksum or format);"
            " the entries after it would be lost"
        )
    if blocks[block:].strip(b"\0"):
        raise DamagedTar(
            f"a lone zero block at byte {offset} is followed by more data at byte "
            f"{offset + block} (a tar ends with two zero blocks); the entries after it "
            "would be lost"
        )


def members_of(archive: tarfile.TarFile) -> Iterator[tarfile.TarInfo]:
    """Each member of ``archive``, in order, none of them kept: iterating a ``TarFile``
    keeps every header it reads in its member list, which for a layer of many small
    files held more memory than the whole tree built from them."""
    last = None
    while (member := _next_member(archive, last)) is not None:
        archive.members.clear()
        last = member
        if member.type != tarfile.XGLTYPE:  # no entry: extraction skips it
            yield member


def _next_member(archive: tarfile.TarFile, last: tarfile.TarInfo | None) -> tarfile.TarInfo | None:
    """The member after ``last``, or a refusal naming the entry whose data the tar ends
    inside: ``tarfile`` says "unexpected end of data", naming none."""
    offset = archive.offset
    try:
        return archive.next()
    except tarfile.ReadError as exc:
        if last is None or archive.fileobj.tell() >= offset:  # a header read, not skipped to
            raise
        raise DamagedTar(
            f"tar entry {_show(last.name)}: the tar ends inside its data"
            f" ({last.size} bytes from byte {last.offset_data})"
        ) from exc


def walk_tar(fileobj: IO[bytes]) -> Iterator[TarEntry]:
    """Every member of an uncompressed tar stream, in order (``fileobj`` seekable). An
    empty stream is an empty layer (Docker and containerd take it so), not damage."""
    if not fileobj.read(1):
        return
    fileobj.seek(0)
    try:
        with tarfile.open(
            fileobj=fileobj,
            mode="r:",
            encoding="utf-8",
            errors="surrogateescape",
            tarinfo=BoundedTarInfo,
        ) as archive:
            for member in members_of(archive):
                yield entry_of(member)
            fileobj.seek(archive.offset)
            check_end(archive.offset, fileobj.read(END_LOOKED_AT))
    except tarfile.TarError as exc:
        raise DamagedTar(f"not a readable tar stream: {exc}") from exc
