"""Where a user name and password for a registry come from.

In order: the options (``--username``/``--password``), the environment
(``BLOCKSTORE_USERNAME``/``BLOCKSTORE_PASSWORD``), then the files ``podman login`` and
``docker login`` write: ``$REGISTRY_AUTH_FILE``, ``$XDG_RUNTIME_DIR/containers/auth.json``
(``/run/containers/UID/auth.json`` where that variable is unset, as under sudo),
``~/.config/containers/auth.json``, ``$DOCKER_CONFIG/config.json``,
``~/.docker/config.json``. A file naming a credential helper for the registry
(``credHelpers``, else ``credsStore``) has the helper asked (``credhelper``), never its
``auths``, as docker asks it: a login ``auths`` still keeps beside it is stale. Else its
``auths`` are read. An entry ``docker login`` wrote with an ``identitytoken`` (an OAuth2
refresh token), or a helper's login for user ``<token>``, gives that token, which is
exchanged at the token issuer, never sent as a password. A key may name a namespace or
repository (``host/org``, as ``podman login host/org`` writes it): the most specific key
that holds the repository is taken, as podman takes it.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

from blockstore.errors import CredentialHelperError, UsageError
from blockstore.registry.credhelper import HelperLogin, ask_helper
from blockstore.registry.reference import DOCKER_HUB

log = logging.getLogger(__name__)

PODMAN_RUN_AUTH = "/run/containers/{uid}/auth.json"
"""Where ``podman login`` keeps a login when ``$XDG_RUNTIME_DIR`` is unset, as it is under
sudo: root's ``sudo podman login`` writes ``/run/containers/0/auth.json``."""

# docker login writes Docker Hub under its v1 index URL, and asks a helper for it by it.
_HUB_ADDRESS = "https://index.docker.io/v1/"
_HUB_KEYS = {"index.docker.io", "docker.io", DOCKER_HUB}


@dataclass(frozen=True)
class Credentials:
    """A user name and password, or an identity token; no secret shows in a repr."""

    username: str
    password: str
    identity_token: str | None = None
    """An OAuth2 refresh token (``docker login``'s ``identitytoken``): it stands for the
    password, and only a Bearer token issuer takes it."""
    auth_file: Path | None = field(default=None, compare=False)
    """The login file they were found in (None: given as options or in the environment),
    named when the registry refuses them: a stale login is then plain to see. Not part
    of what the login is."""
    helper: str | None = field(default=None, compare=False)
    """The credential helper ``auth_file`` names, which gave them (``pass`` for
    ``docker-credential-pass``); None: ``auth_file`` itself holds them."""

    def kept_by(self) -> str:
        """What kept them, as a refusal names it."""
        return f"docker-credential-{self.helper}" if self.helper else "the auth file"

    def where_from(self) -> str:
        """What a refusal of them adds: the login file or helper they came from and what
        to do, or nothing when they were given as options or in the environment."""
        if self.auth_file is None:
            return ""
        if self.helper:
            origin = f"the credential helper {self.kept_by()} (named in {self.auth_file})"
        else:
            origin = str(self.auth_file)
        return f"; they came from {origin}: log in again, or give --username"

    def __repr__(self) -> str:
        token = ", identity_token=***" if self.identity_token else ""
        return f"Credentials(username={self.username!r}, password=***{token})"


def credentials_for(
    host: str,
    repository: str | None = None,
    *,
    username: str | None = None,
    password: str | None = None,
    use_environment: bool = True,
) -> Credentials | None:
    """The credentials to offer ``host``, or None for anonymous.

    ``repository`` picks among auth-file keys naming a namespace of ``host``;
    without it only the host's own keys are taken. ``username``/``password``
    and the environment are meant for the registry a user named; a mirror
    passes ``use_environment=False`` so that only auth-file entries keyed by
    its own name are offered to it. A user name given without a password
    takes only an auth-file login of that user: it names the account to use.
    """
    named = username
    if use_environment:
        given = given_login(username, password)
        if given:
            return given
        named = username if username is not None else os.environ.get("BLOCKSTORE_USERNAME")
    for path in auth_files():
        found = _lookup(path, host, repository, named)
        if found:
            return found
    return None


