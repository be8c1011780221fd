"""Artifacts that travel with an image: the chunk indexes of its layers.

``blockstore index`` builds the table of each layer (``chunkindex``) from
verified bytes and attaches them to the image manifest as one OCI artifact
(``registry.referrers``). ``serve``, ``mount`` and ``prefetch`` look that
artifact up when they open the image and keep its tables in the cache next
to the manifests, so the check holds offline too.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator, Sequence

from blockstore.cache import CHUNK_SIZE, ChunkStore
from blockstore.chunkindex import (
    ARTIFACT_TYPE,
    BLOB_MEDIA_TYPE,
    LAYER_ANNOTATION,
    ChunkIndex,
    build_index,
)
from blockstore.errors import BlockstoreError, CacheError
from blockstore.registry import Layer, RegistryClient, ResolvedImage
from blockstore.registry.mediatypes import OCI_MANIFEST
from blockstore.registry.referrers import Subject, find_artifact, push_artifact, read_artifact

log = logging.getLogger(__name__)

STREAM_STEP = 4 << 20
"""Bytes read from the source at a time while building an index, so memory stays flat."""


def subject_of(resolved: ResolvedImage, repository: str) -> Subject:
    """The image manifest artifacts are attached to."""
    raw = resolved.manifests.get(resolved.manifest_digest, b"")
    try:
        media_type = json.loads(raw).get("mediaType") or OCI_MANIFEST
    except (ValueError, AttributeError, RecursionError):
        media_type = OCI_MANIFEST
    return Subject(repository, resolved.manifest_digest, len(raw), media_type)


def build_layer_index(
    layer: Layer,
    read: Callable[[int, int], bytes | Sequence[bytes | memoryview]],
    progress: Callable[[int], None] | None = None,
) -> ChunkIndex:
    """Build a layer's index by reading it once, in steps, through ``read(offset, length)``
    (a source's ``read_range`` or a cached blob's ``read``); checked against the digest."""

    def pieces() -> Iterator[bytes | memoryview]:
        for offset in range(0, layer.size, STREAM_STEP):
            got = read(offset, min(STREAM_STEP, layer.size - offset))
            for piece in [got] if isinstance(got, bytes | memoryview) else got:
                if progress is not None:
                    progress(len(piece))
                yield piece

    return build_index(layer.digest, layer.size, CHUNK_SIZE, pieces())


def push_indexes(
    client: RegistryClient, subject: Subject, indexes: list[ChunkIndex], *, created: str = ""
) -> str:
    """Attach the tables of several layers to the image as one artifact; its digest."""
    blobs = [
        (index.to_bytes(), BLOB_MEDIA_TYPE, {LAYER_ANNOTATION: index.layer_digest})
        for index in indexes
    ]
    stamp = created or time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return push_artifact(client, subject, ARTIFACT_TYPE, blobs, created=stamp)


def fetch_indexes(
    client: RegistryClient, subject: Subject, layers: list[Layer]
) -> dict[str, ChunkIndex]:
    """The image's chunk indexes from its artifact, by layer digest; {} when it has none.

    A table that is malformed or names another layer is left out with a
    warning: the layer is then served as without an index, never wrongly.
    """
    referrer = find_artifact(client, subject, ARTIFACT_TYPE)
    if referrer is None:
        return {}
    by_digest = {layer.digest: layer for layer in layers}
    found: dict[str, ChunkIndex] = {}
    for data, media_type, notes in read_artifact(client, subject, referrer):
        layer = by_digest.get(notes.get(LAYER_ANNOTATION, ""))
        if media_type != BLOB_MEDIA_TYPE or layer is None:
            continue
        try:
            found[layer.digest] = ChunkIndex.from_bytes(
                data, layer_digest=layer.digest, size=layer.size, chunk_size=CHUNK_SIZE
            )
        except BlockstoreError as exc:
            log.warning("chunk index of %s dropped: %s", layer.digest, exc)
    return found


def keep_indexes(store: ChunkStore, indexes: dict[str, ChunkIndex]) -> None:
    """Keep tables in the cache for offline opens; a cache that cannot take them only warns."""
    for digest, index in indexes.items():
        try:
            store.images.put_manifest(_cache_key(digest), index.to_bytes())
        except CacheError as exc:
            log.warning("chunk index of %s not kept in the cache: %s", digest, exc)


def cached_index(store: ChunkStore, layer: Layer) -> ChunkIndex | None:
    """A layer's table as kept in the cache, if any and if it still parses."""
    raw = store.images.manifest(_cache_key(layer.digest))
    if not raw:  # never kept, or dropped as lying
        return None
    try:
        return ChunkIndex.from_bytes(
            raw, layer_digest=layer.digest, size=layer.size, chunk_size=CHUNK_SIZE
        )
    except BlockstoreError as exc:
        log.warning("cached chunk index of %s is damaged, ignored: %s", layer.digest, exc)
        return None


def forget_index(store: ChunkStore, layer_digest: str) -> None:
    """Drop a table found to disagree with its layer."""
    try:
        store.images.put_manifest(_cache_key(layer_digest), b"")
    except CacheError as exc:
        log.warning("could not drop the chunk index of %s: %s", layer_digest, exc)


def _cache_key(layer_digest: str) -> str:
    return f"chunk-index/{layer_digest}"
