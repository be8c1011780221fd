"""Open one image layer of a tar kind as a mountable export.

The layer kind comes from its media type. For a tar layer, the index comes
from the cache, from local files the user named (erofs-utils' ``oci.tarindex``
and ``oci.zinfo``), or is built now; then ``metadata || tar`` is served, the
tar part from the blob's own chunks (plain tar) or from span decompression
cached under the diff_id (gzip, zstd).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import NoReturn, Protocol, TypeVar

from blockstore.cache import CacheDamaged, CachedBlob, ChunkStore, DiskFull
from blockstore.errors import (
    BlobReadError,
    BlockstoreError,
    CacheError,
    IntegrityError,
    NotCached,
    UsageError,
)
from blockstore.export import Buffer
from blockstore.prefetch import PrefetchSettings
from blockstore.progress import Progress, human
from blockstore.registry.mediatypes import GZIP, TAR, ZSTD
from blockstore.registry.reference import digest_problem
from blockstore.source import BlobSource
from blockstore.tarlayer.alone import indexing_alone
from blockstore.tarlayer.erofs_reader import read_info, read_metadata
from blockstore.tarlayer.export import (
    DecompressedTar,
    PassFill,
    SpanFiller,
    SpanWriter,
    SpooledPassFill,
    TarLayerExport,
)
from blockstore.tarlayer.gzindex import DEFAULT_SPAN, Zinfo, inflated_size, size_hint
from blockstore.tarlayer.indexcache import IndexCache, cached_or_built
from blockstore.tarlayer.layerindex import (
    INDEX_FORMAT,
    DiffIdMismatch,
    ReadRange,
    SpanIndex,
    TarIndex,
    check_diff_id,
    index_compressed_tar,
    index_plain_tar,
)
from blockstore.tarlayer.pump import SpanBytes, SpanPump
from blockstore.tarlayer.tarwalk import RangeFile
from blockstore.tarlayer.tree import DamagedTar, TarLayerError

log = logging.getLogger(__name__)
T = TypeVar("T")

IDLE = 0.5
"""Seconds without reads after which a layer counts as idle."""
IDLE_WAIT = 30.0
"""Most seconds a filled layer's seal waits for the layer to be idle."""
_DEFAULT_SETTINGS = PrefetchSettings()
_NO_CHUNK_READAHEAD = PrefetchSettings(readahead=False)
"""The decompressed tar's own settings: the span pump is its readahead."""

_PROOF_STEP = 4 << 20


class LayerBlob(Protocol):
    """The layer's blob read through the cache (a ``CachedBlob``)."""

    @property
    def digest(self) -> str: ...

    @property
    def size(self) -> int: ...

    def read(self, offset: int, length: int) -> list[Buffer]: ...

    def read_for_pass(self, offset: int, length: int) -> list[Buffer]: ...

    def read_cached(self, offset: int, length: int) -> list[Buffer] | None: ...

    def read_cached_for_pass(self, offset: int, length: int) -> list[Buffer] | None: ...

    def cache(self, offset: int, length: int) -> None: ...

    def prefetch(self, progress: Callable[[int], None] | None = None) -> None: ...

    def seal_when_complete(self) -> None: ...

    def no_room(self) -> str | None: ...

    def close(self) -> None: ...


class Closing(Protocol):
    """Something a layer made and closes with it."""

    def close(self) -> None: ...


