"""One registry host as the client talks to it: URL, TLS, auth, quiet, redirects.

Every request to a registry goes through ``Endpoint.request``, so the rules
live in one place: Authorization only ever goes to the endpoint's own
origin (a 307 to blob storage or a CDN is followed without it), a 401 is
answered once with new credentials, a host's request for quiet (429/503
with ``Retry-After``) is kept for every later request to it, a host that
stopped answering is not retried until it answers (``Outage``), and
nothing that carries a secret is logged. Retrying is the caller's: one request here
is one attempt, bounded by the caller's deadline.
"""

from __future__ import annotations

import errno
import http.client
import logging
import socket
import ssl
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlencode, urljoin, urlsplit

import requests
import urllib3

from blockstore.errors import (
    AuthError,
    LoginRefused,
    RegistryError,
    RegistryTLSMismatch,
    RegistryUnreachable,
    StorageRefused,
)
from blockstore.registry.auth import (
    Authenticator,
    basic_header,
    granted_actions,
    parse_challenge,
)
from blockstore.registry.credentials import Credentials, login_hint
from blockstore.registry.replies import (
    ERROR_BODY_SECONDS,
    body_within,
    capped_body,
    oci_error,
)
from blockstore.registry.retry import (
    RETRIABLE_STATUS,
    Deadline,
    Outage,
    Quiet,
    TryAgain,
    parse_retry_after,
)
from blockstore.registry.transport import heads_within, url_host

log = logging.getLogger(__name__)

REDIRECT_STATUS = frozenset({301, 302, 303, 307, 308})
STORAGE_REFUSALS = frozenset({400, 403})
"""What storage answers a signed URL past its expiry with: S3 403 (``AccessDenied``), or
400 (``ExpiredToken``) where the credentials that signed it expired, as GCS does."""
QUIET_STATUS = frozenset({429, 503})
"""Statuses whose ``Retry-After`` asks the whole host for quiet."""
MAX_REDIRECTS = 5
MAX_CONNECT_WAIT = 10.0
"""Seconds a connection may take to be made, however long a deadline's stall."""
OAUTH_CLIENT_ID = "blockstore"
"""Who asks, in an OAuth2 token request (the spec requires a client_id)."""
PLAIN_HTTP_TO_TLS = b"Client sent an HTTP request to an HTTPS server"
"""What a Go HTTPS server (the CNCF registry, Harbor, Zot) answers a plain-HTTP request."""
MAX_PLAIN_HTTP_REPLY = 256
TOKEN_BODY_LIMIT = 1 << 20
"""What is read of a token issuer's answer: a token, even a large JWT, is a few KiB."""
Body = bytes | Path | None
"""A request body; a Path is opened anew for each attempt so retries resend it whole."""


