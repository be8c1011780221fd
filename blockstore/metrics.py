"""Prometheus metrics: fetch latency, the cache's counters, open connections.

``TimedSource`` is a filter over any ``BlobSource`` (the way nbdkit stacks
filters over a plugin): it measures every backend read without the cache or
the registry client knowing. ``MetricsServer`` answers ``GET /metrics`` in
the Prometheus text format from whatever the serving process hands it.
"""

from __future__ import annotations

import bisect
import logging
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from blockstore.fetch.stream import pieces
from blockstore.source import BlobSource

log = logging.getLogger(__name__)

LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class LatencyHistogram:
    """A cumulative Prometheus histogram of seconds, safe across threads."""

    def __init__(self, buckets: tuple[float, ...] = LATENCY_BUCKETS):
        self.buckets = buckets
        self._counts = [0] * (len(buckets) + 1)
        self._sum = 0.0
        self._lock = threading.Lock()

    def observe(self, seconds: float) -> None:
        slot = bisect.bisect_left(self.buckets, seconds)
        with self._lock:
            self._counts[slot] += 1
            self._sum += seconds

    def render(self, name: str, help_text: str) -> list[str]:
        with self._lock:
            counts, total = list(self._counts), self._sum
        lines = [f"# HELP {name} {help_text}", f"# TYPE {name} histogram"]
        running = 0
        for bound, count in zip(self.buckets, counts, strict=False):
            running += count
            lines.append(f'{name}_bucket{{le="{bound}"}} {running}')
        running += counts[-1]
        lines += [f'{name}_bucket{{le="+Inf"}} {running}', f"{name}_sum {total}"]
        lines.append(f"{name}_count {running}")
        return lines


FETCH_LATENCY = LatencyHistogram()
"""Seconds per backend range read, in this process."""


class TimedSource:
    """A ``BlobSource`` that records how long each read of the one below takes."""

    def __init__(self, inner: BlobSource, histogram: LatencyHistogram = FETCH_LATENCY):
        self._inner = inner
        self._histogram = histogram

    @property
    def digest(self) -> str:
        return self._inner.digest

    @property
    def size(self) -> int:
        return self._inner.size

    def read_range(self, offset: int, length: int) -> bytes:
        started = time.monotonic()
        try:
            return self._inner.read_range(offset, length)
        finally:
            self._histogram.observe(time.monotonic() - started)

    def stream_range(self, offset: int, length: int) -> Iterator[bytes]:
        """The range as it arrives (streamed when the source can), timed to its last byte."""
        started = time.monotonic()
        try:
            yield from pieces(self._inner, offset, length)
        finally:
            self._histogram.observe(time.monotonic() - started)

    def __repr__(self) -> str:
        return repr(self._inner)


COUNTER_HELP = {
    "hits": "Chunk reads served from the cache.",
    "misses": "Chunk reads that had to be fetched.",
    "bytes_served": "Bytes returned to readers.",
    "bytes_fetched": "Bytes fetched from the backend.",
    "requests_fetched": "Range requests sent to the backend.",
    "checksum_failures": "Chunks that failed their checksum and were dropped.",
    "seals": "Blobs verified against their digest and sealed.",
    "seal_failures": "Blobs whose bytes did not match their digest.",
    "evictions": "Chunks evicted to keep the cache under its cap.",
}
GAUGE_HELP = {
    "stored_bytes": "Bytes of chunks in the cache.",
    "size_cap": "The cache's size cap in bytes.",
    "blobs": "Blobs known to the cache.",
    "sealed_blobs": "Blobs complete and verified.",
    "pinned_blobs": "Blobs that eviction leaves alone.",
}


def render(stats: dict, open_connections: int) -> str:
    """The Prometheus text exposition of the cache's stats and this server."""
    lines: list[str] = []
    for key, help_text in COUNTER_HELP.items():
        name = f"blockstore_cache_{key}_total"
        lines += [f"# HELP {name} {help_text}", f"# TYPE {name} counter"]
        lines.append(f"{name} {stats.get(key, 0)}")
    for key, help_text in GAUGE_HELP.items():
        name = f"blockstore_cache_{key}"
        lines += [f"# HELP {name} {help_text}", f"# TYPE {name} gauge"]
        lines.append(f"{name} {stats.get(key, 0)}")
    lines += FETCH_LATENCY.render(
        "blockstore_fetch_seconds", "Latency of range reads from the backend."
    )
    lines += [
        "# HELP blockstore_nbd_open_connections NBD connections open now.",
        "# TYPE blockstore_nbd_open_connections gauge",
        f"blockstore_nbd_open_connections {open_connections}",
    ]
    return "\n".join(lines) + "\n"


class MetricsServer:
    """``GET /metrics`` on a loopback (or chosen) address, in a daemon thread."""

    def __init__(self, host: str, port: int, exposition: Callable[[], str]):
        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path.split("?")[0] != "/metrics":
                    self.send_error(404)
                    return
                body = exposition().encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                log.debug("metrics: " + format, *args)

        self._httpd = ThreadingHTTPServer((host, port), Handler)
        self._httpd.daemon_threads = True
        self.address = self._httpd.server_address[:2]
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, name="metrics", daemon=True
        )

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
