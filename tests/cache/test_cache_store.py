"""The chunk store and CachedBlob against in-memory sources: bytes, seals, eviction."""

from __future__ import annotations

import errno
import hashlib
import itertools
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from cache_rig import evict_chunk
from cache_sources import ScriptedSource, make_blob
from rig.stored_chunks import flip_stored_byte
from rig.waiting import wait_for

import blockstore.cache.env as cache_env
import blockstore.cache.integrity as integrity
import blockstore.cache.recency as recency
import blockstore.cache.seal as seal_mod
from blockstore.cache import CHUNK_SIZE, CachedBlob, ChunkStore, holds
from blockstore.cache.errors import ChunkIntegrityError
from blockstore.cache.layout import DB_LRU
from blockstore.errors import BlobReadError, IntegrityError, NotCached
from blockstore.export import Export
from blockstore.prefetch import Readahead

NONE = Readahead(maximum=0)


def joined(buffers) -> bytes:
    return b"".join(bytes(b) for b in buffers)


def test_reads_of_any_offset_and_length_are_the_blob(cache_dir):
    """Reads across chunk edges, of the short last chunk, and the whole blob, cold then warm,
    return exactly the blob's bytes; CachedBlob has what an Export has."""
    data, digest = make_blob(5 * CHUNK_SIZE + 1234, seed=1)
    with ChunkStore(cache_dir) as store:
        blob: Export = CachedBlob(store, digest, len(data), ScriptedSource(data, digest), name="x")
        assert blob.name == "x" and blob.size == len(data)
        assert all(callable(getattr(blob, m)) for m in ("read", "read_cached", "cache"))
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


def test_a_size_some_registry_gave_wrong_costs_the_unproven_part_not_the_layer(cache_dir, caplog):
    """A chunk stored while the blob was believed to be 1,000,000 bytes (a lying
    manifest and HEAD): opened again with its true size, the unproven part is dropped
    with a warning and the blob reads right; it used to be refused (exit 8) until removed
    by hand. Once sealed at its true size, a wrong size given later is refused, and the
    sealed bytes stay."""
    data, digest = make_blob(4 * CHUNK_SIZE, seed=7)
    with ChunkStore(cache_dir) as store:
        lied = CachedBlob(store, digest, 1_000_000, ScriptedSource(data, digest))
        assert joined(lied.read(0, 100)) == data[:100]
        lied.close()
        assert store.lookup(digest).size == 1_000_000
        honest = CachedBlob(store, digest, len(data), ScriptedSource(data, digest))
        assert joined(honest.read(0, len(data))) == data
        honest.prefetch()
        honest.close()
        assert "was cached as 1000000 bytes, never proven" in caplog.text
        assert store.lookup(digest).sealed and store.lookup(digest).size == len(data)
        with pytest.raises(IntegrityError, match="checked against its digest in the cache"):
            CachedBlob(store, digest, 1_000_000, ScriptedSource(data, digest))
        assert store.lookup(digest).sealed


def test_a_sealed_chunk_a_mirror_alters_is_fetched_again_from_the_upstream(cache_dir):
    """A sealed blob's evicted chunk, fetched again through a mirror that now alters it:
    the sealed checksums refuse the mirror's bytes, and the upstream's (right) bytes are
    served and stored, where the read used to fail with EIO for as long as the mirror
    lied, the upstream never asked."""
    data, digest = make_blob(8 * CHUNK_SIZE, seed=71)
    with ChunkStore(cache_dir) as store:
        CachedBlob(store, digest, len(data), ScriptedSource(data, digest)).prefetch()
    with ChunkStore(cache_dir, size_cap=4 * CHUNK_SIZE) as store:
        assert store.gc()["evicted_chunks"] > 0
        record = store.lookup(digest)
        index = store.missing(record.blob_id, range(record.chunks))[0]
        mirror, upstream = ScriptedSource(data, digest), ScriptedSource(data, digest)
        mirror.fault = "corrupt"
        blob = CachedBlob(store, digest, len(data), mirror, upstream=upstream, readahead=NONE)
        wanted = slice(index * CHUNK_SIZE, (index + 1) * CHUNK_SIZE)
        assert joined(blob.read(index * CHUNK_SIZE, CHUNK_SIZE)) == data[wanted]
        assert store.missing(record.blob_id, [index]) == []
        assert upstream.requests, "the upstream was not asked"
        blob.close()


