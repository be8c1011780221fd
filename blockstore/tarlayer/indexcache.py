"""A tar layer's index kept in the cache: its EROFS metadata image and span index.

Kept beside the image records, keyed by blob digest, index format and span,
each record stored with its sha256 and checked on every load: a damaged one
reads as absent (or as the safe value of a mark), so the index is built again
rather than trusted.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Protocol

from blockstore.errors import CacheError, IntegrityError
from blockstore.tarlayer.gzindex import DEFAULT_SPAN
from blockstore.tarlayer.layerindex import INDEX_FORMAT, SpanIndex, TarIndex

if TYPE_CHECKING:
    from blockstore.cache import ChunkStore

log = logging.getLogger(__name__)

_DIGEST = 80  # room for "sha256:" and 64 hex digits in a cached index record


class KeyValueStore(Protocol):
    """Somewhere durable for named byte strings (the cache's image records answer it)."""

    def put_manifest(self, digest: str, raw: bytes) -> None: ...

    def manifest(self, digest: str) -> bytes | None: ...

    def drop_manifests(self, prefix: str, keep: Callable[[str], bool]) -> int: ...

    def manifest_names(self, prefix: str) -> list[str]: ...


class IndexCache:
    """Metadata images and span indexes kept in the cache, checked on every load."""

    def __init__(self, store: ChunkStore):
        self._store: KeyValueStore = store.images
        self._making_room = store.making_room
        self.damaged: str | None = None
        """The key of the last kept record found not to match its checksum, if any."""

    @staticmethod
    def _key(blob_digest: str, span: int, part: str) -> str:
        return f"tarlayer/v{INDEX_FORMAT}/span{span}/{blob_digest}/{part}"

    def _put(self, key: str, *parts: bytes) -> None:
        """Keep ``parts`` joined behind their sha256, copied once: a gzip layer's span
        index holds its windows, tens of MB, and its metadata image may be as large."""
        digest = hashlib.sha256()
        for part in parts:
            digest.update(part)
        self._store.put_manifest(key, b"".join((digest.digest(), *parts)))

    def _get(self, key: str, *, if_damaged: bytes | None = None) -> bytes | None:
        """The record under ``key``; None if absent. One that fails its checksum reads
        as ``if_damaged``: absent, unless a mark says what is safe to assume of it."""
        raw = self._store.manifest(key)
        if raw is None:
            return None
        data = raw[32:]
        if hashlib.sha256(data).digest() != raw[:32]:
            log.warning("cached %s does not match its checksum: not used", key)
            self.damaged = key
            return if_damaged
        return data

    def save(self, blob_digest: str, span: int, index: TarIndex) -> None:
        """Keep ``index``; on a full disk, after making room. Raises ``CacheError``
        when it cannot be kept. What an older index format kept for the blob goes: it
        is never read again, as its rules are not this engine's."""
        self._making_room(lambda: self._save(blob_digest, span, index))
        try:
            dropped = self._store.drop_manifests(
                "tarlayer/v", lambda key: not _older_index_of(key, blob_digest)
            )
        except CacheError as exc:  # the index is kept; the old ones wait for next time
            log.info("%s: older indexes not dropped: %s", blob_digest, exc)
            return
        if dropped:
            log.info("%s: dropped its index kept by an older index format", blob_digest)

    def _save(self, blob_digest: str, span: int, index: TarIndex) -> None:
        if index.spans is not None:
            self._put(self._key(blob_digest, span, "spans"), *index.spans.parts())
        head = index.tar_size.to_bytes(8, "little") + index.tar_digest.encode().ljust(
            _DIGEST, b"\0"
        )
        self._put(self._key(blob_digest, span, "meta"), head, index.metadata)

    SHARED, PROVEN, REFUSED = b"shared", b"proven", b"refused"

    def set_origin(self, blob_digest: str, span: int, origin: bytes) -> None:
        """Remember where the kept index came from: the registry, not yet proven
        (``SHARED``), proven against the sealed tar (``PROVEN``), or an attached index
        found lying, never to be taken again for this layer (``REFUSED``)."""
        self._put(self._key(blob_digest, span, "origin"), origin)

    def origin(self, blob_digest: str, span: int) -> bytes | None:
        """A damaged mark reads as ``SHARED``: the index is then proven before it is
        trusted, where reading it as absent (built here) would trust an attached one."""
        return self._get(self._key(blob_digest, span, "origin"), if_damaged=self.SHARED)

    def set_unproven(self, blob_digest: str, span: int, unproven: bool) -> None:
        """Remember that the kept index of a plain tar layer was built from its bytes
        before they were proven against its digest (a header walk reads a few ranges),
        so that it is proven against the tar once that is sealed; or forget it."""
        self._put(self._key(blob_digest, span, "unproven"), b"y" if unproven else b"")

    def unproven(self, blob_digest: str, span: int) -> bool:
        """A damaged mark reads as unproven: proving a sound index costs one pass, while
        trusting one built from another blob's bytes would serve its tree for good."""
        return self._get(self._key(blob_digest, span, "unproven"), if_damaged=b"y") == b"y"

    def drop(self, blob_digest: str, span: int) -> None:
        """Forget the kept index (an empty record reads as absent), so it is built again."""
        self._put(self._key(blob_digest, span, "meta"), b"")

    def damaged_records(self) -> list[str]:
        """For ``cache verify``: the names of the kept records that fail their checksum."""
        found = []
        for key in self._store.manifest_names("tarlayer/v"):
            self.damaged = None
            self._get(key)
            if self.damaged is not None:
                found.append(key)
        return found

    def heal(self, names: list[str]) -> None:
        """Put back what the reads of damaged records assume, so the next open pays
        nothing for them: an index whose metadata or span index is damaged is dropped,
        to be built again; a damaged mark is set to the safe value it reads as."""
        for key in names:
            head, _, part = key.rpartition("/")
            if part == "origin":
                self._put(key, self.SHARED)
            elif part == "unproven":
                self._put(key, b"y")
            else:
                self._put(f"{head}/meta", b"")

    def tar_digest(self, blob_digest: str, span: int = DEFAULT_SPAN) -> str | None:
        """The digest of the tar the kept index serves (the layer's diff_id), if one is kept."""
        meta = self._meta(blob_digest, span)
        return meta[1] if meta is not None else None

    def load(self, blob_digest: str, span: int, compressed: bool) -> TarIndex | None:
        """The cached index, or None if absent or damaged (then it is built again)."""
        meta = self._meta(blob_digest, span)
        if meta is None:
            return None
        spans = None
        if compressed:
            raw = self._get(self._key(blob_digest, span, "spans"))
            if raw is None:
                return None
            try:
                spans = SpanIndex.from_bytes(raw)
            except IntegrityError:
                return None
        tar_size, tar_digest, metadata = meta
        return TarIndex(metadata, tar_size, spans, tar_digest)

    def _meta(self, blob_digest: str, span: int) -> tuple[int, str, bytes] | None:
        """The kept index's tar size, tar digest and metadata image."""
        meta = self._get(self._key(blob_digest, span, "meta"))
        if meta is None or len(meta) < 8 + _DIGEST:
            return None
        tar_digest = meta[8 : 8 + _DIGEST].rstrip(b"\0").decode()
        return int.from_bytes(meta[:8], "little"), tar_digest, meta[8 + _DIGEST :]


def _older_index_of(key: str, blob_digest: str) -> bool:
    """Whether ``key`` is a record of ``blob_digest``'s index kept by an older index
    format than this engine's (a newer one's is a newer version's, sharing the cache)."""
    version, _, rest = key.removeprefix("tarlayer/v").partition("/")
    return version.isdigit() and int(version) < INDEX_FORMAT and f"/{blob_digest}/" in f"/{rest}"


def cached_or_built(
    cache: IndexCache,
    blob_digest: str,
    span: int,
    compressed: bool,
    build: Callable[[], TarIndex],
    check_kept: Callable[[TarIndex], None] = lambda index: None,
    alone: Callable[[], AbstractContextManager[object]] = contextlib.nullcontext,
) -> TarIndex:
    """The layer's index from the cache, judged by ``check_kept`` (it may have been kept
    by another image of the same blob), or built now and stored for next time (one that
    cannot be kept, as on a full disk, is served all the same and built again next time).
    ``alone``: held while it is looked for once more and built, so that a process that
    finds another building it takes that one's index rather than build it again."""
    index = cache.load(blob_digest, span, compressed)
    if index is None:
        with alone():
            index = cache.load(blob_digest, span, compressed)
            if index is None:
                index = build()
                try:
                    cache.save(blob_digest, span, index)
                except CacheError as exc:
                    log.warning("%s: its index is served but not kept: %s", blob_digest, exc)
                return index
    check_kept(index)
    return index
