"""A replayed trace fetches the 4 KiB blocks it names, kept as parts of chunks.

The blob is the 4 MiB random blob in the real registry, read through the
fault proxy, which records every GET's Range; the trace is put in the cache
as ``trace import`` would put one recorded on another machine.
"""

from __future__ import annotations

import threading
import time

import pytest
from rig.fault_proxy import Fault
from test_fetch_registry import blob_requests, wait_until

from blockstore.cache import CHUNK_SIZE, CachedBlob, ChunkStore
from blockstore.cache.layout import DB_PARTS, chunk_key
from blockstore.cache.traces import TraceShelf
from blockstore.errors import NotCached
from blockstore.prefetch import PrefetchSettings, Trace

BLOCK = 4096
REPLAY = PrefetchSettings(readahead=False, trace_replay=True)
# (first block, blocks) read by the recording mount, in its order: scattered, 1 to 3
# blocks of a chunk each, one run across a chunk boundary, two with a 1-block gap.
TRACED = [(8 * 40 + 2, 1), (8 * 3, 2), (8 * 90 + 7, 2), (8 * 7 + 1, 1), (8 * 7 + 3, 1)]


def traced_blocks() -> list[int]:
    return [b for first, count in TRACED for b in range(first, first + count)]


def put_trace(cache_dir, digest: str) -> None:
    with ChunkStore(cache_dir) as store:
        events = [(10 * n, first, count) for n, (first, count) in enumerate(TRACED)]
        TraceShelf(store).put(Trace(digest, BLOCK, time.time(), events))


def requested_bytes(proxy, digest: str) -> int:
    total = 0
    for header in blob_requests(proxy, digest):
        start, end = header.removeprefix("bytes=").split("-")
        total += int(end) - int(start) + 1
    return total


