"""Docker credential helpers (``credHelpers``, ``credsStore``): run as docker runs
them, against the real registry with htpasswd auth; the real ``docker-credential-pass``
over a keyring made for the test, and helper scripts that answer as each fault needs."""

from __future__ import annotations

import base64
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from rig.credential_helpers import (
    PassKeyring,
    docker_config_with,
    helper_script,
    why_pass_cannot_run,
)
from rig.pushed import push_erofs
from rig.registry_server import RegistryServer, TokenAuth
from rig.token_issuer import TokenIssuer
from rig.waiting import wait_for

from blockstore.errors import AuthError
from blockstore.registry import auth, resolve_image

NOT_FOUND = "credentials not found in native keychain"


@pytest.fixture
def keyring(tmp_path, monkeypatch) -> Iterator[PassKeyring]:
    """An empty ``pass`` keyring that ``docker-credential-pass`` finds."""
    reason = why_pass_cannot_run()
    if reason:
        pytest.skip(reason)
    keyring = PassKeyring(tmp_path / "keyring")
    for name, value in keyring.env.items():
        monkeypatch.setenv(name, value)
    try:
        yield keyring
    finally:
        keyring.close()


@pytest.fixture
def helpers_on_path(tmp_path, monkeypatch) -> Path:
    """A directory first on PATH, for the helper scripts a test writes."""
    directory = tmp_path / "helpers"
    directory.mkdir()
    monkeypatch.setenv("PATH", f"{directory}{os.pathsep}{os.environ['PATH']}")
    return directory


def helper_config(tmp_path, monkeypatch, host: str, helper: str, kept: str, **more) -> Path:
    """A ``docker login`` config.json (through DOCKER_CONFIG) leaving the login for
    ``host`` to ``docker-credential-HELPER``: by ``credHelpers`` or ``credsStore``."""
    config = {"credHelpers": {host: helper}} if kept == "credHelpers" else {"credsStore": helper}
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "docker"))
    return docker_config_with(tmp_path / "docker", {**config, **more})


def blockstore(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "blockstore", *args, "--insecure"]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("kept", ["credHelpers", "credsStore"])
def test_a_login_kept_by_docker_credential_pass_pushes_and_pulls(
    basic_auth_registry, erofs_images, keyring, tmp_path, monkeypatch, kept
):
    """Tried: ``docker login`` kept the registry's login in ``docker-credential-pass``
    (named by ``credHelpers`` for the registry, or as ``credsStore``), and its ``auths``
    still holds a stale login beside it; ``push`` and ``inspect`` with nothing given on
    the command line. Must hold: the helper is asked and its login used (both exit 0),
    the stale one never. Before, the helper was not run: anonymous, refused (exit 4)."""
    host = basic_auth_registry.host
    keyring.store(host, basic_auth_registry.username, basic_auth_registry.password)
    stale = base64.b64encode(f"{basic_auth_registry.username}:stale-pw".encode()).decode()
    helper_config(tmp_path, monkeypatch, host, "pass", kept, auths={host: {"auth": stale}})
    pushed = blockstore("push", str(erofs_images.small.path), f"{host}/helper/app:v1")
    assert pushed.returncode == 0, pushed.stderr
    inspected = blockstore("inspect", f"{host}/helper/app:v1")
    assert inspected.returncode == 0, inspected.stderr


def test_a_stale_login_from_a_helper_is_named_when_refused(
    basic_auth_registry, erofs_images, keyring, tmp_path, monkeypatch
):
    """Tried: ``docker-credential-pass`` keeps an old password for the registry
    (``credHelpers``); ``push``. Must hold: exit 4, the line saying the login came from
    that helper, named in that file, and to log in again, repeating no password.
    Before, the helper was not run: the line spoke of anonymous access."""
    host = basic_auth_registry.host
    keyring.store(host, basic_auth_registry.username, "an-old-password-in-the-keyring")
    config = helper_config(tmp_path, monkeypatch, host, "pass", "credHelpers")
    refused = blockstore("push", str(erofs_images.small.path), f"{host}/stale/app:v1")
    assert refused.returncode == 4, refused.stderr
    said = f"they came from the credential helper docker-credential-pass (named in {config})"
    assert f"{said}: log in again" in refused.stderr
    assert "an-old-password-in-the-keyring" not in refused.stderr


