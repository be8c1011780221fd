"""Registry authentication: Basic, and Bearer tokens from the registry's issuer.

A registry says how it wants to be authenticated in a 401's
``WWW-Authenticate``. For Bearer, the token issuer (``realm``) gives a token
for a ``service`` and a ``scope`` (``repository:demo/app:pull``). Tokens live
minutes while a mount lives days, so tokens are cached per scope, renewed a
little before they expire, and renewed again when the registry answers 401
to a token we believed still good.
"""

from __future__ import annotations

import base64
import json
import logging
import math
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import requests

from blockstore.errors import AuthError, LoginRefused, RegistryUnreachable
from blockstore.registry.credentials import Credentials, login_hint, renewed_login
from blockstore.registry.replies import reply_json
from blockstore.registry.retry import TryAgain
from blockstore.registry.transport import url_host

if TYPE_CHECKING:
    from blockstore.registry.retry import Deadline

TokenFetch = Callable[
    [str, list[tuple[str, str]], Credentials | None, "Deadline"], requests.Response
]
"""Asks the issuer (realm, query parameters, credentials, deadline) for a token."""

log = logging.getLogger(__name__)

_PARAM = re.compile(r'([A-Za-z0-9_.-]+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,]*))(?=[\s,]|$)')
"""A ``name=value`` parameter, ending at a comma, as RFC 9110 parts them, or at a space
alone, as some fronts write them (``Bearer realm="r" service="s"``): read leniently, the
service is not lost."""
_SCHEME = re.compile(r"([A-Za-z0-9!#$%&'*+.^_`|~-]+)(?=[\s,]|$)")
"""An auth scheme (an RFC 9110 token), ending where its parameters or the next begin."""
_SEPARATORS = re.compile(r"[\s,]*")
_HEADER_TOKEN = re.compile(r"[\x21-\x7e]+")
"""A token that can go in ``Authorization: Bearer``: visible ASCII, as every issuer's
(a JWT, base64) is."""
RENEWAL_RETRY = 1.0
"""Seconds before a token whose renewal failed, still good, is renewed again."""
LOGIN_RETRY = 30.0
"""Seconds before a credential helper that had no other login for a refused one (or
failed) is asked again: until then a request refused with that login fails at once,
rather than running the helper (a second or two for a cloud one) for every read of a
mount. A login renewed meanwhile (``docker login``, a cloud tool's refresh) is taken
at the first refusal past it."""
SPOKEN_SCHEMES = ("bearer", "basic")
"""The auth schemes this client answers, the one it prefers first."""
DEFAULT_TOKEN_LIFETIME = 60.0
"""The distribution spec's lifetime for a token that does not state ``expires_in``."""
MINIMUM_TOKEN_LIFETIME = 60.0
"""The least lifetime a token is taken to have, as docker takes it (its
``minimumTokenLifetimeSeconds``): an issuer stating a second would otherwise be asked
again every few reads. A token that dies sooner is renewed on the registry's 401."""


@dataclass(frozen=True)
class Challenge:
    scheme: str
    """Lowercase: ``basic`` or ``bearer``."""
    params: dict[str, str]


def parse_challenge(value: str) -> Challenge | None:
    """The challenge to answer in a ``WWW-Authenticate`` value, which may offer several
    (``Basic realm="r", Bearer realm="..",service=".."``; HTTP joins several header
    lines so too): Bearer where it is offered, as docker prefers it (its issuer takes
    a login and anonymous pulls alike), else Basic, else the first."""
    return preferred_challenge(parse_challenges(value))


def preferred_challenge(challenges: list[Challenge]) -> Challenge | None:
    """Of ``challenges``, the one ``parse_challenge`` answers."""
    for scheme in SPOKEN_SCHEMES:
        for challenge in challenges:
            if challenge.scheme == scheme:
                return challenge
    return challenges[0] if challenges else None


def parse_challenges(value: str) -> list[Challenge]:
    """Every challenge of a ``WWW-Authenticate`` value, in order: a scheme starts one,
    each ``name=value`` after it is a parameter of it."""
    challenges: list[Challenge] = []
    position = _SEPARATORS.match(value).end()
    while position < len(value):
        param = _PARAM.match(value, position) if challenges else None
        if param is not None:
            quoted, bare = param[2], param[3]
            unquoted = re.sub(r"\\(.)", r"\1", quoted) if quoted is not None else bare
            challenges[-1].params[param[1].lower()] = unquoted or ""
        else:
            param = _SCHEME.match(value, position)
            if param is None:
                break
            challenges.append(Challenge(param[1].lower(), {}))
        position = _SEPARATORS.match(value, param.end()).end()
    return challenges


