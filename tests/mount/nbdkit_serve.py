"""A stand-in for ``blockstore serve`` over local image files, for testing the mount stack alone.

Serves every file in DIR as the export of the same name with nbdkit's file
plugin, and says it is ready on the readiness pipe as the real server does
(``--ready-fd``), so mounting can be tested without a registry. SIGTERM
stops it with status 0, or the one ``--stop-status`` gives, after
``--stop-delay`` seconds (a server still draining its requests).
Usage: nbdkit_serve.py DIR [--stop-status N] [--stop-delay S] --unix SOCK --pidfile PID
       --ready-fd FD
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from nbdfront.mount import readiness


def reap(pid: int, timeout: float) -> None:
    """Wait (bounded) for child ``pid`` to exit. This server is gone only once its nbdkit
    is: the real server is one process, and a mount's stop waits for the server, so
    nothing of it may be left when it exits. (``Popen.wait`` would not do here: the
    main thread is inside it, holding its lock, when the SIGTERM handler runs.)"""
    deadline = time.monotonic() + timeout
    with contextlib.suppress(ChildProcessError):
        while os.waitpid(pid, os.WNOHANG) == (0, 0) and time.monotonic() < deadline:
            time.sleep(0.01)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("dir", type=Path)
    parser.add_argument("--unix", required=True)
    parser.add_argument("--pidfile", required=True)
    parser.add_argument("--stop-status", type=int, default=0)
    parser.add_argument("--stop-delay", type=float, default=0.0)
    parser.add_argument("--ready-fd", type=int, required=True)
    args = parser.parse_args()
    nbdkit_pidfile = args.pidfile + ".nbdkit"
    # --exit-with-parent: nbdkit goes when this process goes, however it goes.
    nbdkit = subprocess.Popen(
        [
            "nbdkit",
            "-f",
            "--exit-with-parent",
            "-r",
            "-U",
            args.unix,
            "-P",
            nbdkit_pidfile,
            "file",
            f"dir={args.dir}",
        ],
        stdin=subprocess.DEVNULL,
    )

    def stop(*_: object) -> None:
        nbdkit.terminate()
        reap(nbdkit.pid, 10.0)
        time.sleep(args.stop_delay)
        sys.exit(args.stop_status)

    signal.signal(signal.SIGTERM, stop)
    while not os.path.exists(nbdkit_pidfile):
        if nbdkit.poll() is not None:
            return 1
        time.sleep(0.01)
    Path(args.pidfile).write_text(f"{os.getpid()}\n")
    exports = {
        p.name: f"nbd+unix:///{p.name}?socket={args.unix}" for p in sorted(args.dir.iterdir())
    }
    os.write(args.ready_fd, readiness.encode_ready(exports, []))
    os.close(args.ready_fd)
    return nbdkit.wait()


if __name__ == "__main__":
    sys.exit(main())
