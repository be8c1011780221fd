"""The CNCF distribution registry (``docker-registry serve``) as a test fixture.

One class for every flavour: plain HTTP, HTTPS with the test CA, htpasswd
basic auth, token auth with the test issuer, and pull-through proxy mode (a
mirror). ``stop()`` and ``start()`` keep port and storage, so a test can take
a registry down and bring the same one back.
"""

from __future__ import annotations

import atexit
import json
import subprocess
from dataclasses import dataclass
from pathlib import Path

from blockstore.registry import RegistryClient, RegistryOptions
from rig.processes import die_with_parent, free_port, stop_process, wait_listening

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
    ):
        self.workdir = workdir
        self.data_dir = workdir / "data"
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.host = f"127.0.0.1:{self.port}"
        self.tls = tls
        self.ca_file = ca_file
        self.url = f"{'https' if tls else 'http'}://{self.host}"
        self.username = username
        self.password = password
        self.log_path = workdir / "registry.log"
        self.config_path = workdir / "config.yml"
        # JSON is YAML, and needs no YAML library.
        self.config_path.write_text(
            json.dumps(self._config(htpasswd, token, proxy_remote), indent=1)
        )
        self._process: subprocess.Popen | None = None
        self.issuer = None
        """The ``TokenIssuer`` of a token-auth registry."""

    def __repr__(self) -> str:
        return f"RegistryServer({self.url})"

    def _config(self, htpasswd: Path | None, token: TokenAuth | None, remote: str | None) -> dict:
        http: dict = {"addr": self.host, "secret": "blockstore-test-secret"}
        if self.tls:
            http["tls"] = {"certificate": str(self.tls[0]), "key": str(self.tls[1])}
        config: dict = {
            "version": 0.1,
            "log": {"level": "warn", "accesslog": {"disabled": True}},
            "storage": {
                "filesystem": {"rootdirectory": str(self.data_dir)},
                "delete": {"enabled": True},
                "maintenance": {"uploadpurging": {"enabled": False}},
            },
            "http": http,
        }
        if htpasswd:
            config["auth"] = {"htpasswd": {"realm": "blockstore-test", "path": str(htpasswd)}}
        if token:
            config["auth"] = {
                "token": {
                    "realm": token.realm,
                    "service": token.service,
                    "issuer": token.issuer,
                    "rootcertbundle": str(token.rootcertbundle),
                }
            }
        if remote:
            config["proxy"] = {"remoteurl": remote}
        return config

    def start(self) -> None:
        if self.running:
            return
        log = self.log_path.open("ab")
        self._process = subprocess.Popen(
            ["docker-registry", "serve", str(self.config_path)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,
            preexec_fn=die_with_parent,
        )
        log.close()
        _RUNNING.add(self)
        wait_listening("127.0.0.1", self.port, self._process, self.log_path)

    def stop(self) -> None:
        stop_process(self._process)
        self._process = None
        _RUNNING.discard(self)

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

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