class Endpoint:
    """A registry (or mirror) host with its own credentials, tokens and quiet period."""

    def __init__(
        self,
        host: str,
        base_url: str,
        session: requests.Session,
        *,
        credentials: Credentials | None,
        verify: str | bool,
        insecure: bool = False,
        is_mirror: bool = False,
    ):
        self.host = host
        self.base_url = base_url.rstrip("/")
        self.is_mirror = is_mirror
        self._session = session
        self._verify = verify
        self._insecure = insecure
        """Plain HTTP was asked for: credentials may travel in the clear."""
        self.quiet = Quiet()
        self.outage = Outage(host)
        self._own_origin = _origin(self.base_url)
        # A host reached over plain HTTP without --insecure (a mirror written
        # ``http://...``) is not given credentials that would travel in the clear.
        self._withheld = credentials is not None and not self._may_send(self.base_url)
        self.auth = Authenticator(host, None if self._withheld else credentials, self._fetch_token)

    def __repr__(self) -> str:
        return f"Endpoint({self.base_url!r}, mirror={self.is_mirror})"

    def request(
        self,
        method: str,
        path: str,
        *,
        scope: str,
        deadline: Deadline,
        headers: dict[str, str] | None = None,
        body: Body = None,
        stream: bool = False,
    ) -> requests.Response:
        """One attempt at ``method path`` (path from ``/v2/``, or a full URL the registry
        gave us), 401 challenges and redirects answered within it.

        Returns the final reply, whatever its status. Raises ``TryAgain`` when
        no reply came, or storage a redirect led to refused its URL (the caller's
        retry policy decides; ``StorageRefused`` at once for a HEAD), but
        ``RegistryUnreachable`` at once when another attempt cannot help: the
        host is down (``Outage``), TLS failed, or it speaks HTTPS to a plain
        HTTP request. ``RegistryError`` at once when the host asked for quiet
        for longer than ``deadline`` leaves, and ``AuthError`` when
        credentials were refused.
        """
        if not self.quiet.wait(deadline):
            raise RegistryError(
                f"registry {self.host} asked for a pause of {self.quiet.left():.0f}s more, "
                "longer than this request may wait",
                status=429,
            )
        url = path if "://" in path else self.base_url + path
        realm = self.auth.realm
        authorization, unanswered = self._upfront_authorization(scope, deadline)
        answered = False
        while True:
            reply = self._follow_redirects(
                method, url, headers or {}, authorization, body, stream, deadline
            )
            if reply.status_code in QUIET_STATUS:
                pause = parse_retry_after(reply.headers.get("Retry-After"))
                if pause:
                    self.quiet.asked(pause)
            status = reply.status_code
            if status in STORAGE_REFUSALS and _origin(reply.url) != _origin(url):
                # Blob storage refusing the signed URL the registry redirected to: most
                # often one that expired (a registry may hand out a URL it signed minutes
                # ago). Asked again, the registry signs a new one; but a HEAD of a URL
                # signed for GET alone is refused however often it is asked. Where no
                # redirect was followed (an upload URL the registry gave on another
                # host), the answer is the registry's own.
                reply.close()
                refused = StorageRefused(
                    f"{_address(reply.url)}, where registry {self.host} redirected "
                    f"{method} {urlsplit(url).path}, refused it (HTTP {status}): the URL "
                    "the registry signed for it expired or was refused",
                    status=status,
                )
                if method == "HEAD":
                    raise refused
                raise TryAgain(refused)
            if reply.status_code != 401:
                return reply
            if _origin(reply.url) != self._own_origin:
                # Blob storage a redirect led to: its challenge is not the registry's,
                # and answering it would hand the registry's credentials to its realm.
                reply.close()
                raise RegistryError(
                    f"{_address(reply.url)}, where registry {self.host} redirected "
                    f"{method} {urlsplit(url).path}, refused it (HTTP 401); the "
                    "registry's credentials go to the registry only",
                    status=401,
                )
            challenge = reply.headers.get("WWW-Authenticate")
            if self._withheld:
                reply.close()
                raise AuthError(
                    f"registry {self.host} asks for credentials over plain HTTP; they are "
                    "sent in the clear only with --insecure",
                    status=401,
                )
            if answered:
                _, detail = oci_error(reply)
                reply.close()
                raise self._refusal(scope, authorization, detail)
            reply.close()
            if unanswered is not None and _realm_of(challenge) == realm:
                raise unanswered  # the issuer that just failed: asked again, it would again
            authorization = self.auth.answer_challenge(challenge, scope, deadline, authorization)
            answered = True

    def _upfront_authorization(
        self, scope: str, deadline: Deadline
    ) -> tuple[str | None, TryAgain | None]:
        """The ``Authorization`` to send first; none, with why, when the token issuer the
        last challenge named gave no token in time: the registry's 401 then names the
        issuer to ask now. A server idle past its token's life while the issuer moved
        would otherwise ask the old address for ever, every read failing with both of
        them up. Where the 401 names the same issuer, that failure stands (``request``):
        asking at once again would only double the wait, and ignore a ``Retry-After``."""
        try:
            return self.auth.header(scope, deadline), None
        except TryAgain as exc:
            if deadline.expired:
                raise  # no time left to ask anyone: say why
            return None, exc

    def _may_send(self, url: str) -> bool:
        """Whether credentials may go to ``url``: over TLS, or plain HTTP when asked for."""
        return urlsplit(url).scheme == "https" or self._insecure

    def _refusal(self, scope: str, authorization: str | None, detail: str) -> AuthError:
        """The error for a 401 to a request that answered a challenge: a token refused for
        ``scope`` (this request alone, perhaps: ECR Public refuses any blob's HEAD), or
        the user name and password themselves (``LoginRefused``)."""
        said = f" ({detail})" if detail else ""
        if self.auth.credentials is None:
            # An anonymous token a registry takes for pulls but not for this (a push).
            hint = login_hint(self.host)
            return AuthError(
                f"registry {self.host} denies anonymous access to {scope}{said}; {hint}",
                status=401,
            )
        if authorization and authorization.startswith("Bearer "):
            if (push := _push_refusal(self.host, scope, authorization, said)) is not None:
                return push
            return AuthError(
                f"registry {self.host} refused a new token for {scope}{said}", status=401
            )
        return LoginRefused(
            f"registry {self.host} refused the user name and password for {scope}{said}"
            + self.auth.credentials.where_from(),
            status=401,
        )

    def _follow_redirects(
        self,
        method: str,
        url: str,
        headers: dict[str, str],
        authorization: str | None,
        body: Body,
        stream: bool,
        deadline: Deadline,
        *,
        origin: tuple[str, str] | None = None,
        who: str | None = None,
    ) -> requests.Response:
        """``_send`` and the redirects it meets; ``authorization`` goes only to ``origin``
        (default: the registry's own), ``who`` (default: the registry) is named in errors."""
        origin = origin or self._own_origin
        peer, who = who, who or f"registry {self.host}"
        for _ in range(MAX_REDIRECTS + 1):
            sent = dict(headers)
            if authorization and _origin(url) == origin:
                sent["Authorization"] = authorization
            reply = self._send(method, url, sent, body, stream, deadline, who=peer)
            location = reply.headers.get("Location")
            if reply.status_code not in REDIRECT_STATUS or not location:
                return reply
            reply.close()
            url = self._redirect_target(url, location, who)
            log.debug("%s %s redirected to %s", method, who, url_host(url))
        raise RegistryError(f"{who}: more than {MAX_REDIRECTS} redirects")

    def _redirect_target(self, url: str, location: str, who: str) -> str:
        """Where a redirect from ``url`` leads; refused when it is no URL, or when it
        leaves TLS for plain HTTP without --insecure (bytes a man in the middle could
        change, of a blob whose digest is judged only once it is whole)."""
        try:
            target = urljoin(url, location)
            _origin(target)  # a Location that is no URL: a port past 65535, "[::1"
        except ValueError:
            raise RegistryError(f"{who} redirected to an address that is not a URL") from None
        leaves_tls = urlsplit(url).scheme == "https" and urlsplit(target).scheme == "http"
        if leaves_tls and not self._insecure:
            raise RegistryError(
                f"{who} redirected from HTTPS to plain HTTP "
                f"({url_host(target)}): refused, as the reply could be altered "
                "on the way; --insecure allows it"
            )
        return target

    def _send(
        self,
        method: str,
        url: str,
        headers: dict[str, str],
        body: Body,
        stream: bool,
        deadline: Deadline,
        *,
        who: str | None = None,
    ) -> requests.Response:
        """One request; each receive waits at most the deadline's stall or the time left,
        and the status line and headers come before the deadline passes, however slowly
        they trickle (``transport.py``), or it is a timeout and the connection closed.
        ``who`` names the peer in errors (default: the registry, at the address tried)."""
        where = _address(url)
        peer = who or f"registry {where}"
        if deadline.expired:
            raise TryAgain(RegistryUnreachable(f"cannot reach {peer}: timed out"))
        connect_wait = min(deadline.stall, MAX_CONNECT_WAIT)
        kwargs = {
            "headers": headers,
            "stream": stream,
            "timeout": (deadline.cap(connect_wait), deadline.receive_timeout()),
            "allow_redirects": False,
            "verify": self._verify,
        }
        # Only the registry's own origin is judged up or down: a token issuer or blob
        # storage a redirect leads to is another host.
        outage = self.outage if _origin(url) == self._own_origin else None
        # An attempt cut short by the operation's own deadline says nothing of the host.
        short = deadline.left() < connect_wait
        started = time.monotonic()
        if outage is not None:
            outage.enter(where)
        try:
            if isinstance(body, Path) and not body.stat().st_size:
                # An empty file is sent as no bytes: requests sends an empty stream
                # chunked, with no Content-Length, which a blob's PUT must carry.
                body = b""
            with heads_within(deadline):
                if isinstance(body, Path):
                    with body.open("rb") as file:
                        reply = self._session.request(method, url, data=file, **kwargs)
                else:
                    reply = self._session.request(method, url, data=body, **kwargs)
        except requests.exceptions.SSLError as exc:
            cause = describe_failure(exc, not_tls=self._plain_http_hint(url))
            # Only an answer that contradicts the settings is theirs to fix; a handshake
            # cut short (a TLS terminator reloading, overloaded) is an outage.
            failed = RegistryTLSMismatch if settings_contradicted(exc) else RegistryUnreachable
            raise failed(f"cannot connect securely to {where}: {cause}") from None
        except (requests.ConnectionError, requests.Timeout) as exc:
            cause = describe_failure(exc)
            error = f"cannot reach {peer}: {cause}"
            # This machine's shortage, or the operation's own deadline, not the host's.
            judged = local_shortage(exc) is None and not (
                short and isinstance(exc, requests.Timeout)
            )
            down = outage.failed(cause, started) if outage is not None and judged else None
            if down is not None:
                raise RegistryUnreachable(f"{error} ({down})") from None
            raise TryAgain(RegistryUnreachable(error)) from None
        except ValueError as exc:
            # requests' InvalidURL, InvalidSchema, InvalidHeader..., or a redirect it
            # parses ahead: the request cannot be made. Only the type is said: the URL or
            # the header may carry a token.
            raise RegistryError(
                f"registry {self.host}: a request cannot be made ({type(exc).__name__})"
            ) from None
        finally:
            if outage is not None:
                outage.leave()
        if outage is not None:
            outage.answered()
        self._refuse_plain_http_to_tls(reply, url)
        return reply

    def _refuse_plain_http_to_tls(self, reply: requests.Response, url: str) -> None:
        """An HTTPS server asked in plain HTTP answers 400 (Go's servers, the CNCF
        registry among them, say so in the body): that is the wrong scheme, a
        connection problem the user cures, not the registry refusing the request.
        The body is read here, as the 400's error would read it anyway."""
        if reply.status_code != 400 or urlsplit(url).scheme != "http":
            return
        if PLAIN_HTTP_TO_TLS not in capped_body(reply, MAX_PLAIN_HTTP_REPLY, ERROR_BODY_SECONDS):
            return
        reply.close()
        where = url_host(url)
        if _origin(url) != self._own_origin:
            who, cure = where, "the registry sent this http:// URL for it, which cannot work"
        elif self._insecure:
            who = f"registry {where}"
            cure = "drop --insecure, or give --ca-file CA.pem for a self-signed certificate"
        else:
            who, cure = f"registry {where}", "name it with https://, not http://"
        raise RegistryTLSMismatch(f"{who} speaks HTTPS, not plain HTTP: {cure}")

    def _refresh_grant(
        self,
        realm: str,
        params: list[tuple[str, str]],
        refresh_token: str,
        deadline: Deadline,
        who: str,
    ) -> requests.Response:
        """The distribution token spec's OAuth2 refresh-token grant: an identity token from
        ``docker login`` is exchanged for an access token by a POST to the realm. Not
        redirected: the token is in the body, which a redirect would carry along."""
        scopes = " ".join(value for name, value in params if name == "scope")
        form = [
            ("grant_type", "refresh_token"),
            ("refresh_token", refresh_token),
            ("client_id", OAUTH_CLIENT_ID),
            *((name, value) for name, value in params if name == "service"),
            *([("scope", scopes)] if scopes else []),
        ]
        headers = {"Content-Type": "application/x-www-form-urlencoded"}
        return self._send("POST", realm, headers, urlencode(form).encode(), True, deadline, who=who)

    def _plain_http_hint(self, url: str) -> str:
        """What to do about an https:// ``url`` whose server speaks plain HTTP: --insecure
        turns only the registry's own address, named without a scheme, into http://; a
        URL the registry sent (a token realm, a redirect) it does not change."""
        if _origin(url) != self._own_origin:
            return "the registry sent this https:// URL; --insecure does not change it"
        if self._insecure:
            return "the registry is named with https://; --insecure needs it named without"
        return "a plain-HTTP registry needs --insecure"

    def _fetch_token(
        self,
        realm: str,
        params: list[tuple[str, str]],
        credentials: Credentials | None,
        deadline: Deadline,
    ) -> requests.Response:
        if not _is_http_url(realm):
            raise AuthError(
                f"registry {self.host} names a token issuer (realm) that is not an http:// or "
                "https:// URL",
                status=401,
            )
        if credentials and not self._may_send(realm):
            raise AuthError(
                f"token issuer {url_host(realm)} for registry {self.host} is plain "
                "HTTP; credentials are sent to it in the clear only with --insecure"
            )
        who = f"token issuer {url_host(realm)} for registry {self.host}"
        if credentials and credentials.identity_token:
            reply = self._refresh_grant(realm, params, credentials.identity_token, deadline, who)
        else:
            authorization = basic_header(credentials) if credentials else None
            separator = "&" if urlsplit(realm).query else "?"
            url = realm + separator + urlencode(params)
            # Credentials go to the realm's own origin only, as the registry's to its own.
            reply = self._follow_redirects(
                "GET", url, {}, authorization, None, True, deadline, origin=_origin(realm), who=who
            )
        # Read here, within the deadline and at most TOKEN_BODY_LIMIT: a token is a few
        # KiB, and an issuer that trickles it or sends more is not waited out.
        body, whole = body_within(reply, TOKEN_BODY_LIMIT, max(0.0, deadline.left()))
        reply.close()
        if reply.status_code == 200 and not whole and len(body) < TOKEN_BODY_LIMIT:
            # Its token cut short by the deadline or a broken link: the issuer was not
            # reached in time, which is no refused login.
            cause = "timed out" if deadline.expired else "connection closed by the server"
            raise TryAgain(RegistryUnreachable(f"cannot reach {who}: {cause}"))
        if reply.status_code in (401, 403) and credentials and _origin(reply.url) != _origin(realm):
            # Refused where the realm redirected, which the login did not reach: it is
            # no judgement of the login.
            raise LoginRefused(
                f"{who} redirected to {url_host(reply.url)}, which refused the request "
                f"(HTTP {reply.status_code}): the login goes to {url_host(realm)} only",
                status=reply.status_code,
            )
        if reply.status_code in RETRIABLE_STATUS:
            raise TryAgain(
                AuthError(
                    f"{who} answered HTTP {reply.status_code}",
                    status=reply.status_code,
                ),
                parse_retry_after(reply.headers.get("Retry-After")),
            )
        return reply


