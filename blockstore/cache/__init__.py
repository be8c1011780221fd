"""The persistent, integrity-checked chunk cache between exports and blob sources.

``ChunkStore(path, size_cap)`` owns a cache directory (LMDB; several
processes may share it). ``CachedBlob(store, digest, size, source)`` is one
blob read through it: the ``Export`` the NBD frontend serves. Every chunk
served has passed its checksum, which binds its bytes to its blob and
index; complete blobs are sealed against their digest.

Modules, from the bottom up:

- the file: ``layout`` (the directory's files, keys, records),
  ``integrity`` (every check, once), ``errors`` (what a cache raises);
- opening it: ``env`` (the one place that opens LMDB: map growth,
  renewal, forks, reader slots), ``damage`` (a file that must not be
  mapped; moving a cache aside), ``write_access`` (whether this process may
  write it, and whether another does), ``in_use`` (the claim compaction
  waits for), ``gate`` (transactions against a resize), ``write_lock_watch``
  (long waits for the write lock);
- keeping chunks: ``store``, ``capacity`` (the size cap, the disk's room,
  eviction to keep to both), ``evict`` and ``recency`` (LRU), ``holds``
  (layers served from the cache alone, kept from eviction while served),
  ``parts`` (the 4 KiB blocks of a chunk that were read, kept without the
  rest), ``seal`` (digests, verify), ``counters``, ``listing`` (what
  ``cache ls`` shows);
- beside the chunks: ``refs`` (references and manifests kept for offline
  use), ``indexes`` (chunk indexes kept beside them), ``traces`` (access
  traces kept per layer);
- reading: ``blob``, ``leases`` (ranges being fetched, across processes),
  ``warmup`` (what a cold open fetches before it is asked: the EROFS start,
  the directory walk, a trace's replay, the background fill),
  ``walk_reader`` (the directory walk's reads), ``pagein`` (a served blob's
  chunks paged in from the cache file ahead of its reader);
- ``compact`` (giving freed pages back to the disk).
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
