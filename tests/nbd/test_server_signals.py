"""Stopping on a signal, whichever of the server's threads the kernel hands it to."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]

SERVER = textwrap.dedent(
    """
    import signal, sys, threading, time
    sys.path[:0] = [{here!r}, {tests!r}, {root!r}]
    from nbd_serving import ZeroExport
    from nbdfront.server import NBDServer

    server = NBDServer({{"": ZeroExport()}}, unix={socket!r})
    server.start()
    signal.signal(signal.SIGTERM, lambda *_: server.request_shutdown())

    def hand_the_signal_to_me():
        time.sleep(0.3)  # the main thread is asleep in serve_forever by then
        signal.pthread_kill(threading.get_ident(), signal.SIGTERM)

    threading.Thread(target=hand_the_signal_to_me).start()
    server.serve_forever()
    print("stopped", flush=True)
    """
)


def test_a_signal_taken_by_another_thread_still_stops_the_server(tmp_path):
    """SIGTERM delivered to a worker thread, not the main one (with a few dozen threads
    fetching, the kernel often picks one of them): only a flag is set there, so the main
    thread, asleep in serve_forever, must be woken through the signal wakeup pipe; it
    stops at once instead of hanging until killed."""
    script = SERVER.format(
        here=str(HERE), tests=str(HERE.parent), root=str(ROOT), socket=str(tmp_path / "nbd.sock")
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=20
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "stopped"
