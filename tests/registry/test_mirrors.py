"""Mirrors tried before the upstream, with a real pull-through cache (``proxy: remoteurl:``)."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
from rig.fault_proxy import Fault
from rig.processes import free_port
from rig.pushed import push_erofs
from rig.registry_server import RegistryServer

from blockstore.errors import UsageError
from blockstore.image import open_image
from blockstore.registry import RegistryBlob, RegistryClient, RegistryOptions, resolve_image

BLOCKSTORE = [sys.executable, "-m", "blockstore"]


def read_all(client: RegistryClient, ref: str, repository: str) -> bytes:
    image = resolve_image(client, ref, None)
    blob = RegistryBlob(client, repository, image.layers[0])
    step = 1 << 20
    return b"".join(blob.read_range(offset, step) for offset in range(0, blob.size, step))


def test_reads_go_through_the_mirror(registry, mirror_registry, pushed_images, erofs_images):
    """With a mirror configured, manifests and blobs come from it, bytes intact."""
    options = RegistryOptions(insecure=True, mirrors=[mirror_registry.host], timeout=10)
    with RegistryClient(registry.host, options) as client:
        data = read_all(client, pushed_images.small, "fixtures/small")
    assert data == erofs_images.small.path.read_bytes()
    # The pull-through cache now holds the blob in its own storage (it stores what it
    # relays in the background, so give it a moment).
    digest_hex = erofs_images.small.digest.removeprefix("sha256:")
    pattern = f"blobs/sha256/{digest_hex[:2]}/{digest_hex}/data"
    deadline = time.monotonic() + 10
    while not list(mirror_registry.data_dir.rglob(pattern)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert list(mirror_registry.data_dir.rglob(pattern))


def test_upstream_down_after_the_mirror_is_warm(fresh_registry, erofs_images, tmp_path):
    """Warm the mirror, take the upstream down: the image still resolves and reads in
    full from the mirror alone."""
    ref = push_erofs(fresh_registry.host, "mirrored/app", "v1", [erofs_images.small.path])
    mirror = RegistryServer(tmp_path / "mirror", proxy_remote=fresh_registry.url)
    mirror.start()
    try:
        options = RegistryOptions(insecure=True, mirrors=[mirror.host], timeout=5, max_attempts=2)
        expected = erofs_images.small.path.read_bytes()
        with RegistryClient(fresh_registry.host, options) as client:
            assert read_all(client, ref, "mirrored/app") == expected
        fresh_registry.stop()
        with RegistryClient(fresh_registry.host, options) as client:
            assert read_all(client, ref, "mirrored/app") == expected
    finally:
        mirror.stop()


def test_dead_mirror_falls_back_to_the_upstream_quickly(registry, pushed_images, erofs_images):
    """A mirror nobody listens on costs one quick failure, then the upstream serves."""
    dead = f"127.0.0.1:{free_port()}"
    options = RegistryOptions(insecure=True, mirrors=[dead], timeout=5)
    started = time.monotonic()
    with RegistryClient(registry.host, options) as client:
        data = read_all(client, pushed_images.small, "fixtures/small")
    assert data == erofs_images.small.path.read_bytes()
    assert time.monotonic() - started < 3


def test_mirrors_never_see_the_upstream_credentials(
    basic_auth_registry, registry, erofs_images, fault_proxy
):
    """The user's password is for the registry named in the reference: a mirror (which
    lacks the image here) is asked without it, then the upstream with it."""
    ref = push_erofs(
        basic_auth_registry.host,
        "mirrored/private",
        "v1",
        [erofs_images.small.path],
        options=basic_auth_registry.options(),
    )
    mirror = fault_proxy(registry)
    options = basic_auth_registry.options(mirrors=[mirror.host])
    with RegistryClient(basic_auth_registry.host, options) as client:
        assert resolve_image(client, ref, None).layers[0].digest == erofs_images.small.digest
    assert mirror.requests, "the mirror was not tried first"
    assert all("Authorization" not in r.headers for r in mirror.requests)


def test_failing_mirror_is_skipped_then_retried_later(registry, pushed_images, fault_proxy):
    """A mirror answering 503 is passed over for the upstream at once (no error reaches
    the user), and left out for its cooldown."""
    mirror = fault_proxy(registry)
    mirror.fault = Fault("status", status=503, headers={"Retry-After": "0"})
    options = RegistryOptions(insecure=True, mirrors=[mirror.host], timeout=5)
    with RegistryClient(registry.host, options) as client:
        assert resolve_image(client, pushed_images.small, None).layers
        assert resolve_image(client, pushed_images.small, None).layers
    # Tried once for the first manifest, then left out during the cooldown.
    assert mirror.faults_applied == 1


@pytest.mark.parametrize(
    "mirror",
    [
        "https://mirroruser:s3cretpw@127.0.0.1:5000",
        "http://mirroruser:s3cretpw@127.0.0.1:5000/",
        "mirroruser:s3cretpw@127.0.0.1:5000",
        "mirroruser@127.0.0.1:5000",
    ],
)
def test_mirror_with_credentials_in_its_address_is_refused(mirror):
    """A mirror written with ``user[:password]@`` is refused when the options are made (a
    UsageError naming the host and the auth files), so it never reaches a log line, a repr
    or a server's command line; the message holds neither the user name nor the password."""
    with pytest.raises(UsageError) as refused:
        RegistryOptions(insecure=True, mirrors=["127.0.0.1:6000", mirror])
    message = str(refused.value)
    assert "mirroruser" not in message and "s3cretpw" not in message
    assert "127.0.0.1:5000" in message and "auth files" in message


