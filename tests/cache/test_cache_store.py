"""The chunk store and CachedBlob against in-memory sources: bytes, seals, eviction."""

from __future__ import annotations

import errno
import threading
import time

import pytest
from cache_rig import flip_stored_byte
from cache_sources import ScriptedSource, make_blob

import blockstore.cache.env as cache_env
import blockstore.cache.recency as recency
from blockstore.cache import CHUNK_SIZE, CachedBlob, ChunkStore
from blockstore.cache.layout import DB_LRU, DB_META, U64
from blockstore.errors import BlobReadError, CacheError, IntegrityError, NotCached
from blockstore.export import Export
from blockstore.prefetch import Readahead

NONE = Readahead(maximum=0)


def joined(buffers) -> bytes:
    return b"".join(bytes(b) for b in buffers)


def test_reads_of_any_offset_and_length_are_the_blob(cache_dir):
    """Reads across chunk edges, of the short last chunk, and the whole blob, cold then warm,
    return exactly the blob's bytes; CachedBlob is an Export."""
    data, digest = make_blob(5 * CHUNK_SIZE + 1234, seed=1)
    with ChunkStore(cache_dir) as store:
        blob = CachedBlob(store, digest, len(data), ScriptedSource(data, digest), name="x")
        assert isinstance(blob, Export)
        cases = [(0, 1), (CHUNK_SIZE - 1, 2), (100, 3 * CHUNK_SIZE), (len(data) - 5, 5)]
        cases += [(0, len(data)), (5 * CHUNK_SIZE, 1234), (0, 0)]
        for _ in range(2):
            for offset, length in cases:
                assert joined(blob.read(offset, length)) == data[offset : offset + length]
        with pytest.raises(OSError):
            blob.read(len(data) - 1, 2)
        blob.close()


def test_offline_miss_fails_fast_and_hits_still_serve(cache_dir):
    """Offline, a cached range is served and an uncached one raises NotCached (EIO) at once."""
    data, digest = make_blob(4 * CHUNK_SIZE, seed=2)
    with ChunkStore(cache_dir) as store:
        online = CachedBlob(store, digest, len(data), ScriptedSource(data, digest))
        online.read(0, CHUNK_SIZE)
        online.close()
        offline = CachedBlob(store, digest, len(data), None)
        assert joined(offline.read(10, 100)) == data[10:110]
        started = time.monotonic()
        with pytest.raises(NotCached) as caught:
            offline.read(3 * CHUNK_SIZE, 10)
        assert caught.value.errno == errno.EIO
        assert time.monotonic() - started < 0.5


def test_complete_blob_is_sealed_and_refetched_chunks_are_checked(cache_dir):
    """prefetch() fetches everything and seals; after eviction, a source that now sends
    other bytes is caught against the sealed checksums: EIO, nothing wrong stored."""
    data, digest = make_blob(8 * CHUNK_SIZE + 7, seed=3)
    source = ScriptedSource(data, digest)
    with ChunkStore(cache_dir) as store:
        blob = CachedBlob(store, digest, len(data), source)
        progress: list[int] = []
        blob.prefetch(progress.append)
        assert sum(progress) == len(data)
        info = store.blobs()[0]
        assert info.sealed and info.cached_fraction == 1.0
        assert store.stats()["seals"] == 1
        store.remove(digest)  # sealed sums go with an rm; re-seal, then evict one chunk
        blob = CachedBlob(store, digest, len(data), source)
        blob.prefetch()
        record = store.lookup(digest)
        assert record.sealed
        store.drop_chunks(digest, [])  # no-op
        assert flip_stored_byte(store, digest, 2, 100)
        assert store.drop_chunks(digest, [2]) == 1
        source.fault = "corrupt"
        with pytest.raises(IntegrityError) as caught:
            blob.read(2 * CHUNK_SIZE, 10)
        assert isinstance(caught.value, BlobReadError) and caught.value.errno == errno.EIO
        assert store.lookup(digest).present == record.chunks - 1
        source.fault = None
        third = slice(2 * CHUNK_SIZE, 3 * CHUNK_SIZE)
        assert joined(blob.read(2 * CHUNK_SIZE, CHUNK_SIZE)) == data[third]
        blob.close()


