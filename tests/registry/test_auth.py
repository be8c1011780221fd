"""Every way to reach a registry: HTTPS with a private CA, basic auth, token auth."""

from __future__ import annotations

import base64
import contextlib
import itertools
import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import requests
from rig.fault_proxy import Fault
from rig.pushed import push_erofs
from rig.registry_server import RegistryServer, TokenAuth
from rig.token_issuer import TokenIssuer

import blockstore.registry.auth as auth
import blockstore.registry.credentials as credentials
from blockstore.errors import (
    AuthError,
    BlobReadError,
    NotFound,
    RegistryUnreachable,
    UsageError,
)
from blockstore.registry import (
    RegistryBlob,
    RegistryClient,
    RegistryOptions,
    parse_reference,
    resolve_image,
)
from blockstore.registry.endpoint import Endpoint
from blockstore.registry.retry import Deadline, TryAgain


def read_whole(client: RegistryClient, ref: str, chunk: int = 1 << 20) -> bytes:
    image = resolve_image(client, ref, None)
    blob = RegistryBlob(client, parse_reference(ref).repository, image.layers[0])
    return b"".join(blob.read_range(o, chunk) for o in range(0, blob.size, chunk))


def push_small(server, repository: str, erofs_images) -> str:
    options = server.options()
    return push_erofs(server.host, repository, "v1", [erofs_images.small.path], options=options)


@pytest.fixture(scope="module")
def tls_image(tls_registry, erofs_images) -> str:
    return push_small(tls_registry, "auth/tls", erofs_images)


@pytest.fixture(scope="module")
def basic_image(basic_auth_registry, erofs_images) -> str:
    return push_small(basic_auth_registry, "auth/basic", erofs_images)


@pytest.fixture(scope="module")
def token_image(token_registry, erofs_images) -> str:
    return push_small(token_registry, "auth/token", erofs_images)


def test_https_with_the_test_ca(tls_registry, tls_image, erofs_images):
    """Over HTTPS, verified with the CA file, the layer reads back byte for byte."""
    with tls_registry.client() as client:
        assert read_whole(client, tls_image) == erofs_images.small.path.read_bytes()


def test_https_without_the_ca_is_refused(tls_registry, tls_image):
    """Without the CA file the system CAs do not vouch for the registry: a clear refusal."""
    with tls_registry.client(ca_file=None) as client, pytest.raises(RegistryUnreachable) as caught:
        resolve_image(client, tls_image, None)
    assert "certificate not trusted" in str(caught.value)
    assert "--ca-file" in str(caught.value)


def test_missing_ca_file_is_a_usage_error(tls_registry, tmp_path):
    """A CA file that is not there is the user's mistake, said before any connection."""
    with pytest.raises(UsageError, match="does not exist"):
        tls_registry.client(ca_file=str(tmp_path / "nope.pem"))


def test_basic_auth_with_options(basic_auth_registry, basic_image, erofs_images):
    """A user name and password from the options open a basic-auth registry."""
    with basic_auth_registry.client() as client:
        assert read_whole(client, basic_image) == erofs_images.small.path.read_bytes()


def test_basic_auth_from_the_environment(basic_auth_registry, basic_image, monkeypatch):
    """BLOCKSTORE_USERNAME/BLOCKSTORE_PASSWORD stand in for the options."""
    monkeypatch.setenv("BLOCKSTORE_USERNAME", basic_auth_registry.username)
    monkeypatch.setenv("BLOCKSTORE_PASSWORD", basic_auth_registry.password)
    with basic_auth_registry.client(username=None, password=None) as client:
        assert resolve_image(client, basic_image, None).layers


def _auths(registry, key: str | None = None) -> dict:
    pair = f"{registry.username}:{registry.password}".encode()
    return {"auths": {key or registry.host: {"auth": base64.b64encode(pair).decode()}}}


def test_basic_auth_from_docker_config(basic_auth_registry, basic_image, monkeypatch, tmp_path):
    """``$DOCKER_CONFIG/config.json`` auths, as ``docker login`` writes them, are used."""
    (tmp_path / "docker").mkdir()
    (tmp_path / "docker" / "config.json").write_text(json.dumps(_auths(basic_auth_registry)))
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "docker"))
    with basic_auth_registry.client(username=None, password=None) as client:
        assert resolve_image(client, basic_image, None).layers


def test_basic_auth_from_home_docker_config(
    basic_auth_registry, basic_image, no_ambient_credentials
):
    """``~/.docker/config.json`` with a URL-style key is used too."""
    config = no_ambient_credentials / ".docker" / "config.json"
    config.parent.mkdir()
    config.write_text(
        json.dumps(_auths(basic_auth_registry, f"https://{basic_auth_registry.host}"))
    )
    with basic_auth_registry.client(username=None, password=None) as client:
        assert resolve_image(client, basic_image, None).layers


def test_basic_auth_from_containers_auth_json(
    basic_auth_registry, basic_image, monkeypatch, tmp_path
):
    """``$REGISTRY_AUTH_FILE`` (podman's auth.json) with username/password fields is used."""
    auth_file = tmp_path / "auth.json"
    entry = {"username": basic_auth_registry.username, "password": basic_auth_registry.password}
    auth_file.write_text(json.dumps({"auths": {basic_auth_registry.host: entry}}))
    monkeypatch.setenv("REGISTRY_AUTH_FILE", str(auth_file))
    with basic_auth_registry.client(username=None, password=None) as client:
        assert resolve_image(client, basic_image, None).layers


