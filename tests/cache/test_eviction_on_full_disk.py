"""A cache whose disk is smaller than its cap, stored into past the full point."""

from __future__ import annotations

import contextlib

from cache_sources import make_blob
from rig.small_disk import small_disk

from blockstore.cache import CHUNK_SIZE
from blockstore.cache.store import ChunkStore

BLOB = 2 << 20
PIECE = 8 * CHUNK_SIZE


def test_a_disk_just_full_costs_the_cache_its_oldest_chunks_not_half(tmp_path):
    """Tried: a cache under the default 10 GiB cap on a 24 MiB ext4 (a loop device);
    blobs of 2 MiB stored one after another, 256 KiB per store, until the disk is
    full and stores go on past it. Must hold: every store succeeds, evicting the oldest
    chunks; after any store the cache holds at least 80% of the most it held before, and
    the newest blob is whole. Before, each store that found the disk full evicted half
    of the cache."""
    with small_disk(tmp_path / "disk", "24M") as disk, ChunkStore(disk / "cache") as store:
        peak = 0
        lowest = 1.0  # the least, after a store, of what is stored over the most before it
        for seed in range(16):
            data, digest = make_blob(BLOB, seed)
            for offset in range(0, BLOB, PIECE):
                piece = data[offset : offset + PIECE]
                chunks = [piece[i : i + CHUNK_SIZE] for i in range(0, PIECE, CHUNK_SIZE)]
                store.store_chunks(digest, BLOB, offset // CHUNK_SIZE, chunks)
                stored = store.stats()["stored_bytes"]
                if peak:
                    lowest = min(lowest, stored / peak)
                peak = max(peak, stored)
        assert store.stats()["evictions"] > 0, "the disk never filled"
        assert lowest >= 0.8, (lowest, peak)
        assert store.missing_by_digest(digest, range(BLOB // CHUNK_SIZE)) == []


def test_a_disk_full_of_pinned_layers_is_said_a_few_times_not_per_store(
    tmp_path, caplog, monkeypatch
):
    """Tried: a 24 MiB ext4 filled by a pinned layer, then 64 stores of another layer's
    chunks, each finding the disk full with nothing to evict. Must hold: the pinned chunks
    stay; the full disk is said at most ``ThrottledLog.BURST`` times (the rest counted),
    and never as "evicted the oldest 0.0 MiB". Before, every step of every store said it
    (260 warnings here), most of them "0.0 MiB"."""
    from blockstore.cache import capacity
    from blockstore.errors import CacheError
    from blockstore.throttledlog import ThrottledLog

    # Its own count: another test in this process may have used the shared one's burst.
    monkeypatch.setattr(capacity, "_full_disk", ThrottledLog(capacity.log, "%d more in %.0f s"))

    pinned, pinned_digest = make_blob(24 << 20, seed=90)
    with small_disk(tmp_path / "disk", "24M") as disk, ChunkStore(disk / "cache") as store:
        store.pin(pinned_digest, len(pinned))
        kept = 0
        for offset in range(0, len(pinned), PIECE):
            piece = pinned[offset : offset + PIECE]
            chunks = [piece[i : i + CHUNK_SIZE] for i in range(0, PIECE, CHUNK_SIZE)]
            try:
                store.store_chunks(pinned_digest, len(pinned), offset // CHUNK_SIZE, chunks)
            except CacheError:
                break  # DiskFull: the pinned layer holds the disk
            kept = offset // CHUNK_SIZE + len(chunks)
        data, digest = make_blob(64 * PIECE, seed=91)
        for offset in range(0, len(data), PIECE):
            piece = data[offset : offset + PIECE]
            chunks = [piece[i : i + CHUNK_SIZE] for i in range(0, PIECE, CHUNK_SIZE)]
            with contextlib.suppress(CacheError):  # DiskFull: the pins leave no room
                store.store_chunks(digest, len(data), offset // CHUNK_SIZE, chunks)
        assert kept and store.missing_by_digest(pinned_digest, range(kept)) == []
    said = caplog.text.count("the disk holding the cache is full")
    assert 0 < said <= ThrottledLog.BURST, said
    assert "evicted the oldest 0.0 MiB" not in caplog.text


def test_a_many_chunk_store_on_a_full_disk_evicts_what_it_needs_at_once(
    tmp_path, caplog, monkeypatch
):
    """Tried: a 24 MiB ext4 holding a 14 MiB layer (the default cap far above), then 8 MiB
    of another layer stored in one commit, which finds the disk full. Must hold: the store
    succeeds after one eviction, of half the cache (the most a full disk may take, and
    less than the 9 MiB of pages the commit takes), and the new chunks are all there.
    Before, each step evicted a share of the cache (a sixteenth, then an eighth, then a
    quarter) and the 8 MiB commit was written, and failed, after each one: three steps
    here, and on a disk a little tighter every step failed and the store with it."""
    from blockstore.cache import capacity
    from blockstore.throttledlog import ThrottledLog

    # Its own count: another test in this process may have used the shared one's burst.
    monkeypatch.setattr(capacity, "_full_disk", ThrottledLog(capacity.log, "%d more in %.0f s"))
    first, first_digest = make_blob(14 << 20, seed=95)
    second, second_digest = make_blob(8 << 20, seed=96)
    with small_disk(tmp_path / "disk", "24M") as disk, ChunkStore(disk / "cache") as store:
        for offset in range(0, len(first), PIECE):
            piece = first[offset : offset + PIECE]
            chunks = [piece[i : i + CHUNK_SIZE] for i in range(0, PIECE, CHUNK_SIZE)]
            store.store_chunks(first_digest, len(first), offset // CHUNK_SIZE, chunks)
        caplog.clear()
        chunks = [second[i : i + CHUNK_SIZE] for i in range(0, len(second), CHUNK_SIZE)]
        store.store_chunks(second_digest, len(second), 0, chunks)
        steps = [r.getMessage() for r in caplog.records if "is full: evicted" in r.getMessage()]
        assert len(steps) == 1, steps
        assert store.stats()["evictions"] * CHUNK_SIZE == len(first) // 2
        assert store.missing_by_digest(second_digest, range(len(chunks))) == []
