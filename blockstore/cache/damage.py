"""Telling a cache's file cannot be trusted before it is mapped, and moving a cache aside.

A cache is only a cache: a damaged file must cost its contents, never the
process. A file shorter than the pages its newest meta page claims would
end in SIGBUS once mapped, so it is measured before LMDB opens it (pages
LMDB freed without writing them may lie past the end, and are looked up in
its own free list). A cache found damaged, or of an older version's layout,
is moved aside (renamed with a timestamp) for a post-mortem, and the
environment (``env.py``) starts an empty one in its place.
"""

from __future__ import annotations

import errno
import fcntl
import os
import secrets
import struct
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path

from blockstore.errors import CacheError

from .errors import reason
from .layout import LMDB_DATA_FILE

# LMDB's meta pages (mdb.c, 64-bit builds): pages 0 and 1 each hold a page header
# (16 bytes), then MDB_meta: magic and version (u32 each), the map address and
# size, two MDB_db records of 48 bytes (the first one's leading u32 is the page
# size), then the last page used and the transaction id. The newer one counts.
_META_MAGIC = 0xBEEFC0DE
_META_HEAD = struct.Struct("<II")  # at 16: magic, version
_META_PSIZE = struct.Struct("<I")  # at 40
_META_TAIL = struct.Struct("<QQ")  # at 136: last page, txnid
_META_END = 152
_FREE_ROOT = struct.Struct("<Q")  # at 80: the first MDB_db record's root: the free-page database
_PAGE_HEAD = struct.Struct("<QHHHH")  # page number, pad, flags, lower, upper
_NODE_HEAD = struct.Struct("<HHHH")  # lo, hi, flags, key size
_P_BRANCH, _P_LEAF = 0x01, 0x02
_F_BIGDATA = 0x01
_P_INVALID = (1 << 64) - 1
FREE_WALK_PAGES = 100_000
"""Most pages of LMDB's free-page database read to prove a short file's tail free."""


