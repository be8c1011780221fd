"""Token issuers that answer oddly: odd lifetimes, realms that are no URL or do not
speak TLS, redirects."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler
from urllib.parse import parse_qs, urlsplit

import pytest
from rig.fault_proxy import Fault
from rig.processes import QuietHTTPServer
from rig.pushed import push_erofs
from rig.registry_server import RegistryServer, TokenAuth
from rig.token_issuer import TokenIssuer

from blockstore.errors import AuthError, RegistryUnreachable
from blockstore.registry import RegistryClient, RegistryOptions, resolve_image

USER, PASSWORD = "dave", "dave-token-pw"


class IssuerFront:
    """An HTTP front of a ``TokenIssuer``: it answers as the issuer does, its reply
    passed through ``rewrite``, or with a 307 to ``moved_to`` + ``/token`` (the query
    kept) once that is set. Records the Authorization each request carried."""

    def __init__(self, issuer: TokenIssuer, *, listen: str = "127.0.0.1"):
        self.issuer = issuer
        self.rewrite: Callable[[dict], dict] = lambda body: body
        self.moved_to: str | None = None
        self.seen: list[tuple[str, str | None]] = []
        """(path, Authorization) of every request."""
        self._server = QuietHTTPServer((listen, 0), self._handler())
        self.url = f"http://{listen}:{self._server.server_address[1]}"

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        front = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                parts = urlsplit(self.path)
                authorization = self.headers.get("Authorization")
                front.seen.append((parts.path, authorization))
                if front.moved_to and parts.path == "/moved":
                    self.send_response(307)
                    self.send_header("Location", f"{front.moved_to}/token?{parts.query}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                status, body = front.issuer.answer(parse_qs(parts.query), authorization)
                data = json.dumps(front.rewrite(body) if status == 200 else body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: object) -> None:
                pass

        return Handler

    def start(self) -> None:
        self._server.start_in_background()

    def stop(self) -> None:
        self._server.stop()


@pytest.fixture
def fronted(tmp_path, test_ca, erofs_images) -> Iterator[tuple[RegistryServer, IssuerFront]]:
    """A token-auth registry whose realm is an ``IssuerFront``'s ``/moved``; ``odd/image:v1``
    pushed."""
    cert, key = test_ca.issue("fronted-issuer", server=False)
    issuer = TokenIssuer(cert, key, users={USER: PASSWORD})
    issuer.start()  # unused, but its server is made with it and stopped with it
    front = IssuerFront(issuer)
    front.start()
    token = TokenAuth(f"{front.url}/moved", issuer.service, issuer.name, test_ca.cert)
    server = RegistryServer(tmp_path / "registry", token=token, username=USER, password=PASSWORD)
    server.start()
    try:
        push_erofs(
            server.host, "odd/image", "v1", [erofs_images.small.path], options=server.options()
        )
        yield server, front
    finally:
        server.stop()
        front.stop()
        issuer.stop()


@pytest.mark.parametrize("expires_in", ["soon", None, [300], {"s": 1}, True])
def test_an_expires_in_that_is_no_number_counts_as_unstated(fronted, expires_in):
    """An issuer whose expires_in is a word, null, a list, an object or true: the token
    is used for the default lifetime (one token serves the manifest and the config), not
    taken for a reply without a token."""
    server, front = fronted
    front.rewrite = lambda body: {**body, "expires_in": expires_in}
    before = front.issuer.tokens_issued
    with server.client() as client:
        image = resolve_image(
            client, f"{server.host}/odd/image:v1", "linux/amd64", require_platform=True
        )
    assert image.layers
    assert front.issuer.tokens_issued - before == 1


@pytest.mark.parametrize("realm", ["not a url", "ftp://issuer.example/token", "/token", "http://"])
def test_a_realm_that_is_no_http_url_is_an_auth_error(registry, pushed_images, fault_proxy, realm):
    """A registry whose Bearer challenge names a realm that is no http(s) URL: an
    AuthError (exit 4) saying so, not a request error of the HTTP layer (exit 3)."""
    proxy = fault_proxy(registry)
    challenge = f'Bearer realm="{realm}",service="odd"'
    proxy.fault = Fault("status", status=401, headers={"WWW-Authenticate": challenge})
    options = RegistryOptions(insecure=True, timeout=5.0)
    with RegistryClient(proxy.host, options) as client, pytest.raises(AuthError) as caught:
        resolve_image(client, f"{proxy.host}/fixtures/small:v1", None)
    assert caught.value.exit_code == 4
    assert "names a token issuer (realm) that is not an http:// or https:// URL" in str(
        caught.value
    )


def test_a_redirect_within_the_issuers_origin_keeps_the_credentials(fronted):
    """The realm answers 307 to another path of its own origin: the redirect is followed
    and the user name and password go along, so the token is the user's."""
    server, front = fronted
    front.moved_to = front.url
    with server.client() as client:
        assert resolve_image(client, f"{server.host}/odd/image:v1", None).layers
    assert [path for path, _ in front.seen[-2:]] == ["/moved", "/token"]
    assert all(authorization for _, authorization in front.seen[-2:])
    assert front.issuer.issued[-1]["account"] == USER


def test_a_redirect_to_another_origin_gets_no_credentials(fronted):
    """The realm answers 307 to an issuer of another origin (which grants anonymous
    pulls): the redirect is followed, and the user name and password do not go along."""
    server, front = fronted
    other = IssuerFront(front.issuer, listen="127.0.0.2")
    other.start()
    try:
        front.moved_to = other.url
        front.issuer.anonymous = frozenset({"pull"})
        with server.client() as client:
            assert resolve_image(client, f"{server.host}/odd/image:v1", None).layers
    finally:
        other.stop()
    assert other.seen and all(authorization is None for _, authorization in other.seen)
    assert all(authorization for _, authorization in front.seen)


def test_an_https_realm_that_speaks_plain_http_does_not_ask_for_insecure_when_given(
    registry, pushed_images, fault_proxy
):
    """With --insecure, a registry whose realm is an https:// URL served over plain HTTP:
    the error says the server does not speak TLS and that the URL came from the registry,
    not that --insecure is needed, which was given and cannot change the realm's URL."""
    proxy = fault_proxy(registry)
    challenge = f'Bearer realm="https://{registry.host}/token",service="odd"'
    proxy.fault = Fault("status", status=401, headers={"WWW-Authenticate": challenge})
    options = RegistryOptions(insecure=True, timeout=5.0, max_attempts=1)
    with (
        RegistryClient(proxy.host, options) as client,
        pytest.raises(RegistryUnreachable) as caught,
    ):
        resolve_image(client, f"{proxy.host}/fixtures/small:v1", None)
    assert str(caught.value) == (
        f"cannot connect securely to {registry.host}: it does not speak TLS (the registry "
        "sent this https:// URL; --insecure does not change it)"
    )


def test_a_registry_named_with_https_and_insecure_is_told_to_drop_the_scheme(registry):
    """A plain-HTTP registry named ``https://host`` with --insecure: --insecure was
    given, so the error says the https:// in the name is what keeps it on TLS."""
    options = RegistryOptions(insecure=True, timeout=5.0, max_attempts=1)
    client = RegistryClient(f"https://{registry.host}", options)
    with client, pytest.raises(RegistryUnreachable) as caught:
        resolve_image(client, f"{registry.host}/fixtures/small:v1", None)
    assert str(caught.value) == (
        f"cannot connect securely to {registry.host}: it does not speak TLS (the registry is "
        "named with https://; --insecure needs it named without)"
    )
