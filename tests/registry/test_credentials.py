"""Credentials never leak: not echoed, not in the clear, not to a stranger, not in logs.

Real registries (basic auth, token auth, HTTPS with the test CA) behind
recording proxies; each test tries one way a secret could escape and checks
every request, message and log line that could carry it.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from rig.fault_proxy import Fault
from rig.pushed import push_erofs

from blockstore.errors import InvalidReference, RegistryError
from blockstore.logformat import without_url_secrets
from blockstore.registry import RegistryBlob, RegistryClient, RegistryOptions, resolve_image
from blockstore.registry.digests import digest_of
from blockstore.registry.reference import parse_reference

BLOCKSTORE = [sys.executable, "-m", "blockstore"]
SECRET_REFERENCE = "alice:S3cr3t-pw@127.0.0.1:1/repo:tag"


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*BLOCKSTORE, *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
    )


def read_whole(client: RegistryClient, ref: str) -> bytes:
    image = resolve_image(client, ref, None)
    blob = RegistryBlob(client, parse_reference(ref).repository, image.layers[0])
    return blob.read_range(0, blob.size)


@pytest.mark.parametrize(
    "text", [SECRET_REFERENCE, "alice:S3cr3t-pw@127.0.0.1", "alice@127.0.0.1:1/repo"]
)
def test_a_reference_with_credentials_is_refused_without_echoing_them(text):
    """``user:password@host/...``: refused, and the message shows ``***@host`` only."""
    with pytest.raises(InvalidReference) as refused:
        parse_reference(text)
    message = str(refused.value)
    assert "alice" not in message and "S3cr3t" not in message
    assert "'***@127.0.0.1" in message and "user name or password" in message


@pytest.mark.parametrize("command", ["inspect", "serve", "prefetch", "mount"])
def test_every_command_refuses_a_reference_with_credentials_in_one_clean_line(
    command, tmp_path: Path
):
    """Each command that takes an image exits 2 with one line that holds neither the
    user name nor the password (nothing listens at the address: no request was tried)."""
    extra = {
        "inspect": [],
        "mount": [str(tmp_path), "--cache-dir", str(tmp_path / "cache")],
    }.get(command, ["--cache-dir", str(tmp_path / "cache")])
    done = run(command, SECRET_REFERENCE, *extra)
    assert done.returncode == 2, done.stderr
    output = done.stdout + done.stderr
    assert "S3cr3t" not in output and "alice" not in output
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr


def test_credentials_are_not_sent_in_the_clear_to_a_plain_http_mirror(
    tls_registry, basic_auth_registry, erofs_images, fault_proxy, tmp_path: Path, monkeypatch
):
    """Without --insecure, a mirror written ``http://...`` that asks for a password (its
    auth file has one) is not given it: the mirror is left out and the HTTPS upstream
    serves every byte. No request to the mirror carries an Authorization header."""
    ref = push_erofs(
        tls_registry.host,
        "clear/app",
        "v1",
        [erofs_images.small.path],
        options=tls_registry.options(),
    )
    mirror = fault_proxy(basic_auth_registry)
    pair = f"{basic_auth_registry.username}:{basic_auth_registry.password}".encode()
    auth_file = tmp_path / "auth.json"
    auth_file.write_text(
        json.dumps({"auths": {mirror.host: {"auth": base64.b64encode(pair).decode()}}})
    )
    monkeypatch.setenv("REGISTRY_AUTH_FILE", str(auth_file))
    options = tls_registry.options(mirrors=[f"http://{mirror.host}"])
    with RegistryClient(tls_registry.host, options) as client:
        assert read_whole(client, ref) == erofs_images.small.path.read_bytes()
    assert mirror.requests, "the mirror was not tried"
    assert all("Authorization" not in r.headers for r in mirror.requests)


def test_bearer_tokens_stay_with_their_registry(
    token_registry, registry, erofs_images, fault_proxy
):
    """A token-auth upstream behind a mirror that lacks the image: the mirror is asked
    first, with no Authorization; the upstream gets its token; the issuer is asked for
    the upstream's service only."""
    ref = push_erofs(
        token_registry.host,
        "tokens/app",
        "v1",
        [erofs_images.small.path],
        options=token_registry.options(),
    )
    mirror = fault_proxy(registry)
    options = token_registry.options(mirrors=[mirror.host])
    with RegistryClient(token_registry.host, options) as client:
        assert read_whole(client, ref) == erofs_images.small.path.read_bytes()
    assert mirror.requests, "the mirror was not tried"
    assert all("Authorization" not in r.headers for r in mirror.requests)


@pytest.mark.parametrize("password_ok", [True, False])
def test_no_credential_in_verbose_output(token_registry, erofs_images, tmp_path, password_ok):
    """``-vv`` (debug) inspect and prefetch through token auth, with the right password
    and a wrong one: neither the password, nor the Basic pair, nor a token (a JWT starts
    ``eyJ``) appears in anything printed."""
    ref = push_erofs(
        token_registry.host,
        "verbose/app",
        "v1",
        [erofs_images.small.path],
        options=token_registry.options(),
    )
    password = token_registry.password if password_ok else "Wr0ng-S3cret-pw"
    env = {"BLOCKSTORE_PASSWORD": password}
    login = ["--insecure", "--username", token_registry.username]
    outputs = [
        run("-vv", "inspect", ref, *login, env=env),
        run("-vv", "prefetch", ref, *login, "--cache-dir", str(tmp_path / "c"), env=env),
    ]
    pair = base64.b64encode(f"{token_registry.username}:{password}".encode()).decode()
    for done in outputs:
        assert (done.returncode == 0) == password_ok, done.stderr
        text = done.stdout + done.stderr
        assert password not in text and pair not in text and "eyJ" not in text
    assert "DEBUG" in outputs[0].stderr, "debug logging was not on"


