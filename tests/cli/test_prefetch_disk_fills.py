"""``blockstore prefetch`` on a disk that another file fills while the layer arrives."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from rig.fault_proxy import Fault
from rig.prefetching import blockstore, bytes_asked, cached_bytes, start_prefetch
from rig.small_disk import small_disk
from rig.waiting import wait_for


def fill(disk: Path, leave: int) -> None:
    """Fill ``disk`` with a file to ``leave`` bytes free, while the prefetch writes too."""
    for _ in range(10):
        now = os.statvfs(disk)
        size = now.f_bfree * now.f_frsize - leave
        if subprocess.run(["fallocate", "-l", str(size), str(disk / "filler")]).returncode == 0:
            return
    raise AssertionError("the disk could not be filled")


def test_a_prefetch_whose_disk_fills_stops_fetching_at_once(
    registry, pushed_images, fault_proxy, tmp_path
):
    """Tried: ``prefetch`` of the 64.5 MiB image into a cache on a 160 MiB ext4, over a
    link pacing each 32 KiB, the disk filled by another file (to 2 MiB free) once 16 MiB
    of the layer is cached. Must hold: exit 8 in one line saying the disk filled as the
    layer was fetched and how much it still needs, the last line said; less than 16 MiB
    asked of the registry after the fill (what was on its way), not a "serving uncached
    bytes" warning for each store; `cache verify` clean. Before, the prefetch fetched
    the rest of the layer, then two more whole rounds of it (about 100 MB), each store
    failing or evicting the layer's own chunks, all thrown away."""
    proxy = fault_proxy(registry)
    proxy.fault = Fault("pace", path_contains="/blobs/", method="GET", seconds=0.05)
    reference = pushed_images.large.replace(registry.host, proxy.host)
    with small_disk(tmp_path / "disk", "160M") as disk:
        cache = disk / "cache"
        process = start_prefetch(reference, cache)
        try:
            assert wait_for(lambda: cached_bytes(cache) >= 16 << 20, 120)
            fill(disk, leave=2 << 20)
            asked_before = len(proxy.requests)
            _, err = process.communicate(timeout=180)
        finally:
            process.kill()
            process.wait()
        verify = blockstore("cache", "verify", "--cache-dir", str(cache))

    assert process.returncode == 8, err
    lines = err.strip().splitlines()
    assert "could not be kept whole" in lines[-1], err
    assert "filled as it was fetched; it needs about" in lines[-1], err
    assert sum("serving uncached bytes" in line for line in lines) <= 2, err
    assert bytes_asked(proxy.requests[asked_before:]) < 16 << 20
    assert verify.returncode == 0, verify.stdout + verify.stderr
