"""The one place that opens LMDB: map growth, renewal after damage, forks, reader slots, full disk.

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

The kernel's readahead stays on for the map. A chunk is nine contiguous pages,
and a blob's chunks were mostly stored side by side, so the read-around of a
page fault (after a reboot, every first touch is one) brings in the rest of
the chunk and its neighbours instead of one 4 KiB page per fault.

A cache is only a cache: a damaged file must cost its contents, never the
process. The file is measured before LMDB opens it (``damage.py``), and
LMDB's own corruption errors are caught wherever a transaction runs. Either
way the directory is moved aside with one log line, and an empty cache takes
its place. Where it cannot be moved (a mount point: a volume given to the
cache), a process that found the damage while using it goes on without the
cache, closed and taken for empty and read-only: every read from the source.
A forked child never touches its parent's environment (LMDB forbids it): it
closes the copy it inherited, which no transaction was using (forks wait for
those to end), and opens its own on first use.

A cache this process cannot write (``write_access.py``) is opened
read-only, without LMDB's lock file: it is never moved aside, and every
write is refused (``ReadOnlyCache``).

A command that only looks (``looking``: ``cache ls``, ``stats``, ``verify``,
``trace ls``, ``show`` and ``export``, ``mounts``) opens a current cache
read-only with LMDB's lock file, a reader like any other: py-lmdb opens named
databases of a writable environment only in a write transaction, which waits
for a process stopped while it holds the write lock. Its writes run first in a
read transaction (``_LookingTxn``); the first that would change something opens
the cache writable in its place, as any writer does, and runs again there from
the start (``_MovedTxn`` takes the databases it named for the new handle's).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from contextvars import ContextVar
from pathlib import Path
from typing import ClassVar, TypeVar

import lmdb

from blockstore.errors import CacheError
from blockstore.openers import processes_with_open

from .damage import directory_lock, file_damage, move_aside_unless_replaced
from .errors import (
    DAMAGE_ERRORS,
    RECORD_ERRORS,
    CacheDamaged,
    DiskFull,
    OtherFormat,
    ReadOnlyCache,
    handle_given_up,
    open_failure,
    reason,
)
from .gate import Gate
from .in_use import hold_in_use, keep_to_owner, make_cache_directory
from .layout import (
    ALL_DBS,
    CHUNK_SIZE,
    COMPACT_COPY,
    DB_META,
    FORMAT_VERSION,
    LMDB_DATA_FILE,
    LMDB_LOCK_FILE,
    U64,
    holds_cache,
    stored_format,
    upgraded_in_place,
)
from .refs import mark_images_pinned_whole
from .write_access import cannot_write, check_enterable, writer_of
from .write_lock_watch import WriteLockWatch, closes_left_running, interruptibly

log = logging.getLogger(__name__)

T = TypeVar("T")

INITIAL_MAP_SIZE = 256 << 20
# Below this much free space a failed commit is taken to be a full disk:
# LMDB reports a short write as EIO, not ENOSPC.
DISK_FULL_SLACK = 1 << 20
# Read transactions open at once across the processes of one cache. The
# server holds one per request being served from the cache, briefly; when
# they run out anyway, a reader waits up to READER_WAIT for a slot.
MAX_READERS = 8192
READER_WAIT = 5.0
# Why a handle is stale (``CacheEnv._stale``) other than damage: this process is a
# fork's child, or a failed write left the handle unfit (``handle_given_up``).
FORKED = "fork"
REOPEN = "reopen"


def _reserve_lock_file(path: Path) -> None:
    """Allocate every page of LMDB's lock file before LMDB maps it.

    LMDB keeps its reader table in a mapped file and writes slots through
    the map; a page the file system cannot supply at that moment (a full
    disk, a full tmpfs) is a SIGBUS. Allocated here, a full disk is an
    error instead. The size is LMDB's for ``MAX_READERS`` slots (a header
    of two cache lines, then 64 bytes a slot).
    """
    lock = path / LMDB_LOCK_FILE
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            size = max(128 + MAX_READERS * 64, os.fstat(fd).st_size)
            os.posix_fallocate(fd, 0, size)
        finally:
            os.close(fd)
    except OSError as exc:
        raise open_failure(path, exc) from exc


class _LookingTxn:
    """A read transaction standing in for a write transaction (``CacheEnv._look``): a
    put of the value already stored changes nothing and passes (an open finding the
    cache's format and cap as they are, a repair finding counts right); any other
    write raises ``lmdb.ReadonlyError``, as LMDB does in a read transaction."""

    def __init__(self, txn: lmdb.Transaction) -> None:
        self._txn = txn

    def __getattr__(self, name: str) -> object:
        return getattr(self._txn, name)

    def put(
        self, key: bytes, value: bytes, *, db: lmdb._Database | None = None, **flags: bool
    ) -> bool:
        if not flags and self._txn.get(key, db=db) == value:
            return True
        return self._txn.put(key, value, db=db, **flags)


class _MovedTxn:
    """A transaction of the writable handle that replaced one opened to look
    (``CacheEnv._become_writer``), taking the old handle's databases for its own: work
    that named a database before the change (in a closure, as most writes do) finds
    the same database after it."""

    def __init__(
        self, txn: lmdb.Transaction, moved_dbs: dict[lmdb._Database, lmdb._Database]
    ) -> None:
        self._txn = txn
        self._moved_dbs = moved_dbs

    def __getattr__(self, name: str) -> object:
        method = getattr(self._txn, name)
        if not callable(method):
            return method

        def on_moved_dbs(*args: object, **kwargs: object) -> object:
            args = tuple(self._moved_dbs.get(a, a) if _is_db(a) else a for a in args)
            kwargs = {k: self._moved_dbs.get(v, v) if _is_db(v) else v for k, v in kwargs.items()}
            return method(*args, **kwargs)

        return on_moved_dbs


def _is_db(value: object) -> bool:
    return isinstance(value, lmdb._Database)


def _lmdb_open(path: Path, *, readonly: bool, lock: bool) -> lmdb.Environment:
    """LMDB's environment at ``path`` as every open of this cache makes it: its map twice
    what the file holds; the kernel's readahead kept (a chunk's pages are faulted in
    together, bench/README.md); the meta page not flushed on its own (a crash may undo
    the last commit, never damage the file)."""
    return lmdb.open(
        str(path),
        map_size=_map_size(path),
        max_dbs=len(ALL_DBS),
        max_readers=MAX_READERS,
        readahead=True,
        metasync=False,
        subdir=True,
        readonly=readonly,
        lock=lock,
    )


def _map_size(path: Path) -> int:
    """The map to open ``path``'s file with: twice what it holds, or the initial size."""
    data = path / LMDB_DATA_FILE
    used = data.stat().st_size if data.exists() else 0
    map_size = INITIAL_MAP_SIZE
    while map_size < 2 * used:
        map_size *= 2
    return map_size


