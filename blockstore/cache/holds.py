"""Holds on blobs that a process serves from the cache alone.

A server with no source for a layer (``--offline``, or a registry that
could not be reached) has nowhere to fetch an evicted chunk from: eviction
by another process (``cache gc``, or a mount filling the cache) would turn
the running mount's next page-cache miss into EIO. Such a server holds a
shared ``flock`` on the blob's file under ``holds/`` in the cache directory
for as long as it serves the blob, and eviction leaves held blobs alone.
It holds the image it serves the same way (``image_key``), which ``cache rm``
keeps whole while it is served.

The kernel drops the locks of a process that dies, so a crashed server
never holds a blob for good. ``flock`` locks belong to the open file, but
NFS emulates them with POSIX locks, which belong to the process (and need
the file open for writing): this process's own holds are therefore also
kept in memory and answered from there, and the files are opened read-write.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import logging
import os
import threading
import weakref
from collections import Counter
from pathlib import Path

log = logging.getLogger(__name__)

HOLD_DIR = "holds"

_unlockable_told = threading.Event()


def _path(cache_dir: Path, digest: str) -> Path:
    return Path(cache_dir) / HOLD_DIR / digest.replace(":", "-")


def image_key(reference: str) -> str:
    """What an image served from the cache alone is held as, beside its blobs: its
    record must stay too (a server restarted offline resolves the image from it), and
    a blob that several images share cannot say which of them is served."""
    return "image:" + hashlib.sha256(reference.encode()).hexdigest()


def _cannot_lock(exc: OSError) -> bool:
    return exc.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS)


_ours: Counter[str] = Counter()  # digest -> holds taken in this process, not released
_ours_lock = threading.Lock()


def _forget(digest: str, fd: int | None) -> None:
    with _ours_lock:
        _ours[digest] -= 1
        if _ours[digest] <= 0:
            del _ours[digest]
    if fd is not None:
        os.close(fd)


class BlobHold:
    """A shared hold on one blob, from ``take`` until ``release``."""

    def __init__(self, digest: str, fd: int | None):
        with _ours_lock:
            _ours[digest] += 1
        # Released by ``release``, or when the hold is dropped unreleased.
        self._release = weakref.finalize(self, _forget, digest, fd)

    @classmethod
    def take(cls, cache_dir: Path, digest: str) -> BlobHold:
        """Hold ``digest``. A file system that cannot lock holds nothing, said once:
        the blob may then lose chunks to eviction, as any unpinned blob does."""
        path = _path(cache_dir, digest)
        try:
            path.parent.mkdir(exist_ok=True)
            while True:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
                try:
                    fcntl.flock(fd, fcntl.LOCK_SH)
                    if _same_file(fd, path):
                        return cls(digest, fd)
                except BaseException:
                    os.close(fd)
                    raise
                # A tester found the file unheld and removed it between the open and
                # the lock: hold the file that is there now.
                os.close(fd)
        except OSError as exc:
            if exc.errno == errno.EROFS:
                return cls(digest, None)  # a read-only cache: nothing evicts from it here
            if not _cannot_lock(exc):
                log.warning("%s: not kept from eviction while served: %s", digest, exc)
            elif not _unlockable_told.is_set():
                _unlockable_told.set()
                log.warning(
                    "the cache's file system cannot lock (%s): layers served from the "
                    "cache alone are not kept from eviction by other processes",
                    exc.strerror,
                )
            return cls(digest, None)

    def release(self) -> None:
        self._release()


def _same_file(fd: int, path: Path) -> bool:
    try:
        named = os.stat(path)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (named.st_dev, named.st_ino) == (held.st_dev, held.st_ino)


def is_held(cache_dir: Path, digest: str) -> bool:
    """Whether a server (this process's or another's) holds ``digest``. A hold file
    nobody holds is removed on the way. A lock that fails for another reason than
    contention counts as held (keeping a blob is the safe side), but on a file system
    that cannot lock at all, where no hold was ever taken."""
    with _ours_lock:
        if digest in _ours:
            return True
    path = _path(cache_dir, digest)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False
    return _held_or_removed(fd, path)


def _held_or_removed(fd: int, path: Path) -> bool:
    """``is_held`` once the file is open (``fd``, closed here)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError as exc:
        return not _cannot_lock(exc)
    else:
        # Removed only while it is still the file named: another tester may have
        # removed this one, and a server made and holds a new one, since it was opened.
        if _same_file(fd, path):
            with contextlib.suppress(OSError):
                path.unlink()
        return False
    finally:
        os.close(fd)
