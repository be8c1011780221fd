"""``umount`` while the server waits on a registry that stopped answering: bounded, and said."""

from __future__ import annotations

import subprocess
import time

import pytest
from rig.fault_proxy import Fault
from stop_timing import umount_timed
from test_mount_e2e import assert_nothing_left, mount

from nbdfront.mount import records
from nbdfront.mount.supervisor import STOP_GRACE

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("lazy", [True, False], ids=["lazy-with-a-reader", "nbd-client"])
def test_umount_is_bounded_while_fetches_hang(
    mount_dirs, registry, pushed_images, erofs_images, fault_proxy, lazy
):
    """Mount the large image through a proxy, then have the proxy hold every blob request
    without answering, and read what is not cached: through the mount (``cat``, so only
    ``umount --lazy`` can take it down), or from the server's socket with an NBD client
    (so plain ``umount`` can). Either way the read waits on the registry, yet ``umount``
    must return within a few seconds of the server's stop grace (counted from when it
    told the server to stop), with exit 0 and an
    explicit outcome (a clean stop says nothing; a server that had to be killed is named);
    the reader must get an error instead of hanging, and nothing of the mount may remain."""
    base, run = mount_dirs
    mnt, cache = base / "mnt", base / "cache"
    mnt.mkdir()
    proxy = fault_proxy(registry)
    ref = pushed_images.large.replace(registry.host, proxy.host, 1)
    mount(ref, mnt, cache)

    proxy.fault = Fault("delay", path_contains="/blobs/", seconds=300)
    if lazy:
        read = ["cat", str(mnt / "big.bin")]
    else:
        socket = records.load(str(mnt)).socket
        read = ["nbdcopy", f"nbd+unix:///?socket={socket}", "null:"]
    reader = subprocess.Popen(read, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 15
        while proxy.faults_applied == 0:
            assert reader.poll() is None, "the read ended before it reached the registry"
            assert time.monotonic() < deadline, "the read never reached the registry"
            time.sleep(0.05)
        time.sleep(0.5)
        assert reader.poll() is None, "the read did not wait on the hanging registry"

        timed = umount_timed(mnt, *(["--lazy"] if lazy else []))
        done = timed.done
        print(
            f"umount took {timed.took:.1f}s ({timed.since_told:.1f}s once the server was told) "
            f"with fetches hanging: {done.stderr.strip()!r}"
        )
        assert done.returncode == 0, done.stderr
        assert timed.since_told < STOP_GRACE + 3, timed
        killed = f"the server did not stop within {STOP_GRACE:.0f}s and was killed"
        assert done.stderr == "" or killed in done.stderr, done.stderr
        assert reader.wait(10) != 0, "the reader got the file whole from a hanging registry"
    finally:
        reader.kill()
        reader.wait()
    assert_nothing_left(mnt, run)