def test_complete_blob_is_sealed_and_refetched_chunks_are_checked(cache_dir):
    """prefetch() fetches everything and seals; chunks then really evicted (a smaller cap,
    gc) and fetched again from a source that now sends other bytes are refused against the
    sealed checksums: EIO, checksum_failures counted, nothing stored; once the source is
    healthy again the right bytes are served."""
    data, digest = make_blob(8 * CHUNK_SIZE + 7, seed=3)
    source = ScriptedSource(data, digest)
    with ChunkStore(cache_dir) as store:
        blob = CachedBlob(store, digest, len(data), source, readahead=NONE)
        progress: list[int] = []
        blob.prefetch(progress.append)
        assert sum(progress) == len(data)
        info = store.blobs()[0]
        assert info.sealed and info.cached_fraction == 1.0
        assert store.stats()["seals"] == 1
        blob.close()
    with ChunkStore(cache_dir, size_cap=4 * CHUNK_SIZE) as store:
        assert store.gc()["evicted_chunks"] > 0
        record = store.lookup(digest)
        assert record.sealed
        evicted = store.missing(record.blob_id, range(record.chunks))
        assert evicted
        index = evicted[0]
        blob = CachedBlob(store, digest, len(data), source, readahead=NONE)
        failures = store.stats()["checksum_failures"]
        source.fault = "corrupt"
        with pytest.raises(IntegrityError) as caught:
            blob.read(index * CHUNK_SIZE, 10)
        assert isinstance(caught.value, BlobReadError) and caught.value.errno == errno.EIO
        assert store.stats()["checksum_failures"] == failures + 1
        assert store.missing(record.blob_id, [index]) == [index]
        source.fault = None
        wanted = slice(index * CHUNK_SIZE, (index + 1) * CHUNK_SIZE)
        assert joined(blob.read(index * CHUNK_SIZE, CHUNK_SIZE)) == data[wanted]
        blob.close()


@pytest.mark.parametrize("seal_when_whole", [True, False])
def test_reads_that_complete_a_blob_seal_it_unless_its_owner_seals_it(cache_dir, seal_when_whole):
    """Reads that fetch every chunk complete the blob. By default that seals it in the
    background; a blob opened with ``seal_when_whole=False`` (a tar layer, whose fill
    seals it once the layer is idle) stays unsealed until sealed explicitly."""
    data, digest = make_blob(6 * CHUNK_SIZE + 11, seed=9)
    with ChunkStore(cache_dir) as store:
        blob = CachedBlob(
            store,
            digest,
            len(data),
            ScriptedSource(data, digest),
            readahead=NONE,
            seal_when_whole=seal_when_whole,
        )
        try:
            assert joined(blob.read(0, len(data))) == data
            assert store.lookup(digest).present == store.lookup(digest).chunks
            became_sealed = wait_for(lambda: store.lookup(digest).sealed, timeout=1.0)
            assert became_sealed is seal_when_whole
            assert store.seal(digest) is True
        finally:
            blob.close()


@pytest.mark.parametrize("online", [True, False])
def test_a_blob_whole_but_never_sealed_is_sealed_once_opened(cache_dir, online):
    """Tried: a blob stored whole and never sealed (as a process leaves it that stopped,
    or closed its store, between the store that completed it and its background seal),
    then opened, online or offline, and read whole: every read a hit, so no fetch
    completes it. Must hold: the open seals it in the background, as a completing fetch
    would. Before, nothing but a prefetch ever sealed it again."""
    data, digest = make_blob(6 * CHUNK_SIZE + 11, seed=12)
    chunks = [data[at : at + CHUNK_SIZE] for at in range(0, len(data), CHUNK_SIZE)]
    with ChunkStore(cache_dir) as store:
        store.store_chunks(digest, len(data), 0, chunks)
    with ChunkStore(cache_dir) as store:
        assert not store.lookup(digest).sealed
        source = ScriptedSource(data, digest) if online else None
        blob = CachedBlob(store, digest, len(data), source, readahead=NONE)
        try:
            assert joined(blob.read(0, len(data))) == data
            assert wait_for(lambda: store.lookup(digest).sealed, timeout=60.0)
        finally:
            blob.close()


def test_store_refuses_a_wrong_chunk_for_a_sealed_blob(cache_dir):
    """A writer that did not see the seal (an export opened before it, another process)
    stores a chunk of a sealed blob after it was evicted: the storing transaction checks it
    against the sealed checksums. Other bytes are refused (ChunkIntegrityError, EIO),
    counted and not stored; the right bytes are stored."""
    data, digest = make_blob(4 * CHUNK_SIZE, seed=33)
    with ChunkStore(cache_dir) as store:
        blob = CachedBlob(store, digest, len(data), ScriptedSource(data, digest), readahead=NONE)
        blob.prefetch()
        blob.close()
        assert evict_chunk(store, digest, 1)
        blob_id = store.lookup(digest).blob_id
        wrong = bytes(CHUNK_SIZE)
        with pytest.raises(ChunkIntegrityError) as caught:
            store.store_chunks(digest, len(data), 0, [data[:CHUNK_SIZE], wrong])
        assert caught.value.errno == errno.EIO
        assert store.stats()["checksum_failures"] == 1
        assert store.missing(blob_id, range(4)) == [1]
        store.store_chunks(digest, len(data), 1, [data[CHUNK_SIZE : 2 * CHUNK_SIZE]])
        assert joined(CachedBlob(store, digest, len(data), None).read(0, len(data))) == data


