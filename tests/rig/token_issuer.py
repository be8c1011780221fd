"""A small token issuer for the registry's ``auth: token``, as Docker Hub's auth service.

It checks Basic credentials, grants only the requested actions the account
may have (a user may pull and push, anonymous may do what ``anonymous``
allows), and signs an RS256 JWT whose ``x5c`` header carries its
certificate, which the registry trusts through ``rootcertbundle``. Signing
uses ``openssl dgst``, so the rig needs no JWT library.

``expires_in`` is what the issuer tells clients; ``lifetime`` is how long
the registry really accepts the token, so tests can make a token die
before the client expects it to.
"""

from __future__ import annotations

import base64
import json
import math
import secrets
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from rig.processes import QuietHTTPServer

# distribution accepts a token up to 60 s past its "exp" (clock-skew leeway,
# registry/auth/token/token.go); "exp" is set that much earlier so the token
# dies at the registry when ``lifetime`` says. "exp" is whole seconds, rounded up:
# rounded down, a token lived anything from a second less than ``lifetime`` to
# nothing at all, and one renewed after a 401 could be dead before its first use.
REGISTRY_LEEWAY = 60


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class TokenIssuer:
    def __init__(
        self,
        cert: Path,
        key: Path,
        *,
        users: dict[str, str],
        readers: frozenset[str] = frozenset(),
        service: str = "blockstore-test-registry",
        name: str = "blockstore-test-issuer",
        anonymous: frozenset[str] = frozenset(),
    ):
        self.cert, self.key = cert, key
        self.users = users
        self.readers = readers
        """Users who may pull but not push."""
        self.service, self.name = service, name
        self.anonymous = anonymous
        self.expires_in = 300
        self.lifetime: float | None = None
        """Real lifetime at the registry in seconds; None: ``expires_in``."""
        self.legacy_reply = False
        """Answer OAuth2-style: only ``access_token``, no ``expires_in`` (60 s to clients)."""
        self.busy_for: int | None = None
        """Answer every request 503 with this ``Retry-After``; None: answer as usual."""
        self.delay = 0.0
        """Seconds each request waits before its answer: a slow issuer."""
        self.asked: list[float] = []
        """When each token request came (monotonic)."""
        self.issued: list[dict] = []
        """One entry per token: ``account``, ``access`` granted, ``time``."""
        self._lock = threading.Lock()
        pem = cert.read_text()
        body = pem.split("-----BEGIN CERTIFICATE-----")[1].split("-----END CERTIFICATE-----")[0]
        self._x5c = "".join(body.split())
        self._server = QuietHTTPServer(("127.0.0.1", 0), _handler(self))
        self.realm = f"http://127.0.0.1:{self._server.server_address[1]}/token"

    def start(self) -> None:
        self._server.start_in_background()

    def stop(self) -> None:
        self._server.stop()

    @property
    def tokens_issued(self) -> int:
        with self._lock:
            return len(self.issued)

    def answer(self, query: dict[str, list[str]], authorization: str | None) -> tuple[int, dict]:
        """The status and JSON body for one token request."""
        account = None
        if authorization:
            scheme, _, encoded = authorization.partition(" ")
            try:
                user, _, password = base64.b64decode(encoded).decode().partition(":")
            except ValueError:
                return 400, {"details": "malformed Authorization"}
            if scheme.lower() != "basic" or self.users.get(user) != password:
                return 401, {"details": "wrong user name or password"}
            account = user
        if query.get("service", [None])[0] != self.service:
            return 400, {"details": "unknown service"}
        if account is None:
            allowed = set(self.anonymous)
        else:
            allowed = {"pull"} if account in self.readers else {"pull", "push"}
        if account is None and not allowed:
            return 401, {"details": "authentication required"}
        access = []
        for scope in query.get("scope", []):
            kind, _, rest = scope.partition(":")
            name, _, actions = rest.rpartition(":")
            granted = [a for a in actions.split(",") if a in allowed]
            if kind == "repository" and name and granted:
                access.append({"type": kind, "name": name, "actions": granted})
        return 200, self._token(account or "", access)

    def _token(self, account: str, access: list[dict]) -> dict:
        issued = time.time()
        now = int(issued)
        lifetime = self.lifetime if self.lifetime is not None else self.expires_in
        claims = {
            "iss": self.name,
            "sub": account,
            "aud": self.service,
            "exp": math.ceil(issued + lifetime) - REGISTRY_LEEWAY,
            "nbf": now - 1,
            "iat": now,
            "jti": secrets.token_hex(8),
            "access": access,
        }
        header = {"typ": "JWT", "alg": "RS256", "x5c": [self._x5c]}
        signing_input = (
            f"{_b64url(json.dumps(header).encode())}.{_b64url(json.dumps(claims).encode())}"
        )
        signature = subprocess.run(
            ["openssl", "dgst", "-sha256", "-sign", str(self.key)],
            input=signing_input.encode(),
            capture_output=True,
            check=True,
        ).stdout
        token = f"{signing_input}.{_b64url(signature)}"
        with self._lock:
            self.issued.append({"account": account, "access": access, "time": time.time()})
        if self.legacy_reply:
            return {"access_token": token}
        return {
            "token": token,
            "access_token": token,
            "expires_in": self.expires_in,
            "issued_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now)),
        }


def send_json(handler: BaseHTTPRequestHandler, status: int, body: dict) -> None:
    """Answer a request with ``body`` as JSON, as token issuers do."""
    data = json.dumps(body).encode()
    handler.send_response(status)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", str(len(data)))
    handler.end_headers()
    handler.wfile.write(data)


def _handler(issuer: TokenIssuer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            issuer.asked.append(time.monotonic())
            time.sleep(issuer.delay)
            if issuer.busy_for is not None:
                self.send_response(503)
                self.send_header("Retry-After", str(issuer.busy_for))
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            parts = urlsplit(self.path)
            if parts.path != "/token":
                status, body = 404, {"details": "not found"}
            else:
                status, body = issuer.answer(
                    parse_qs(parts.query), self.headers.get("Authorization")
                )
            send_json(self, status, body)

        def log_message(self, *args: object) -> None:
            pass

    return Handler
