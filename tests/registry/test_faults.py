"""The client against a misbehaving network: a fault proxy in front of the real registry."""

from __future__ import annotations

import gzip
import io
import itertools
import os
import tarfile
import threading
import time
import tracemalloc
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import pytest
from rig.fault_proxy import Fault
from rig.pushed import push_erofs

from blockstore.errors import AuthError, BlobReadError, IntegrityError, NotFound, RegistryError
from blockstore.registry import (
    RegistryBlob,
    RegistryClient,
    RegistryOptions,
    replies,
    resolve_image,
)
from blockstore.registry.auth import basic_header
from blockstore.registry.credentials import Credentials

MiB = 1 << 20


def client_via(proxy, **options) -> RegistryClient:
    settings = {"insecure": True, "timeout": 5.0, **options}
    return RegistryClient(proxy.host, RegistryOptions(**settings))


def open_blob(client: RegistryClient, repository: str) -> RegistryBlob:
    image = resolve_image(client, f"{client.registry}/{repository}:v1", None)
    return RegistryBlob(client, repository, image.layers[0])


def test_server_ignoring_range_is_streamed_with_flat_memory(
    registry, pushed_images, erofs_images, fault_proxy
):
    """A 200 with the whole 64 MiB blob instead of a 206: the right bytes come back,
    and the reader never holds more than a few MiB of it."""
    proxy = fault_proxy(registry)
    proxy.fault = Fault("ignore_range", path_contains="/blobs/")
    data = erofs_images.large.path.read_bytes()
    with client_via(proxy) as client:
        blob = open_blob(client, "fixtures/large")
        offset = blob.size - 3 * MiB
        tracemalloc.start()
        try:
            piece = blob.read_range(offset, MiB)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert piece == data[offset : offset + MiB]
    assert proxy.faults_applied >= 1
    assert peak < 8 * MiB, f"peak {peak / MiB:.1f} MiB while skipping a 64 MiB body"


@pytest.fixture
def storage_redirect(basic_auth_registry, fault_proxy):
    """A registry that redirects blob requests (GET and HEAD) with 307 to another host,
    the way registries backed by object storage or a CDN do."""
    storage_auth = basic_header(
        Credentials(basic_auth_registry.username, basic_auth_registry.password)
    )
    storage = fault_proxy(
        basic_auth_registry, listen="127.0.0.2", upstream_headers={"Authorization": storage_auth}
    )
    front = fault_proxy(basic_auth_registry)
    front.fault = Fault("redirect", path_contains="/blobs/sha256:", redirect_to=storage.url)
    return front, storage


def test_redirect_is_followed_without_leaking_authorization(
    storage_redirect, basic_auth_registry, erofs_images
):
    """Push (HEAD on blobs) and ranged reads (GET) follow the 307; the registry's
    Authorization goes to the registry only, never to the storage host."""
    front, storage = storage_redirect
    options = basic_auth_registry.options(insecure=True)
    ref = push_erofs(
        front.host, "faults/redirect", "v1", [erofs_images.small.path], options=options
    )
    data = erofs_images.small.path.read_bytes()
    with RegistryClient(front.host, options) as client:
        blob = open_blob(client, "faults/redirect")
        assert blob.read_range(4096, 100_000) == data[4096:104_096]
    assert ref.endswith(":v1")
    methods = {r.method for r in storage.requests}
    assert {"GET", "HEAD"} <= methods
    assert all("Authorization" not in r.headers for r in storage.requests)
    assert any("Authorization" in r.headers for r in front.requests)
    ranged = [r for r in storage.requests if r.method == "GET"]
    assert ranged[-1].headers.get("Range") == "bytes=4096-104095"