def test_scattered_runs_are_stored_in_one_commit_and_a_refused_run_alone_is_left_out(
    cache_dir, monkeypatch
):
    """Chunks that arrive together but far apart (a trace replayed) are stored in one
    write transaction, one fsync. For a sealed blob, a run whose bytes do not match is
    refused (ChunkIntegrityError, counted) while the other runs of the batch are stored."""
    data, digest = make_blob(8 * CHUNK_SIZE, seed=36)
    chunks = [data[i : i + CHUNK_SIZE] for i in range(0, len(data), CHUNK_SIZE)]
    with ChunkStore(cache_dir) as store:
        commits = []
        real_write = store.env.write
        monkeypatch.setattr(store.env, "write", lambda work: commits.append(1) or real_write(work))
        record = store.store_runs(digest, len(data), [(0, chunks[:2]), (5, [chunks[5]])])
        assert len(commits) == 1 and record.present == 3
        assert store.missing(record.blob_id, range(8)) == [2, 3, 4, 6, 7]
        store.store_runs(digest, len(data), [(2, chunks[2:5]), (6, chunks[6:])])
        assert store.seal(digest) is True
        for index in (1, 4, 6):
            assert evict_chunk(store, digest, index)
        with pytest.raises(ChunkIntegrityError):
            store.store_runs(
                digest, len(data), [(1, [chunks[1]]), (4, [bytes(CHUNK_SIZE)]), (6, [chunks[6]])]
            )
        assert store.missing(record.blob_id, range(8)) == [4]
        assert store.stats()["checksum_failures"] == 1
        monkeypatch.undo()
        store.store_chunks(digest, len(data), 4, [chunks[4]])
        assert joined(CachedBlob(store, digest, len(data), None).read(0, len(data))) == data


def test_chunk_replaced_while_the_blob_is_hashed_is_not_sealed(cache_dir, monkeypatch):
    """Right after the last chunk is hashed, before the sealing transaction, chunk 1 is
    evicted and stored again with other bytes (the blob is not sealed yet, so nothing
    stops that): the seal does not happen, the changed chunk is dropped and counted. After
    the right bytes are stored, the blob seals and serves exactly its bytes."""
    data, digest = make_blob(4 * CHUNK_SIZE, seed=34)
    chunks = [data[i : i + CHUNK_SIZE] for i in range(0, len(data), CHUNK_SIZE)]
    real_scan = seal_mod.scan

    def scan_then_replace(env, *args):
        yield from real_scan(env, *args)
        assert evict_chunk(store, digest, 1)
        store.store_chunks(digest, len(data), 1, [bytes(CHUNK_SIZE)])

    with ChunkStore(cache_dir) as store:
        store.store_chunks(digest, len(data), 0, chunks)
        monkeypatch.setattr(seal_mod, "scan", scan_then_replace)
        assert store.seal(digest) is None
        monkeypatch.undo()
        record = store.lookup(digest)
        assert not record.sealed and store.sealed_sums(digest) is None
        assert store.missing(record.blob_id, range(4)) == [1]
        assert store.stats()["checksum_failures"] == 1
        store.store_chunks(digest, len(data), 1, [chunks[1]])
        assert store.seal(digest) is True
        assert joined(CachedBlob(store, digest, len(data), None).read(0, len(data))) == data


def test_closing_does_not_wait_for_a_seal(cache_dir, monkeypatch):
    """A background seal of a complete blob whose hashing would take about 5 s: close()
    returns within a second, the blob unsealed; reopened, it seals."""
    data, digest = make_blob(64 * CHUNK_SIZE, seed=35)
    chunks = [data[i : i + CHUNK_SIZE] for i in range(0, len(data), CHUNK_SIZE)]
    real_scan = seal_mod.scan
    hashing = threading.Event()

    def slow_scan(env, *args):
        for item in real_scan(env, *args):
            hashing.set()
            time.sleep(0.08)
            yield item

    store = ChunkStore(cache_dir)
    store.store_chunks(digest, len(data), 0, chunks)
    monkeypatch.setattr(seal_mod, "scan", slow_scan)
    store.seal_later(digest)
    assert hashing.wait(5)
    started = time.monotonic()
    store.close()
    assert time.monotonic() - started < 1.0
    monkeypatch.undo()
    with ChunkStore(cache_dir) as store:
        assert not store.lookup(digest).sealed
        assert store.seal(digest) is True


