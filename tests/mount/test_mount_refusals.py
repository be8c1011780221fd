"""What ``blockstore mount`` refuses by itself, before it starts anything in the background."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import processes_mentioning

from blockstore.errors import UsageError

BLOCKSTORE = [sys.executable, "-m", "blockstore"]


@pytest.mark.parametrize(
    "argv",
    [
        ["--platform", "amd64", "127.0.0.1:5000/a/b:v1"],
        ["--blob", "sha256:1234", "127.0.0.1:5000/a/b:v1"],
        ["127.0.0.1:5000/Upper/Case:v1"],
        ["127.0.0.1:5000/a/b:-bad-tag"],
    ],
)
def test_bad_arguments_fail_in_one_line_with_nothing_spawned(mount_dirs, mountpoint, argv):
    """A bad platform, a malformed --blob digest and invalid references each fail with one
    line and exit 2 from the mount command itself: no server log is mentioned or written,
    no state is made, no process started."""
    _, run = mount_dirs
    done = subprocess.run(
        [*BLOCKSTORE, "mount", *argv, str(mountpoint)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == UsageError.exit_code, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "server log" not in lines[0], done.stderr
    assert not list(run.iterdir()), "a log or state directory was made"
    assert not processes_mentioning(str(run))
