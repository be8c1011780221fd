"""``blockstore index``: per-chunk digests of an image's layers, attached to the image.

With a chunk index, a chunk fetched cold is checked on arrival instead of
only when the whole layer has arrived. The table is built from bytes
checked against the layer digest: from the cache when the layer is sealed
there, else by streaming the layer once. A tar layer's own index (its
metadata image and restart points) is attached too, so that a new machine
need not read the whole blob before its first mount.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
from typing import TYPE_CHECKING

from blockstore.cli.common import (
    add_cache_options,
    add_image_options,
    add_registry_options,
    open_image_from_args,
    say,
)

if TYPE_CHECKING:
    from blockstore.cache.indexes import IndexShelf
    from blockstore.chunkindex import ChunkIndex
    from blockstore.image import OpenImage
    from blockstore.registry.manifests import Layer
    from blockstore.tarlayer.indexcache import IndexCache
    from blockstore.tarlayer.layers import TarLayer

log = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    index = subparsers.add_parser(
        "index",
        help="build the chunk index of an image's layers, and attach it with --push",
        description="Compute the sha256 of every 32 KiB chunk of each layer of IMAGE (or "
        "one layer) and, for tar layers, their tar index (EROFS metadata image, span "
        "table, gzip zinfo), keep them in the cache and, with --push, attach them to the "
        "image as OCI artifacts (referrers API, or the referrers tag schema where the "
        "registry has no such API).",
    )
    add_image_options(index, "index", offline=False)
    index.add_argument(
        "--push", action="store_true", help="attach the tables to the image in the registry"
    )
    add_registry_options(index)
    add_cache_options(index)
    index.set_defaults(func=run_index)


def _proven_tar_export(image: OpenImage, layer: Layer, kind: str, kept: IndexCache) -> TarLayer:
    """The layer's export, its tar index proven against the tar's digest before it is
    published. An index kept from the registry by an earlier open, or built from a plain
    tar's headers before the blob's digest checked them, is proven by filling the tar;
    one that lies, or whose bytes do, is dropped and built again from the layer, then
    proven in turn: what ``index --push`` attaches is never taken on trust."""
    from blockstore.errors import IntegrityError
    from blockstore.registry.mediatypes import TAR
    from blockstore.tarlayer.gzindex import DEFAULT_SPAN
    from blockstore.tarlayer.indexcache import IndexCache
    from blockstore.tarlayer.layers import TarLayer

    def unproven() -> bool:
        shared = kept.origin(layer.digest, DEFAULT_SPAN) == IndexCache.SHARED
        return shared or (kind == TAR and kept.unproven(layer.digest, DEFAULT_SPAN))

    exported = image.layer_export(layer)
    if unproven():
        try:
            exported.prefetch()
        except IntegrityError as exc:
            log.warning("%s; its tar index is built again", exc)
            kept.drop(layer.digest, DEFAULT_SPAN)
            exported = image.layer_export(layer)
            if unproven():
                exported.prefetch()  # a second lie is the registry's own: an error
    assert isinstance(exported, TarLayer)
    return exported


def _trusted_tables(
    shelf: IndexShelf, layers: list[Layer], attached: dict[str, ChunkIndex]
) -> dict[str, ChunkIndex]:
    """The attached tables of the layers not indexed now, as they are carried into the
    new artifact: one this cache built from verified bytes stands in for the attached
    one, and one this cache found to disagree with its layer is left out, so that a
    push of one layer never publishes again a lie about another."""
    tables = {}
    for layer in layers:
        table = attached.get(layer.digest)
        use = shelf.built(layer.digest, layer.size) if table is None else shelf.trusted(table)
        if use is not None:
            tables[layer.digest] = use
        elif table is not None:
            log.warning(
                "%s: the chunk index attached now is left out: this cache found it "
                "to disagree with the layer",
                layer.digest,
            )
    return tables


def run_index(args: argparse.Namespace) -> int:
    # Imported here: loading the registry client costs start-up time (see cli/__init__).
    from blockstore.attachments import (
        build_layer_index,
        carried_over,
        fetch_indexes,
        push_indexes,
        push_tar_indexes,
        subject_of,
    )
    from blockstore.cache.indexes import IndexShelf
    from blockstore.errors import CacheError
    from blockstore.registry import RegistryBlob
    from blockstore.registry.mediatypes import TAR, layer_kind
    from blockstore.tarlayer.indexcache import IndexCache

    image = open_image_from_args(args, needs_registry=True)
    shelf = IndexShelf(image.store)
    tar_indexes = IndexCache(image.store)
    try:
        built = {}
        tar_built = {}
        # What is published is built here from verified bytes (or kept from such a build).
        image.shared_tar_indexes = False
        for layer in image.select(args.layer, args.blob):
            kind = layer_kind(layer.media_type)
            if kind is not None:
                exported = _proven_tar_export(image, layer, kind, tar_indexes)
                tar_built[layer.digest] = exported.index
                say(
                    args,
                    f"layer {layer.index} {layer.digest}: tar index of "
                    f"{len(exported.index.metadata)} bytes of metadata",
                )
                if kind != TAR and shelf.built(layer.digest, layer.size) is None:
                    # Indexing read the compressed blob through the cache: sealing it
                    # fetches nothing more, and the chunk table below is read from it.
                    with contextlib.suppress(CacheError):  # too large to keep: streamed
                        image.blob(layer).prefetch()
            record = image.store.lookup(layer.digest)
            if record is not None and record.sealed:
                index = build_layer_index(layer, image.blob(layer).read_for_pass)
                origin = "cache"
            elif (known := shelf.built(layer.digest, layer.size)) is not None:
                index, origin = known, "cache"
            else:
                source = RegistryBlob(image.client, image.repository, layer)
                index, origin = build_layer_index(layer, source.read_range), "registry"
            built[layer.digest] = index
            say(
                args,
                f"layer {layer.index} {layer.digest}: {index.chunk_count} "
                f"chunk{'' if index.chunk_count == 1 else 's'} indexed "
                f"(from the {origin})",
            )
        for index in built.values():
            shelf.put(index, built=True)
        if args.push:
            subject = subject_of(image.resolved, image.repository)
            # The artifact holds every layer's table: keep the others' when one is redone.
            tables = carried_over(
                "chunk index",
                lambda: fetch_indexes(image.client, subject, image.resolved.layers),
                {},
            )
            tables = _trusted_tables(shelf, image.resolved.layers, tables)
            tables.update(built)
            ordered = [tables[lay.digest] for lay in image.resolved.layers if lay.digest in tables]
            digest = push_indexes(image.client, subject, ordered)
            say(args, f"chunk index attached to {image.resolved.manifest_digest} as {digest}")
            if tar_built:
                layers = image.resolved.layers
                digest = push_tar_indexes(image.client, subject, layers, tar_built)
                if digest is not None:
                    say(args, f"tar index attached to {image.resolved.manifest_digest} as {digest}")
    finally:
        image.close()
    return 0
