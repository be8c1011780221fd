"""Where ``blockstore mount --metrics`` publishes, as ``mount`` and ``mounts`` say it."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request

BLOCKSTORE = [sys.executable, "-m", "blockstore"]


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*BLOCKSTORE, *args], capture_output=True, text=True, timeout=60)


def test_the_metrics_url_of_a_mount_is_said_with_the_port_picked(
    mount_dirs, mountpoint, pushed_images
):
    """``mount --metrics 127.0.0.1:0`` lets the server pick a port: ``mount`` names the URL
    with that port on its line, ``mounts --json`` keeps it, and it answers. Before, it was
    only in the server's log, which the user had no reason to read."""
    base, _ = mount_dirs
    cache = str(base / "cache")
    done = cli(
        "mount", pushed_images.small, str(mountpoint), "--insecure", "--cache-dir", cache,
        "--metrics", "127.0.0.1:0",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    said = done.stdout.split("metrics ", 1)[1].split(",", 1)[0]
    assert said.startswith("http://127.0.0.1:") and not said.startswith("http://127.0.0.1:0/")
    (listed,) = json.loads(cli("mounts", "--json").stdout)
    assert listed["metrics"] == said
    with urllib.request.urlopen(said, timeout=10) as reply:
        assert b"blockstore_nbd_open_connections" in reply.read()
    assert cli("umount", str(mountpoint)).returncode == 0
