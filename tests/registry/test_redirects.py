"""Redirects that leave TLS: a registry over HTTPS that sends its blobs to plain HTTP."""

from __future__ import annotations

import ssl
import subprocess
import sys
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler

import pytest
from rig.processes import QuietHTTPServer
from rig.pushed import push_erofs
from rig.tls import make_ca

from blockstore.errors import BlobReadError
from blockstore.registry import RegistryBlob, RegistryClient, RegistryOptions, resolve_image

REPOSITORY = "redirect/small"


class Redirector:
    """An HTTPS server that answers every request with a 307: manifests to one base URL,
    blobs to another, the path kept (a registry whose blobs live in object storage)."""

    def __init__(self, cert_and_key: tuple, manifests_to: str, blobs_to: str):
        self.targets = {"/manifests/": manifests_to, "/blobs/": blobs_to}
        self._server = QuietHTTPServer(("127.0.0.1", 0), self._handler())
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(*cert_and_key)
        self._server.socket = context.wrap_socket(self._server.socket, server_side=True)
        self.host = f"127.0.0.1:{self._server.server_address[1]}"

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        targets = self.targets

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                base = next((b for part, b in targets.items() if part in self.path), None)
                self.send_response(307 if base else 404)
                if base:
                    self.send_header("Location", base + self.path)
                self.send_header("Content-Length", "0")
                self.end_headers()

            do_HEAD = do_GET

            def log_message(self, *args: object) -> None:
                pass

        return Handler

    def __enter__(self) -> Redirector:
        self._server.start_in_background()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.stop()


@pytest.fixture
def https_front(tls_registry, registry, erofs_images, fault_proxy, test_ca) -> Iterator:
    """An HTTPS front whose manifests come from the HTTPS registry and whose blobs are
    sent to a plain-HTTP proxy of another registry holding the same layer."""
    small = [erofs_images.small.path]
    push_erofs(tls_registry.host, REPOSITORY, "v1", small, options=tls_registry.options())
    push_erofs(registry.host, REPOSITORY, "v1", small)
    plain = fault_proxy(registry)
    cert = test_ca.issue("redirector", server=True)
    with Redirector(cert, tls_registry.url, plain.url) as front:
        yield front, plain


def read_layer(client: RegistryClient, host: str) -> bytes:
    image = resolve_image(client, f"{host}/{REPOSITORY}:v1", None)
    blob = RegistryBlob(client, REPOSITORY, image.layers[0])
    return blob.read_range(0, blob.size)


def test_a_blob_redirected_from_https_to_plain_http_is_refused(https_front, test_ca):
    """The manifest follows a redirect from HTTPS to HTTPS; the blob is redirected to
    plain HTTP: refused with a message saying so and naming --insecure, and nothing is
    asked of the plain-HTTP host, whose bytes anyone on the way could change."""
    front, plain = https_front
    options = RegistryOptions(ca_file=str(test_ca.cert), timeout=5.0, max_attempts=2)
    with RegistryClient(front.host, options) as client, pytest.raises(BlobReadError) as caught:
        read_layer(client, front.host)
    message = str(caught.value)
    assert "redirected from HTTPS to plain HTTP" in message and "--insecure" in message
    assert plain.requests == []


def test_with_insecure_the_plain_http_redirect_is_followed(https_front, test_ca, erofs_images):
    """A user who gave --insecure to a registry named with https:// accepts plain HTTP:
    the redirect is followed and the layer reads back whole."""
    front, plain = https_front
    options = RegistryOptions(insecure=True, ca_file=str(test_ca.cert), timeout=5.0)
    with RegistryClient(f"https://{front.host}", options) as client:
        assert read_layer(client, front.host) == erofs_images.small.path.read_bytes()
    assert any("/blobs/" in r.path for r in plain.requests)


class PlainUploads:
    """An HTTPS registry front that starts each upload at a plain-HTTP URL (``upload_to``),
    as the CNCF registry does behind a proxy that ends TLS and does not say so: no blob
    is there yet (HEAD: 404), a POST is answered 202 with ``Location: http://...``."""

    def __init__(self, cert_and_key: tuple, upload_to: str):
        self._server = QuietHTTPServer(("127.0.0.1", 0), self._handler(upload_to))
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(*cert_and_key)
        self._server.socket = context.wrap_socket(self._server.socket, server_side=True)
        self.host = f"127.0.0.1:{self._server.server_address[1]}"

    def _handler(self, upload_to: str) -> type[BaseHTTPRequestHandler]:
        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                self.send_response(202)
                self.send_header("Location", f"{upload_to}{self.path}a1b2?_state=x")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def do_HEAD(self) -> None:
                self.send_response(404)
                self.send_header("Content-Length", "0")
                self.end_headers()

            do_GET = do_PUT = do_DELETE = do_HEAD

            def log_message(self, *args: object) -> None:
                pass

        return Handler

    def __enter__(self) -> PlainUploads:
        self._server.start_in_background()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.stop()


def test_an_upload_url_on_plain_http_from_an_https_registry_is_refused(
    registry, erofs_images, fault_proxy, test_ca
):
    """Tried: ``push`` to an HTTPS registry (``--ca-file``) whose upload ``Location`` is
    an http:// URL, as a registry behind a proxy that ends TLS and does not tell it so
    gives. Must hold: the push fails (exit 3) saying the upload URL is plain HTTP and
    why it is refused, and nothing is sent to the plain-HTTP address. Before, the layer
    was PUT there, every byte of a private image unencrypted on the network."""
    plain = fault_proxy(registry)
    cert = test_ca.issue("plain-uploads", server=True)
    with PlainUploads(cert, plain.url) as front:
        command = [sys.executable, "-m", "blockstore", "push", str(erofs_images.small.path)]
        command += [f"{front.host}/private/app:v1", "--ca-file", str(test_ca.cert)]
        pushed = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert pushed.returncode == 3, pushed.stderr
    said = f"the registry gave a plain-HTTP upload URL ({plain.host}), refused"
    assert said in pushed.stderr
    assert plain.requests == []


def test_a_ca_file_is_trusted_beside_the_system_cas(
    tls_registry, erofs_images, test_ca, tmp_path, monkeypatch
):
    """Tried: a registry whose certificate a private CA signed, given with --ca-file,
    that redirects its manifests and blobs to storage whose certificate a CA in the
    system's store signed (the store named by ``$SSL_CERT_FILE`` here). Must hold: both
    are trusted and the layer reads back whole, as Docker's ``certs.d`` adds a
    registry's CA to the system's. Before, --ca-file replaced the system's CAs, and the
    storage was refused as "certificate not trusted"."""
    small = [erofs_images.small.path]
    push_erofs(tls_registry.host, REPOSITORY, "v1", small, options=tls_registry.options())
    private = make_ca(tmp_path / "private")
    monkeypatch.setenv("SSL_CERT_FILE", str(test_ca.cert))
    front_cert = private.issue("front", server=True)
    with Redirector(front_cert, tls_registry.url, tls_registry.url) as front:
        options = RegistryOptions(ca_file=str(private.cert), timeout=5.0, max_attempts=2)
        with RegistryClient(front.host, options) as client:
            assert read_layer(client, front.host) == erofs_images.small.path.read_bytes()
