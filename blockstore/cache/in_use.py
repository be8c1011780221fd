"""The claim every process with a cache open holds on its file, which compaction waits for.

Compaction (``compact.py``) replaces ``data.mdb`` with a shorter copy; a
process mapping the old file meanwhile would read pages that are no longer
there. So every opener holds a shared lock on the file for as long as it
has the cache open, and compaction takes it exclusively.
"""

from __future__ import annotations

import fcntl
import logging
import os
from pathlib import Path

from .errors import open_failure
from .layout import LMDB_DATA_FILE

log = logging.getLogger(__name__)


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
            fd = os.open(data, flags | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise open_failure(path, exc) from exc
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                log.warning("the cache at %s is being compacted: waiting for it", path)
                fcntl.flock(fd, fcntl.LOCK_SH)
            if os.fstat(fd).st_ino == os.stat(data).st_ino:
                return fd
        except FileNotFoundError:
            pass  # replaced, or moved aside, in between: look again
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)
