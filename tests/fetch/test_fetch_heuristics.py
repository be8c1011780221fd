"""The EROFS start, background fill, CACHE as a prefetch hint, and stopping mid-fetch."""

from __future__ import annotations

import hashlib
import threading
import time

from fetch_sources import PieceSource, make_blob
from rig.local_source import LocalFileSource
from rig.waiting import wait_for

from blockstore import erofs_format
from blockstore.cache import CHUNK_SIZE, CachedBlob, ChunkStore
from blockstore.prefetch import PrefetchSettings, erofs

QUIET = PrefetchSettings(readahead=False)


def test_erofs_start_fetches_the_root_directory_in_one_request(erofs_images, cache_dir):
    """At open, with nothing read yet, the first chunk is fetched, then the superblock,
    root inode and root directory blocks in one more request; the span asked for
    covers what the superblock points to. A blob that is not EROFS gets only the
    first chunk."""
    image = erofs_images.large.path
    head = image.read_bytes()[:CHUNK_SIZE]
    offset, _ = erofs.root_inode_offset(head)
    span_end = erofs.start_span(head, image.read_bytes()[offset : offset + 64], len(head))[1]
    source = PieceSource(image.read_bytes(), erofs_images.large.digest)
    settings = PrefetchSettings(readahead=False, erofs_start=True)
    with ChunkStore(cache_dir) as store:
        blob = CachedBlob(store, source.digest, source.size, source, settings=settings)
        wanted = range(0, (span_end - 1) // CHUNK_SIZE + 1)

        def start_stored() -> bool:
            record = store.lookup(source.digest)
            return record is not None and not store.missing(record.blob_id, wanted)

        assert wait_for(start_stored)
        blob.close()
    assert source.requests[0] == (0, CHUNK_SIZE)
    assert len(source.requests) <= 2
    assert offset < span_end <= erofs.MAX_SPAN

    data, digest = make_blob(8 * CHUNK_SIZE, seed=3)
    other = PieceSource(data, digest)
    with ChunkStore(cache_dir) as store:
        blob = CachedBlob(store, digest, len(data), other, settings=settings)
        assert wait_for(lambda: other.requests)
        time.sleep(0.1)
        blob.close()
    assert other.requests == [(0, CHUNK_SIZE)]


def test_erofs_start_span_from_a_hand_made_superblock():
    """The span reaches the end of the root directory's blocks for a flat directory,
    stops at the inode for one too far away, and is the first block for a non-EROFS
    head."""
    import struct

    head = bytearray(8192)
    struct.pack_into("<I", head, 1024, erofs_format.SUPER_MAGIC)
    head[1024 + 12] = 12  # 4 KiB blocks
    struct.pack_into("<H", head, 1024 + 14, 40)  # root nid: inode at 1280
    struct.pack_into("<I", head, 1024 + 40, 0)  # meta_blkaddr
    inode = bytearray(64)
    struct.pack_into("<HHHHIII", inode, 0, 0 << 1, 0, 0o40755, 2, 3 * 4096, 0, 5)  # flat plain
    assert erofs.start_span(bytes(head), bytes(inode), 1 << 30) == (0, 8 * 4096)
    struct.pack_into("<I", inode, 16, 100000)  # blocks far away
    assert erofs.start_span(bytes(head), bytes(inode), 1 << 30) == (0, 4096)
    assert erofs.start_span(b"\0" * 8192, bytes(inode), 1 << 30) == (0, 4096)


def test_fill_keeps_to_its_cap_and_ends_sealed(cache_dir):
    """--fill with a bandwidth cap of 4 MiB/s brings a 4 MiB blob in no faster than the
    cap allows (less the first quarter second's burst) and ends with it sealed, so it
    reads whole with no source at all."""
    data, digest = make_blob(128 * CHUNK_SIZE, seed=4)
    rate = 4 << 20
    source = PieceSource(data, digest)
    settings = PrefetchSettings(readahead=False, fill=True, fill_rate=rate)
    with ChunkStore(cache_dir) as store:
        started = time.monotonic()
        blob = CachedBlob(store, digest, len(data), source, settings=settings)
        assert wait_for(lambda: (r := store.lookup(digest)) is not None and r.sealed)
        took = time.monotonic() - started
        blob.close()
        offline = CachedBlob(store, digest, len(data), None)
        assert b"".join(bytes(b) for b in offline.read(0, len(data))) == data
    assert sum(n for _, n in source.requests) == len(data)
    assert took >= 0.8 * (len(data) - rate / 4) / rate


def test_a_fill_that_cannot_keep_the_layer_says_it_gave_up(cache_dir, caplog):
    """--fill of a 32-chunk layer into a cache capped at 8 chunks: eviction takes what
    the fill brings, and after its rounds the fill says it gave up, how much is still
    missing and why that may be, rather than stopping without a word."""
    data, digest = make_blob(32 * CHUNK_SIZE, seed=9)
    settings = PrefetchSettings(readahead=False, fill=True)
    with ChunkStore(cache_dir, size_cap=8 * CHUNK_SIZE) as store:
        blob = CachedBlob(store, digest, len(data), PieceSource(data, digest), settings=settings)
        assert wait_for(lambda: "the fill gave up" in caplog.text, timeout=20)
        blob.close()
    assert "of 32 chunks still missing" in caplog.text


def test_a_stopped_fill_resumes_where_it_stopped(cache_dir):
    """A fill stopped half-way (the export closed) and started again asks the source for
    exactly the chunks that were missing when it stopped, and the blob ends sealed."""
    data, digest = make_blob(128 * CHUNK_SIZE, seed=8)
    source = PieceSource(data, digest, piece_delay=0.002)
    # The first fill is slow enough (2 s for the blob) that a loaded machine still
    # stops it well before its end; the second runs at full speed.
    slow = PrefetchSettings(readahead=False, fill=True, fill_rate=2 << 20)
    settings = PrefetchSettings(readahead=False, fill=True, fill_rate=8 << 20)
    with ChunkStore(cache_dir) as store:
        blob = CachedBlob(store, digest, len(data), source, settings=slow)
        assert wait_for(lambda: (r := store.lookup(digest)) is not None and r.present >= 40)
        blob.close()
        missing = store.missing(store.lookup(digest).blob_id, range(128))
        assert 0 < len(missing) <= 128 - 40
        source.requests.clear()
        blob = CachedBlob(store, digest, len(data), source, settings=settings)
        assert wait_for(lambda: (r := store.lookup(digest)) is not None and r.sealed)
        blob.close()
    asked = [
        index
        for offset, length in source.requests
        for index in range(offset // CHUNK_SIZE, -(-(offset + length) // CHUNK_SIZE))
    ]
    assert sorted(asked) == missing


def test_demand_reads_go_ahead_of_the_fill(cache_dir):
    """While a fill is running over a slow source, a read far ahead of it (at the end of
    a blob four times the fill's first window) is answered in about one request's time,
    not after the fill reaches it: when it returns, the fill has not stored three
    quarters of the blob. Measured against the fill, not the clock, as a loaded machine
    slows both; a read that waited for the fill would find nearly all of it stored."""
    chunks = 1024
    data, digest = make_blob(chunks * CHUNK_SIZE, seed=5)
    source = PieceSource(data, digest, first_byte=0.02, piece_delay=0.004)
    settings = PrefetchSettings(readahead=False, fill=True)
    with ChunkStore(cache_dir) as store:
        blob = CachedBlob(store, digest, len(data), source, settings=settings)
        assert wait_for(lambda: source.requests)
        got = b"".join(bytes(b) for b in blob.read(len(data) - 100, 100))
        present = store.lookup(digest).present
        blob.close()
    assert got == data[-100:]
    assert present < chunks * 3 // 4, f"the fill had stored {present} of {chunks} chunks"


def test_cache_returns_at_once_and_brings_the_range_in(cache_dir):
    """A client's CACHE while the source holds every request unanswered (for ten
    seconds at most) returns before the source answers anything (it holds no thread
    waiting on the fetch), and the range is in the cache once the source answers.
    Measured against the source, not the clock: a loaded machine may pause the caller
    longer than any bound on how soon it returns."""
    data, digest = make_blob(32 * CHUNK_SIZE, seed=6)
    source = PieceSource(data, digest)
    source.answering.clear()
    answer = threading.Timer(10, source.answering.set)
    answer.start()
    with ChunkStore(cache_dir) as store:
        blob = CachedBlob(store, digest, len(data), source, settings=QUIET)
        blob.cache(4 * CHUNK_SIZE, 8 * CHUNK_SIZE)
        assert not source.answering.is_set(), "CACHE waited for the source to answer"
        source.answering.set()
        answer.cancel()

        def cached() -> bool:
            record = store.lookup(digest)
            return record is not None and not store.missing(record.blob_id, range(4, 12))

        assert wait_for(cached)
        blob.close()
    assert source.requests == [(4 * CHUNK_SIZE, 8 * CHUNK_SIZE)]


def test_close_cancels_fetches_in_flight_within_seconds(cache_dir):
    """A reader waits on a source that would take a minute; close() returns within a few
    seconds and the reader gets EIO, not a hang."""
    data, digest = make_blob(64 * CHUNK_SIZE, seed=7)
    source = PieceSource(data, digest, piece_delay=1.0)
    outcome: list[object] = []
    with ChunkStore(cache_dir) as store:
        blob = CachedBlob(store, digest, len(data), source, settings=QUIET)

        def reader() -> None:
            try:
                outcome.append(blob.read(0, len(data)))
            except OSError as exc:
                outcome.append(exc)

        thread = threading.Thread(target=reader, daemon=True)
        thread.start()
        assert wait_for(lambda: source.requests)
        started = time.monotonic()
        blob.close()
        thread.join(10)
        took = time.monotonic() - started
    assert not thread.is_alive()
    assert took < 5
    assert isinstance(outcome[0], OSError)


def test_fill_of_an_erofs_image_matches_its_digest(erofs_images, cache_dir):
    """The fill of a real EROFS image from a local file ends sealed against its sha256."""
    image = erofs_images.small
    source = LocalFileSource(image.path, image.digest)
    settings = PrefetchSettings(fill=True, erofs_start=True)
    with ChunkStore(cache_dir) as store:
        blob = CachedBlob(store, image.digest, image.size, source, settings=settings)
        assert wait_for(lambda: (r := store.lookup(image.digest)) is not None and r.sealed)
        blob.close()
    assert image.digest == "sha256:" + hashlib.sha256(image.path.read_bytes()).hexdigest()