def test_blob_not_matching_its_digest_is_dropped(cache_dir):
    """A source whose bytes are not the digest's: prefetch raises IntegrityError and the
    blob is gone from the cache."""
    data, _ = make_blob(3 * CHUNK_SIZE, seed=4)
    _, other_digest = make_blob(3 * CHUNK_SIZE, seed=5)
    with ChunkStore(cache_dir) as store:
        blob = CachedBlob(store, other_digest, len(data), ScriptedSource(data, other_digest))
        with pytest.raises(IntegrityError):
            blob.prefetch()
        assert store.lookup(other_digest) is None
        assert store.stats()["seal_failures"] == 1


def test_corrupt_stored_chunk_is_dropped_and_fetched_again(cache_dir):
    """A flipped bit in a stored value (data or checksum) is never served: counted,
    dropped and fetched again online; EIO offline."""
    data, digest = make_blob(3 * CHUNK_SIZE, seed=6)
    source = ScriptedSource(data, digest)
    with ChunkStore(cache_dir) as store:
        blob = CachedBlob(store, digest, len(data), source)
        blob.read(0, len(data))
        for position in (3, 5000):  # in the checksum, in the data
            assert flip_stored_byte(store, digest, 1, position)
            before = len(source.requests)
            assert joined(blob.read(0, len(data))) == data
            assert len(source.requests) == before + 1
        assert store.stats()["checksum_failures"] == 2
        assert flip_stored_byte(store, digest, 0, 9)
        offline = CachedBlob(store, digest, len(data), None)
        with pytest.raises(BlobReadError):
            offline.read(0, 10)
        assert joined(offline.read(CHUNK_SIZE, 10)) == data[CHUNK_SIZE : CHUNK_SIZE + 10]


def test_eviction_keeps_the_cap_and_spares_pinned_blobs(cache_dir):
    """Under a 40-chunk cap, a pinned 32-chunk blob stays whole while reading another
    32-chunk blob evicts that one's least recently used chunks."""
    pinned_data, pinned = make_blob(32 * CHUNK_SIZE, seed=7)
    other_data, other = make_blob(32 * CHUNK_SIZE, seed=8)
    with ChunkStore(cache_dir, size_cap=40 * CHUNK_SIZE) as store:
        store.pin(pinned, len(pinned_data))
        a = CachedBlob(store, pinned, len(pinned_data), ScriptedSource(pinned_data, pinned))
        b = CachedBlob(
            store, other, len(other_data), ScriptedSource(other_data, other), readahead=NONE
        )
        a.prefetch()
        for offset in range(0, len(other_data), CHUNK_SIZE):
            assert joined(b.read(offset, CHUNK_SIZE)) == other_data[offset : offset + CHUNK_SIZE]
        infos = {i.digest: i for i in store.blobs()}
        assert infos[pinned].present == 32 and infos[pinned].pinned and infos[pinned].sealed
        assert infos[other].present < 8
        with store.env.reader() as txn:  # eviction never walks past pinned chunks
            assert txn.stat(store.dbs[DB_LRU])["entries"] == infos[other].present
        assert store.stats()["evictions"] > 0
        # The newest chunks survived, the oldest went.
        assert store.missing(store.lookup(other).blob_id, range(31, 32)) == []
        assert store.missing(store.lookup(other).blob_id, range(0, 1)) == [0]
        store.unpin(pinned)
        a.close()
        b.close()
    with ChunkStore(cache_dir, size_cap=8 * CHUNK_SIZE) as store:
        assert store.gc()["evicted_chunks"] > 0
        assert store.stats()["stored_bytes"] <= 8 * CHUNK_SIZE


def test_recency_decides_what_is_evicted(cache_dir, monkeypatch):
    """A chunk read again recently outlives chunks stored after it but not read since."""
    monkeypatch.setattr(recency, "RESOLUTION_US", 0)
    data, digest = make_blob(10 * CHUNK_SIZE, seed=9)
    with ChunkStore(cache_dir, size_cap=6 * CHUNK_SIZE) as store:
        blob = CachedBlob(store, digest, len(data), ScriptedSource(data, digest), readahead=NONE)
        blob.read(0, 5 * CHUNK_SIZE)
        store.flush()
        time.sleep(0.01)
        blob.read(0, 10)  # touch chunk 0
        store.flush()
        blob.read(5 * CHUNK_SIZE, 3 * CHUNK_SIZE)  # over the cap: evicts the three oldest
        blob_id = store.lookup(digest).blob_id
        assert store.missing(blob_id, range(0, 1)) == []
        assert store.missing(blob_id, range(1, 2)) == [1]


