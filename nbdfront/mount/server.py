"""Start the NBD server a mount reads through, and wait until it serves.

The server speaks a small line protocol on stdout: one ``export NAME URI``
line per export, then ``ready`` once it listens. Its stdout and stderr both
go to the mount's log file, which is read back here; a server that dies
before ``ready`` is reported with the last lines it logged and its exit code,
which the command passes on so the cause (no such layer, registry
unreachable) keeps its own exit code. The warnings it logs before ``ready``
(serving from the cache alone, say) are handed back too: the user who
mounts must see them, not only the log.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from blockstore.errors import MountError
from nbdfront.mount.process import ProcessRef, log_tail, spawn_detached

logger = logging.getLogger(__name__)

READY_TIMEOUT = 120.0
_LAYER_EXPORT = re.compile(r"layer(\d+)")
# A warning as the server logs it: "DATE TIME LOGGER WARNING message".
_WARNING = re.compile(r"\S+ \S+ \S+ WARNING (.*)")


class ServerFailed(MountError):
    """The server exited before it was ready; carries the server's own exit code."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


@dataclass
class ServerStarted:
    process: ProcessRef
    exports: dict[str, str]  # export name -> NBD URI, in the order announced
    warnings: list[str]  # what it warned of before it was ready, without the log prefix


def parse_announcements(text: str) -> tuple[dict[str, str], bool]:
    """The exports announced so far in the server's output, and whether it said ``ready``."""
    exports: dict[str, str] = {}
    for line in text.splitlines():
        words = line.split()
        if words == ["ready"]:
            return exports, True
        if len(words) in (2, 3) and words[0] == "export":
            # The default export has the empty name; it may be printed as nothing or "".
            name = words[1].strip('"') if len(words) == 3 else ""
            exports[name] = words[-1]
    return exports, False


def warnings_before_ready(text: str) -> list[str]:
    """The messages of the WARNING lines the server logged before ``ready``."""
    found = []
    for line in text.splitlines():
        if line.strip() == "ready":
            break
        if match := _WARNING.fullmatch(line):
            found.append(match.group(1))
    return found


def start_server(
    argv: list[str],
    log_path: Path,
    status_path: Path,
    *,
    env: dict[str, str] | None = None,
    timeout: float = READY_TIMEOUT,
) -> ServerStarted:
    """Spawn ``argv`` detached, logging to ``log_path``, and return once it is ready.

    It runs under ``mount_supervisor``, which writes its exit status to
    ``status_path`` and is the process returned. Until it is ready the
    server is ours to stop: any failure here, an interrupt included, kills
    it before the error goes on.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log_path.write_bytes(b"")
    supervised = [sys.executable, "-m", "nbdfront.mount.supervisor", str(status_path), *argv]
    proc = spawn_detached(supervised, log_path, env=env)
    try:
        exports = _wait_until_ready(proc, log_path, timeout)
        process = ProcessRef.of(proc.pid)
        if process is None:
            raise MountError(f"the server exited right after it was ready (log: {log_path})")
        return ServerStarted(
            process, exports, warnings_before_ready(log_path.read_text(errors="replace"))
        )
    except BaseException:
        _kill_group(proc)
        raise


def _kill_group(proc: subprocess.Popen) -> None:
    """Kill the supervisor and all it started (its own process group), and see them gone."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.01)


def _wait_until_ready(proc: subprocess.Popen, log_path: Path, timeout: float) -> dict[str, str]:
    deadline = time.monotonic() + timeout
    while True:
        exports, ready = parse_announcements(log_path.read_text(errors="replace"))
        if ready:
            if not exports:
                raise MountError(f"the server announced no export (log: {log_path})")
            return exports
        if proc.poll() is not None:
            logger.info(
                "the server exited with %s; its last lines:\n%s",
                proc.returncode,
                log_tail(log_path, 10),
            )
            why = log_tail(log_path, 1).removeprefix("blockstore: ")
            raise ServerFailed(
                f"{why or 'the server exited before it was ready'} (server log: {log_path})",
                proc.returncode or MountError.exit_code,
            )
        if time.monotonic() > deadline:
            raise MountError(f"the server was not ready within {timeout:.0f}s (log: {log_path})")
        time.sleep(0.02)


def layer_exports(exports: dict[str, str]) -> list[tuple[str, str]]:
    """The exports to stack, bottom layer first: every ``layer<i>`` by i, else the default."""
    layers = [(int(m.group(1)), name) for name in exports if (m := _LAYER_EXPORT.fullmatch(name))]
    if layers:
        return [(name, exports[name]) for _, name in sorted(layers)]
    name = "" if "" in exports else next(iter(exports))
    return [(name, exports[name])]
