"""An image's one layer served from a new, cold cache through a fault proxy."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from blockstore.cache import CachedBlob, ChunkStore
from blockstore.registry import (
    RegistryBlob,
    RegistryClient,
    RegistryOptions,
    parse_reference,
    resolve_image,
)
from rig.fault_proxy import FaultProxy


@contextmanager
def registry_blob(
    proxy: FaultProxy, reference_text: str, tmp: Path, *, retried: bool = True
) -> Iterator[CachedBlob]:
    """The one layer of ``reference_text``, read through ``proxy`` into a new, cold cache
    in ``tmp``. ``retried=False``: each range is asked once, so a failed read leaves its
    chunks missing for the next."""
    attempts = {} if retried else {"max_attempts": 1}
    client = RegistryClient(proxy.host, RegistryOptions(insecure=True, **attempts))
    reference = parse_reference(reference_text)
    (layer,) = resolve_image(client, reference, "linux/amd64").layers
    store = ChunkStore(tmp / "cache")
    blob = CachedBlob(
        store, layer.digest, layer.size, RegistryBlob(client, reference.repository, layer)
    )
    try:
        yield blob
    finally:
        blob.close()
        store.close()
        client.close()