def test_a_401_from_the_storage_host_is_never_answered_with_the_credentials(
    storage_redirect, basic_auth_registry, erofs_images
):
    """Tried: a registry with Basic auth redirects blob reads to a storage host that
    answers 401 with a Bearer challenge naming a token realm on itself. Must hold: the
    read fails with a registry error naming the storage host, not the credentials;
    nothing is sent to that realm, and no request to the storage host carries an
    Authorization. Before, the registry's user name and password went to the realm the
    storage host named (twice), and the error said the registry refused them."""
    front, storage = storage_redirect
    options = basic_auth_registry.options(insecure=True)
    push_erofs(front.host, "faults/storage401", "v1", [erofs_images.small.path], options=options)
    with RegistryClient(front.host, options) as client:
        blob = open_blob(client, "faults/storage401")
        storage.requests.clear()
        storage.fault = Fault(
            "status",
            status=401,
            headers={"WWW-Authenticate": f'Bearer realm="{storage.url}/token",service="x"'},
            path_contains="/blobs/",
        )
        with pytest.raises((RegistryError, BlobReadError)) as refused:
            blob.read_range(4096, 100_000)
    assert not isinstance(refused.value, AuthError)
    assert not isinstance(refused.value.__cause__, AuthError)
    assert storage.host in str(refused.value)
    assert "user name and password" not in str(refused.value)
    assert storage.requests, "the storage host was never asked"
    assert not [r for r in storage.requests if "/token" in r.path]
    assert all("Authorization" not in r.headers for r in storage.requests)


EXPIRED_URL = (
    b"<?xml version='1.0' encoding='UTF-8'?><Error><Code>AccessDenied</Code>"
    b"<Message>Request has expired</Message></Error>"
)
"""What S3 answers a presigned URL past its expiry with (HTTP 403)."""
EXPIRED_SIGNER = (
    b"<?xml version='1.0' encoding='UTF-8'?><Error><Code>ExpiredToken</Code>"
    b"<Message>The provided token has expired.</Message></Error>"
)
"""What GCS answers a signed URL past its expiry with, and S3 one signed by credentials
that expired since (HTTP 400)."""


@pytest.mark.parametrize(
    ("status", "body"), [(403, EXPIRED_URL), (400, EXPIRED_SIGNER)], ids=["403", "400"]
)
def test_a_signed_storage_url_that_expired_is_asked_of_the_registry_again(
    storage_redirect, basic_auth_registry, erofs_images, status, body
):
    """Tried: a registry redirecting blob reads to a storage host, which answers one
    read 403 (``AccessDenied: Request has expired``, as S3 answers a presigned URL past
    its expiry) or 400 (``ExpiredToken``, as GCS does), then every read so. Must hold:
    the first read returns the right bytes, its redirect asked of the registry again
    (which signs a new URL); the reads refused for good fail naming the storage host and
    its status, not as the registry denying access. Before, the one expired URL failed
    the read, said to be the registry's "access denied" (403) or "HTTP 400"."""
    front, storage = storage_redirect
    options = basic_auth_registry.options(insecure=True)
    push_erofs(front.host, "faults/expired", "v1", [erofs_images.small.path], options=options)
    data = erofs_images.small.path.read_bytes()
    with RegistryClient(front.host, options) as client:
        blob = open_blob(client, "faults/expired")
        front.requests.clear()
        storage.fault = Fault("status", status=status, body=body, times=1, path_contains="/blobs/")
        assert blob.read_range(4096, 100_000) == data[4096:104_096]
        assert len([r for r in front.requests if r.method == "GET"]) == 2
        storage.fault = Fault("status", status=status, body=body, path_contains="/blobs/")
        with pytest.raises(BlobReadError) as refused:
            blob.read_range(8192, 100)
    assert not isinstance(refused.value.__cause__, AuthError)
    assert storage.host in str(refused.value) and f"HTTP {status}" in str(refused.value)
    assert all("Authorization" not in r.headers for r in storage.requests)


@pytest.mark.parametrize(
    "fault",
    [
        Fault("rewrite_headers", headers={"Content-Encoding": "br"}, path_contains="/blobs/"),
        Fault(
            "rewrite_headers",
            headers={"Content-Type": "multipart/byteranges; boundary=XYZ"},
            path_contains="/blobs/",
        ),
        Fault("rewrite_status", status=200, path_contains="/blobs/", method="GET"),
    ],
    ids=["undecodable-encoding", "multipart", "200-of-the-span-only"],
)
def test_a_reply_whose_headers_say_its_body_is_not_the_span_is_refused(
    registry, pushed_images, erofs_images, fault_proxy, fault
):
    """Tried: range reads answered with the span's bytes under headers that say they are
    something else: Content-Encoding br (not undone here), a 206 marked
    multipart/byteranges (whose part headers would be data), and a 200 whose body is
    only the span (taken for the blob from byte 0). Must hold: each is refused with a
    BlobReadError saying why, never returned as the blob's bytes; before, each read
    returned wrong bytes, which the cache kept."""
    proxy = fault_proxy(registry)
    with client_via(proxy, timeout=3.0) as client:
        blob = open_blob(client, "fixtures/small")
        proxy.fault = fault
        with pytest.raises(BlobReadError) as refused:
            blob.read_range(40960, 8192)
    assert proxy.faults_applied >= 1
    said = str(refused.value)
    assert "Content-Encoding 'br'" in said or "multipart" in said or "answered 200" in said