def test_a_failed_seal_is_forgotten_once_the_blob_is_stored_again(cache_dir):
    """A seal that finds the bytes wrong drops the blob and says so (False) to a seal()
    right after; once the digest is stored again, or removed, seal() of the missing blob
    says "not complete" (None), not the old failure."""
    data, _ = make_blob(2 * CHUNK_SIZE, seed=36)
    _, digest = make_blob(2 * CHUNK_SIZE, seed=37)
    chunks = [data[:CHUNK_SIZE], data[CHUNK_SIZE:]]
    with ChunkStore(cache_dir) as store:
        store.store_chunks(digest, len(data), 0, chunks)
        assert store.seal(digest) is False
        assert store.seal(digest) is False  # the blob is gone: this is why
        store.store_chunks(digest, len(data), 0, chunks[:1])
        assert store.seal(digest) is None
        store.remove(digest)
        assert store.seal(digest) is None
        store.store_chunks(digest, len(data), 0, chunks)
        assert store.seal(digest) is False
        store.remove(digest)
        assert store.seal(digest) is None


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
        assert flip_stored_byte(store, digest, 0, 11)  # the first block's checksum
        offline = CachedBlob(store, digest, len(data), None)
        with pytest.raises(BlobReadError):
            offline.read(0, 10)
        assert joined(offline.read(CHUNK_SIZE, 10)) == data[CHUNK_SIZE : CHUNK_SIZE + 10]


def test_eviction_keeps_the_cap_and_spares_pinned_blobs(cache_dir):
    """Under a 40-chunk cap, a pinned 32-chunk blob stays whole while reading another
    32-chunk blob evicts that one's least recently used chunks, down to the quarter of
    the cap (10 chunks) the pins leave it; `gc` then keeps a cap strictly."""
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
        assert infos[other].present <= 10
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


def test_a_blob_served_from_the_cache_alone_is_kept_from_eviction_while_served(cache_dir):
    """Two whole blobs, then a cap of 4 chunks: while one is served offline (no source:
    an evicted chunk could not come back), `gc` evicts only the other's chunks and names
    the held one, which still reads whole; once its server closes, `gc` evicts it too.
    A hold its server dropped leaves no file behind once eviction has looked at it."""
    held_data, held = make_blob(16 * CHUNK_SIZE, seed=21)
    other_data, other = make_blob(16 * CHUNK_SIZE, seed=22)
    with ChunkStore(cache_dir) as store:
        for data, digest in ((held_data, held), (other_data, other)):
            blob = CachedBlob(store, digest, len(data), ScriptedSource(data, digest))
            blob.prefetch()
            blob.close()
    with ChunkStore(cache_dir, size_cap=4 * CHUNK_SIZE) as store:
        offline = CachedBlob(store, held, len(held_data), None)
        result = store.gc()
        assert result["held"] == [held]
        infos = {i.digest: i for i in store.blobs()}
        assert infos[held].present == 16 and infos[other].present == 0
        assert joined(offline.read(0, len(held_data))) == held_data
        offline.close()
        result = store.gc()
        assert result["held"] == [] and result["evicted_chunks"] > 0
        assert store.stats()["stored_bytes"] <= 4 * CHUNK_SIZE
        assert list((cache_dir / "holds").iterdir()) == []


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
        assert store.stats()["map_bytes"] == 1 << 20  # the map the environment opened with
        blob = CachedBlob(store, digest, len(data), ScriptedSource(data, digest))
        blob.prefetch()
        assert store.stats()["map_bytes"] > 8 << 20
        offline = CachedBlob(store, digest, len(data), None)
        assert joined(offline.read(0, len(data))) == data


def test_hit_does_not_wait_behind_a_slow_miss(cache_dir):
    """While one reader's miss is held unanswered by the source (ten seconds at most), a
    hit in another thread returns before the source answers it. Measured against the
    held miss, not the clock: a loaded machine may pause the hit longer than any bound."""
    data, digest = make_blob(4 * CHUNK_SIZE, seed=11)
    source = ScriptedSource(data, digest)
    with ChunkStore(cache_dir) as store:
        blob = CachedBlob(store, digest, len(data), source)
        blob.read(0, 10)
        asked = len(source.requests)
        source.answering.clear()
        answer = threading.Timer(10, source.answering.set)
        answer.start()
        slow = threading.Thread(target=blob.read, args=(3 * CHUNK_SIZE, 10))
        slow.start()
        assert wait_for(lambda: len(source.requests) > asked)
        assert joined(blob.read(0, 100)) == data[:100]
        assert not source.answering.is_set(), "the hit waited for the miss"
        source.answering.set()
        answer.cancel()
        slow.join()
        blob.close()


def test_refs_and_manifests_survive_reopening(cache_dir):
    """Resolved references and raw manifests are kept for offline resolution."""
    layer = {"digest": "sha256:" + "b" * 64, "size": 5, "mediaType": "x"}
    manifest = json.dumps({"schemaVersion": 2, "layers": [layer]}).encode()
    manifest_digest = "sha256:" + hashlib.sha256(manifest).hexdigest()
    record = {
        "reference": "127.0.0.1:5000/demo/img:latest",
        "platform": "linux/amd64",
        "manifest_digest": manifest_digest,
        "platforms": [],
        "layers": [{"index": 0, **layer}],
    }
    with ChunkStore(cache_dir) as store:
        store.images.put(record["reference"], "linux/amd64", record)
        store.images.put_manifest(manifest_digest, manifest)
    with ChunkStore(cache_dir) as store:
        assert store.images.get(record["reference"], "linux/amd64") == record
        assert store.images.get(record["reference"], "linux/arm64") is None
        assert store.images.all() == [record]
        assert store.images.manifest(manifest_digest) == manifest
        assert store.images.manifest("sha256:" + "c" * 64) is None


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