_looking: ContextVar[bool] = ContextVar("looking", default=False)


@contextmanager
def looking() -> Iterator[None]:
    """Within the block, a cache this process opens anew is opened to look: without a
    write transaction while the cache is current and nothing is written, so a command
    that only looks answers at once beside a process stopped while it holds the write
    lock (Ctrl-Z on a prefetch). A write that finds something to write still waits."""
    token = _looking.set(True)
    try:
        yield
    finally:
        _looking.reset(token)


_write_lock_watch = WriteLockWatch()
UPGRADE_WAIT = 2.0
"""Seconds an upgrade in place waits for other processes to let go of the cache before
it is refused as open in an older version's (``CacheEnv._lock_file_users``)."""


def format_refusal(path: Path, version: int, chunk_size: int) -> OtherFormat | None:
    """Why this version does not open the cache at ``path``, written with format
    ``version`` and ``chunk_size``-byte chunks; None if it does."""
    if version == FORMAT_VERSION and chunk_size == CHUNK_SIZE:
        return None
    ours = f"format {FORMAT_VERSION} with {CHUNK_SIZE}-byte chunks"
    if upgraded_in_place(version, chunk_size):
        return OtherFormat(
            f"the cache at {path} has format {version}, an older version's, which this "
            f"version brings to format {FORMAT_VERSION} in place, but cannot here: open it "
            "once where it can be written",
            older=True,
        )
    if version < FORMAT_VERSION:
        return OtherFormat(
            f"the cache at {path} has format {version}, an older version's; "
            f"this version needs {ours}",
            older=True,
        )
    whose = "a newer version's" if version > FORMAT_VERSION else "another build's"
    return OtherFormat(
        f"the cache at {path} has format {version} with {chunk_size}-byte chunks, "
        f"{whose}; this version needs {ours} and leaves it as it is: use "
        "that version, or another --cache-dir"
    )


