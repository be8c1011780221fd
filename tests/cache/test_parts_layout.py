"""The layout and checks of parts of chunks, on generated blocks and damage (no LMDB)."""

from __future__ import annotations

import random

from hypothesis import given
from hypothesis import strategies as st

from blockstore.cache import parts
from blockstore.cache.integrity import BLOCK, BLOCKS, SUM_SIZE, blob_seed

SEED = blob_seed("sha256:" + "5" * 64)


@st.composite
def stored_parts(draw):
    """A chunk (possibly the short last one), the blocks a part of it holds, and its bytes."""
    length = draw(st.sampled_from([BLOCKS * BLOCK, 5 * BLOCK + 123, 2 * BLOCK, BLOCK + 1]))
    index = draw(st.integers(0, 1000))
    data = random.Random(draw(st.integers(0, 2**32))).randbytes(length)
    count = parts.block_count(length)
    held = draw(st.sets(st.integers(0, count - 1), min_size=1, max_size=count - 1))
    blocks = {b: data[b * BLOCK : (b + 1) * BLOCK] for b in held}
    return length, index, data, blocks


@given(stored_parts(), st.data())
def test_a_part_serves_exactly_the_bytes_of_the_blocks_it_holds(case, draw):
    """Tried: any range of a chunk read from a part of it. Must hold: the chunk's own
    bytes when every block the range touches is held, None otherwise."""
    length, index, data, blocks = case
    value = parts.make(SEED, index, length, blocks)
    lo = draw.draw(st.integers(0, length - 1))
    hi = draw.draw(st.integers(lo + 1, length))
    got = parts.checked_slice(value, SEED, index, length, lo, hi)
    if all(b in blocks for b in parts.blocks_of(lo, hi)):
        assert got is not None and bytes(got) == data[lo:hi]
    else:
        assert got is None
    assert parts.intact(value, SEED, index, length)
    assert len(value) - SUM_SIZE == sum(len(b) for b in blocks.values())


@given(stored_parts(), st.data())
def test_a_changed_byte_or_key_is_never_served(case, draw):
    """Tried: one byte of a stored part flipped, or the part read as another chunk's.
    Must hold: no range touching the changed block is served, and the part fails its
    check; a part of one chunk never checks as another's."""
    length, index, _data, blocks = case
    value = bytearray(parts.make(SEED, index, length, blocks))
    assert not parts.intact(value, SEED, index + 1, length)
    at = draw.draw(st.integers(0, len(value) - 1))
    value[at] ^= 1 << draw.draw(st.integers(0, 7))
    assert not parts.intact(value, SEED, index, length)
    if at >= SUM_SIZE:
        held = sorted(blocks)
        offset = at - SUM_SIZE
        for block in held:  # find the block the flipped byte belongs to
            if offset < len(blocks[block]):
                break
            offset -= len(blocks[block])
        lo = block * BLOCK
        assert parts.checked_slice(value, SEED, index, length, lo, lo + 1) is None


@given(stored_parts())
def test_blocks_that_complete_a_chunk_make_it_whole(case):
    """Tried: the missing blocks of a part merged into it. Must hold: the chunk comes out
    whole, byte for byte, and no part is kept; merging fewer keeps a part that serves
    both the old and the new blocks."""
    length, index, data, blocks = case
    old = parts.make(SEED, index, length, blocks)
    rest = {
        b: data[b * BLOCK : (b + 1) * BLOCK]
        for b in range(parts.block_count(length))
        if b not in blocks
    }
    part, whole = parts.merged(SEED, index, length, old, rest)
    assert part is None and whole == data
    one = dict([next(iter(rest.items()))])
    part, whole = parts.merged(SEED, index, length, old, one)
    if len(blocks) + 1 < parts.block_count(length):
        assert whole is None and parts.blocks(part, length).keys() == {*blocks, *one}