def given_login(
    username: str | None = None,
    password: str | None = None,
    *,
    username_options: str = "--username",
) -> Credentials | None:
    """The user name and password a user gave: the options, else the environment.

    A password without a user name is refused, not dropped: dropped, the
    registry's 401 would leave the user guessing why the password was not used. The
    refusal names ``username_options``, the ways the command at hand takes a user name.
    """
    username = username if username is not None else os.environ.get("BLOCKSTORE_USERNAME")
    password = password if password is not None else os.environ.get("BLOCKSTORE_PASSWORD")
    if password is not None and not username:
        raise UsageError(
            f"a registry password needs a user name: give {username_options}, "
            "or $BLOCKSTORE_USERNAME"
        )
    for what, value in (("user name", username), ("password", password)):
        if value and not _is_text(value):
            raise UsageError(
                f"the registry {what} given is not UTF-8 text, which is all a request can "
                "carry: give it in UTF-8"
            )
    return Credentials(username, password) if username and password is not None else None


def auth_files() -> list[Path]:
    """The auth files to read, in the order podman and docker consult them."""
    paths: list[Path] = []
    if os.environ.get("REGISTRY_AUTH_FILE"):
        paths.append(Path(os.environ["REGISTRY_AUTH_FILE"]))
    if os.environ.get("XDG_RUNTIME_DIR"):
        paths.append(Path(os.environ["XDG_RUNTIME_DIR"]) / "containers" / "auth.json")
    else:
        paths.append(Path(PODMAN_RUN_AUTH.format(uid=os.getuid())))
    home = Path.home()
    paths.append(home / ".config" / "containers" / "auth.json")
    if os.environ.get("DOCKER_CONFIG"):
        paths.append(Path(os.environ["DOCKER_CONFIG"]) / "config.json")
    paths.append(home / ".docker" / "config.json")
    return paths


def login_hint(host: str) -> str:
    """What a refusal of anonymous access to ``host`` tells the user to do; where an auth
    file leaves the login for ``host`` to a credential helper, which had none for it, that
    too: else they are told to log in, as they did."""
    hint = (
        "give --username with --password or $BLOCKSTORE_PASSWORD, or log in with podman or docker"
    )
    kept = _helper_keeping(host)
    if kept is None:
        return hint
    path, helper = kept
    return (
        f"{hint}; the credential helper docker-credential-{helper} (named in {path}) has no "
        f"login for {host}"
    )


def _helper_keeping(host: str) -> tuple[Path, str] | None:
    """The first auth file that leaves the login for ``host`` to a credential helper, and
    the helper."""
    for path in auth_files():
        try:
            config = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        helper = _helper_in(config, host)
        if helper:
            return path, helper
    return None


def _helper_in(config: object, host: str) -> str | None:
    """The credential helper the auth file ``config`` leaves ``host``'s login to: the one
    ``credHelpers`` names for it, else ``credsStore``, which docker asks for every
    registry."""
    if not isinstance(config, dict):
        return None
    names = _names_of(host)
    helpers = config.get("credHelpers")
    if isinstance(helpers, dict):
        for key, helper in helpers.items():
            if _auth_key_host(key) in names:
                return helper if helper and isinstance(helper, str) else None
    store = config.get("credsStore")
    return store if store and isinstance(store, str) else None


def _from_helper(path: Path, helper: str, host: str, username: str | None) -> Credentials | None:
    """The login ``docker-credential-HELPER``, which the auth file ``path`` names, keeps for
    ``host``; only one of ``username``, when named."""
    login = ask_helper(helper, _HUB_ADDRESS if host in _HUB_KEYS else host, path)
    if login is None:
        return None
    if not _helper_login_sendable(login):
        raise CredentialHelperError(
            f"docker-credential-{helper} answered a login no request can carry: its user "
            "name or secret holds a control character, or its user name a colon, or either "
            "is no text"
        )
    if login.is_identity_token:
        creds = Credentials("", "", identity_token=login.secret)
    else:
        creds = Credentials(login.username, login.secret)
    if username and creds.username != username:
        return None
    return replace(creds, auth_file=path, helper=helper)


def renewed_login(refused: Credentials, host: str) -> Credentials | None:
    """The login the credential helper that gave ``refused`` keeps for ``host`` now, or
    None where they came from elsewhere: a cloud helper's login expires within hours
    (gcloud's in one, ECR's in twelve), and a mount's server outlives it."""
    if refused.helper is None or refused.auth_file is None:
        return None
    return _from_helper(refused.auth_file, refused.helper, host, None)