def file_damage(path: Path, *, again: bool = True) -> str | None:
    """Why ``data.mdb`` in ``path`` must not be mapped, or None if it may.

    The meta pages are read before the file's size is taken: LMDB writes
    data pages before the meta page that names them, so a commit by another
    process in between can only make the file longer than the meta says.

    A healthy file may still end short of the meta's last page: pages a
    transaction allocated and freed again count in it but are never
    written (megabytes of them, when it stored and dropped large values).
    Such pages are in LMDB's free-page database, which LMDB never reads a
    page of before writing it. So a short file is healthy exactly when every
    page past its end is listed there (``_free_pages``); any other shortfall,
    or a free list that cannot be read whole from the file, is a cut file.
    That list is read without a reader slot, so another process's commits
    may reuse its pages meanwhile: a short file found damaged is looked at
    once more (``again``) before it is called so.
    """
    data = path / LMDB_DATA_FILE
    try:
        with open(data, "rb") as f:
            head = f.read(_META_END)
            if not head:
                return None  # new: LMDB writes its first meta pages
            if len(head) < _META_END:
                return f"data.mdb is {len(head)} bytes, shorter than its first page"
            magic, _ = _META_HEAD.unpack_from(head, 16)
            psize = _META_PSIZE.unpack_from(head, 40)[0]
            if magic != _META_MAGIC or psize < 512 or psize > 65536 or psize & (psize - 1):
                return "data.mdb does not start with an LMDB meta page"
            f.seek(psize)
            second = f.read(_META_END)
            metas = [head] + [second] * (len(second) == _META_END)
            size = os.fstat(f.fileno()).st_size
    except FileNotFoundError:
        return None
    except OSError as exc:
        return f"data.mdb cannot be read: {exc.strerror}"
    newest = max(
        (m for m in metas if _META_HEAD.unpack_from(m, 16)[0] == _META_MAGIC),
        key=lambda m: _META_TAIL.unpack_from(m, 136)[1],
    )
    last = _META_TAIL.unpack_from(newest, 136)[0]
    wanted = (last + 1) * psize
    if size >= wanted:
        return None
    if size % psize == 0:
        free = _free_pages(data, psize, size, _FREE_ROOT.unpack_from(newest, 80)[0])
        if free is not None and free.issuperset(range(size // psize, last + 1)):
            return None
    if again:
        return file_damage(path, again=False)
    return f"data.mdb is {size} bytes, but its last page ends at {wanted}"


def _free_pages(data: Path, psize: int, size: int, root: int) -> set[int] | None:
    """Every page number LMDB's free-page database lists, read from the file (never
    mapped), or None if it cannot be read whole within the file's ``size`` bytes.

    Its records are page-number lists (a count, then the numbers, 64 bits
    each), keyed by transaction, in a B-tree of branch and leaf pages; a long
    list lives on overflow pages.
    """
    if root == _P_INVALID:
        return set()
    free: set[int] = set()
    todo = [root]
    seen = 0
    try:
        with open(data, "rb") as f:

            def pages(number: int, count: int = 1) -> bytes | None:
                if number < 2 or (number + count) * psize > size:
                    return None
                return os.pread(f.fileno(), count * psize, number * psize)

            while todo:
                seen += 1
                if seen > FREE_WALK_PAGES:
                    return None
                page = pages(todo.pop())
                if page is None:
                    return None
                _, _, flags, lower, _ = _PAGE_HEAD.unpack_from(page)
                for at in range(_PAGE_HEAD.size, lower, 2):
                    node = int.from_bytes(page[at : at + 2], "little")
                    lo, hi, node_flags, key_size = _NODE_HEAD.unpack_from(page, node)
                    if flags & _P_BRANCH:
                        todo.append(lo | hi << 16 | node_flags << 32)
                        continue
                    if not flags & _P_LEAF:
                        return None
                    start = node + _NODE_HEAD.size + key_size
                    value = page[start : start + (lo | hi << 16)]
                    if node_flags & _F_BIGDATA:
                        first = int.from_bytes(page[start : start + 8], "little")
                        head = pages(first)
                        if head is None:
                            return None
                        span = int.from_bytes(head[12:16], "little")
                        whole = pages(first, span)
                        if whole is None:
                            return None
                        value = whole[_PAGE_HEAD.size : _PAGE_HEAD.size + (lo | hi << 16)]
                    count = int.from_bytes(value[:8], "little")
                    if 8 * (count + 1) > len(value):
                        return None
                    free.update(struct.unpack_from(f"<{count}Q", value, 8))
    except (OSError, struct.error, ValueError):
        return None
    return free


@contextmanager
def directory_lock(
    directory: Path, waiting: Callable[[], AbstractContextManager[object]] = nullcontext
) -> Iterator[None]:
    """An exclusive ``flock`` on ``directory`` itself (no file left behind). The wait
    for it runs inside ``waiting()``, which may time it: a process stopped while it
    holds the lock holds it until it goes on."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        with waiting():
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # drops the lock


_ASIDE_TRIES = 8
"""Names tried for a cache moved aside before giving up: each has a random part, so only
a name taken by chance (or planted by one who can write the parent) is tried again."""

_NAME_TAKEN = (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR)
"""What ``rename`` says when the new name is a directory not empty, a file or a link:
none of them is followed or changed, another name is tried."""


def move_aside(path: Path, why: str, label: str = "damaged") -> Path:
    """Rename a cache directory out of the way (``NAME.LABEL-TIME-RANDOM``), keeping it
    for a post-mortem or for the version that wrote it. The random part keeps one who
    can write the parent from planting a file or link at the name beforehand."""
    stamp = time.strftime("%Y%m%dT%H%M%S")
    for _ in range(_ASIDE_TRIES):
        aside = path.with_name(f"{path.name}.{label}-{stamp}-{secrets.token_hex(4)}")
        try:
            path.rename(aside)
            return aside
        except OSError as exc:
            if exc.errno not in _NAME_TAKEN:
                # A directory that is a mount point (a volume given to the cache) or in
                # one this user cannot write: every later command would fail the same way.
                raise _cannot_move(path, why, exc) from exc
            taken = exc
    raise _cannot_move(path, why, taken)


def _cannot_move(path: Path, why: str, exc: OSError) -> CacheError:
    return CacheError(
        f"{why}; the cache at {path} cannot be moved aside ({reason(exc)}): move its "
        "files out of that directory, or delete them, to start an empty cache there, "
        "or use another --cache-dir"
    )


def move_aside_unless_replaced(
    path: Path, why: str, label: str, judged: tuple[int, int] | None
) -> Path | None:
    """Move the directory aside, if it is still the one judged (``judged``: its device
    and inode): another process may have moved it, and started a new cache in its
    place, already. Where it went, if it was moved.

    Processes that find one damaged cache at once take turns (a lock on the
    parent directory), so the second sees the first's new cache and leaves it.
    """
    try:
        with directory_lock(path.parent):
            try:
                current = path.stat()
            except FileNotFoundError:
                return None
            if judged is not None and (current.st_dev, current.st_ino) != judged:
                return None
            return move_aside(path, why, label)
    except OSError as exc:
        # A parent this user cannot open (0711, not the user's) to take turns in: moved
        # without a turn, a second process could move the first's new cache.
        raise _cannot_move(path, why, exc) from exc
