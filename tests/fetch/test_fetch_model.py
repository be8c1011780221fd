"""Every byte right under all of it: demand reads, prefetch, CACHE, a trace's blocks
replayed as parts of chunks, eviction, failures.

A hypothesis state machine drives one blob through the cache from a source
that streams in small pieces and fails when told to, mid-body or at once.
Every byte a read returns is compared with the source; a read may fail
(EIO) only when a request that was to fail was in flight while it ran.
"""

from __future__ import annotations

import errno
import shutil
import tempfile
import time
from pathlib import Path

from fetch_sources import PieceSource, make_blob
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from blockstore.cache import CHUNK_SIZE, CachedBlob, ChunkStore
from blockstore.cache.traces import TraceShelf
from blockstore.fetch import FILL, PREFETCH
from blockstore.prefetch import PrefetchSettings, Trace

CHUNKS = 48
DATA, DIGEST = make_blob(CHUNKS * CHUNK_SIZE - 1000, seed=77)  # a short last chunk
SIZE = len(DATA)


class FetchModel(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.tmp = Path(tempfile.mkdtemp(prefix="fetch-model-"))
        self.store = ChunkStore(self.tmp / "cache", flush_interval=0.05)
        # A trace in the cache gives the blob a block fetcher; the rule below feeds it.
        TraceShelf(self.store).put(Trace(DIGEST, 4096, time.time(), [(0, 3, 2)]))
        self.source = PieceSource(DATA, DIGEST, piece=7777)
        settings = PrefetchSettings(trace_replay=True)
        self.blob = CachedBlob(self.store, DIGEST, SIZE, self.source, settings=settings)
        self.reads = 0

    @rule(
        offset=st.integers(0, SIZE - 1),
        length=st.integers(1, 6 * CHUNK_SIZE),
    )
    def read(self, offset: int, length: int) -> None:
        length = min(length, SIZE - offset)
        failed_before = self.source.failed
        busy = self.blob._fetcher.in_flight() + self.blob._block_fetcher.in_flight() > 0
        try:
            got = b"".join(bytes(b) for b in self.blob.read(offset, length))
        except OSError as exc:
            assert exc.errno == errno.EIO
            # A failing request overlapped this read: it started before the read ended
            # and had not failed yet when the read began, or it had failed but the
            # fetcher had yet to tell its chunks' waiters (chunks were in flight).
            overlapped = self.source.armed > failed_before
            being_told = busy and failed_before > 0
            assert overlapped or being_told, f"EIO with no failure injected: {exc}"
            return
        assert got == DATA[offset : offset + length]
        self.reads += 1

    @rule(offset=st.integers(0, SIZE - 1), length=st.integers(1, 16 * CHUNK_SIZE))
    def cache_hint(self, offset: int, length: int) -> None:
        """A client's CACHE: returns at once, whatever the source does."""
        self.blob.cache(offset, min(length, SIZE - offset))

    @rule(first=st.integers(0, CHUNKS - 1), count=st.integers(1, CHUNKS), fill=st.booleans())
    def prefetch(self, first: int, count: int, fill: bool) -> None:
        fetcher = self.blob._fetcher
        fetcher.prefetch(range(first, min(CHUNKS, first + count)), FILL if fill else PREFETCH)

    @rule(blocks=st.lists(st.integers(0, SIZE // 4096), min_size=1, max_size=12))
    def replay_blocks(self, blocks: list[int]) -> None:
        """A trace's blocks asked for, as a replay does: kept as parts of their chunks."""
        self.blob._block_fetcher.prefetch(sorted(set(blocks)), PREFETCH)

    @rule()
    def evict(self) -> None:
        self.store.remove(DIGEST)

    @rule(after=st.sampled_from([0, 1, 5000, 40000]))
    def inject_failure(self, after: int) -> None:
        self.source.fail_after = after
        self.source.fail_next += 1

    @rule()
    def read_everything(self) -> None:
        """Once no failure is pending nor in flight, a whole read succeeds and is right."""
        self.source.disarm()
        deadline = time.monotonic() + 10
        while (  # a failing request still runs, or its waiters are being told
            self.source.failing_in_flight()
            or self.blob._fetcher.in_flight()
            or self.blob._block_fetcher.in_flight()
        ):
            assert time.monotonic() < deadline
            time.sleep(0.005)
        got = b"".join(bytes(b) for b in self.blob.read(0, SIZE))
        assert got == DATA

    @invariant()
    def nothing_in_flight_twice(self) -> None:
        assert self.source.max_same_block_in_flight <= 1

    def teardown(self) -> None:
        self.blob.close()
        self.store.close()
        shutil.rmtree(self.tmp, ignore_errors=True)


FetchModel.TestCase.settings = settings(max_examples=15, stateful_step_count=20, deadline=None)
test_fetch_model = FetchModel.TestCase
