"""Chunk indexes kept in the cache, next to the manifests, so they hold offline too.

A table is kept by layer digest and parsed (checked against the layer it
names) on every load; a damaged or dropped one reads as absent. ``verify``
uses them to check the chunks of blobs that are not complete yet, which the
seal cannot judge.
"""

from __future__ import annotations

import hashlib
import logging

from blockstore.chunkindex import ChunkIndex
from blockstore.errors import BlockstoreError, CacheError

from .blob import CachedBlob
from .layout import CHUNK_SIZE
from .store import ChunkStore

log = logging.getLogger(__name__)

_REFUSED = b"refused "
"""Starts what a dropped table leaves in its place (a table starts with its magic)."""


class IndexShelf:
    """The chunk indexes of one cache directory: put, get, drop, and check by them."""

    def __init__(self, store: ChunkStore):
        self._store = store

    def put(self, index: ChunkIndex, *, built: bool = False) -> None:
        """Keep a table; a cache that cannot take it only warns (reads work without it).

        ``built``: made here from bytes checked against the layer digest, so that
        ``blockstore index`` may publish it again; a table an open takes from the
        registry is kept unmarked, and ``built`` never returns it.
        """
        raw = index.to_bytes()
        try:
            self._store.images.put_manifest(_key(index.layer_digest), raw)
            if built:
                mark = hashlib.sha256(raw).digest()
                self._store.images.put_manifest(_built_key(index.layer_digest), mark)
        except CacheError as exc:
            log.warning("chunk index of %s not kept in the cache: %s", index.layer_digest, exc)

    def built(self, layer_digest: str, size: int) -> ChunkIndex | None:
        """The kept table, if it is one this cache built (a table put since, as an open
        puts the registry's, no longer matches the mark)."""
        mark = self._store.images.manifest(_built_key(layer_digest))
        raw = self._store.images.manifest(_key(layer_digest))
        if not mark or not raw or hashlib.sha256(raw).digest() != mark:
            return None
        return self.get(layer_digest, size)

    def get(self, layer_digest: str, size: int) -> ChunkIndex | None:
        raw = self._store.images.manifest(_key(layer_digest))
        if not raw or raw.startswith(_REFUSED):  # never kept, or dropped as lying
            return None
        try:
            return ChunkIndex.from_bytes(
                raw, layer_digest=layer_digest, size=size, chunk_size=CHUNK_SIZE
            )
        except BlockstoreError as exc:
            log.warning("kept chunk index of %s is damaged, ignored: %s", layer_digest, exc)
            return None

    def drop(self, layer_digest: str) -> None:
        """Forget a table found to disagree with its layer. What is left in its place
        names it (its sha256), so that the same table attached to the image is not taken
        again at the next open (``refused``), while another attached since is."""
        key = _key(layer_digest)
        try:
            raw = self._store.images.manifest(key)
            if raw and not raw.startswith(_REFUSED):
                self._store.images.put_manifest(key, _refusal(raw))
        except CacheError as exc:
            log.warning("could not drop the chunk index of %s: %s", layer_digest, exc)

    def trusted(self, attached: ChunkIndex) -> ChunkIndex | None:
        """What stands for a table attached to the image: the one this cache built from
        verified bytes (none is truer), else the attached one, unless this cache found
        that very table to disagree with its layer."""
        own = self.built(attached.layer_digest, attached.size)
        if own is not None:
            return own
        return None if self.refused(attached) else attached

    def refused(self, index: ChunkIndex) -> bool:
        """Whether this very table was dropped here for disagreeing with its layer."""
        return self._store.images.manifest(_key(index.layer_digest)) == _refusal(index.to_bytes())

    def check_incomplete(self) -> list[tuple[str, int]]:
        """Check each cached chunk of each blob not complete yet against its kept index;
        drop the chunks that do not match. Returns those (digest, chunk index)."""
        bad: list[tuple[str, int]] = []
        for info in self._store.blobs():
            if info.sealed or info.present == info.chunks:
                continue  # the seal, or the coming one, judges the whole
            wrong = self._disagreeing(info.digest, info.size)
            if wrong:
                if not self._store.read_only:
                    self._store.drop_chunks(info.digest, wrong, recheck=False)
                bad += [(info.digest, i) for i in wrong]
        return bad

    def check_sealed(self, digest: str, size: int) -> list[int]:
        """For a sealed blob, whose bytes its digest has proven: the chunks its kept index
        disagrees with. Such an index lies (or was made for other bytes), so it is
        dropped; the chunks stay. Chunks fetched before the index was known were never
        checked by it, so this is the check that its table hashes to the layer."""
        record = self._store.lookup(digest)
        if record is None or not record.sealed:
            return []
        wrong = self._disagreeing(digest, size)
        if wrong:
            if not self._store.read_only:
                self.drop(digest)
            log.warning(
                "%s: the chunk index disagrees with the sealed layer at chunk(s) %s: %s",
                digest, ", ".join(map(str, wrong[:8])), self._store.fate,
            )  # fmt: skip
        return wrong

    def check_all_sealed(self) -> dict[str, list[int]]:
        """``check_sealed`` for every sealed blob that has a kept index."""
        found = {}
        for info in self._store.blobs():
            if info.sealed and (wrong := self.check_sealed(info.digest, info.size)):
                found[info.digest] = wrong
        return found

    def _disagreeing(self, digest: str, size: int) -> list[int]:
        """The cached chunks of a blob that its kept index does not match ([] if no index)."""
        index = self.get(digest, size)
        record = self._store.lookup(digest)
        if index is None or record is None:
            return []
        everything = range(index.chunk_count)
        present = sorted(set(everything) - set(self._store.missing(record.blob_id, everything)))
        blob = CachedBlob(self._store, digest, size, None)
        try:
            return [i for i in present if not _matches(blob, index, i)]
        finally:
            blob.close()


def _matches(blob: CachedBlob, index: ChunkIndex, number: int) -> bool:
    start = number * index.chunk_size
    length = min(index.chunk_size, index.size - start)
    buffers = blob.read_cached_for_pass(start, length, touch=False)
    if buffers is None:  # failed its own checksum: verify's chunk pass drops it
        return True
    digest = hashlib.sha256()
    for piece in buffers:
        digest.update(piece)
    return digest.digest() == index.expected(number)


def _refusal(table: bytes) -> bytes:
    return _REFUSED + hashlib.sha256(table).digest()


def _key(layer_digest: str) -> str:
    return f"chunk-index/{layer_digest}"


def _built_key(layer_digest: str) -> str:
    return f"chunk-index-built/{layer_digest}"
