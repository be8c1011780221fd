"""Every read ends within its timeout, and a registry's request for quiet is kept by all.

A fault proxy in front of the real registry stalls, trickles and refuses;
each read must end with the right bytes or with EIO within its timeout,
never later, and never by knocking on a registry that asked for quiet.
"""

from __future__ import annotations

import select
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from rig.fault_proxy import Fault
from rig.waiting import wait_for

from blockstore.cli import build_parser, exit_code
from blockstore.errors import BlobReadError, RegistryError, RegistryUnreachable
from blockstore.registry import RegistryBlob, RegistryClient, RegistryOptions, resolve_image
from blockstore.registry.retry import Deadline

BLOCKSTORE = [sys.executable, "-m", "blockstore"]


def client_via(proxy, **options) -> RegistryClient:
    return RegistryClient(proxy.host, RegistryOptions(**{"insecure": True, **options}))


def open_blob(client: RegistryClient, repository: str = "fixtures/small") -> RegistryBlob:
    image = resolve_image(client, f"{client.registry}/{repository}:v1", None)
    return RegistryBlob(client, repository, image.layers[0])


def failing_read(blob: RegistryBlob, offset: int, length: int) -> tuple[BlobReadError, float]:
    started = time.monotonic()
    with pytest.raises(BlobReadError) as caught:
        blob.read_range(offset, length)
    return caught.value, time.monotonic() - started


def test_a_trickling_registry_cannot_hold_a_read_past_its_deadline(
    registry, pushed_images, fault_proxy
):
    """One byte every 0.3 s never trips a per-receive timeout: the read's one deadline
    (2 s) ends it with EIO, not the 6 s the 20 bytes would take to trickle in."""
    proxy = fault_proxy(registry)
    with client_via(proxy, timeout=2.0) as client:
        blob = open_blob(client)
        proxy.fault = Fault("trickle", seconds=0.3, path_contains="/blobs/")
        error, took = failing_read(blob, 0, 20)
    assert error.errno == 5
    assert 1.9 <= took < 3.0, took


def test_a_registry_that_stops_answering_fails_the_read_within_the_timeout(
    registry, pushed_images, fault_proxy
):
    """Requests reach the registry and no reply ever comes: EIO within the 2 s timeout,
    after more than one attempt (a stalled connection is given up while time is left)."""
    proxy = fault_proxy(registry)
    with client_via(proxy, timeout=2.0) as client:
        blob = open_blob(client)
        proxy.fault = Fault("delay", seconds=30, path_contains="/blobs/")
        error, took = failing_read(blob, 0, 4096)
    assert "timed out" in str(error)
    assert took < 2.5, took
    assert proxy.faults_applied >= 2


def test_a_retry_after_longer_than_the_timeout_is_kept_by_every_reader(
    registry, pushed_images, fault_proxy
):
    """429 with Retry-After: 120. The first read fails at once; so do eight more reads
    from eight threads, without one more request to the registry while it asked for quiet."""
    proxy = fault_proxy(registry)
    with client_via(proxy, timeout=5.0) as client:
        blob = open_blob(client)
        proxy.fault = Fault(
            "status", status=429, headers={"Retry-After": "120"}, path_contains="/blobs/"
        )
        _, took = failing_read(blob, 0, 4096)
        errors: list[BaseException] = []

        def read() -> None:
            try:
                blob.read_range(8192, 4096)
            except BlobReadError as exc:
                errors.append(exc)

        started = time.monotonic()
        readers = [threading.Thread(target=read) for _ in range(8)]
        for reader in readers:
            reader.start()
        for reader in readers:
            reader.join(10)
        others_took = time.monotonic() - started
    assert took < 1.0 and others_took < 1.0, (took, others_took)
    assert len(errors) == 8 and all("asked for a pause" in str(e) for e in errors)
    assert proxy.faults_applied == 1


