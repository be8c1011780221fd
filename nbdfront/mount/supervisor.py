"""The parent of a mount's server, so that the server's exit status is not lost.

A mount's server outlives the command that started it; once that command
has exited, the server's exit status goes to init, and ``umount`` could not
tell a clean stop from a crash. This small parent runs the server, passes
SIGTERM and SIGINT on to it, writes its exit status to a file, and exits
with that status. Killed itself, it takes the server with it (the kernel's
parent-death signal), so to other processes it stands for the server.

Usage: python -m nbdfront.mount.supervisor STATUS_FILE COMMAND...
"""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

from blockstore.parentdeath import dies_with_parent


def read_status(path: Path) -> int | None:
    """The exit status written to ``path``; None if the supervisor never wrote one."""
    try:
        return int(path.read_text())
    except (FileNotFoundError, ValueError):
        return None


def supervise(status_path: Path, command: list[str]) -> int:
    server = subprocess.Popen(command, preexec_fn=dies_with_parent(signal.SIGKILL))
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda received, _frame: server.send_signal(received))
    returncode = server.wait()
    status = returncode if returncode >= 0 else 128 - returncode
    partial = status_path.with_name(status_path.name + ".tmp")
    partial.write_text(f"{status}\n")
    partial.replace(status_path)
    return status


if __name__ == "__main__":
    sys.exit(supervise(Path(sys.argv[1]), sys.argv[2:]))
