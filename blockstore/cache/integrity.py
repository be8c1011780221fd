"""The cache's integrity checks, each written once.

A stored chunk is ``checksums || bytes``: an xxh3-64 of the whole chunk and
one of each 4 KiB block, each seeded with what it covers (the blob's digest,
the chunk's index, the block's place). A value that lands under another key
(a flipped bit in a B-tree key or page) therefore fails its check instead
of being served as another chunk; a 4 KiB read checks the 4 KiB it serves,
a large one the whole chunk in one call. A sealed blob keeps, for every chunk, one
xxh3-64 of that chunk's checksums; a chunk stored or fetched again later is
compared against it. Changing the algorithm means changing ``_xxh3`` and
bumping the cache format, nothing else.
"""

from __future__ import annotations

import struct
from functools import lru_cache

import xxhash

from blockstore.export import Buffer

from .layout import CHUNK_SIZE, chunk_count

BLOCK = 4096
BLOCKS = CHUNK_SIZE // BLOCK
# Reads covering more than this much of a chunk check the chunk's one sum, not its blocks'.
WHOLE_FROM = 2 * BLOCK
_SUM = struct.Struct("<Q")
_SUMS = struct.Struct(f"<{1 + BLOCKS}Q")  # the whole chunk's, then each block's
SUM_SIZE = _SUMS.size  # the checksums in front of a stored chunk
SEALED_SIZE = _SUM.size  # what a sealed blob keeps for each chunk
_STRIDE = 1 + BLOCKS  # seeds used by one chunk
_MASK = (1 << 64) - 1
_xxh3 = xxhash.xxh3_64_intdigest
_unpack_sum = _SUM.unpack_from
_BLOCK_SHIFT = BLOCK.bit_length() - 1


@lru_cache(maxsize=1024)
def blob_seed(digest: str) -> int:
    """A blob's part of every checksum: chunks of two blobs never check as each other."""
    return _xxh3(digest.encode())


def _sum(data: Buffer, seed: int) -> int:
    """The one checksum algorithm."""
    return _xxh3(data, seed & _MASK)


def block_sum(seed: int, index: int, block: int, data: Buffer) -> int:
    """The checksum of 4 KiB block ``block`` of chunk ``index``: the one a chunk stores for
    it, and the one a part of the chunk (``parts``) stores."""
    return _sum(data, seed + index * _STRIDE + 1 + block)


def chunk_sum(seed: int, index: int, data: Buffer) -> bytes:
    """The checksums stored with chunk ``index`` of the blob whose seed is ``seed``."""
    view = memoryview(data)
    base = seed + index * _STRIDE
    return _SUMS.pack(
        _sum(view, base),
        *(_sum(view[b * BLOCK : (b + 1) * BLOCK], base + 1 + b) for b in range(BLOCKS)),
    )


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
    return len(value) == SUM_SIZE + length and value[:SUM_SIZE] == chunk_sum(
        seed, index, value[SUM_SIZE:]
    )


def checked_part(
    value: Buffer, seed: int, index: int, length: int, lo: int, hi: int
) -> memoryview | None:
    """Bytes ``lo..hi`` of stored chunk ``index`` (a view into ``value``), or None if the
    check of what they serve fails: the 4 KiB blocks they fall in, or for a large part of
    the chunk its one whole-chunk sum. The hit path's one call per chunk (``_sum``
    written out: a call costs as much as a 4 KiB hash)."""
    view = memoryview(value)
    if len(view) != SUM_SIZE + length:
        return None
    base = seed + index * _STRIDE
    if hi - lo > WHOLE_FROM:
        if _unpack_sum(view)[0] != _xxh3(view[SUM_SIZE:], base & _MASK):
            return None
        return view[SUM_SIZE + lo : SUM_SIZE + hi]
    end = SUM_SIZE + length
    for b in range(lo >> _BLOCK_SHIFT, ((hi - 1) >> _BLOCK_SHIFT) + 1):
        start = SUM_SIZE + (b << _BLOCK_SHIFT)
        stop = start + BLOCK
        block = view[start : stop if stop < end else end]
        if _unpack_sum(view, (1 + b) * _SUM.size)[0] != _xxh3(block, (base + 1 + b) & _MASK):
            return None
    return view[SUM_SIZE + lo : SUM_SIZE + hi]


_WHOLE_VALUE = SUM_SIZE + CHUNK_SIZE


def checked_chunks(values: list[Buffer], seed: int, first: int) -> list[memoryview] | None:
    """The bytes of stored chunks ``first``, ``first + 1``, ... of a blob, each a whole
    ``CHUNK_SIZE`` and checked by its one sum, as views into ``values``; None if one is
    short or fails its check. A sequential reader's hits cover whole chunks: one call
    for all of them, not ``checked_part`` for each (whose own steps cost a fifth of
    what a request's hashing does)."""
    out: list[memoryview] = []
    base = seed + first * _STRIDE
    for value in values:
        view = memoryview(value)
        if len(view) != _WHOLE_VALUE or _unpack_sum(view)[0] != _xxh3(
            view[SUM_SIZE:], base & _MASK
        ):
            return None
        out.append(view[SUM_SIZE:])
        base += _STRIDE
    return out


def sealed_entry(checksum: Buffer) -> bytes:
    """What a sealed blob keeps of one chunk's checksums."""
    return _SUM.pack(_xxh3(checksum))


_LIST_TAG = b"\x01"
"""Ends a sealed list that carries its own sum: one byte, so that no such list is a
whole number of entries long, as an older version's lists (which have no sum) are."""
_LIST_END = len(_LIST_TAG) + _SUM.size


def sealed_list(seed: int, size: int, entries: bytes) -> bytes:
    """What a sealed blob keeps: each chunk's entry (``sealed_entry``), then one sum of
    them all and of the blob's size, so that a bit flipped in either on the disk is
    found (``sealed_list_intact``) rather than refusing good chunks for good."""
    return entries + _LIST_TAG + _SUM.pack(_list_sum(seed, size, entries))


def sealed_list_intact(seed: int, size: int, value: Buffer) -> bool:
    """Whether ``value`` is a sealed list of a blob of ``size`` bytes whose sum holds.
    A list that is a whole number of entries long was kept by an older version, with
    no sum of its own: taken as it is if it has one entry for each chunk, there being
    nothing more to check it with."""
    chunks = chunk_count(size)
    if len(value) % SEALED_SIZE == 0:
        return len(value) == chunks * SEALED_SIZE
    end = chunks * SEALED_SIZE
    if len(value) != end + _LIST_END or value[end : end + len(_LIST_TAG)] != _LIST_TAG:
        return False
    entries = memoryview(value)[:end]
    return _unpack_sum(value, end + len(_LIST_TAG))[0] == _list_sum(seed, size, entries)


def _list_sum(seed: int, size: int, entries: Buffer) -> int:
    # Seeded below the blob's seed: no chunk or block sum of any blob uses that seed.
    hasher = xxhash.xxh3_64(seed=(seed - 1) & _MASK)
    hasher.update(_SUM.pack(size))
    hasher.update(entries)
    return hasher.intdigest()


def matches_sealed(sums: Buffer, index: int, checksum: Buffer) -> bool:
    """The sealed check: ``checksum`` is what chunk ``index`` had when its blob was sealed."""
    return sums[index * SEALED_SIZE : (index + 1) * SEALED_SIZE] == sealed_entry(checksum)


def fits_sealed(sums: Buffer, seed: int, index: int, data: Buffer) -> bool:
    """An arriving chunk's bytes are those its sealed blob vouched for."""
    return matches_sealed(sums, index, chunk_sum(seed, index, data))
