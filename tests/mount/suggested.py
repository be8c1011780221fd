"""What the mount commands say, read as the user would: the lines about this run
directory, and a command line a message suggests, pasted into a shell."""

from __future__ import annotations

import subprocess
import sys


def run_suggested(command: str) -> subprocess.CompletedProcess:
    """``command`` (a ``blockstore ...`` line a message gave) run by bash, with
    ``blockstore`` this interpreter's module: its quoting is what is tested."""
    return subprocess.run(
        ["bash", "-c", f'blockstore() {{ {sys.executable} -m blockstore "$@"; }}; {command}'],
        capture_output=True,
        text=True,
        timeout=60,
    )


def own_lines(stderr: str) -> list[str]:
    """What ``mounts`` says of this run directory's mounts: it also counts the mounts of
    other run directories, which tests running meanwhile make."""
    return [line for line in stderr.splitlines() if "with another run directory" not in line]
