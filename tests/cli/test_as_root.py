"""What a user who is not root is told to run instead of ``mount``, ``umount`` and ``mounts``."""

from __future__ import annotations

import os
import pwd
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("runuser") is None,
    reason="needs root, to run the command as another user",
)

# The PATH Debian's sudo gives a command (its ``secure_path``), whatever the user's was.
SUDO_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

ENTRIES = {
    "console script": [str(Path(sys.executable).parent / "blockstore")],
    "python -m blockstore": [sys.executable, "-m", "blockstore"],
}


def as_user(argv: list[str]) -> subprocess.CompletedProcess:
    """``argv`` run as a user with no rights here, the virtualenv's bin first on PATH."""
    path = f"{Path(sys.executable).parent}:{os.environ['PATH']}"
    return subprocess.run(
        ["runuser", "-u", "nobody", "--", "env", f"PATH={path}", *argv],
        cwd="/",
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize(
    "command",
    [
        ["mounts"],
        ["umount", "/mnt/rootfs"],
        [
            "mount",
            "127.0.0.1:5000/tools/rootfs:v1",
            "/mnt/rootfs",
            "--username",
            "u",
            "--password",
            "hunter2",
        ],
    ],
)
def test_a_user_refused_for_not_being_root_is_told_the_command_sudo_can_run(
    entry: str, command: list[str]
):
    """Tried: ``mounts``, ``umount`` and ``mount`` (given a password) run by a user who is
    not root, through the console script and ``python -m blockstore``. Must hold: exit 11,
    one line naming the command by its path (sudo resets PATH, so ``sudo blockstore``,
    which the line said before, is not found) and repeating no argument, the password
    least of all; that command, run as sudo runs it (as root, sudo's PATH), is this
    command."""
    done = as_user([*ENTRIES[entry], *command])
    assert done.returncode == 11, done.stderr
    assert done.stderr.count("\n") == 1
    assert "hunter2" not in done.stderr and "/mnt/rootfs" not in done.stderr
    suggested = shlex.split(done.stderr.split("name the command by its path: sudo ", 1)[1])
    assert suggested == [*ENTRIES[entry], command[0], *(["..."] if command[1:] else [])]
    as_sudo = subprocess.run(
        [*suggested[: len(ENTRIES[entry])], "--version"],
        env={"PATH": SUDO_PATH, "HOME": pwd.getpwuid(0).pw_dir},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert as_sudo.returncode == 0 and as_sudo.stdout.startswith("blockstore ")
