"""Artifacts that travel with an image: chunk indexes, tar indexes and access traces.

``blockstore index`` builds the table of each layer (``chunkindex``) from
verified bytes and attaches them to the image manifest as one OCI artifact
(``registry.referrers``). ``serve``, ``mount`` and ``prefetch`` look that
artifact up when they open the image and keep its tables in the cache next
to the manifests, so the check holds offline too. The same command attaches
the index of each tar layer (``tarlayer.shared``), which a cold open takes
instead of reading the whole blob to build one. ``blockstore trace push``
attaches the access traces recorded by mounts, merged with those already
there; a cold open on a new machine takes them into its cache and replays
them as prefetch.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator, Sequence
from typing import TypeVar

from blockstore.cache import CHUNK_SIZE, ChunkStore
from blockstore.cache.indexes import IndexShelf
from blockstore.cache.traces import TraceShelf
from blockstore.chunkindex import (
    ARTIFACT_TYPE,
    BLOB_MEDIA_TYPE,
    LAYER_ANNOTATION,
    ChunkIndex,
    build_index,
)
from blockstore.errors import BlockstoreError, CacheError, IntegrityError, RegistryError
from blockstore.prefetch.trace import Trace, merge_traces, traces_document, traces_from_document
from blockstore.progress import human
from blockstore.registry import Layer, RegistryClient, ResolvedImage
from blockstore.registry.mediatypes import OCI_MANIFEST
from blockstore.registry.referrers import (
    MAX_ARTIFACT_BLOB,
    ArtifactBlob,
    Referrer,
    Subject,
    list_referrers,
    newest,
    push_artifact,
    read_artifact,
)
from blockstore.tarlayer.layerindex import TarIndex
from blockstore.tarlayer.shared import ARTIFACT_TYPE as TAR_INDEX_ARTIFACT_TYPE
from blockstore.tarlayer.shared import index_blobs as tar_index_blobs

log = logging.getLogger(__name__)

TRACE_ARTIFACT_TYPE = "application/vnd.blockstore.access-traces.v1"
TRACE_MEDIA_TYPE = "application/vnd.blockstore.access-traces.v1+json"
"""A traces document, as ``blockstore trace export`` writes it."""

STREAM_STEP = 4 << 20
"""Bytes read from the source at a time while building an index, so memory stays flat."""

T = TypeVar("T")


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


def carried_over(what: str, read: Callable[[], T], nothing: T) -> T:
    """``read()``: what an artifact about to be replaced holds, to carry into the new one.
    One that cannot be read (refused, its blobs gone) is left out with a warning: no
    reader could use it either, and it must not stand in the way of its replacement."""
    try:
        return read()
    except (RegistryError, IntegrityError) as exc:
        log.warning("the %s attached now is left out, as it cannot be read: %s", what, exc)
        return nothing


def push_indexes(client: RegistryClient, subject: Subject, indexes: list[ChunkIndex]) -> str:
    """Attach the tables of several layers to the image as one artifact; its digest."""
    blobs = [
        (index.to_bytes(), BLOB_MEDIA_TYPE, {LAYER_ANNOTATION: index.layer_digest})
        for index in indexes
    ]
    return push_artifact(client, subject, ARTIFACT_TYPE, blobs)


def fetch_indexes(
    client: RegistryClient,
    subject: Subject,
    layers: list[Layer],
    referrers: list[Referrer] | None = None,
) -> dict[str, ChunkIndex]:
    """The image's chunk indexes from its artifact, by layer digest; {} when it has none.

    A table that is malformed or names another layer is left out with a
    warning: the layer is then served as without an index, never wrongly.
    """
    if referrers is None:
        referrers = list_referrers(client, subject)
    referrer = newest(referrers, ARTIFACT_TYPE)
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


def indexes_for_image(
    store: ChunkStore,
    client: RegistryClient | None,
    resolved: ResolvedImage,
    repository: str,
    referrers: list[Referrer] | None = None,
) -> dict[str, ChunkIndex]:
    """The chunk indexes to check an opened image's layers with, by layer digest.

    Online, the image's artifact is looked up and its tables kept in the
    cache; a lookup that fails only warns (the layers are then checked as
    without an index: per chunk once sealed, by digest at the seal).
    Offline, the tables kept from an earlier online open are used.
    """
    shelf = IndexShelf(store)
    found: dict[str, ChunkIndex] = {}
    if client is not None:
        try:
            subject = subject_of(resolved, repository)
            found = fetch_indexes(client, subject, resolved.layers, referrers)
        except BlockstoreError as exc:
            log.warning("%s: chunk index not looked up: %s", resolved.reference, exc)
        for digest, index in list(found.items()):
            use = shelf.trusted(index)
            if use is index:
                shelf.put(index)
                continue
            if use != index:
                log.warning(
                    "%s: the chunk index attached for %s %s: not used",
                    resolved.reference, digest,
                    "differs from the one built here from the layer" if use
                    else "was found here to disagree with the layer",
                )  # fmt: skip
            del found[digest]  # what is kept (built here, or nothing) is taken below
    for layer in resolved.layers:
        if layer.digest not in found and (kept := shelf.get(layer.digest, layer.size)) is not None:
            found[layer.digest] = kept
    return found


def push_tar_indexes(
    client: RegistryClient, subject: Subject, layers: list[Layer], built: dict[str, TarIndex]
) -> str | None:
    """Attach the tar indexes of the image's tar layers as one artifact; its digest, or
    None where none could be.

    Layers not in ``built`` keep what the artifact already held for them, so
    indexing one layer does not drop the others'. A layer whose index has a blob larger
    than any reader takes (the zinfo of a gzip tar of about 8 GiB) is left out, with a
    warning: a machine without it builds its own, as it would with none attached.
    """

    def attached() -> list[ArtifactBlob]:
        referrer = newest(list_referrers(client, subject), TAR_INDEX_ARTIFACT_TYPE)
        if referrer is None:
            return []
        digests = {layer.digest for layer in layers} - set(built)
        return read_artifact(
            client, subject, referrer, lambda notes: notes.get(LAYER_ANNOTATION) in digests
        )

    kept = carried_over("tar index", attached, [])
    blobs: list[ArtifactBlob] = []
    for digest, index in built.items():
        made = tar_index_blobs(index, digest)
        if (largest := max(len(data) for data, _, _ in made)) > MAX_ARTIFACT_BLOB:
            log.warning(
                "%s: its tar index is not attached: a blob of it is %s, over the %s an "
                "artifact blob may have (a machine without it builds its own)",
                digest,
                human(largest),
                human(MAX_ARTIFACT_BLOB),
            )
            continue
        blobs += made
    if not kept and not blobs:
        return None
    return push_artifact(client, subject, TAR_INDEX_ARTIFACT_TYPE, kept + blobs)


def fetch_tar_index(
    client: RegistryClient, subject: Subject, layer: Layer, referrers: list[Referrer]
) -> list[ArtifactBlob]:
    """The blobs the image's tar-index artifact holds for one layer (unchecked beyond
    their digests: ``tarlayer.shared`` judges them); [] when there is none."""
    referrer = newest(referrers, TAR_INDEX_ARTIFACT_TYPE)
    if referrer is None:
        return []
    return read_artifact(
        client, subject, referrer, lambda notes: notes.get(LAYER_ANNOTATION) == layer.digest
    )


def push_traces(
    client: RegistryClient, subject: Subject, layers: list[Layer], local: list[Trace]
) -> tuple[str, int]:
    """Attach ``local`` traces, merged with those already attached, replacing that artifact.

    Returns the new artifact's digest and how many layers' traces it holds.
    """
    by_layer: dict[str, list[Trace]] = {}
    attached = carried_over("traces", lambda: fetch_traces(client, subject, layers), [])
    for trace in [*attached, *local]:
        by_layer.setdefault(trace.digest, []).append(trace)
    merged = [m for group in by_layer.values() if (m := _merged(group, local)) is not None]
    blob = (traces_document(merged), TRACE_MEDIA_TYPE, {})
    return push_artifact(client, subject, TRACE_ARTIFACT_TYPE, [blob]), len(merged)


def _merged(group: list[Trace], local: list[Trace]) -> Trace | None:
    """One layer's traces merged; if those attached already make that too large, this
    cache's own trace of the layer replaces them (None if it has none)."""
    try:
        return merge_traces(group)
    except ValueError as exc:
        log.warning("%s: the traces attached are left out: %s", group[0].digest, exc)
        own = [trace for trace in group if any(trace is mine for mine in local)]
        return merge_traces(own) if own else None