@pytest.mark.parametrize("peer", ["docker-credential-pass", "a script answering not found"])
def test_a_helper_without_a_login_for_the_registry_means_anonymous(
    basic_auth_registry, registry, pushed_images, erofs_images, tmp_path, monkeypatch, request,
    peer,
):  # fmt: skip
    """Tried: ``credsStore`` names a helper that keeps no login for any registry (the
    real ``docker-credential-pass`` with an empty keyring, which answers an empty login;
    a script answering as the helper protocol says, exit 1 and ``credentials not found
    in native keychain``); ``inspect`` of an image anyone may pull, and a ``push`` to a
    registry that wants a login. Must hold: the inspect goes anonymous (exit 0, nothing
    on stderr); the push is refused (exit 4) saying the helper, named in the config
    file, has no login for the registry, and how to give one. Before, the helper was not
    run, and the refusal said only that it was not."""
    if peer == "docker-credential-pass":
        request.getfixturevalue("keyring")
        name = "pass"
    else:
        name = "empty"
        script = f"echo '{NOT_FOUND}'; exit 1"
        helper_script(request.getfixturevalue("helpers_on_path"), name, script)
    config = helper_config(tmp_path, monkeypatch, registry.host, name, "credsStore")
    inspected = blockstore("inspect", pushed_images.small)
    assert (inspected.returncode, inspected.stderr) == (0, "")
    host = basic_auth_registry.host
    refused = blockstore("push", str(erofs_images.small.path), f"{host}/helper/app:v1")
    assert refused.returncode == 4, refused.stderr
    said = f"the credential helper docker-credential-{name} (named in {config}) has no login"
    assert f"{said} for {host}" in refused.stderr
    assert "give --username with --password or $BLOCKSTORE_PASSWORD" in refused.stderr


def test_a_helper_missing_from_path_is_named_and_nothing_is_pushed(
    basic_auth_registry, erofs_images, tmp_path, monkeypatch
):
    """Tried: ``credHelpers`` names ``desktop`` for the registry (a config copied from a
    machine with Docker Desktop) and no ``docker-credential-desktop`` is on PATH;
    ``push``. Must hold: exit 4, one line
    naming the helper, the config file, that it is not on PATH and what to do (install
    it, or take it out of the file); nothing is pushed. Before, the helper was not run
    and the push went on as if the config named none."""
    host = basic_auth_registry.host
    config = helper_config(tmp_path, monkeypatch, host, "desktop", "credHelpers")
    login = ["--username", basic_auth_registry.username, "--password", basic_auth_registry.password]
    refused = blockstore("push", str(erofs_images.small.path), f"{host}/missing/app:v1")
    assert refused.returncode == 4, refused.stderr
    assert refused.stderr.count("\n") == 1 and "Traceback" not in refused.stderr
    assert (
        f"the credential helper docker-credential-desktop (named in {config} for {host}) is "
        f"not on PATH: install it, or take it out of {config}"
    ) in refused.stderr
    helper_config(tmp_path, monkeypatch, "elsewhere.example", "desktop", "credHelpers")
    assert blockstore("inspect", f"{host}/missing/app:v1", *login).returncode == 3


BAD_REPLIES = {
    "failing": (
        "echo 'pass: the keyring is locked' >&2; printf '%0500d' 0 >&2; exit 1",
        "docker-credential-bad get failed (exit 1): pass: the keyring is locked 000",
    ),
    "malformed JSON": (
        'printf \'{"Username": "alice", "Secret": "s3cret-basic-pw\'',
        "docker-credential-bad answered no login: not a JSON object with Username and "
        "Secret strings",
    ),
    "a Secret with a line break": (
        'printf \'{"Username": "alice", "Secret": "s3cret-basic-pw\\\\r\\\\nX-Evil: 1"}\'',
        "docker-credential-bad answered a login no request can carry: its user name or "
        "secret holds a control character, or its user name a colon",
    ),
    "a user name with a colon": (
        'printf \'{"Username": "alice:s3cret-basic-pw", "Secret": "x"}\'',
        "docker-credential-bad answered a login no request can carry",
    ),
    "a Secret that is no text": (
        'printf \'{"Username": "alice", "Secret": "s3cret-basic-pw\\\\ud800"}\'',
        "docker-credential-bad answered a login no request can carry",
    ),
}