def _helper_login_sendable(login: HelperLogin) -> bool:
    """Whether a helper's ``login`` can go in a Basic header or a token request as it is:
    text without control characters (a CR LF, which a broken reply is more likely to
    hold than a password, would be a header of its own), and a user name without the
    colon that ends it in ``user:password``."""
    both = login.username + login.secret
    if not _is_text(both) or any(ord(char) < 0x20 or ord(char) == 0x7F for char in both):
        return False
    return login.is_identity_token or ":" not in login.username


def _is_text(value: str) -> bool:
    """Whether ``value`` is text a request can carry: no lone surrogate, which a byte
    that is not UTF-8 becomes in an argument or the environment, and JSON's ``\\ud800``
    too."""
    try:
        value.encode()
    except UnicodeEncodeError:
        return False
    return True


def _lookup(
    path: Path, host: str, repository: str | None, username: str | None
) -> Credentials | None:
    """The most specific login ``path`` keeps for ``repository`` of ``host``; only one of
    ``username``, when named, whichever key holds it (a namespace's login of another user
    does not hide that user's login for the whole registry)."""
    config = _config_of(path)
    helper = _helper_in(config, host)
    if helper:
        # docker asks the helper in place of auths: a login left there is stale.
        return _from_helper(path, helper, host, username)
    auths = _auths_of(config, path)
    held = [
        (key, entry)
        for key, entry in auths.items()
        if isinstance(entry, dict) and _key_holds(key, host, repository)
    ]
    # The most specific first: ``host/org/app`` before ``host/org`` before ``host``.
    for key, entry in sorted(held, key=lambda held: -len(_key_path(held[0]))):
        creds = _decode_entry(entry)
        if creds:
            if not username or creds.username == username:
                return replace(creds, auth_file=path)
            continue
        if entry.keys() & {"auth", "username", "password"}:
            log.warning(
                "ignoring the entry for %s in %s: its auth is not user:password in base64, "
                "nor its username and password strings of UTF-8 text",
                key,
                path,
            )
    return None


def _config_of(path: Path) -> dict:
    """The auth file ``path``: empty where it is missing, or, with a warning, where it is
    unreadable or no JSON object."""
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        log.warning("ignoring unreadable auth file %s: %s", path, type(exc).__name__)
        return {}
    if not isinstance(config, dict):
        log.warning("ignoring auth file %s: it is not a JSON object", path)
        return {}
    return config


def _auths_of(config: dict, path: Path) -> dict:
    """The ``auths`` of the auth file ``path`` (``config`` as read): none, with a warning,
    where it is not an object of logins."""
    auths = config.get("auths") or {}
    if not isinstance(auths, dict):
        log.warning("ignoring auth file %s: its auths is not an object", path)
        return {}
    return auths


def _key_holds(key: str, host: str, repository: str | None) -> bool:
    """Whether the auth-file ``key`` is for ``repository`` of ``host``: its host, and
    the namespace it names (none, or a URL's path, which docker keys carry, stands for
    the whole registry) holding the repository, path component by component."""
    if _auth_key_host(key) not in _names_of(host):
        return False
    namespace = _key_path(key)
    return not namespace or f"{repository or ''}/".startswith(f"{namespace}/")


def _key_path(key: str) -> str:
    """The namespace a podman key names (``host/org`` -> ``org``); none for a URL key
    (``https://index.docker.io/v1/``), whose path is no namespace."""
    if "://" in key:
        return ""
    return key.partition("/")[2].rstrip("/")


def _auth_key_host(key: str) -> str:
    """``https://index.docker.io/v1/`` -> ``index.docker.io``; ``host:5000`` stays."""
    return key.split("://", 1)[-1].split("/", 1)[0]


def _names_of(host: str) -> set[str]:
    return _HUB_KEYS if host in _HUB_KEYS else {host}


def _decode_entry(entry: dict) -> Credentials | None:
    token = entry.get("identitytoken")
    if token and isinstance(token, str) and _is_text(token):
        # docker login pairs it with a placeholder user (all zeros) and no password.
        return Credentials("", "", identity_token=token)
    username, password = entry.get("username"), entry.get("password")
    if username and isinstance(username, str) and isinstance(password, str):
        return Credentials(username, password) if _is_text(username + password) else None
    encoded = entry.get("auth")
    if not encoded or not isinstance(encoded, str):
        return None
    try:
        username, sep, password = base64.b64decode(encoded).decode().partition(":")
    except (binascii.Error, UnicodeDecodeError):
        return None
    return Credentials(username, password) if sep and username else None
