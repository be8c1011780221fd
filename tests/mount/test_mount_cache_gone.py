"""``blockstore mounts`` for a mount whose cache cannot say what it holds: its directory
gone from its place, or its write lock held by a process stopped while writing."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

from rig.write_lock import stopped_writer

BLOCKSTORE = [sys.executable, "-m", "blockstore"]


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*BLOCKSTORE, *args], capture_output=True, text=True, timeout=60)


def test_mounts_makes_no_cache_where_a_mounts_cache_was(mount_dirs, mountpoint, pushed_images):
    """The cache directory a mount uses moved away while it stands (its server keeps the
    files open): the server says so in its log (its flush loop looks once a second), and
    ``mounts`` shows the mount ok with that warning, how much is cached as ``?``, and
    makes nothing there. Before, it made an empty cache in its place, which later mounts
    would have used, and showed 0%."""
    base, _ = mount_dirs
    cache = base / "cache"
    done = cli(
        "mount", pushed_images.small, str(mountpoint), "--insecure", "--cache-dir", str(cache)
    )
    assert done.returncode == 0, done.stderr
    cache.rename(base / "moved")
    (shown,) = json.loads(cli("mounts", "--json").stdout)
    log = Path(shown["log"])
    deadline = time.monotonic() + 20
    while "was deleted or replaced" not in log.read_text() and time.monotonic() < deadline:
        time.sleep(0.2)
    listed = cli("mounts")
    assert listed.returncode == 0, listed.stderr
    row = listed.stdout.splitlines()[1]
    assert row.endswith("ok, 1 warning in its log  ?"), row
    (shown,) = json.loads(cli("mounts", "--json").stdout)
    assert shown["cached"] == [None]
    assert shown["warnings"] == 1
    assert not cache.exists()
    assert cli("umount", str(mountpoint)).returncode == 0


def test_mounts_is_not_held_up_by_a_stopped_writer_of_a_mount_s_cache(
    mount_dirs, mountpoint, pushed_images
):
    """Tried: a mount standing, then another process taking its cache's write lock and
    stopped (as Ctrl-Z stops a prefetch), then ``mounts`` and ``mounts --json``. Must
    hold: each ends within seconds, lists the mount as ok and shows how much is cached,
    the cache opened to look, with no write lock to wait for. Before, each waited for
    the lock for as long as the process stayed stopped; then, after a few seconds, it
    showed how much is cached as ``?``."""
    base, _ = mount_dirs
    cache = base / "cache"
    done = cli(
        "mount", pushed_images.small, str(mountpoint), "--insecure", "--cache-dir", str(cache)
    )
    assert done.returncode == 0, done.stderr
    with stopped_writer(cache):
        started = time.monotonic()
        listed = cli("mounts")
        assert time.monotonic() - started < 15
        assert listed.returncode == 0, listed.stderr
        # The server may have logged its own wait for the lock by now: a warning.
        row = listed.stdout.splitlines()[1]
        assert re.search(r"\sok(, \d+ warnings? in its log)?\s+[<\d.]+%$", row), row
        assert "did not answer" not in listed.stderr, listed.stderr
        (shown,) = json.loads(cli("mounts", "--json").stdout)
        assert isinstance(shown["cached"][0], float), shown
    assert cli("umount", str(mountpoint)).returncode == 0