def test_a_short_quiet_is_waited_out_within_the_deadline(
    registry, pushed_images, erofs_images, fault_proxy
):
    """503 with Retry-After: 1, once: a read waits it out and gets the right bytes; a
    read started once the 503 came waits for the same quiet instead of asking at once:
    no request reaches the registry within the second after the refused one did."""
    proxy = fault_proxy(registry)
    expected = erofs_images.small.path.read_bytes()
    with client_via(proxy, timeout=5.0) as client:
        blob = open_blob(client)
        proxy.fault = Fault(
            "status", status=503, headers={"Retry-After": "1"}, times=1, path_contains="/blobs/"
        )
        got: dict[str, bytes] = {}
        first = threading.Thread(target=lambda: got.update(a=blob.read_range(0, 5000)))
        asked = len(proxy.requests)
        first.start()
        assert wait_for(lambda: client.upstream.quiet.left() > 0)  # the 503 came
        started = time.monotonic()
        got["b"] = blob.read_range(10_000, 5000)
        second_took = time.monotonic() - started
        first.join(10)
    assert got == {"a": expected[:5000], "b": expected[10_000:15_000]}
    assert proxy.faults_applied == 1
    refused, *later = [r.arrived for r in proxy.requests[asked:] if "/blobs/" in r.path]
    assert len(later) == 2 and min(later) >= refused + 1.0, (refused, later)
    assert second_took < 2.0, second_took  # the one quiet, not a second


def test_manifest_requests_keep_the_quiet_too(registry, pushed_images, fault_proxy):
    """A 503 with Retry-After: 60 on the manifest: resolving fails at once with the
    registry's own error, and a second resolve does not ask again."""
    proxy = fault_proxy(registry)
    proxy.fault = Fault(
        "status", status=503, headers={"Retry-After": "60"}, path_contains="/manifests/"
    )
    with client_via(proxy, timeout=5.0) as client:
        with pytest.raises(RegistryError, match="HTTP 503"):
            resolve_image(client, f"{proxy.host}/fixtures/small:v1", None)
        with pytest.raises(RegistryError, match="asked for a pause"):
            resolve_image(client, f"{proxy.host}/fixtures/small:v1", None)
    assert proxy.faults_applied == 1


