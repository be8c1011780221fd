"""Open an image: resolve its reference, then serve its layers through the cache.

This is the one place that decides between the network and the cache for
metadata. Online, a reference is resolved at the registry and the result
(reference + platform -> manifest digest and layers, and the raw manifests)
is kept in the cache. Offline, or when the registry cannot be reached at all,
the kept result is used instead, so a cached image mounts with no network;
its layers are then served from the cache alone, and a chunk that is not
cached fails at once with EIO instead of waiting on a registry that is gone.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from pathlib import Path

from blockstore.attachments import (
    fetch_tar_index,
    indexes_for_image,
    subject_of,
    traces_for_image,
)
from blockstore.cache import CachedBlob, ChunkStore
from blockstore.cache.errors import OtherFormat
from blockstore.cache.holds import BlobHold
from blockstore.cache.indexes import IndexShelf
from blockstore.cache.layout import holds_cache
from blockstore.cache.write_lock_watch import unless_stuck
from blockstore.chunkindex import ChunkIndex
from blockstore.errors import (
    BlockstoreError,
    CacheError,
    CredentialHelperError,
    ImageNotCached,
    IntegrityError,
    InvalidReference,
    RegistryError,
    RegistryTLSMismatch,
    RegistryUnreachable,
    unavailable,
)
from blockstore.fetch import forks
from blockstore.indexed_source import IndexedSource
from blockstore.metrics import TimedSource
from blockstore.prefetch import PrefetchSettings
from blockstore.registry import (
    EROFS_MEDIA_TYPE,
    Layer,
    Reference,
    RegistryBlob,
    RegistryClient,
    RegistryOptions,
    ResolvedImage,
    parse_reference,
    resolve_image,
)
from blockstore.registry.digests import check_digest
from blockstore.registry.mediatypes import TAR, layer_kind
from blockstore.registry.platforms import Platform, host_platform
from blockstore.registry.referrers import Referrer, list_referrers
from blockstore.source import BlobSource
from blockstore.tarlayer.layerindex import TarIndex
from blockstore.tarlayer.layers import TarLayer, image_diff_ids, open_tar_layer
from blockstore.tarlayer.shared import index_from_blobs as tar_index_from_blobs
from blockstore.tarlayer.tree import TarLayerError

log = logging.getLogger(__name__)

SIZE_QUERIES = 8
"""Layer sizes asked of the registry at once when an image is opened."""


@dataclass(eq=False)  # an open resource: equal only to itself, and kept in weak sets
class OpenImage:
    """A resolved image whose layers can be read through one chunk store."""

    resolved: ResolvedImage
    store: ChunkStore
    repository: str
    client: RegistryClient | None
    """None when serving from the cache alone (offline or registry unreachable)."""
    prefetch: PrefetchSettings = field(default_factory=PrefetchSettings)
    chunk_indexes: dict[str, ChunkIndex] = field(default_factory=dict)
    """Per-chunk digests of layers, by layer digest, from the image's artifact."""
    _blobs: list[CachedBlob] = field(default_factory=list)
    _tar_layers: list[TarLayer] = field(default_factory=list)
    tar_indexes: dict[int, tuple[Path, Path | None]] = field(default_factory=dict)
    """Local indexes to use instead of building one: layer index -> (tarindex, zinfo)."""
    _diff_ids: list[str] | None = None
    _diff_ids_read: bool = False
    referrers: list[Referrer] = field(default_factory=list)
    """The artifacts attached to the image, listed once at open (online)."""
    shared_tar_indexes: bool = True
    """Take a tar layer's index from its attached artifact, after checks, before building."""
    _blob_sizes: dict[str, Future[int | None]] = field(default_factory=dict)
    """The registry's answer to each layer's HEAD, asked for at open (``ask_blob_sizes``)."""
    unreachable: RegistryUnreachable | RegistryError | None = None
    """Why the registry is not in use though it was asked for (None: online, or offline
    by choice): what a command that needs more than the cache holds should say."""
    _hold: BlobHold | None = None
    """Served from the cache alone: the image's hold, which keeps its record from
    ``cache rm`` while it is served (``ChunkStore.hold_image``)."""

    def __post_init__(self) -> None:
        if self.client is None:
            self._hold = self.store.hold_image(self.resolved.reference)

    @property
    def online(self) -> bool:
        return self.client is not None

    def select(self, layer: int | None = None, blob: str | None = None) -> list[Layer]:
        """The layers asked for: one by index or digest, else all, bottom first."""
        if layer is None and blob is None:
            return list(self.resolved.layers)
        return [self.resolved.select_layer(index=layer, digest=blob)]

    def exports(
        self, layer: int | None = None, blob: str | None = None
    ) -> list[CachedBlob | TarLayer]:
        """One export per selected layer, named ``layer<index>``: the blob itself (EROFS),
        or ``metadata || tar`` for a tar layer of any compression."""
        return [self.layer_export(chosen) for chosen in self.select(layer, blob)]

    def layer_export(self, layer: Layer) -> CachedBlob | TarLayer:
        """What a layer is served as, chosen by its media type."""
        kind = layer_kind(layer.media_type)
        if kind is None:
            if layer.media_type != EROFS_MEDIA_TYPE:
                log.warning(
                    "%s layer %d (%s) has media type %s, neither EROFS nor a tar: served "
                    "as its bytes are, which mounting reads as an EROFS image",
                    self.resolved.reference,
                    layer.index,
                    layer.digest,
                    layer.media_type or "(none)",
                )
            return self.blob(layer)
        tarindex, zinfo = self.tar_indexes.get(layer.index, (None, None))
        # The blob is a tar, not an EROFS image: the EROFS start and walk have nothing
        # to find in it (the metadata image they would read is the index's). A
        # compressed layer also fills as a whole (decompressed, sealed, its index
        # proven) and asks for its blob's bytes ahead itself, so its blob needs neither
        # of its own; nor a trace, since only the layer's passes and span pump read it.
        own = replace(self.prefetch, erofs_start=False, erofs_walk=False)
        if kind != TAR:
            own = replace(own, fill=False, readahead=False, trace_period=0, trace_replay=False)
        source, upstream = self._sources(layer)
        blob = self._cached_blob(layer, self._checked(layer, source, upstream), upstream, own)
        described = f"{self.resolved.reference} layer {layer.index} ({layer.digest}, {kind})"
        try:
            exported = open_tar_layer(
                self.store,
                blob,
                kind,
                online=self.online,
                diff_id=lambda: self.diff_id(layer),
                tarindex=tarindex,
                zinfo=zinfo,
                shared=lambda: self._shared_tar_index(layer, kind),
                settings=self.prefetch,
                source=source,
                name=f"layer{layer.index}",
                description=described,
            )
        except (TarLayerError, IntegrityError) as exc:
            # Said of the stream ("corrupt deflate stream..."): name the layer it is in.
            raise type(exc)(f"{described}: {exc}") from exc
        self._tar_layers.append(exported)
        return exported

    def _shared_tar_index(self, layer: Layer, kind: str) -> TarIndex | None:
        """The layer's index from the image's tar-index artifact, if it passes every check
        of ``tarlayer.shared``; None (with a warning when one was refused) otherwise."""
        if self.client is None or not self.shared_tar_indexes:
            return None
        try:
            subject = subject_of(self.resolved, self.repository)
            blobs = fetch_tar_index(self.client, subject, layer, self.referrers)
            if not blobs:
                return None
            return tar_index_from_blobs(
                blobs,
                layer_digest=layer.digest,
                layer_size=layer.size,
                kind=kind,
                diff_id=self.diff_id(layer) if kind != TAR else None,
            )
        except BlockstoreError as exc:
            log.warning(
                "%s layer %d: %s; building the index from the layer itself",
                self.resolved.reference,
                layer.index,
                exc,
            )
            return None

    def diff_id(self, layer: Layer) -> str | None:
        """The layer's diff_id from the image config, if the config is kept or online.
        A config that lists another number of them than the manifest has layers
        describes another image (containerd and docker refuse it too): refused."""
        raw = self.resolved.manifests.get(self.resolved.manifest_digest)
        if raw is None:
            return None
        if not self._diff_ids_read:
            self._diff_ids = image_diff_ids(raw, self._config)
            self._diff_ids_read = True
        ids, layers = self._diff_ids, len(self.resolved.layers)
        if ids is not None and len(ids) != layers:
            raise IntegrityError(
                f"{self.resolved.reference}: its config lists {len(ids)} diff_ids for its "
                f"{layers} layers (rootfs.diff_ids names each layer's tar): refused"
            )
        return ids[layer.index] if ids else None

    def _config(self, digest: str) -> bytes | None:
        """The image config named ``digest``, checked against it: kept in the cache after
        its first fetch (a digest names it for good), so a warm or offline open checks
        its layers' diff_ids with no round trip; not fetched again where resolving the
        image fetched it. None offline when it was never kept."""
        try:
            kept = self.store.images.manifest(digest)
        except CacheError:
            kept = None
        if kept is not None:
            try:
                check_digest(kept, digest, f"the kept config {digest}")
                return kept
            except IntegrityError as exc:
                log.warning("%s; fetching it again", exc)
        raw = self.resolved.configs.get(digest)  # fetched to judge the platform, checked
        if raw is None:
            if self.client is None:
                return None
            raw = self.client.get_blob(self.repository, digest, "config")  # checked against it
        try:
            self.store.images.put_manifest(digest, raw)
        except CacheError as exc:
            log.warning("%s: config not kept: %s", self.resolved.reference, exc)
        return raw

    def blob(self, layer: Layer) -> CachedBlob:
        """The layer's blob through the cache, with the image's prefetch settings."""
        source, upstream = self._sources(layer)
        return self._cached_blob(layer, self._checked(layer, source, upstream), upstream)

    def source(self, layer: Layer) -> BlobSource | None:
        """Where the layer's bytes come from, past the cache (None offline): for a look at
        a few bytes not worth keeping, such as a gzip trailer."""
        return self._sources(layer)[0]

    def _sources(self, layer: Layer) -> tuple[BlobSource | None, BlobSource | None]:
        """Where the layer's bytes come from (None offline), and its upstream past any
        mirror (None without mirrors)."""
        source = upstream = None
        if self.client is not None:
            self._check_size(layer)
            remote = RegistryBlob(self.client, self.repository, layer)
            source = TimedSource(remote)
            if self.client.mirrors:
                # A mirror may have sent bytes that fail the digest: the upstream decides.
                upstream = TimedSource(remote.from_upstream())
        return source, upstream

    def _checked(
        self, layer: Layer, source: BlobSource | None, upstream: BlobSource | None
    ) -> BlobSource | None:
        """``source`` checked chunk by chunk against the layer's chunk index, if it has
        one."""
        index = self.chunk_indexes.get(layer.digest)
        if source is None or index is None:
            return source
        return IndexedSource(
            source, index, upstream=upstream or source, on_lying_index=IndexShelf(self.store).drop
        )

    def _cached_blob(
        self,
        layer: Layer,
        source: BlobSource | None,
        upstream: BlobSource | None,
        settings: PrefetchSettings | None = None,
    ) -> CachedBlob:
        """``settings``: the image's prefetch settings unless others are given."""
        blob = CachedBlob(
            self.store,
            layer.digest,
            layer.size,
            source,
            upstream=upstream,
            name=f"layer{layer.index}",
            description=f"{self.resolved.reference} layer {layer.index} ({layer.digest})",
            settings=replace(settings or self.prefetch, lease_wait=self._lease_wait()),
        )
        self._blobs.append(blob)
        return blob

    def _lease_wait(self) -> float | None:
        """A read waits no longer for another process's fetch than for its own."""
        return self.client.options.timeout if self.client is not None else None

    def _check_size(self, layer: Layer) -> None:
        """Refuse a layer whose size in the manifest is not the blob's, before serving it.

        Otherwise every read near the end would fail (the registry's ranges
        disagree with the manifest), and a filesystem would find out mid-mount.
        """
        assert self.client is not None
        asked = self._blob_sizes.get(layer.digest)
        if asked is not None:
            actual = asked.result()
        else:
            actual = self.client.blob_size(self.repository, layer.digest, layer.size)
        if actual is not None and actual != layer.size:
            raise IntegrityError(
                f"{self.resolved.reference} layer {layer.index} ({layer.digest}): the manifest "
                f"says {layer.size} bytes, the registry holds {actual}: refused"
            )

    def ask_blob_sizes(self, layer: int | None = None, blob: str | None = None) -> None:
        """Send the HEAD of each layer ``select(layer, blob)`` names (all, by default)
        at once, for ``_check_size`` to take: beside the
        artifacts' lookup, they then cost the open one round trip in all, not one
        more, and none per layer in turn. The threads are daemons: a HEAD still
        waiting on a registry that stopped answering never holds the process."""
        if self.client is None:
            return
        layers = self.select(layer, blob)
        client, repository = self.client, self.repository
        forks.register(self)
        waiting = queue.SimpleQueue[tuple[str, int, Future[int | None]]]()
        for digest, size in sorted({(chosen.digest, chosen.size) for chosen in layers}):
            self._blob_sizes[digest] = asked = Future()
            waiting.put((digest, size, asked))

        def ask() -> None:
            while True:
                try:
                    digest, size, asked = waiting.get_nowait()
                except queue.Empty:
                    return
                if asked.set_running_or_notify_cancel():
                    try:
                        asked.set_result(client.blob_size(repository, digest, size))
                    except BaseException as exc:  # raised where the size is taken
                        asked.set_exception(exc)

        for _ in range(min(len(self._blob_sizes), SIZE_QUERIES)):
            threading.Thread(target=ask, name="blob-size", daemon=True).start()

    def forget_threads(self) -> None:
        """In a forked child: the HEADs still in flight were the parent's threads', and
        their answers never come here; ``_check_size`` asks again."""
        self._blob_sizes = {d: asked for d, asked in self._blob_sizes.items() if asked.done()}

    def cancel(self) -> None:
        """Fail every fetch in flight or to come at once, the cache left open: a stopping
        server's readers stuck on the registry are ended before it waits for them."""
        for asked in self._blob_sizes.values():
            asked.cancel()
        for blob in self._blobs:
            blob.cancel()

    def close(self) -> None:
        """Stop every layer's fetch and readahead threads, then close the cache.

        Each layer waits a bounded while for its fetches to store what they have:
        the layers are closed side by side, so a stalled registry costs that wait
        once, not once per layer. (A tar layer inflating a span from a blob closed
        meanwhile sees its fetch cancelled, as any reader of a closing blob does.)
        """
        self.cancel()
        layers = [*self._tar_layers, *self._blobs]
        # Left to the exit behind a write lock another process holds: the store says so.
        unless_stuck(lambda: self._close_layers(layers), self.store.write_lock_wait)
        if self.client is not None:
            self.client.close()
        if self._hold is not None:
            self._hold.release()
        self.store.close()

    @staticmethod
    def _close_layers(layers: list[TarLayer | CachedBlob]) -> None:
        """Each layer closed in a thread of its own, side by side."""
        threads = []
        for layer in layers:
            thread = threading.Thread(target=layer.close, name="close", daemon=True)
            try:
                thread.start()
            except RuntimeError:  # out of threads: this one is closed here, in turn
                layer.close()
            else:
                threads.append(thread)
        for thread in threads:
            thread.join()


