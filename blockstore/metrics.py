"""Prometheus metrics: fetch latency, the cache's counters, open connections.

``TimedSource`` is a filter over any ``BlobSource`` (the way nbdkit stacks
filters over a plugin): it measures every backend read without the cache or
the registry client knowing. ``MetricsServer`` publishes, through
``prometheus_client``, the latency histogram and whatever the serving
process hands it (the cache's stats, the open connections), read at each
scrape.
"""

from __future__ import annotations

import contextlib
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import CollectorRegistry, Histogram, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import ThreadingWSGIServer
from prometheus_client.registry import Collector

from blockstore.fetch.stream import pieces
from blockstore.source import BlobSource

LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

FETCH_LATENCY = Histogram(
    "blockstore_fetch_seconds",
    "Latency of range reads from the backend.",
    buckets=LATENCY_BUCKETS,
    registry=None,  # each MetricsServer's registry holds it
)
"""Seconds per backend range read, in this process."""


class TimedSource:
    """A ``BlobSource`` that records how long each read of the one below takes."""

    def __init__(self, inner: BlobSource):
        self._inner = inner
        self._histogram = FETCH_LATENCY

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
        """The range as it arrives (streamed when the source can), timed to its last byte.

        Timed before that byte is handed on, not when the stream ends after it: the
        reader served it may scrape at once, and must find its fetch counted.
        """
        stopwatch = _Stopwatch(self._histogram)
        left = max(0, min(length, self.size - offset))
        try:
            for piece in pieces(self._inner, offset, length):
                left -= len(piece)
                if left <= 0:
                    stopwatch.stop()
                yield piece
        finally:
            stopwatch.stop()  # a stream that failed, or was let go, before its last byte

    def __repr__(self) -> str:
        return repr(self._inner)


class _Stopwatch:
    """One observation of the time since it was made, however often it is stopped."""

    def __init__(self, histogram: Histogram):
        self._histogram = histogram
        self._started: float | None = time.monotonic()

    def stop(self) -> None:
        if self._started is not None:
            self._histogram.observe(time.monotonic() - self._started)
            self._started = None


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


class ServingCollector(Collector):
    """The cache's stats and the open NBD connections, read afresh at each scrape."""

    def __init__(self, stats: Callable[[], dict], open_connections: Callable[[], int]):
        self._stats = stats
        self._open_connections = open_connections

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        stats = self._stats()
        for key, help_text in COUNTER_HELP.items():
            yield CounterMetricFamily(f"blockstore_cache_{key}", help_text, stats.get(key, 0))
        for key, help_text in GAUGE_HELP.items():
            yield GaugeMetricFamily(f"blockstore_cache_{key}", help_text, stats.get(key, 0))
        yield GaugeMetricFamily(
            "blockstore_nbd_open_connections",
            "NBD connections open now.",
            self._open_connections(),
        )


class MetricsServer:
    """``GET /metrics`` on a loopback (or chosen) address, in a daemon thread.

    Binding happens here, so a port in use fails before anything is announced.
    """

    def __init__(
        self,
        host: str,
        port: int,
        stats: Callable[[], dict],
        open_connections: Callable[[], int],
    ):
        registry = CollectorRegistry(auto_describe=True)
        registry.register(FETCH_LATENCY)
        registry.register(ServingCollector(stats, open_connections))
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        server = type("_Server", (_BoundedServer,), {"address_family": family})
        self._httpd = make_server(
            host, port, _only_metrics(make_wsgi_app(registry)), server, handler_class=_QuietHandler
        )
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, name="metrics", daemon=True
        )
        self._thread.start()
        self.address = self._httpd.server_address[:2]

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(5)


def _only_metrics(app: Callable) -> Callable:
    """``app`` at ``/metrics`` alone: prometheus_client answers every path with the
    metrics, so a mistyped scrape URL or a health probe would look like success."""

    def routed(environ: dict, start_response: Callable) -> Iterable[bytes]:
        if environ.get("PATH_INFO") == "/metrics":
            return app(environ, start_response)
        start_response("404 Not Found", [("Content-Type", "text/plain; charset=utf-8")])
        return [b"not found: the metrics are at /metrics\n"]

    return routed


# prometheus_client's own server (``start_http_server``) gives each connection a thread
# and no timeout: idle connections, by the thousand, held as many threads and fds.
CONNECTIONS = 16
"""Connections answered at once; more are closed as they come."""
IDLE_TIMEOUT = 10.0
"""Seconds a connection may send nothing (a scrape sends at once) before it is closed."""
CONNECTION_LIFETIME = 30.0
"""Seconds a connection may last in all: one that sends a byte now and then is no
scrape, and would hold its place for good."""


class _QuietHandler(WSGIRequestHandler):
    timeout = IDLE_TIMEOUT  # StreamRequestHandler puts it on the socket

    def setup(self) -> None:
        super().setup()
        self._cutoff = threading.Timer(CONNECTION_LIFETIME, self._cut)
        self._cutoff.daemon = True
        self._cutoff.start()

    def finish(self) -> None:
        self._cutoff.cancel()
        super().finish()

    def _cut(self) -> None:
        with contextlib.suppress(OSError):
            self.connection.shutdown(socket.SHUT_RDWR)

    def log_message(self, format: str, *args: object) -> None:
        """No line per scrape on the server's log."""


class _BoundedServer(ThreadingWSGIServer):
    """A thread per connection, ``CONNECTIONS`` at most."""

    def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        self._slots = threading.BoundedSemaphore(CONNECTIONS)
        super().__init__(*args, **kwargs)

    def process_request(self, request, client_address) -> None:  # type: ignore[no-untyped-def]
        if not self._slots.acquire(blocking=False):
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:  # no thread started: it will not give the place back
            self._slots.release()
            raise

    def process_request_thread(self, request, client_address) -> None:  # type: ignore[no-untyped-def]
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def handle_error(self, request, client_address) -> None:  # type: ignore[no-untyped-def]
        """A scraper that went quiet or away is no fault of the server's: no traceback
        on its log, which one looping scraper would otherwise fill."""
        if not isinstance(sys.exc_info()[1], OSError):
            super().handle_error(request, client_address)