def replayed(store: ChunkStore, digest: str) -> bool:
    """Every traced block is held, by a part or a whole chunk."""
    record = store.lookup(digest)
    if record is None:
        return False
    chunks = sorted({b // 8 for b in traced_blocks()})
    held = store.read_parts(record.blob_id, chunks)
    whole = set(chunks) - set(store.missing(record.blob_id, chunks))
    return all(b // 8 in whole or b // 8 in held for b in traced_blocks())


def read(blob: CachedBlob, offset: int, length: int) -> bytes:
    return b"".join(bytes(b) for b in blob.read(offset, length))


def test_a_replay_fetches_the_blocks_read_and_serves_them_without_fetching(
    pushed_blob, registry, fault_proxy, cache_dir
):
    """Tried: a trace of scattered 4 KiB reads replayed into an empty cache. Must hold:
    the registry is asked for those blocks (and the one block bridging a gap), not their
    chunks; reading them afterwards asks it for nothing; a block of such a chunk that
    the trace did not read fetches its chunk whole, which then replaces the part; the
    stored total counts what is stored, and every byte read is the blob's."""
    data, digest = pushed_blob.data, pushed_blob.digest
    put_trace(cache_dir, digest)
    proxy = fault_proxy(registry)
    source = pushed_blob.source(proxy.host)
    with ChunkStore(cache_dir) as store:
        blob = CachedBlob(store, digest, len(data), source, settings=REPLAY)
        wait_until(lambda: replayed(store, digest))
        wait_until(lambda: blob._block_fetcher.in_flight() == 0)
        assert requested_bytes(proxy, digest) == (len(traced_blocks()) + 1) * BLOCK
        asked = len(proxy.requests)
        for first, count in TRACED:
            assert (
                read(blob, first * BLOCK, count * BLOCK)
                == data[first * BLOCK : (first + count) * BLOCK]
            )
        assert (
            read(blob, 8 * 40 * BLOCK + 2 * BLOCK + 100, 50)
            == data[8 * 40 * BLOCK + 2 * BLOCK + 100 : 8 * 40 * BLOCK + 2 * BLOCK + 150]
        )
        assert len(proxy.requests) == asked  # all served from parts

        assert read(blob, 40 * CHUNK_SIZE, CHUNK_SIZE) == data[40 * CHUNK_SIZE : 41 * CHUNK_SIZE]
        assert blob_requests(proxy, digest)[-1] == f"bytes={40 * CHUNK_SIZE}-{41 * CHUNK_SIZE - 1}"
        record = store.lookup(digest)
        assert 40 not in store.read_parts(record.blob_id, [40])
        assert store.missing(record.blob_id, [40]) == []
        blob.close()
        stored = sum(len(v) - 72 for v in store.read_parts(record.blob_id, range(128)).values())
        assert store.stats()["stored_bytes"] == stored + record.present * CHUNK_SIZE
    source.client.close()


def test_a_read_waits_for_the_blocks_the_replay_is_fetching(
    pushed_blob, registry, fault_proxy, cache_dir
):
    """Tried: a read of traced blocks while the replay's request for them is held up at
    the proxy. Must hold: the read waits for that request instead of asking for the
    chunk, so the registry sees no range but the replay's, and the read's bytes are
    right."""
    data, digest = pushed_blob.data, pushed_blob.digest
    put_trace(cache_dir, digest)
    proxy = fault_proxy(registry)
    proxy.fault = Fault("delay", path_contains="/blobs/", seconds=0.5, times=100)
    source = pushed_blob.source(proxy.host)
    with ChunkStore(cache_dir) as store:
        blob = CachedBlob(store, digest, len(data), source, settings=REPLAY)
        fetcher = blob._block_fetcher
        wait_until(lambda: fetcher.in_flight() == len(traced_blocks()) + 1)  # all asked for
        first = TRACED[0][0]
        got: list[bytes] = []
        reader = threading.Thread(target=lambda: got.append(read(blob, first * BLOCK, BLOCK)))
        reader.start()
        reader.join(10)
        assert got == [data[first * BLOCK : (first + 1) * BLOCK]]
        wait_until(lambda: replayed(store, digest))
        blob.close()
    source.client.close()
    assert requested_bytes(proxy, digest) == (len(traced_blocks()) + 1) * BLOCK


def test_parts_serve_offline_and_a_damaged_part_is_fetched_again_whole(
    pushed_blob, registry, cache_dir
):
    """Tried: the cache a replay filled, opened offline; then one part's stored bytes
    changed on disk, read online. Must hold: offline, the traced blocks are served and a
    block no part holds is refused as not cached (never zeros); the damaged part is never
    served: its chunk is fetched whole, and ``cache verify`` drops a damaged part and
    keeps the stored total right."""
    data, digest = pushed_blob.data, pushed_blob.digest
    put_trace(cache_dir, digest)
    with ChunkStore(cache_dir) as store:
        blob = CachedBlob(
            store, digest, len(data), pushed_blob.source(registry.host), settings=REPLAY
        )
        wait_until(lambda: replayed(store, digest))
        blob.close()
    with ChunkStore(cache_dir) as store:
        offline = CachedBlob(store, digest, len(data), None)
        first = TRACED[1][0]
        assert read(offline, first * BLOCK, 2 * BLOCK) == data[first * BLOCK : (first + 2) * BLOCK]
        with pytest.raises(NotCached):
            offline.read((first + 2) * BLOCK, BLOCK)
        blob_id = store.lookup(digest).blob_id
        for index in (3, 90):
            key = chunk_key(blob_id, index)
            value = bytearray(store.read_parts(blob_id, [index])[index])
            value[-1] ^= 0x40

            def damage(txn, key=key, value=value) -> None:
                txn.put(key, bytes(value), db=store.dbs[DB_PARTS])

            store.env.write(damage)
        online = CachedBlob(store, digest, len(data), pushed_blob.source(registry.host))
        assert read(online, first * BLOCK, 2 * BLOCK) == data[first * BLOCK : (first + 2) * BLOCK]
        assert store.missing(blob_id, [3]) == []  # fetched whole, the part gone
        assert 3 not in store.read_parts(blob_id, [3])
        online.close()
        report = store.verify()
        assert (digest, 90) in report.bad_chunks
        assert store.read_parts(blob_id, [90]) == {}
        held = sum(len(v) - 72 for v in store.read_parts(blob_id, range(128)).values())
        record = store.lookup(digest)
        assert store.stats()["stored_bytes"] == held + record.present * CHUNK_SIZE


def test_parts_age_out_under_the_cap_and_go_with_their_blob(pushed_blob, cache_dir):
    """Tried: parts of many chunks stored under a cap that holds a few dozen; then the
    blob removed. Must hold: the stored total stays under the cap (parts are evicted
    oldest first, like chunks), and removing the blob leaves no part and no bytes."""
    data, digest = pushed_blob.data, pushed_blob.digest
    with ChunkStore(cache_dir, size_cap=64 * BLOCK) as store:
        for index in range(0, 128):
            block = data[index * CHUNK_SIZE : index * CHUNK_SIZE + BLOCK]
            store.store_parts(digest, len(data), {index: {0: block}})
            assert store.stats()["stored_bytes"] <= 64 * BLOCK
        blob_id = store.lookup(digest).blob_id
        kept = store.read_parts(blob_id, range(128))
        assert 20 < len(kept) <= 64 and 127 in kept and 0 not in kept  # the newest kept
        assert store.stats()["parts"] == len(kept)
        assert store.remove(digest)
        assert store.read_parts(blob_id, range(128)) == {}
        assert store.stats()["stored_bytes"] == 0


def test_a_chunk_whose_blocks_all_arrive_as_parts_is_stored_whole(pushed_blob, cache_dir):
    """Tried: the eight blocks of one chunk stored as parts in two steps. Must hold: the
    second step stores the chunk whole (it counts as present, it can be sealed) and
    keeps no part."""
    data, digest = pushed_blob.data, pushed_blob.digest
    blocks = {
        b: data[5 * CHUNK_SIZE + b * BLOCK : 5 * CHUNK_SIZE + (b + 1) * BLOCK] for b in range(8)
    }
    with ChunkStore(cache_dir) as store:
        store.store_parts(digest, len(data), {5: {b: blocks[b] for b in (0, 2, 4, 6)}})
        record = store.store_parts(digest, len(data), {5: {b: blocks[b] for b in (1, 3, 5, 7)}})
        assert record.present == 1 and store.read_parts(record.blob_id, [5]) == {}
        blob = CachedBlob(store, digest, len(data), None)
        assert read(blob, 5 * CHUNK_SIZE, CHUNK_SIZE) == data[5 * CHUNK_SIZE : 6 * CHUNK_SIZE]
        assert store.stats()["stored_bytes"] == CHUNK_SIZE


def test_readahead_waits_while_the_trace_covers_the_reads(
    pushed_blob, registry, fault_proxy, cache_dir
):
    """Tried: a sequential reader outside the trace, with readahead on, while the trace's
    recorded period (10 s here) lasts. Must hold: each read fetches its own chunk and no
    more, for the trace, not readahead, says what this mount reads then."""
    data, digest = pushed_blob.data, pushed_blob.digest
    with ChunkStore(cache_dir) as store:
        TraceShelf(store).put(Trace(digest, BLOCK, time.time(), [(10_000, 0, 1)]))
    proxy = fault_proxy(registry)
    source = pushed_blob.source(proxy.host)
    with ChunkStore(cache_dir) as store:
        blob = CachedBlob(
            store, digest, len(data), source, settings=PrefetchSettings(trace_replay=True)
        )
        wait_until(lambda: replayed_block_zero(store, digest))
        for index in range(64, 72):
            assert (
                read(blob, index * CHUNK_SIZE, CHUNK_SIZE)
                == data[index * CHUNK_SIZE : (index + 1) * CHUNK_SIZE]
            )
        blob.close()
    source.client.close()
    assert blob_requests(proxy, digest)[1:] == [
        f"bytes={i * CHUNK_SIZE}-{(i + 1) * CHUNK_SIZE - 1}" for i in range(64, 72)
    ]


def replayed_block_zero(store: ChunkStore, digest: str) -> bool:
    record = store.lookup(digest)
    return record is not None and 0 in store.read_parts(record.blob_id, [0])


def test_a_chunk_index_has_the_trace_replayed_in_whole_chunks(
    pushed_blob, registry, fault_proxy, cache_dir
):
    """Tried: the same trace replayed where a chunk index checks each chunk on arrival.
    Must hold: the replay asks for whole chunks (a part could not be checked against the
    index), keeps no part, and every chunk it stored is the blob's."""
    from blockstore.chunkindex import build_index
    from blockstore.indexed_source import IndexedSource

    data, digest = pushed_blob.data, pushed_blob.digest
    put_trace(cache_dir, digest)
    proxy = fault_proxy(registry)
    source = pushed_blob.source(proxy.host)
    index = build_index(digest, len(data), CHUNK_SIZE, [data])
    chunks = sorted({b // 8 for b in traced_blocks()})
    with ChunkStore(cache_dir) as store:
        blob = CachedBlob(store, digest, len(data), IndexedSource(source, index), settings=REPLAY)
        wait_until(lambda: (r := store.lookup(digest)) and not store.missing(r.blob_id, chunks))
        record = store.lookup(digest)
        assert store.read_parts(record.blob_id, range(128)) == {}
        for i in chunks:
            got = read(blob, i * CHUNK_SIZE, CHUNK_SIZE)
            assert got == data[i * CHUNK_SIZE : (i + 1) * CHUNK_SIZE]
        blob.close()
    source.client.close()
    for header in blob_requests(proxy, digest):
        start, end = map(int, header.removeprefix("bytes=").split("-"))
        assert start % CHUNK_SIZE == 0 and (end + 1) % CHUNK_SIZE == 0


def piece_blob(seed: int, first_byte: float = 0.0):
    """Ten chunks of random bytes behind a ``PieceSource`` (answers after ``first_byte``)."""
    from fetch_sources import PieceSource, make_blob

    data, digest = make_blob(10 * CHUNK_SIZE + 1000, seed)
    return data, digest, PieceSource(data, digest, first_byte=first_byte)


def test_close_answers_a_read_waiting_on_the_replay_at_once(cache_dir):
    """Tried: close while a read waits on a replayed block the source holds unanswered
    (ten seconds at most). Must hold: the read fails (EIO) while the source still holds
    it, not after another fetcher's wait, and nothing more is asked of the source once
    close began. Measured against the held answer, not the clock, which a loaded
    machine stretches."""
    data, digest, source = piece_blob(5)
    source.answering.clear()
    answer = threading.Timer(10, source.answering.set)
    answer.start()
    with ChunkStore(cache_dir) as store:
        TraceShelf(store).put(Trace(digest, BLOCK, time.time(), [(0, 17, 2)]))
        blob = CachedBlob(store, digest, len(data), source, settings=REPLAY)
        wait_until(lambda: blob._block_fetcher.in_flight() > 0)
        outcome: list[object] = []

        def reader() -> None:
            try:
                read(blob, 2 * CHUNK_SIZE, CHUNK_SIZE)
            except OSError as exc:
                outcome.append((exc, source.answering.is_set()))

        waiting = threading.Thread(target=reader)
        waiting.start()
        time.sleep(0.3)
        asked = len(source.requests)
        blob.close()
        waiting.join(15)
        source.answering.set()
        answer.cancel()
        assert outcome and not outcome[0][1], "the read waited for the held answer"
        assert len(source.requests) == asked


def test_two_exports_of_one_blob_replay_each_block_once(cache_dir):
    """Tried: one blob opened twice in one process (a layer two images share), both
    replaying its trace. Must hold: no 4 KiB block is on its way twice, and both read
    right."""
    data, digest, source = piece_blob(7, first_byte=0.3)
    with ChunkStore(cache_dir) as store:
        events = [(0, 17, 2), (1, 43, 1), (2, 64, 3)]
        TraceShelf(store).put(Trace(digest, BLOCK, time.time(), events))
        one = CachedBlob(store, digest, len(data), source, settings=REPLAY)
        two = CachedBlob(store, digest, len(data), source, settings=REPLAY)
        wait_until(lambda: one._block_fetcher.in_flight() == 0 and len(source.requests) >= 3)
        for blob in (one, two):
            assert read(blob, 17 * BLOCK, 2 * BLOCK) == data[17 * BLOCK : 19 * BLOCK]
            blob.close()
    assert source.max_same_block_in_flight == 1
    assert sorted(source.requests) == [
        (17 * BLOCK, 2 * BLOCK),
        (43 * BLOCK, BLOCK),
        (64 * BLOCK, 3 * BLOCK),
    ]


def test_a_read_of_a_held_block_and_one_on_its_way_asks_nothing_more(cache_dir):
    """Tried: a read of two blocks of one chunk, one held in the chunk's part, the other
    on its way in the replay. Must hold: the read is answered from both, right, and the
    source sees the replay's request alone."""
    data, digest, source = piece_blob(9, first_byte=0.5)
    with ChunkStore(cache_dir) as store:
        store.store_parts(digest, len(data), {2: {1: data[17 * BLOCK : 18 * BLOCK]}})
        TraceShelf(store).put(Trace(digest, BLOCK, time.time(), [(0, 17, 2)]))
        blob = CachedBlob(store, digest, len(data), source, settings=REPLAY)
        wait_until(lambda: blob._block_fetcher.in_flight() > 0)
        assert read(blob, 17 * BLOCK, 2 * BLOCK) == data[17 * BLOCK : 19 * BLOCK]
        blob.close()
    assert source.requests == [(18 * BLOCK, BLOCK)]


def test_a_part_read_again_stays_young(cache_dir, monkeypatch):
    """Tried: a part read again and again, then the cache filled past its cap. Must
    hold: the part outlives a chunk stored after it and never read since (reads make a
    part young, as they do a chunk)."""
    from blockstore.cache import recency

    clock = [1_000_000_000_000_000]
    monkeypatch.setattr(recency, "now_tick", lambda: clock[0])
    data, digest, _ = piece_blob(1)
    other, other_digest, _ = piece_blob(2)
    third, third_digest, _ = piece_blob(3)
    with ChunkStore(cache_dir, size_cap=90_000) as store:  # the third chunk evicts one
        store.store_parts(
            digest, len(data), {0: {b: data[b * BLOCK : (b + 1) * BLOCK] for b in range(7)}}
        )
        clock[0] += 100_000_000
        store.store_chunks(other_digest, len(other), 0, [other[:CHUNK_SIZE]])
        blob = CachedBlob(store, digest, len(data), None)
        for _ in range(3):
            clock[0] += 100_000_000
            assert read(blob, 0, BLOCK) == data[:BLOCK]
            store.flush()
        clock[0] += 100_000_000
        store.store_chunks(third_digest, len(third), 0, [third[:CHUNK_SIZE]])
        assert store.read_parts(store.lookup(digest).blob_id, [0])
        assert store.missing(store.lookup(other_digest).blob_id, [0]) == [0]
