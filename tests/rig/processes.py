"""Free ports, readiness waits and servers for the daemons and small servers of the rig."""

from __future__ import annotations

import ctypes
import signal
import socket
import subprocess
import sys
import threading
import time
from http.server import ThreadingHTTPServer
from pathlib import Path


def free_port(host: str = "127.0.0.1") -> int:
    """A port nobody listens on right now (the daemon binds it a moment later)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def wait_listening(
    host: str, port: int, process: subprocess.Popen, log: Path, timeout: float = 15.0
) -> None:
    """Return once ``host:port`` accepts connections; fail with the daemon's log if it died."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"daemon exited with {process.returncode}:\n{tail(log)}")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.02)
    raise RuntimeError(f"nothing listening on {host}:{port} after {timeout}s:\n{tail(log)}")


def die_with_parent() -> None:
    """``preexec_fn`` for daemons: SIGTERM when the test process dies, even by SIGKILL,
    so an interrupted run leaves no registry behind."""
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def stop_process(process: subprocess.Popen | None) -> None:
    if process is None or process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(5)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(5)


def tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


class QuietHTTPServer(ThreadingHTTPServer):
    """A threaded HTTP server that does not print a traceback when a client hangs up."""

    daemon_threads = True

    def handle_error(self, request: object, client_address: object) -> None:
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)

    def start_in_background(self) -> None:
        threading.Thread(
            target=self.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        ).start()

    def stop(self) -> None:
        self.shutdown()
        self.server_close()