class TarLayer(TarLayerExport):
    """A tar layer's export, with the blob-like verbs ``prefetch`` and ``close``.

    A compressed layer has a ``SpanPump``: started by the first read of the
    export (span readahead) or at open (``fill``), it decompresses every span
    in the background; then, once the layer is idle, the tar is sealed
    against the diff_id and an index taken from the registry proven, as
    ``prefetch`` does.
    """

    def __init__(
        self,
        index: TarIndex,
        tar: LayerBlob,
        owned: list[Closing],
        check: SharedIndexCheck | None = None,
        pump: SpanPump | None = None,
        **names: str,
    ):
        """``check``: for an index taken from the registry, proves it against the tar
        once the tar is sealed (raises ``IntegrityError`` if it lies)."""
        super().__init__(index.metadata, tar, index.tar_size, **names)
        self.index = index
        self._tar_blob = tar
        self._owned = owned
        self._check = check
        self._pump = pump
        self._sealing = threading.Lock()
        self._started = threading.Event()
        self._stop = threading.Event()
        self._reads_lock = threading.Lock()
        self._reads_running = 0
        self._last_read = 0.0  # when the last read ended

    @property
    def digest(self) -> str:
        """The tar part's cache key: the blob digest (plain tar) or the diff_id."""
        return self._tar_blob.digest

    @property
    def tar_size(self) -> int:
        return self.index.tar_size

    def read(self, offset: int, length: int) -> list[Buffer]:
        self._reading()
        try:
            return super().read(offset, length)
        finally:
            self._read_done()

    def read_cached(self, offset: int, length: int) -> list[Buffer] | None:
        self._reading()
        try:
            return super().read_cached(offset, length)
        finally:
            self._read_done()

    def _reading(self) -> None:
        """Note the read; on the first one (a mount reads the superblock at once), start
        decompressing the whole layer in the background: span readahead."""
        with self._reads_lock:
            self._reads_running += 1
        if self._pump is not None and not self._started.is_set():
            self.fill()

    def _read_done(self) -> None:
        with self._reads_lock:
            self._reads_running -= 1
            self._last_read = time.monotonic()

    def fill(self) -> None:
        """Start filling the tar part in the background, once, then sealing and proving
        it as ``prefetch`` does; a failure is logged (an index that lied, as an error)."""
        with self._sealing:
            if self._started.is_set():
                return
            try:
                threading.Thread(target=self._fill, name="tar-fill", daemon=True).start()
            except RuntimeError as exc:  # out of threads: the readers fetch what they need
                log.info("%s: not filled in the background now: %s", self.digest, exc)
                return
            self._started.set()

    def _fill(self) -> None:
        filled = False
        try:
            if self._pump is not None and (
                why := self._tar_blob.over_cap() or self._tar_blob.no_room()
            ):
                # Reads inflate the spans they need: filled, a tar the cache cannot keep
                # would evict the rest of it, then its own first chunks, round after round.
                log.warning("%s; not filled, so nothing else is evicted for it", why)
                return
            filled = self._pump is None or self._checked(self._pump.run)
            if filled:
                self._wait_until_idle()
                if self._stop.is_set():
                    return
                self._seal(None)
                log.info("%s: filled and sealed", self.digest)
        except CacheDamaged as exc:  # lost as it was filled: nothing filled would be kept
            log.warning("%s: not filled, as the cache keeps nothing: %s", self.digest, exc)
        except BlockstoreError as exc:
            if not self._stop.is_set():
                log.error("%s: %s", self.description, exc)
        finally:
            if not filled and not self._stop.is_set():
                # The reads that fetch what the pump could not will complete the tar:
                # it is then sealed as any blob is, the moment it is whole.
                try:
                    self._tar_blob.seal_when_complete()
                except BlockstoreError as exc:  # the cache closed as the layer did
                    log.info("%s: not sealed when whole: %s", self.digest, exc)

    def _wait_until_idle(self) -> None:
        """Hold back work nobody waits for (sealing hashes the whole tar, proving an index
        parses every header) while the layer is being read, for ``IDLE_WAIT`` at most:
        on two cores it would slow the very reads the fill was for."""
        deadline = time.monotonic() + IDLE_WAIT
        while not self._stop.is_set():
            now = time.monotonic()
            with self._reads_lock:
                # A read waiting on a span is the layer in use, however long it waits.
                quiet = 0.0 if self._reads_running else now - self._last_read
            if quiet >= IDLE or now >= deadline:
                return
            self._stop.wait(min(IDLE - quiet, deadline - now))

    def prefetch(self, progress: Callable[[int], None] | None = None) -> None:
        """Fill the tar part whole, check it against its digest (the diff_id) and seal it;
        then prove an index that came from the registry against it."""
        if self._pump is not None:
            # Checked before a span is inflated, as a blob's prefetch checks before a
            # byte is fetched: each store of a tar too large for the cap or the disk
            # would evict.
            if (over := self._tar_blob.over_cap()) is not None:
                raise CacheError(f"{over}; raise --cache-size or pin it")
            if (no_room := self._tar_blob.no_room()) is not None:
                raise DiskFull(f"{no_room}; nothing was decompressed or evicted for it")
            self._checked(self._pump.run)
        self._seal(progress)

    def _seal(self, progress: Callable[[int], None] | None) -> None:
        with self._sealing:
            self._checked(lambda: self._tar_blob.prefetch(progress))
            if self._check is not None:
                self._check.prove(_read_all(self._tar_blob))
                self._check = None

    def _checked(self, fill: Callable[[], T]) -> T:
        """Run ``fill``; if the tar it makes fails its span digests or the diff_id while
        the index is one from the registry, find out whether the index lied."""
        try:
            return fill()
        except (IntegrityError, BlobReadError) as exc:
            if self._check is None or self._pump is None or self._stop.is_set():
                raise
            self._check.judge(exc)

    def close(self) -> None:
        """Close what this layer made (the decompressed tar); the blob is its opener's."""
        self._stop.set()
        if self._pump is not None:
            self._pump.stop()
        for blob in self._owned:
            blob.close()


