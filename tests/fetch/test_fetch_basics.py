"""Single-flight, coalescing and parallel range reads through the cache, from local sources."""

from __future__ import annotations

import threading
import time

import pytest
from fetch_sources import PieceSource, WholeSource, make_blob
from rig.threads import no_threads_for
from rig.waiting import wait_for

from blockstore.cache import CHUNK_SIZE, CachedBlob, ChunkStore
from blockstore.cli import exit_code
from blockstore.errors import BlobReadError, OutOfResources, RegistryUnreachable
from blockstore.fetch import runs
from blockstore.fetch.fetcher import Fetcher
from blockstore.fetch.scheduler import DEFAULT_WORKERS
from blockstore.prefetch import Readahead

NONE = Readahead(maximum=0)


def test_runs_are_adjacent_and_bounded():
    """Indices become runs of adjacent chunks, split at the length limit."""
    assert runs([5, 1, 2, 3, 9, 10], 2) == [(1, 2), (3, 1), (5, 1), (9, 2)]
    assert runs([], 4) == []


def test_concurrent_misses_of_one_chunk_fetch_it_once(cache_dir):
    """Eight threads miss the same two chunks at once: the source sees one range read,
    never two requests for one chunk at a time, and every thread gets the bytes."""
    data, digest = make_blob(8 * CHUNK_SIZE, seed=20)
    source = PieceSource(data, digest, first_byte=1.0)
    results: list[bytes] = []
    with ChunkStore(cache_dir) as store:
        blob = CachedBlob(store, digest, len(data), source, readahead=NONE)
        barrier = threading.Barrier(8)

        def reader() -> None:
            barrier.wait()
            results.append(b"".join(blob.read(CHUNK_SIZE + 5, CHUNK_SIZE)))

        threads = [threading.Thread(target=reader) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        blob.close()
    assert results == [data[CHUNK_SIZE + 5 : 2 * CHUNK_SIZE + 5]] * 8
    assert source.requests == [(CHUNK_SIZE, 2 * CHUNK_SIZE)]
    assert source.max_same_chunk_in_flight == 1


def test_adjacent_misses_coalesce_into_bounded_parallel_reads(cache_dir):
    """A 10 MiB cold read becomes range reads of the window's request size, run in
    parallel; a read with a cached hole in the middle asks only for what is missing."""
    data, digest = make_blob(10 << 20, seed=21)
    source = PieceSource(data, digest, first_byte=0.2)
    with ChunkStore(cache_dir) as store:
        blob = CachedBlob(store, digest, len(data), source, readahead=NONE)
        request = blob._fetcher.window.request
        assert b"".join(blob.read(0, len(data))) == data
        assert len(source.requests) == -(-len(data) // request)
        assert max(length for _, length in source.requests) == request
        assert source.max_in_flight >= 2
        store.remove(digest)
        source.requests.clear()
        blob.read(4 * CHUNK_SIZE, CHUNK_SIZE)  # cache chunk 4
        source.requests.clear()
        assert b"".join(blob.read(0, 9 * CHUNK_SIZE)) == data[: 9 * CHUNK_SIZE]
        assert sorted(source.requests) == [(0, 4 * CHUNK_SIZE), (5 * CHUNK_SIZE, 4 * CHUNK_SIZE)]
        blob.close()


def test_failed_fetch_is_retried_by_the_next_reader(cache_dir):
    """A source failure of any kind reaches the reader as EIO and is not remembered: the
    next read asks again and succeeds."""
    data, digest = make_blob(2 * CHUNK_SIZE, seed=22)
    source = WholeSource(data, digest)
    with ChunkStore(cache_dir) as store:
        blob = CachedBlob(store, digest, len(data), source, readahead=NONE)
        for fault in ("fail", "short", "unreachable"):
            source.fault = "short" if fault == "short" else None
            source.fail_next = 1 if fault == "fail" else 0
            source.read_range = (  # type: ignore[method-assign]
                _unreachable if fault == "unreachable" else WholeSource.read_range.__get__(source)
            )
            try:
                blob.read(0, 10)
            except OSError as exc:
                assert exc.errno == 5
            else:
                raise AssertionError("a failing source must fail the read")
        source.fault = None
        source.read_range = WholeSource.read_range.__get__(source)  # type: ignore[method-assign]
        assert b"".join(blob.read(0, 10)) == data[:10]
        blob.close()


def _unreachable(offset: int, length: int) -> bytes:
    raise RegistryUnreachable("no route to the source")


def test_readahead_window_grows_on_sequential_reads_and_resets_on_random():
    """16 KiB sequential reads: the ranges asked double from twice the initial window up
    to the maximum and stay there, each asked when the reader reaches the previous one and
    reaching at least its own size past the reader; asked ranges never overlap; a jump
    asks nothing and the next sequential run starts small again."""
    policy = Readahead(initial=32 << 10, maximum=512 << 10)
    size = 100 << 20
    read = 16 << 10

    def windows(start: int, stop: int) -> list[int]:
        out, asked_end = [], 0
        for offset in range(start, stop, read):
            ahead = policy.advise(offset, read, size)
            if ahead is not None:
                assert ahead[0] >= max(asked_end, offset + read)
                asked_end = ahead[0] + ahead[1]
                assert asked_end - offset - read >= ahead[1]
                out.append(ahead[1] >> 10)
        return out

    expected = [64, 128, 256, 512, 512]
    assert windows(0, 2 << 20)[:5] == expected
    assert policy.advise(50 << 20, 4096, size) is None  # a jump: no readahead
    assert windows((50 << 20) + read, 52 << 20)[:5] == expected
    assert Readahead(maximum=0).advise(0, 4096, size) is None


def test_sequential_reader_finds_the_next_range_already_cached(cache_dir):
    """After a few sequential reads, background readahead has fetched ahead of the reader."""
    data, digest = make_blob(4 << 20, seed=23)
    source = PieceSource(data, digest)
    with ChunkStore(cache_dir) as store:
        blob = CachedBlob(store, digest, len(data), source)
        for offset in range(0, 256 << 10, 64 << 10):
            assert b"".join(blob.read(offset, 64 << 10)) == data[offset : offset + (64 << 10)]
        deadline = time.monotonic() + 5
        ahead = range(256 << 10 >> 15, 512 << 10 >> 15)

        def missing() -> list[int]:
            record = store.lookup(digest)
            return store.missing(record.blob_id if record else None, ahead)

        while missing() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert missing() == []
        blob.close()


def test_two_exports_of_one_blob_share_their_fetches(cache_dir):
    """Two exports of one blob (a layer listed twice) missing the same chunk at once
    cause one range read."""
    data, digest = make_blob(4 * CHUNK_SIZE, seed=24)
    source = PieceSource(data, digest, first_byte=1.0)
    results: list[bytes] = []
    with ChunkStore(cache_dir) as store:
        blobs = [CachedBlob(store, digest, len(data), source, readahead=NONE) for _ in range(2)]
        threads = [
            threading.Thread(target=lambda b=b: results.append(b"".join(b.read(0, 100))))
            for b in blobs
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for b in blobs:
            b.close()
    assert results == [data[:100]] * 2
    assert source.requests == [(0, CHUNK_SIZE)]


def test_chunks_arriving_during_a_commit_are_stored_by_the_next_one_together():
    """While one commit runs, scattered chunks arrive (a trace replayed: many small
    ranges at once): the keeper hands them to the next store call all together, as
    runs of adjacent chunks in index order, so they cost one commit, not one each."""
    from blockstore.fetch.keeper import Keeper

    calls: list[list[tuple[int, int]]] = []
    first_commit = threading.Event()
    release = threading.Event()

    def store(runs) -> None:
        calls.append([(first, len(chunks)) for first, chunks in runs])
        first_commit.set()
        release.wait(5)

    keeper = Keeper(store)
    keeper.put(0, b"a")
    assert first_commit.wait(5)
    for index in (9, 3, 4, 20, 5, 10):
        keeper.put(index, b"x")
    release.set()
    assert keeper.drain(5)
    assert calls == [[(0, 1)], [(3, 3), (9, 2), (20, 1)]]


def test_the_keeper_commits_at_most_a_batch_of_what_waited():
    """Tried: 600 chunks arrive while one commit runs (a fast source, a slow disk).
    Must hold: no commit takes more than ``BATCH_AT_MOST`` of them, and all are stored,
    in arrival order. Before, the next commit took all 599: one commit evicting under the
    cap cannot reuse the pages it frees, so on a disk a little larger than the cap it
    needed room for the whole layer beside it, and failed."""
    from blockstore.fetch.keeper import BATCH_AT_MOST, Keeper

    sizes: list[int] = []
    stored: list[int] = []
    first_commit = threading.Event()
    release = threading.Event()

    def store(runs) -> None:
        sizes.append(sum(len(chunks) for _, chunks in runs))
        stored.extend(first + i for first, chunks in runs for i in range(len(chunks)))
        first_commit.set()
        release.wait(5)

    keeper = Keeper(store)
    keeper.put(0, b"a")
    assert first_commit.wait(5)
    for index in range(1, 600):
        keeper.put(index, b"x")
    release.set()
    assert keeper.drain(5)
    assert max(sizes) <= BATCH_AT_MOST < 599, sizes
    assert stored == list(range(600))


def test_reads_no_fetch_thread_can_start_for_fail_at_once_and_fetching_recovers(cache_dir):
    """Tried: cold reads of more chunks than the blob has fetch workers, while the
    process cannot start a thread (at its thread limit); then a read once it can. Must
    hold: each fails at once naming the cause, and the later read returns the right
    bytes. Before, every failed start still counted as a worker, so once the count
    reached the limit no worker was ever started again and every read hung."""
    data, digest = make_blob((DEFAULT_WORKERS + 4) * CHUNK_SIZE, seed=21)
    with ChunkStore(cache_dir) as store:
        blob = CachedBlob(store, digest, len(data), PieceSource(data, digest), readahead=NONE)
        with no_threads_for("_work"):
            for index in range(DEFAULT_WORKERS + 2):
                started = time.monotonic()
                with pytest.raises(BlobReadError, match="no thread could") as caught:
                    blob.read(index * CHUNK_SIZE, CHUNK_SIZE)
                assert exit_code(caught.value) == OutOfResources.exit_code
                assert time.monotonic() - started < 2
        got: list[bytes] = []
        reader = threading.Thread(target=lambda: got.append(b"".join(blob.read(0, CHUNK_SIZE))))
        reader.start()
        reader.join(10)
        assert got == [data[:CHUNK_SIZE]], "the read after the limit was lifted hung"
        blob.close()


class HeldQuestion:
    """A ``keeps_nothing`` whose answer (``keeps_nothing``) waits until ``answer`` is set;
    ``asked`` is set once it is asked."""

    def __init__(self, keeps_nothing: bool):
        self.keeps_nothing = keeps_nothing
        self.asked, self.answer = threading.Event(), threading.Event()

    def __call__(self) -> bool:
        self.asked.set()
        self.answer.wait(30)
        return self.keeps_nothing


def bare_fetcher(source: PieceSource, keeps_nothing: HeldQuestion) -> Fetcher:
    """A fetcher of ``source`` with no cache behind it: each chunk taken as it comes."""
    return Fetcher(
        source,
        CHUNK_SIZE,
        lambda index, chunk: bytes(chunk),
        lambda runs: None,
        lambda indices: {},
        keeps_nothing=keeps_nothing,
    )


def reader_of(fetcher: Fetcher, index: int, got: dict[int, bytes]) -> threading.Thread:
    """A thread (not started) that reads chunk ``index`` into ``got``."""
    return threading.Thread(
        target=lambda: got.update(fetcher.fetch([index], store_wait=0)), daemon=True
    )


def test_a_reader_is_not_held_while_a_queued_prefetch_asks_whether_anything_is_kept():
    """Tried: a queued prefetch job whose turn comes while asking whether the cache keeps
    anything takes long (a damaged cache's handle is replaced then: LMDB closed, its
    directory moved aside, opened anew), and meanwhile a reader asks for another chunk.
    Must hold: the reader gets its chunk while the question is still unanswered. Before,
    it was asked under the lock every reader of the blob takes, so all of them waited."""
    data, digest = make_blob(8 * CHUNK_SIZE, seed=27)
    question = HeldQuestion(keeps_nothing=False)
    fetcher = bare_fetcher(PieceSource(data, digest), question)
    got: dict[int, bytes] = {}
    reader = reader_of(fetcher, 5, got)
    try:
        assert fetcher.prefetch([0])
        assert question.asked.wait(10)
        reader.start()
        reader.join(10)
        assert got == {5: data[5 * CHUNK_SIZE : 6 * CHUNK_SIZE]}
    finally:
        question.answer.set()
        fetcher.close()


def test_a_prefetch_a_reader_joined_is_fetched_for_it_though_the_cache_keeps_nothing():
    """Tried: a cache that keeps nothing (lost); a queued prefetch of a chunk, and, as its
    turn comes (while it asks whether the cache keeps anything), a reader that asks for
    that chunk and so joins it. Must hold: the reader gets the chunk's bytes, fetched by
    that job: only a job no reader waits on is dropped, never answering a reader with
    "not fetched ahead"."""
    data, digest = make_blob(4 * CHUNK_SIZE, seed=28)
    source = PieceSource(data, digest)
    question = HeldQuestion(keeps_nothing=True)
    fetcher = bare_fetcher(source, question)
    got: dict[int, bytes] = {}
    reader = reader_of(fetcher, 1, got)
    try:
        assert fetcher.prefetch([1])
        assert question.asked.wait(10)
        reader.start()
        assert wait_for(lambda: any(job.waited for job in list(fetcher._live)), 10)
        question.answer.set()
        reader.join(10)
        assert got == {1: data[CHUNK_SIZE : 2 * CHUNK_SIZE]}
        assert source.requests == [(CHUNK_SIZE, CHUNK_SIZE)]
    finally:
        question.answer.set()
        fetcher.close()
