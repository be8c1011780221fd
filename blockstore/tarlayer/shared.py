"""A tar layer's index as it travels through the registry, and what it must pass to be used.

``blockstore index --push`` attaches, for each tar layer, its metadata image,
its span table and (gzip) its checkpoints in SOCI's zinfo v2 bytes, so that
erofs-utils' ``oci.tarindex``/``oci.zinfo`` can use them as they are. A new
machine takes them instead of reading the whole blob to build its own.

Nothing here is trusted for coming from the registry. Before an index is
used it must be bound to the layer (the tar it describes is the layer's own:
the blob itself for a plain tar, the config's ``diff_id`` for a compressed
one, so it cannot point the cache at another key), and the metadata image
must pass the full structural walk of ``erofs_reader`` (every inode and
directory, every chunk address inside this layer's tar) before the kernel
parses it. Its span table must cover exactly this blob and this tar. Each
span is then checked against its recorded sha256 when it is decompressed,
and the tar part against the diff_id when it is sealed.
"""

from __future__ import annotations

import itertools
from typing import TYPE_CHECKING

from blockstore import erofs_format
from blockstore.chunkindex import LAYER_ANNOTATION
from blockstore.errors import IntegrityError
from blockstore.registry.mediatypes import GZIP
from blockstore.tarlayer.erofs_reader import read_info, read_metadata
from blockstore.tarlayer.gzindex import Zinfo
from blockstore.tarlayer.layerindex import INDEX_FORMAT, SpanIndex, TarIndex
from blockstore.tarlayer.tree import TarLayerError

if TYPE_CHECKING:
    from blockstore.registry.referrers import ArtifactBlob

ARTIFACT_TYPE = "application/vnd.blockstore.tar-index.v1"
"""The artifact type of the manifest that carries the tar indexes of an image's layers."""
METADATA_MEDIA_TYPE = "application/vnd.blockstore.tar-index.v1.erofs"
"""The EROFS metadata image (erofs-utils' ``oci.tarindex``)."""
SPANS_MEDIA_TYPE = "application/vnd.blockstore.tar-index.v1.spans"
"""Restart points and the sha256 of each decompressed span (gzip and zstd layers)."""
ZINFO_MEDIA_TYPE = "application/vnd.blockstore.tar-index.v1.zinfo"
"""Gzip checkpoints in SOCI's zinfo v2 bytes (erofs-utils' ``oci.zinfo``)."""
TAR_DIGEST_ANNOTATION = "dev.blockstore.tar.digest"
TAR_SIZE_ANNOTATION = "dev.blockstore.tar.size"
FORMAT_ANNOTATION = "dev.blockstore.tar.index-format"
"""The ``INDEX_FORMAT`` the metadata image was written by: one made by other rules (an
older engine's) is not taken, as one kept in the cache is not."""


def index_blobs(index: TarIndex, layer_digest: str) -> list[ArtifactBlob]:
    """The artifact blobs that carry ``index`` for the layer ``layer_digest``."""
    notes = {LAYER_ANNOTATION: layer_digest}
    meta_notes = {
        **notes,
        TAR_DIGEST_ANNOTATION: index.tar_digest,
        TAR_SIZE_ANNOTATION: str(index.tar_size),
        FORMAT_ANNOTATION: str(INDEX_FORMAT),
    }
    blobs = [(index.metadata, METADATA_MEDIA_TYPE, meta_notes)]
    if index.spans is not None:
        if index.spans.zinfo is not None:  # the zinfo travels as its own blob
            blobs.append((index.spans.zinfo.to_bytes(), ZINFO_MEDIA_TYPE, notes))
        blobs.insert(1, (index.spans.table(), SPANS_MEDIA_TYPE, notes))
    return blobs


def _refuse(what: str) -> IntegrityError:
    return IntegrityError(f"shared tar index refused: {what}")


def index_from_blobs(
    blobs: list[ArtifactBlob],
    *,
    layer_digest: str,
    layer_size: int,
    kind: str,
    diff_id: str | None,
) -> TarIndex:
    """The index the blobs of one layer describe, once every check holds.

    ``kind`` is the layer's (``tar``, ``gzip``, ``zstd``), from its media type;
    ``diff_id`` is the config's, whose bytes were checked against the manifest.
    Raises ``IntegrityError`` naming the first check that fails.
    """
    by_type: dict[str, ArtifactBlob] = {}
    for blob in blobs:
        if blob[2].get(LAYER_ANNOTATION) != layer_digest:
            continue
        if blob[1] in by_type:
            raise _refuse(f"two {blob[1]} blobs for one layer")
        by_type[blob[1]] = blob
    if METADATA_MEDIA_TYPE not in by_type:
        raise _refuse("no metadata image for this layer")
    metadata, _, notes = by_type[METADATA_MEDIA_TYPE]
    if notes.get(FORMAT_ANNOTATION) != str(INDEX_FORMAT):
        made = notes.get(FORMAT_ANNOTATION, "an older one")
        raise _refuse(f"it was written by index format {made}, this engine's is {INDEX_FORMAT}")
    tar_digest = notes.get(TAR_DIGEST_ANNOTATION, "")
    try:
        tar_size = int(notes.get(TAR_SIZE_ANNOTATION, ""))
    except ValueError:
        raise _refuse("the tar size is missing or not a number") from None
    compressed = kind != "tar"
    if not compressed and (tar_digest, tar_size) != (layer_digest, layer_size):
        raise _refuse("it describes another tar than this layer's blob")
    if compressed and (diff_id is None or tar_digest != diff_id):
        raise _refuse(f"it describes the tar {tar_digest or '?'}, the config says {diff_id}")
    try:
        info = read_info(metadata)
        if info.tar_blocks != erofs_format.align(tar_size, erofs_format.BLOCK_SIZE) // 512:
            raise _refuse("its metadata image describes a tar of another size")
        read_metadata(metadata)  # every inode, directory and chunk address
    except TarLayerError as exc:
        raise _refuse(str(exc)) from None
    spans = _spans(by_type, kind, layer_size, tar_size) if compressed else None
    return TarIndex(metadata, tar_size, spans, tar_digest)


def _spans(
    by_type: dict[str, ArtifactBlob], kind: str, layer_size: int, tar_size: int
) -> SpanIndex:
    """The span table, which must cover exactly this blob and this tar."""
    if SPANS_MEDIA_TYPE not in by_type or (kind == GZIP) != (ZINFO_MEDIA_TYPE in by_type):
        raise _refuse(f"the span table of a {kind} layer is missing or of another kind")
    table = by_type[SPANS_MEDIA_TYPE][0]
    zinfo = by_type[ZINFO_MEDIA_TYPE][0] if kind == GZIP else b""
    try:
        if kind == GZIP:
            Zinfo.from_bytes(zinfo)
        spans = SpanIndex.from_bytes(table + zinfo)
    except IntegrityError as exc:
        raise _refuse(str(exc)) from None
    starts = spans.starts
    if (
        spans.kind != kind
        or spans.compressed_size != layer_size
        or spans.uncompressed_size != tar_size
        or starts[0] != 0
        or any(b <= a for a, b in itertools.pairwise(starts))
        or any(not 0 <= c < max(layer_size, 1) for c, _ in spans.points)
    ):
        raise _refuse(f"its span table does not fit this {kind} blob and its tar")
    return spans
