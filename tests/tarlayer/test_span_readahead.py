"""Span readahead: a compressed layer decompressed whole in the background, and sealed."""

from __future__ import annotations

import gzip
import hashlib
import itertools
import os
import random
import threading
import time
import tracemalloc

import pytest
from rig.local_source import LocalFileSource
from rig.small_disk import small_disk
from rig.stored_chunks import zero_tree_pages
from rig.waiting import wait_for
from trees import make_tar, populate

from blockstore.cache import CHUNK_SIZE, CachedBlob, ChunkStore
from blockstore.errors import BlobReadError, IntegrityError
from blockstore.prefetch import PrefetchSettings
from blockstore.registry.mediatypes import GZIP
from blockstore.tarlayer import pump
from blockstore.tarlayer.export import SpanFiller, SpanWriter
from blockstore.tarlayer.indexcache import IndexCache
from blockstore.tarlayer.layerindex import SpanIndex
from blockstore.tarlayer.layers import IDLE, open_tar_layer
from blockstore.tarlayer.pump import SpanBytes

SPAN = 256 << 10


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class CountingSource(LocalFileSource):
    """The blob file, counting the bytes asked of it."""

    def __init__(self, path, digest):
        super().__init__(path, digest)
        self.asked = 0

    def read_range(self, offset: int, length: int) -> bytes:
        self.asked += length
        return super().read_range(offset, length)


@pytest.fixture(scope="module")
def layer(tmp_path_factory):
    """A ~5 MiB tar.gz of a real tree, about twenty 256 KiB spans: (blob file, tar, blob)."""
    tmp = tmp_path_factory.mktemp("layer")
    src = populate(tmp / "src")
    for i in range(24):
        (src / f"part{i}.bin").write_bytes(os.urandom(40_000) + bytes(60_000 + i))
    tar = make_tar(src, tmp / "layer.tar").read_bytes()
    blob = gzip.compress(tar, 6, mtime=0)
    path = tmp / "layer.tar.gz"
    path.write_bytes(blob)
    return path, tar, blob


class FlippingSource(CountingSource):
    """The blob file with ``width`` bytes from ``at`` inverted, as a faulty link or
    registry would send them. More than one: the first byte of a stored deflate
    block has five bits that inflating ignores, and a span of random data is equal
    stored blocks, so its middle byte is often such a byte; one bit flipped there
    inflates to the very same span and proves nothing about the check."""

    def __init__(self, path, digest, at: int, width: int = 64):
        super().__init__(path, digest)
        self.at = at
        self.width = width

    def read_range(self, offset: int, length: int) -> bytes:
        data = super().read_range(offset, length)
        lo, hi = max(self.at, offset), min(self.at + self.width, offset + len(data))
        if lo < hi:
            data = bytearray(data)
            for i in range(lo - offset, hi - offset):
                data[i] ^= 0xFF
            data = bytes(data)
        return data


class FailingSource(CountingSource):
    """The blob file, failing every read while ``failing`` is set."""

    failing = False

    def read_range(self, offset: int, length: int) -> bytes:
        if self.failing:
            raise BlobReadError(f"reading at {offset}: the registry went away")
        return super().read_range(offset, length)


def open_layer(
    store: ChunkStore,
    layer,
    settings: PrefetchSettings,
    *,
    direct=False,
    source=None,
    blob_settings: PrefetchSettings | None = None,
):
    """``direct``: spans inflate from the blob's source itself, as an image opens them;
    ``blob_settings``: the blob's own, if not its layer's."""
    path, tar, blob = layer
    source = source or CountingSource(path, sha(blob))
    compressed = CachedBlob(store, sha(blob), len(blob), source, settings=blob_settings or settings)
    opened = open_tar_layer(
        store,
        compressed,
        GZIP,
        online=True,
        diff_id=lambda: sha(tar),
        span=SPAN,
        settings=settings,
        source=source if direct else None,
    )
    return opened, compressed, source