def open_image(
    reference: str,
    *,
    cache_dir: Path,
    cache_size: int | None = None,
    platform: str | None = None,
    offline: bool = False,
    options: RegistryOptions | None = None,
    prefetch: PrefetchSettings | None = None,
    reading: tuple[int | None, str | None] = (None, None),
    replace_older: bool = False,
    check: Callable[[OpenImage], None] | None = None,
) -> OpenImage:
    """Resolve ``reference`` for ``platform`` online, or from the cache when offline.

    ``offline=True`` never opens a network connection. Online, a registry
    that cannot be reached at all falls back to the cached resolution, with
    a warning; any other registry answer (unknown image, wrong password) is
    an error, since the cache must not hide it. The returned image owns the
    opened cache: ``close()`` closes both. ``reading``: the layers the caller
    will serve (``OpenImage.select``'s arguments; all by default), whose sizes
    are asked for at once. ``check``: what the caller must know of the image before
    it uses it (a prefetch: that its layers fit the cap); failing, it fails the open.

    Online, the resolution is kept for offline opens once the open succeeded: an open
    that fails records no image the cache holds nothing of.
    """
    ref = parse_reference(reference)
    wanted = str(Platform.parse(platform) if platform else host_platform())
    fresh = not holds_cache(Path(cache_dir))
    if offline and fresh:
        # Opening would make an empty cache there, only to find the image not in it.
        raise ImageNotCached(
            f"offline: {reference} was never resolved here: there is no cache at {cache_dir}"
        )
    store = _open_store(Path(cache_dir), cache_size, offline, replace_older, ref, options)
    try:
        explicit = platform is not None
        image = _open(store, ref, wanted, offline, options or RegistryOptions(), explicit, fresh)
    except BaseException:
        store.close()
        raise
    if prefetch is not None:
        image.prefetch = prefetch
    try:
        # A layer the image lacks fails the open itself, so a cache made for it is undone.
        image.select(*reading)
        image.ask_blob_sizes(*reading)
        _attachments(image)
        if check is not None:
            check(image)
    except BaseException:
        image.close()
        raise
    if image.online and not store.read_only:  # a read-only cache keeps what it was shipped with
        _remember(store, image.resolved, wanted)
    return image