def test_basic_auth_from_podmans_run_directory_without_xdg_runtime_dir(
    basic_auth_registry, basic_image, monkeypatch, tmp_path
):
    """Tried: a login where ``podman login`` keeps it when ``$XDG_RUNTIME_DIR`` is unset,
    as under sudo (root's in ``/run/containers/0/auth.json``; here that place is moved
    under the test's directory), then ``$XDG_RUNTIME_DIR`` set to another directory.
    Must hold: unset, the login is used; set, that place is not looked in, as podman
    does not. Before, that place was never looked in: ``sudo podman login`` then
    ``sudo blockstore mount`` was refused as anonymous."""
    run_auth = tmp_path / "run" / "containers" / "{uid}" / "auth.json"
    monkeypatch.setattr(credentials, "PODMAN_RUN_AUTH", str(run_auth))
    login = Path(str(run_auth).format(uid=os.getuid()))
    login.parent.mkdir(parents=True)
    login.write_text(json.dumps(_auths(basic_auth_registry)))
    with basic_auth_registry.client(username=None, password=None) as client:
        assert resolve_image(client, basic_image, None).layers
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "xdg"))
    with (
        basic_auth_registry.client(username=None, password=None) as client,
        pytest.raises(AuthError),
    ):
        resolve_image(client, basic_image, None)


@pytest.mark.parametrize(
    "broken",
    [
        {"auths": ["x"]},
        {"auths": "abc"},
        {"auths": {"HOST": {"auth": 5}}},
        {"auths": {"HOST": {"auth": ["YWxpY2U6cHc="]}}},
        {"auths": {"HOST": {"username": "alice", "password": 5}}},
    ],
    ids=["auths-list", "auths-string", "auth-number", "auth-list", "password-number"],
)
def test_a_malformed_auth_file_is_passed_over_for_the_next(
    basic_auth_registry, basic_image, no_ambient_credentials, monkeypatch, tmp_path, caplog, broken
):
    """Tried: ``$REGISTRY_AUTH_FILE`` whose ``auths`` is no object, or whose entry for
    the registry has an ``auth`` or a password that is no string, and a good login in
    ``~/.docker/config.json``. Must hold: the malformed file or entry is passed over
    with a warning naming the file, and the next file's login opens the image. Before,
    the client could not be made: an AttributeError or TypeError (a traceback), or the
    number was sent as the password and refused."""
    text = json.dumps(broken).replace("HOST", basic_auth_registry.host)
    (tmp_path / "auth.json").write_text(text)
    monkeypatch.setenv("REGISTRY_AUTH_FILE", str(tmp_path / "auth.json"))
    config = no_ambient_credentials / ".docker" / "config.json"
    config.parent.mkdir()
    config.write_text(json.dumps(_auths(basic_auth_registry)))
    with basic_auth_registry.client(username=None, password=None) as client:
        assert resolve_image(client, basic_image, None).layers
    assert str(tmp_path / "auth.json") in caplog.text


def test_basic_auth_wrong_password(basic_auth_registry, basic_image, caplog):
    """A wrong password is an AuthError that says so, and the password shows nowhere."""
    caplog.set_level(logging.DEBUG)
    secret = "not-the-password-4711"
    with basic_auth_registry.client(password=secret) as client:
        with pytest.raises(AuthError) as caught:
            resolve_image(client, basic_image, None)
        # Asked again, now with the credentials sent up front: the same answer.
        with pytest.raises(AuthError) as again:
            resolve_image(client, basic_image, None)
    assert str(again.value) == str(caught.value)
    message = str(caught.value)
    assert "refused the user name and password" in message and basic_auth_registry.host in message
    assert caught.value.exit_code == 4
    assert secret not in message and secret not in caplog.text


def _stale_login_file(registry, password: str, tmp_path, monkeypatch) -> Path:
    """A ``docker login`` file (found through DOCKER_CONFIG) holding ``password`` for the
    registry's user."""
    config = tmp_path / "docker" / "config.json"
    config.parent.mkdir()
    auth = base64.b64encode(f"{registry.username}:{password}".encode()).decode()
    config.write_text(json.dumps({"auths": {registry.host: {"auth": auth}}}))
    monkeypatch.setenv("DOCKER_CONFIG", str(config.parent))
    return config


def test_a_stale_login_in_an_auth_file_is_named_when_refused(
    basic_auth_registry, basic_image, monkeypatch, tmp_path
):
    """Tried: a login file (``docker login``'s) holding an old password for the registry,
    nothing given on the command line. Must hold: exit 4, the line naming the file the
    refused login came from and what to do; never the password. Before, it said only
    that the user name and password were refused, leaving the user to guess which."""
    stale = "an-old-password-0815"
    config = _stale_login_file(basic_auth_registry, stale, tmp_path, monkeypatch)
    client = basic_auth_registry.client(username=None, password=None)
    with client, pytest.raises(AuthError) as caught:
        resolve_image(client, basic_image, None)
    message = str(caught.value)
    assert message.endswith(f"; they came from {config}: log in again, or give --username")
    assert caught.value.exit_code == 4 and stale not in message


def test_a_stale_login_refused_by_a_token_issuer_names_its_auth_file(
    token_registry, token_image, monkeypatch, tmp_path
):
    """Tried: a login file holding an old password for a registry whose token issuer
    checks it (as most public registries do). Must hold: exit 4, the line naming the file
    the refused login came from and what to do; never the password. Before, only a
    registry checking the password itself (Basic) named the file; the issuer's refusal
    said only that the user name or password was refused."""
    stale = "an-old-token-password-4711"
    config = _stale_login_file(token_registry, stale, tmp_path, monkeypatch)
    client = token_registry.client(username=None, password=None)
    with client, pytest.raises(AuthError) as caught:
        resolve_image(client, token_image, None)
    message = str(caught.value)
    assert "refused the user name or password" in message, message
    assert message.endswith(f"; they came from {config}: log in again, or give --username")
    assert caught.value.exit_code == 4 and stale not in message