def token_lifetime(expires_in: object) -> float:
    """``expires_in`` in seconds, ``MINIMUM_TOKEN_LIFETIME`` at least; one that is absent,
    no number, past or endless (a JSON integer past any float too) counts as unstated
    (``DEFAULT_TOKEN_LIFETIME``): the token is still good."""
    if isinstance(expires_in, bool) or not isinstance(expires_in, int | float | str):
        return DEFAULT_TOKEN_LIFETIME
    try:
        lifetime = float(expires_in)
    except (ValueError, OverflowError):
        return DEFAULT_TOKEN_LIFETIME
    if not 0 < lifetime < float("inf"):
        return DEFAULT_TOKEN_LIFETIME
    return max(lifetime, MINIMUM_TOKEN_LIFETIME)


def granted_actions(authorization: str, repository: str) -> list[str] | None:
    """The actions on ``repository`` a Bearer ``authorization``'s token grants, as its
    claims say (the ``access`` claim of the distribution token spec), to say what a
    refusal lacked; None where the token says nothing this can read (an opaque one).
    The claims are only read, never trusted: the registry checks the token."""
    parts = authorization.removeprefix("Bearer ").split(".")
    if len(parts) != 3:
        return None
    try:
        claims = json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
        access = claims["access"]
        return sorted(
            {
                str(action)
                for entry in access
                if entry.get("type") == "repository" and entry.get("name") == repository
                for action in entry.get("actions", [])
            }
        )
    except (ValueError, TypeError, KeyError, AttributeError):
        return None


def basic_header(credentials: Credentials) -> str:
    pair = f"{credentials.username}:{credentials.password}".encode()
    return "Basic " + base64.b64encode(pair).decode()


@dataclass(frozen=True)
class _Token:
    value: str
    renew_at: float
    """Monotonic time after which the token is renewed before use."""
    expires_at: float
    """Monotonic time the issuer said it expires: until then, a token whose renewal
    failed is still sent."""


@dataclass
class _Flight:
    """One token request under way for a scope; the threads that need it wait on it."""

    done: threading.Event = field(default_factory=threading.Event)
    token: _Token | None = None
    error: BaseException | None = None