def test_a_refusal_s_body_is_read_only_so_far_and_so_long(registry, pushed_images, fault_proxy):
    """Tried: a blob read of a digest the registry lacks, its 404 body sent one byte each
    half second (a minute and more for the whole); then a 404 whose body is 32 MiB. Must
    hold: each is a NotFound within seconds, holding a few MiB at most. Before, the
    body was read whole with no deadline: the read waited out the trickle, and a 512
    MiB body took 4 GB of memory."""
    proxy = fault_proxy(registry)
    missing = "sha256:" + "0" * 64
    with client_via(proxy, timeout=10.0) as client:
        proxy.fault = Fault("trickle", seconds=0.5, path_contains=missing)
        started = time.monotonic()
        with pytest.raises(NotFound):
            client.read_blob_range("fixtures/small", missing, 0, 99, 100)
        assert time.monotonic() - started < 15
        proxy.fault = Fault("status", status=404, body=b"x" * (32 * MiB), path_contains=missing)
        tracemalloc.start()
        try:
            with pytest.raises(NotFound):
                client.read_blob_range("fixtures/small", missing, 0, 99, 100)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert peak < 4 * MiB, f"peak {peak / MiB:.1f} MiB reading a refusal"


def test_a_refusal_cut_short_hands_no_open_connection_back_to_the_pool(
    registry, pushed_images, fault_proxy, monkeypatch
):
    """Tried: a 404 whose body trickles a byte each half second, its read ended by the
    client's time for a refusal's body between two bytes (the clock below moves a second
    each look, so the read stops after one byte with no timeout raised). Must hold: the
    reply's connection is closed, not handed back to the pool with the rest of the 404
    still to come, and the next read is answered. Before, it went back open, and only
    urllib3's check for a dropped connection (a byte waiting at the moment of reuse)
    stood between the next request and the rest of that 404 as its answer."""
    clock = itertools.count(time.monotonic(), 1.0)
    monkeypatch.setattr(replies, "time", SimpleNamespace(monotonic=lambda: next(clock)))
    proxy = fault_proxy(registry)
    missing = "sha256:" + "0" * 64
    seen = []
    capped = replies.capped_body

    def watched(reply, limit, seconds):
        body = capped(reply, limit, seconds)
        seen.append((len(body), getattr(reply.raw._connection, "sock", None)))
        return body

    monkeypatch.setattr(replies, "capped_body", watched)
    with client_via(proxy, timeout=10.0) as client:
        proxy.fault = Fault("trickle", seconds=0.5, path_contains=missing, times=1)
        with pytest.raises(NotFound):
            client.read_blob_range("fixtures/small", missing, 0, 99, 100)
        assert seen and seen[0][0] < 64, seen  # cut short: a 404's body is ~100 bytes
        assert seen[0][1] is None, "a connection cut short mid-body went back open"
        with pytest.raises(NotFound):
            client.read_blob_range("fixtures/small", missing, 0, 99, 100)


def test_a_registry_that_serves_shorter_ranges_than_asked_is_read_in_pieces(
    registry, pushed_images, erofs_images, fault_proxy
):
    """Tried: every range read answered with at most 64 KiB of it (a 206 for bytes
    a-(a+64K-1) when a-(a+1M-1) was asked, as a CDN capping ranges does). Must hold: a
    1 MiB read returns the right bytes, in 16 requests. Before, each such reply was
    refused as the wrong range, and every read failed."""
    proxy = fault_proxy(registry)
    data = erofs_images.large.path.read_bytes()
    with client_via(proxy) as client:
        blob = open_blob(client, "fixtures/large")
        proxy.fault = Fault("short_range", after_bytes=65536, path_contains="/blobs/")
        before = len(proxy.requests)
        assert blob.read_range(3 * MiB + 100, MiB) == data[3 * MiB + 100 : 4 * MiB + 100]
    assert len(proxy.requests) - before == 16