def test_read_cached_hashes_nothing_on_a_partial_miss_and_only_what_it_serves(
    cache_dir, monkeypatch
):
    """read_cached of a range whose last chunk is missing returns None without hashing any
    block (read will check them); a hit hashes what it serves once: a 4 KiB read one 4 KiB
    block, a read of three whole chunks each chunk's whole-chunk sum."""
    data, digest = make_blob(4 * CHUNK_SIZE, seed=38)
    with ChunkStore(cache_dir) as store:
        blob = CachedBlob(store, digest, len(data), ScriptedSource(data, digest), readahead=NONE)
        blob.read(0, 3 * CHUNK_SIZE)
        hashed: list[int] = []
        real_xxh3 = integrity._xxh3

        def counting_xxh3(data, seed):
            hashed.append(len(data))
            return real_xxh3(data, seed)

        monkeypatch.setattr(integrity, "_xxh3", counting_xxh3)
        assert blob.read_cached(0, 4 * CHUNK_SIZE) is None
        assert hashed == []
        offset = CHUNK_SIZE + 3 * integrity.BLOCK
        assert joined(blob.read_cached(offset, 4096)) == data[offset : offset + 4096]
        assert hashed == [integrity.BLOCK]
        hashed.clear()
        assert joined(blob.read_cached(0, 3 * CHUNK_SIZE)) == data[: 3 * CHUNK_SIZE]
        assert hashed == [CHUNK_SIZE] * 3  # one sum per whole chunk
        blob.close()


def test_a_hold_of_whole_chunks_serves_no_chunk_that_fails_its_check(cache_dir):
    """Tried: one bit flipped, in turn, in the checksums, the first block and the last
    byte of each whole chunk of a blob with a short tail, then holds of whole chunks
    (the sequential reader's hit, checked one chunk sum at a time), of the whole blob
    and of a part of a chunk. Must hold: a hold that covers the damaged chunk gives
    nothing; every other hold gives the blob's own bytes, chunk-aligned or not."""
    data, digest = make_blob(5 * CHUNK_SIZE + 100, seed=47)
    whole = 5 * CHUNK_SIZE
    with ChunkStore(cache_dir) as store:
        CachedBlob(store, digest, len(data), ScriptedSource(data, digest)).prefetch()
        blob = CachedBlob(store, digest, len(data), None)

        def held(offset: int, length: int) -> bytes | None:
            got = blob.hold_cached(offset, length)
            if got is None:
                return None
            views, release = got
            try:
                return b"".join(bytes(v) for v in views)
            finally:
                release()

        assert held(0, whole) == data[:whole]
        assert held(0, len(data)) == data
        for index in range(5):
            for position in (3, integrity.SUM_SIZE + 7, integrity.SUM_SIZE + CHUNK_SIZE - 1):
                assert flip_stored_byte(store, digest, index, position)
                assert held(0, whole) is None
                assert held(index * CHUNK_SIZE, CHUNK_SIZE) is None
                assert held(0, len(data)) is None
                other = (index + 1) % 5 * CHUNK_SIZE
                assert held(other, CHUNK_SIZE) == data[other : other + CHUNK_SIZE]
                assert flip_stored_byte(store, digest, index, position)  # mended
        assert held(CHUNK_SIZE, 3 * CHUNK_SIZE) == data[CHUNK_SIZE : 4 * CHUNK_SIZE]
        assert held(whole, 100) == data[whole:]
        blob.close()


class CountingReadahead(Readahead):
    """Readahead that counts the reads it is told of."""

    def __init__(self) -> None:
        super().__init__()
        self.advised = 0

    def advise(self, offset: int, length: int, size: int):
        self.advised += 1
        return super().advise(offset, length, size)


def test_readahead_rests_while_the_blob_is_whole(cache_dir):
    """Sequential hits on a blob that is wholly cached (sealed) are not advised to readahead,
    through read or read_cached; once chunks are evicted and one is missed, readahead is
    told of reads again."""
    data, digest = make_blob(16 * CHUNK_SIZE, seed=39)
    source = ScriptedSource(data, digest)
    with ChunkStore(cache_dir) as store:
        CachedBlob(store, digest, len(data), source, readahead=NONE).prefetch()
        policy = CountingReadahead()
        blob = CachedBlob(store, digest, len(data), source, readahead=policy)
        for offset in range(0, len(data), 4 * CHUNK_SIZE):
            wanted = data[offset : offset + 2 * CHUNK_SIZE]
            assert joined(blob.read_cached(offset, 2 * CHUNK_SIZE)) == wanted
            assert joined(blob.read(offset + 2 * CHUNK_SIZE, 10))
        assert policy.advised == 0
        assert evict_chunk(store, digest, 0) and evict_chunk(store, digest, 15)
        assert joined(blob.read(0, 100)) == data[:100]
        assert policy.advised == 1
        blob.close()