def _is_http_url(url: str) -> bool:
    """Whether ``url`` is an http:// or https:// URL with a host and a valid port."""
    try:
        _origin(url)  # a port past 65535, "[::1"
    except ValueError:
        return False
    parts = urlsplit(url)
    return parts.scheme in ("http", "https") and bool(parts.hostname)


def _address(url: str) -> str:
    """``url``'s host and port, the port said even where the URL leaves it implied (80 for
    http://, 443 for https://): "localhost refused" leaves the user to guess which."""
    parts = urlsplit(url)
    try:
        explicit = parts.port is not None
    except ValueError:
        explicit = True  # no port a socket could use; the netloc as written says it
    if explicit:
        return url_host(url)
    return f"{url_host(url)}:{443 if parts.scheme == 'https' else 80}"


def _push_refusal(host: str, scope: str, authorization: str, said: str) -> AuthError | None:
    """The error for a push (``scope`` asking for push) refused with a new token: push
    rights asked for and refused, with what the token granted where it says; None for
    any other scope. The token's issuer grants a login what it may do, so it answers a
    push the login may not make with a token for pulls alone, which the registry then
    refuses: a token "refused" says nothing of the rights missing."""
    kind, _, rest = scope.partition(":")
    repository, _, actions = rest.rpartition(":")
    if kind != "repository" or "push" not in actions.split(","):
        return None
    granted = granted_actions(authorization, repository)
    if granted is None:
        why = f"the token its issuer gave for {scope} does not allow it"
    else:
        gave = f"only {', '.join(granted)}" if granted else "nothing"
        why = f"push rights were asked ({scope}) and its token issuer granted {gave}"
    return AuthError(
        f"registry {host} refused a push to {repository}{said}: {why}; the login needs "
        "push rights to that repository",
        status=401,
    )