def test_map_grows_without_settings(cache_dir, monkeypatch):
    """With a 1 MiB initial map, storing 8 MiB grows the map and loses nothing."""
    monkeypatch.setattr(cache_env, "INITIAL_MAP_SIZE", 1 << 20)
    data, digest = make_blob(8 << 20, seed=10)
    with ChunkStore(cache_dir) as store:
        blob = CachedBlob(store, digest, len(data), ScriptedSource(data, digest))
        blob.prefetch()
        assert store.stats()["map_bytes"] > 8 << 20
        offline = CachedBlob(store, digest, len(data), None)
        assert joined(offline.read(0, len(data))) == data


def test_chunk_size_is_checked_when_opening(cache_dir):
    """A cache recorded with another chunk size refuses to open with a clear CacheError."""
    with ChunkStore(cache_dir) as store:
        store.env.write(lambda txn: txn.put(b"chunk_size", U64.pack(65536), db=store.dbs[DB_META]))
    with pytest.raises(CacheError, match="65536"):
        ChunkStore(cache_dir)


def test_hit_does_not_wait_behind_a_slow_miss(cache_dir):
    """While one reader waits 2 s on a slow source, a hit in another thread returns at once."""
    data, digest = make_blob(4 * CHUNK_SIZE, seed=11)
    source = ScriptedSource(data, digest)
    with ChunkStore(cache_dir) as store:
        blob = CachedBlob(store, digest, len(data), source)
        blob.read(0, 10)
        source.delay = 2.0
        slow = threading.Thread(target=blob.read, args=(3 * CHUNK_SIZE, 10))
        slow.start()
        time.sleep(0.1)
        started = time.monotonic()
        assert joined(blob.read(0, 100)) == data[:100]
        assert time.monotonic() - started < 0.5
        slow.join()
        blob.close()


def test_refs_and_manifests_survive_reopening(cache_dir):
    """Resolved references and raw manifests are kept for offline resolution."""
    record = {
        "reference": "127.0.0.1:5000/demo/img:latest",
        "platform": "linux/amd64",
        "manifest_digest": "sha256:" + "a" * 64,
        "platforms": [],
        "layers": [{"index": 0, "digest": "sha256:" + "b" * 64, "size": 5, "mediaType": "x"}],
    }
    with ChunkStore(cache_dir) as store:
        store.put_ref(record["reference"], "linux/amd64", record)
        store.put_manifest("sha256:" + "a" * 64, b'{"schemaVersion":2}')
    with ChunkStore(cache_dir) as store:
        assert store.get_ref(record["reference"], "linux/amd64") == record
        assert store.get_ref(record["reference"], "linux/arm64") is None
        assert store.refs() == [record]
        assert store.get_manifest("sha256:" + "a" * 64) == b'{"schemaVersion":2}'
        assert store.get_manifest("sha256:" + "c" * 64) is None


def test_size_mismatch_is_refused(cache_dir):
    """One digest has one size: opening a cached blob with another size is a CacheError."""
    data, digest = make_blob(2 * CHUNK_SIZE, seed=12)
    with ChunkStore(cache_dir) as store:
        CachedBlob(store, digest, len(data), ScriptedSource(data, digest)).read(0, 1)
        with pytest.raises(CacheError):
            CachedBlob(store, digest, len(data) + 1, None)


def test_two_stores_on_one_directory_in_one_process(cache_dir):
    """Opening a cache twice in one process shares one LMDB environment: closing one
    store leaves the other working."""
    data, digest = make_blob(3 * CHUNK_SIZE, seed=13)
    first = ChunkStore(cache_dir)
    second = ChunkStore(cache_dir)
    assert first.env is second.env
    CachedBlob(first, digest, len(data), ScriptedSource(data, digest)).read(0, len(data))
    first.close()
    assert joined(CachedBlob(second, digest, len(data), None).read(0, len(data))) == data
    second.close()
    with ChunkStore(cache_dir) as third:
        assert third.lookup(digest).present == 3


