"""Small parsers of the client (pure): challenges, Retry-After, platforms, auth files."""

from __future__ import annotations

import base64
import json
from email.utils import formatdate

import pytest
from hypothesis import given
from hypothesis import strategies as st

from blockstore.errors import UsageError
from blockstore.registry.auth import parse_challenge
from blockstore.registry.credentials import Credentials, credentials_for
from blockstore.registry.options import RegistryOptions
from blockstore.registry.platforms import Platform, host_platform
from blockstore.registry.retry import MAX_QUIET, Quiet, RetryPolicy, parse_retry_after


def test_bearer_challenge_with_a_comma_inside_the_scope():
    """Docker Hub's challenge: quoted values, a scope holding a comma."""
    challenge = parse_challenge(
        'Bearer realm="https://auth.docker.io/token",service="registry.docker.io",'
        'scope="repository:library/alpine:pull,push",error="insufficient_scope"'
    )
    assert challenge.scheme == "bearer"
    assert challenge.params == {
        "realm": "https://auth.docker.io/token",
        "service": "registry.docker.io",
        "scope": "repository:library/alpine:pull,push",
        "error": "insufficient_scope",
    }


def test_basic_challenge_and_odd_spacing():
    """Basic with a realm, bare tokens, and spaces around separators."""
    assert parse_challenge('Basic realm="registry"').params == {"realm": "registry"}
    assert parse_challenge("Bearer  realm = x , service=y").params == {"realm": "x", "service": "y"}
    assert parse_challenge("") is None


@given(st.text(max_size=60))
def test_any_challenge_text_is_parsed_without_crashing(value):
    """Whatever a server sends in WWW-Authenticate, parsing gives a challenge or None."""
    challenge = parse_challenge(value)
    assert challenge is None or challenge.scheme == challenge.scheme.lower()


def test_retry_after_seconds_and_dates():
    """Retry-After as delta-seconds or an HTTP date; garbage is ignored."""
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after(formatdate(1000.0 + 7, usegmt=True), now=1000.0) == 7.0
    assert parse_retry_after(formatdate(900.0, usegmt=True), now=1000.0) == 0.0
    assert parse_retry_after("soon") is None and parse_retry_after(None) is None
    assert parse_retry_after("\u00b2") is None and parse_retry_after("--5") is None


def test_a_host_s_quiet_is_kept_five_minutes_at_most():
    """A Retry-After of a day (or a year) holds the host quiet for MAX_QUIET, not for as
    long as the server lives; a shorter one is kept as asked."""
    quiet = Quiet()
    quiet.asked(86_400)
    assert MAX_QUIET - 1 < quiet.left() <= MAX_QUIET == 300.0
    short = Quiet()
    short.asked(2.0)
    assert 1.0 < short.left() <= 2.0


@given(attempt=st.integers(1, 30), retry_after=st.one_of(st.none(), st.floats(0, 1e6)))
def test_backoff_is_bounded(attempt, retry_after):
    """A backoff lies between 0 and its cap; a Retry-After is waited as asked (the read's
    deadline, not the cap, bounds it)."""
    policy = RetryPolicy(base_delay=0.2, max_delay=10.0)
    delay = policy.delay(attempt, retry_after)
    if retry_after is not None:
        assert delay == retry_after
    else:
        assert 0.0 <= delay <= min(10.0, 0.2 * 2 ** (attempt - 1))


@pytest.mark.parametrize(
    ("wanted", "offered", "accepted"),
    [
        ("linux/amd64", "linux/amd64", True),
        ("linux/arm64", "linux/arm64/v8", True),
        ("linux/arm64/v8", "linux/arm64", True),
        ("linux/aarch64", "linux/arm64/v8", True),
        ("linux/arm", "linux/arm/v7", True),
        ("linux/arm", "linux/arm/v6", False),
        ("linux/arm/v6", "linux/arm/v6", True),
        ("linux/amd64", "linux/arm64/v8", False),
        ("linux/amd64", "windows/amd64", False),
    ],
)
def test_platform_matching(wanted, offered, accepted):
    """containerd's rules: arch aliases and default variants (arm64 is v8, arm is v7)."""
    assert Platform.parse(wanted).accepts(Platform.parse(offered)) is accepted


def test_platform_parsing_and_host_default():
    """os/arch[/variant] only; the host's platform is a valid one."""
    with pytest.raises(UsageError, match="os/arch"):
        Platform.parse("amd64")
    assert str(Platform.parse("Linux/ARM64/V8")) == "linux/arm64/v8"
    assert host_platform().os == "linux"


def _write_auths(path, auths):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"auths": auths}))


def _encoded(user: str, password: str) -> str:
    return base64.b64encode(f"{user}:{password}".encode()).decode()


def test_auth_file_order_and_docker_hub_keys(no_ambient_credentials, monkeypatch, tmp_path):
    """podman's auth.json comes before docker's config.json; Docker Hub's v1 URL key
    matches registry-1.docker.io; other hosts get nothing."""
    home = no_ambient_credentials
    _write_auths(
        home / ".docker" / "config.json",
        {
            "https://index.docker.io/v1/": {"auth": _encoded("hubuser", "hubpw")},
            "reg.example:5000": {"auth": _encoded("docker", "dockerpw")},
        },
    )
    assert credentials_for("registry-1.docker.io") == Credentials("hubuser", "hubpw")
    assert credentials_for("reg.example:5000") == Credentials("docker", "dockerpw")
    assert credentials_for("other.example") is None
    _write_auths(
        home / ".config" / "containers" / "auth.json",
        {
            "reg.example:5000": {"auth": _encoded("podman", "podmanpw")},
        },
    )
    assert credentials_for("reg.example:5000") == Credentials("podman", "podmanpw")
    monkeypatch.setenv("BLOCKSTORE_USERNAME", "env")
    monkeypatch.setenv("BLOCKSTORE_PASSWORD", "envpw")
    assert credentials_for("reg.example:5000") == Credentials("env", "envpw")
    assert credentials_for("reg.example:5000", username="opt", password="optpw") == Credentials(
        "opt", "optpw"
    )
    # A mirror is offered only what the files hold for its own name.
    assert credentials_for("reg.example:5000", use_environment=False).username == "podman"


def test_broken_auth_files_are_skipped(no_ambient_credentials):
    """An unreadable config or an entry without credentials (credsStore) gives anonymous."""
    (no_ambient_credentials / ".docker").mkdir()
    (no_ambient_credentials / ".docker" / "config.json").write_text("{not json")
    assert credentials_for("reg.example") is None
    _write_auths(no_ambient_credentials / ".docker" / "config.json", {"reg.example": {}})
    assert credentials_for("reg.example") is None


def test_secrets_stay_out_of_reprs():
    """Options and credentials print without their password."""
    assert "pw123" not in repr(RegistryOptions(username="u", password="pw123"))
    assert "pw123" not in repr(Credentials("u", "pw123"))


def test_a_password_without_a_user_name_is_refused(no_ambient_credentials, monkeypatch):
    """A password given with no user name (by option or by environment) is a UsageError
    naming --username, never dropped for anonymous access; a user name from the
    environment completes a password from the options."""
    with pytest.raises(UsageError, match="--username"):
        credentials_for("reg.example", password="pw")
    monkeypatch.setenv("BLOCKSTORE_PASSWORD", "envpw")
    with pytest.raises(UsageError, match="--username"):
        credentials_for("reg.example")
    monkeypatch.setenv("BLOCKSTORE_USERNAME", "env")
    assert credentials_for("reg.example", password="pw") == Credentials("env", "pw")
