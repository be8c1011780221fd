"""``--metrics``: Prometheus text with the cache counters, fetch latency and connections."""

from __future__ import annotations

import re
import subprocess
import sys
import urllib.request

import nbd


def scrape(url: str) -> dict[str, float]:
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    assert "# TYPE blockstore_fetch_seconds histogram" in text
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    return samples


def test_serve_exports_metrics(pushed_images, erofs_images, tmp_path):
    """Serve an image with --metrics, read through NBD: the scrape must count the bytes
    served and fetched, the fetches' latency, and the one open connection."""
    argv = [sys.executable, "-m", "blockstore", "serve", pushed_images.small, "--insecure"]
    argv += ["--cache-dir", str(tmp_path / "cache"), "--listen", "127.0.0.1:0"]
    argv += ["--metrics", "127.0.0.1:0"]
    log = (tmp_path / "serve.log").open("w")
    server = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=log, text=True)
    try:
        lines = []
        for line in server.stdout:
            lines.append(line.strip())
            if line.strip() == "ready":
                break
        (metrics_url,) = [line.split()[1] for line in lines if line.startswith("metrics ")]
        uri = next(line.split()[2] for line in lines if line.startswith("export layer0 "))
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+/metrics", metrics_url)

        before = scrape(metrics_url)
        assert before["blockstore_nbd_open_connections"] == 0
        handle = nbd.NBD()
        handle.connect_uri(uri)
        data = handle.pread(1 << 20, 0)
        assert data == erofs_images.small.path.read_bytes()[: 1 << 20]
        after = scrape(metrics_url)
        assert after["blockstore_nbd_open_connections"] == 1
        handle.shutdown()

        assert after["blockstore_cache_bytes_served_total"] >= 1 << 20
        assert after["blockstore_cache_bytes_fetched_total"] >= 1 << 20
        # 1 MiB is 32 chunks, each counted once as a hit or a miss; the EROFS start may
        # have fetched the first ones before the read, so only their sum is fixed.
        counted = after["blockstore_cache_misses_total"] + after["blockstore_cache_hits_total"]
        assert counted >= 32 and after["blockstore_cache_misses_total"] >= 1
        assert after["blockstore_fetch_seconds_count"] >= 1
        assert (
            after['blockstore_fetch_seconds_bucket{le="+Inf"}']
            == after["blockstore_fetch_seconds_count"]
        )
    finally:
        server.terminate()
        server.wait(15)
        log.close()
    assert server.returncode == 0