def test_offline_blob_sees_chunks_stored_after_it_was_opened(cache_dir):
    """An offline export opened before its blob was ever cached serves the chunks another
    reader stores later."""
    data, digest = make_blob(2 * CHUNK_SIZE, seed=14)
    with ChunkStore(cache_dir) as store:
        offline = CachedBlob(store, digest, len(data), None)
        with pytest.raises(NotCached):
            offline.read(0, 10)
        CachedBlob(store, digest, len(data), ScriptedSource(data, digest)).read(0, len(data))
        assert joined(offline.read(0, len(data))) == data


def test_read_after_the_store_closed_is_eio(cache_dir):
    """A late reader of a closed store gets EIO, not an LMDB error."""
    data, digest = make_blob(CHUNK_SIZE, seed=15)
    store = ChunkStore(cache_dir)
    blob = CachedBlob(store, digest, len(data), None)
    store.close()
    with pytest.raises(BlobReadError) as caught:
        blob.read(0, 10)
    assert caught.value.errno == errno.EIO


def test_read_cached_serves_checked_hits_and_never_calls_the_source(cache_dir):
    """read_cached returns the bytes of fully cached, intact ranges (counted as hits) and
    None for anything else (cold, partly cached, corrupt, out of range), without ever
    asking the source, counting or dropping anything; read then does the work."""
    data, digest = make_blob(4 * CHUNK_SIZE + 100, seed=31)
    source = ScriptedSource(data, digest)
    with ChunkStore(cache_dir) as store:
        blob = CachedBlob(store, digest, len(data), source, readahead=NONE)
        assert blob.read_cached(0, 10) is None  # the blob is not even known
        blob.read(0, 2 * CHUNK_SIZE)
        blob.read(4 * CHUNK_SIZE, 100)
        asked = len(source.requests)
        before = store.stats()
        assert blob.read_cached(CHUNK_SIZE, 2 * CHUNK_SIZE) is None  # chunk 2 missing
        assert blob.read_cached(len(data) - 1, 2) is None
        for offset, length in [(5, 10), (CHUNK_SIZE - 3, 6), (0, 2 * CHUNK_SIZE)]:
            assert joined(blob.read_cached(offset, length)) == data[offset : offset + length]
        assert joined(blob.read_cached(4 * CHUNK_SIZE, 100)) == data[4 * CHUNK_SIZE :]
        assert flip_stored_byte(store, digest, 1, 4000)
        assert blob.read_cached(CHUNK_SIZE, 10) is None
        after = store.stats()
        assert after["hits"] - before["hits"] == 6  # chunks served
        assert after["misses"] == before["misses"]
        assert after["checksum_failures"] == before["checksum_failures"]
        assert len(source.requests) == asked
        assert joined(blob.read(CHUNK_SIZE, 10)) == data[CHUNK_SIZE : CHUNK_SIZE + 10]
        assert store.stats()["checksum_failures"] == before["checksum_failures"] + 1
        assert len(source.requests) == asked + 1
        blob.close()


def test_sequential_hits_from_read_cached_still_drive_readahead(cache_dir):
    """A reader served only by read_cached, sequentially, gets the range past it fetched in
    the background, as a reader through read does."""
    data, digest = make_blob(4 << 20, seed=32)
    source = ScriptedSource(data, digest)
    with ChunkStore(cache_dir) as store:
        warm = CachedBlob(store, digest, len(data), source, readahead=NONE)
        warm.read(0, 256 << 10)
        warm.close()
        blob = CachedBlob(store, digest, len(data), source)
        for offset in range(0, 256 << 10, 64 << 10):
            got = blob.read_cached(offset, 64 << 10)
            assert joined(got) == data[offset : offset + (64 << 10)]
        blob_id = store.lookup(digest).blob_id
        ahead = range(256 << 10 >> 15, 384 << 10 >> 15)
        deadline = time.monotonic() + 5
        while store.missing(blob_id, ahead) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert store.missing(blob_id, ahead) == []
        blob.close()
