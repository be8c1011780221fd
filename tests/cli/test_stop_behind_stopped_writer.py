"""Commands stopped while their cache writes wait for a write lock another process
holds, stopped (Ctrl-Z on a prefetch): each ends at once, with its own exit status."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

from rig.waiting import wait_for
from rig.write_lock import stopped_writer

REPO = Path(__file__).resolve().parents[2]
TEARDOWN = "the interpreter's teardown began with a thread inside LMDB"

# The command, as its entry point runs it, told when the interpreter's teardown begins
# (the first step of an exit that returns from main, never of one that leaves at once).
_WATCHED = f"""
import sys, threading
def teardown():
    from blockstore.cache.env import in_use_at_exit
    if in_use_at_exit():
        print({TEARDOWN!r}, file=sys.stderr, flush=True)
threading._register_atexit(teardown)
from blockstore.__main__ import run
sys.exit(run())
"""


def blockstore(*argv: str, stdout: int = subprocess.DEVNULL) -> subprocess.Popen:
    """``blockstore ARGV``, its stderr piped, saying whether its exit tore the
    interpreter down with a thread inside LMDB (``TEARDOWN``)."""
    return subprocess.Popen(
        [sys.executable, "-c", _WATCHED, *argv],
        cwd=REPO,
        stdout=stdout,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_a_server_stopped_with_writes_stuck_leaves_before_the_interpreter_s_teardown(
    tmp_path, registry, pushed_images
):
    """Tried: ``serve IMAGE`` on an empty cache read whole with nbdcopy while another
    process holds the cache's write lock, stopped (Ctrl-Z on a prefetch), so its stores,
    trace and counters wait for the lock in LMDB; then SIGTERM, and SIGINT just after.
    Must hold: exit 0 within seconds, saying what it left unkept, the process gone
    before the interpreter's teardown could begin beside the threads left in LMDB; the
    cache whole for the next opener. Before, the teardown ran beside them and beside
    the close given up on, which went on to start a layer's close thread as the
    teardown freed the thread states: about once in a hundred such stops, that thread
    crashed the process as it started (SIGSEGV)."""
    cache, sock = tmp_path / "cache", tmp_path / "serve.sock"
    argv = ["serve", pushed_images.small, "--insecure", "--cache-dir", str(cache)]
    proc = blockstore(*argv, "--unix", str(sock), stdout=subprocess.PIPE)
    try:
        assert wait_for(lambda: proc.stdout.readline().strip() == "ready", 30)
        with stopped_writer(cache):
            uri = f"nbd+unix:///?socket={sock}"
            subprocess.run(["nbdcopy", uri, "null:"], check=True, timeout=30)
            proc.send_signal(signal.SIGTERM)
            proc.send_signal(signal.SIGINT)
            assert proc.wait(timeout=15) == 0
        err = proc.stderr.read()
        assert "Traceback" not in err and TEARDOWN not in err, err
        assert "writes waiting for its write lock" in err, err
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()
        proc.stderr.close()
    verify = subprocess.run(
        [sys.executable, "-m", "blockstore", "cache", "verify", "--cache-dir", str(cache)],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert verify.returncode == 0, verify.stdout + verify.stderr
