"""Linux's binary POSIX ACL, the value of a ``system.posix_acl_*`` xattr: a version,
then (tag, perm, id) entries. Read where a tar carries one, written from GNU tar's
text form, and rewritten where extraction would chmod the file it is on."""

from __future__ import annotations

import struct
from collections.abc import Iterable

HEAD = struct.Struct("<I")
ENTRY = struct.Struct("<HHI")
VERSION = 2
USER_OBJ, USER, GROUP_OBJ, GROUP, MASK, OTHER = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20
TAGS = frozenset((USER_OBJ, USER, GROUP_OBJ, GROUP, MASK, OTHER))
NO_ID = 0xFFFFFFFF
"""The id of an entry that names nobody (the owner's, the group's, the mask, other)."""

Entry = tuple[int, int, int]
"""(tag, perm, id)"""


def entries_of(value: bytes) -> list[Entry] | None:
    """The entries of an ACL xattr value; None if it is no ACL of this format."""
    body = value[HEAD.size :]
    if len(value) < HEAD.size or len(body) % ENTRY.size:
        return None
    if HEAD.unpack_from(value)[0] != VERSION:
        return None
    return list(ENTRY.iter_unpack(body))


def packed(entries: Iterable[Entry]) -> bytes:
    """The xattr value of ``entries``."""
    return HEAD.pack(VERSION) + b"".join(ENTRY.pack(*entry) for entry in entries)
