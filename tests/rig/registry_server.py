"""The CNCF distribution registry (``docker-registry serve``) as a test fixture.

One class for every flavour: plain HTTP, HTTPS with the test CA, htpasswd
basic auth, token auth with the test issuer, and pull-through proxy mode (a
mirror). ``stop()`` and ``start()`` keep port and storage, so a test can take
a registry down and bring the same one back.
"""

from __future__ import annotations

import atexit
from dataclasses import dataclass
from pathlib import Path

from blockstore.localregistry import LocalRegistry
from blockstore.registry import RegistryClient, RegistryOptions

_RUNNING: set[RegistryServer] = set()


@dataclass(frozen=True)
class TokenAuth:
    realm: str
    service: str
    issuer: str
    rootcertbundle: Path


class RegistryServer:
    """A real registry on 127.0.0.1 with its own port, storage and config."""

    def __init__(
        self,
        workdir: Path,
        *,
        tls: tuple[Path, Path] | None = None,
        ca_file: Path | None = None,
        htpasswd: Path | None = None,
        token: TokenAuth | None = None,
        proxy_remote: str | None = None,
        username: str | None = None,
        password: str | None = None,
        client_ca: Path | None = None,
    ):
        self.tls = tls
        self.client_ca = client_ca
        """With ``tls``: the CA whose client certificates it demands (mutual TLS)."""
        self.ca_file = ca_file
        self.username = username
        self.password = password
        self._daemon = LocalRegistry(
            workdir,
            settings=self._settings(htpasswd, token, proxy_remote),
            scheme="https" if tls else "http",
        )
        self.workdir = workdir
        self.data_dir = self._daemon.data_dir
        self.port = self._daemon.port
        self.host = self._daemon.host
        self.url = self._daemon.url
        self.log_path = self._daemon.log_path
        self.issuer = None
        """The ``TokenIssuer`` of a token-auth registry."""

    def __repr__(self) -> str:
        return f"RegistryServer({self.url})"

    def _settings(self, htpasswd: Path | None, token: TokenAuth | None, remote: str | None) -> dict:
        http: dict = {"secret": "blockstore-test-secret"}
        if self.tls:
            http["tls"] = {"certificate": str(self.tls[0]), "key": str(self.tls[1])}
            if self.client_ca:
                http["tls"]["clientcas"] = [str(self.client_ca)]
        settings: dict = {
            "http": http,
            "storage": {
                "delete": {"enabled": True},
                "maintenance": {"uploadpurging": {"enabled": False}},
            },
        }
        if htpasswd:
            settings["auth"] = {"htpasswd": {"realm": "blockstore-test", "path": str(htpasswd)}}
        if token:
            settings["auth"] = {
                "token": {
                    "realm": token.realm,
                    "service": token.service,
                    "issuer": token.issuer,
                    "rootcertbundle": str(token.rootcertbundle),
                }
            }
        if remote:
            settings["proxy"] = {"remoteurl": remote}
        return settings

    def use_token_issuer(self, token: TokenAuth) -> None:
        """Name another token issuer from the next ``start()`` on, as when the issuer moves."""
        self._daemon.config["auth"] = self._settings(None, token, None)["auth"]

    def start(self) -> None:
        self._daemon.start()
        _RUNNING.add(self)

    def stop(self) -> None:
        self._daemon.stop()
        _RUNNING.discard(self)

    @property
    def running(self) -> bool:
        return self._daemon.running

    def options(self, **overrides) -> RegistryOptions:
        """Client options that reach this registry (plain HTTP or the test CA, its user)."""
        settings = {
            "insecure": self.tls is None,
            "ca_file": str(self.ca_file) if self.ca_file else None,
            "username": self.username,
            "password": self.password,
            "timeout": 10.0,
        }
        settings.update(overrides)
        return RegistryOptions(**settings)

    def client(self, **overrides) -> RegistryClient:
        return RegistryClient(self.host, self.options(**overrides))


@atexit.register
def _stop_all() -> None:
    for server in list(_RUNNING):
        server.stop()
