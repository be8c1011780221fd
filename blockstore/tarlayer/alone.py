"""One indexing pass of a layer at a time among the processes sharing a cache.

Two servers or mounts opening the same new tar.gz layer in one cache would
each read and inflate it whole to index it, and the second pass, starting,
would drop the tar the first was storing. Whoever builds a layer's index
holds an exclusive ``flock`` on a file beside the blob's lease file; the
others wait for it and then take the index it kept. The kernel drops the
lock of a process that dies. A holder that makes no end (stopped, or stuck
on a slow registry) is waited for no longer than ``WAIT`` seconds; the
waiter then builds the index itself, as it would have without the lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path

from blockstore.cache.leases import LEASE_DIR
from blockstore.progress import EVERY, PROGRESS_LOGGER

log = logging.getLogger(__name__)
progress = logging.getLogger(PROGRESS_LOGGER)

WAIT = 300.0
"""Seconds one open waits for another process's pass over the same layer."""
_POLL = 0.05


@contextlib.contextmanager
def indexing_alone(
    cache_dir: Path, digest: str, span: int, *, wait: float = WAIT
) -> Iterator[None]:
    """Held while ``digest``'s index (for ``span``) is looked up again and built. Where
    no lock can be had (a read-only cache, a file system without locks) it is built
    unlocked, as before any lock: at worst twice."""
    try:
        fd = _lock_file(Path(cache_dir), digest, span)
    except OSError as exc:
        log.debug("%s: indexed without a lock between processes: %s", digest, exc)
        yield
        return
    try:
        _take(fd, digest, wait)
        yield
    finally:
        os.close(fd)  # and the lock with it


def _lock_file(cache_dir: Path, digest: str, span: int) -> int:
    directory = cache_dir / LEASE_DIR
    path = directory / f"{digest.replace(':', '-')}.index-{span}"
    try:
        directory.mkdir(exist_ok=True)
        return os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)  # flock needs no more


def _take(fd: int, digest: str, wait: float) -> None:
    """The lock, once whoever holds it lets go, or nothing after ``wait`` seconds."""
    started = time.monotonic()
    deadline, said = started + wait, started
    told = False
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            pass
        except OSError as exc:  # ENOLCK: this file system keeps no locks
            log.debug("%s: indexed without a lock between processes: %s", digest, exc)
            return
        if not told:
            log.info("%s: another process is indexing this layer; waiting for its index", digest)
            told = True
        now = time.monotonic()
        if now - said >= EVERY:
            # Said as progress: a mount waits for a server only as long as it hears some,
            # and the other process's pass can outlast its patience.
            said = now
            progress.info(
                "%s: waiting for another process's index, %.0f s so far", digest, now - started
            )
        if now >= deadline:
            log.warning(
                "%s: another process has been indexing this layer for over %.0f s;"
                " indexing it here as well",
                digest,
                wait,
            )
            return
        time.sleep(_POLL)