def _read_all(blob: LayerBlob) -> Callable[[int, int], bytes]:
    """Reads of ``blob`` for the layer's own passes (index, proof, spans): what the
    mount reads is the export's reads, not these."""

    def read(offset: int, length: int) -> bytes:
        return b"".join(blob.read_for_pass(offset, length))

    return read


STREAM_AHEAD = 32 << 20
"""Bytes of a compressed blob asked for ahead of the indexing pass that reads it."""


def _streamed(blob: LayerBlob) -> Callable[[int, int], bytes]:
    """Reads of a blob read start to end, each asking for the next ``STREAM_AHEAD``
    bytes as prefetch first: the pass inflates while they come, whatever the blob's
    own readahead makes of its reads. How far it has got is said as it goes."""
    asked = 0
    progress = Progress(f"{blob.digest}: reading the layer once to index it", blob.size)

    def read(offset: int, length: int) -> bytes:
        nonlocal asked
        ahead = min(blob.size, offset + length + STREAM_AHEAD)
        if ahead > asked:
            start = max(asked, offset + length)
            blob.cache(start, ahead - start)
            asked = ahead
        progress.reached(offset + length)
        return b"".join(blob.read_for_pass(offset, length))

    return read


def _walked(blob: LayerBlob) -> Callable[[int, int], bytes]:
    """Reads of a plain tar's header walk, saying how far into the blob it has got: a
    layer of many files over a slow link is walked for minutes, a round trip at a time."""
    read = _read_all(blob)
    progress = Progress(f"{blob.digest}: reading the tar's headers to index it", blob.size)

    def walked(offset: int, length: int) -> bytes:
        progress.reached(offset)
        return read(offset, length)

    return walked