def push_gzip_layer(registry, repository: str, tmp_path) -> None:
    """A tar+gzip layer of one file of random bytes, pushed as ``repository:v1``."""
    tar = io.BytesIO()
    with tarfile.open(fileobj=tar, mode="w") as archive:
        content = os.urandom(100_000)
        entry = tarfile.TarInfo("f")
        entry.size = len(content)
        archive.addfile(entry, io.BytesIO(content))
    layer = tmp_path / "layer.tar.gz"
    layer.write_bytes(gzip.compress(tar.getvalue()))
    media_type = "application/vnd.oci.image.layer.v1.tar+gzip"
    push_erofs(registry.host, repository, "v1", [layer], media_type=media_type)


def test_a_range_of_a_body_in_gzip_coding_is_refused_not_decoded(registry, fault_proxy, tmp_path):
    """Tried: range reads of a tar+gzip layer answered 206 with the span's bytes under
    ``Content-Encoding: gzip`` (storage keeping the blob under that label, as an object
    uploaded with it is served), from the blob's first byte and from inside it. Must
    hold: each refused with a BlobReadError naming the coding, never returned as the
    blob's bytes. Before, the read from byte 0 had the gzip stream decoded from there
    and returned the tar's bytes as the blob's; the other failed as a bare DecodeError."""
    push_gzip_layer(registry, "faults/coded", tmp_path)
    proxy = fault_proxy(registry)
    with client_via(proxy, timeout=3.0) as client:
        blob = open_blob(client, "faults/coded")
        proxy.fault = Fault(
            "rewrite_headers", headers={"Content-Encoding": "gzip"}, path_contains="/blobs/"
        )
        for offset in (0, 5000):
            with pytest.raises(BlobReadError) as refused:
                blob.read_range(offset, 1000)
            assert "Content-Encoding 'gzip'" in str(refused.value)
    assert proxy.faults_applied >= 2


def test_a_whole_blob_under_a_gzip_label_is_refused_not_decoded(registry, fault_proxy, tmp_path):
    """Tried: range reads of a tar+gzip layer answered 200 (Range ignored) with the whole
    blob, its Content-Length the blob's, under ``Content-Encoding: gzip`` (storage
    keeping the blob under that label, and sending all of it). Must hold: refused with a
    BlobReadError naming the coding, never returned as the blob's bytes. Before, the
    body was decoded and the tar's bytes returned as the blob's, at every offset."""
    push_gzip_layer(registry, "faults/labelled", tmp_path)
    whole = fault_proxy(registry)
    whole.fault = Fault("ignore_range", path_contains="/blobs/", method="GET")
    labelled = fault_proxy(whole.url)
    with client_via(labelled, timeout=3.0) as client:
        blob = open_blob(client, "faults/labelled")
        labelled.fault = Fault(
            "rewrite_headers", headers={"Content-Encoding": "gzip"}, path_contains="/blobs/"
        )
        for offset in (0, 5000):
            with pytest.raises(BlobReadError) as refused:
                blob.read_range(offset, 1000)
            assert "Content-Encoding 'gzip'" in str(refused.value)
    assert labelled.faults_applied >= 2


def test_503_with_retry_after_is_retried_after_the_pause(registry, pushed_images, fault_proxy):
    """503 with Retry-After: 1 twice, then success: the client waits as told and succeeds."""
    proxy = fault_proxy(registry)
    proxy.fault = Fault(
        "status", status=503, headers={"Retry-After": "1"}, times=2, path_contains="/manifests/"
    )
    started = time.monotonic()
    with client_via(proxy) as client:
        assert resolve_image(client, f"{proxy.host}/fixtures/small:v1", None).layers
    assert proxy.faults_applied == 2
    assert time.monotonic() - started >= 1.9


def test_429_on_a_blob_is_retried(registry, pushed_images, erofs_images, fault_proxy):
    """429 Too Many Requests on a range read is retried; the bytes are right."""
    proxy = fault_proxy(registry)
    with client_via(proxy) as client:
        blob = open_blob(client, "fixtures/small")
        proxy.fault = Fault(
            "status", status=429, headers={"Retry-After": "0"}, times=3, path_contains="/blobs/"
        )
        assert blob.read_range(0, 5000) == erofs_images.small.path.read_bytes()[:5000]
    assert proxy.faults_applied == 3


