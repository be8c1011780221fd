"""``blockstore prefetch``: bring whole layers into the cache before they are needed.

A layer fetched whole is checked against its digest and sealed, so it can be
mounted later with no network. An interrupted prefetch keeps every chunk it
stored; running it again fetches only what is missing.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from typing import TYPE_CHECKING

from tqdm import tqdm

from blockstore.cache.errors import DiskFull, ReadOnlyCache
from blockstore.cache.indexes import IndexShelf
from blockstore.cli.common import (
    add_cache_options,
    add_image_options,
    add_registry_options,
    open_image_from_args,
    say,
)
from blockstore.errors import (
    BlockstoreError,
    CacheError,
    IntegrityError,
    NotCached,
    NotFound,
    RegistryUnreachable,
)
from blockstore.progress import human
from blockstore.registry.mediatypes import GZIP, layer_kind
from blockstore.tarlayer.gzindex import size_hint
from blockstore.tarlayer.layers import TarLayer

if TYPE_CHECKING:
    from collections.abc import Callable

    from blockstore.image import OpenImage
    from blockstore.registry.manifests import Layer

log = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    prefetch = subparsers.add_parser(
        "prefetch",
        help="fetch whole layers into the cache, verify and seal them",
        description="Fetch every layer of IMAGE (or one) into the cache, check each "
        "against its digest and seal it. Resumable: an interrupted run keeps what it "
        "fetched.",
    )
    add_image_options(prefetch, "fetch", offline=False)
    prefetch.add_argument("--pin", action="store_true", help="pin the layers against eviction")
    add_registry_options(prefetch)
    add_cache_options(prefetch)
    prefetch.set_defaults(func=run_prefetch)


def run_prefetch(args: argparse.Namespace) -> int:
    """SIGTERM ends a prefetch as Ctrl-C does: the chunks on their way are stored as the
    image closes, and the command says it was interrupted (exit 130), where the signal's
    default would end it at once, the chunks in flight lost, and nothing said."""
    previous = signal.signal(signal.SIGTERM, _interrupted)
    try:
        return _prefetch(args)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _interrupted(_signum: int, _frame: object) -> None:
    raise KeyboardInterrupt


def _prefetch(args: argparse.Namespace) -> int:
    image = open_image_from_args(args, replace_older=True, check=_can_keep(args))
    failed: list[tuple[Layer, BlockstoreError]] = []
    try:
        layers = image.select(args.layer, args.blob)
        for layer in layers:
            try:
                _prefetch_layer(args, image, layer)
            except BlockstoreError as exc:
                # A layer missing or wrong at the registry is that layer's fault alone:
                # the others are still fetched, so a rerun has only it left to fetch.
                if _layer_fault(exc) is None:
                    raise
                failed.append((layer, exc))
        if image.unreachable is not None:
            log.warning("%s; the layers were whole in the cache", image.unreachable)
    finally:
        image.close()
    if failed:
        raise _not_prefetched(failed, len(layers))
    return 0


def _not_prefetched(failed: list[tuple[Layer, BlockstoreError]], selected: int) -> BlockstoreError:
    """One error naming each layer that failed, of the first failure's kind (its exit
    code), saying the others were sealed."""
    said = "; ".join(f"layer {layer.index}: {exc}" for layer, exc in failed)
    if (sealed := selected - len(failed)) > 0:
        said += f"; the other {sealed} layer(s) were verified and sealed"
    first = failed[0][1]
    kind = NotFound if isinstance(_layer_fault(first), NotFound) else IntegrityError
    error = kind(said)
    error.__cause__ = first
    return error


def _layer_fault(exc: BaseException) -> BlockstoreError | None:
    """What makes ``exc`` one layer's fault and no other's, or None: the registry holds
    no such blob (404, met when its size is asked or under a read, whose ``EIO`` it
    causes) or its bytes fail its digest. An unreachable registry, a refused login or
    a full cache would fail every layer after it alike."""
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, NotFound | IntegrityError):
            return cause
        cause = cause.__cause__
    return None


def _prefetch_layer(args: argparse.Namespace, image: OpenImage, layer: Layer) -> None:
    """Fetch one layer whole, check it against its digest and seal it (and pin it)."""
    # A tar layer is filled as the tar it serves (uncompressed, sealed against
    # its diff_id), which also proves an index that came attached to the image.
    exported = image.layer_export(layer)
    size = exported.tar_size if isinstance(exported, TarLayer) else layer.size
    if args.pin:
        # Pinned first, so eviction cannot take chunks while the rest arrive.
        image.store.pin(layer.digest, layer.size)
        if isinstance(exported, TarLayer):
            image.store.pin(exported.digest, size)
    with tqdm(
        total=size,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        desc=f"layer {layer.index}",
        file=sys.stderr,
        disable=True if args.quiet else None,
    ) as bar:
        try:
            exported.prefetch(progress=bar.update)
        except NotCached as exc:
            if image.unreachable is None:
                raise
            # Not the cache's fault: the registry it needs is out of reach.
            raise RegistryUnreachable(
                f"{image.unreachable}; layer {layer.index} is not whole in the cache"
            ) from exc
    if layer.digest in image.chunk_indexes:
        # The layer is proven now: its attached chunk index must agree with it.
        wrong = IndexShelf(image.store).check_sealed(layer.digest, layer.size)
        if wrong:
            print(
                f"blockstore: the chunk index attached to {image.resolved.reference} "
                f"disagrees with layer {layer.index} at {len(wrong)} chunk(s): dropped",
                file=sys.stderr,
            )
    kept = exported.digest if isinstance(exported, TarLayer) else layer.digest
    if (changed := _changed_meanwhile(image, kept, args.pin)) is not None:
        raise CacheError(
            f"layer {layer.index} {layer.digest} was {changed} by another process "
            "while it was prefetched (cache rm, unpin or gc): run prefetch again"
        )
    if args.pin:
        image.store.images.mark_pinned(image.resolved.reference, True)
    pinned = ", pinned" if args.pin else ""
    say(
        args,
        f"layer {layer.index} {layer.digest} ({human(layer.size)}): verified and sealed{pinned}",
    )


def _can_keep(args: argparse.Namespace) -> Callable[[OpenImage], None]:
    """The open's check that the cache can keep every layer asked for: writable, and
    each layer whole under the cap (a pinned one, on the disk). A refusal comes before a byte of
    any layer is fetched, and fails the open: the image is not recorded, nor a cache
    made for it kept, for a prefetch that fetched nothing."""

    def check(image: OpenImage) -> None:
        store = image.store
        if store.read_only:
            raise ReadOnlyCache(
                f"the cache at {store.path} is read-only here ({store.read_only_because}): "
                "prefetch would have nowhere to keep what it fetches (give a writable "
                "--cache-dir)"
            )
        for layer in image.select(args.layer, args.blob):
            if args.pin:
                # Past the cap, not past the disk: a size the registry lies about (16 TiB)
                # is refused here, before a pin records it.
                if (why := store.no_room(layer.digest, layer.size)) is not None:
                    raise DiskFull(f"{why}; nothing was fetched or pinned")
            elif (why := _over_cap(image, layer)) is not None:
                raise CacheError(f"{why}; raise --cache-size or pin it (--pin)")

    return check


def _over_cap(image: OpenImage, layer: Layer) -> str | None:
    """Why ``layer`` cannot be kept whole under the cache's cap, asked before a byte of it
    is fetched, or None: the blob, and for gzip the tar as its trailer gives its size
    (modulo 4 GiB, so a larger one is caught later, by the fill). Opening a tar layer
    reads its blob whole to index it, which would evict other layers first."""
    store = image.store
    if (why := store.over_cap(layer.digest, layer.size)) is not None:
        return why
    if layer_kind(layer.media_type) != GZIP or (diff_id := image.diff_id(layer)) is None:
        return None
    # Read past the cache: kept, the trailer's chunk would keep a cache made for a refusal.
    if (source := image.source(layer)) is not None:
        return store.over_cap(diff_id, size_hint(source.read_range, layer.size))
    blob = image.blob(layer)  # served from the cache alone: what it holds of the blob
    try:
        tar_size = size_hint(lambda offset, length: b"".join(blob.read(offset, length)), layer.size)
    finally:
        blob.close()
    return store.over_cap(diff_id, tar_size)


def _changed_meanwhile(image: OpenImage, digest: str, pinned: bool) -> str | None:
    """How another process undid what a prefetch just made of blob ``digest`` (and of the
    image's record, without which no offline open finds the image), or None: a prefetch
    says it sealed and pinned only what is so when it says it."""
    record = image.store.lookup(digest)
    if record is None or not record.sealed:
        return "removed"
    if pinned and not record.pinned:
        return "unpinned"
    if not any(r.get("reference") == image.resolved.reference for r in image.store.images.all()):
        return "forgotten (its image record removed)"
    return None