def _realm_of(www_authenticate: str | None) -> str | None:
    """The token issuer a ``WWW-Authenticate`` value names, if it names one."""
    challenge = parse_challenge(www_authenticate or "")
    return challenge.params.get("realm") if challenge is not None else None


def _origin(url: str) -> tuple[str, str]:
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return parts.scheme, f"{parts.hostname}:{port}"


_CAUSES: list[tuple[type | tuple[type, ...], str]] = [
    (socket.gaierror, "unknown host name"),
    (ConnectionRefusedError, "connection refused"),
    (ConnectionResetError, "connection closed by the server"),
    # urllib3's NewConnectionError is a ConnectTimeoutError: the more precise causes
    # nested in it (refused, unknown host) are looked for first.
    ((TimeoutError, requests.Timeout, urllib3.exceptions.TimeoutError), "timed out"),
    (
        (http.client.HTTPException, urllib3.exceptions.ProtocolError),
        "connection closed by the server",
    ),
]
"""Transport failures by exception type, most precise first, with what a user reads."""


_RENAME = "reach it by a name its certificate holds"
_CERTIFICATE_CURES = {
    # OpenSSL's X509_V_ERR_CERT_NOT_YET_VALID, _CERT_HAS_EXPIRED, _HOSTNAME_MISMATCH and
    # _IP_ADDRESS_MISMATCH
    9: "check this machine's clock",
    10: "it, or the CA that signed it, must be renewed; or check this machine's clock",
    62: _RENAME,
    64: _RENAME,
}
"""What to do about a certificate out of its dates or made for another name, by OpenSSL's
verify code: not a question of which CA to trust. Any other verify failure (an unknown
issuer, a self-signed certificate) wants the CA that signed it."""