def _open_store(
    cache_dir: Path,
    cache_size: int | None,
    offline: bool,
    replace_older: bool,
    ref: Reference,
    options: RegistryOptions | None,
) -> ChunkStore:
    """The cache at ``cache_dir``. An older version's cache there is replaced only when
    ``replace_older`` (the caller will fill it: serve, prefetch) and the registry
    answers for the image, so there is something to fill it from; else it is refused
    and left as it is."""
    try:
        return ChunkStore(cache_dir, size_cap=cache_size, offline=offline)
    except OtherFormat as exc:
        if not (replace_older and exc.older and not offline):
            raise
        with RegistryClient(
            ref.registry, options or RegistryOptions(), repository=ref.repository
        ) as client:
            try:
                client.get_manifest(ref.repository, ref.manifest_ref)
            except RegistryUnreachable as down:
                raise OtherFormat(
                    f"{exc}; it is left as it is, as the registry cannot be reached to fill "
                    f"a new one ({down})",
                    older=True,
                ) from None
    return ChunkStore(cache_dir, size_cap=cache_size, replace_older=True)


def _attachments(image: OpenImage) -> None:
    """The image's chunk indexes (online or kept), and its attached traces on a cold open.

    Online, the image's referrers are listed once for both; a registry that
    cannot list them costs a warning, never the open.
    """
    referrers: list[Referrer] = []
    if image.client is not None:
        try:
            referrers = list_referrers(image.client, subject_of(image.resolved, image.repository))
        except BlockstoreError as exc:
            log.warning("%s: artifacts not looked up: %s", image.resolved.reference, exc)
    image.referrers = referrers
    client = image.client if referrers else None
    image.chunk_indexes = indexes_for_image(
        image.store, client, image.resolved, image.repository, referrers
    )
    if client is not None and image.prefetch.trace_replay:
        taken = traces_for_image(image.store, client, image.resolved, image.repository, referrers)
        if taken:
            log.info("%s: replaying %d attached trace(s)", image.resolved.reference, taken)


