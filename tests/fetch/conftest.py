"""Fixtures of the fetch engine tests: a cache directory, and a blob in the real registry."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
from fetch_sources import make_blob
from rig.pushed import push_erofs
from rig.registry_server import RegistryServer

from blockstore.registry import RegistryClient, RegistryOptions
from blockstore.registry.blob import RegistryBlob
from blockstore.registry.manifests import Layer

BLOB_SIZE = 4 << 20


@pytest.fixture
def cache_dir(tmp_path: Path) -> Path:
    return tmp_path / "cache"


@dataclass
class PushedBlob:
    data: bytes
    digest: str
    repository: str
    reference: str

    def source(self, host: str) -> RegistryBlob:
        """The blob read through ``host`` (the registry, or a proxy in front of it)."""
        client = RegistryClient(host, RegistryOptions(insecure=True))
        layer = Layer(0, self.digest, len(self.data), "application/octet-stream")
        return RegistryBlob(client, self.repository, layer)


@pytest.fixture(scope="session")
def pushed_blob(registry: RegistryServer, tmp_path_factory: pytest.TempPathFactory) -> PushedBlob:
    """4 MiB of random bytes pushed as the one layer of ``fetch/blob:v1``."""
    data, digest = make_blob(BLOB_SIZE, seed=90)
    path = tmp_path_factory.mktemp("fetch-blob") / "blob"
    path.write_bytes(data)
    reference = push_erofs(
        registry.host, "fetch/blob", "v1", [path], media_type="application/octet-stream"
    )
    return PushedBlob(data, digest, "fetch/blob", reference)
