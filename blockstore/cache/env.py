"""The one place that opens LMDB: map growth, other processes' growth, disk full.

LMDB's map is a fixed window onto the file; we start small and double it
when a write fills it (``MapFullError``), so a 100 GiB cache needs no
setting. When another process has grown the map, opening a transaction here
fails with ``MapResizedError`` and we adopt the new size. Changing the map
size needs every transaction of this process finished, so transactions hold
a shared gate and resizing takes it exclusively; a hit never waits on a
fetch, only (rarely) on a resize.

No ``writemap`` and no ``sync=False``: a SIGKILL or power loss at any moment
leaves a consistent cache. ``metasync=False`` (one fsync per commit instead
of two) keeps that: a power loss may undo the last commit, never half of it,
and a cache may forget a chunk.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import ClassVar, TypeVar

import lmdb

from blockstore.errors import CacheError

from .layout import ALL_DBS

log = logging.getLogger(__name__)

T = TypeVar("T")

INITIAL_MAP_SIZE = 256 << 20
# Below this much free space a failed commit is taken to be a full disk:
# LMDB reports a short write as EIO, not ENOSPC.
DISK_FULL_SLACK = 1 << 20


class DiskFull(CacheError):
    """A commit failed because the file system holding the cache is full."""


class _Gate:
    """Many holders at once, or one exclusive holder (writer-preferring).

    Shared holders must not nest: an exclusive waiter blocks new holders.
    The shared path is one plain lock round trip each way: it is on every
    read.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._holders = 0
        self._exclusive_waiting = 0
        self._exclusive = False

    def acquire_shared(self) -> None:
        with self._lock:
            while self._exclusive or self._exclusive_waiting:
                self._cond.wait()
            self._holders += 1

    def release_shared(self) -> None:
        with self._lock:
            self._holders -= 1
            if not self._holders and self._exclusive_waiting:
                self._cond.notify_all()

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        with self._lock:
            self._exclusive_waiting += 1
            while self._exclusive or self._holders:
                self._cond.wait()
            self._exclusive_waiting -= 1
            self._exclusive = True
        try:
            yield
        finally:
            with self._lock:
                self._exclusive = False
                self._cond.notify_all()


class CacheEnv:
    """An LMDB environment with its named databases, shared by threads and processes.

    Get one with ``CacheEnv.open``: LMDB must not be opened twice on one
    directory in one process (closing either would drop the other's file
    locks), so stores opened on the same directory share one environment.
    """

    _open: ClassVar[dict[tuple[int, int], CacheEnv]] = {}
    _open_lock: ClassVar[threading.Lock] = threading.Lock()

    @classmethod
    def open(cls, path: Path) -> CacheEnv:
        with cls._open_lock:
            try:
                path.mkdir(parents=True, exist_ok=True)
                st = path.stat()
            except OSError as exc:
                raise CacheError(f"cannot open the cache at {path}: {exc}") from exc
            key = (st.st_dev, st.st_ino)
            env = cls._open.get(key)
            if env is None:
                env = cls._open[key] = cls(path)
                env._key = key
            env._users += 1
            return env

    def __init__(self, path: Path):
        self.path = path
        self._users = 0
        self._key: tuple[int, int] | None = None
        try:
            data = path / "data.mdb"
            used = data.stat().st_size if data.exists() else 0
            map_size = INITIAL_MAP_SIZE
            while map_size < 2 * used:
                map_size *= 2
            self.env = lmdb.open(
                str(path),
                map_size=map_size,
                max_dbs=len(ALL_DBS),
                max_readers=1024,
                readahead=False,
                metasync=False,
                subdir=True,
            )
        except (OSError, lmdb.Error) as exc:
            raise CacheError(f"cannot open the cache at {path}: {exc}") from exc
        # Reader slots of killed processes would pin old pages forever.
        self.env.reader_check()
        self._gate = _Gate()
        self._write_lock = threading.Lock()
        self.dbs: dict[bytes, lmdb._Database] = {}

        def open_dbs(txn: lmdb.Transaction) -> None:
            for name in ALL_DBS:
                self.dbs[name] = self.env.open_db(name, txn=txn)

        self.write(open_dbs)

    def close(self) -> None:
        with self._open_lock:
            self._users -= 1
            if self._users > 0:
                return
            self._open.pop(self._key, None)
        with self._gate.exclusive():
            self.env.close()

    @contextmanager
    def reader(self, db: bytes | None = None) -> Iterator[lmdb.Transaction]:
        """A read transaction handing out zero-copy buffers, valid inside the block."""
        txn = self.begin_read(db)
        try:
            yield txn
        finally:
            self.end_read(txn)

    def begin_read(self, db: bytes | None = None) -> lmdb.Transaction:
        """Start a read transaction; pair it with ``end_read`` (the hit path's form)."""
        handle = self.dbs[db] if db is not None else None
        while True:
            self._gate.acquire_shared()
            try:
                return self.env.begin(db=handle, buffers=True)
            except lmdb.MapResizedError:
                self._gate.release_shared()
                self._adopt_map_size()
            except lmdb.Error as exc:
                self._gate.release_shared()
                raise CacheError(f"cache read failed: {exc}") from exc
            except BaseException:
                self._gate.release_shared()
                raise

    def end_read(self, txn: lmdb.Transaction) -> None:
        try:
            txn.abort()
        finally:
            self._gate.release_shared()

    def write(self, work: Callable[[lmdb.Transaction], T]) -> T:
        """Run ``work`` in a write transaction and commit it.

        ``work`` is run again from the start if the map had to grow, so it
        must keep its effects inside the transaction. Raises ``DiskFull``
        or ``CacheError``; the cache is left as of the last commit.
        """
        with self._write_lock:
            while True:
                self._gate.acquire_shared()
                try:
                    txn = self.env.begin(write=True, buffers=True)
                except lmdb.MapResizedError:
                    self._gate.release_shared()
                    self._adopt_map_size()
                    continue
                except lmdb.Error as exc:
                    self._gate.release_shared()
                    raise CacheError(f"cache write failed: {exc}") from exc
                try:
                    result = work(txn)
                    txn.commit()
                    return result
                except lmdb.MapFullError:
                    txn.abort()
                    grow = True
                except lmdb.Error as exc:
                    txn.abort()
                    raise self._write_error(exc) from exc
                except BaseException:
                    txn.abort()
                    raise
                finally:
                    self._gate.release_shared()
                if grow:
                    self._grow()

    def map_size(self) -> int:
        return self.env.info()["map_size"]

    def file_size(self) -> int:
        try:
            return (self.path / "data.mdb").stat().st_size
        except OSError:
            return 0

    def free_disk(self) -> int:
        st = os.statvfs(self.path)
        return st.f_bavail * st.f_frsize

    def _write_error(self, exc: lmdb.Error) -> CacheError:
        if self.free_disk() < DISK_FULL_SLACK:
            return DiskFull(f"the disk holding the cache at {self.path} is full")
        return CacheError(f"cache write failed: {exc}")

    def _grow(self) -> None:
        with self._gate.exclusive():
            new_size = self.env.info()["map_size"] * 2
            log.info("growing the cache map to %d MiB", new_size >> 20)
            self.env.set_mapsize(new_size)

    def _adopt_map_size(self) -> None:
        with self._gate.exclusive():
            self.env.set_mapsize(0)
            log.debug("another process grew the cache map; now %d MiB", self.map_size() >> 20)