class CacheEnv:
    """An LMDB environment with its named databases, shared by threads and processes.

    Get one with ``CacheEnv.open``: LMDB must not be opened twice on one
    directory in one process (closing either would drop the other's file
    locks), so stores opened on the same directory share one environment.
    """

    _open: ClassVar[dict[tuple[int, int], CacheEnv]] = {}
    _open_lock: ClassVar[threading.Lock] = threading.Lock()
    # Handles no longer open to new users, whose close has not ended yet.
    _closing: ClassVar[set[CacheEnv]] = set()

    @classmethod
    def open(
        cls, path: Path, *, offline: bool = False, replace_older: bool = False, goes_on: bool = True
    ) -> CacheEnv:
        """The environment of ``path``, opened once per process.

        A damaged cache is moved aside; online an empty one replaces it,
        offline (nothing else to read from) ``CacheDamaged`` is raised. A
        cache of an older format is moved aside and replaced only by an opener
        that will fill it (``replace_older``: serving or prefetching, with the
        registry answering), and only while no other process has it open; any
        other opener, and every opener of a newer version's cache, is refused
        with ``OtherFormat``, the cache left as it is. ``goes_on``: see ``lost``.
        """
        with cls._open_lock:
            key = cls._directory(path)
            env = cls._open.get(key)
            if env is None:
                env = cls(path, offline=offline, replace_older=replace_older, goes_on=goes_on)
                key = cls._directory(path)  # a new directory if the old was moved aside
                cls._open[key] = env
                env._key = key
            env._users += 1
            return env

    def replaced(self) -> bool:
        """Whether the directory this handle opened is no longer at its path (deleted,
        moved, or another made in its place): what is stored then goes to a file no
        other process opening the path sees."""
        try:
            st = self.path.stat()
        except OSError:
            return True
        return self._key is not None and (st.st_dev, st.st_ino) != self._key

    @staticmethod
    def _directory(path: Path) -> tuple[int, int]:
        check_enterable(path)
        if path.exists() and not path.is_dir():
            raise CacheError(f"cannot open the cache at {path}: it is not a directory")
        try:
            make_cache_directory(path)
            st = path.stat()
        except OSError as exc:
            raise open_failure(path, exc) from exc
        return st.st_dev, st.st_ino

    def __init__(
        self,
        path: Path,
        *,
        offline: bool = False,
        replace_older: bool = False,
        goes_on: bool = True,
    ) -> None:
        self.path = path
        self._users = 0
        self._key: tuple[int, int] | None = None
        self._gate = Gate()
        self._write_lock = threading.Lock()
        self.dbs: dict[bytes, lmdb._Database] = {}
        self.env: lmdb.Environment | None = None
        self._in_use: int | None = None  # the descriptor holding ``hold_in_use``'s lock
        # Set when this handle must not be used again: the file was found damaged,
        # or this process is a fork's child. The next transaction reopens first.
        self._stale: str | None = None
        # Why this process no longer uses the cache: damaged, it could not be moved aside.
        self.lost: str | None = None
        # Whether this process goes on without a lost cache (a server), warned of once;
        # else (a command looking after the cache) the loss is its error, said once.
        self.goes_on = goes_on
        self.moved_aside: list[str] = []  # what damage this process found and moved away
        # The databases of the handle opened to look, and this one's in their place.
        self._moved_dbs: dict[lmdb._Database, lmdb._Database] = {}
        checked = self._directory(path)  # the directory about to be judged
        self.read_only_because = cannot_write(path)
        self.read_only = self.read_only_because is not None
        # Opened to look (``looking``): read-only with LMDB's lock file while nothing
        # needs writing, writable from the first write that does (``_become_writer``).
        self.looking = _looking.get() and not self.read_only
        if self.read_only:
            self._open_env()  # damage or another format is refused, never moved aside
            return
        keep_to_owner(path)
        try:
            self._open_env()
        except OtherFormat as exc:
            self._replace_older(exc, checked, offline=offline, replace=replace_older)
        except CacheDamaged as exc:
            self._replace(exc, checked, "damaged", offline=offline)

    def _replace_older(
        self, exc: OtherFormat, checked: tuple[int, int], *, offline: bool, replace: bool
    ) -> None:
        """Move an older version's cache aside and start anew, if this opener may and no
        other process (an older server or mount, which takes no lock this version
        knows) has it open; else refuse, saying what to do."""
        if not exc.older:
            raise exc
        if offline:
            raise OtherFormat(
                f"{exc}; offline it is left as it is: a serve, mount or prefetch with the "
                "registry reachable moves it aside and starts a new cache",
                older=True,
            ) from None
        if not replace:
            raise OtherFormat(
                f"{exc}; it is left as it is until a serve, mount or prefetch moves it "
                "aside and starts a new cache",
                older=True,
            ) from None
        users = processes_with_open([str(self.path / LMDB_LOCK_FILE)])
        if users:
            raise OtherFormat(
                f"{exc}; it is open in {', '.join(users)}: stop the older version's servers "
                "and mounts first (or give another --cache-dir), as it cannot be replaced "
                "under them",
                older=True,
            ) from None
        self._replace(exc, checked, "old", offline=False)

    def _replace(
        self, exc: CacheError, checked: tuple[int, int], label: str, *, offline: bool
    ) -> None:
        """Move the cache aside (``label``) and, online, open an empty one in its place."""
        aside = self._discard(str(exc), label, checked)
        if aside is None and not offline:
            # Another process opening it at the same time moved it aside first, and
            # may have started the new cache already: that is the one to open.
            self._open_env()
            log.info("%s: another process moved it aside; using the new cache", exc)
            return
        if offline:
            raise CacheDamaged(
                f"{exc}: moved it to {aside or 'a name of its own, by another process'}; "
                "offline, there is nothing else to read"
            ) from exc
        try:
            self._open_env()
        except CacheError as again:
            raise type(again)(f"{exc}: moved it to {aside}, and {again}") from again
        if label == "old":
            log.warning(
                "%s: moved it to %s and started an empty cache; delete that directory once "
                "no older version needs it",
                exc,
                aside,
            )
        else:
            log.warning("%s: moved it to %s and started an empty cache", exc, aside)

    def _open_env(self) -> None:
        """Open LMDB on the directory, refusing a file that would fault once mapped."""
        path = self.path
        if self.read_only:
            if not holds_cache(path):
                raise ReadOnlyCache.at(path, self.read_only_because)
            writer = writer_of(path)
            if writer is not None:
                raise CacheError(
                    f"the cache at {path} cannot be written here, and {writer} has it open "
                    "for writing (through another mount, or as another user): read without "
                    "its lock, it is safe only where nothing writes to it; stop that process, "
                    "or use the cache where it can be written"
                )
            if (path / LMDB_DATA_FILE).stat().st_size == 0:
                # LMDB writes a new file's first pages; read-only, it cannot map one.
                raise CacheError(
                    f"the cache at {path} is empty (its {LMDB_DATA_FILE} is 0 bytes) and "
                    f"cannot be started here ({self.read_only_because}): open it once "
                    "where it can be written, or use another --cache-dir"
                )
        in_use = hold_in_use(path, read_only=self.read_only)
        try:
            if self.read_only:
                self._open_lmdb(path)
            else:
                (path / COMPACT_COPY).unlink(missing_ok=True)
                with directory_lock(path, lambda: _write_lock_watch.waiting(path)):
                    if not (self.looking and self._open_to_look(path)):
                        self.looking = False
                        self._open_lmdb(path)
        except BaseException:
            os.close(in_use)
            raise
        self._in_use = in_use

    def _open_lmdb(self, path: Path) -> None:
        """Writable, under the cache directory's lock, taken in turn by this version's
        openers: one bringing an older format up in place (``_upgrade``) then finds
        LMDB's lock file open only in processes past their open, an older version's,
        not in one of this version's waiting to read the format it is writing."""
        why = file_damage(path)
        if why is not None:
            raise CacheDamaged(f"the cache at {path} is damaged: {why}")
        if not self.read_only:
            _reserve_lock_file(path)
        try:
            # No lock file to write: ``writer_of`` found no writer to share it with.
            env = _lmdb_open(path, readonly=self.read_only, lock=not self.read_only)
        except DAMAGE_ERRORS as exc:
            raise CacheDamaged(f"the cache at {path} is damaged: {exc}") from exc
        except (OSError, lmdb.Error) as exc:
            raise CacheError(f"cannot open the cache at {path}: {reason(exc)}") from exc
        try:
            dbs = self._open_dbs(env)
        except CacheError:
            env.close()
            raise
        except lmdb.NotFoundError as exc:
            env.close()
            raise CacheDamaged(f"the cache at {path} is damaged: {exc}") from exc
        except DAMAGE_ERRORS as exc:
            env.close()
            raise CacheDamaged(f"the cache at {path} is damaged: {exc}") from exc
        except lmdb.Error as exc:
            env.close()
            raise CacheError(f"cannot open the cache at {path}: {reason(exc)}") from exc
        self.env = env
        self.dbs.clear()
        self.dbs.update(dbs)

    def _open_to_look(self, path: Path) -> bool:
        """Open LMDB read-only but with its lock file, a reader among the writers, if the
        cache is of this format with every database made: opening it then takes no write
        transaction, so no wait for a writer's lock. False, nothing left open, where
        opening must write (a new, older or damaged cache: the writable open makes,
        upgrades, refuses or moves it aside as ever)."""
        if file_damage(path) is not None or (path / LMDB_DATA_FILE).stat().st_size == 0:
            return False
        _reserve_lock_file(path)
        try:
            env = _lmdb_open(path, readonly=True, lock=True)
        except (OSError, lmdb.Error):
            return False
        try:
            # Each opened in a transaction of py-lmdb's own (see ``_open_dbs``).
            meta = env.open_db(DB_META, create=False)
            with env.begin() as txn:
                current = format_refusal(path, *stored_format(txn, meta)) is None
            dbs = {name: env.open_db(name, create=False) for name in ALL_DBS} if current else {}
        except (lmdb.Error, *RECORD_ERRORS):
            dbs = {}
        if not dbs:
            env.close()
            return False
        self.env = env
        self.dbs.clear()
        self.dbs.update(dbs)
        return True

    def _open_dbs(self, env: lmdb.Environment) -> dict[bytes, lmdb._Database]:
        """The named databases, made where missing unless read-only. A cache of another
        format is refused before any is made (one it would lack is no business of
        this version's), or brought to this format in place where it can be."""
        if self.read_only:
            # Each opened in a transaction of py-lmdb's own: one opened in a read
            # transaction of ours is not usable after it.
            meta = env.open_db(DB_META, create=False)
            with env.begin() as txn:
                version, chunk_size = stored_format(txn, meta)
            if not upgraded_in_place(version, chunk_size):
                self._refuse_another_format(version, chunk_size)
            try:
                return {name: env.open_db(name, create=False) for name in ALL_DBS}
            except lmdb.NotFoundError:
                # An older format lacking a database this one reads (3: parts) must be
                # brought up first; one holding them all is read as it is.
                self._refuse_another_format(version, chunk_size)
                raise
        # Reader slots of killed processes would pin old pages forever.
        env.reader_check()
        # A stopped process holding the write lock must not hold a Ctrl-C with it.
        dbs, upgraded = interruptibly(lambda: self._make_dbs(env))
        if upgraded is not None:
            log.warning(
                "the cache at %s has format %d, an older version's: brought it to format %d "
                "in place, all it held kept (versions that need format %d no longer use it)",
                self.path,
                upgraded,
                FORMAT_VERSION,
                upgraded,
            )
        return dbs

    def _make_dbs(self, env: lmdb.Environment) -> tuple[dict[bytes, lmdb._Database], int | None]:
        """The named databases, made where missing, in one write transaction; and the
        older format brought up to this one in it, if any."""
        with _write_lock_watch.waiting(self.path), env.begin(write=True) as txn:
            version, chunk_size = stored_format(txn, env.open_db(DB_META, txn=txn))
            upgrading = upgraded_in_place(version, chunk_size)
            if not upgrading:
                self._refuse_another_format(version, chunk_size)  # aborts the transaction
            dbs = {name: env.open_db(name, txn=txn) for name in ALL_DBS}
            if upgrading:
                self._upgrade(txn, dbs, version)
        return dbs, version if upgrading else None

    def _refuse_another_format(self, version: int, chunk_size: int) -> None:
        refusal = format_refusal(self.path, version, chunk_size)
        if refusal is not None:
            raise refusal

    def _upgrade(
        self, txn: lmdb.Transaction, dbs: dict[bytes, lmdb._Database], version: int
    ) -> None:
        """Bring a cache of ``version`` to this format, in the transaction that made the
        databases it lacked; not under another process, an older version's while the
        format is older (this version's bring it up before they use it), which would
        go on beside records it does not know."""
        users = self._lock_file_users()
        if users:
            raise CacheError(
                f"the cache at {self.path} has format {version}, an older version's, which "
                f"this version brings to format {FORMAT_VERSION} in place; it is open in "
                f"{', '.join(users)}: stop the older version's servers and mounts first "
                "(or give another --cache-dir)"
            )
        mark_images_pinned_whole(txn, dbs)
        txn.put(b"format", U64.pack(FORMAT_VERSION), db=dbs[DB_META])

    def _lock_file_users(self) -> list[str]:
        """The other processes with LMDB's lock file open, waited for ``UPGRADE_WAIT``
        seconds at most to go: one dying as it held the write lock passes the lock on
        before its files are closed, and one of them seen then is no older version's
        server using the cache."""
        deadline = time.monotonic() + UPGRADE_WAIT
        while (users := processes_with_open([str(self.path / LMDB_LOCK_FILE)])) and (
            time.monotonic() < deadline
        ):
            time.sleep(0.05)
        return users

    def _discard(
        self, why: str, label: str = "damaged", judged: tuple[int, int] | None = None
    ) -> Path | None:
        """Move the directory aside, if it is still the one found damaged (``judged``,
        else the one this environment opened). Where it went, if it was moved."""
        self.moved_aside.append(why)
        return move_aside_unless_replaced(self.path, why, label, judged or self._key)

    def ask(self, question: Callable[[], T], empty: Callable[[], T] | None = None) -> T:
        """Answer from the cache; if that finds it damaged, from the empty cache that
        replaces it (the damaged one is moved aside on the way). Where it could not be
        moved (``lost``), ``empty`` gives an empty cache's answer to a process that goes
        on without it; without ``empty``, or for one that does not, that is an error."""
        try:
            return question()
        except CacheDamaged:
            self.renew()
            if self.lost is not None and empty is not None and self.goes_on:
                return empty()
            return question()

    def renew(self) -> None:
        """Replace a handle marked stale now, rather than at the next transaction."""
        if self._stale is not None:
            self._renew()

    def _renew(self) -> None:
        """Replace a handle marked stale: after damage, with an empty cache; after a
        failed write, with a new handle on the same file (``_reopen``); in a fork's
        child, with the child's own handle on the same file."""
        with self._gate.exclusive():
            why = self._stale
            if why is None:
                return  # another thread renewed it
            if why == REOPEN:
                self._reopen()
                return
            if why != FORKED:
                self._close_env()
                try:
                    aside = self._discard(why)
                except CacheError as exc:
                    self._go_on_without(
                        f"the cache at {self.path} is damaged: {exc}",
                        "it is damaged and cannot be moved aside",
                    )
                    return
                log.warning(
                    "the cache at %s is damaged (%s): moved it to %s, going on with an empty cache",
                    self.path,
                    why,
                    aside or "(moved already)",
                )
            self._open_env()
            with self._open_lock:
                self._open.pop(self._key, None)
                self._key = self._directory(self.path)
                self._open[self._key] = self
            self._stale = None

    def _reopen(self) -> None:
        """Open the file again after a write failed and left this handle unfit, judging
        anew whether this process may write it. The file holds the last commit, so what
        it holds is served on; on a disk that turned read-only it is read read-only from
        then on, as one found on a read-only file system at the start, said once."""
        self._stale = None
        self._close_env()
        self.read_only_because = cannot_write(self.path)
        self.read_only = self.read_only_because is not None
        try:
            self._open_env()
        except CacheError as exc:
            self._go_on_without(
                f"the cache at {self.path} could not be opened again after a failed write: {exc}",
                "it could not be opened again",
            )
            return
        log.warning(
            "a write to the cache at %s failed and left this process's handle on it "
            "unusable: opened it again%s",
            self.path,
            f", read-only ({self.read_only_because}): until restarted, this process "
            "serves what it holds and keeps nothing new"
            if self.read_only
            else "",
        )

    def _go_on_without(self, lost: str, read_only_because: str) -> None:
        """Go on without a cache that cannot be used (damaged and not movable aside: a
        mount point, or a directory in one this user cannot write; or not reopened):
        closed, it is taken for empty and read-only, so reads come from the source and
        nothing is kept, rather than every read failing on it."""
        self.lost = lost
        self.read_only = True
        self.read_only_because = read_only_because
        self._stale = None
        if not self.goes_on:
            return
        log.warning(
            "%s; until restarted, this process goes on without it: nothing is read from it "
            "or kept in it",
            self.lost,
        )

    def _close_env(self) -> None:
        if self.env is not None:
            self.env.close()
            self.env = None
        self._let_go()

    def _let_go(self) -> None:
        """Drop this handle's claim on the file (``hold_in_use``)."""
        if self._in_use is not None:
            os.close(self._in_use)
            self._in_use = None

    def damaged(self, exc: Exception) -> CacheError:
        """The error to raise for ``exc``; damage, or a handle a failed write left unfit,
        also marks the environment for renewal."""
        if handle_given_up(exc):
            if self._stale is None:
                self._stale = REOPEN
            return CacheError(f"cache write failed: {reason(exc)}; opening the cache again")
        if isinstance(exc, DAMAGE_ERRORS + RECORD_ERRORS):
            if self._stale is None and not self.read_only:  # nothing to move aside then
                self._stale = f"{type(exc).__name__}: {exc}"
            return CacheDamaged(f"the cache at {self.path} is damaged: {exc}")
        return CacheError(f"cache read failed: {exc}")

    def forked(self) -> None:
        """In a fork's child: let go of the parent's handle, open our own on next use.

        No transaction was open at the fork (``_before_fork`` waited them
        out), so closing the handle here frees only this process's memory
        and descriptors; the parent's reader slots and locks are untouched.
        """
        if self.env is not None:
            self.env.close()
        self.env = None
        self._let_go()  # the parent's claim: the child's descriptor of it, not the lock
        self._gate = Gate()
        self._write_lock = threading.Lock()
        self._stale = FORKED if self.lost is None else None  # a lost cache stays closed

    def close(self) -> None:
        with self._open_lock:
            self._users -= 1
            if self._users > 0:
                return
            self._open.pop(self._key, None)
            self._closing.add(self)
        try:
            with self._gate.exclusive():
                self._close_env()
        finally:
            with self._open_lock:
                self._closing.discard(self)

    @contextmanager
    def reader(self, db: bytes | None = None) -> Iterator[lmdb.Transaction]:
        """A read transaction handing out zero-copy buffers, valid inside the block."""
        txn = self.begin_read(db)
        try:
            yield self._as_opened(txn)
        except (lmdb.Error, *RECORD_ERRORS) as exc:
            raise self.damaged(exc) from exc
        finally:
            self.end_read(txn)

    def begin_read(self, db: bytes | None = None) -> lmdb.Transaction:
        """Start a read transaction; pair it with ``end_read`` (the hit path's form)."""
        deadline = None
        while True:
            if self._stale is not None:
                self._renew()
            gate = self._gate
            gate.holders.append(None)  # acquire_shared, inline: this is every hit
            if gate.blocked:
                gate.release_shared()
                gate.wait_shared()
            try:
                if self.env is None:
                    raise self._closed()
                return self.env.begin(db=self.dbs[db] if db is not None else None, buffers=True)
            except lmdb.MapResizedError:
                self._gate.release_shared()
                self._adopt_map_size()
            except lmdb.ReadersFullError as exc:
                self._gate.release_shared()
                deadline = deadline or time.monotonic() + READER_WAIT
                if time.monotonic() > deadline:
                    raise CacheError(f"cache read failed: {exc}") from exc
                self._wait_for_reader()
            except lmdb.Error as exc:
                self._gate.release_shared()
                raise self.damaged(exc) from exc
            except BaseException:
                self._gate.release_shared()
                raise

    def _closed(self) -> CacheError:
        if self.lost is not None:
            return CacheDamaged(self.lost)
        return CacheError(f"the cache at {self.path} is closed")

    def _wait_for_reader(self) -> None:
        """Reader slots are all taken: free those of dead processes, then give others a moment."""
        with suppress(lmdb.Error):
            self.env.reader_check()
        time.sleep(0.002)

    def end_read(self, txn: lmdb.Transaction) -> None:
        try:
            txn.abort()
        finally:
            gate = self._gate
            gate.holders.pop()  # release_shared, inline: this is every hit
            if gate.blocked:
                gate.wake()

    def write(self, work: Callable[[lmdb.Transaction], T]) -> T:
        """Run ``work`` in a write transaction and commit it.

        ``work`` is run again from the start if the map had to grow, and, in a
        cache opened to look, after a first try in a read transaction that
        stops at its first change (``_look``): it must keep its effects inside
        the transaction, and log what it did only after its writes. Raises
        ``DiskFull``, ``CacheDamaged`` or ``CacheError``; the cache is left as
        of the last commit.
        """
        if self._stale is not None:
            self._renew()
        if self.read_only:
            raise ReadOnlyCache.at(self.path, self.read_only_because)
        if self.looking:
            try:
                return self._look(work)
            except lmdb.ReadonlyError:
                self._become_writer()
        with self._write_lock:
            while True:
                self._gate.acquire_shared()
                try:
                    if self.env is None:
                        raise self._closed()
                    with _write_lock_watch.waiting(self.path):
                        txn = self.env.begin(write=True, buffers=True)
                except lmdb.MapResizedError:
                    self._gate.release_shared()
                    self._adopt_map_size()
                    continue
                except lmdb.Error as exc:
                    self._gate.release_shared()
                    raise self.damaged(exc) from exc
                except BaseException:
                    self._gate.release_shared()
                    raise
                try:
                    result = work(self._as_opened(txn))
                    txn.commit()
                    return result
                except lmdb.MapFullError:
                    txn.abort()
                    grow = True
                except lmdb.Error as exc:
                    txn.abort()
                    raise self._write_error(exc) from exc
                except RECORD_ERRORS as exc:
                    txn.abort()
                    raise self.damaged(exc) from exc
                except BaseException:
                    txn.abort()
                    raise
                finally:
                    self._gate.release_shared()
                if grow:
                    self._grow()

    def _look(self, work: Callable[[lmdb.Transaction], T]) -> T:
        """``work`` run in a read transaction: what it returns where it writes nothing (an
        open finding the cache current); ``lmdb.ReadonlyError`` where it would write. The
        transaction may be the writable handle's already (another thread's write made it
        so after this one saw the cache opened to look): it takes the databases named
        before for that handle's, as a writer's does."""
        txn = self.begin_read()
        try:
            return work(_LookingTxn(self._as_opened(txn)))  # type: ignore[arg-type]
        except lmdb.ReadonlyError:
            raise
        except (lmdb.Error, *RECORD_ERRORS) as exc:
            raise self.damaged(exc) from exc
        finally:
            self.end_read(txn)

    def _become_writer(self) -> None:
        """Open the cache writable in place of the handle opened to look, as every writer
        opens it (waiting for its write lock), once a write finds something to write."""
        with self._gate.exclusive():
            if not self.looking:
                return  # another thread did
            self.looking = False
            looked = dict(self.dbs)
            self._close_env()
            try:
                self._open_env()
            except CacheDamaged as exc:
                self._stale = str(exc)  # moved aside at the next transaction, as any damage
                raise
            self._moved_dbs = {looked[name]: self.dbs[name] for name in looked}

    def _as_opened(self, txn: lmdb.Transaction) -> lmdb.Transaction:
        """``txn``, taking the databases of a handle opened to look for this one's, once
        this one replaced it (``_become_writer``)."""
        if not self._moved_dbs:
            return txn
        return _MovedTxn(txn, self._moved_dbs)  # type: ignore[return-value]

    def write_lock_wait(self) -> float:
        """Seconds a write of this process has been waiting for the cache's write lock
        (0 when none waits): another process's transaction, or a stopped process."""
        return _write_lock_watch.longest(self.path)

    def map_size(self) -> int:
        return self.env.info()["map_size"]

    def file_size(self) -> int:
        try:
            return (self.path / LMDB_DATA_FILE).stat().st_size
        except OSError:
            return 0

    def free_disk(self) -> int:
        st = os.statvfs(self.path)
        return st.f_bavail * st.f_frsize

    def _write_error(self, exc: lmdb.Error) -> CacheError:
        if isinstance(exc, DAMAGE_ERRORS) or handle_given_up(exc):
            return self.damaged(exc)  # which tells the two apart
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


