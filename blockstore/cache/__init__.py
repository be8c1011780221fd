"""The persistent, integrity-checked chunk cache between exports and blob sources.

``ChunkStore(path, size_cap)`` owns a cache directory (LMDB; several
processes may share it). ``CachedBlob(store, digest, size, source)`` is one
blob read through it: the ``Export`` the NBD frontend serves. Every chunk
served has passed its checksum, which binds its bytes to its blob and
index; complete blobs are sealed against their digest.

Modules: ``layout`` (keys, records), ``integrity`` (every check, once),
``env`` (opening LMDB, map growth, full disk), ``store``, ``refs``
(references and manifests kept for offline use), ``indexes`` (chunk indexes
kept beside them), ``traces`` (access traces kept per layer), ``blob``,
``parts`` (the 4 KiB blocks of a chunk that were read, kept without the
rest), ``leases`` (ranges being fetched, across processes), ``evict`` and
``recency`` (LRU), ``holds`` (layers served from the cache alone, kept from
eviction while served), ``seal`` (digests, verify), ``counters``,
``compact`` (giving freed pages back to the disk).
"""

from .blob import CachedBlob
from .errors import CacheDamaged, DiskFull
from .layout import CHUNK_SIZE
from .listing import BlobInfo
from .seal import VerifyReport
from .store import DEFAULT_SIZE_CAP, ChunkStore

__all__ = [
    "CHUNK_SIZE",
    "DEFAULT_SIZE_CAP",
    "BlobInfo",
    "CacheDamaged",
    "CachedBlob",
    "ChunkStore",
    "DiskFull",
    "VerifyReport",
]