def test_the_cache_map_lets_the_kernel_read_ahead(cache_dir):
    """After a reboot the cache's pages come from disk on first touch. Tried: a store
    opened and read. Must hold: its data.mdb mapping carries no random-access hint
    (``rr`` in /proc/self/smaps, LMDB's ``readahead=False``), which would make each fault
    read one 4 KiB page: a warm mount then read a dropped page cache at 0.43x nbdkit
    file, against 0.87x with the kernel's readahead."""
    data, digest = make_blob(3 * CHUNK_SIZE, seed=7)
    with ChunkStore(cache_dir) as store:
        blob = CachedBlob(store, digest, len(data), ScriptedSource(data, digest), readahead=NONE)
        assert joined(blob.read(0, len(data))) == data
        mapping = str(cache_dir / "data.mdb")
        smaps = Path("/proc/self/smaps").read_text().split("\n")
        headers = [i for i, line in enumerate(smaps) if line.endswith(mapping)]
        assert headers, "data.mdb is not mapped"
        for at in headers:
            flags = next(line for line in smaps[at:] if line.startswith("VmFlags:"))
            assert " rr" not in flags, flags


def test_verify_keeps_a_blob_stored_while_it_scans(cache_dir, monkeypatch):
    """A blob stored (and pinned) while ``verify`` walks the chunks was not in the list of
    blobs verify took first: its chunks are no orphans, and stay. Verify used to drop them
    all, and the pinned layer then read EIO offline (another process's seal made it look
    whole and sealed meanwhile)."""
    old, old_digest = make_blob(3 * CHUNK_SIZE, seed=31)
    new, new_digest = make_blob(5 * CHUNK_SIZE, seed=32)
    listed, stored = threading.Event(), threading.Event()
    walk = seal_mod.scan

    def slow_scan(env, *args, **kwargs):
        # Verify's walk (the first after the patch): the blobs are listed, the chunks not
        # walked yet, and no transaction is held.
        if not listed.is_set():
            listed.set()
            assert stored.wait(10)
        yield from walk(env, *args, **kwargs)

    with ChunkStore(cache_dir) as store:
        CachedBlob(store, old_digest, len(old), ScriptedSource(old, old_digest)).prefetch()
        monkeypatch.setattr(seal_mod, "scan", slow_scan)
        report: list = []
        verifier = threading.Thread(target=lambda: report.append(store.verify()))
        verifier.start()
        assert listed.wait(10)
        # Read whole (its seal waits for verify's, in this process: one at a time).
        blob = CachedBlob(store, new_digest, len(new), ScriptedSource(new, new_digest))
        store.pin(new_digest, len(new))
        assert joined(blob.read(0, len(new))) == new
        stored.set()
        verifier.join(30)
        assert report and report[0].ok and report[0].orphan_chunks == 5  # seen, not dropped
        blob.close()
        offline = CachedBlob(store, new_digest, len(new), None)
        assert joined(offline.read(0, len(new))) == new
        assert store.lookup(new_digest).pinned


def test_an_export_follows_its_blob_removed_and_stored_again(cache_dir):
    """An offline export of a sealed blob keeps reading after ``cache rm`` and a new
    prefetch (another process, here the same store): the blob's record is new, under a
    new id, and the export's first miss takes it up instead of failing with EIO for as
    long as it lives."""
    data, digest = make_blob(4 * CHUNK_SIZE, seed=41)
    with ChunkStore(cache_dir) as store:
        CachedBlob(store, digest, len(data), ScriptedSource(data, digest)).prefetch()
        offline = CachedBlob(store, digest, len(data), None)
        assert joined(offline.read(0, CHUNK_SIZE)) == data[:CHUNK_SIZE]
        old_id = store.lookup(digest).blob_id
        assert store.remove(digest)
        again = CachedBlob(store, digest, len(data), ScriptedSource(data, digest))
        again.prefetch()
        again.close()
        assert store.lookup(digest).blob_id != old_id and store.lookup(digest).sealed
        assert joined(offline.read(0, len(data))) == data
        offline.close()


def test_a_cap_set_by_another_opener_holds_for_a_store_already_open(cache_dir):
    """A store opened with the default cap; then ``cache gc --cache-size`` (here another
    opener with a cap of 6 chunks) keeps a smaller one. The store already open evicts
    down to that cap on its next write, instead of growing to its own cap of 10 GiB."""
    first, first_digest = make_blob(8 * CHUNK_SIZE, seed=61)
    second, second_digest = make_blob(8 * CHUNK_SIZE, seed=62)
    with ChunkStore(cache_dir) as store:
        CachedBlob(store, first_digest, len(first), ScriptedSource(first, first_digest)).prefetch()
        with ChunkStore(cache_dir, size_cap=6 * CHUNK_SIZE) as capper:
            capper.gc()
        blob = CachedBlob(store, second_digest, len(second), ScriptedSource(second, second_digest))
        assert joined(blob.read(0, len(second))) == second
        blob.close()
        store.flush()
        assert store.size_cap == 6 * CHUNK_SIZE
        assert store.stats()["stored_bytes"] <= 6 * CHUNK_SIZE + CHUNK_SIZE + 4096


