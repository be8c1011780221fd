"""The cache's integrity checks, each written once.

A stored chunk is ``checksum || bytes``. The checksum is an xxh3-64 of the
bytes, seeded with the chunk's identity (its blob's digest and its index),
so a value that lands under another key (a flipped bit in a B-tree key or
page) fails its check instead of being served as another chunk. A sealed
blob keeps every chunk's checksum; a chunk stored or fetched again later is
compared against it. Changing the algorithm means changing ``_xxh3`` and
``FORMAT``-bumping the cache, nothing else.
"""

from __future__ import annotations

import struct
from functools import lru_cache

import xxhash

from blockstore.export import Buffer

SUM = struct.Struct("<Q")
SUM_SIZE = SUM.size
_MASK = (1 << 64) - 1
_xxh3 = xxhash.xxh3_64_intdigest


@lru_cache(maxsize=1024)
def blob_seed(digest: str) -> int:
    """A blob's part of every chunk checksum: chunks of two blobs never check as each other."""
    return _xxh3(digest.encode())


def _chunk_sum(seed: int, index: int, data: Buffer) -> int:
    return _xxh3(data, (seed + index) & _MASK)


def chunk_sum(seed: int, index: int, data: Buffer) -> bytes:
    """The checksum stored with chunk ``index`` of the blob whose seed is ``seed``."""
    return SUM.pack(_chunk_sum(seed, index, data))


def stored_sum(value: Buffer) -> Buffer:
    """The checksum part of a stored value."""
    return value[:SUM_SIZE]


def stored_bytes(value: Buffer) -> Buffer:
    """The chunk bytes of a stored value."""
    return value[SUM_SIZE:]


def stored_length(value: Buffer) -> int:
    """How many chunk bytes a stored value holds."""
    return len(value) - SUM_SIZE


def intact(value: Buffer, seed: int, index: int, length: int) -> bool:
    """The chunk check: ``value`` is chunk ``index`` of this blob, ``length`` bytes, unchanged."""
    return len(value) == SUM_SIZE + length and SUM.unpack_from(value)[0] == _chunk_sum(
        seed, index, value[SUM_SIZE:]
    )


def matches_sealed(sums: Buffer, index: int, checksum: Buffer) -> bool:
    """The sealed check: ``checksum`` is the one chunk ``index`` had when its blob was sealed."""
    return sums[index * SUM_SIZE : (index + 1) * SUM_SIZE] == checksum


def fits_sealed(sums: Buffer, seed: int, index: int, data: Buffer) -> bool:
    """An arriving chunk's bytes are those its sealed blob vouched for."""
    return matches_sealed(sums, index, chunk_sum(seed, index, data))
