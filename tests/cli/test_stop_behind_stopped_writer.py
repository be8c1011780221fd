"""Commands stopped while their cache writes wait for a write lock another process
holds, stopped (Ctrl-Z on a prefetch): each ends at once, with its own exit status."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

from rig.fault_proxy import Fault
from rig.waiting import wait_for
from rig.write_lock import stopped_writer

from blockstore.cache import ChunkStore

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


def test_ctrl_c_ends_a_write_after_the_open_behind_a_stopped_writer(
    tmp_path, registry, pushed_images, fault_proxy
):
    """Tried: ``serve IMAGE`` on a cache that exists, its registry slow to answer (4 s), and
    another process taking the cache's write lock and stopping (Ctrl-Z on a prefetch)
    once the serve's cache is open; the serve's first write after the registry's answer
    then waits for that lock on its main thread, and gets SIGINT (Ctrl-C). Must hold: it
    ends within a second or two, one line ("interrupted"), exit 130, no traceback, the
    process gone before the interpreter's teardown could run beside the wait left in
    LMDB. Before, the Ctrl-C waited with the write for the stopped process to go on."""
    cache = tmp_path / "cache"
    ChunkStore(cache).close()
    proxy = fault_proxy(registry)
    proxy.fault = Fault("delay", seconds=4.0, times=1)
    reference = pushed_images.small.replace(registry.host, proxy.host)
    argv = ["serve", reference, "--insecure", "--cache-dir", str(cache), "--listen", "127.0.0.1:0"]
    proc = blockstore(*argv)
    try:
        # The cache is opened before the registry is asked: its first connection says so.
        assert wait_for(lambda: proxy.connections > 0, 30)
        with stopped_writer(cache):
            time.sleep(5.0)  # the registry has answered; the serve's write waits
            assert proc.poll() is None
            proc.send_signal(signal.SIGINT)
            started = time.monotonic()
            proc.wait(timeout=10)
            took = time.monotonic() - started
        err = proc.stderr.read()
        assert proc.returncode == 130 and "Traceback" not in err, err
        assert err.splitlines()[-1] == "blockstore: interrupted", err
        assert took < 2, took
        assert TEARDOWN not in err, err
    finally:
        proc.kill()
        proc.wait()
        proc.stderr.close()


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