@pytest.mark.parametrize(
    ("mirror", "why"),
    [
        ("127.0.0.1:notaport", "port 'notaport' is not a number"),
        ("bad:host:x", "port 'x' is not a number"),
        ("127.0.0.1:99999", "not a number in 1..65535"),
        ("http://127.0.0.1:0/", "not a number in 1..65535"),
        ("[::1]x", "bad host"),
    ],
)
def test_a_mirror_that_is_not_host_and_port_is_refused(mirror, why):
    """A mirror with a port that is not a number, or not one in range, is a usage error
    when the options are made: before, requests refused it at the first read with a bare
    ValueError, which every command printed as a traceback."""
    with pytest.raises(UsageError, match=why):
        RegistryOptions(insecure=True, mirrors=[mirror])


def test_a_command_given_a_bad_mirror_port_exits_with_one_usage_line():
    """``inspect --mirror HOST:notaport`` exits 2 with one line naming the mirror. Nothing
    listens at the addresses: had it tried to connect, the exit would be 5."""
    done = subprocess.run(
        [*BLOCKSTORE, "inspect", "127.0.0.1:1/a/b:v1", "--insecure", "--mirror", "127.0.0.1:x"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == UsageError.exit_code, done.stderr
    assert done.stderr.strip().splitlines() == [
        "blockstore: mirror '127.0.0.1:x': port 'x' is not a number in 1..65535 "
        "(expected HOST[:PORT])"
    ]


@pytest.mark.parametrize("mirror", ["", "bad host", "http://", "https:///v2"])
def test_a_mirror_with_no_host_is_refused_before_any_registry(mirror):
    """Tried: ``inspect --mirror`` with an empty address, a host with a blank in it, and a
    scheme with no host. Must hold: exit 2 with one line naming the mirror, before any
    registry is asked (nothing listens at the upstream: had it tried, the exit would be
    5). Before, each was tried as a host, failed with a warning naming an empty or
    broken mirror, and the command went on to the upstream."""
    done = subprocess.run(
        [*BLOCKSTORE, "inspect", "127.0.0.1:1/a/b:v1", "--insecure", "--mirror", mirror],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == UsageError.exit_code, done.stderr
    assert done.stderr.strip().splitlines() == [
        f"blockstore: mirror {mirror!r}: no host (expected HOST[:PORT])"
    ]


def test_mirror_addresses_without_credentials_are_taken():
    """Host, host:port and scheme URLs with a trailing slash are all plain mirrors."""
    mirrors = [
        *("mirror.example", "127.0.0.1:5000", "https://mirror.example:443/"),
        *("registry_mirror:5000", "[::1]:5000", "[::1]"),  # a container network's name
    ]
    assert RegistryOptions(mirrors=mirrors).mirrors == mirrors


def test_every_command_refuses_a_mirror_with_credentials():
    """``inspect`` (any command taking --mirror) exits 2 with one line that does not
    repeat the password. Nothing listens at the addresses: had it tried to connect, the
    exit would be 5 (unreachable)."""
    done = subprocess.run(
        [
            *BLOCKSTORE,
            "inspect",
            "127.0.0.1:1/a/b:v1",
            "--insecure",
            "--mirror",
            "http://u:s3cretpw@127.0.0.1:1",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == UsageError.exit_code, done.stderr
    assert "s3cretpw" not in done.stderr and "auth files" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr


@pytest.mark.parametrize("kind", ["cut", "reset", "truncate", "bad_range"])
def test_a_mirror_with_broken_bodies_is_left_for_the_upstream(
    registry, pushed_images, erofs_images, fault_proxy, kind
):
    """A mirror that answers 206 and then cuts the body, resets the connection, sends
    fewer bytes, or names another Content-Range: it is left out after its first failure
    and the upstream serves every byte; no read fails."""
    mirror = fault_proxy(registry)
    mirror.fault = Fault(kind, method="GET", path_contains="/blobs/sha256:")
    options = RegistryOptions(insecure=True, mirrors=[mirror.host], timeout=5)
    with RegistryClient(registry.host, options) as client:
        data = read_all(client, pushed_images.small, "fixtures/small")
    assert data == erofs_images.small.path.read_bytes()
    assert mirror.faults_applied == 1
    assert any("/manifests/" in r.path for r in mirror.requests), "the mirror was not used"


def test_from_upstream_reads_past_a_mirror_that_alters_bytes(
    registry, pushed_images, erofs_images, fault_proxy
):
    """A mirror whose blob bytes are altered (only the digest of the whole can tell):
    ``from_upstream()`` reads the same blob from the upstream alone, every byte right,
    and the mirror is not asked for it."""
    mirror = fault_proxy(registry)
    options = RegistryOptions(insecure=True, mirrors=[mirror.host], timeout=5)
    expected = erofs_images.small.path.read_bytes()
    with RegistryClient(registry.host, options) as client:
        image = resolve_image(client, pushed_images.small, None)
        blob = RegistryBlob(client, "fixtures/small", image.layers[0])
        mirror.fault = Fault("corrupt", method="GET", path_contains="/blobs/", after_bytes=100)
        assert blob.read_range(0, 4096) != expected[:4096]
        asked = len(mirror.requests)
        upstream = blob.from_upstream()
        assert upstream.digest == blob.digest and upstream.size == blob.size
        assert upstream.read_range(0, len(expected)) == expected
    assert len(mirror.requests) == asked


def test_prefetch_fetches_again_from_the_upstream_when_a_mirror_fails_the_digest(
    registry, pushed_images, erofs_images, fault_proxy, tmp_path
):
    """A mirror that alters blob bytes (each range looks fine; only the whole layer's
    digest can tell): prefetch finds the digest wrong, fetches the layer again from the
    upstream, and seals it with every byte right."""
    mirror = fault_proxy(registry)
    mirror.fault = Fault("corrupt", method="GET", path_contains="/blobs/", after_bytes=100)
    options = RegistryOptions(insecure=True, mirrors=[mirror.host], timeout=5)
    image = open_image(pushed_images.small, cache_dir=tmp_path / "cache", options=options)
    try:
        (blob,) = image.exports()
        blob.prefetch()
        assert image.store.lookup(blob.digest).sealed
        expected = erofs_images.small.path.read_bytes()
        assert b"".join(bytes(b) for b in blob.read(0, len(expected))) == expected
    finally:
        image.close()
    assert mirror.faults_applied >= 1, "the mirror did not serve the first fetch"


@pytest.mark.parametrize(
    "fault",
    [
        Fault("corrupt", method="GET", path_contains="/manifests/", after_bytes=10),
        Fault(
            "status",
            status=200,
            method="HEAD",
            path_contains="/blobs/",
            headers={"Content-Length": "12345"},
        ),
    ],
    ids=["manifest-bytes", "blob-size"],
)
def test_a_mirror_whose_answers_fail_their_checks_is_left_for_the_upstream(
    registry, pushed_images, fault_proxy, tmp_path, fault
):
    """A mirror whose manifest bytes do not hash to the digest it names, or whose HEAD
    gives a layer another size than the manifest: the mirror is left out and the
    upstream answers, as for a mirror that does not answer at all; the image opens and
    reads right, where the whole command used to fail with exit 6."""
    mirror = fault_proxy(registry)
    mirror.fault = fault
    options = RegistryOptions(insecure=True, mirrors=[mirror.host], timeout=5)
    image = open_image(pushed_images.small, cache_dir=tmp_path / "cache", options=options)
    try:
        (blob,) = image.exports()
        assert blob.size > 0 and b"".join(bytes(b) for b in blob.read(0, 4096))
    finally:
        image.close()
    assert mirror.faults_applied >= 1