def test_retries_are_bounded_and_report_the_registry_error(registry, pushed_images, fault_proxy):
    """A registry that keeps answering 503: exactly max_attempts tries, then its own error."""
    proxy = fault_proxy(registry)
    proxy.fault = Fault("status", status=503, path_contains="/manifests/")
    with client_via(proxy, max_attempts=3) as client, pytest.raises(RegistryError) as caught:
        resolve_image(client, f"{proxy.host}/fixtures/small:v1", None)
    assert proxy.faults_applied == 3
    assert "HTTP 503" in str(caught.value) and "UNAVAILABLE: service unavailable" in str(
        caught.value
    )


def test_retries_stop_when_the_deadline_cannot_be_met(registry, pushed_images, fault_proxy):
    """A Retry-After longer than the read's timeout ends the retries at once, not after it."""
    proxy = fault_proxy(registry)
    proxy.fault = Fault("status", status=503, headers={"Retry-After": "30"}, path_contains="/v2/")
    started = time.monotonic()
    with client_via(proxy, timeout=2.0) as client, pytest.raises(RegistryError):
        resolve_image(client, f"{proxy.host}/fixtures/small:v1", None)
    assert time.monotonic() - started < 1.0
    assert proxy.faults_applied == 1


@pytest.mark.parametrize("kind", ["cut", "reset", "truncate", "drop"])
def test_broken_bodies_are_retried(registry, pushed_images, erofs_images, fault_proxy, kind):
    """A connection cut mid-body (FIN) or reset (RST), a body shorter than the range, a
    connection closed with no reply: each is retried and the reader gets exactly the right bytes."""
    proxy = fault_proxy(registry)
    data = erofs_images.large.path.read_bytes()
    with client_via(proxy) as client:
        blob = open_blob(client, "fixtures/large")
        proxy.fault = Fault(kind, path_contains="/blobs/", times=2)
        assert blob.read_range(MiB, 2 * MiB) == data[MiB : 3 * MiB]
    assert proxy.faults_applied == 2


def test_manifest_cut_mid_body_is_fetched_again(registry, pushed_images, fault_proxy):
    """A manifest whose connection breaks half-way is asked for again, not refused."""
    proxy = fault_proxy(registry)
    proxy.fault = Fault("cut", path_contains="/manifests/", times=1)
    with client_via(proxy) as client:
        assert resolve_image(client, f"{proxy.host}/fixtures/small:v1", None).layers
    assert proxy.faults_applied == 1


def test_broken_bodies_end_in_eio_when_retries_run_out(registry, pushed_images, fault_proxy):
    """A blob that is always cut short ends, after the bounded retries, in EIO."""
    proxy = fault_proxy(registry)
    with client_via(proxy, max_attempts=2) as client:
        blob = open_blob(client, "fixtures/large")
        proxy.fault = Fault("cut", path_contains="/blobs/")
        with pytest.raises(BlobReadError) as caught:
            blob.read_range(0, MiB)
    assert caught.value.errno == 5
    assert "fixtures/large" in str(caught.value)


def test_slow_reply_times_out_and_is_retried(registry, pushed_images, erofs_images, fault_proxy):
    """A reply that stalls is abandoned after a third of the read's timeout and asked for
    again, within that timeout, not waited on forever."""
    proxy = fault_proxy(registry)
    with client_via(proxy, timeout=1.5) as client:
        blob = open_blob(client, "fixtures/small")
        proxy.fault = Fault("delay", seconds=3.0, path_contains="/blobs/", times=1)
        started = time.monotonic()
        assert blob.read_range(0, 1000) == erofs_images.small.path.read_bytes()[:1000]
    assert time.monotonic() - started < 1.5


@pytest.mark.parametrize("pinned", [False, True])
def test_corrupted_manifest_is_refused(registry, pushed_images, fault_proxy, pinned):
    """A manifest whose bytes no longer hash to the digest asked for, or (by tag) to
    Docker-Content-Digest, is refused."""
    proxy = fault_proxy(registry)
    with client_via(proxy) as client:
        ref = f"{proxy.host}/fixtures/small:v1"
        if pinned:
            ref = f"{proxy.host}/fixtures/small@{resolve_image(client, ref, None).manifest_digest}"
        proxy.fault = Fault("corrupt", path_contains="/manifests/", after_bytes=10)
        with pytest.raises(IntegrityError, match=r"hashes to sha256:.*refused"):
            resolve_image(client, ref, None)