def settings_contradicted(exc: BaseException) -> bool:
    """Whether a TLS failure is the registry answering other than the settings say: a
    certificate the CAs given do not trust, or plain HTTP where TLS was asked for."""
    return any(
        isinstance(cause, ssl.SSLCertVerificationError)
        or (isinstance(cause, ssl.SSLError) and cause.reason == "WRONG_VERSION_NUMBER")
        for cause in _causes(exc)
    )


def describe_failure(
    exc: BaseException, *, not_tls: str = "a plain-HTTP registry needs --insecure"
) -> str:
    """A short human cause for a transport failure, from the types of the exceptions
    nested in it: ``connection refused``, ``timed out``, ``unknown host name``;
    ``not_tls`` says what to do about a server that does not speak TLS."""
    causes = list(_causes(exc))
    local = local_shortage(exc)
    if local is not None:
        return local
    for cause in causes:
        if isinstance(cause, ssl.SSLCertVerificationError):
            said = (cause.verify_message or "").rstrip(".")
            cure = _CERTIFICATE_CURES.get(
                cause.verify_code, "give --ca-file with the CA that signed it"
            )
            return f"certificate not trusted ({said}; {cure})"
        if isinstance(cause, ssl.SSLError) and cause.reason == "WRONG_VERSION_NUMBER":
            return f"it does not speak TLS ({not_tls})"
    for cause in causes:
        if isinstance(cause, OSError) and cause.errno in (errno.EHOSTUNREACH, errno.ENETUNREACH):
            return "no route to host"
    for types, cause_text in _CAUSES:
        if any(isinstance(cause, types) for cause in causes):
            return cause_text
    for cause in causes:
        if isinstance(cause, ssl.SSLError) and cause.reason:
            # The TLS alert or OpenSSL's reason: a client certificate asked for, no
            # protocol version in common. "SSLError" alone left the user nothing to go on.
            return f"the TLS handshake failed ({cause.reason.lower().replace('_', ' ')})"
    return type(exc).__name__


_SHORTAGES = {
    errno.EMFILE: "this process is out of file descriptors (too many open files)",
    errno.ENFILE: "the system is out of file descriptors",
    errno.ENOBUFS: "the system is out of socket buffers",
    errno.ENOMEM: "out of memory",
}
"""Failures of this machine, not of the link or the registry, by errno."""


def local_shortage(exc: BaseException) -> str | None:
    """What this machine ran out of, if that is why ``exc`` happened (no socket could be
    made): not the registry's failure, so no sign that it is down."""
    for cause in _causes(exc):
        if isinstance(cause, OSError) and cause.errno in _SHORTAGES:
            return _SHORTAGES[cause.errno]
    return None


def _causes(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and every exception nested in it (causes, contexts, urllib3 reasons, args)."""
    seen: set[int] = set()
    pending: list[object] = [exc]
    while pending:
        cause = pending.pop(0)
        if not isinstance(cause, BaseException) or id(cause) in seen:
            continue
        seen.add(id(cause))
        yield cause
        pending += [cause.__cause__, cause.__context__, getattr(cause, "reason", None), *cause.args]
