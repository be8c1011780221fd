"""Give a cache's free pages back to the disk: ``blockstore cache compact``.

LMDB reuses the pages that eviction and ``cache rm`` free, but never
shortens its file, so ``data.mdb`` keeps the largest size it ever had.
Compaction writes a copy holding only the pages in use (LMDB's own compacting
copy, from one read transaction), makes it durable, and renames it over the
original: a crash at any step leaves either the old file or the new one,
never a mix, and at worst a stray copy that the next compaction removes.

Every process with the cache open holds a shared lock on ``data.mdb``
(``in_use.hold_in_use``); compaction takes it exclusively and without waiting,
so it runs only on a cache nobody is using, and says who is when it cannot.
An older version's process, which takes no such lock, is found by LMDB's
lock file, which it has open (a process of this version waiting for the
lock has opened ``data.mdb`` alone). A process that opens the cache
meanwhile waits for the new file.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from dataclasses import dataclass
from pathlib import Path

import lmdb

from blockstore.errors import CacheError
from blockstore.openers import processes_with_open
from blockstore.progress import human

from .damage import file_damage
from .env import format_refusal
from .errors import DAMAGE_ERRORS, DiskFull, ReadOnlyCache, reason
from .layout import ALL_DBS, DB_META, LMDB_DATA_FILE, LMDB_LOCK_FILE, stored_format
from .layout import COMPACT_COPY as COPY_NAME
from .leases import LEASE_DIR
from .write_access import cannot_write


class CacheBusy(CacheError):
    """The cache is open in other processes, so its file cannot be replaced."""


@dataclass(frozen=True)
class Compacted:
    before: int  # bytes of data.mdb before
    after: int  # and after


def compact(path: Path) -> Compacted:
    """Rewrite the cache at ``path`` without its free pages; refuse one in use."""
    data = path / LMDB_DATA_FILE
    try:
        fd = os.open(data, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise CacheError(f"no cache at {path}: nothing was ever kept there") from None
    except OSError as exc:
        raise CacheError(f"cannot open the cache at {path}: {reason(exc)}") from exc
    try:
        if why := cannot_write(path):
            raise ReadOnlyCache.at(path, why)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise CacheBusy(_busy(path, fd)) from None
        if os.fstat(fd).st_ino != os.stat(data).st_ino:
            raise CacheBusy(f"the cache at {path} was replaced meanwhile: try again")
        # A version of this program older than the lock holds the file open without it.
        users = processes_with_open([str(path / LMDB_LOCK_FILE)])
        if users:
            raise CacheBusy(
                f"the cache at {path} is open in {', '.join(users)}, which take no lock on "
                "it (an older version): stop them, then compact it"
            )
        why = file_damage(path)
        if why is not None:
            raise CacheError(
                f"the cache at {path} is damaged ({why}): any other cache command moves it aside"
            )
        before = os.fstat(fd).st_size
        _write_copy(path, before)
        # The copy is locked before it is data.mdb, so no process maps it before it is
        # durable. LMDB's lock file stays: nobody has it open now, so the next opener
        # resets its reader table for the new file; removed, it would have to be made
        # again, which a disk filled meanwhile refuses (every open would then fail).
        copy = os.open(path / COPY_NAME, os.O_RDONLY | os.O_CLOEXEC)
        try:
            fcntl.flock(copy, fcntl.LOCK_EX)
            os.replace(path / COPY_NAME, data)
            _sync_directory(path)
            _remove_leases(path)
        except OSError as exc:  # a disk gone read-only: the next opener removes the copy
            raise CacheError(f"compacting the cache at {path} failed: {reason(exc)}") from exc
        finally:
            os.close(copy)
        return Compacted(before, data.stat().st_size)
    finally:
        os.close(fd)  # drops the lock: openers waiting on the old file look again


def _write_copy(path: Path, size: int) -> None:
    """LMDB's compacting copy of the cache, durable, as ``COPY_NAME`` beside it."""
    copy = path / COPY_NAME
    copy.unlink(missing_ok=True)  # a crashed compaction's
    try:
        env = lmdb.open(str(path), map_size=max(size, 1 << 20), max_dbs=len(ALL_DBS), readonly=True)
    except lmdb.Error as exc:
        raise CacheError(f"cannot open the cache at {path}: {exc}") from exc
    try:
        _refuse_a_newer_format(env, path)
        need = _copy_size(env)
        out = os.open(copy, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        try:
            env.copyfd(out, compact=True)
            os.fsync(out)
        finally:
            os.close(out)
    except (OSError, lmdb.Error) as exc:
        # A disk gone read-only keeps the copy too: the next process to open the cache
        # there removes it.
        with contextlib.suppress(OSError):
            copy.unlink(missing_ok=True)
        if isinstance(exc, DAMAGE_ERRORS):
            # Pages the copy walks, which no open reads: file_damage cannot see them.
            raise CacheError(
                f"the cache at {path} is damaged ({exc}): `blockstore cache verify` moves "
                "it aside and starts an empty cache"
            ) from exc
        if getattr(exc, "errno", None) == errno.ENOSPC or "No space left" in str(exc):
            raise DiskFull(
                f"no room beside the cache at {path} for its compacted copy (it needs "
                f"about {human(need)} free, the pages in use); the cache is unchanged"
            ) from exc
        raise CacheError(f"compacting the cache at {path} failed: {exc}") from exc
    finally:
        env.close()


def _refuse_a_newer_format(env: lmdb.Environment, path: Path) -> None:
    """Refuse a cache of a newer version's format (or another chunk size): what its file
    may become is that version's to say. An older version's is compacted, its records
    kept as they are."""
    try:
        meta = env.open_db(DB_META, create=False)
    except lmdb.NotFoundError:
        return  # made and never written to: this version's
    with env.begin() as txn:
        refusal = format_refusal(path, *stored_format(txn, meta))
    if refusal is not None and not refusal.older:
        raise refusal


def _copy_size(env: lmdb.Environment) -> int:
    """The bytes of the compacted copy: LMDB's two meta pages and the pages of every tree,
    which are all the copy writes (the free pages are what it leaves out)."""
    stat = env.stat()
    pages = 2 + _tree_pages(stat)
    with env.begin() as txn:
        for name in ALL_DBS:
            try:
                db = env.open_db(name, txn=txn, create=False)
            except lmdb.NotFoundError:
                continue
            pages += _tree_pages(txn.stat(db))
    return pages * stat["psize"]


def _tree_pages(stat: dict[str, int]) -> int:
    return stat["branch_pages"] + stat["leaf_pages"] + stat["overflow_pages"]


def _remove_leases(path: Path) -> None:
    """Remove the lease files (``leases.py``) of every blob ever fetched, which their
    users make and never remove: no process has the cache open now, so none holds
    one, and the next to fetch makes its own. One that cannot go costs only its inode."""
    with contextlib.suppress(OSError), os.scandir(path / LEASE_DIR) as entries:
        for entry in entries:
            with contextlib.suppress(OSError):
                os.unlink(entry.path)


def _sync_directory(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _busy(path: Path, fd: int) -> str:
    """Why the cache whose ``data.mdb`` is ``fd`` cannot be compacted now, naming who holds
    it: the exclusive holder is another compaction (or a failed first command removing
    the cache it made), waited for; the shared ones are servers and mounts, stopped."""
    holders = _holders(fd)
    if exclusive := sorted(pid for pid, alone in holders.items() if alone):
        return (
            f"the cache at {path} is being compacted by {_named(exclusive)} (or removed "
            "by a command that made it and failed): wait for it to end"
        )
    return (
        f"the cache at {path} is in use by {_named(sorted(holders))}: stop its servers and "
        "unmount its mounts, then compact it"
    )


def _holders(fd: int) -> dict[int, bool]:
    """The processes holding a lock on the file of ``fd``, as ``/proc/locks`` names them:
    each with whether its lock is exclusive."""
    st = os.fstat(fd)
    inode = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    holders: dict[int, bool] = {}
    try:
        with open("/proc/locks") as locks:
            for line in locks:
                fields = line.split()
                if len(fields) > 5 and fields[1] == "FLOCK" and fields[5] == inode:
                    holders[int(fields[4])] = fields[3] == "WRITE"
    except (OSError, ValueError):
        pass
    holders.pop(os.getpid(), None)
    return holders


def _named(pids: list[int]) -> str:
    if not pids:
        return "another process"
    return ", ".join(f"pid {pid} ({_command(pid)})" for pid in pids)


COMMAND_SHOWN = 80
"""Characters of a blocking process's command line that a message shows."""


def _command(pid: int) -> str:
    """The command line of ``pid``, cut after a whole word if long ("?" if unknown)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            words = f.read().split(b"\0")
    except OSError:
        return "?"
    text = " ".join(w.decode(errors="replace") for w in words if w) or "?"
    if len(text) <= COMMAND_SHOWN:
        return text
    return text[: COMMAND_SHOWN + 1].rsplit(" ", 1)[0][:COMMAND_SHOWN] + " ..."
