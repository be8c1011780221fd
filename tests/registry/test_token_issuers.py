"""Token issuers that answer oddly: odd lifetimes, realms that are no URL or do not
speak TLS, redirects."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler
from urllib.parse import parse_qs, urlsplit

import pytest
from rig.credential_helpers import PassKeyring, docker_config_with, why_pass_cannot_run
from rig.fault_proxy import Fault
from rig.processes import QuietHTTPServer
from rig.pushed import push_erofs
from rig.registry_server import RegistryServer, TokenAuth
from rig.token_issuer import TokenIssuer, send_json

from blockstore.errors import AuthError, RegistryUnreachable
from blockstore.registry import RegistryClient, RegistryOptions, resolve_image

USER, PASSWORD = "dave", "dave-token-pw"


class IssuerFront:
    """An HTTP front of a ``TokenIssuer``: it answers as the issuer does, its reply
    passed through ``rewrite``, or with a 307 to ``moved_to`` + ``/token`` (the query
    kept) once that is set. Records the Authorization each request carried. A POST is
    the OAuth2 refresh-token grant, for the refresh tokens in ``refresh_tokens`` (each
    standing for a user of the issuer); its forms are kept in ``posted``."""

    def __init__(self, issuer: TokenIssuer, *, listen: str = "127.0.0.1"):
        self.issuer = issuer
        self.rewrite: Callable[[dict], dict] = lambda body: body
        self.moved_to: str | None = None
        self.seen: list[tuple[str, str | None]] = []
        """(path, Authorization) of every request."""
        self.refresh_tokens: dict[str, str] = {}
        self.posted: list[dict[str, list[str]]] = []
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
                send_json(self, status, front.rewrite(body) if status == 200 else body)

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                form = parse_qs(self.rfile.read(length).decode())
                front.seen.append((urlsplit(self.path).path, self.headers.get("Authorization")))
                front.posted.append(form)
                user = front.refresh_tokens.get(form.get("refresh_token", [""])[0])
                if form.get("grant_type") != ["refresh_token"] or not form.get("client_id"):
                    send_json(self, 400, {"error": "invalid_request"})
                elif user is None:
                    send_json(self, 401, {"error": "invalid_grant"})
                else:
                    query = {"service": form["service"], "scope": form["scope"][0].split(" ")}
                    login = base64.b64encode(f"{user}:{front.issuer.users[user]}".encode())
                    send_json(self, *front.issuer.answer(query, f"Basic {login.decode()}"))

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


def test_an_expires_in_too_large_for_a_float_counts_as_unstated(fronted):
    """Tried: an issuer whose ``expires_in`` is a JSON integer of 400 digits (past any
    float). Must hold: the token is used for the default lifetime, as for an endless
    one (one token serves the manifest and the config). Before, converting it raised
    ``OverflowError``, which no caller expects: the command died with a traceback."""
    server, front = fronted
    front.rewrite = lambda body: {**body, "expires_in": 10**400}
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


def docker_config(tmp_path, monkeypatch, host: str, token: str) -> None:
    """A docker config.json whose entry for ``host`` is an identity token, as docker
    login writes one: a placeholder user of zeros, no password."""
    placeholder = base64.b64encode(b"00000000-0000-0000-0000-000000000000:").decode()
    entry = {"auth": placeholder, "identitytoken": token}
    (tmp_path / "docker").mkdir()
    (tmp_path / "docker" / "config.json").write_text(json.dumps({"auths": {host: entry}}))
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "docker"))


def test_an_identity_token_is_exchanged_by_the_refresh_token_grant(fronted, tmp_path, monkeypatch):
    """A docker config.json entry with an identitytoken: the token is POSTed to the realm
    as the OAuth2 refresh-token grant (grant_type, refresh_token, service, scope,
    client_id), the access token it brings opens the image, and no Basic credentials
    made of the placeholder user go anywhere."""
    server, front = fronted
    front.refresh_tokens["refresh-4711"] = USER
    docker_config(tmp_path, monkeypatch, server.host, "refresh-4711")
    before = len(front.seen)
    with server.client(username=None, password=None) as client:
        assert resolve_image(client, f"{server.host}/odd/image:v1", None).layers
    [form] = front.posted
    assert form["grant_type"] == ["refresh_token"] and form["refresh_token"] == ["refresh-4711"]
    assert form["service"] == [front.issuer.service] and form["client_id"]
    assert form["scope"] == ["repository:odd/image:pull"]
    assert front.seen[before:] == [("/moved", None)]
    assert front.issuer.issued[-1]["account"] == USER


def test_an_identity_token_from_a_credential_helper_is_exchanged_by_the_refresh_grant(
    fronted, tmp_path, monkeypatch
):
    """Tried: the registry's login kept in the real ``docker-credential-pass`` as an
    identity token (user ``<token>``, as docker keeps one), named by ``credHelpers``.
    Must hold: the token is POSTed to the realm as the OAuth2 refresh-token grant and the
    image opens; the ``<token>`` user goes nowhere. Before, the helper was not run: the
    registry was asked anonymously and refused."""
    reason = why_pass_cannot_run()
    if reason:
        pytest.skip(reason)
    server, front = fronted
    front.refresh_tokens["refresh-from-helper"] = USER
    keyring = PassKeyring(tmp_path / "keyring")
    try:
        for name, value in keyring.env.items():
            monkeypatch.setenv(name, value)
        keyring.store(server.host, "<token>", "refresh-from-helper")
        monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "docker"))
        docker_config_with(tmp_path / "docker", {"credHelpers": {server.host: "pass"}})
        before = len(front.seen)
        with server.client(username=None, password=None) as client:
            assert resolve_image(client, f"{server.host}/odd/image:v1", None).layers
    finally:
        keyring.close()
    [form] = front.posted
    assert form["grant_type"] == ["refresh_token"]
    assert form["refresh_token"] == ["refresh-from-helper"]
    assert front.seen[before:] == [("/moved", None)]  # no Basic header of ``<token>``


def test_an_identity_token_the_issuer_refuses_is_named(fronted, tmp_path, monkeypatch):
    """An identity token the issuer does not know: an AuthError saying the identity
    token was refused, not a user name or password."""
    server, front = fronted
    docker_config(tmp_path, monkeypatch, server.host, "stale-token")
    with server.client(username=None, password=None) as client, pytest.raises(AuthError) as caught:
        resolve_image(client, f"{server.host}/odd/image:v1", None)
    assert "refused the identity token from the auth file" in str(caught.value)
    assert "stale-token" not in str(caught.value)
    assert [form["refresh_token"] for form in front.posted] == [["stale-token"]]


def test_an_identity_token_is_not_sent_as_basic_credentials(
    basic_auth_registry, tmp_path, monkeypatch
):
    """A Basic-auth registry and an auth file with only an identity token for it: an
    AuthError saying so, and no Basic header of the placeholder user is tried."""
    docker_config(tmp_path, monkeypatch, basic_auth_registry.host, "refresh-0815")
    client = basic_auth_registry.client(username=None, password=None)
    with client, pytest.raises(AuthError, match="has an identity token for it"):
        resolve_image(client, f"{basic_auth_registry.host}/no/matter:v1", None)


def token_reply_cut_short(*, stall: bool) -> QuietHTTPServer:
    """A realm answering 200 with a token reply of 100 bytes whose first 12 come, then
    nothing more for 30 s (``stall``), or the connection closed."""

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", "100")
            self.end_headers()
            self.wfile.write(b'{"token": "a')
            self.wfile.flush()
            if stall:
                time.sleep(30)
            self.close_connection = True

        def log_message(self, *args: object) -> None:
            pass

    server = QuietHTTPServer(("127.0.0.1", 0), Handler)
    server.start_in_background()
    return server


@pytest.mark.parametrize(
    ("stall", "cause"), [(True, "timed out"), (False, "connection closed by the server")]
)
def test_a_token_reply_cut_short_is_the_issuer_unreachable(
    registry, pushed_images, fault_proxy, stall, cause
):
    """Tried: a realm that answers 200 and sends the first bytes of its token reply, then
    stalls (or closes the connection). Must hold: the open fails within its 3 s timeout
    as the token issuer not reached (exit 5, naming the issuer and the cause), not as a
    refused login. Before, the part that came was parsed: "sent no token", an AuthError
    (exit 4) that sent the user to check a login nobody had refused."""
    realm = token_reply_cut_short(stall=stall)
    try:
        proxy = fault_proxy(registry)
        address = f"127.0.0.1:{realm.server_address[1]}"
        challenge = f'Bearer realm="http://{address}/token",service="odd"'
        proxy.fault = Fault("status", status=401, headers={"WWW-Authenticate": challenge})
        options = RegistryOptions(insecure=True, timeout=3.0)
        started = time.monotonic()
        client = RegistryClient(proxy.host, options)
        with client, pytest.raises(RegistryUnreachable) as caught:
            resolve_image(client, f"{proxy.host}/fixtures/small:v1", None)
        assert time.monotonic() - started < 6
        assert str(caught.value).startswith(
            f"cannot reach token issuer {address} for registry {proxy.host}: {cause}"
        ), caught.value
    finally:
        realm.stop()


def realm_answering(body: dict) -> QuietHTTPServer:
    """A realm answering every token request 200 with ``body`` as JSON."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            send_json(self, 200, body)

        def log_message(self, *args: object) -> None:
            pass

    server = QuietHTTPServer(("127.0.0.1", 0), Handler)
    server.start_in_background()
    return server


