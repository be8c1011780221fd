"""Start the NBD server a mount reads through, and wait until it serves.

The server is told ``--ready-fd N``: the write end of a pipe on which it
says, in one line, that it is ready and what its exports are, or why it
gave up (``readiness``). Its stdout and stderr go to the mount's log file
for people to read; nothing is learned from it here. A server that fails
before it is ready is reported with its own words and its exit status,
which the command passes on, so the cause (no such layer, registry
unreachable) keeps its own exit code. The warnings it logged before it was
ready (serving from the cache alone, say) come on the same line: the user
who mounts must see them, not only the log.
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
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

from blockstore.errors import MountError
from nbdfront.mount import readiness
from nbdfront.mount.process import ProcessRef, log_tail, spawn_detached
from nbdfront.mount.supervisor import shell_status, signals_held

logger = logging.getLogger(__name__)

READY_TIMEOUT = 120.0
"""Seconds the server may be silent before it is ready: from its start, or from the last
progress it reported (a large layer's first indexing pass can take longer in all)."""
EXIT_AFTER_FAILURE = 5.0
"""Seconds a server that said it failed gets to exit, so its exit status can be passed on."""
_LAYER_EXPORT = re.compile(r"layer(\d+)")


class ServerFailed(MountError):
    """The server exited before it was ready; carries the server's own exit code."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


@dataclass
class ServerStarted:
    process: ProcessRef
    exports: dict[str, str]  # export name -> NBD URI, in the order announced
    warnings: list[str]  # what it warned of before it was ready
    metrics: str | None = None  # where it publishes metrics, if it does


def start_server(
    argv: list[str],
    log_path: Path,
    status_path: Path,
    *,
    env: dict[str, str] | None = None,
    timeout: float = READY_TIMEOUT,
    spawned: Callable[[ProcessRef], None] | None = None,
    waiting: Callable[[], AbstractContextManager[None]] = contextlib.nullcontext,
) -> ServerStarted:
    """Spawn ``argv`` (given ``--ready-fd N``) detached, logging to ``log_path``; return once
    it is ready.

    It runs under ``supervisor``, which writes how it ended to ``status_path``
    and is the process returned. Until it is ready the server is ours to stop:
    any failure here, an interrupt included, kills it before the error goes on.
    ``spawned`` is told the supervisor at once, so that a caller killed before
    the server is ready (SIGKILL cannot be caught) has left a way to stop it;
    ``waiting`` is entered around the wait for the server alone (where the
    caller may let an interrupt through).
    """
    _keep_previous_log(log_path)
    log = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    os.fchmod(log, 0o600)  # owner-only, also when an older log was there
    os.close(log)
    read_end, write_end = os.pipe()
    try:
        supervised = [
            sys.executable,
            "-m",
            "nbdfront.mount.supervisor",
            str(status_path),
            str(write_end),
            *argv,
            "--ready-fd",
            str(write_end),
        ]
        with signals_held():  # until the supervisor can pass them on
            proc = spawn_detached(supervised, log_path, env=env, pass_fds=(write_end,))
        os.close(write_end)  # from here, only the server holds it: its exit is end-of-file
        write_end = -1
        try:
            if spawned is not None and (process := ProcessRef.of(proc.pid)) is not None:
                spawned(process)
            with waiting():
                status = readiness.receive(read_end, timeout, _Heard().progress)
            return _started(proc, status, log_path, timeout)
        except BaseException:
            _kill_group(proc)
            raise
    finally:
        os.close(read_end)
        if write_end >= 0:
            os.close(write_end)


def previous_log(log_path: Path) -> Path:
    """Where the log of the last mount at the same place goes when a new one starts."""
    return log_path.with_name(log_path.stem + ".previous.log")


def _keep_previous_log(log_path: Path) -> None:
    """Move a log an earlier mount left here (``umount`` kept it: something went wrong)
    to ``previous_log``, one deep: a mount tried again at the same place, as a service
    is restarted, must not empty the log that says why the last one failed."""
    try:
        if log_path.stat().st_size == 0:
            return
        os.replace(log_path, previous_log(log_path))
    except FileNotFoundError:
        return
    logger.info("the last log of this mount point is now %s", previous_log(log_path))


def _started(
    proc: subprocess.Popen, status: readiness.Status, log_path: Path, timeout: float
) -> ServerStarted:
    """What the status line means for the mount: the server to record, or the error."""
    if isinstance(status, readiness.Ready):
        if not status.exports:
            raise MountError(f"the server announced no export (log: {log_path})")
        process = ProcessRef.of(proc.pid)
        if process is None:
            raise MountError(f"the server exited right after it was ready (log: {log_path})")
        return ServerStarted(process, status.exports, status.warnings, status.metrics)
    if isinstance(status, readiness.TimedOut):
        raise MountError(
            f"the server was not ready, and said nothing of its progress for {timeout:.0f}s "
            f"(log: {log_path})"
        )
    try:
        # The supervisor's status is the server's; killed itself, it took the server with it.
        exit_status = shell_status(proc.wait(EXIT_AFTER_FAILURE))
    except subprocess.TimeoutExpired:
        exit_status = None
    logger.info("the server exited with %s; its last lines:\n%s", exit_status, log_tail(log_path))
    if isinstance(status, readiness.Failed):
        why = status.error
        if exit_status is not None and _only_repeats(log_path, why):
            log_path.unlink(missing_ok=True)
            raise ServerFailed(why, exit_status or MountError.exit_code)
    elif exit_status is None:
        why = "the server closed its readiness pipe without a word"
    else:
        why = f"the server exited with status {exit_status} before it was ready"
    raise ServerFailed(f"{why} (server log: {log_path})", exit_status or MountError.exit_code)


TELL_AFTER = 10.0
"""Seconds of waiting after which the server's progress is said to the user, once."""


class _Heard:
    """What the mount makes of the server's progress before it is ready: logged, and
    said to the user once the wait is long (a first open at work, not stuck)."""

    def __init__(self) -> None:
        self._since = time.monotonic()
        self._told = False

    def progress(self, text: str) -> None:
        if not self._told and time.monotonic() - self._since >= TELL_AFTER:
            self._told = True
            logger.warning("still waiting for the server, which is at work: %s", text)
        else:
            logger.info("%s", text)


def _only_repeats(log_path: Path, error: str) -> bool:
    """Whether the server's log (of a server that has exited) says nothing but ``error``:
    then pointing at it, and keeping it, only repeats the message."""
    try:
        lines = [line for line in log_path.read_text(errors="replace").splitlines() if line]
    except OSError:
        return False
    return all(line.removeprefix("blockstore: ") == error for line in lines)


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


def layer_exports(exports: dict[str, str]) -> list[tuple[str, str]]:
    """The exports to stack, bottom layer first: every ``layer<i>`` by i, else the default."""
    layers = [(int(m.group(1)), name) for name in exports if (m := _LAYER_EXPORT.fullmatch(name))]
    if layers:
        return [(name, exports[name]) for _, name in sorted(layers)]
    name = "" if "" in exports else next(iter(exports))
    return [(name, exports[name])]
