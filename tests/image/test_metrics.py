"""``--metrics``: Prometheus text with the cache counters, fetch latency and connections."""

from __future__ import annotations

import contextlib
import itertools
import re
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import nbd
import pytest
from rig.waiting import wait_for

from blockstore import metrics
from blockstore.cache.layout import CHUNK_SIZE
from blockstore.fetch.stream import chunks_of


def scrape(url: str) -> dict[str, float]:
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    assert "# TYPE blockstore_fetch_seconds histogram" in text
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    return samples


def _serving_with_metrics(pushed_images, tmp_path) -> tuple[subprocess.Popen, list[str]]:
    """``serve --metrics`` of the small image on loopback, its log in ``serve.log``; the
    process, once ready, and the lines it printed until then."""
    argv = [sys.executable, "-m", "blockstore", "serve", pushed_images.small, "--insecure"]
    argv += ["--cache-dir", str(tmp_path / "cache"), "--listen", "127.0.0.1:0"]
    argv += ["--metrics", "127.0.0.1:0"]
    with (tmp_path / "serve.log").open("w") as log:
        server = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=log, text=True)
    lines = []
    for line in server.stdout:
        lines.append(line.strip())
        if line.strip() == "ready":
            break
    return server, lines


def test_serve_exports_metrics(pushed_images, erofs_images, tmp_path):
    """Serve an image with --metrics, read through NBD: the scrape must count the bytes
    served and fetched, the fetches' latency, and the one open connection."""
    server, lines = _serving_with_metrics(pushed_images, tmp_path)
    try:
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
    assert server.returncode == 0


def test_idle_metrics_connections_are_bounded_and_closed(monkeypatch):
    """Forty connections to the metrics port that send nothing: at most ``CONNECTIONS``
    are held (a thread each), the rest closed at once, and each held one is closed once
    idle for ``IDLE_TIMEOUT``; a scrape then answers. Before, every idle connection
    held a thread and a descriptor for good: 1,100 of them, 1,100 threads. Each
    connection is made once the server has taken the one before (its listen queue is
    short), and the threads are counted as they handle, not sampled after a pause a
    loaded machine stretches: idle for 2 s, all forty would be held at once without
    the bound."""
    monkeypatch.setattr(metrics, "IDLE_TIMEOUT", 2.0)
    monkeypatch.setattr(metrics._QuietHandler, "timeout", 2.0)
    handling = _count_handling_threads(monkeypatch)
    server = metrics.MetricsServer("127.0.0.1", 0, lambda: {}, lambda: 0)
    host, port = server.address
    idle = []
    try:
        for made in range(1, 41):
            idle.append(socket.create_connection((host, port)))
            assert wait_for(lambda made=made: handling.taken == made)
        for conn in idle:
            conn.settimeout(5)
            assert conn.recv(1) == b""  # closed by the server: at once, or once idle
        assert 0 < handling.most <= metrics.CONNECTIONS
        assert (
            "blockstore_fetch_seconds"
            in urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=5).read().decode()
        )
    finally:
        for conn in idle:
            conn.close()
        server.stop()


class _Handling:
    """How many connections the metrics server has taken (answered or closed at once),
    how many its threads handle now, and the most they ever did."""

    def __init__(self) -> None:
        self.taken = self.now = self.most = 0
        self.lock = threading.Lock()


def _count_handling_threads(monkeypatch) -> _Handling:
    """Count each connection the server takes, and each while a thread handles it:
    inside the place it holds (taken before the thread starts, given back after this
    returns)."""
    handling = _Handling()
    take = metrics._BoundedServer.process_request
    handle = metrics.ThreadingWSGIServer.process_request_thread

    def noted(server, request, client_address) -> None:  # type: ignore[no-untyped-def]
        take(server, request, client_address)
        with handling.lock:
            handling.taken += 1

    def counted(server, request, client_address) -> None:  # type: ignore[no-untyped-def]
        with handling.lock:
            handling.now += 1
            handling.most = max(handling.most, handling.now)
        try:
            handle(server, request, client_address)
        finally:
            with handling.lock:
                handling.now -= 1

    monkeypatch.setattr(metrics._BoundedServer, "process_request", noted)
    monkeypatch.setattr(metrics.ThreadingWSGIServer, "process_request_thread", counted)
    return handling


def test_a_metrics_connection_that_trickles_is_closed_at_its_lifetime(monkeypatch):
    """A connection that sends a byte every 0.2 s is never idle for ``IDLE_TIMEOUT``, but
    is no scrape: it is closed once it has lasted ``CONNECTION_LIFETIME``. Sixteen such
    held every place of the endpoint for good."""
    monkeypatch.setattr(metrics._QuietHandler, "timeout", 0.5)
    monkeypatch.setattr(metrics, "CONNECTION_LIFETIME", 1.0)
    server = metrics.MetricsServer("127.0.0.1", 0, lambda: {}, lambda: 0)
    try:
        conn = socket.create_connection(server.address)
        started = time.monotonic()
        try:
            with contextlib.suppress(OSError):  # the server may reset it as it closes
                while time.monotonic() - started < 10:
                    conn.sendall(b"G")
                    time.sleep(0.2)
                    conn.settimeout(0.01)
                    with contextlib.suppress(TimeoutError):
                        if conn.recv(1) == b"":
                            break
        finally:
            conn.close()
        assert time.monotonic() - started < 3
    finally:
        server.stop()


