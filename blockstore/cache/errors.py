"""What a cache raises, and which errors of LMDB and of decoding say its file is damaged.

Beside ``CacheError`` (``blockstore.errors``), a cache tells apart the
failures its callers act on: a full disk (evict, or give up), a damaged file
(moved aside), a write asked of a cache opened read-only, a cache of another
version's layout, and a chunk its sealed blob refuses. Every module of the
cache raises them, so they stand apart from the environment and the store
that most of them come from.
"""

from __future__ import annotations

import errno
import struct
from pathlib import Path

import lmdb

from blockstore.errors import BlobReadError, CacheError, IntegrityError


def reason(exc: BaseException) -> str:
    """What went wrong, for a message that already names the path: an OSError's
    ``strerror`` alone, not its ``[Errno N] ...: 'path'``."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc)


# What LMDB says of a file it cannot trust.
DAMAGE_ERRORS = (
    lmdb.CorruptedError,
    lmdb.PageNotFoundError,
    lmdb.BadValsizeError,
    lmdb.InvalidError,
    lmdb.VersionMismatchError,
    lmdb.IncompatibleError,
    lmdb.BadTxnError,
)


def handle_given_up(exc: BaseException) -> bool:
    """Whether a write failed in a way that leaves the file as of its last commit but
    this process's handle unfit to go on: LMDB's ``MDB_PANIC`` once a write of its meta
    page failed (every transaction of the handle fails after it), or a file system that
    turned read-only under it (ext4's ``errors=remount-ro`` on a failing disk). The file
    is not damaged: it is opened again, never moved aside."""
    return isinstance(exc, lmdb.PanicError) or (
        isinstance(exc, lmdb.Error) and getattr(exc, "code", None) == errno.EROFS
    )


# What decoding a stored record raises when its bytes are not what was stored.
RECORD_ERRORS = (struct.error, UnicodeDecodeError)


class DiskFull(CacheError):
    """A commit failed because the file system holding the cache is full."""


class CacheDamaged(CacheError):
    """The cache's file could not be trusted: it was moved aside."""


ELSEWHERE = "give another --cache-dir"
"""What a user can do about a cache directory that cannot be made or opened."""


def open_failure(path: Path, exc: OSError) -> CacheError:
    """The error for a file of the cache at ``path`` that could not be made or opened:
    ``DiskFull`` where the disk had no room for it, as the caller may then evict."""
    if exc.errno == errno.ENOSPC:
        return DiskFull(f"the disk holding the cache at {path} is full: make room, or {ELSEWHERE}")
    return CacheError(f"cannot open the cache at {path}: {reason(exc)}; {ELSEWHERE}")


class ReadOnlyCache(CacheError):
    """A write asked of a cache this process can only read."""

    @classmethod
    def at(cls, path: Path, why: str) -> ReadOnlyCache:
        return cls(f"the cache at {path} is read-only here ({why}): nothing in it can be changed")


class OtherFormat(CacheError):
    """The cache was written by a version of this program with another layout:
    ``older`` (which an online opener may replace) or not (a newer version's, left be)."""

    def __init__(self, message: str, *, older: bool = False):
        super().__init__(message)
        self.older = older


class ChunkIntegrityError(IntegrityError, BlobReadError):
    """Bytes for a chunk of a sealed blob that its sealed checksum rejects."""

    def __init__(self, message: str):
        BlobReadError.__init__(self, message, errno.EIO)
