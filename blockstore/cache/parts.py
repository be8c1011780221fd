"""Parts of chunks: the 4 KiB blocks of a chunk that were read, kept without the rest.

A replayed access trace knows which blocks a mount will read, and most of
the chunks it touches are read in a block or two: fetching whole chunks
for it fetched twice the bytes it needed. Those blocks are kept as a part,
under the chunk's key in a database of their own, until the whole chunk
arrives (a demand read of a block the part lacks fetches it) and replaces
the part. A part is never a chunk: sealing, ``missing`` and the hit path's
one lookup see only whole chunks; a read that misses asks the parts before
it fetches.

A part is ``mask || sums || blocks``: a u64 whose bit ``b`` says block
``b`` is present, one checksum slot per block (the block sums of
``integrity``, 0 where absent), then the present blocks in order. The
header is as long as a chunk's checksums, so a part's stored length is
counted the same way. In the LRU index a part is its chunk key with
``PART_MARK`` after it, so eviction tells the two apart by length.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping

from blockstore.export import Buffer

from .integrity import BLOCK, BLOCKS, SUM_SIZE, block_sum

PART_MARK = b"p"
_HEADER = struct.Struct(f"<{1 + BLOCKS}Q")  # the mask, then each block's checksum
assert _HEADER.size == SUM_SIZE  # a part's stored length is counted like a chunk's
_SLOT = struct.Struct("<Q")


def part_lru_key(key: bytes) -> bytes:
    """What stands for the part of chunk ``key`` in the recency index."""
    return key + PART_MARK


def is_part_key(key: Buffer) -> bool:
    return len(key) == 17


def block_count(length: int) -> int:
    """The blocks of a chunk ``length`` bytes long (the last chunk may be short)."""
    return -(-length // BLOCK)


def blocks_of(lo: int, hi: int) -> range:
    """The blocks that bytes ``lo..hi`` of a chunk fall in."""
    return range(lo // BLOCK, (hi - 1) // BLOCK + 1)


def present(value: Buffer) -> int:
    """The mask of the blocks a stored part holds."""
    return _SLOT.unpack_from(value)[0]


def make(seed: int, index: int, length: int, blocks: Mapping[int, Buffer]) -> bytes:
    """The stored part of chunk ``index`` holding ``blocks`` (block number -> bytes)."""
    sums = [0] * (1 + BLOCKS)
    data = []
    for block in sorted(blocks):
        piece = blocks[block]
        if len(piece) != min(BLOCK, length - block * BLOCK):
            raise ValueError(f"block {block} of chunk {index} is {len(piece)} bytes")
        sums[0] |= 1 << block
        sums[1 + block] = block_sum(seed, index, block, piece)
        data.append(piece)
    return _HEADER.pack(*sums) + b"".join(data)


def blocks(value: Buffer, length: int) -> dict[int, memoryview]:
    """The blocks of a stored part (unchecked), by block number; {} if it is malformed."""
    view = memoryview(value)
    mask = present(view)
    out = {}
    at = SUM_SIZE
    for block in range(block_count(length)):
        if mask >> block & 1:
            size = min(BLOCK, length - block * BLOCK)
            out[block] = view[at : at + size]
            at += size
    return out if at == len(view) and mask >> block_count(length) == 0 else {}


def checked_slice(
    value: Buffer, seed: int, index: int, length: int, lo: int, hi: int
) -> memoryview | None:
    """Bytes ``lo..hi`` of chunk ``index`` from its stored part, if the part holds every
    block they fall in and those blocks pass their checks; else None."""
    view = memoryview(value)
    have = blocks(view, length)
    wanted = blocks_of(lo, hi)
    if not all(b in have for b in wanted):
        return None
    if not all(_holds(view, seed, index, b, have[b]) for b in wanted):
        return None
    start = SUM_SIZE + sum(len(piece) for b, piece in have.items() if b < wanted[0])
    skip = wanted[0] * BLOCK  # the blocks from ``wanted[0]`` on are stored side by side
    return view[start + lo - skip : start + hi - skip]


def intact(value: Buffer, seed: int, index: int, length: int) -> bool:
    """The part check: ``value`` is a well-formed part of chunk ``index``, every block it
    holds unchanged (and the slots of those it lacks empty, so any change shows)."""
    view = memoryview(value)
    have = blocks(view, length)
    unused = [b for b in range(BLOCKS) if b not in have]
    return (
        bool(have)
        and all(_holds(view, seed, index, b, piece) for b, piece in have.items())
        and not any(_SLOT.unpack_from(view, (1 + b) * _SLOT.size)[0] for b in unused)
    )


def _holds(view: memoryview, seed: int, index: int, block: int, piece: Buffer) -> bool:
    return _SLOT.unpack_from(view, (1 + block) * _SLOT.size)[0] == block_sum(
        seed, index, block, piece
    )


def merged(
    seed: int, index: int, length: int, old: Buffer | None, new: Mapping[int, Buffer]
) -> tuple[bytes | None, bytes | None]:
    """``(part, whole)``: what to keep once ``new`` blocks join the stored part ``old``.

    Old blocks that fail their check are dropped. When every block is there
    the chunk is ``whole`` and no part is kept.
    """
    kept: dict[int, Buffer] = {}
    if old is not None:
        view = memoryview(old)
        held = blocks(view, length).items()
        kept = {b: piece for b, piece in held if _holds(view, seed, index, b, piece)}
    kept.update(new)
    if len(kept) == block_count(length):
        return None, b"".join(bytes(kept[b]) for b in range(len(kept)))
    return make(seed, index, length, kept), None