def test_a_login_for_a_namespace_is_used_for_its_repositories_only(
    basic_auth_registry, erofs_images, monkeypatch, tmp_path
):
    """Tried: ``push`` and ``inspect`` with an auth file (podman's) holding two logins for
    the registry, keyed by namespace as ``podman login HOST/NAMESPACE`` writes them: a
    stale one for ``HOST/other``, listed first, and the good one for ``HOST/team``. Must
    hold: ``HOST/team/app`` is pushed and inspected with the good login (exit 0), as
    podman picks the most specific key holding the repository; ``HOST/other/app`` gets
    the stale one (exit 4, the file named). Before, the first key of the host was taken
    whatever its namespace, and the push to ``team`` failed with the stale login."""
    host = basic_auth_registry.host
    auth_file = tmp_path / "auth.json"
    login = {
        f"{host}/other": f"{basic_auth_registry.username}:stale-password",
        f"{host}/team": f"{basic_auth_registry.username}:{basic_auth_registry.password}",
    }
    auths = {key: {"auth": base64.b64encode(pair.encode()).decode()} for key, pair in login.items()}
    auth_file.write_text(json.dumps({"auths": auths}))
    monkeypatch.setenv("REGISTRY_AUTH_FILE", str(auth_file))

    def blockstore(*args: str) -> subprocess.CompletedProcess:
        command = [sys.executable, "-m", "blockstore", *args, "--insecure"]
        return subprocess.run(command, capture_output=True, text=True, timeout=60)

    small = str(erofs_images.small.path)
    pushed = blockstore("push", small, f"{host}/team/app:v1")
    assert pushed.returncode == 0, pushed.stderr
    assert blockstore("inspect", f"{host}/team/app:v1").returncode == 0
    refused = blockstore("push", small, f"{host}/other/app:v1")
    assert refused.returncode == 4 and f"they came from {auth_file}" in refused.stderr


def test_a_user_named_without_a_password_takes_only_that_users_login(
    basic_auth_registry, erofs_images, monkeypatch, tmp_path
):
    """Tried: ``push --username`` with no password, where an auth file holds a good login
    of another user for the registry; then ``--username`` naming that file's user. Must
    hold: the first is refused (exit 2, saying the password is missing) and pushes
    nothing, since the user named is the account to push as; the second pushes with the
    file's login (exit 0). Before, the first pushed as the file's user, not the one
    named, without a word."""
    host = basic_auth_registry.host
    login = f"{basic_auth_registry.username}:{basic_auth_registry.password}"
    auth_file = tmp_path / "auth.json"
    auth = base64.b64encode(login.encode()).decode()
    auth_file.write_text(json.dumps({"auths": {host: {"auth": auth}}}))
    monkeypatch.setenv("REGISTRY_AUTH_FILE", str(auth_file))

    def blockstore(*args: str) -> subprocess.CompletedProcess:
        command = [sys.executable, "-m", "blockstore", *args, "--insecure"]
        return subprocess.run(command, capture_output=True, text=True, timeout=60)

    small = str(erofs_images.small.path)
    other = blockstore("push", small, f"{host}/named/app:v1", "--username", "mallory")
    assert other.returncode == 2 and "without a password" in other.stderr, other.stderr
    assert blockstore("inspect", f"{host}/named/app:v1").returncode == 3  # nothing pushed
    own = blockstore("push", small, f"{host}/named/app:v1", "--username", login.split(":")[0])
    assert own.returncode == 0, own.stderr


def test_a_user_named_without_a_password_takes_that_users_login_past_a_namespace_one(
    basic_auth_registry, erofs_images, monkeypatch, tmp_path
):
    """Tried: ``push --username`` with no password to ``host/named/app``, where an auth
    file holds another user's login for the namespace (``host/named``, as ``podman login
    host/named`` writes it) and the named user's good login for the whole registry.
    Must hold: the push goes as the user named, with that user's login (exit 0). Before,
    only the most specific login was looked at, and, being another user's, the command
    was refused as if no password were kept for the user named (exit 2)."""
    host = basic_auth_registry.host
    user = basic_auth_registry.username
    login = base64.b64encode(f"{user}:{basic_auth_registry.password}".encode()).decode()
    other = base64.b64encode(b"mallory:not-the-password").decode()
    auths = {f"{host}/named": {"auth": other}, host: {"auth": login}}
    auth_file = tmp_path / "auth.json"
    auth_file.write_text(json.dumps({"auths": auths}))
    monkeypatch.setenv("REGISTRY_AUTH_FILE", str(auth_file))
    command = [sys.executable, "-m", "blockstore", "push", str(erofs_images.small.path)]
    command += [f"{host}/named/app:v1", "--username", user, "--insecure"]
    pushed = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert pushed.returncode == 0, pushed.stderr