def in_use_at_exit() -> bool:
    """Whether a thread of this process may be inside LMDB, or about to start, as the
    process ends: a cache still open or closing, a close given up on writes stuck
    behind a write lock another process holds (``closes_left_running``: it goes on
    once the lock is let go, starting threads and closing the cache), or a wait for
    that lock (one whose wait a signal ended). The interpreter's teardown must not run
    then: a thread started during it crashes as it starts (its state freed under it),
    and one coming back from a C call is ended from within (``pthread_exit``)."""
    if CacheEnv._open or CacheEnv._closing:
        return True
    return _write_lock_watch.any_waiting() or closes_left_running()


# A fork must not copy an open transaction into the child: closing the child's copy
# of the environment would then end it, and free the parent's reader slot with it.
_forking: list[CacheEnv] = []


def _before_fork() -> None:
    _forking[:] = list(CacheEnv._open.values())
    for env in _forking:
        env._gate.acquire_exclusive()


def _after_fork_in_parent() -> None:
    for env in _forking:
        env._gate.release_exclusive()
    _forking.clear()


def _after_fork_in_child() -> None:
    _write_lock_watch.forked()
    CacheEnv._open_lock = threading.Lock()
    CacheEnv._closing.clear()
    _forking.clear()
    for env in CacheEnv._open.values():
        env.forked()


os.register_at_fork(
    before=_before_fork, after_in_parent=_after_fork_in_parent, after_in_child=_after_fork_in_child
)