def test_connections_are_kept_alive(registry, pushed_images, erofs_images, fault_proxy):
    """Many range reads in a row travel over one pooled connection, not one each."""
    proxy = fault_proxy(registry)
    data = erofs_images.large.path.read_bytes()
    with client_via(proxy) as client:
        blob = open_blob(client, "fixtures/large")
        for i in range(30):
            assert blob.read_range(i * 100_000, 50_000) == data[i * 100_000 : i * 100_000 + 50_000]
    assert len(proxy.requests) == 31  # one manifest, thirty ranges
    assert proxy.connections <= 2


def test_reads_of_every_fetch_worker_at_once_keep_their_connections(
    registry, pushed_images, erofs_images, fault_proxy, caplog
):
    """Forty range reads at once through one client, as the fetchers of a few layers
    make (twelve workers each, plus readahead and span fetches): each connection goes
    back to the pool and is used again. Before, the pool kept 16: urllib3 discarded
    the rest after one request each, with a warning a mount counted as trouble."""
    proxy = fault_proxy(registry)
    data = erofs_images.large.path.read_bytes()
    with client_via(proxy) as client:
        blob = open_blob(client, "fixtures/large")
        start = threading.Barrier(40)

        def read(i: int) -> bool:
            start.wait()
            return blob.read_range(i * 50_000, 20_000) == data[i * 50_000 : i * 50_000 + 20_000]

        for _ in range(2):
            with ThreadPoolExecutor(40) as pool:
                assert all(pool.map(read, range(40)))
    assert "Connection pool is full" not in caplog.text
    assert proxy.connections < 60  # the second forty reads reuse the first forty's


def test_a_retry_after_in_other_digits_is_ignored_not_a_crash(registry, pushed_images, fault_proxy):
    """A Retry-After of '²' (a digit to str.isdigit, none to int or float): the 503s are
    retried as with no Retry-After, and the image resolves, where a ValueError ended
    the command with a traceback."""
    proxy = fault_proxy(registry)
    proxy.fault = Fault(
        "status",
        status=503,
        headers={"Retry-After": "\u00b2"},
        times=2,
        path_contains="/manifests/",
    )
    with client_via(proxy) as client:
        assert resolve_image(client, f"{proxy.host}/fixtures/small:v1", None).layers
    assert proxy.faults_applied == 2


@pytest.mark.parametrize("target", ["http://[::1", "http://127.0.0.1:99999", "ftp://127.0.0.1"])
def test_a_redirect_to_no_usable_url_is_a_registry_error(
    registry, pushed_images, fault_proxy, target
):
    """A manifest redirected to an address that is no URL (a broken IPv6 literal, a port
    past 65535) or to another scheme: one RegistryError naming the registry, never a
    ValueError and its traceback, nor the target's words (a URL may carry a token)."""
    proxy = fault_proxy(registry)
    proxy.fault = Fault("redirect", path_contains="/manifests/", redirect_to=target)
    with client_via(proxy, max_attempts=1) as client, pytest.raises(RegistryError) as caught:
        resolve_image(client, f"{proxy.host}/fixtures/small:v1", None)
    assert proxy.host in str(caught.value) and target not in str(caught.value)


def test_a_206_running_past_the_range_asked_is_read_to_the_span(
    registry, pushed_images, erofs_images, fault_proxy
):
    """A server that ignores the end of each range and answers 206 with the rest of the
    blob (``Content-Range: bytes a-END/SIZE``): the span asked for starts the reply, so
    it is read from it, by a read and by a streamed read, and the right bytes come
    back. Before, every such reply was refused as not the span asked for: each read
    tried again until it failed (EIO), and the image could not be read at all."""
    proxy = fault_proxy(registry)
    proxy.fault = Fault("open_range", path_contains="/blobs/sha256:")
    data = erofs_images.large.path.read_bytes()
    with client_via(proxy) as client:
        blob = open_blob(client, "fixtures/large")
        offset = blob.size - 3 * MiB
        assert blob.read_range(offset, MiB) == data[offset : offset + MiB]
        streamed = b"".join(blob.stream_range(4096, MiB))
    assert streamed == data[4096 : 4096 + MiB]
    assert proxy.faults_applied >= 2