@pytest.mark.parametrize("fault", list(BAD_REPLIES))
def test_a_helper_answering_no_usable_login_is_said_and_quotes_no_secret(
    basic_auth_registry, helpers_on_path, tmp_path, monkeypatch, caplog, fault
):
    """Tried: the registry's helper (``credHelpers``) fails with a long message on
    stderr; answers JSON cut short; answers a Secret holding CR LF (a header it would
    smuggle), a user name holding a colon, a Secret that is no text (a lone surrogate).
    Must hold: an AuthError (exit 4) before any request, naming the helper and what was
    wrong, the failure's stderr quoted on one line and trimmed, and no secret in the
    message or the log. Before, the helper was not run at all."""
    caplog.set_level("DEBUG")
    script, said = BAD_REPLIES[fault]
    helper_script(helpers_on_path, "bad", script)
    helper_config(tmp_path, monkeypatch, basic_auth_registry.host, "bad", "credHelpers")
    with pytest.raises(AuthError) as caught:
        basic_auth_registry.client(username=None, password=None)
    message = str(caught.value)
    assert said in message and caught.value.exit_code == 4
    assert len(message) < 600 and "\n" not in message
    assert basic_auth_registry.password not in message + caplog.text


def test_a_helper_that_cannot_be_executed_is_said(
    basic_auth_registry, helpers_on_path, tmp_path, monkeypatch
):
    """Tried: the registry's helper on PATH is executable but no program (an ELF
    header and nothing more, as a download cut short leaves one). Must hold: an
    AuthError naming the helper and why it could not run. Before, the helper was not
    run."""
    helper_script(helpers_on_path, "truncated", "").write_bytes(b"\x7fELF\x02\x01\x01")
    helper_config(tmp_path, monkeypatch, basic_auth_registry.host, "truncated", "credHelpers")
    with pytest.raises(AuthError, match="docker-credential-truncated could not be run: Exec"):
        basic_auth_registry.client(username=None, password=None)


def test_a_hanging_helper_is_stopped_and_said(
    basic_auth_registry, helpers_on_path, tmp_path, monkeypatch
):
    """Tried: a helper that never answers, and whose child holds its output open (a
    keychain prompt no one sees), with the helper timeout made 1 s. Must hold: an
    AuthError within a few seconds saying the helper did not answer in time, and the
    helper and its child are gone (given the moment a killed process takes to end).
    Before, the helper was not run."""
    monkeypatch.setattr("blockstore.registry.credhelper.HELPER_TIMEOUT", 1.0)
    pid_file = tmp_path / "child.pid"
    helper_script(helpers_on_path, "stuck", f"sleep 600 & echo $! > {pid_file}; wait")
    helper_config(tmp_path, monkeypatch, basic_auth_registry.host, "stuck", "credHelpers")
    started = time.monotonic()
    with pytest.raises(AuthError, match="docker-credential-stuck did not answer in 1 s"):
        basic_auth_registry.client(username=None, password=None)
    assert time.monotonic() - started < 5
    child = int(pid_file.read_text())
    # SIGKILL was sent; the kernel ends the child when it next runs, a moment later on a
    # loaded machine.
    assert wait_for(lambda: _ended(child), timeout=5.0)