class Authenticator:
    """The auth state of one registry host: its scheme, and its tokens per scope.

    Thread-safe: several fetch threads share one client. The lock guards the
    state only, never a request to the token issuer: a slow issuer holds up
    the threads that need its token for that scope (one request for all of
    them, each waiting no longer than its deadline), not every request to
    the host.
    """

    def __init__(
        self,
        host: str,
        credentials: Credentials | None,
        fetch_token: TokenFetch,
    ):
        self.host = host
        self.credentials = credentials
        self._fetch_token = fetch_token
        self._lock = threading.Lock()
        self._scheme: str | None = None
        self._bearer: dict[str, str] = {}
        """The realm and service of the last Bearer challenge."""
        self._tokens: dict[str, _Token] = {}
        self._flights: dict[str, _Flight] = {}
        self._renewal_lock = threading.Lock()
        """Held while a credential helper is asked again: by one thread at a time."""
        self._login_retry_at = 0.0
        """Before this (``time.monotonic``), the helper is not asked again (``LOGIN_RETRY``)."""

    @property
    def realm(self) -> str | None:
        """The token issuer the last Bearer challenge named: where tokens are asked for."""
        with self._lock:
            return self._bearer.get("realm")

    def header(self, scope: str, deadline: Deadline) -> str | None:
        """The ``Authorization`` to send up front, renewing a token close to expiry."""
        with self._lock:
            if self._scheme != "bearer":
                return self._basic() if self._scheme == "basic" else None
        return f"Bearer {self._token(scope, deadline).value}"

    def answer_challenge(
        self, www_authenticate: str | None, scope: str, deadline: Deadline, refused: str | None
    ) -> str:
        """After a 401 to a request sent with ``refused`` (its ``Authorization``, if any):
        the ``Authorization`` to retry with, or ``AuthError`` if none can help.

        For Bearer a new token is fetched (or joined, when another thread is
        fetching one for the same scopes): the cached one expired early or was
        revoked. Where another thread has renewed it since the request was sent,
        that token is taken: a token that dies under many reads costs one login.
        The caller answers at most one challenge per request,
        so refused credentials end in an error rather than a loop.
        """
        challenges = parse_challenges(www_authenticate or "")
        challenge = preferred_challenge(challenges)
        if challenge is None or challenge.scheme not in SPOKEN_SCHEMES:
            raise AuthError(self._unspoken(challenges), status=401)
        with self._lock:
            self._scheme = challenge.scheme
            if challenge.scheme == "bearer":
                self._bearer = challenge.params
        if challenge.scheme == "basic":
            return self._basic_answer(refused)
        token = self._token(scope, deadline, refused=refused, asked=challenge.params.get("scope"))
        return f"Bearer {token.value}"

    def _unspoken(self, challenges: list[Challenge]) -> str:
        """Why a 401 offering none of ``SPOKEN_SCHEMES`` cannot be answered."""
        if not challenges:
            return (
                f"registry {self.host} asks for authentication without saying how "
                "(no challenge in WWW-Authenticate)"
            )
        asked = " or ".join(dict.fromkeys(challenge.scheme for challenge in challenges))
        spoken = " and ".join(sorted(SPOKEN_SCHEMES))
        return (
            f"registry {self.host} asks for authentication by {asked}, which this client "
            f"does not speak (it speaks {spoken})"
        )

    def _basic(self) -> str | None:
        """Basic's ``Authorization``, where there is a user name and password."""
        if self.credentials is None or self.credentials.identity_token:
            return None
        return basic_header(self.credentials)

    def _basic_answer(self, refused: str | None) -> str:
        """Basic's ``Authorization`` after a Basic challenge to a request that carried
        ``refused``, or why there is none. Where that was the login itself, a login kept
        by a credential helper is asked for again."""
        if self.credentials and self.credentials.identity_token:
            raise LoginRefused(
                f"registry {self.host} asks for a user name and password; "
                f"{self.credentials.kept_by()} has an identity token for it, which only a "
                "token issuer takes (log in with a password instead)",
                status=401,
            )
        if not self.credentials:
            raise LoginRefused(
                f"registry {self.host} requires a user name and password: {login_hint(self.host)}",
                status=401,
            )
        credentials = self.credentials
        if refused == basic_header(credentials):
            self._renew_login(credentials)
        return basic_header(self.credentials)

    def _renew_login(self, refused: Credentials) -> bool:
        """Whether a login other than ``refused`` is now to be offered: the one its
        credential helper keeps now. Threads refused alike ask the helper once, also when
        it has no other login: else each would ask it in turn, a slow or hanging helper
        holding the last of them for as many times its answer. One that had none, or
        failed, is asked again no sooner than ``LOGIN_RETRY`` later."""
        with self._renewal_lock:
            if self.credentials is not refused:
                return True  # another thread renewed it meanwhile
            if time.monotonic() < self._login_retry_at:
                return False  # asked in vain a moment ago, by this thread or another
            self._login_retry_at = time.monotonic() + LOGIN_RETRY  # unless it has another
            renewed = renewed_login(refused, self.host)
            if renewed is None or renewed == refused:
                return False
            self._login_retry_at = 0.0  # a new login: should it be refused, ask at once
            log.info("registry %s: a new login from %s", self.host, renewed.kept_by())
            self.credentials = renewed
            return True

    def _token(
        self,
        scope: str,
        deadline: Deadline,
        *,
        refused: str | None = None,
        asked: str | None = None,
    ) -> _Token:
        """The token for ``scope``: the one kept while it is fresh, unless it is the one
        the ``Authorization`` ``refused`` carried; else the one a request under way
        brings, else one this thread asks the issuer for."""
        with self._lock:
            kept = self._tokens.get(scope)
            # A challenge asking for more than ``scope`` joins only a request for the same.
            key = scope if asked in (None, scope) else f"{scope}\n{asked}"
            # The kept token serves unless the registry refused it or asks for more.
            usable = key == scope and kept is not None and refused != f"Bearer {kept.value}"
            if usable and time.monotonic() < kept.renew_at:
                return kept
            flight = self._flights.get(key)
            leader = flight is None
            if flight is None:
                flight = self._flights[key] = _Flight()
            bearer = dict(self._bearer)
        try:
            if leader:
                return self._lead(flight, key, scope, bearer, deadline, asked)
            return self._await(flight, deadline)
        except TryAgain as failed:
            if not usable or time.monotonic() >= kept.expires_at:
                raise
            return self._keep_using(scope, kept, failed)

    def _keep_using(self, scope: str, token: _Token, failed: TryAgain) -> _Token:
        """``token``, not expired, which its issuer could not renew now (``failed``): a
        read need not fail while the registry still takes it. It is renewed again no
        sooner than the pause the issuer asked for (``RENEWAL_RETRY`` at least), so a
        busy issuer is not asked at every read, nor later than its expiry. Said once per
        failure: the reads that waited for the same renewal find it postponed already."""
        pause = max(RENEWAL_RETRY, failed.retry_after or 0.0)
        postponed = replace(token, renew_at=min(token.expires_at, time.monotonic() + pause))
        with self._lock:
            if self._tokens.get(scope) is not token:
                return postponed
            self._tokens[scope] = postponed
        log.info(
            "registry %s: the token for %s could not be renewed, used until it expires: %s",
            self.host,
            scope,
            failed.error,
        )
        return postponed

    def _lead(
        self,
        flight: _Flight,
        key: str,
        scope: str,
        bearer: dict[str, str],
        deadline: Deadline,
        asked: str | None,
    ) -> _Token:
        """Ask the issuer, outside the lock, and hand the outcome to every waiter."""
        try:
            flight.token = self._new_token(scope, bearer, deadline, asked)
            return flight.token
        except BaseException as exc:
            flight.error = exc
            raise
        finally:
            with self._lock:
                if flight.token is not None:
                    self._tokens[scope] = flight.token
                del self._flights[key]
            flight.done.set()

    def _await(self, flight: _Flight, deadline: Deadline) -> _Token:
        """The token another thread is fetching, or its error; no longer than ``deadline``."""
        left = deadline.left()
        if not flight.done.wait(None if math.isinf(left) else left):
            raise TryAgain(
                RegistryUnreachable(
                    f"registry {self.host}: no token from its issuer in the time left"
                )
            )
        if flight.error is not None:
            raise flight.error
        assert flight.token is not None
        return flight.token

    def _offered(self) -> str:
        """What was offered to the token issuer, as its refusal names it."""
        if self.credentials is None:
            return "anonymous access"
        if self.credentials.identity_token:
            return f"the identity token from {self.credentials.kept_by()}"
        return "the user name or password"

    def _new_token(
        self,
        scope: str,
        bearer: dict[str, str],
        deadline: Deadline,
        asked: str | None,
        *,
        may_renew: bool = True,
    ) -> _Token:
        """A token for ``scope``, and for the scopes the registry ``asked`` for if they
        differ: space-separated in a challenge, each its own ``scope`` parameter here,
        as the distribution token spec has it. A login the issuer refuses is asked of
        its credential helper again, once (``may_renew``): a helper giving a new login
        at every call is not asked for ever."""
        realm = bearer.get("realm")
        if not realm:
            raise AuthError(f"registry {self.host} sent a Bearer challenge without a realm")
        credentials = self.credentials
        params = [("service", bearer["service"])] if "service" in bearer else []
        params += [("scope", s) for s in dict.fromkeys([scope, *(asked or "").split()])]
        if credentials and not credentials.identity_token:
            params.append(("account", credentials.username))
        started = time.monotonic()
        reply = self._fetch_token(realm, params, credentials, deadline)
        issuer = url_host(realm)
        refused = reply.status_code in (401, 403)
        if refused and credentials and may_renew and self._renew_login(credentials):
            reply.close()
            return self._new_token(scope, bearer, deadline, asked, may_renew=False)
        if refused:
            raise LoginRefused(
                f"token issuer {issuer} for registry {self.host} refused "
                + self._offered()
                + f" for {scope}"
                + (
                    self.credentials.where_from()
                    if self.credentials
                    else f"; {login_hint(self.host)}"
                ),
                status=reply.status_code,
            )
        if reply.status_code != 200:
            raise AuthError(
                f"token issuer {issuer} for registry {self.host} answered HTTP {reply.status_code}",
                status=reply.status_code,
            )
        try:
            body = reply_json(reply)
            value = body.get("token") or body.get("access_token")
        except (ValueError, AttributeError):
            body, value = {}, None
        if not value or not isinstance(value, str):
            raise AuthError(f"token issuer {issuer} for registry {self.host} sent no token")
        if not _HEADER_TOKEN.fullmatch(value):
            # A line break, a NUL, a space or a letter outside ASCII: sent, it would end or
            # garble the header (or fail as a request that cannot be made, said of the
            # registry); it is the issuer's fault, said as such.
            raise AuthError(
                f"token issuer {issuer} for registry {self.host} sent a token that is not "
                "visible ASCII, as a header needs it"
            )
        lifetime = token_lifetime(body.get("expires_in"))
        # Renew a quarter of the lifetime early (at most 30 s): a request that
        # starts with the token must still find it valid at the registry.
        margin = min(30.0, lifetime / 4)
        log.debug("new token for %s %s, lives %.0fs", self.host, scope, lifetime)
        return _Token(value, started + lifetime - margin, started + lifetime)