def local_index(
    tarindex: Path, zinfo: Path | None, blob: LayerBlob, kind: str, diff_id: str | None
) -> TarIndex:
    """An index from files the user named: an erofs-utils tar index, and its zinfo.

    The metadata image's structure is checked (every inode, directory and chunk
    address, as for an index taken from the registry), and that it describes a tar
    of the layer's tar's size: the blob's, or for gzip what the zinfo's last span
    inflates to (an index of another layer is the likely mistake, and it would
    serve that layer's file boundaries over this one's bytes). What it says of the
    files is the user's to vouch for. A zinfo carries
    no span digests, so spans read through it are not checked against anything
    until the whole tar is sealed against the diff_id.
    """
    if kind not in (TAR, GZIP):
        raise UsageError(
            "--tarindex (oci.tarindex) is taken for plain tar and gzip layers only; "
            f"this layer is {kind}"
        )
    if kind == GZIP and zinfo is None:
        raise UsageError(
            "--tarindex (oci.tarindex) for a gzip layer needs --zinfo (oci.zinfo) too "
            "(its checkpoints)"
        )
    metadata = tarindex.read_bytes()
    try:
        info = read_info(metadata)
        read_metadata(metadata)
    except (IntegrityError, TarLayerError) as exc:  # not an image, or not one of ours
        raise UsageError(f"--tarindex {tarindex}: {exc}") from exc
    tar_size = info.tar_blocks * 512
    if kind == TAR:
        if info.tar_blocks != -(-blob.size // 512):
            raise UsageError(
                f"--tarindex {tarindex}: it describes a tar of {tar_size} bytes, but "
                f"this layer's tar is {blob.size} bytes (an index of another layer?)"
            )
        return TarIndex(metadata, tar_size, None, blob.digest)
    if diff_id is None:
        raise UsageError("--zinfo (oci.zinfo) needs the layer's diff_id from the image config")
    try:
        parsed = Zinfo.from_bytes(zinfo.read_bytes())
        inflated = inflated_size(_read_all(blob), blob.size, parsed)
    except IntegrityError as exc:
        raise UsageError(f"--zinfo {zinfo}: not a zinfo of this layer: {exc}") from exc
    if info.tar_blocks != -(-inflated // 512):
        raise UsageError(
            f"--tarindex {tarindex}: it describes a tar of {tar_size} bytes, but this "
            f"layer's tar is {inflated} bytes (an index of another layer?)"
        )
    points = tuple((c.compressed, c.uncompressed) for c in parsed.checkpoints)
    spans = SpanIndex(GZIP, parsed.span, blob.size, tar_size, points, None, parsed)
    return TarIndex(metadata, tar_size, spans, diff_id)


def open_tar_layer(
    store: ChunkStore,
    blob: CachedBlob,
    kind: str,
    *,
    online: bool,
    diff_id: Callable[[], str | None],
    span: int = DEFAULT_SPAN,
    tarindex: Path | None = None,
    zinfo: Path | None = None,
    shared: Callable[[], TarIndex | None] | None = None,
    settings: PrefetchSettings = _DEFAULT_SETTINGS,
    source: BlobSource | None = None,
    name: str = "",
    description: str = "",
) -> TarLayer:
    """The export of one tar layer, its index taken from the cache, else from the
    registry (``shared``: the image's attached index, checked, or None), else built now.

    ``diff_id`` is asked when an index must be built, and to check a kept one
    (it may fetch the image config, which the cache then keeps). Offline, a layer
    with no sound index kept fails with ``NotCached``, unless its blob is sealed here:
    then the index is built again from the cache.
    ``blob`` stays the caller's to close. ``settings``: span readahead follows
    ``readahead``, and ``fill`` starts it at open. ``source``: the blob's own source,
    which spans checked by their own sha256 are then inflated from without storing the
    blob's bytes (``SpanBytes``); others (a local zinfo's) are read through ``blob``.
    """
    index, check = _find_index(
        store,
        blob,
        kind,
        online=online,
        diff_id=diff_id,
        span=span,
        tarindex=tarindex,
        zinfo=zinfo,
        shared=shared,
    )
    if index.spans is None:
        return TarLayer(index, blob, [], check, name=name, description=description)
    return _compressed_layer(
        store,
        blob,
        kind,
        index,
        check,
        online=online,
        settings=settings,
        source=source,
        name=name,
        description=description,
    )


def _find_index(
    store: ChunkStore,
    blob: CachedBlob,
    kind: str,
    *,
    online: bool,
    diff_id: Callable[[], str | None],
    span: int,
    tarindex: Path | None,
    zinfo: Path | None,
    shared: Callable[[], TarIndex | None] | None,
) -> tuple[TarIndex, SharedIndexCheck | None]:
    """The layer's index: from the files the user named, else kept in the cache, else
    attached to the image, else built now; and, for an attached one, what proves it."""
    if tarindex is not None:
        return local_index(tarindex, zinfo, blob, kind, diff_id() if zinfo else None), None
    cache = IndexCache(store)
    build = functools.partial(
        _build_index,
        store,
        cache,
        blob,
        kind,
        online=online,
        diff_id=diff_id,
        span=span,
        shared=shared,
    )
    while True:
        index = cached_or_built(
            cache,
            blob.digest,
            span,
            kind != TAR,
            functools.partial(_build_once_more_if_unproven, build, store, blob.digest, online),
            # This image's config must name the kept index's tar, as it must for one
            # built now: another image of the same blob may have left it.
            lambda kept: check_diff_id(kept.tar_digest, diff_id(), blob.digest),
            # A read-only cache keeps no index, and gets no lock file.
            contextlib.nullcontext
            if store.read_only
            else functools.partial(indexing_alone, store.path, blob.digest, span),
        )
        if cache.origin(blob.digest, span) == IndexCache.SHARED:
            return index, SharedIndexCheck(cache, blob, span, index)
        if kind != TAR or store.read_only or not cache.unproven(blob.digest, span):
            return index, None
        check = BuiltIndexCheck(cache, blob, span, index)
        if not _sealed(store, blob.digest):
            return index, check  # proven by the prefetch that seals the tar
        # Sealed since (by a prefetch, or reads that made it whole): proven now, once.
        try:
            check.prove(_read_all(blob))
        except IntegrityError as exc:
            log.warning("%s", exc)
            continue  # dropped: built again, from the sealed tar
        except (NotCached, BlobReadError) as exc:
            log.info("%s: its index is proven once the tar can be read: %s", blob.digest, exc)
            return index, check
        return index, None


def _sealed(store: ChunkStore, digest: str) -> bool:
    record = store.lookup(digest)
    return record is not None and record.sealed


def _build_index(
    store: ChunkStore,
    cache: IndexCache,
    blob: CachedBlob,
    kind: str,
    *,
    online: bool,
    diff_id: Callable[[], str | None],
    span: int,
    shared: Callable[[], TarIndex | None] | None,
) -> TarIndex:
    """An index for a layer the cache has none for: the one attached to the image, unless
    refused before, else one built by reading the layer: offline, only a layer this
    cache holds whole and sealed, whose every byte is here and checked."""
    if not online:
        if not _sealed(store, blob.digest):
            raise NotCached(_not_indexed_offline(cache, blob.digest))
        log.info(
            "%s: %s; built again from the layer, sealed in this cache",
            blob.digest,
            "its kept index is damaged" if cache.damaged is not None else "no index kept",
        )
    if kind == TAR:
        check_diff_id(blob.digest, diff_id())
    refused = cache.origin(blob.digest, span) == IndexCache.REFUSED
    if shared is not None and not refused and (found := shared()) is not None:
        log.info("%s: using the index attached to the image", blob.digest)
        # Marked before it is kept, so no crash can keep it unmarked (unproven).
        cache.set_origin(blob.digest, span, IndexCache.SHARED)
        return found
    read = _read_all(blob)
    if kind == TAR:
        # A header walk reads a few ranges of the blob, unproven until it is sealed:
        # marked before the index is kept, so no crash keeps it unmarked.
        if not store.read_only:  # which keeps no index either
            cache.set_unproven(blob.digest, span, not _sealed(store, blob.digest))
        return index_plain_tar(_walked(blob), blob.size, blob.digest)
    log.info("%s: reading the %s layer once to index it", blob.digest, kind)
    tar_digest = diff_id()
    # The tar is kept under its diff_id, which must not be the blob's own digest: a
    # config naming the compressed blob there (a pusher's mistake, refused once the
    # pass knows the tar's digest) would have the tar stored over the blob's record.
    kept_as = tar_digest if tar_digest != blob.digest else None
    keeper = _pass_fill(store, kind, kept_as, read, blob.size)
    built = None
    try:
        built = index_compressed_tar(
            RangeFile(_streamed(blob), blob.size),
            kind,
            blob_digest=blob.digest,
            diff_id=tar_digest,
            span=span,
            sink=keeper,
        )
    finally:
        if keeper is not None:
            keeper.finish(built.tar_size if built is not None else None)
    return built


def _not_indexed_offline(cache: IndexCache, digest: str) -> str:
    """Why an offline open of a tar layer not sealed here has no index to serve."""
    if cache.damaged is not None:
        return (
            f"{digest}: the index this cache kept of this tar layer is damaged "
            f"({cache.damaged} does not match its checksum), and offline it cannot be "
            "built again, as the layer is not whole in this cache; the next open with "
            "the registry reachable builds it again"
        )
    return (
        f"{digest}: this tar layer was never indexed in this cache by index "
        f"format {INDEX_FORMAT} (an older version's index is not used), and offline it "
        "cannot be, as the layer is not whole in this cache; the next open with the "
        "registry reachable indexes it"
    )


def _build_once_more_if_unproven(
    build: Callable[[], TarIndex], store: ChunkStore, digest: str, online: bool
) -> TarIndex:
    """``build()``; if the blob's bytes fail it, once more after dropping them from the
    cache when nothing had proven them."""
    try:
        return build()
    except DiffIdMismatch:
        raise  # the config is wrong, not the bytes: reading them again cannot help
    except (IntegrityError, DamagedTar) as exc:
        # Not an entry refused for what it holds (its header's checksum held):
        # the same bytes would be refused again.
        # A pass stopped short by bad bytes leaves them cached, never judged by the
        # blob's digest: every later pass would read them again and fail the same.
        if not online or not store.drop_unproven(digest):
            raise
        log.warning(
            "%s: %s; its cached bytes, never proven, are dropped and it is read "
            "once more from the registry",
            digest,
            exc,
        )
        return build()


def _compressed_layer(
    store: ChunkStore,
    blob: CachedBlob,
    kind: str,
    index: TarIndex,
    check: SharedIndexCheck | None,
    *,
    online: bool,
    settings: PrefetchSettings,
    source: BlobSource | None,
    name: str,
    description: str,
) -> TarLayer:
    """A gzip or zstd layer served from its decompressed tar: cached under the tar's
    digest, its spans inflated from the blob (or ``source``) as they are read, and, with
    readahead or fill, pumped ahead of the reads."""
    spans = index.spans
    assert spans is not None  # a compressed layer's index has its restart points
    if len(spans.points) == 1:
        log.info(
            "%s: one %s frame, no restart point inside it: the first read decompresses the "
            "whole layer once into the cache",
            blob.digest,
            kind,
        )
    digest, size = index.tar_digest, index.tar_size
    owned: list[Closing] = []
    compressed: ReadRange = _read_all(blob)
    hint = blob.cache
    if source is not None and online and spans.digests is not None:
        counters = store.counters
        span_bytes = SpanBytes(
            source,
            blob.read_cached_for_pass,
            lambda nbytes: counters.add(requests_fetched=1, bytes_fetched=nbytes),
        )
        compressed, hint = span_bytes.read, span_bytes.ahead
        owned.append(span_bytes)
    pumping = online and (settings.readahead or settings.fill)
    keep: Callable[[int, Buffer], None] = SpanFiller(store, digest, size)
    if pumping:
        keep = writer = SpanWriter(keep)
        owned.append(writer)
    inflated = DecompressedTar(
        spans, compressed, digest, keep, scratch=store.path, unkept=_span_over_cap(store, digest)
    )
    tar_blob = CachedBlob(
        store,
        digest,
        size,
        inflated if online else None,
        name=name,
        description=f"{description} (uncompressed)",
        settings=replace(_NO_CHUNK_READAHEAD, page_in=settings.page_in),
        # The pump's fill seals it once the layer is idle, not amid the reads that
        # completed it.
        seal_when_whole=not pumping,
    )
    pump = None
    if pumping:
        rate = settings.fill_rate if settings.fill else 0
        missing = functools.partial(store.missing_by_digest, digest)
        pump = SpanPump(
            inflated, missing, hint, writer.flush, store.lost, rate=rate, cache_dir=store.path
        )
    owned.insert(0, tar_blob)
    layer = TarLayer(index, tar_blob, owned, check, pump, name=name, description=description)
    if settings.fill and online:
        layer.fill()
    return layer


def _span_over_cap(store: ChunkStore, digest: str) -> Callable[[int], str | None]:
    """Why a span of the tar ``digest`` is not kept, by its length, or None: it is larger
    than the cache's cap (a zstd layer of one frame is one span, of the whole tar)."""

    def why(length: int) -> str | None:
        if store.over_cap(digest, length) is None:
            return None
        return f"a span of {human(length)} is larger than {store.kept_to()}"

    return why


def _pass_fill(
    store: ChunkStore, kind: str, tar_digest: str | None, read: ReadRange, blob_size: int
) -> PassFill | SpooledPassFill | None:
    """What stores the tar as the indexing pass of a gzip or zstd layer makes it, when its
    tar is not sealed yet. For gzip the tar's size is guessed from the trailer and the tar
    stored as it comes; zstd names no size for the whole stream, nor does a gzip trailer
    of 0 (an empty last member, as eStargz's footer is), so that tar is spooled and
    stored once the pass knows it. Chunks of an earlier pass that never finished are
    dropped first: nothing vouched for them."""
    if kind not in (GZIP, ZSTD) or tar_digest is None:
        return None
    record = store.lookup(tar_digest)
    if record is not None and record.sealed:
        return None
    size = (size_hint(read, blob_size) or None) if kind == GZIP else None
    if record is not None:
        store.remove(tar_digest)
    if size is not None:
        if (why := store.cannot_keep_whole(tar_digest, size)) is not None:
            log.warning(
                "%s; not kept from its indexing pass, so nothing else is evicted for it", why
            )
            return None
        return PassFill(store, tar_digest, size)
    try:
        return SpooledPassFill(store, tar_digest, store.path)
    except OSError as exc:
        log.warning("%s: the tar is not kept from its indexing pass: %s", tar_digest, exc)
        return None


class SharedIndexCheck:
    """Holds an index taken from the registry to the layer it claims to describe.

    The writer is deterministic, so the metadata image rebuilt from the
    verified tar's headers must be the same bytes; each span's recorded
    sha256 must be that of the verified tar's bytes. Then the index is known
    to be the one this engine would build (its gzip windows need no check of
    their own: whatever they decompress to is held to the proven digests).
    A lie drops the index, so the next open builds one from the layer.
    """

    def __init__(self, cache: IndexCache, blob: LayerBlob, span: int, index: TarIndex):
        self._cache = cache
        self._blob = blob
        self._span = span
        self._index = index

    def prove(self, read: ReadRange) -> None:
        """Check the index against the sealed tar ``read`` reads."""
        index = self._index
        rebuilt = index_plain_tar(read, index.tar_size, index.tar_digest)
        spans = index.spans
        honest = rebuilt.metadata == index.metadata and (
            spans is None
            or spans.digests is None
            or all(
                _sha256(read, *spans.bounds(i)) == spans.digests[i]
                for i in range(len(spans.points))
            )
        )
        if not honest:
            raise self._refuse("its metadata or span digests are not those of the tar")
        self._proven()

    def _proven(self) -> None:
        self._cache.set_origin(self._blob.digest, self._span, IndexCache.PROVEN)
        log.info("%s: the index attached to the image is proven against the tar", self._blob.digest)

    def judge(self, failure: Exception) -> NoReturn:
        """The tar made through the index failed a span digest or the diff_id: if the
        layer's own blob hashes to its digest, the index lied (refused, raised); else the
        blob's bytes were wrong, and that is raised instead."""
        blob = self._blob
        actual = "sha256:" + _sha256(_read_all(blob), 0, blob.size).hex()
        if actual != blob.digest:
            raise IntegrityError(f"{blob.digest}: the layer's bytes hash to {actual}")
        raise self._refuse(str(failure)) from failure

    def _refuse(self, why: str) -> IntegrityError:
        digest = self._blob.digest
        self._cache.drop(digest, self._span)
        self._cache.set_origin(digest, self._span, IndexCache.REFUSED)
        return IntegrityError(
            f"{digest}: the index attached to the image does not describe this layer's tar "
            f"({why}): dropped; the next open builds one from the layer itself"
        )


class BuiltIndexCheck(SharedIndexCheck):
    """Holds a plain tar layer's index built here, from bytes read before they were
    proven, to the tar once it is sealed. A registry that served another blob of the
    same length (or bytes spoilt on the way) would otherwise leave the index of that
    other tree kept for good, served over the right bytes once they are sealed."""

    def _proven(self) -> None:
        self._cache.set_unproven(self._blob.digest, self._span, False)
        log.info("%s: its index is proven against the sealed tar", self._blob.digest)

    def _refuse(self, why: str) -> IntegrityError:
        digest = self._blob.digest
        self._cache.drop(digest, self._span)
        self._cache.set_unproven(digest, self._span, False)
        return IntegrityError(
            f"{digest}: the index built from this layer's bytes before they were proven "
            f"does not describe its tar ({why}): dropped, to be built again from the tar"
        )


def _sha256(read: ReadRange, start: int, end: int) -> bytes:
    """The sha256 of bytes ``start``-``end`` read in steps (a single-frame zstd layer's
    one span is its whole tar; a blob is hashed whole)."""
    digest = hashlib.sha256()
    for offset in range(start, end, _PROOF_STEP):
        digest.update(read(offset, min(_PROOF_STEP, end - offset)))
    return digest.digest()


def image_diff_ids(manifest: bytes, config_of: Callable[[str], bytes | None]) -> list[str] | None:
    """The ``rootfs.diff_ids`` of the config a manifest names, got with ``config_of``
    (given the config's digest: its bytes, checked against it, or None if unavailable).

    They name each layer's uncompressed tar; an index is built only from a
    layer whose tar hashes to its diff_id. None where the config is unavailable or
    has no list of them; a list of none is [], which a layer's count is held to. A
    list with an entry that is not a digest is a config that lies: ``IntegrityError``.
    """
    try:
        config_digest = json.loads(manifest)["config"]["digest"]
        if not isinstance(config_digest, str):
            raise TypeError(config_digest)
    except (ValueError, KeyError, TypeError, AttributeError):
        return None
    config = config_of(config_digest)
    if config is None:
        return None
    try:
        ids = json.loads(config)["rootfs"]["diff_ids"]
    except (ValueError, KeyError, TypeError):
        return None
    except RecursionError:  # a config built to crash its reader: it lies
        raise IntegrityError(
            f"the image config {config_digest} is nested too deeply: refused"
        ) from None
    if not isinstance(ids, list):
        return None
    for position, entry in enumerate(ids):
        # Dropping a bad entry would shift every later layer onto another's tar.
        why = digest_problem(entry) if isinstance(entry, str) else "not a string"
        if why is not None:
            raise IntegrityError(
                f"the image config {config_digest}: rootfs.diff_ids[{position}] is "
                f"{json.dumps(entry)[:80]}, not a digest ({why}): refused"
            )
    return ids