def _open(
    store: ChunkStore,
    ref: Reference,
    platform: str,
    offline: bool,
    options: RegistryOptions,
    explicit: bool,
    fresh: bool = False,
) -> OpenImage:
    """``explicit``: the user named the platform, so even a single-platform image must
    match it (its config is fetched to check); the host's default is not enforced.
    ``fresh``: the cache was made by this open, so it has nothing to fall back on."""
    if offline:
        return OpenImage(_cached(store, str(ref), platform), store, ref.repository, None)
    try:
        client = RegistryClient(ref.registry, options, repository=ref.repository)
    except CredentialHelperError as exc:
        return _without_login(store, ref, platform, exc)
    try:
        resolved = resolve_image(client, ref, platform, require_platform=explicit)
    except (RegistryUnreachable, RegistryError) as exc:
        client.close()
        if isinstance(exc, RegistryTLSMismatch):
            raise  # reached, with a wrong setting: the fix is the setting, not the cache
        if isinstance(exc, RegistryError) and not unavailable(exc):
            raise  # an answer about the image (unknown, refused), not a refusal to answer
        if fresh:
            raise RegistryUnreachable(
                f"{exc}, and {ref} was never resolved here: there was no cache at {store.path}"
            ) from exc
        resolved = _cached(store, str(ref), platform, cause=exc)
        # Said by the caller, in its own terms (``unreachable``): only a server serves.
        return OpenImage(resolved, store, ref.repository, None, unreachable=exc)
    except BaseException:
        client.close()
        raise
    return OpenImage(resolved, store, ref.repository, client)


