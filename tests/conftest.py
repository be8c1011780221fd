"""Fixtures shared by every test: real registries, fixture images, the fault proxy.

The machinery lives in ``tests/rig``; this file only gives it pytest
lifetimes. Registries and images are session-scoped (each starts or builds
once, in well under a second or two); ``fresh_registry`` is a registry of a
test's own, free to stop.
"""

from __future__ import annotations

import signal
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from rig.fault_proxy import FaultProxy
from rig.images import ErofsImages, build_images
from rig.nbd_certificates import NBDCertificates, make_nbd_certificates
from rig.pushed import PushedImages, push_fixture_images
from rig.registry_server import RegistryServer, TokenAuth
from rig.tls import CertificateAuthority, make_ca
from rig.token_issuer import TokenIssuer

# A shell starts a background job with SIGINT ignored, and processes inherit that:
# the commands tests interrupt with SIGINT (demo, prefetch) would then not see it.
# Tests send SIGINT as a user's Ctrl-C does, so their commands must start taking it.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


def _serve(server: RegistryServer) -> Iterator[RegistryServer]:
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RegistryServer]:
    """A plain-HTTP registry shared by the session; a test that stops it must start it again."""
    yield from _serve(RegistryServer(tmp_path_factory.mktemp("registry")))


@pytest.fixture
def fresh_registry(tmp_path: Path) -> Iterator[RegistryServer]:
    """A plain-HTTP registry of this test's own, empty, free to stop and restart."""
    yield from _serve(RegistryServer(tmp_path / "registry"))


@pytest.fixture(scope="session")
def erofs_images(tmp_path_factory: pytest.TempPathFactory) -> ErofsImages:
    """EROFS images built once per session: ``.small``, ``.large``, ``.layers``."""
    return build_images(tmp_path_factory.mktemp("erofs"))


@pytest.fixture(scope="session")
def pushed_images(registry: RegistryServer, erofs_images: ErofsImages) -> PushedImages:
    """The fixture images pushed into ``registry``, as reference strings."""
    return push_fixture_images(registry.host, erofs_images)


@pytest.fixture(scope="session")
def test_ca(tmp_path_factory: pytest.TempPathFactory) -> CertificateAuthority:
    """A CA made for this run: it signs the HTTPS registry and the token issuer."""
    return make_ca(tmp_path_factory.mktemp("ca"))


@pytest.fixture(scope="session")
def nbd_certificates(tmp_path_factory: pytest.TempPathFactory) -> NBDCertificates:
    """Certificate directories for NBD over TLS: server, clients, wrong CA, expired."""
    return make_nbd_certificates(tmp_path_factory.mktemp("nbd-tls"))


@pytest.fixture(scope="session")
def tls_registry(
    tmp_path_factory: pytest.TempPathFactory, test_ca: CertificateAuthority
) -> Iterator[RegistryServer]:
    """An HTTPS registry whose certificate only ``test_ca`` (``.ca_file``) vouches for."""
    workdir = tmp_path_factory.mktemp("tls-registry")
    server = RegistryServer(
        workdir, tls=test_ca.issue("registry", server=True), ca_file=test_ca.cert
    )
    yield from _serve(server)


@pytest.fixture(scope="session")
def basic_auth_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RegistryServer]:
    """A registry with htpasswd basic auth; ``.username``/``.password`` may pull and push."""
    workdir = tmp_path_factory.mktemp("basic-registry")
    username, password = "alice", "s3cret-basic-pw"
    htpasswd = workdir / "htpasswd"
    htpasswd.write_bytes(
        subprocess.run(
            ["htpasswd", "-Bbn", username, password], check=True, capture_output=True
        ).stdout
    )
    server = RegistryServer(
        workdir / "server", htpasswd=htpasswd, username=username, password=password
    )
    yield from _serve(server)


@pytest.fixture(scope="session")
def token_registry(
    tmp_path_factory: pytest.TempPathFactory, test_ca: CertificateAuthority
) -> Iterator[RegistryServer]:
    """A registry with token auth; ``.issuer`` is its ``TokenIssuer`` (tests may change
    ``expires_in``/``lifetime`` but must restore them); ``.username``/``.password`` may
    pull and push, user ``reader`` (password ``reader-pw``) may only pull."""
    workdir = tmp_path_factory.mktemp("token-registry")
    username, password = "bob", "s3cret-token-pw"
    cert, key = test_ca.issue("token-issuer", server=False)
    issuer = TokenIssuer(
        cert, key, users={username: password, "reader": "reader-pw"}, readers=frozenset({"reader"})
    )
    issuer.start()
    server = RegistryServer(
        workdir,
        token=TokenAuth(issuer.realm, issuer.service, issuer.name, test_ca.cert),
        username=username,
        password=password,
    )
    server.issuer = issuer
    try:
        yield from _serve(server)
    finally:
        issuer.stop()


@pytest.fixture(scope="session")
def mirror_registry(
    tmp_path_factory: pytest.TempPathFactory, registry: RegistryServer
) -> Iterator[RegistryServer]:
    """A pull-through cache (``proxy: remoteurl:``) in front of ``registry``."""
    yield from _serve(RegistryServer(tmp_path_factory.mktemp("mirror"), proxy_remote=registry.url))


@pytest.fixture
def fault_proxy() -> Iterator[Callable[..., FaultProxy]]:
    """Factory: ``fault_proxy(server_or_url, **kw)`` starts a ``FaultProxy`` in front of it.

    Set ``proxy.fault = Fault(...)`` to delay, cut, truncate, corrupt, refuse,
    ignore Range or redirect; ``proxy.requests`` records what clients sent.
    """
    started: list[FaultProxy] = []

    def start(upstream: RegistryServer | str, **kw) -> FaultProxy:
        url = upstream if isinstance(upstream, str) else upstream.url
        proxy = FaultProxy(url, **kw)
        proxy.start()
        started.append(proxy)
        return proxy

    yield start
    for proxy in started:
        proxy.stop()