@pytest.mark.parametrize("command", ["inspect", "prefetch", "serve", "index", "mount"])
def test_a_password_without_a_user_name_is_told_the_ways_this_command_takes_one(
    command, tmp_path: Path
):
    """Tried: ``--password`` with no user name anywhere (none given, none in the
    environment), to each command that logs in to a registry. Must hold: exit 2, one
    line naming the ways that command takes a user name: ``--username`` and
    ``$BLOCKSTORE_USERNAME``, and ``-o oci.username=`` for ``mount`` alone, the one
    command with ``-o``; before, every command offered ``-o oci.username=``, an option
    only ``mount`` has."""
    extra = {
        "inspect": [],
        "mount": [str(tmp_path), "--cache-dir", str(tmp_path / "cache")],
    }.get(command, ["--cache-dir", str(tmp_path / "cache")])
    env = {k: v for k, v in os.environ.items() if not k.startswith("BLOCKSTORE_")}
    done = subprocess.run(
        [*BLOCKSTORE, command, "127.0.0.1:1/repo:tag", "--password", "pw", *extra],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert done.returncode == 2, done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert "a registry password needs a user name: give --username" in line, line
    assert "$BLOCKSTORE_USERNAME" in line, line
    assert ("-o oci.username=" in line) == (command == "mount"), line


SIGNATURE = "5ec2e75ea1ed5167a7e2e"
SIGNED_QUERY = f"X-Amz-Credential=AKIDEXAMPLE%2Fus-east-1&X-Amz-Signature={SIGNATURE}"


def test_a_signed_storage_url_shows_no_query_in_the_debug_log(
    registry, fault_proxy, erofs_images, tmp_path
):
    """Tried: blob requests redirected to a signed storage URL (its credential and
    signature in the query, as object storage signs them), ``prefetch`` with ``-vv``.
    Must hold: the layer is sealed (exit 0), the requests to storage show in the debug
    log, and neither the signature nor the credential in anything printed. Before,
    urllib3's debug line of each request wrote the URL whole, query and all."""
    ref = push_erofs(registry.host, "signed/img", "v1", [erofs_images.small.path])
    storage = fault_proxy(registry, listen="127.0.0.2")
    front = fault_proxy(registry)
    front.fault = Fault(
        "redirect", path_contains="/blobs/", redirect_to=f"{storage.url}?{SIGNED_QUERY}"
    )
    ref = ref.replace(registry.host, front.host)
    done = run("-vv", "prefetch", ref, "--insecure", "--cache-dir", str(tmp_path / "c"))
    assert done.returncode == 0, done.stderr
    assert any(SIGNATURE in r.path for r in storage.requests), "storage was not asked"
    assert f"{storage.host}" in done.stderr and "/blobs/sha256:" in done.stderr
    text = done.stdout + done.stderr
    assert SIGNATURE not in text and "AKIDEXAMPLE" not in text


def test_a_cancelled_upload_is_logged_without_its_query(registry, fault_proxy, caplog):
    """Tried: a blob upload whose PUT the registry refuses (400), and then the DELETE that
    cancels it, through a front refusing every request to an upload's URL; the log at
    info (``-v``). Must hold: the cancel's failure is logged, naming the upload's path
    but not its query (the CNCF registry's signed ``_state``, which other registries
    may make a storage URL's signature). Before, the whole URL was logged."""
    front = fault_proxy(registry)
    front.fault = Fault("status", status=400, path_contains="_state=")
    data = b"a blob refused at its upload"
    caplog.set_level(logging.INFO, logger="blockstore.registry")
    options = RegistryOptions(insecure=True, timeout=5.0)
    with RegistryClient(front.host, options) as client, pytest.raises(RegistryError):
        client.upload_blob("cancel/app", digest_of(data), data)
    assert "cancelling upload" in caplog.text and "/blobs/uploads/" in caplog.text
    assert "_state" not in caplog.text


@pytest.mark.parametrize(
    "token",
    [
        "/a" * 20_000,  # a path of many parts, no query
        "a" * 40_000,  # letters that could start a scheme, no "://"
    ],
    ids=["slashes", "letters"],
)
def test_a_long_word_in_a_log_line_is_filtered_at_once(token):
    """A log line holding one 40 kB word with no space (a registry's error body, a token
    echoed): every line written passes the filter that hides URL secrets, so it must be
    filtered at once, and a signed URL beside it still hidden. Before, the filter took
    seconds, growing with the square of the word's length."""
    signed = "https://u:p@storage.example/b?X-Amz-Signature=abc"
    started = time.monotonic()
    hidden = without_url_secrets(f"{token} {signed}")
    assert time.monotonic() - started < 0.5
    assert hidden == f"{token} https://***@storage.example/b?***"
