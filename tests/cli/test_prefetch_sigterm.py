"""``blockstore prefetch`` stopped by SIGTERM, as a service manager or ``timeout`` stops it."""

from __future__ import annotations

import signal

from rig.fault_proxy import Fault
from rig.prefetching import blockstore, bytes_asked, cached_bytes, start_prefetch
from rig.waiting import wait_for


def test_sigterm_ends_a_prefetch_as_an_interrupt_keeping_what_came(
    registry, pushed_images, erofs_images, fault_proxy, tmp_path
):
    """Tried: SIGTERM to ``prefetch`` of the 64 MiB image over a link pacing each 32 KiB,
    once a tenth of the layer is cached. Must hold: exit 130 in one line, "interrupted",
    as Ctrl-C; `cache verify` clean; a rerun seals the layer asking for exactly the bytes
    still missing. Before, the signal ended the process at once (status -15, 143 in a
    shell), saying nothing, the chunks on their way lost."""
    proxy = fault_proxy(registry)
    proxy.fault = Fault("pace", path_contains="/blobs/", method="GET", seconds=0.02)
    reference = pushed_images.large.replace(registry.host, proxy.host)
    cache = tmp_path / "cache"
    process = start_prefetch(reference, cache)
    try:
        assert wait_for(lambda: cached_bytes(cache) >= 6 << 20, 60)
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=60)
    finally:
        process.kill()
        process.wait()

    assert process.returncode == 130, err
    assert err.strip().splitlines() == ["blockstore: interrupted"], err
    verify = blockstore("cache", "verify", "--cache-dir", str(cache))
    assert verify.returncode == 0, verify.stdout + verify.stderr
    kept = cached_bytes(cache)
    proxy.fault = None
    before = len(proxy.requests)
    again = blockstore("prefetch", reference, "--insecure", "--cache-dir", str(cache))
    assert again.returncode == 0 and "verified and sealed" in again.stdout, again.stderr
    assert bytes_asked(proxy.requests[before:]) == erofs_images.large.size - kept
