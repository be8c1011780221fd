"""Who may write a cache: whether this process can, and whether another one does.

A cache this process cannot write (a read-only file system, as a pre-warmed
cache shipped on a read-only volume is, or another user's directory) is
opened read-only, without LMDB's lock file, which it could not write: it is
never moved aside, and every write is refused (``ReadOnlyCache``). That is
safe only with no writer beside it, so one found holding the cache open
through another path is named and the open refused.
"""

from __future__ import annotations

import errno
import fcntl
import os
import pwd
import stat
import struct
from pathlib import Path

from blockstore.errors import CacheError

from .errors import reason
from .layout import LMDB_DATA_FILE, LMDB_LOCK_FILE

_FLOCK = struct.Struct("hhqqi4x")  # struct flock: type, whence, start, length, pid


def cannot_write(path: Path) -> str | None:
    """Why this process cannot, or must not, write the existing cache at ``path``, or
    None if it may: a read-only file system (a read-only bind mount, a volume or image
    layer shipped pre-warmed); a directory or LMDB file of another user's (one root
    made in a user's own cache); or a directory another user can write
    (``_others_could_link_here``). Such a cache is opened read-only."""
    if why := _others_could_link_here(path):  # even with no cache there yet
        return why
    data = path / LMDB_DATA_FILE
    if not data.is_file():
        return None
    if os.statvfs(path).f_flag & os.ST_RDONLY or _refuses_writes(data):
        return "on a read-only file system"
    for name in (path, data, path / LMDB_LOCK_FILE):
        if name.exists() and not os.access(name, os.W_OK):
            what = "its directory" if name == path else name.name
            return f"{what} is {_owner(name)}'s and cannot be written by this user"
    return None


_RUN_AS_OWNER = "run the command as that user, or give another --cache-dir"
"""What to do about a cache directory this user cannot enter."""


def check_enterable(path: Path) -> None:
    """Refuse a cache directory this user cannot enter, or reach: every cache blockstore
    makes is its owner's alone (0700), so another user's (root's, after a mount made with
    sudo) can be neither read nor judged, not even whether it holds a cache."""
    try:
        is_directory = path.is_dir()
    except PermissionError:
        raise CacheError(
            f"cannot open the cache at {path}: this user cannot reach it (a directory above "
            f"it is another user's); {_RUN_AS_OWNER}"
        ) from None
    if is_directory and not os.access(path, os.X_OK):
        raise CacheError(
            f"cannot open the cache at {path}: its directory is {_owner(path)}'s and this "
            f"user cannot enter it; {_RUN_AS_OWNER}"
        )


def _refuses_writes(data: Path) -> bool:
    """Whether opening ``data`` for writing fails as on a read-only file system, which
    ``statvfs`` does not always say: ext4 gone read-only after an error
    (``errors=remount-ro``, ``emergency_ro`` in mountinfo) still reports itself writable
    to ``statvfs`` and ``access(2)``, and refuses every write with EROFS."""
    try:
        os.close(os.open(data, os.O_RDWR | os.O_CLOEXEC))
    except OSError as exc:
        return exc.errno == errno.EROFS
    return False


def _others_could_link_here(path: Path) -> str | None:
    """Why this user must not write the cache directory ``path``, or None.

    LMDB opens ``data.mdb`` and ``lock.mdb`` by name, following links, and writes its
    lock file's header through a map: in a directory another user can write, that
    user could put a link to any file of this user's there, to be written over. Root
    writes no directory another user owns or can write; any other user, none every
    user can write (its own group-writable ones are a team's, or its umask's).
    """
    st = path.stat()
    if os.geteuid() != 0:
        if not st.st_mode & 0o002:
            return None
        return (
            "its directory is writable by other users, and no cache is written where "
            "another user could link a file of this user's"
        )
    if st.st_uid != 0:
        whose = f"its directory is {_owner(path)}'s"
    elif st.st_mode & 0o002 or (st.st_mode & 0o020 and st.st_gid != 0):
        whose = "its directory is writable by other users"
    else:
        return None
    return f"{whose}, and root writes no cache where another user could link a file of root's"


def _owner(path: Path) -> str:
    uid = path.stat().st_uid
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


def writer_of(path: Path) -> str | None:
    """Which process holds the cache at ``path`` open for writing, through another
    mount of its file system, or None.

    A read-only opener reads without LMDB's lock file (it cannot write its reader
    table), so a writer would not see it and could reuse the pages it reads. Every
    process that opens LMDB with its lock holds a shared ``fcntl`` lock on the lock
    file's first byte for as long as it has the cache open; ``F_GETLK`` finds it
    through a descriptor opened for reading, whoever owns the file.

    The directory may be another user's, who could put a FIFO or a link to a device
    there: the file is opened without following a link or waiting, and used only if
    it is a regular file.
    """
    lock = path / LMDB_LOCK_FILE
    not_lock = CacheError(
        f"cannot open the cache at {path}: {lock} is not a regular file, as LMDB's lock "
        "file is: remove it, or use another --cache-dir"
    )
    try:
        fd = os.open(lock, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno == errno.ELOOP:  # a symbolic link
            raise not_lock from exc
        raise CacheError(f"cannot open the cache at {path}: {reason(exc)}") from exc
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise not_lock
        probe = _FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, 0, 1, 0)
        found = fcntl.fcntl(fd, fcntl.F_GETLK, probe)
    except OSError:
        return None  # a file system that cannot lock: nothing to learn
    finally:
        os.close(fd)
    kind, _, _, _, pid = _FLOCK.unpack(found)
    if kind == fcntl.F_UNLCK:
        return None
    return f"pid {pid}" if pid > 0 else "a process of another namespace"
