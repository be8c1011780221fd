"""What ``blockstore cache ls`` shows of each blob, read from the blob records alone.

A report over the store, not part of storing: it needs only a read
transaction, and its ``BlobInfo`` is what ``cache ls``, the cache's stats and
a mount's progress read of a blob.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from .env import CacheEnv
from .layout import CHUNK_SIZE, DB_BLOBS, BlobRecord


@dataclass
class BlobInfo:
    """One blob as ``blockstore cache ls`` shows it."""

    digest: str
    size: int
    chunks: int
    present: int
    cached_bytes: int
    sealed: bool
    pinned: bool
    last_use: float

    @property
    def cached_fraction(self) -> float:
        return self.present / self.chunks if self.chunks else 1.0

    def to_dict(self) -> dict:
        return {**asdict(self), "cached_fraction": self.cached_fraction}


def blob_infos(env: CacheEnv) -> list[BlobInfo]:
    """Every blob the cache keeps a record of (a damaged record raises ``CacheDamaged``)."""
    infos = []
    with env.reader(DB_BLOBS) as txn:
        for digest, raw in txn.cursor():
            record = BlobRecord.unpack(raw)
            infos.append(
                BlobInfo(
                    digest=bytes(digest).decode(),
                    size=record.size,
                    chunks=record.chunks,
                    present=record.present,
                    cached_bytes=min(record.size, record.present * CHUNK_SIZE),
                    sealed=record.sealed,
                    pinned=record.pinned,
                    last_use=record.last_use,
                )
            )
    return infos
