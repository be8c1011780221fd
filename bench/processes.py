"""Servers the harness starts: started in the foreground, awaited, always stopped.

Every server is a child that dies with this process (``PR_SET_PDEATHSIG``),
so an interrupted run leaves nothing listening.
"""

from __future__ import annotations

import compileall
import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from blockstore.parentdeath import dies_with_parent


class BenchError(Exception):
    """A step of the harness failed; the message says which and why."""


ENGINE_PACKAGES = ("blockstore", "nbdfront")


def compile_engine(root: Path | None = None) -> None:
    """Compile the engine's modules to bytecode once, so that every ``serve`` and
    ``mount`` process a run starts loads them as an installed package does. A
    shell that sets ``PYTHONDONTWRITEBYTECODE`` otherwise has each start compile
    every module again (about a tenth of a second here), and the figures that
    include a start (mount ready, the tar.gz runs) would measure the compiler.
    ``root``: another checkout of the engine (default: this one)."""
    root = root or Path(__file__).resolve().parent.parent
    for package in ENGINE_PACKAGES:
        if not compileall.compile_dir(root / package, quiet=1):
            raise BenchError(f"could not compile {root / package} to bytecode")


def engine_environment(checkout: Path | None) -> dict[str, str] | None:
    """The environment that runs ``checkout``'s engine under this interpreter (None:
    this one's). The path is safe: ``-m blockstore`` then comes from ``checkout``,
    never from the working directory."""
    if checkout is None:
        return None
    return {**os.environ, "PYTHONPATH": str(checkout), "PYTHONSAFEPATH": "1"}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for_port(
    port: int, timeout: float = 20.0, check: Callable[[], None] = lambda: None
) -> None:
    """Until 127.0.0.1:``port`` accepts a connection; ``check`` raises if the server died."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        check()
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.02)
    raise BenchError(f"nothing listened on port {port} in {timeout:.0f}s")


class Daemon:
    """One server process, its log kept for the error message if it fails."""

    def __init__(self, argv: list[str], log: Path, env: dict[str, str] | None = None):
        self.argv = argv
        self.log = log
        self._log_file = log.open("ab")
        self.process = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=self._log_file,
            env=env,
            preexec_fn=dies_with_parent(signal.SIGTERM),
        )

    def wait_for_port(self, port: int, timeout: float = 20.0) -> None:
        wait_for_port(port, timeout, self._check_alive)

    def wait_for_line(self, prefix: str, timeout: float = 30.0) -> str:
        """The first stdout line starting with ``prefix`` (then stdout is left alone)."""
        assert self.process.stdout is not None
        deadline = time.monotonic() + timeout
        found = None
        for raw in self.process.stdout:
            line = raw.decode(errors="replace").rstrip("\n")
            if line.startswith(prefix) and found is None:
                found = line
            if line == "ready" or time.monotonic() > deadline:
                break
        if found is None:
            self._check_alive()
            raise BenchError(f"{self.argv[0]} never printed {prefix!r}; see {self.log}")
        return found

    def _check_alive(self) -> None:
        if self.process.poll() is not None:
            tail = self.log.read_text(errors="replace").strip().splitlines()[-1:]
            raise BenchError(
                f"{' '.join(self.argv[:3])} exited ({self.process.returncode}): "
                + (tail[0] if tail else f"see {self.log}")
            )

    def cpu_seconds(self) -> float | None:
        return cpu_seconds(self.process.pid)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        if self.process.stdout is not None:
            self.process.stdout.close()
        self._log_file.close()


class ForkingDaemon:
    """A server that puts itself in the background and says where in a pidfile.

    For servers that serve one client only when kept in the foreground
    (``nbd-server -d``): run as they are meant to, stopped by their pid.
    """

    def __init__(self, argv: list[str], pidfile: Path, log: Path, timeout: float = 10.0):
        self.argv = argv
        self.pidfile = pidfile
        with log.open("ab") as out:
            done = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out)
        if done.returncode != 0:
            raise BenchError(f"{argv[0]} exited ({done.returncode}); see {log}")
        deadline = time.monotonic() + timeout
        while not (pidfile.exists() and pidfile.read_text().strip()):
            if time.monotonic() > deadline:
                raise BenchError(f"{argv[0]} wrote no pidfile in {timeout:.0f}s; see {log}")
            time.sleep(0.02)
        self.pid = int(pidfile.read_text())

    def cpu_seconds(self) -> None:
        """Not known: the server forks a process for each client, whose time this one
        gains only once it has reaped them."""
        return None

    def stop(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGTERM)
            deadline = time.monotonic() + 5
            while alive(self.pid) and time.monotonic() < deadline:
                time.sleep(0.02)
            os.kill(self.pid, signal.SIGKILL)


CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float | None:
    """User and system CPU time process ``pid`` has used, its ended threads' included
    (a server's connection threads come and go); None if it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def alive(pid: int) -> bool:
    """Running, not a zombie that nobody reaps (a daemon's parent is init)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def tool_version(argv: list[str]) -> str:
    """The first line a tool prints about its version, or why there is none."""
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unavailable ({exc.__class__.__name__})"
    lines = (done.stdout + done.stderr).strip().splitlines()
    return lines[0].strip() if lines else "unknown"
