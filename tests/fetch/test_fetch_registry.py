"""Single-flight, coalescing, streaming and priorities, seen at a real registry.

Requests are counted and first bytes timed at the fault proxy in front of
the registry; its ``pace`` fault streams each body 32 KiB at a time, so a
range takes long enough for the order of events to show.
"""

from __future__ import annotations

import threading
import time

from rig.fault_proxy import Fault

from blockstore.cache import CHUNK_SIZE, CachedBlob, ChunkStore
from blockstore.export import Buffer
from blockstore.fetch import FILL, Fetcher, Window
from blockstore.prefetch import Readahead

PACE = 0.01  # seconds per 32 KiB through the proxy: a 4 MiB range takes about 1.3 s


def blob_requests(proxy, digest: str) -> list[str]:
    """The Range header of every GET of the blob that reached the proxy."""
    return [
        r.headers.get("Range", "")
        for r in proxy.requests
        if r.method == "GET" and r.path.endswith(digest)
    ]


def dict_fetcher(source, window: Window) -> tuple[Fetcher, dict[int, Buffer]]:
    """A fetcher that keeps chunks in a dict: the engine alone, without the cache."""
    kept: dict[int, Buffer] = {}

    def keep(runs) -> None:
        for first, chunks in runs:
            for i, chunk in enumerate(chunks):
                kept[first + i] = chunk

    def load(indices) -> dict[int, Buffer]:
        return {i: kept[i] for i in indices if i in kept}

    return Fetcher(source, CHUNK_SIZE, lambda i, c: c, keep, load, window=window), kept


def wait_until(condition, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def test_first_reader_of_a_range_is_answered_after_its_first_chunk(
    pushed_blob, registry, fault_proxy
):
    """One reader misses a whole 4 MiB blob; a second then misses its first chunk. The
    registry sees one GET for all 4 MiB (coalesced, and no second request for the chunk
    already on its way); the second reader is answered when the first 32 KiB are in,
    in well under a quarter of the time the whole range takes, with the right bytes."""
    proxy = fault_proxy(registry)
    proxy.fault = Fault("pace", path_contains="/blobs/", seconds=PACE)
    source = pushed_blob.source(proxy.host)
    fetcher, _ = dict_fetcher(source, Window(initial=16 << 20))
    chunks = len(pushed_blob.data) // CHUNK_SIZE
    results: dict[str, float] = {}

    def whole() -> None:
        started = time.monotonic()
        got = fetcher.fetch(range(chunks))
        results["whole"] = time.monotonic() - started
        assert b"".join(bytes(got[i]) for i in range(chunks)) == pushed_blob.data

    reader = threading.Thread(target=whole)
    reader.start()
    wait_until(lambda: fetcher.in_flight() == chunks)
    started = time.monotonic()
    first = fetcher.fetch([0])
    results["first"] = time.monotonic() - started
    reader.join()
    fetcher.close()
    source.client.close()
    assert bytes(first[0]) == pushed_blob.data[:CHUNK_SIZE]
    assert blob_requests(proxy, pushed_blob.digest) == [f"bytes=0-{len(pushed_blob.data) - 1}"]
    assert results["whole"] > 128 * PACE * 0.8
    assert results["first"] < results["whole"] / 4


def test_readers_of_one_chunk_at_once_cause_one_request(
    pushed_blob, registry, fault_proxy, cache_dir
):
    """Eight readers miss the same 64 KiB through the cache at once, through a slow link
    (readahead off): the registry sees one GET, and every reader gets the right bytes."""
    proxy = fault_proxy(registry)
    proxy.fault = Fault("delay", path_contains="/blobs/", seconds=0.3)
    source = pushed_blob.source(proxy.host)
    results: list[bytes] = []
    with ChunkStore(cache_dir) as store:
        blob = CachedBlob(
            store, pushed_blob.digest, len(pushed_blob.data), source, readahead=Readahead(0)
        )
        barrier = threading.Barrier(8)

        def reader() -> None:
            barrier.wait()
            results.append(b"".join(bytes(b) for b in blob.read(3 * CHUNK_SIZE, 2 * CHUNK_SIZE)))

        threads = [threading.Thread(target=reader) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        blob.close()
    source.client.close()
    assert results == [pushed_blob.data[3 * CHUNK_SIZE : 5 * CHUNK_SIZE]] * 8
    assert blob_requests(proxy, pushed_blob.digest) == [
        f"bytes={3 * CHUNK_SIZE}-{5 * CHUNK_SIZE - 1}"
    ]


def test_a_demand_read_overtakes_a_running_prefetch(pushed_blob, registry, fault_proxy):
    """A fill of the whole blob runs as 512 KiB ranges, a few at a time, over a slow link.
    A demand read elsewhere starts at once and is answered long before the fill ends;
    a demand read inside a range the fill has queued raises that range to demand and is
    answered by it: the registry never sees a second request for a chunk."""
    proxy = fault_proxy(registry)
    proxy.fault = Fault("pace", path_contains="/blobs/", seconds=PACE)
    source = pushed_blob.source(proxy.host)
    window = Window(initial=2 << 20)  # 512 KiB requests, 4 in flight
    fetcher, kept = dict_fetcher(source, window)
    chunks = len(pushed_blob.data) // CHUNK_SIZE
    started = time.monotonic()
    assert fetcher.prefetch(range(chunks - 16), FILL)  # all but the last 512 KiB
    wait_until(lambda: len(blob_requests(proxy, pushed_blob.digest)) >= 1)
    demand_started = time.monotonic()
    outside = fetcher.fetch([chunks - 1])
    outside_took = time.monotonic() - demand_started
    inside_started = time.monotonic()
    inside = fetcher.fetch([chunks - 20])  # in the last range the fill queued
    inside_took = time.monotonic() - inside_started
    wait_until(lambda: fetcher.in_flight() == 0, timeout=20)
    fill_took = time.monotonic() - started
    fetcher.close()
    source.client.close()
    assert bytes(outside[chunks - 1]) == pushed_blob.data[-CHUNK_SIZE:]
    index = chunks - 20
    assert bytes(inside[index]) == pushed_blob.data[index * CHUNK_SIZE : (index + 1) * CHUNK_SIZE]
    requests = blob_requests(proxy, pushed_blob.digest)
    assert len(requests) == (chunks - 16) // 16 + 1  # the fill's ranges, and one demand read
    assert outside_took < fill_took / 3
    assert inside_took < fill_took / 2
    assert len(kept) == chunks - 15