def test_prefetch_timeout_option_bounds_a_stalled_registry(
    registry, pushed_images, fault_proxy, tmp_path: Path
):
    """``prefetch --timeout 2`` against a registry whose blobs never come: it fails with
    the unreachable-registry code (5) in one line, in a few seconds, not a minute."""
    proxy = fault_proxy(registry)
    proxy.fault = Fault("delay", seconds=30, method="GET", path_contains="/blobs/sha256:")
    started = time.monotonic()
    done = subprocess.run(
        [
            *BLOCKSTORE,
            "prefetch",
            f"{proxy.host}/fixtures/small:v1",
            "--insecure",
            "--timeout",
            "2",
            "--cache-dir",
            str(tmp_path / "cache"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    took = time.monotonic() - started
    # The registry never answered the read: it exits as an unreachable registry does.
    assert done.returncode == RegistryUnreachable.exit_code, done.stderr
    assert "timed out" in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert took < 12, took


@pytest.mark.parametrize("command", ["serve", "mount", "prefetch"])
@pytest.mark.parametrize("value", ["0", "-3", "soon", "nan", "1e9"])
def test_a_timeout_that_is_not_a_time_is_a_usage_error(command, value, tmp_path: Path, capsys):
    """``--timeout`` is taken by serve, mount and prefetch, and refuses 0, negatives,
    words, NaN and more than a day with a usage error (2) that names the option."""
    extra = [str(tmp_path)] if command == "mount" else []
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args([command, "127.0.0.1:1/a/b:v1", *extra, "--timeout", value])
    assert exited.value.code == 2
    assert "--timeout" in capsys.readouterr().err


def test_mount_hands_its_timeout_to_the_server_it_starts(tmp_path: Path):
    """``mount --timeout 7`` starts its server with ``--timeout 7.0``: the reads the
    kernel sends through the mount have the deadline the user gave."""
    from blockstore.cli.mount_options import serve_command

    args = build_parser().parse_args(
        ["mount", "127.0.0.1:5000/a/b:v1", str(tmp_path), "--timeout", "7"]
    )
    argv, _ = serve_command(args)
    assert argv[argv.index("--timeout") + 1] == "7.0"
    assert build_parser().parse_args(["serve", "127.0.0.1:5000/a/b:v1"]).timeout == 30.0


def test_an_nbd_read_from_a_trickling_registry_fails_within_the_timeout_then_recovers(
    registry, pushed_images, erofs_images, fault_proxy, tmp_path: Path
):
    """``serve --timeout 2`` in front of a registry that trickles: an NBD client's read
    gets EIO within a few seconds instead of sitting for ever; once the registry is
    sound, the same connection reads the right bytes, and SIGTERM stops the server."""
    nbd = pytest.importorskip("nbd", reason="libnbd's Python bindings (python3-libnbd)")
    proxy = fault_proxy(registry)
    socket_path = tmp_path / "nbd.sock"
    server = subprocess.Popen(
        [
            *BLOCKSTORE,
            "serve",
            f"{proxy.host}/fixtures/small:v1",
            "--insecure",
            "--timeout",
            "2",
            "--unix",
            str(socket_path),
            "--cache-dir",
            str(tmp_path / "cache"),
            # No prefetch at open: the read below must be the one that meets the trickle.
            "--no-erofs-start",
            "--no-erofs-walk",
            "--no-readahead",
            "--no-trace",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert any(line.strip() == "ready" for line in server.stdout), "serve never got ready"
        proxy.fault = Fault("trickle", seconds=0.5, method="GET", path_contains="/blobs/")
        client = nbd.NBD()
        client.connect_unix(str(socket_path))
        started = time.monotonic()
        with pytest.raises(nbd.Error) as failed:
            client.pread(4096, 0)
        assert time.monotonic() - started < 5
        assert failed.value.errnum == 5
        proxy.fault = None
        # The failed range gave its lease back at once: the next read of it fetches now,
        # well within the timeout, not after waiting the 2 s out on a lease still held.
        started = time.monotonic()
        assert client.pread(4096, 0) == erofs_images.small.path.read_bytes()[:4096]
        assert time.monotonic() - started < 1.0
        client.shutdown()
        server.terminate()
        assert server.wait(timeout=10) == 0
    finally:
        if server.poll() is None:
            server.kill()
        server.wait()
        server.stdout.close()


def test_a_streamed_read_past_its_deadline_says_so(registry, pushed_images, fault_proxy):
    """A streamed range whose reader stalls past the 2 s timeout between two pieces (as a
    process stopped and continued does): the EIO says the reply did not arrive in time
    and how much came, rather than naming only the class of its own error (an OSError,
    as a broken connection's are). The reply may take all 2 s to start (a loaded
    machine); the reader stalls until the deadline has passed, however late that is."""
    proxy = fault_proxy(registry)
    with client_via(proxy) as client:
        blob = open_blob(client)
        deadline = Deadline(2.0, stall=2.0)
        pieces = client.stream_blob_range(
            "fixtures/small", blob.digest, 0, blob.size - 1, blob.size, deadline=deadline
        )
        first = next(pieces)
        time.sleep(deadline.left() + 0.1)
        with pytest.raises(BlobReadError) as caught:
            for _ in pieces:
                pass
    said = f"did not arrive within 2s ({len(first)} bytes came)"
    assert said in str(caught.value), caught.value


def test_a_streamed_read_whose_only_attempt_ends_at_its_deadline_is_a_read_error(
    registry, pushed_images, fault_proxy
):
    """Tried: the registry asks for a second of quiet (503, ``Retry-After: 1``), then
    stops answering; a streamed read (the fetch engine's kind) under a 1.5 s timeout
    waits out the quiet and makes its one attempt in what is left. Must hold: it ends
    within the timeout as a read error (EIO) caused by the registry being unreachable,
    so a command exits 5 as for any read; before, the retry machinery's internal signal
    escaped the read, as no error of the engine's, and a command exited 7."""
    proxy = fault_proxy(registry)
    with client_via(proxy, timeout=1.5) as client:
        blob = open_blob(client)
        busy = {"Retry-After": "1"}
        proxy.fault = Fault("status", status=503, headers=busy, path_contains="/blobs/sha256:")
        with pytest.raises(BlobReadError, match="503"):
            blob.read_range(0, 4096)  # its last 503 asks for quiet until a second from now
        proxy.fault = Fault("delay", seconds=30, method="GET", path_contains="/blobs/sha256:")
        started = time.monotonic()
        with pytest.raises(BlobReadError) as caught:
            list(blob.stream_range(0, 4096))
        took = time.monotonic() - started
    assert caught.value.errno == 5
    assert exit_code(caught.value) == RegistryUnreachable.exit_code, repr(caught.value)
    assert "timed out" in str(caught.value)
    assert took < 2.5, took


class TricklingHeads:
    """A server on 127.0.0.1 answering each request ``HTTP/1.1 200 OK``, then its
    headers one byte each ``every`` seconds for ever; or (``junk_after_head``) a HEAD
    with its whole head, saying a body of 100 bytes, then, once the next request has
    come on that connection, those bytes one at a time: junk where a reply to that
    request should start."""

    def __init__(self, *, junk_after_head: bool = False, every: float = 0.25):
        self.junk_after_head = junk_after_head
        self.every = every
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.host = f"127.0.0.1:{self.listener.getsockname()[1]}"
        self.stop = threading.Event()
        self.connections = 0
        self.hung_up = threading.Event()
        """The client closed a connection while it trickled."""
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        self.stop.set()
        self.listener.close()

    def _accept(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            if not self._request(conn):
                return
            if self.junk_after_head:
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n")
                if not self._request(conn):
                    return
                trickle = b"x" * 100
            else:
                conn.sendall(b"HTTP/1.1 200 OK\r\n")
                trickle = b"X-Slow: " + b"a" * 100_000
            for byte in trickle:
                if self.stop.is_set():
                    return
                if select.select([conn], [], [], self.every)[0] and not conn.recv(4096):
                    self.hung_up.set()
                    return
                try:
                    conn.sendall(bytes([byte]))
                except OSError:
                    self.hung_up.set()
                    return

    @staticmethod
    def _request(conn: socket.socket) -> bool:
        """Read one request's head (these requests have no body); False at the end."""
        got = b""
        while b"\r\n\r\n" not in got:
            piece = conn.recv(4096)
            if not piece:
                return False
            got += piece
        return True


@pytest.fixture
def trickling_heads():
    servers: list[TricklingHeads] = []

    def start(**kwargs) -> TricklingHeads:
        servers.append(TricklingHeads(**kwargs))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def ended_within(seconds: float, call):
    """``call()``'s result (or error) and how long it took; a call still running after
    ``seconds`` fails the test (its server, closed then, lets it end)."""
    outcome: list = []

    def run() -> None:
        try:
            outcome.append(call())
        except Exception as exc:
            outcome.append(exc)

    started = time.monotonic()
    caller = threading.Thread(target=run, daemon=True)
    caller.start()
    caller.join(seconds)
    if not outcome:
        pytest.fail(f"still waiting after {seconds}s")
    return outcome[0], time.monotonic() - started


@pytest.mark.parametrize("method", ["GET", "HEAD"])
def test_a_reply_whose_headers_trickle_ends_at_the_deadline(trickling_heads, method):
    """Tried: a server answering ``HTTP/1.1 200 OK``, then a header byte each quarter
    second for ever (quicker than the 2 s timeout's per-receive stall, 0.67 s), to a
    range read (GET) and a blob's size (HEAD). Must hold: each fails within 8 s as an
    unreachable registry, "timed out", and the connection is closed, not pooled. Before,
    the deadline was looked at only once the headers were in: the read waited for ever
    (``prefetch --timeout 10`` never ended; a reader in a FUSE mount sat in state D)."""
    server = trickling_heads()
    digest = "sha256:" + "0" * 64
    options = RegistryOptions(insecure=True, timeout=2.0)
    with RegistryClient(server.host, options) as client:
        if method == "GET":
            error, took = ended_within(
                8, lambda: client.read_blob_range("fixtures/small", digest, 0, 99, 100)
            )
        else:
            error, took = ended_within(8, lambda: client.blob_size("fixtures/small", digest))
        assert isinstance(error, RegistryUnreachable), repr(error)
        assert "timed out" in str(error)
        assert took < 8, took
        assert server.hung_up.wait(3), "the connection was left open"


def test_junk_after_a_head_reply_holds_no_later_request(trickling_heads):
    """Tried: a HEAD answered 200 with ``Content-Length: 100`` (a HEAD's reply has no
    body), its connection kept, and those 100 bytes trickled once the next request came
    on it, a byte each quarter second: the next blob check (an upload's, with no overall
    deadline) reads them where its reply's status line should be. Must hold: that
    attempt gives up within the stall (0.67 s) and closes the connection; the next, on
    a new one, answers. Before, the check waited for ever on the junk."""
    server = trickling_heads(junk_after_head=True)
    digest = "sha256:" + "0" * 64
    options = RegistryOptions(insecure=True, timeout=2.0)
    with RegistryClient(server.host, options) as client:
        assert client.blob_exists("fixtures/small", digest)
        found, took = ended_within(8, lambda: client.blob_exists("fixtures/small", digest))
        assert found is True, repr(found)
        assert took < 4, took
        assert server.hung_up.wait(3), "the connection holding junk was left open"
        assert server.connections == 2
