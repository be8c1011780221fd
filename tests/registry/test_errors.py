"""What a user reads when something is wrong: one line that says what and where."""

from __future__ import annotations

import errno
import socket
import subprocess
import sys
import threading

import pytest
import requests
import urllib3
from rig.processes import free_port

from blockstore.errors import NotFound, RegistryUnreachable
from blockstore.registry import RegistryClient, RegistryOptions, resolve_image
from blockstore.registry.endpoint import _address, describe_failure


def test_unreachable_host(registry):
    """Nobody listening: 'cannot reach registry HOST: connection refused', after the
    bounded attempts."""
    host = f"127.0.0.1:{free_port()}"
    options = RegistryOptions(insecure=True, max_attempts=2, timeout=2)
    with RegistryClient(host, options) as client, pytest.raises(RegistryUnreachable) as caught:
        resolve_image(client, f"{host}/any/image:v1", None)
    assert str(caught.value) == f"cannot reach registry {host}: connection refused"
    assert caught.value.exit_code == 5


def test_unknown_repository_and_unknown_tag(registry, pushed_images):
    """An unknown repository or tag names the image and quotes the registry's error code."""
    with registry.client() as client:
        with pytest.raises(NotFound) as no_repo:
            resolve_image(client, f"{registry.host}/no/such:v1", None)
        with pytest.raises(NotFound) as no_tag:
            resolve_image(client, f"{registry.host}/fixtures/small:nope", None)
    assert str(no_repo.value).startswith(f"image {registry.host}/no/such:v1: not found (")
    assert "NAME_UNKNOWN" in str(no_repo.value) or "MANIFEST_UNKNOWN" in str(no_repo.value)
    assert str(no_tag.value) == (
        f"image {registry.host}/fixtures/small:nope: not found (MANIFEST_UNKNOWN: manifest "
        "unknown); fixtures/small has tags: v1"
    )


def test_unknown_platform_and_layer(registry, pushed_images):
    """A platform the index lacks lists those it has and says --platform names one (an
    EROFS image often serves any host); a layer out of range says how many."""
    with registry.client() as client:
        with pytest.raises(NotFound) as no_platform:
            resolve_image(client, pushed_images.index, "linux/riscv64")
        image = resolve_image(client, pushed_images.multilayer, None)
    assert str(no_platform.value) == (
        f"image {pushed_images.index} has no platform linux/riscv64; "
        "it has: linux/amd64, linux/arm64/v8 (name one with --platform)"
    )
    with pytest.raises(NotFound, match=r"has no layer 3; it has 3 \(0..2\)"):
        image.select_layer(index=3)


def test_https_to_a_plain_http_registry(registry):
    """HTTPS is the default: a plain-HTTP registry is refused with a hint to --insecure."""
    options = RegistryOptions(insecure=False, max_attempts=1, timeout=2)
    with (
        RegistryClient(registry.host, options) as client,
        pytest.raises(RegistryUnreachable) as caught,
    ):
        resolve_image(client, f"{registry.host}/any/image:v1", None)
    assert str(caught.value) == (
        f"cannot connect securely to {registry.host}: it does not speak TLS "
        "(a plain-HTTP registry needs --insecure)"
    )


def test_a_handshake_cut_short_is_an_outage_and_a_cached_image_still_opens(tmp_path):
    """Tried: a registry (or the TLS terminator before it) that reads the client's hello
    and closes, with the image's resolution kept in the cache. Must hold: that is an
    outage, not a setting to fix: the image opens from the cache, saying why. Only an
    answer that contradicts the TLS settings (plain HTTP, an untrusted certificate)
    refuses the fallback."""
    from blockstore.cache import ChunkStore
    from blockstore.errors import RegistryTLSMismatch
    from blockstore.image import open_image
    from blockstore.registry.platforms import host_platform
    from blockstore.registry.reference import parse_reference

    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def cut_every_handshake() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            with conn:
                conn.recv(65536)

    threading.Thread(target=cut_every_handshake, daemon=True).start()
    ref = str(parse_reference(f"127.0.0.1:{port}/demo/img:v1"))
    cache = tmp_path / "cache"
    layer = {"index": 0, "digest": "sha256:" + "b" * 64, "size": 4096, "mediaType": "x/y"}
    record = {"reference": ref, "platform": None, "manifest_digest": "sha256:" + "a" * 64}
    with ChunkStore(cache) as store:
        store.images.put(ref, str(host_platform()), {**record, "platforms": [], "layers": [layer]})
    try:
        image = open_image(ref, cache_dir=cache, options=RegistryOptions(timeout=3))
    finally:
        listener.close()
    try:
        assert image.client is None
        assert "cannot connect securely" in str(image.unreachable)
        assert not isinstance(image.unreachable, RegistryTLSMismatch)
    finally:
        image.close()


def _caused(error: BaseException, cause: BaseException) -> BaseException:
    """``error`` raised ``from cause``, as urllib3 raises its connection errors."""
    error.__cause__ = cause
    return error


@pytest.mark.parametrize(
    ("failure", "cause"),
    [
        (
            requests.ConnectionError(
                _caused(
                    urllib3.exceptions.NameResolutionError("registry.invalid", None, None),
                    socket.gaierror(socket.EAI_NONAME, "unknown"),
                )
            ),
            "unknown host name",
        ),
        # urllib3's NewConnectionError is a ConnectTimeoutError; the refusal inside wins.
        (
            requests.ConnectionError(
                _caused(
                    urllib3.exceptions.NewConnectionError(None, "Failed to connect"),
                    ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused"),
                )
            ),
            "connection refused",
        ),
        (
            requests.exceptions.ChunkedEncodingError(
                urllib3.exceptions.ProtocolError(
                    "Connection broken", ConnectionResetError(errno.ECONNRESET, "reset")
                )
            ),
            "connection closed by the server",
        ),
        (requests.ReadTimeout("read timed out"), "timed out"),
        (OSError(errno.EHOSTUNREACH, "No route to host"), "no route to host"),
        # The words alone are not a cause: only the exception's type is.
        (ValueError("Name or service not known; Connection broken"), "ValueError"),
    ],
)
def test_failure_causes_come_from_exception_types(failure, cause):
    """The cause a user reads is found from the types of the exceptions nested in the
    failure (as requests and urllib3 nest them), never from their text."""
    assert describe_failure(failure) == cause


@pytest.mark.parametrize(
    ("url", "said"),
    [
        ("http://localhost/v2/", "localhost:80"),
        ("https://localhost/v2/", "localhost:443"),
        ("http://127.0.0.1:5000/v2/", "127.0.0.1:5000"),
        ("https://[::1]/v2/", "[::1]:443"),
    ],
)
def test_a_registry_address_names_its_port_even_when_implied(url, said):
    """'cannot reach registry localhost' leaves the user to guess the port tried: the
    scheme's default is said (80 for plain HTTP, 443 for HTTPS)."""
    assert _address(url) == said


def test_an_unreachable_registry_without_a_port_names_the_one_tried():
    """inspect localhost/... --insecure that finds no server names port 80, one line."""
    with socket.socket() as probe:
        if probe.connect_ex(("127.0.0.1", 80)) == 0:
            pytest.skip("something listens on port 80 here")
    shown = subprocess.run(
        [sys.executable, "-m", "blockstore", "inspect", "localhost/tools/rootfs:v1", "--insecure"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert shown.returncode == 5, shown.stderr
    assert "cannot reach registry localhost:80: connection refused" in shown.stderr
