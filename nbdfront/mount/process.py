"""The background processes a mount leaves running, found again by another process.

A pid alone is not an identity: once a process dies its pid can be reused,
and ``umount`` must never signal a stranger. ``ProcessRef`` pairs the pid with
the process's start time (from /proc) and the boot it was made in, and only
acts when all match: the start time counts from boot, and a service started
at boot gets much the same pid and start time on every boot, so a record kept
across a reboot (a run directory not on a tmpfs) could name another process
by both.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path


def _stat(pid: int) -> list[str] | None:
    """The fields of ``/proc/PID/stat`` after the command's name (``[0]`` is field 3, the
    state); None if the process is gone or a zombie."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            fields = f.read().rpartition(")")[2].split()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None if fields[0] in ("Z", "X") else fields


def _start_time(pid: int) -> int | None:
    """Clock ticks after boot at which ``pid`` started; None if it is gone or a zombie."""
    fields = _stat(pid)
    return None if fields is None else int(fields[19])  # field 22


def _group_of(pgid: int) -> list[int]:
    """The live processes of process group ``pgid``."""
    pids = [int(name) for name in os.listdir("/proc") if name.isdigit()]
    return [pid for pid in pids if (fields := _stat(pid)) is not None and int(fields[2]) == pgid]


def boot_id() -> str:
    """This boot's identity, new at each boot."""
    return Path("/proc/sys/kernel/random/boot_id").read_text().strip()


@dataclass(frozen=True)
class ProcessRef:
    pid: int
    start_time: int
    boot: str = ""  # "" in an older version's record: not checked

    @classmethod
    def of(cls, pid: int) -> ProcessRef | None:
        started = _start_time(pid)
        return None if started is None else cls(pid, started, boot_id())

    def alive(self) -> bool:
        if self.boot and self.boot != boot_id():
            return False  # made before a reboot: every process of that boot is gone
        return _start_time(self.pid) == self.start_time

    def signal(self, signum: int) -> None:
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signum)

    def wait(self, timeout: float) -> bool:
        """True once the process has exited; False if it is still there at ``timeout``."""
        deadline = time.monotonic() + timeout
        while self.alive():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.01)
        return True

    def stop(self, timeout: float = 5.0, *, told: bool = False, group: bool = False) -> bool:
        """SIGTERM (unless it was ``told`` already), then SIGKILL if it has not exited
        within ``timeout``; True if it exited before that. With ``group``, the kill goes
        to the process group it leads, and waits for all of it: what it started dies
        with it only once the kernel gets there, which must not be after we return."""
        if not told:
            self.signal(signal.SIGTERM)
        if self.wait(timeout):
            return True
        members = [self]
        if group and self.alive():  # the group is known to be its own
            members += [ref for pid in _group_of(self.pid) if (ref := ProcessRef.of(pid))]
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, signal.SIGKILL)
        self.signal(signal.SIGKILL)
        for member in members:
            member.wait(timeout)
        return False

    def to_record(self) -> dict:
        return {"pid": self.pid, "start_time": self.start_time, "boot": self.boot}

    @classmethod
    def from_record(cls, record: dict) -> ProcessRef:
        return cls(int(record["pid"]), int(record["start_time"]), str(record.get("boot", "")))


def spawn_detached(
    argv: list[str],
    log_path: Path,
    env: dict[str, str] | None = None,
    pass_fds: tuple[int, ...] = (),
) -> subprocess.Popen[bytes]:
    """Start ``argv`` in a session of its own with stdout and stderr appended to ``log_path``.

    Its own session, no terminal and no pipe to us on its stdio: it must outlive
    the command that started it and never be stopped by job control or a closed
    pipe. ``pass_fds`` are the only other descriptors it inherits. It runs in ``/``,
    as a daemon does: in the command's working directory it would keep that busy
    (a USB stick, another mount) for as long as the mount stands; ``argv`` names
    every path absolutely.
    """
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,
            env=env,
            pass_fds=pass_fds,
            cwd="/",
        )


def log_tail(log_path: Path, lines: int = 5) -> str:
    """The last ``lines`` non-empty lines of a log, to explain why something died."""
    try:
        text = log_path.read_text(errors="replace")
    except FileNotFoundError:
        return ""
    return "\n".join([line for line in text.splitlines() if line.strip()][-lines:])