def test_a_login_that_is_no_text_is_refused_without_showing_it(
    basic_auth_registry, erofs_images, monkeypatch, tmp_path
):
    """Tried: ``inspect`` with ``--password`` holding a byte that is not UTF-8 (typed in
    a Latin-1 terminal); then with nothing given, an auth file whose entry's password
    is a JSON string holding a lone surrogate (``\\ud800``). Must hold: the first exits
    2, one line saying the password given is not UTF-8 text, no traceback, nothing of
    the password shown; the second skips the entry with a warning naming it and asks
    anonymously (exit 4, anonymous access refused). Before, both crashed (exit 1) with
    a traceback quoting a character of the password."""
    host = basic_auth_registry.host
    command = [sys.executable, "-m", "blockstore", "inspect", f"{host}/text/app:v1", "--insecure"]
    given = [*command, "--username", "alice", "--password", b"pw-\xffsecret"]
    refused = subprocess.run(given, capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2, refused.stderr
    assert "the registry password given is not UTF-8 text" in refused.stderr
    assert refused.stderr.count("\n") == 1 and "secret" not in refused.stderr
    auth_file = tmp_path / "auth.json"
    entry = '{"username": "alice", "password": "pw-\\ud800secret"}'
    auth_file.write_text(f'{{"auths": {{"{host}": {entry}}}}}')
    monkeypatch.setenv("REGISTRY_AUTH_FILE", str(auth_file))
    skipped = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert skipped.returncode == 4, skipped.stderr
    assert f"ignoring the entry for {host} in {auth_file}" in skipped.stderr
    assert "requires a user name and password" in skipped.stderr
    assert "Traceback" not in skipped.stderr and "secret" not in skipped.stderr


def test_basic_auth_without_credentials(
    basic_auth_registry, basic_image, monkeypatch, tmp_path, caplog
):
    """No usable credentials: a user name with no password, and an auth file whose entry
    for the registry is not base64 of user:password. The error says the registry wants a
    user name and password and how to give the password (not only --username, which was
    given); the broken entry is named in a warning, not skipped without a word."""
    auth_file = tmp_path / "auth.json"
    auths = {basic_auth_registry.host: {"auth": "not base64 at all!"}}
    auth_file.write_text(json.dumps({"auths": auths}))
    monkeypatch.setenv("REGISTRY_AUTH_FILE", str(auth_file))
    client = basic_auth_registry.client(username=basic_auth_registry.username, password=None)
    with client, pytest.raises(AuthError, match="requires a user name and password") as caught:
        resolve_image(client, basic_image, None)
    assert "--password or $BLOCKSTORE_PASSWORD" in str(caught.value)
    assert f"ignoring the entry for {basic_auth_registry.host} in {auth_file}" in caplog.text


def test_token_auth_pull_and_scope(token_registry, token_image, erofs_images):
    """Token auth: the issuer is asked for exactly the repository and action needed."""
    issuer = token_registry.issuer
    before = issuer.tokens_issued
    with token_registry.client() as client:
        assert read_whole(client, token_image) == erofs_images.small.path.read_bytes()
    granted = [entry["access"] for entry in issuer.issued[before:]]
    assert granted == [[{"type": "repository", "name": "auth/token", "actions": ["pull"]}]]


def test_token_auth_wrong_password(token_registry, token_image, caplog):
    """The issuer refuses a wrong password: AuthError naming the issuer, no password shown."""
    caplog.set_level(logging.DEBUG)
    secret = "wrong-token-password-0815"
    with token_registry.client(password=secret) as client, pytest.raises(AuthError) as caught:
        resolve_image(client, token_image, None)
    message = str(caught.value)
    assert "refused the user name or password" in message
    assert secret not in message and secret not in caplog.text


def test_token_auth_anonymous_refused(token_registry, token_image):
    """Anonymous access to a registry whose issuer grants nothing anonymous: refused, said so."""
    client = token_registry.client(username=None, password=None)
    with client, pytest.raises(AuthError, match="refused anonymous access"):
        resolve_image(client, token_image, None)


def test_an_anonymous_push_refused_where_anonymous_pulls_are_taken_says_to_log_in(
    tmp_path, test_ca, erofs_images
):
    """Tried: ``push`` with no credentials to a token-auth registry whose issuer gives
    anonymous tokens for pulls only (a registry with public images), and ``inspect`` with
    none where the issuer gives anonymous nothing. Must hold: exit 4, each line saying
    anonymous access was refused and how to give a login, as Basic auth's refusal says.
    Before, the push said only that the registry "refused a new token", nothing of
    anonymous or of logging in, and the issuer's refusal gave no way out either."""
    cert, key = test_ca.issue("anonymous-pulls", server=False)
    issuer = TokenIssuer(cert, key, users={"erin": "erin-pw"}, anonymous=frozenset({"pull"}))
    issuer.start()
    auth = TokenAuth(issuer.realm, issuer.service, issuer.name, test_ca.cert)
    server = RegistryServer(tmp_path / "registry", token=auth, username="erin", password="erin-pw")
    server.start()
    hint = "give --username with --password or $BLOCKSTORE_PASSWORD, or log in with podman"
    try:
        push_small(server, "open/app", erofs_images)
        command = [sys.executable, "-m", "blockstore", "push", str(erofs_images.small.path)]
        command += [f"{server.host}/open/app:v2", "--insecure"]
        pushed = subprocess.run(command, capture_output=True, text=True, timeout=60)
        assert pushed.returncode == 4, pushed.stderr
        assert "denies anonymous access to repository:open/app:pull,push" in pushed.stderr
        assert hint in pushed.stderr
        issuer.anonymous = frozenset()
        command = [sys.executable, "-m", "blockstore", "inspect", f"{server.host}/open/app:v1"]
        inspected = subprocess.run(
            [*command, "--insecure"], capture_output=True, text=True, timeout=60
        )
        assert inspected.returncode == 4, inspected.stderr
        assert "refused anonymous access" in inspected.stderr and hint in inspected.stderr
    finally:
        server.stop()
        issuer.stop()


@pytest.fixture
def seconds_long_tokens(monkeypatch):
    """Lets tokens live the seconds their issuer states, under the minute a lifetime is
    otherwise taken to be at least: renewal is then seen within a test's few seconds."""
    monkeypatch.setattr(auth, "MINIMUM_TOKEN_LIFETIME", 0.0)


@pytest.fixture
def token_lifetime(token_registry):
    """Lets a test change the issuer's token lifetimes, and puts them back."""
    issuer = token_registry.issuer
    saved = (issuer.expires_in, issuer.lifetime, issuer.legacy_reply)
    yield issuer
    issuer.expires_in, issuer.lifetime, issuer.legacy_reply = saved


def _read_slowly(client, ref: str, seconds: float) -> bytes:
    """Read a layer in pieces spread over ``seconds``: a long-lived reader."""
    image = resolve_image(client, ref, None)
    blob = RegistryBlob(client, parse_reference(ref).repository, image.layers[0])
    pieces, chunk = [], blob.size // 8 + 1
    for offset in range(0, blob.size, chunk):
        pieces.append(blob.read_range(offset, chunk))
        time.sleep(seconds / 8)
    return b"".join(pieces)


def test_token_renewed_before_it_expires(
    token_registry, token_image, token_lifetime, erofs_images, seconds_long_tokens
):
    """Tokens that live 2 s are renewed ahead of expiry while a read goes on for 3 s."""
    token_lifetime.expires_in = 2
    before = token_lifetime.tokens_issued
    with token_registry.client() as client:
        data = _read_slowly(client, token_image, 3.0)
    assert data == erofs_images.small.path.read_bytes()
    assert token_lifetime.tokens_issued - before >= 2


def test_a_token_said_to_have_expired_already_is_not_fetched_for_every_request(
    token_registry, token_image, token_lifetime, erofs_images
):
    """An issuer whose expires_in is negative (the token expired before it was sent):
    taken as unstated (60 s), so a read goes on with one token, not one token per
    request, as it did."""
    token_lifetime.expires_in = -1000
    token_lifetime.lifetime = 300
    before = token_lifetime.tokens_issued
    with token_registry.client() as client:
        data = _read_slowly(client, token_image, 1.0)
    assert data == erofs_images.small.path.read_bytes()
    assert token_lifetime.tokens_issued - before == 1


def test_a_token_said_to_live_a_second_serves_many_reads_with_one_login(
    token_registry, token_image, token_lifetime, erofs_images
):
    """Tried: an issuer whose ``expires_in`` is 1 (the registry takes the token for 5
    minutes), then a layer read in many pieces over 2 s. Must hold: one login for the
    whole read: a lifetime under a minute counts as a minute, as docker counts it.
    Before, the token was renewed 0.75 s on, again and again: one login every few
    reads (every read, under a second)."""
    token_lifetime.expires_in = 1
    token_lifetime.lifetime = 300
    before = token_lifetime.tokens_issued
    with token_registry.client() as client:
        data = _read_slowly(client, token_image, 2.0)
    assert data == erofs_images.small.path.read_bytes()
    assert token_lifetime.tokens_issued - before == 1


def test_token_that_dies_early_is_renewed_on_401(
    token_registry, token_image, token_lifetime, erofs_images
):
    """The issuer promises an hour but the registry drops the token after 1.5 s: the
    401 mid-read is answered with a new token and the reader never notices."""
    token_lifetime.expires_in = 3600
    token_lifetime.lifetime = 1.5
    before = token_lifetime.tokens_issued
    with token_registry.client() as client:
        data = _read_slowly(client, token_image, 3.0)
    assert data == erofs_images.small.path.read_bytes()
    assert token_lifetime.tokens_issued - before >= 2


def test_a_token_that_dies_under_parallel_reads_is_renewed_once(
    token_registry, token_image, token_lifetime, erofs_images, fault_proxy
):
    """Tried: the registry drops a token after 1.5 s (the issuer promised an hour, and
    its next tokens live that hour); then two reads go out with it at once, one held
    1 s on the way, so its 401 comes after the other's has been answered with a new
    token. Must hold: both read right, after one new token: a 401 to a token another
    thread has renewed already is answered with that one. Before, each such 401 asked
    the issuer again: as many logins as reads under way when the token died."""
    token_lifetime.expires_in = 3600
    token_lifetime.lifetime = 1.5
    proxy = fault_proxy(token_registry)
    ref = token_image.replace(token_registry.host, proxy.host)
    expected = erofs_images.small.path.read_bytes()
    with RegistryClient(proxy.host, token_registry.options()) as client:
        image = resolve_image(client, ref, None)
        blob = RegistryBlob(client, parse_reference(ref).repository, image.layers[0])
        blob.read_range(0, 4096)
        # The new token lives: dying 1.5 s on too, it could die before the held read
        # retried with it, on a busy machine, and cost a second login of its own.
        token_lifetime.lifetime = None
        time.sleep(3)  # past its death, 1.5 to 2.5 s on (``exp`` is whole seconds)
        before = token_lifetime.tokens_issued
        proxy.fault = Fault("delay", seconds=1.0, times=1, method="GET", path_contains="/blobs/")
        with ThreadPoolExecutor(2) as pool:
            held = pool.submit(blob.read_range, 0, 65536)
            time.sleep(0.2)
            other = pool.submit(blob.read_range, 65536, 65536)
            assert other.result() + held.result() == expected[65536:131072] + expected[:65536]
    assert token_lifetime.tokens_issued - before == 1


def registry_of_issuer(tmp_path, issuer: TokenIssuer, test_ca) -> RegistryServer:
    """A token-auth registry of the test's own whose tokens ``issuer`` gives (both started);
    user ``bob``, password ``bob-pw``."""
    issuer.start()
    server = RegistryServer(
        tmp_path / "registry",
        token=TokenAuth(issuer.realm, issuer.service, issuer.name, test_ca.cert),
        username="bob",
        password="bob-pw",
    )
    server.start()
    return server


def test_an_issuer_nobody_answers_at_is_named_not_taken_for_the_registry(
    tmp_path, test_ca, erofs_images
):
    """A token issuer that refuses connections: the error names the issuer and the registry
    it serves. Before, it said "cannot reach registry" and the issuer's address, which sent
    the user to look at a registry that was up. A refused connection fails at once: the
    timeout is only for the registry's own replies, which a loaded machine slows."""
    cert, key = test_ca.issue("silent-issuer", server=False)
    issuer = TokenIssuer(cert, key, users={"bob": "bob-pw"})
    server = registry_of_issuer(tmp_path, issuer, test_ca)
    try:
        ref = push_small(server, "auth/silent", erofs_images)
        issuer.stop()
        with server.client(timeout=15.0) as client, pytest.raises(RegistryUnreachable) as caught:
            resolve_image(client, ref, None)
        address = urlsplit(issuer.realm).netloc
        assert str(caught.value).startswith(
            f"cannot reach token issuer {address} for registry {server.host}: connection refused"
        ), caught.value
    finally:
        server.stop()


def test_a_client_idle_past_its_token_asks_the_issuer_the_registry_names_now(
    tmp_path, test_ca, erofs_images, seconds_long_tokens
):
    """The registry's token issuer moves (another address) while a client idles past its
    token's life: the next read goes without a token, the registry's 401 names the issuer to
    ask now, and the read succeeds. Before, a long-running server kept asking the old
    address, and every read failed with the registry and the new issuer both up."""
    cert, key = test_ca.issue("moving-issuer", server=False)
    old, new = (TokenIssuer(cert, key, users={"bob": "bob-pw"}) for _ in range(2))
    old.expires_in = 2  # the client renews it 1.5 s on
    server = registry_of_issuer(tmp_path, old, test_ca)
    try:
        ref = push_small(server, "auth/moving", erofs_images)
        with server.client(timeout=5.0) as client:
            image = resolve_image(client, ref, None)
            blob = RegistryBlob(client, parse_reference(ref).repository, image.layers[0])
            assert blob.read_range(0, 4096) == erofs_images.small.path.read_bytes()[:4096]
            server.stop()
            old.stop()
            new.start()
            server.use_token_issuer(TokenAuth(new.realm, new.service, new.name, test_ca.cert))
            server.start()
            time.sleep(2)
            assert blob.read_range(0, blob.size) == erofs_images.small.path.read_bytes()
        assert new.tokens_issued == 1
    finally:
        server.stop()
        new.stop()


def test_an_issuer_asking_for_quiet_is_asked_again_only_after_it(
    tmp_path, test_ca, erofs_images, seconds_long_tokens
):
    """The token issuer answers 503 with Retry-After: 1 once a client's token is past its
    life: the read fails naming the issuer, which is never asked twice within the second
    it named. Before, each attempt asked it up front, went to the registry without a
    token, and asked it again at once when the registry's 401 named the same issuer."""
    cert, key = test_ca.issue("busy-issuer", server=False)
    issuer = TokenIssuer(cert, key, users={"bob": "bob-pw"})
    issuer.expires_in = 2  # the client renews it 1.5 s on
    server = registry_of_issuer(tmp_path, issuer, test_ca)
    try:
        ref = push_small(server, "auth/busy", erofs_images)
        with server.client(timeout=3.5) as client:
            image = resolve_image(client, ref, None)
            blob = RegistryBlob(client, parse_reference(ref).repository, image.layers[0])
            assert blob.read_range(0, 4096) == erofs_images.small.path.read_bytes()[:4096]
            time.sleep(2)
            issuer.busy_for = 1
            since = len(issuer.asked)
            with pytest.raises(BlobReadError) as caught:
                blob.read_range(0, 4096)
        address = urlsplit(issuer.realm).netloc
        assert f"token issuer {address} for registry {server.host} answered HTTP 503" in str(
            caught.value
        )
        asked = issuer.asked[since:]
        assert len(asked) >= 2, asked
        gaps = [later - earlier for earlier, later in itertools.pairwise(asked)]
        assert min(gaps) > 0.9, gaps
    finally:
        server.stop()
        issuer.stop()


class ShiftedClock:
    """``time`` as the auth module reads it, ``ahead`` seconds later than it is: a token
    is taken for older than it is, with no sleep whose length a busy machine upsets."""

    def __init__(self) -> None:
        self.ahead = 0.0

    def monotonic(self) -> float:
        return time.monotonic() + self.ahead


@contextlib.contextmanager
def _blob_behind_a_minute_token(
    tmp_path, test_ca, erofs_images, monkeypatch, name: str
) -> Iterator[tuple[ShiftedClock, TokenIssuer, RegistryBlob, bytes]]:
    """A registry whose issuer gives 60 s tokens, the small image pushed to it as
    ``auth/NAME``, and its layer read once (a token in hand); yields the clock the auth
    module reads, to move on, the issuer, the layer and its bytes."""
    clock = ShiftedClock()
    monkeypatch.setattr(auth, "time", clock)
    cert, key = test_ca.issue(f"{name}-issuer", server=False)
    issuer = TokenIssuer(cert, key, users={"bob": "bob-pw"})
    issuer.expires_in = 60
    server = registry_of_issuer(tmp_path, issuer, test_ca)
    expected = erofs_images.small.path.read_bytes()
    try:
        ref = push_small(server, f"auth/{name}", erofs_images)
        with server.client(timeout=5.0) as client:
            image = resolve_image(client, ref, None)
            blob = RegistryBlob(client, parse_reference(ref).repository, image.layers[0])
            assert blob.read_range(0, 4096) == expected[:4096]
            yield clock, issuer, blob, expected
    finally:
        server.stop()
        issuer.stop()


def test_a_token_still_good_is_used_while_its_issuer_cannot_renew_it(
    tmp_path, test_ca, erofs_images, monkeypatch
):
    """Tried: a token of 60 s (renewed from 45 s on); the client's clock is moved 50 s on,
    the issuer answers every request 503 (busy for 60 s), and the layer is read, then
    read again. Must hold: both reads are served with the token in hand, which the
    registry still takes; the issuer is asked once (and fails) without failing the
    read, and not again for the second: it asked for quiet. Before, the renewal's
    failure failed the read, though the token had ten seconds to live."""
    with _blob_behind_a_minute_token(tmp_path, test_ca, erofs_images, monkeypatch, "renewal") as (
        clock,
        issuer,
        blob,
        expected,
    ):
        clock.ahead = 50
        issuer.busy_for = 60
        asked = len(issuer.asked)
        assert blob.read_range(0, blob.size) == expected
        assert len(issuer.asked) == asked + 1
        assert blob.read_range(0, blob.size) == expected
        assert len(issuer.asked) == asked + 1


def test_a_failed_renewal_under_parallel_reads_is_said_once(
    tmp_path, test_ca, erofs_images, monkeypatch, caplog
):
    """Tried: a token of 60 s, the client's clock moved 50 s on (past its renewal), an
    issuer that answers 503 half a second late, and four reads at once, so three wait
    for the renewal the first asked for. Must hold: all four are served with the token
    in hand, and its failed renewal is said once. Before, each waiting read said it
    again: one INFO line per read under way, for one failure."""
    with _blob_behind_a_minute_token(
        tmp_path, test_ca, erofs_images, monkeypatch, "parallel-renewal"
    ) as (clock, issuer, blob, expected):
        clock.ahead = 50
        issuer.busy_for, issuer.delay = 60, 0.5
        asked = len(issuer.asked)
        caplog.set_level(logging.INFO, logger=auth.log.name)
        offsets = [0, 4096, 8192, 12288]
        with ThreadPoolExecutor(len(offsets)) as pool:
            pieces = list(pool.map(lambda offset: blob.read_range(offset, 4096), offsets))
        assert b"".join(pieces) == expected[:16384]
        assert len(issuer.asked) == asked + 1
        said = [r for r in caplog.records if "could not be renewed" in r.getMessage()]
        assert len(said) == 1, [r.getMessage() for r in said]


def test_oauth2_style_token_reply(token_registry, token_image, token_lifetime, erofs_images):
    """An issuer answering only ``access_token`` and no ``expires_in`` works too."""
    token_lifetime.legacy_reply = True
    with token_registry.client() as client:
        assert read_whole(client, token_image) == erofs_images.small.path.read_bytes()


def test_token_auth_push(token_registry, erofs_images):
    """Push through token auth asks for pull,push and the image reads back."""
    ref = push_erofs(
        token_registry.host,
        "auth/pushed",
        "v2",
        [erofs_images.layers[1].path],
        options=token_registry.options(),
    )
    assert any(
        entry["access"] and entry["access"][0]["actions"] == ["pull", "push"]
        for entry in token_registry.issuer.issued
    )
    with token_registry.client() as client:
        assert resolve_image(client, ref, None).layers[0].digest == erofs_images.layers[1].digest


def test_token_scope_is_enforced(token_registry, token_image, erofs_images):
    """A pull-only account reads, but its push is refused: the issuer grants only pull,
    and the registry refuses the token for pull,push."""
    options = token_registry.options(username="reader", password="reader-pw")
    with RegistryClient(token_registry.host, options) as client:
        assert resolve_image(client, token_image, None).layers
    with pytest.raises(AuthError, match=r"asked \(repository:auth/denied:pull,push\)"):
        push_erofs(
            token_registry.host, "auth/denied", "v1", [erofs_images.small.path], options=options
        )


def test_a_push_refused_for_lack_of_push_rights_says_what_was_asked_and_granted(
    token_registry, token_image, erofs_images
):
    """Tried: ``blockstore push`` by a login whose token issuer lets it pull from the
    repository but not push to it. Must hold: exit 4, one line saying the registry
    refused the push to that repository, that push rights (``repository:NAME:pull,push``)
    were asked and the issuer granted only pull, and what the login needs; the tag is not
    made. Before, it said the registry "refused a new token", as of a login gone bad,
    and nothing of the push rights missing."""
    repository = "auth/token"  # token_image's: the login may pull from it
    assert f"/{repository}:" in token_image
    command = [sys.executable, "-m", "blockstore", "push", str(erofs_images.small.path)]
    command += [f"{token_registry.host}/{repository}:pushed", "--insecure"]
    command += ["--username", "reader", "--password", "reader-pw"]
    pushed = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert pushed.returncode == 4, pushed.stderr
    (said,) = pushed.stderr.splitlines()
    assert f"registry {token_registry.host} refused a push to {repository} " in said, said
    asked = f"push rights were asked (repository:{repository}:pull,push)"
    assert f"{asked} and its token issuer granted only pull;" in said, said
    assert said.endswith("the login needs push rights to that repository"), said
    assert "refused a new token" not in said
    with token_registry.client() as client, pytest.raises(NotFound):
        resolve_image(client, f"{token_registry.host}/{repository}:pushed", None)


def test_a_token_issuer_asked_once_the_deadline_passed_is_named_as_itself():
    """Tried: a token asked of an issuer once the read's deadline had passed (a 401 that
    came as the time ran out). Must hold: the error names the token issuer and the
    registry it serves. Before, it said "cannot reach registry" and the issuer's address,
    as for the registry itself."""
    endpoint = Endpoint(
        "registry.test:5000",
        "http://registry.test:5000",
        requests.Session(),
        credentials=None,
        verify=True,
        insecure=True,
    )
    deadline = Deadline(0.001)
    time.sleep(0.01)
    with pytest.raises(TryAgain) as failed:
        endpoint._fetch_token("http://issuer.test:8443/token", [], None, deadline)
    assert str(failed.value.error) == (
        "cannot reach token issuer issuer.test:8443 for registry registry.test:5000: timed out"
    )


@pytest.mark.parametrize(
    "challenges",
    ['Basic realm="registry", {}', '{}, Basic realm="registry"', 'Negotiate, Basic realm="r", {}'],
)
def test_a_registry_offering_basic_beside_bearer_is_answered_with_a_token(
    token_registry, token_image, erofs_images, fault_proxy, challenges
):
    """A 401 offering several challenges (a front adding Basic to the registry's Bearer,
    in either order, or behind a scheme this client has no use for): the Bearer one is
    answered, with a token from its issuer, as docker prefers it. Before, the first
    challenge was taken: the user name and password went to the registry as Basic,
    which it refused (or a Negotiate was said to be undescribed), and the pull failed."""
    proxy = fault_proxy(token_registry)
    proxy.fault = Fault("rewrite_headers", headers={"WWW-Authenticate": challenges})
    ref = token_image.replace(token_registry.host, proxy.host)
    with RegistryClient(proxy.host, token_registry.options()) as client:
        assert read_whole(client, ref) == erofs_images.small.path.read_bytes()


@pytest.mark.parametrize("before_it", ["", 'Basic realm="r" '])
def test_a_challenge_whose_parameters_are_parted_by_spaces_alone_is_answered(
    token_registry, token_image, erofs_images, fault_proxy, before_it
):
    """Tried: a front that rewrites the registry's challenge with its parameters parted
    by a space and no comma (``Bearer realm="..." service="..."``, as some hand-written
    fronts send it), alone or after a Basic one written so. Must hold: the image reads
    with a token from the realm, asked for the service named (the issuer refuses any
    other). Before, the parameters were not read: the pull failed as "a Bearer challenge
    without a realm", or, after Basic, the login went as Basic and was refused."""
    issuer = token_registry.issuer
    proxy = fault_proxy(token_registry)
    challenges = f'{before_it}Bearer realm="{issuer.realm}" service="{issuer.service}"'
    proxy.fault = Fault("rewrite_headers", headers={"WWW-Authenticate": challenges})
    ref = token_image.replace(token_registry.host, proxy.host)
    before = issuer.tokens_issued
    with RegistryClient(proxy.host, token_registry.options()) as client:
        assert read_whole(client, ref) == erofs_images.small.path.read_bytes()
    assert issuer.tokens_issued > before


def test_a_challenge_asking_for_several_scopes_gets_a_token_for_each(
    token_registry, token_image, erofs_images, fault_proxy
):
    """Tried: a registry whose challenge asks for two scopes at once, space-separated
    in its ``scope`` parameter as the distribution spec writes them (``repository:
    auth/token:pull repository:auth/base:pull``, as for a cross-repository mount).
    Must hold: the image reads, and the token issuer is asked for each scope as a
    ``scope`` parameter of its own, so the token grants both repositories. Before, the
    two went as one parameter, which the issuer took for one repository named
    ``auth/token:pull repository:auth/base``."""
    proxy = fault_proxy(token_registry)
    wanted = "repository:auth/token:pull repository:auth/base:pull"
    proxy.fault = Fault("rewrite_headers", headers={"WWW-Authenticate": f'{{}},scope="{wanted}"'})
    ref = token_image.replace(token_registry.host, proxy.host)
    issuer = token_registry.issuer
    before = issuer.tokens_issued
    with RegistryClient(proxy.host, token_registry.options()) as client:
        assert read_whole(client, ref) == erofs_images.small.path.read_bytes()
    names = {entry["name"] for issued in issuer.issued[before:] for entry in issued["access"]}
    assert names == {"auth/token", "auth/base"}


UNSPOKEN = "which this client does not speak (it speaks basic and bearer)"


@pytest.mark.parametrize(
    ("challenges", "said"),
    [
        ("Negotiate", f"by negotiate, {UNSPOKEN}"),
        ('Negotiate, NTLM realm="r"', f"by negotiate or ntlm, {UNSPOKEN}"),
        (None, "without saying how (no challenge in WWW-Authenticate)"),
    ],
)
def test_a_registry_asking_for_a_scheme_this_client_does_not_speak_says_which(
    registry, pushed_images, fault_proxy, challenges, said
):
    """Tried: a registry (a front before it) answering 401 with only challenges of
    schemes this client does not speak (Negotiate; Negotiate and NTLM), or with no
    challenge at all. Must hold: an AuthError (exit 4) naming the schemes asked for and
    those this client speaks, or saying no challenge came. Before, the registry was
    said to ask "for authentication it does not describe ('negotiate')", though it
    described it, and a second scheme it offered went unsaid."""
    proxy = fault_proxy(registry)
    headers = {"WWW-Authenticate": challenges} if challenges else {}
    proxy.fault = Fault("status", status=401, headers=headers)
    options = RegistryOptions(insecure=True, timeout=5.0)
    with RegistryClient(proxy.host, options) as client, pytest.raises(AuthError) as caught:
        resolve_image(client, pushed_images.small.replace(registry.host, proxy.host), None)
    assert caught.value.exit_code == 4
    assert str(caught.value) == f"registry {proxy.host} asks for authentication {said}"


def test_a_token_issuer_that_is_down_lets_a_cached_image_open(tmp_path, test_ca, erofs_images):
    """Tried: an image opened once through a token registry, then its token issuer answers
    every request 503 (busy for 60 s), and the image is opened again by a new client.
    Must hold: the cached resolution and bytes are served, saying why, as when the
    registry cannot be reached. Before, the open failed as an authentication failure
    (exit 4), though no login was refused, and a cached image could not be mounted."""
    from blockstore.image import open_image

    cert, key = test_ca.issue("down-issuer", server=False)
    issuer = TokenIssuer(cert, key, users={"bob": "bob-pw"})
    server = registry_of_issuer(tmp_path, issuer, test_ca)
    try:
        ref = push_small(server, "auth/issuer-down", erofs_images)
        options = server.options(timeout=3.0, max_attempts=2)
        image = open_image(ref, cache_dir=tmp_path / "cache", options=options)
        (blob,) = image.exports()
        head = b"".join(bytes(b) for b in blob.read(0, 4096))
        blob.close()
        image.close()
        issuer.busy_for = 60
        image = open_image(ref, cache_dir=tmp_path / "cache", options=options)
        try:
            assert not image.online and "answered HTTP 503" in str(image.unreachable)
            (blob,) = image.exports()
            assert b"".join(bytes(b) for b in blob.read(0, 4096)) == head
        finally:
            image.close()
    finally:
        server.stop()
        issuer.stop()


def test_a_wrong_password_asking_a_blob_size_is_one_login_refused(
    token_registry, token_image, erofs_images
):
    """Tried: the size of a blob (its HEAD, as an open checks each layer's) asked with a
    wrong password of a token-auth registry. Must hold: an AuthError (exit 4) saying the
    user name or password was refused, after one token request, not two: a HEAD refused
    because the login was is not asked again as a GET. Before, the 401 was taken for a
    registry that refuses HEADs (``HEAD_REFUSED``): the issuer was asked a second time."""
    issuer = token_registry.issuer
    before = len(issuer.asked)
    small = erofs_images.small
    client = token_registry.client(password="wrong-pw-1234")
    with client, pytest.raises(AuthError) as caught:
        client.blob_size("auth/token", small.digest, small.size)
    assert "refused the user name or password" in str(caught.value)
    assert caught.value.exit_code == 4
    assert len(issuer.asked) - before == 1


def test_a_head_refused_401_with_a_good_token_is_asked_as_a_get(
    token_registry, token_image, erofs_images, fault_proxy
):
    """Tried: a token-auth registry that answers every blob HEAD 401 with its Bearer
    challenge though the token is good (as ECR Public does), asked a blob's size with
    the right password. Must hold: the size, had from a GET of the blob's first byte."""
    issuer = token_registry.issuer
    proxy = fault_proxy(token_registry)
    challenge = f'Bearer realm="{issuer.realm}",service="{issuer.service}"'
    proxy.fault = Fault(
        "status",
        status=401,
        method="HEAD",
        path_contains="/blobs/",
        headers={"WWW-Authenticate": challenge},
    )
    small = erofs_images.small
    with RegistryClient(proxy.host, token_registry.options()) as client:
        assert client.blob_size("auth/token", small.digest, small.size) == small.size
    assert [r for r in proxy.requests if r.headers.get("Range") == "bytes=0-0"]