def forget_what_indexing_kept(store: ChunkStore, layer, source: CountingSource) -> None:
    """Drop the tar the indexing pass stored and the blob's chunks it read, so reads
    have to decompress spans from the source again."""
    _, tar, blob = layer
    store.remove(sha(tar))
    store.drop_chunks(sha(blob), range(-(-len(blob) // CHUNK_SIZE)), recheck=False)
    source.asked = 0


def index_only(store: ChunkStore, layer, tmp_path) -> SpanIndex:
    """The layer's index, built in a cache of its own and then kept in ``store`` alone:
    no chunk of the blob or the tar the indexing read or stored is in ``store``."""
    _, _, blob = layer
    with ChunkStore(tmp_path / "indexing") as elsewhere:
        opened, compressed, _ = open_layer(elsewhere, layer, PrefetchSettings(readahead=False))
        opened.close()
        compressed.close()
    IndexCache(store).save(sha(blob), SPAN, opened.index)
    assert opened.index.spans is not None
    return opened.index.spans


def sealed(store: ChunkStore, digest: str) -> bool:
    record = store.lookup(digest)
    return record is not None and record.sealed


def test_the_first_read_decompresses_the_whole_layer_and_seals_it(layer, tmp_path):
    """The first read of the export (a mount reads the superblock at once) starts
    decompressing every span in the background: the tar part ends whole in the cache,
    the chunks two spans share included, and sealed against the diff_id, so with no
    source at all it reads back byte for byte; the blob is asked for once."""
    _, tar, blob = layer
    with ChunkStore(tmp_path / "cache") as store:
        opened, compressed, source = open_layer(store, layer, PrefetchSettings())
        forget_what_indexing_kept(store, layer, source)
        try:
            assert opened.index.spans is not None and len(opened.index.spans.points) > 10
            assert not sealed(store, sha(tar))
            opened.read(0, 1024)
            assert wait_for(lambda: sealed(store, sha(tar)))
        finally:
            opened.close()
            compressed.close()
        offline = CachedBlob(store, sha(tar), len(tar), None)
        assert b"".join(offline.read(0, len(tar))) == tar
    assert source.asked <= len(blob) + CHUNK_SIZE


class SlowFrom(CountingSource):
    """The blob file, each range reaching past ``slow_from`` taking ``delay`` s more."""

    def __init__(self, path, digest, delay: float):
        super().__init__(path, digest)
        self.slow_from = os.path.getsize(path)
        self.delay = delay

    def read_range(self, offset: int, length: int) -> bytes:
        if offset + length > self.slow_from:
            time.sleep(self.delay)
        return super().read_range(offset, length)


def test_a_read_waiting_on_its_span_keeps_the_layer_from_sealing(layer, tmp_path):
    """Sealing (hashing the whole tar) waits until the layer is idle, so that it does
    not slow the reads the fill was for. A read still waiting on its span, however
    long, is the layer in use: with the last span's bytes slow to come, a read of it
    outlasts ``IDLE`` and the pump then ends; the seal must still start only ``IDLE``
    after that read ended, when the reads that follow it would have come."""
    path, tar, blob = layer
    source = SlowFrom(path, sha(blob), delay=IDLE + 0.3)
    with ChunkStore(tmp_path / "cache") as store:
        opened, compressed, _ = open_layer(
            store, layer, PrefetchSettings(), direct=True, source=source
        )
        forget_what_indexing_kept(store, layer, source)
        spans = opened.index.spans
        assert spans is not None
        source.slow_from = spans.compressed_bounds(len(spans.points) - 1)[0] + 1
        meta = opened.index.tar_start
        try:
            opened.read(0, 1024)  # starts the pump
            last = len(tar) - 4096
            assert b"".join(opened.read(meta + last, 4096)) == tar[last:]
            ended = time.monotonic()
            assert wait_for(lambda: sealed(store, sha(tar)))
            assert time.monotonic() - ended >= IDLE - 0.05
        finally:
            opened.close()
            compressed.close()


def test_a_tar_the_pump_could_not_fill_is_sealed_once_reads_complete_it(layer, tmp_path):
    """The pump's fill seals the tar once the layer is idle, so reads alone do not. If
    the pump fails (here every fetch fails while it runs), the reads that later fetch
    the whole tar must seal it as they would any blob: checked against the diff_id."""
    path, tar, blob = layer
    source = FailingSource(path, sha(blob))
    with ChunkStore(tmp_path / "cache") as store:
        opened, compressed, _ = open_layer(
            store, layer, PrefetchSettings(), direct=True, source=source
        )
        forget_what_indexing_kept(store, layer, source)
        meta = opened.index.tar_start
        source.failing = True
        try:
            with pytest.raises(BlobReadError):
                opened.read(meta, 4096)  # starts the pump, which fails as this read does
            assert wait_for(lambda: not any(t.name == "tar-fill" for t in threading.enumerate()))
            source.failing = False
            assert b"".join(opened.read(meta, len(tar))) == tar
            assert wait_for(lambda: sealed(store, sha(tar)))
        finally:
            opened.close()
            compressed.close()


def fill_threads() -> list[threading.Thread]:
    """The layer's fill thread and its span pump's, while they run."""
    return [t for t in threading.enumerate() if t.name.startswith(("tar-fill", "span-pump"))]


def test_a_pump_whose_cache_is_lost_stops_at_once(layer, tmp_path, caplog):
    """Tried: a layer whose cache holds its index alone, opened with fill at a quarter of
    the blob a second, its cache a mount point (so a damaged cache cannot be moved
    aside); half a second into the pump, the cache's B-tree pages are zeroed and a read
    finds the damage. Must hold: that read is right, from the source; the pump stops
    within two seconds, having asked the source for less than half the blob more,
    saying the cache keeps nothing. Before, it went on for all its rounds, inflating and
    fetching the whole layer each time for a cache that kept none of it."""
    path, tar, blob = layer
    source = CountingSource(path, sha(blob))
    settings = PrefetchSettings(fill=True, fill_rate=len(blob) // 4)
    with small_disk(tmp_path / "volume", "64M") as cache, ChunkStore(cache) as store:
        index_only(store, layer, tmp_path)
        # As an image opens it: the blob neither filled nor read ahead of its own.
        quiet = PrefetchSettings(readahead=False)
        opened, compressed, _ = open_layer(
            store, layer, settings, direct=True, source=source, blob_settings=quiet
        )
        meta = opened.index.tar_start
        try:
            assert b"".join(opened.read(meta, 4096)) == tar[:4096]
            time.sleep(0.5)
            assert fill_threads()
            assert zero_tree_pages(cache) > 0
            assert (
                b"".join(opened.read(meta + len(tar) // 2, 4096))
                == tar[len(tar) // 2 : len(tar) // 2 + 4096]
            )
            assert store.lost() is not None
            asked = source.asked
            assert wait_for(lambda: not fill_threads(), 2.0), fill_threads()
            assert source.asked - asked < len(blob) // 2, (source.asked - asked, len(blob))
            assert "not filled, as the cache keeps nothing" in caplog.text, caplog.text
        finally:
            opened.close()
            compressed.close()


def test_without_readahead_a_read_decompresses_only_its_span(layer, tmp_path):
    """With readahead off, reading one small file decompresses the span around it and
    nothing more: a small part of the blob is fetched and the tar is not sealed."""
    _, tar, blob = layer
    with ChunkStore(tmp_path / "cache") as store:
        opened, compressed, source = open_layer(store, layer, PrefetchSettings(readahead=False))
        forget_what_indexing_kept(store, layer, source)
        try:
            meta = opened.index.tar_start
            middle = meta + len(tar) // 2
            assert b"".join(opened.read(middle, 4096)) == tar[len(tar) // 2 :][:4096]
            wait_for(lambda: sealed(store, sha(tar)), timeout=0.5)
            assert not sealed(store, sha(tar))
        finally:
            opened.close()
            compressed.close()
    assert 0 < source.asked < len(blob) // 4


def test_spans_inflated_from_the_source_store_the_tar_only(layer, tmp_path):
    """Spans inflated from the blob's source itself: the tar ends whole in the cache and
    sealed, reading back byte for byte with no source, while none of the blob's own
    chunks were stored; the blob is asked for about once."""
    _, tar, blob = layer
    with ChunkStore(tmp_path / "cache") as store:
        index_only(store, layer, tmp_path)
        opened, compressed, source = open_layer(store, layer, PrefetchSettings(), direct=True)
        try:
            opened.read(0, 1024)
            assert wait_for(lambda: sealed(store, sha(tar)))
            record = store.lookup(sha(blob))
            assert record is None or record.present == 0
        finally:
            opened.close()
            compressed.close()
        offline = CachedBlob(store, sha(tar), len(tar), None)
        assert b"".join(offline.read(0, len(tar))) == tar
    assert len(blob) <= source.asked <= len(blob) + CHUNK_SIZE


@pytest.mark.parametrize("direct", [True, False], ids=["from-source", "through-cache"])
def test_a_flipped_compressed_byte_fails_its_span_never_serves_wrong_bytes(layer, tmp_path, direct):
    """Bytes flipped in the compressed bytes a span is inflated from: reading that span
    fails (EIO) and none of its chunks is stored, however its bytes were fetched; the
    other spans still read right."""
    path, tar, blob = layer
    with ChunkStore(tmp_path / "cache") as store:
        spans = index_only(store, layer, tmp_path)
        bad = len(spans.points) // 2
        start, end = spans.compressed_bounds(bad)
        flipping = FlippingSource(path, sha(blob), (start + end) // 2)
        opened, compressed, _ = open_layer(
            store, layer, PrefetchSettings(readahead=False), direct=direct, source=flipping
        )
        try:
            meta = opened.index.tar_start
            lo, hi = spans.bounds(bad)
            with pytest.raises(BlobReadError):
                opened.read(meta + lo, min(4096, hi - lo))
            record = store.lookup(sha(tar))
            inside = range(-(-lo // CHUNK_SIZE), hi // CHUNK_SIZE)
            assert record is None or store.missing(record.blob_id, inside) == list(inside)
            good = spans.bounds(bad - 2)[0]
            assert b"".join(opened.read(meta + good, 4096)) == tar[good : good + 4096]
        finally:
            opened.close()
            compressed.close()


@pytest.mark.parametrize("seed", range(5))
def test_span_filler_stores_every_chunk_whatever_the_span_order(tmp_path, seed):
    """Spans cut at random places (some inside one chunk) handed over in a random order:
    every chunk is stored once both sides of it are in, with exactly its bytes."""
    rng = random.Random(seed)
    data = rng.randbytes(20 * CHUNK_SIZE + 1234)
    cuts = sorted({0, len(data), *(rng.randrange(len(data)) for _ in range(12))})
    spans = list(itertools.pairwise(cuts))
    rng.shuffle(spans)
    with ChunkStore(tmp_path / "cache") as store:
        fill = SpanFiller(store, sha(data), len(data))
        for start, end in spans:
            fill(start, data[start:end])
        cached = CachedBlob(store, sha(data), len(data), None)
        assert b"".join(cached.read(0, len(data))) == data


def test_span_writer_stores_every_span_handed_over_by_the_flush(tmp_path):
    """Spans handed to the writer from two threads, in random order, more than it lets
    wait: once ``flush`` returns every chunk is stored with exactly its bytes; after
    ``close`` nothing more is taken."""
    rng = random.Random(7)
    data = rng.randbytes(40 * CHUNK_SIZE + 999)
    cuts = sorted({0, len(data), *(rng.randrange(len(data)) for _ in range(20))})
    spans = list(itertools.pairwise(cuts))
    rng.shuffle(spans)
    with ChunkStore(tmp_path / "cache") as store:
        writer = SpanWriter(SpanFiller(store, sha(data), len(data)))

        def hand(part: list[tuple[int, int]]) -> None:
            for start, end in part:
                writer(start, memoryview(data)[start:end])

        threads = [threading.Thread(target=hand, args=(spans[i::2],)) for i in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        writer.flush()
        cached = CachedBlob(store, sha(data), len(data), None)
        assert b"".join(cached.read(0, len(data))) == data
        writer.close()
        writer(0, data)  # refused once closed, without waiting
        writer.flush()


def test_indexing_a_gzip_layer_here_stores_its_tar_as_it_goes(layer, tmp_path):
    """The pass that indexes a gzip layer (both digests checked) also stores the tar it
    inflates: right after open every chunk of it is cached, no span is decompressed
    again, and the tar seals against the diff_id."""
    _, tar, _ = layer
    with ChunkStore(tmp_path / "cache") as store:
        opened, compressed, _ = open_layer(store, layer, PrefetchSettings(readahead=False))
        try:
            record = store.lookup(sha(tar))
            assert record is not None and record.present == record.chunks
            assert store.seal(sha(tar), len(tar))
        finally:
            opened.close()
            compressed.close()


def test_a_failed_pass_keeps_no_tar_and_a_wrong_size_guess_is_mended(layer, tmp_path):
    """What the pass stored is removed when the diff_id does not match (the pass then
    fails). When the trailer's size was not the tar's (two gzip members: the last one's
    size), the tar the pass made is kept at the size it made, and served."""
    path, tar, blob = layer
    with ChunkStore(tmp_path / "cache") as store:
        compressed = CachedBlob(store, sha(blob), len(blob), LocalFileSource(path, sha(blob)))
        with pytest.raises(IntegrityError):
            open_tar_layer(
                store, compressed, GZIP, online=True, diff_id=lambda: sha(tar + b"x"), span=SPAN
            )
        compressed.close()
        assert store.lookup(sha(tar + b"x")) is None

        half = len(tar) // 2
        two = gzip.compress(tar[:half], 6, mtime=0) + gzip.compress(tar[half:], 6, mtime=0)
        (tmp_path / "two.gz").write_bytes(two)
        source = LocalFileSource(tmp_path / "two.gz", sha(two))
        compressed = CachedBlob(store, sha(two), len(two), source)
        quiet = PrefetchSettings(readahead=False)
        opened = open_tar_layer(
            store, compressed, GZIP, online=True, diff_id=lambda: sha(tar), span=SPAN,
            settings=quiet,
        )  # fmt: skip
        try:
            kept = store.lookup(sha(tar))
            assert kept is not None and kept.size == len(tar)
            meta = opened.index.tar_start
            assert b"".join(opened.read(meta, len(tar))) == tar
        finally:
            opened.close()
            compressed.close()


def test_a_range_too_large_to_hold_is_never_fetched_ahead(layer, monkeypatch):
    """``SpanBytes`` holds what it fetches ahead in memory until a span takes it. A range
    over ``AHEAD_AT_MOST`` (a zstd layer of one frame is one span, the whole blob) is
    not fetched ahead: its span reads it a piece at a time as it decompresses. A range
    under the limit is fetched once, ahead, and its read then asks the source nothing."""
    path, _, blob = layer
    monkeypatch.setattr(pump, "AHEAD_AT_MOST", 1 << 20)
    source = CountingSource(path, sha(blob))
    ahead = SpanBytes(source, lambda offset, length: None, lambda nbytes: None)
    try:
        ahead.ahead(0, (1 << 20) + 1)
        ahead.ahead(2 << 20, 1 << 20)
        wait_for(lambda: source.asked == 1 << 20, timeout=10)
        assert ahead.read(2 << 20, 4096) == blob[2 << 20 : (2 << 20) + 4096]
        assert source.asked == 1 << 20
        assert ahead.read(0, 4096) == blob[:4096]  # read then, not fetched ahead
        assert source.asked == (1 << 20) + 4096
    finally:
        ahead.close()


def test_a_span_read_again_and_again_keeps_no_more_memory(layer):
    """Tried: readers read one span's compressed bytes 20000 times, as a server running for
    days reads a span of a layer larger than its cache each time its chunks were evicted.
    Must hold: what ``SpanBytes`` keeps of those reads stays under 16 KiB, and a range
    readers fetched themselves is still never fetched ahead. Before, each read kept one
    more entry for good (some 40 bytes a read: 800 KiB here), and every later ``ahead``
    looked through them all under the lock."""
    path, _, blob = layer
    source = CountingSource(path, sha(blob))
    span_bytes = SpanBytes(source, lambda offset, length: None, lambda nbytes: None)
    try:
        tracemalloc.start()
        try:
            before = _allocated_in(pump.__file__)
            for _ in range(20000):
                span_bytes.read(SPAN, SPAN)
            kept = _allocated_in(pump.__file__) - before
        finally:
            tracemalloc.stop()
        assert kept < 16 << 10, f"{kept} bytes kept for 20000 reads of one span"
        asked = source.asked
        span_bytes.ahead(SPAN, SPAN)
        time.sleep(0.2)
        assert source.asked == asked, "a range readers fetched was fetched ahead"
    finally:
        span_bytes.close()


def _allocated_in(filename: str) -> int:
    """Bytes allocated by code in ``filename`` and still held (tracemalloc running)."""
    snapshot = tracemalloc.take_snapshot().filter_traces([tracemalloc.Filter(True, filename)])
    return sum(stat.size for stat in snapshot.statistics("filename"))


def test_no_page_in_reaches_the_uncompressed_tar(tmp_path, layer):
    """``--no-page-in`` (``page_in=False``) holds for a gzip layer's cached tar too: its
    first hit on a warm layer starts no walk of the tar's chunks."""
    _, tar, _ = layer
    off = PrefetchSettings(readahead=False, page_in=False)
    with ChunkStore(tmp_path / "cache") as store:
        opened, compressed, _ = open_layer(store, layer, off)
        opened.read(0, len(tar))  # the whole tar in the cache, as a warm layer's
        opened.close()
        compressed.close()
        opened, compressed, _ = open_layer(store, layer, off)
        at = len(opened._meta) + len(tar) // 2  # inside the tar, past the metadata image
        try:
            assert opened.read_cached(at, 4096) is not None
            assert opened._tar_blob._page_in is None, "page-in started though switched off"
        finally:
            opened.close()
            compressed.close()


def test_a_tar_of_several_gzip_members_larger_than_the_cap_is_not_kept(tmp_path, caplog):
    """Tried: a gzip layer of two members, the last one tiny (so the trailer, which gives
    the last member's size alone, says 1 KiB), whose 12 MiB tar is larger than the 4 MiB
    cache cap. Must hold: the pass does not keep the tar (a warning says it is over the
    cap), stores no more of it than the cap allows, and the layer still serves every
    byte from its spans. Before, the cap was asked only of the trailer's 1 KiB, and the
    whole tar was stored, evicting the rest of the cache."""
    words = random.Random(3).choices([b"alpha ", b"beta ", b"gamma ", b"\n"], k=3 << 20)
    text = b"".join(words)[: 12 << 20]
    src = tmp_path / "src"
    src.mkdir()
    (src / "words").write_bytes(text)
    tar = make_tar(src, tmp_path / "layer.tar").read_bytes()
    blob = gzip.compress(tar[:-1024], 6, mtime=0) + gzip.compress(tar[-1024:], 6, mtime=0)
    (tmp_path / "two.gz").write_bytes(blob)
    with ChunkStore(tmp_path / "cache", size_cap=4 << 20) as store:
        compressed = CachedBlob(
            store, sha(blob), len(blob), LocalFileSource(tmp_path / "two.gz", sha(blob))
        )
        opened = open_tar_layer(
            store, compressed, GZIP, online=True, diff_id=lambda: sha(tar), span=SPAN,
            settings=PrefetchSettings(readahead=False),
        )  # fmt: skip
        try:
            assert (
                f"{sha(tar)} is larger than the 3.6 MiB"
                " eviction keeps the cache to under its 4.0 MiB cap: its tar passed " in caplog.text
            )
            kept = store.lookup(sha(tar))
            assert kept is None or kept.present < kept.chunks
            assert store.stats()["stored_bytes"] <= 5 << 20
            meta = opened.index.tar_start
            assert b"".join(bytes(b) for b in opened.read(meta, len(tar))) == tar
        finally:
            opened.close()
            compressed.close()