def _without_login(
    store: ChunkStore, ref: Reference, platform: str, failed: CredentialHelperError
) -> OpenImage:
    """``ref`` as cached, its registry's login not had from the credential helper that
    keeps it (``failed``): a cloud helper cannot renew its token with the network down,
    when a cached image is all that is needed. ``failed`` itself where it is not cached."""
    if store.images.get(str(ref), platform) is None:
        raise failed
    resolved = _cached(store, str(ref), platform)
    return OpenImage(resolved, store, ref.repository, None, unreachable=failed)


def _remember(store: ChunkStore, resolved: ResolvedImage, platform: str) -> None:
    """Keep the resolution for offline opens; a cache that cannot take it costs only those."""
    try:
        for digest, raw in resolved.manifests.items():
            store.images.put_manifest(digest, raw)
        store.images.put(resolved.reference, platform, resolved.to_record())
    except CacheError as exc:
        log.warning("%s: not remembered for offline use: %s", resolved.reference, exc)


KEPT_NAMED = 10
"""Images of one repository a message names at most, as a registry's tags are."""


def kept_of_repository(store: ChunkStore, reference: str) -> str:
    """What the cache keeps of ``reference``'s repository, for a message saying the image
    is not kept: another tag, or another platform, is most often a slip (``:latest``
    asked offline where ``:v1`` was cached), and the names kept are its fix."""
    wanted = parse_reference(reference)
    repository = f"{wanted.registry}/{wanted.repository}"
    try:
        keys = store.images.kept()
    except CacheError:
        return f"what it keeps of {repository} cannot be read"
    kept = sorted(
        f"{name} ({platform})" if platform else name
        for name, platform in keys
        if _same_repository(wanted, name)
    )
    if not kept:
        return f"it keeps no image of {repository}"
    more = f" and {len(kept) - KEPT_NAMED} more" if len(kept) > KEPT_NAMED else ""
    return f"it keeps {', '.join(kept[:KEPT_NAMED])}{more}"


def _same_repository(wanted: Reference, name: str) -> bool:
    """Whether the image ``name`` is of ``wanted``'s repository, in the same registry."""
    try:
        kept = parse_reference(name)
    except InvalidReference:
        return False
    return (kept.registry, kept.repository) == (wanted.registry, wanted.repository)


def _cached(
    store: ChunkStore, reference: str, platform: str, cause: Exception | None = None
) -> ResolvedImage:
    record = store.images.get(reference, platform)
    if record is None:
        never = (
            f"{reference} ({platform}) is not in the cache at {store.path}: "
            f"never resolved with it, or removed (cache rm); {kept_of_repository(store, reference)}"
        )
        if cause is not None:
            raise RegistryUnreachable(f"{cause}, and {never}") from cause
        raise ImageNotCached(f"offline: {never}")
    try:
        return ResolvedImage.from_record(record)
    except (KeyError, TypeError, ValueError) as exc:
        raise CacheError(f"the cached record of {reference} is damaged: {exc!r}") from exc
