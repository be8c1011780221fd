"""The empty cache a failed first command made is removed, never from under a process
that opens it at the same time."""

from __future__ import annotations

import fcntl
import logging
import os
import subprocess
import sys
import threading
from pathlib import Path

from rig.waiting import wait_for

from blockstore.cache.in_use import hold_in_use
from blockstore.cli.common import _remove_new_cache

HOLDER = (
    "import sys\n"
    "from pathlib import Path\n"
    "from blockstore.cache.in_use import hold_in_use\n"
    "fd = hold_in_use(Path(sys.argv[1]))\n"
    "print('held', flush=True)\n"
    "sys.stdin.read()\n"
)


def test_a_new_cache_another_process_holds_is_kept(cache_dir: Path):
    """Tried: a failed first command removing the cache it made while another process has
    just opened it: ``data.mdb`` open with its shared lock, LMDB's ``lock.mdb`` not yet
    opened (as every opener is between taking the lock and opening LMDB). Must hold:
    the cache stays, its file the very one the other process holds; once that process
    is gone, the removal goes on. The lock decides it, taken with the check and held
    over the unlinks: a look at which processes have the files open, as before, could
    not see one that opens them between the look and the unlinks, which no test can
    time for sure (the opener that waited through it is the next test's)."""
    cache_dir.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(cache_dir)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        held = os.stat(cache_dir / "data.mdb").st_ino
        _remove_new_cache([cache_dir])
        assert os.stat(cache_dir / "data.mdb").st_ino == held
    finally:
        holder.communicate("", timeout=30)
    _remove_new_cache([cache_dir])
    assert not cache_dir.exists(), "left once no process holds it"


def test_an_opener_waiting_while_the_new_cache_is_removed_makes_it_anew(cache_dir: Path, caplog):
    """Tried: an opener that has opened ``data.mdb`` and waits for its lock while the
    removal holds it exclusively; the removal then unlinks LMDB's files and the
    directory, as ``remove_if_unused`` does under that lock, and lets go (the two are
    ordered here by the lock taken by hand: no timing decides it). Must hold: the
    opener makes the directory and a new ``data.mdb`` again and holds that one, and its
    warning names the removal as well as compaction. Before, it failed with "cannot
    open the cache" (no such directory), and said the cache was being compacted."""
    cache_dir.mkdir()
    data = cache_dir / "data.mdb"
    data.touch()
    remover = os.open(data, os.O_RDONLY)
    fcntl.flock(remover, fcntl.LOCK_EX)
    got: list[int | BaseException] = []

    def open_it() -> None:
        try:
            got.append(hold_in_use(cache_dir))
        except BaseException as exc:
            got.append(exc)

    caplog.set_level(logging.WARNING, logger="blockstore.cache.in_use")
    opener = threading.Thread(target=open_it)
    opener.start()
    try:
        assert wait_for(lambda: "waiting for it" in caplog.text or got), got
        data.unlink()
        cache_dir.rmdir()
    finally:
        os.close(remover)
        opener.join(30)
    (fd,) = got
    assert isinstance(fd, int), fd
    # What the user is told names the removal too, not compaction alone.
    assert "removed by a command that made it and failed" in caplog.text, caplog.text
    try:
        assert os.fstat(fd).st_ino == os.stat(data).st_ino
    finally:
        os.close(fd)