def fetch_traces(
    client: RegistryClient,
    subject: Subject,
    layers: list[Layer],
    referrers: list[Referrer] | None = None,
) -> list[Trace]:
    """The traces attached to the image for its own layers; [] when it has none."""
    if referrers is None:
        referrers = list_referrers(client, subject)
    referrer = newest(referrers, TRACE_ARTIFACT_TYPE)
    if referrer is None:
        return []
    digests = {layer.digest for layer in layers}
    found = []
    for data, media_type, _ in read_artifact(client, subject, referrer):
        if media_type != TRACE_MEDIA_TYPE:
            continue
        try:
            found += [t for t in traces_from_document(data) if t.digest in digests]
        except ValueError as exc:
            log.warning("traces attached to %s ignored: %s", subject.digest, exc)
    return found


def traces_for_image(
    store: ChunkStore,
    client: RegistryClient,
    resolved: ResolvedImage,
    repository: str,
    referrers: list[Referrer] | None = None,
) -> int:
    """Bring the image's attached traces into the cache for layers that have none kept,
    so a first cold open replays what other machines recorded; how many were taken."""
    shelf = TraceShelf(store)
    wanted = [layer for layer in resolved.layers if not _trace_kept(shelf, layer.digest)]
    if not wanted:
        return 0
    try:
        traces = fetch_traces(client, subject_of(resolved, repository), wanted, referrers)
        for trace in traces:
            shelf.put(trace)
    except BlockstoreError as exc:
        log.warning("%s: attached traces not used: %s", resolved.reference, exc)
        return 0
    return len(traces)


def _trace_kept(shelf: TraceShelf, digest: str) -> bool:
    """Whether a readable trace of the layer is kept; one that is not (damaged, or of
    another version's format) costs the open nothing: an attached trace replaces it."""
    try:
        return shelf.get(digest) is not None
    except CacheError as exc:
        log.warning("%s; an attached trace, if any, replaces it", exc)
        return False