def _ended(pid: int) -> bool:
    """Whether process ``pid`` is gone, or a zombie: nothing of it runs."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def test_a_helper_is_asked_with_the_server_address_alone(
    basic_auth_registry, erofs_images, helpers_on_path, tmp_path, monkeypatch
):
    """Tried: a helper script that gives the login only when its stdin is exactly the
    registry's address (no newline, no scheme), as docker writes it; ``push``. Must
    hold: the push goes with that login (exit 0). Before, the helper was not run:
    refused."""
    host = basic_auth_registry.host
    user, password = basic_auth_registry.username, basic_auth_registry.password
    reply = f'{{"ServerURL": "{host}", "Username": "{user}", "Secret": "{password}"}}'
    script = f"[ \"$server\" = '{host}' ] || {{ echo '{NOT_FOUND}'; exit 1; }}\necho '{reply}'"
    helper_script(helpers_on_path, "exact", script)
    helper_config(tmp_path, monkeypatch, host, "exact", "credHelpers")
    pushed = blockstore("push", str(erofs_images.small.path), f"{host}/exact/app:v1")
    assert pushed.returncode == 0, pushed.stderr


def test_a_helper_is_not_given_the_password_given_for_a_registry(
    helpers_on_path, tmp_path, monkeypatch
):
    """Tried: ``$BLOCKSTORE_PASSWORD`` set (the password a user gave for the image's
    registry, which the server under ``mount`` also gets), and a helper asked for another
    registry's login (a mirror's, whose login only auth files give) that writes down what
    its environment holds. Must hold: the helper sees no such variable, the rest of the
    environment it does see (its PATH). Before, every helper was handed the password."""
    from blockstore.registry.credhelper import ask_helper

    seen = tmp_path / "seen"
    monkeypatch.setenv("BLOCKSTORE_PASSWORD", "given-for-the-image-registry")
    script = f"echo \"${{BLOCKSTORE_PASSWORD-unset}} $PATH\" > {seen}\necho '{NOT_FOUND}'; exit 1"
    helper_script(helpers_on_path, "recorder", script)
    assert ask_helper("recorder", "mirror.example:5000", tmp_path / "config.json") is None
    password, path = seen.read_text().split(maxsplit=1)
    assert password == "unset"
    assert path.strip() == os.environ["PATH"]


@pytest.fixture
def rotating_registry(request, tmp_path, erofs_images) -> Iterator[tuple[RegistryServer, object]]:
    """A registry of one user, ``carol``, whose password a test may change: htpasswd
    basic auth (the registry reads the file again when it changes), or (parameter
    ``"token"``) token auth with the test issuer; ``rotate/a:v1``, ``rotate/b:v1`` and
    ``rotate/c:v1`` pushed (a new scope each, for token auth). Yields the registry and
    how to change the password."""
    password = "the-first-password"
    if request.param == "token":
        test_ca = request.getfixturevalue("test_ca")
        cert, key = test_ca.issue("rotating-issuer", server=False)
        issuer = TokenIssuer(cert, key, users={"carol": password})
        issuer.start()
        request.addfinalizer(issuer.stop)
        auth = {"token": TokenAuth(issuer.realm, issuer.service, issuer.name, test_ca.cert)}

        def change(new: str) -> None:
            issuer.users["carol"] = new
    else:
        htpasswd = tmp_path / "htpasswd"

        def change(new: str) -> None:
            line = subprocess.run(
                ["htpasswd", "-Bbn", "carol", new], check=True, capture_output=True
            ).stdout
            htpasswd.write_bytes(line)

        change(password)
        auth = {"htpasswd": htpasswd}
    server = RegistryServer(tmp_path / "registry", username="carol", password=password, **auth)
    server.start()
    try:
        for repository in ("rotate/a", "rotate/b", "rotate/c"):
            push_erofs(
                server.host, repository, "v1", [erofs_images.small.path], options=server.options()
            )
        yield server, change
    finally:
        server.stop()


def _helper_giving_a_kept_password(
    helpers_on_path: Path, tmp_path: Path, monkeypatch, host: str, name: str
) -> tuple[Path, Path]:
    """A helper ``name``, named for ``host``, giving user carol the password kept in the
    file it returns first (``the-first-password`` to begin with), as a cloud helper gives
    its current token; each call adds a line to the file it returns second."""
    secret, calls = tmp_path / "secret", tmp_path / "calls"
    secret.write_text("the-first-password")
    reply = '{"Username": "carol", "Secret": "%s"}'
    helper_script(helpers_on_path, name, f"echo >> {calls}; printf '{reply}' $(cat {secret})")
    helper_config(tmp_path, monkeypatch, host, name, "credHelpers")
    return secret, calls


@pytest.mark.parametrize("rotating_registry", ["basic", "token"], indirect=True)
def test_a_login_a_helper_renews_is_asked_for_again_when_refused(
    rotating_registry, helpers_on_path, tmp_path, monkeypatch
):
    """Tried: a helper giving the password kept in a file (as a cloud helper gives a
    token that expires in hours: ECR's in 12, gcloud's in 1); a client resolves one
    image with it; then the password changes at the registry and in the helper, and the
    same client (a mount's server, which lives longer than the token) resolves another
    image. Then the password changes again, the helper giving a new wrong one at every
    call, and the client resolves a third image. Must hold: the second image resolves,
    the helper asked once more; the third is refused after one more call of the helper,
    not a call per refusal for ever. Before, the
    login the helper gave at the start was sent until the server was restarted."""
    server, change = rotating_registry
    secret, calls = _helper_giving_a_kept_password(
        helpers_on_path, tmp_path, monkeypatch, server.host, "rotating"
    )
    reply = '{"Username": "carol", "Secret": "%s"}'
    with server.client(username=None, password=None) as client:
        assert resolve_image(client, f"{server.host}/rotate/a:v1", None).layers
        change("the-second-password")
        secret.write_text("the-second-password")
        assert resolve_image(client, f"{server.host}/rotate/b:v1", None).layers
        assert len(calls.read_text().splitlines()) == 2
        script = f"echo >> {calls}; printf '{reply}' wrong-$(wc -l < {calls})"
        helper_script(helpers_on_path, "rotating", script)
        change("the-third-password")
        with pytest.raises(AuthError):
            resolve_image(client, f"{server.host}/rotate/c:v1", None)
    assert len(calls.read_text().splitlines()) == 3


@pytest.mark.parametrize("rotating_registry", ["basic"], indirect=True)
def test_parallel_requests_refused_alike_ask_the_helper_once(
    rotating_registry, helpers_on_path, tmp_path, monkeypatch
):
    """Tried: a client logged in by a helper that answers in a second; the password
    changes at the registry while the helper still gives the old one (a login expired,
    not yet renewed), and eight threads resolve an image at once, each refused. Must
    hold: every one fails as refused, and the helper is asked once for all of them, not
    once per thread in turn (with a helper that hangs until its timeout, eight times 20 s
    before the last read failed)."""
    server, change = rotating_registry
    calls = tmp_path / "calls"
    reply = '{"Username": "carol", "Secret": "the-first-password"}'
    helper_script(helpers_on_path, "slow", f"echo >> {calls}; sleep 1; printf '{reply}'")
    helper_config(tmp_path, monkeypatch, server.host, "slow", "credHelpers")
    with server.client(username=None, password=None) as client:
        assert resolve_image(client, f"{server.host}/rotate/a:v1", None).layers
        change("the-second-password")

        def refused(_: int) -> bool:
            with pytest.raises(AuthError):
                resolve_image(client, f"{server.host}/rotate/b:v1", None)
            return True

        with ThreadPoolExecutor(8) as pool:
            assert all(pool.map(refused, range(8)))
    assert len(calls.read_text().splitlines()) == 2  # the first login, then one renewal


class _ClockAhead:
    """The ``time`` a module sees, ``ahead`` seconds ahead of the machine's: a pause it
    keeps ends when the test says, however slowly a loaded machine ran up to it."""

    def __init__(self) -> None:
        self.ahead = 0.0

    def monotonic(self) -> float:
        return time.monotonic() + self.ahead

    def __getattr__(self, name: str) -> object:
        return getattr(time, name)


@pytest.mark.parametrize("rotating_registry", ["basic", "token"], indirect=True)
def test_a_login_its_helper_cannot_renew_is_asked_for_once_a_pause(
    rotating_registry, helpers_on_path, tmp_path, monkeypatch
):
    """Tried: a client logged in by a helper; the password changes at the registry while
    the helper still gives the old one, and the client resolves an image five times in a
    row, each refused; then the helper gives the new password, and the client resolves
    it once more after the pause (5 s here, ended by moving the clock the login code
    sees: a loaded machine may take longer than a short one over the five). Must hold:
    the five are
    refused with one call of the helper between them, not one each (a mount whose login
    is refused ran the helper, a second or two for a cloud one, for every read); the
    login the helper has once the pause is over is taken, and the image resolves."""
    server, change = rotating_registry
    monkeypatch.setattr(auth, "LOGIN_RETRY", 5.0)
    clock = _ClockAhead()
    monkeypatch.setattr(auth, "time", clock)
    secret, calls = _helper_giving_a_kept_password(
        helpers_on_path, tmp_path, monkeypatch, server.host, "stale"
    )
    with server.client(username=None, password=None) as client:
        assert resolve_image(client, f"{server.host}/rotate/a:v1", None).layers
        change("the-second-password")
        for _ in range(5):
            with pytest.raises(AuthError):
                resolve_image(client, f"{server.host}/rotate/b:v1", None)
        assert len(calls.read_text().splitlines()) == 2
        secret.write_text("the-second-password")
        clock.ahead = auth.LOGIN_RETRY
        assert resolve_image(client, f"{server.host}/rotate/b:v1", None).layers
    assert len(calls.read_text().splitlines()) == 3
