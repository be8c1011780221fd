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


def test_ctrl_c_ends_a_write_after_the_open_behind_a_stopped_writer(
    tmp_path, registry, pushed_images, fault_proxy
):
    """Tried: ``serve IMAGE`` on a cache that exists, its registry slow to answer (4 s), and
    another process taking the cache's write lock and stopping (Ctrl-Z on a prefetch)
    once the serve's cache is open; the serve's first write after the registry's answer
    then waits for that lock on its main thread, and gets SIGINT (Ctrl-C). Must hold: it
    ends within a second or two, one line ("interrupted"), exit 130, no traceback.
    Before, the Ctrl-C waited with the write for the stopped process to go on."""
    cache = tmp_path / "cache"
    ChunkStore(cache).close()
    proxy = fault_proxy(registry)
    proxy.fault = Fault("delay", seconds=4.0, times=1)
    reference = pushed_images.small.replace(registry.host, proxy.host)
    argv = ["serve", reference, "--insecure", "--cache-dir", str(cache), "--listen", "127.0.0.1:0"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "blockstore", *argv],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
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
    finally:
        proc.kill()
        proc.wait()
        proc.stderr.close()
