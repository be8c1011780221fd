"""Holds on blobs that a process serves from the cache alone.

A server with no source for a layer (``--offline``, or a registry that
could not be reached) has nowhere to fetch an evicted chunk from: eviction
by another process (``cache gc``, or a mount filling the cache) would turn
the running mount's next page-cache miss into EIO. Such a server holds a
shared ``flock`` on the blob's file under ``holds/`` in the cache directory
for as long as it serves the blob, and eviction leaves held blobs alone.

The kernel drops the locks of a process that dies, so a crashed server
never holds a blob for good. ``flock`` locks belong to the open file, not
the process: a test from the same process sees a hold as another would.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import threading
import weakref
from pathlib import Path

log = logging.getLogger(__name__)

HOLD_DIR = "holds"

_unlockable_told = threading.Event()


def _path(cache_dir: Path, digest: str) -> Path:
    return Path(cache_dir) / HOLD_DIR / digest.replace(":", "-")


def _cannot_lock(exc: OSError) -> bool:
    return exc.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS)


class BlobHold:
    """A shared hold on one blob, from ``take`` until ``release``."""

    def __init__(self, fd: int | None):
        # Closed by ``release``, or when the hold is dropped unreleased.
        self._close = weakref.finalize(self, os.close, fd) if fd is not None else None

    @classmethod
    def take(cls, cache_dir: Path, digest: str) -> BlobHold:
        """Hold ``digest``. A file system that cannot lock holds nothing, said once:
        the blob may then lose chunks to eviction, as any unpinned blob does."""
        path = _path(cache_dir, digest)
        try:
            path.parent.mkdir(exist_ok=True)
            while True:
                fd = os.open(path, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
                try:
                    fcntl.flock(fd, fcntl.LOCK_SH)
                    if _same_file(fd, path):
                        return cls(fd)
                except BaseException:
                    os.close(fd)
                    raise
                # A tester found the file unheld and removed it between the open and
                # the lock: hold the file that is there now.
                os.close(fd)
        except OSError as exc:
            if exc.errno == errno.EROFS:
                return cls(None)  # a read-only cache: nothing evicts from it here
            if not _cannot_lock(exc):
                log.warning("%s: not kept from eviction while served: %s", digest, exc)
            elif not _unlockable_told.is_set():
                _unlockable_told.set()
                log.warning(
                    "the cache's file system cannot lock (%s): layers served from the "
                    "cache alone are not kept from eviction by other processes",
                    exc.strerror,
                )
            return cls(None)

    def release(self) -> None:
        if self._close is not None:
            self._close()


def _same_file(fd: int, path: Path) -> bool:
    try:
        named = os.stat(path)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (named.st_dev, named.st_ino) == (held.st_dev, held.st_ino)


def is_held(cache_dir: Path, digest: str) -> bool:
    """Whether a server (this process's or another's) holds ``digest``. A hold file
    nobody holds is removed on the way; a file system that cannot lock holds nothing."""
    path = _path(cache_dir, digest)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return False
    else:
        with contextlib.suppress(OSError):
            path.unlink()
        return False
    finally:
        os.close(fd)