@pytest.mark.parametrize(
    "token", ["abc\r\nX-Injected: 1", "abc\x00def", "t\u00f8ken", "\u65e5\u672c", "a b"]
)
def test_a_token_that_cannot_go_in_a_header_is_the_issuers_fault(
    registry, pushed_images, fault_proxy, token
):
    """Tried: a realm whose token holds a line break, a NUL, a letter outside ASCII
    (in Latin-1 or not) or a space. Must hold: an auth failure (exit 4) naming the token
    issuer, and nothing sent to the registry with that token. Before, a line break or a
    letter outside Latin-1 failed as "registry ...: a request cannot be made" (exit 3),
    blaming the registry, and a NUL or a Latin-1 letter was sent in the header."""
    realm = realm_answering({"token": token})
    try:
        proxy = fault_proxy(registry)
        address = f"127.0.0.1:{realm.server_address[1]}"
        challenge = f'Bearer realm="http://{address}/token",service="odd"'
        proxy.fault = Fault("status", status=401, headers={"WWW-Authenticate": challenge})
        options = RegistryOptions(insecure=True, timeout=5.0)
        client = RegistryClient(proxy.host, options)
        with client, pytest.raises(AuthError) as caught:
            resolve_image(client, f"{proxy.host}/fixtures/small:v1", None)
        assert str(caught.value) == (
            f"token issuer {address} for registry {proxy.host} sent a token that is not "
            "visible ASCII, as a header needs it"
        )
        assert caught.value.exit_code == 4
        assert not [r for r in proxy.requests if "Authorization" in r.headers]
    finally:
        realm.stop()


def test_a_refusal_where_the_realm_redirected_says_the_login_stayed_behind(fronted):
    """Tried: the realm answers 307 to an issuer of another origin that grants nothing
    anonymous, so it refuses the request, which carried no credentials. Must hold: an
    auth failure (exit 4) naming the realm, where it redirected, and that the login goes
    to the realm's own origin only; no credentials go to the other origin. Before, the
    realm was said to have "refused the user name or password": a good login blamed."""
    server, front = fronted
    other = IssuerFront(front.issuer, listen="127.0.0.2")
    other.start()
    try:
        front.moved_to = other.url
        client = server.client()
        with client, pytest.raises(AuthError) as caught:
            resolve_image(client, f"{server.host}/odd/image:v1", None)
    finally:
        other.stop()
    realm, moved = urlsplit(front.url).netloc, urlsplit(other.url).netloc
    assert str(caught.value) == (
        f"token issuer {realm} for registry {server.host} redirected to {moved}, which "
        f"refused the request (HTTP 401): the login goes to {realm} only"
    )
    assert caught.value.exit_code == 4
    assert other.seen and all(authorization is None for _, authorization in other.seen)
