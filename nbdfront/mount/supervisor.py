"""The parent of a mount's server, so that its exit status is not lost and its stop is bounded.

A mount's server outlives the command that started it; once that command
has exited, the server's exit status goes to init, and ``umount`` could not
tell a clean stop from a crash. This small parent runs the server, passes
SIGTERM and SIGINT on to it, and writes how it ended to a status file
(atomically, as JSON), then exits with the server's status. A server that
has not exited ``STOP_GRACE`` seconds after it was told to stop is killed,
and the status file says so: ``umount`` waits a bounded time and knows why.
Killed itself, the supervisor takes the server with it (the kernel's
parent-death signal), so to other processes it stands for the server.

It is started with the stop signals blocked (``signals_held``) and unblocks
them only once its handlers are set and the server started, so a stop
signal that comes at once is passed on, never the end of the supervisor
before it could write how the server ended.

It hands the server the readiness pipe's write end and closes its own copy,
so the pipe reaches end-of-file as soon as the server is gone.

Usage: python -m nbdfront.mount.supervisor STATUS_FILE READY_FD COMMAND...
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from blockstore.parentdeath import dies_with_parent
from blockstore.wholefile import replace_whole

STOP_GRACE = 5.0
"""Seconds a server gets to stop once told to, before it is killed.

Stopping cancels the fetches in flight, so a healthy server needs far less;
one stuck on a registry that stopped answering must not hold ``umount``.
"""

FORWARDED = (signal.SIGTERM, signal.SIGINT)
"""The signals the supervisor passes on to the server."""


@contextlib.contextmanager
def signals_held() -> Iterator[None]:
    """``FORWARDED`` blocked on this thread for the block: a process started inside it
    starts with them blocked, and gets one sent meanwhile once it unblocks them."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, FORWARDED)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


@dataclass(frozen=True)
class ServerExit:
    """How the server ended: its exit status (128+N for signal N), and whether it was
    killed because it did not stop within ``STOP_GRACE`` seconds of being told to."""

    status: int
    killed_after_grace: bool = False


def shell_status(returncode: int) -> int:
    """A process's exit status as a shell gives it: 128+N for one killed by signal N
    (``subprocess`` says -N)."""
    return returncode if returncode >= 0 else 128 - returncode


def read_status(path: Path) -> ServerExit | None:
    """How the server ended, as the supervisor wrote it; None if it never wrote it."""
    try:
        data = json.loads(path.read_text())
        return ServerExit(int(data["status"]), bool(data["killed_after_grace"]))
    except (FileNotFoundError, ValueError, KeyError, TypeError):
        return None


def _write_status(path: Path, ended: ServerExit) -> None:
    status = {"status": ended.status, "killed_after_grace": ended.killed_after_grace}
    replace_whole(path, json.dumps(status).encode(), ".tmp")


def _server_preexec() -> Callable[[], None]:
    """The server's set-up before it runs: it dies with the supervisor, and gets the stop
    signals the supervisor holds blocked until its handlers are set."""
    arm = dies_with_parent(signal.SIGKILL)

    def prepare() -> None:
        arm()
        signal.pthread_sigmask(signal.SIG_UNBLOCK, FORWARDED)

    return prepare


def supervise(status_path: Path, ready_fd: int, command: list[str]) -> int:
    server = subprocess.Popen(command, pass_fds=(ready_fd,), preexec_fn=_server_preexec())
    os.close(ready_fd)
    told_to_stop: list[float] = []

    def forward(received: int, _frame: object) -> None:
        server.send_signal(received)
        told_to_stop.append(time.monotonic())

    for signum in FORWARDED:
        signal.signal(signum, forward)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, FORWARDED)  # one sent meanwhile comes now
    killed = False
    while True:
        try:
            returncode = server.wait(timeout=0.1)
            break
        except subprocess.TimeoutExpired:
            if told_to_stop and not killed and time.monotonic() - told_to_stop[0] > STOP_GRACE:
                server.kill()
                killed = True
    ended = ServerExit(shell_status(returncode), killed)
    _write_status(status_path, ended)
    return ended.status


if __name__ == "__main__":
    sys.exit(supervise(Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]))
