"""The claim every process with a cache open holds on its file, which compaction waits for.

Compaction (``compact.py``) replaces ``data.mdb`` with a shorter copy; a
process mapping the old file meanwhile would read pages that are no longer
there. So every opener holds a shared lock on the file for as long as it
has the cache open, and compaction takes it exclusively; so does the removal of
a cache a failed first command made (``remove_if_unused``).
"""

from __future__ import annotations

import fcntl
import logging
import os
import stat
from pathlib import Path

from blockstore.openers import processes_with_open

from .errors import open_failure, reason
from .layout import LMDB_DATA_FILE, LMDB_LOCK_FILE

log = logging.getLogger(__name__)


def make_cache_directory(path: Path) -> None:
    """``path`` made if missing, its owner's alone (0700; parents made as usual): the
    cache holds every byte of the images it served, files they keep from other users
    included, so no other user may read them from it."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)


def keep_to_owner(path: Path) -> None:
    """Make the owner's cache directory at ``path`` theirs alone, as
    ``make_cache_directory`` makes one: earlier versions made it 0755, and it holds every
    byte of the images it served. Only the directory: its files are out of reach then.
    Said once, at info; one of another user's is left as it is."""
    try:
        st = path.stat()
        mode = stat.S_IMODE(st.st_mode)
        if st.st_uid != os.geteuid() or not mode & 0o077:
            return
        path.chmod(mode & ~0o077)
    except OSError as exc:
        log.warning("cannot make the cache at %s its owner's alone: %s", path, reason(exc))
        return
    log.info(
        "the cache at %s was open to other users (%04o): made it its owner's alone (%04o)",
        path,
        mode,
        mode & ~0o077,
    )


def hold_in_use(path: Path, *, read_only: bool = False) -> int:
    """A shared ``flock`` on ``data.mdb``, held by every process with the cache open:
    compaction (``compact.py``) replaces the file only under the exclusive lock, so
    it waits for none of them and none of them maps a file being replaced.

    A process that opened the file as it was being replaced gets the lock on the
    old file: it then opens the new one. The descriptor, whose closing drops the
    lock, is the caller's to keep. A ``read_only`` opener opens the file for
    reading (``flock`` needs no more) and never makes it.
    """
    data = path / LMDB_DATA_FILE
    flags = os.O_RDONLY if read_only else os.O_RDWR | os.O_CREAT
    while True:
        try:
            if not read_only:
                # Made here, in the loop: a failed first command may have removed it
                # (``remove_if_unused``) while this waited for the old file's lock.
                make_cache_directory(path)
            fd = os.open(data, flags | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise open_failure(path, exc) from exc
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                # The exclusive lock is compaction's, or a failed first command's
                # removing the empty cache it made (``remove_if_unused``).
                log.warning(
                    "the cache at %s is being compacted, or removed by a command that "
                    "made it and failed: waiting for it",
                    path,
                )
                fcntl.flock(fd, fcntl.LOCK_SH)
            if os.fstat(fd).st_ino == os.stat(data).st_ino:
                return fd
        except FileNotFoundError:
            pass  # replaced, or moved aside, in between: look again
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)


def remove_if_unused(path: Path) -> bool:
    """Remove the cache's files at ``path`` if it holds nothing but LMDB's two and no
    process has it open: the cache a command made, then failed before using. Whether
    nothing of the cache is left.

    The check and the unlinks are done under the exclusive lock on ``data.mdb`` that
    every opener's shared one excludes, on the file still at that name: an opener
    that holds it keeps the cache; one that opened the file meanwhile and waits for
    the lock finds it gone once it has the lock, and makes a new one. An older
    version, which takes no lock, is looked for among the processes instead."""
    data = path / LMDB_DATA_FILE
    try:
        fd = os.open(data, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return not any(path.iterdir())
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        try:
            if os.fstat(fd).st_ino != os.stat(data).st_ino:
                return False
        except FileNotFoundError:
            return False
        if not set(os.listdir(path)) <= {LMDB_DATA_FILE, LMDB_LOCK_FILE}:
            return False
        if processes_with_open([str(path / LMDB_LOCK_FILE)]):
            return False
        (path / LMDB_LOCK_FILE).unlink(missing_ok=True)
        data.unlink()
        return True
    finally:
        os.close(fd)