def test_pins_over_the_cap_leave_unpinned_layers_a_working_set(cache_dir, caplog):
    """A 12 MiB layer pinned in a cache capped at 8 MiB, then a 1 MiB unpinned layer read
    twice: the second read is served from the cache (no request to the registry), as
    the others keep a quarter of the cap beyond the pins; the log says the pins
    crowd the cap, once. Evicting every unpinned chunk in the commit that stored it
    made each read of such a layer a fetch again."""
    pinned_data, pinned_digest = make_blob(12 << 20, seed=560)
    data, digest = make_blob(1 << 20, seed=561)
    with ChunkStore(cache_dir, size_cap=8 << 20) as store:
        store.pin(pinned_digest, len(pinned_data))
        pinned = CachedBlob(
            store, pinned_digest, len(pinned_data), ScriptedSource(pinned_data, pinned_digest)
        )
        pinned.prefetch()
        source = ScriptedSource(data, digest)
        blob = CachedBlob(store, digest, len(data), source)
        assert b"".join(bytes(b) for b in blob.read(0, len(data))) == data
        asked = len(source.requests)
        assert b"".join(bytes(b) for b in blob.read(0, len(data))) == data
        assert len(source.requests) == asked
        assert store.lookup(pinned_digest).sealed
        blob.close()
        pinned.close()
    assert caplog.text.count("pinned layers hold about") == 1


def test_asking_for_room_for_a_large_blob_says_nothing_of_pins(cache_dir, caplog):
    """Tried: nothing pinned, 1 MiB stored under a 4 MiB cap, then the room asked for a
    16 MiB blob (as a fill or an indexing pass asks before it stores). Must hold: no
    word of pinned layers (there are none), and the blob named as larger than the cap.
    Before, the bytes not stored yet were counted as pinned: "pinned layers hold about
    16 MiB of the cache's 4 MiB cap", on a user's terminal, with nothing pinned."""
    data, digest = make_blob(1 << 20, seed=570)
    with ChunkStore(cache_dir, size_cap=4 << 20) as store:
        blob = CachedBlob(store, digest, len(data), ScriptedSource(data, digest))
        blob.prefetch()
        blob.close()
        big = "sha256:" + "5" * 64
        assert store.no_room(big, 16 << 20) is None  # the disk has room
        assert store.over_cap(big, 16 << 20) == (
            f"{big} (16.0 MiB) is larger than the 3.6 MiB"
            " eviction keeps the cache to under its 4.0 MiB cap"
        )
        assert store.over_cap(digest, len(data)) is None
    assert "pinned layers" not in caplog.text


def test_pins_crowding_a_small_cap_are_told_in_the_units_that_show_them(cache_dir, caplog):
    """A 2 MiB layer pinned in a cache capped at 1 MiB, then an unpinned layer read:
    the warning that the pins crowd the cap gives each size in a unit that shows it
    (the others' 256 KiB, not "0 MiB", as whole MiB rounded a quarter of the cap to,
    and the pins' size to a tenth of a MiB)."""
    pinned_data, pinned_digest = make_blob(2 << 20, seed=570)
    data, digest = make_blob(4 * CHUNK_SIZE, seed=571)
    with ChunkStore(cache_dir, size_cap=1 << 20) as store:
        store.pin(pinned_digest, len(pinned_data))
        for blob_data, blob_digest in [(pinned_data, pinned_digest), (data, digest)]:
            blob = CachedBlob(
                store, blob_digest, len(blob_data), ScriptedSource(blob_data, blob_digest)
            )
            blob.prefetch()
            blob.close()
    # Said once, when the pins first crowd the cap: that may be partway through the
    # pinned layer's fill (how many chunks a commit holds depends on timing), so the
    # pinned size is anything up to the whole layer.
    said = re.search(
        r"pinned layers hold about (\d+\.\d) (KiB|MiB) of the cache's 1\.0 MiB cap: "
        r"the others keep 256\.0 KiB beyond them",
        caplog.text,
    )
    assert said, caplog.text
    size, unit = float(said.group(1)), said.group(2)
    assert 1.0 <= size < 1024 and size * (1 << 10 if unit == "KiB" else 1 << 20) <= 2 << 20


