"""Recency kept without lookups for ranges read again and again."""

from __future__ import annotations

from cache_sources import ScriptedSource, make_blob

from blockstore.cache import CHUNK_SIZE, CachedBlob, ChunkStore
from blockstore.cache import recency as recency_mod
from blockstore.cache.recency import PLACED_MOST, PLACED_WINDOW_US, Recency


def test_a_range_placed_is_not_taken_again_within_the_window():
    """Tried: a range touched, taken and placed, then touched again, with another range,
    within the window, then once more after it. Must hold: within the window only the
    other range is taken; after it, both are (their chunks are looked up again)."""
    recency = Recency()
    recency.touch((1, 0, 7))
    first = recency.take(10**15)
    assert first == {(1, 0, 7)}
    recency.placed(first)
    recency.touch((1, 0, 7))
    recency.touch((1, 8, 15))
    assert recency.take(10**15 + PLACED_WINDOW_US - 1) == {(1, 8, 15)}
    recency.touch((1, 0, 7))
    assert recency.take(10**15 + PLACED_WINDOW_US) == {(1, 0, 7)}


def test_the_memory_of_placed_ranges_is_bounded():
    """Tried: more distinct ranges placed than ``PLACED_MOST``. Must hold: the memory is
    let go at the next take, so a range placed before is taken (looked up) again."""
    recency = Recency()
    many = {(1, i, i) for i in range(PLACED_MOST + 1)}
    recency.placed(many)
    recency.touch((1, 0, 0))
    assert recency.take(1) == {(1, 0, 0)}


def test_a_flush_looks_up_a_range_read_again_only_once_the_window_has_passed(
    cache_dir, monkeypatch
):
    """Tried: a blob's first 8 chunks read and flushed, read again and flushed, then read
    again after the window and flushed. Must hold: the first flush places the 8 chunks,
    the second looks none up (before, it looked up all 8 again, every second a reader
    streams), the third all 8; and the chunks are served right throughout."""
    data, digest = make_blob(16 * CHUNK_SIZE, seed=3)
    clock = [10**15]
    monkeypatch.setattr(recency_mod, "now_tick", lambda: clock[0])
    placed = []
    real_place = recency_mod.place
    monkeypatch.setattr(
        recency_mod,
        "place",
        lambda txn, dbs, key, tick, **kw: (
            placed.append(key),
            real_place(txn, dbs, key, tick, **kw),
        ),
    )
    with ChunkStore(cache_dir, flush_interval=3600) as store:
        blob = CachedBlob(store, digest, len(data), ScriptedSource(data, digest))
        blob.prefetch()
        store.flush()
        counts = []
        for step in (0, 1, PLACED_WINDOW_US):
            clock[0] += step
            placed.clear()
            assert b"".join(blob.read(0, 8 * CHUNK_SIZE)) == data[: 8 * CHUNK_SIZE]
            store.flush()
            counts.append(len(placed))
        blob.close()
    assert counts == [8, 0, 8]