def test_scrapers_that_reset_leave_no_traceback_on_the_log(pushed_images, tmp_path):
    """Twenty connections to ``serve --metrics`` that send half a request and reset: the
    server's log must hold no traceback (before, each wrote one of 25 lines, as did each
    connection closed for idling), the next scrape must answer and the server exit 0."""
    server, lines = _serving_with_metrics(pushed_images, tmp_path)
    log_path = tmp_path / "serve.log"
    try:
        (metrics_url,) = [line.split()[1] for line in lines if line.startswith("metrics ")]
        host, port = metrics_url.split("/")[2].rsplit(":", 1)
        for _ in range(20):
            conn = socket.create_connection((host, int(port)))
            conn.sendall(b"GET /metrics HTTP/1.0\r\n")
            time.sleep(0.05)  # the server is reading its headers
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            conn.close()
        assert scrape(metrics_url)["blockstore_nbd_open_connections"] == 0
    finally:
        server.terminate()
        server.wait(15)
    assert server.returncode == 0
    assert "Traceback" not in log_path.read_text()


def test_a_metrics_port_in_use_is_said_with_how_to_give_another(pushed_images, tmp_path):
    """Tried: ``serve --metrics`` on a port another socket listens on. Must hold: exit 1
    with one line naming the address, that another server listens there, and the option
    to change, as for ``--listen``. Before, only "Address already in use"."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        argv = [sys.executable, "-m", "blockstore", "serve", pushed_images.small, "--insecure"]
        argv += ["--cache-dir", str(tmp_path / "cache"), "--listen", "127.0.0.1:0"]
        done = subprocess.run(
            [*argv, "--metrics", f"127.0.0.1:{port}"], capture_output=True, text=True, timeout=60
        )
    assert done.returncode == 1, done.stderr
    said = done.stderr.strip().splitlines()[-1]
    assert said.startswith(f"blockstore: cannot serve metrics on 127.0.0.1:{port}: "), said
    assert said.endswith("another server listens there: give another --metrics HOST:PORT")


def test_only_the_metrics_path_answers_with_metrics():
    """Paths other than ``/metrics`` (``/``, ``/admin``, ``/metricsX``) are asked of the
    metrics port: each is a 404 whose body says where the metrics are, and ``/metrics``
    still answers. Before, every path answered with the metrics, so a mistyped URL in a
    scrape config or a probe of ``/healthz`` looked like success."""
    server = metrics.MetricsServer("127.0.0.1", 0, lambda: {}, lambda: 0)
    host, port = server.address
    try:
        for path in ("/", "/admin", "/metricsX", "/favicon.ico"):
            with pytest.raises(urllib.error.HTTPError) as refused:
                urllib.request.urlopen(f"http://{host}:{port}{path}", timeout=5)
            assert refused.value.code == 404, path
            assert b"/metrics" in refused.value.read()
        assert scrape(f"http://{host}:{port}/metrics")["blockstore_nbd_open_connections"] == 0
    finally:
        server.stop()


class StreamHeldAfterItsLastByte:
    """A streaming backend whose range has come whole while its stream's end is held back
    (the response's close still to come, its thread not scheduled yet)."""

    digest = "sha256:" + "0" * 64
    size = 2 * CHUNK_SIZE

    def __init__(self) -> None:
        self.end = threading.Event()

    def read_range(self, offset: int, length: int) -> bytes:
        return bytes(min(length, self.size - offset))

    def stream_range(self, offset: int, length: int):
        yield self.read_range(offset, length)
        assert self.end.wait(10)


def fetches_timed() -> float:
    """How many backend reads the latency histogram has counted in this process."""
    (family,) = metrics.FETCH_LATENCY.collect()
    return next(s.value for s in family.samples if s.name == "blockstore_fetch_seconds_count")


def test_a_fetch_is_timed_before_its_last_chunk_is_handed_on():
    """Tried: a range read chunk by chunk (as the fetcher reads it) through ``TimedSource``
    from a backend that holds its stream's end back once every byte has come. Must hold:
    the read is counted in the latency histogram by the time its last chunk is handed on,
    and once in all when the stream ends. A reader served that chunk, then scraping, finds
    its fetch counted; before, it was counted only at the stream's end, after the reply,
    and a scrape right after a read could find none."""
    source = StreamHeldAfterItsLastByte()
    before = fetches_timed()
    chunks = chunks_of(metrics.TimedSource(source), 0, 2, CHUNK_SIZE)
    assert [index for index, _ in itertools.islice(chunks, 2)] == [0, 1]
    assert fetches_timed() == before + 1, "the last chunk was handed on before it was timed"
    source.end.set()
    assert list(chunks) == []
    assert fetches_timed() == before + 1
