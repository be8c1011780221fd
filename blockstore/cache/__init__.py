"""The persistent, integrity-checked chunk cache between exports and blob sources."""

from .blob import CachedBlob
from .env import DiskFull
from .layout import CHUNK_SIZE
from .seal import VerifyReport
from .store import DEFAULT_SIZE_CAP, BlobInfo, ChunkStore

__all__ = [
    "CHUNK_SIZE",
    "DEFAULT_SIZE_CAP",
    "BlobInfo",
    "CachedBlob",
    "ChunkStore",
    "DiskFull",
    "VerifyReport",
]
