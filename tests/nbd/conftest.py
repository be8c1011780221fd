"""Servers for the NBD tests: real images from the real registry, through the cache."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from nbd_serving import Served, served, start_server
from rig.fault_proxy import FaultProxy
from rig.local_source import LocalFileSource

from blockstore.cache import CachedBlob, ChunkStore
from blockstore.registry import (
    RegistryBlob,
    RegistryClient,
    RegistryOptions,
    parse_reference,
    resolve_image,
)


@contextmanager
def serve_from_registry(registry, reference_text: str, image, tmp: Path) -> Iterator[Served]:
    """Serve the one layer of ``reference_text`` from ``registry`` through a new, cold cache."""
    client = RegistryClient(registry.host, RegistryOptions(insecure=True))
    reference = parse_reference(reference_text)
    resolved = resolve_image(client, reference, "linux/amd64")
    (layer,) = resolved.layers
    store = ChunkStore(tmp / "cache")
    blob = CachedBlob(
        store,
        layer.digest,
        layer.size,
        RegistryBlob(client, reference.repository, layer),
        name="layer0",
        description=f"{resolved.reference} layer 0",
    )
    server = start_server({"layer0": blob}, tmp, "layer0")
    try:
        yield served(server, "layer0", image, blob)
    finally:
        server.shutdown()
        blob.close()
        store.close()
        client.close()


@pytest.fixture(scope="session")
def registry_image(registry, pushed_images, erofs_images, tmp_path_factory) -> Iterator[Served]:
    """The small EROFS image, pushed to the real registry, served through a cold cache."""
    tmp = tmp_path_factory.mktemp("nbd-registry")
    with serve_from_registry(registry, pushed_images.small, erofs_images.small, tmp) as served_:
        yield served_


@pytest.fixture
def large_registry_image(registry, pushed_images, erofs_images, tmp_path) -> Iterator[Served]:
    """The large (64 MiB and more) image from the real registry through a cold cache."""
    with serve_from_registry(registry, pushed_images.large, erofs_images.large, tmp_path) as s:
        yield s


@pytest.fixture
def proxied_registry_image(
    registry, pushed_images, erofs_images, fault_proxy, tmp_path
) -> Iterator[tuple[Served, FaultProxy]]:
    """The small image served through a cold cache from behind a fault proxy."""
    proxy = fault_proxy(registry)
    with serve_from_registry(proxy, pushed_images.small, erofs_images.small, tmp_path) as s:
        yield s, proxy


@dataclass
class LocalBlob:
    blob: CachedBlob
    data: bytes
    store: ChunkStore


@pytest.fixture
def local_blob(tmp_path) -> Iterator[LocalBlob]:
    """A 3 MiB + 123 byte random blob in a local file, through a cache of its own."""
    data = os.urandom(3 * 1024 * 1024 + 123)
    path = tmp_path / "blob.bin"
    path.write_bytes(data)
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    source = LocalFileSource(path, digest)
    store = ChunkStore(tmp_path / "cache")
    blob = CachedBlob(store, digest, len(data), source, name="blob", description="random bytes")
    try:
        yield LocalBlob(blob, data, store)
    finally:
        blob.close()
        store.close()
        source.close()


@pytest.fixture
def local_server(local_blob, tmp_path) -> Iterator[tuple[Served, bytes]]:
    """A server of ``local_blob`` on TCP and a Unix socket."""
    server = start_server({"blob": local_blob.blob}, tmp_path, "blob")
    try:
        yield served(server, "blob", None, local_blob.blob), local_blob.data
    finally:
        server.shutdown()