def test_counters_never_go_down_while_they_are_flushed(cache_dir):
    """Hits counted on one thread, flushed to the cache on another (as the store's own
    flush does each second), and the totals read meanwhile (as a metrics scrape does):
    no total read is ever below one read before it. Before, a flush took the pending
    counts before its commit, and a read between saw them in neither place: a drop
    that Prometheus takes for a counter reset."""
    data, digest = make_blob(4 * CHUNK_SIZE, seed=31)
    with ChunkStore(cache_dir, flush_interval=3600) as store:
        blob = CachedBlob(store, digest, len(data), ScriptedSource(data, digest))
        blob.prefetch()
        stop = threading.Event()

        def hit() -> None:
            while not stop.is_set():
                assert blob.read_cached(0, 4096) is not None

        def flush() -> None:
            while not stop.is_set():
                store.flush()

        workers = [threading.Thread(target=hit), threading.Thread(target=flush)]
        for worker in workers:
            worker.start()
        try:
            # At least 300 reads, and on until the hit thread has been scheduled: on a
            # loaded machine 300 reads can all fall in one of its waits for the GIL.
            deadline = time.monotonic() + 30
            seen = [store.stats()["hits"] for _ in range(300)]
            while seen[-1] == seen[0] and time.monotonic() < deadline:
                seen.append(store.stats()["hits"])
        finally:
            stop.set()
            for worker in workers:
                worker.join()
        blob.close()
    assert seen[-1] > seen[0]
    assert all(later >= earlier for earlier, later in itertools.pairwise(seen))


def test_a_stale_hold_file_removed_twice_never_takes_a_live_hold_with_it(cache_dir):
    """Two evicting processes meet a hold file nobody holds: the first removes it; a
    server then makes a new one and holds it; the second, which opened the old file
    before, finds that one unheld. It must not remove the path, which now names the
    live hold: the server's layer would then be evicted under it."""
    digest = "sha256:" + "ab" * 32
    (cache_dir / "holds").mkdir(parents=True)
    stale = cache_dir / "holds" / digest.replace(":", "-")
    stale.touch()
    second = os.open(stale, os.O_RDWR)  # the second evicter opened it...
    assert not holds.is_held(cache_dir, digest)  # ...the first removed it
    server = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from pathlib import Path; from blockstore.cache import holds; "
            "hold = holds.BlobHold.take(Path(sys.argv[1]), sys.argv[2]); "
            "print('held', flush=True); time.sleep(60)",
            str(cache_dir),
            digest,
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout.readline().strip() == "held"
        assert not holds._held_or_removed(second, stale)  # the old file: unheld, not named
        assert holds.is_held(cache_dir, digest)
    finally:
        server.kill()
        server.wait()
        server.stdout.close()
    assert not holds.is_held(cache_dir, digest)


def test_a_cache_directory_deleted_under_a_store_is_said_once(tmp_path, caplog):
    """Tried: a store open on a cache directory, the directory then moved away (as
    ``rm -rf`` and a new ``mkdir`` leave it to the running process), the store used on.
    Must hold: one warning naming the directory and saying to restart; reads still
    right. Before, nothing was said: the process filled a file no other process saw."""
    import shutil

    from rig.waiting import wait_for

    data, digest = make_blob(4 * CHUNK_SIZE, seed=580)
    cache = tmp_path / "cache"
    with ChunkStore(cache, flush_interval=0.05) as store:
        blob = CachedBlob(store, digest, len(data), ScriptedSource(data, digest))
        assert joined(blob.read(0, len(data))) == data
        shutil.move(cache, tmp_path / "gone")
        cache.mkdir()
        assert wait_for(lambda: "was deleted or replaced" in caplog.text, timeout=10)
        assert joined(blob.read(0, len(data))) == data
        time.sleep(0.2)
        blob.close()
    assert caplog.text.count("was deleted or replaced") == 1
    assert str(cache) in caplog.text


def test_a_write_that_looks_as_another_thread_makes_the_cache_writable_finds_its_databases(
    cache_dir, monkeypatch
):
    """Tried: a cache opened to look (``looking``, as ``cache verify`` opens it), a write
    naming a database taken before it starts (as ``ImageRecords.put`` names it), and
    another thread's write making the cache writable just as this one, having seen it
    opened to look, begins its try in a read transaction. Must hold: the write goes
    through, to the database it named, on the writable handle. Before, that try took
    the named database as it was, a handle of the closed environment it looked through,
    and the write failed with "cache read failed"."""
    from blockstore.cache.env import looking
    from blockstore.cache.layout import DB_REFS

    ChunkStore(cache_dir).close()
    with looking():
        store = ChunkStore(cache_dir)
    try:
        env = store.env
        assert env.looking
        refs = env.dbs[DB_REFS]
        look = env._look

        def made_writable_meanwhile(work):
            env._become_writer()  # another thread's first change, between the two
            return look(work)

        monkeypatch.setattr(env, "_look", made_writable_meanwhile)
        env.write(lambda txn: txn.put(b"key", b"value", db=refs))
        with env.reader(DB_REFS) as txn:
            assert bytes(txn.get(b"key")) == b"value"
    finally:
        store.close()
