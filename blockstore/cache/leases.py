"""Leases on ranges of a blob across the processes that share one cache directory.

Two servers on one cache must not fetch the same bytes at the same time.
Each blob has a lease file under ``leases/`` in the cache directory; a
process fetching a range holds an exclusive ``fcntl`` lock on the bytes of
that file that number its 4 KiB blocks while the range is fetched and
stored, so a fetch of whole chunks and one of a trace's blocks (``parts``)
exclude each other too. The kernel drops the locks of a process that
dies, so a crashed fetcher never leaves a lease behind: the next process
simply gets it. Within one process the in-flight table keeps threads
apart (POSIX locks do not conflict inside a process).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import threading
import weakref
from pathlib import Path

log = logging.getLogger(__name__)

LEASE_DIR = "leases"


class RangeLeases:
    """Exclusive, non-blocking leases on block ranges of one blob."""

    def __init__(self, cache_dir: Path, digest: str):
        directory = Path(cache_dir) / LEASE_DIR
        directory.mkdir(exist_ok=True)
        name = digest.replace(":", "-")
        self._fd = os.open(directory / name, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        self._lock = threading.Lock()
        self._name = digest
        self._unlockable = False  # set once locking fails for want of support
        # Closing any descriptor of the file drops all of this process's locks on it,
        # so there is one per blob per process, closed only when nobody holds it.
        weakref.finalize(self, os.close, self._fd)

    def in_units_of(self, blocks: int) -> UnitLeases:
        """These leases, taken in units of ``blocks`` blocks (a chunk's, or one)."""
        return UnitLeases(self, blocks)

    def try_take(self, first: int, count: int) -> bool:
        """Lease blocks ``first..first+count-1`` if no other process holds any of them.

        A file system that cannot lock (ENOLCK, as some network ones) grants every
        lease, with one warning: processes sharing the cache may then fetch the same
        bytes twice, which costs bandwidth, where refusing would stall every fetch.
        """
        if self._unlockable:
            return True
        try:
            with self._lock:
                fcntl.lockf(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB, count, first)
            return True
        except (BlockingIOError, PermissionError):  # EAGAIN, EACCES: another holds it
            return False
        except OSError as exc:
            self._unlockable = True
            log.warning(
                "%s: no leases between processes (%s): processes sharing this cache may "
                "fetch the same bytes twice",
                self._name,
                exc.strerror or exc,
            )
            return True

    def give_back(self, first: int, count: int) -> None:
        # Tried even once locking has failed: a lease taken before that must not be
        # kept from other processes for as long as this one lives.
        with self._lock, contextlib.suppress(OSError):
            fcntl.lockf(self._fd, fcntl.LOCK_UN, count, first)


class UnitLeases:
    """A blob's leases in units of several blocks: what one fetcher takes."""

    def __init__(self, leases: RangeLeases, blocks: int):
        self._leases = leases
        self._blocks = blocks

    def try_take(self, first: int, count: int) -> bool:
        return self._leases.try_take(first * self._blocks, count * self._blocks)

    def give_back(self, first: int, count: int) -> None:
        self._leases.give_back(first * self._blocks, count * self._blocks)
