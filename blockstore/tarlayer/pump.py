"""Span readahead: a compressed layer's spans decompressed in order, ahead of its readers.

Any file of a gzip or zstd layer costs the decompression of a whole span
(megabytes), and a listing or a few files of each directory touch most of
them: reading span by span as misses arrive serialises a round trip and an
inflate per span behind the reader. ``SpanPump`` instead goes through the
layer in order on a few threads (inflating releases the GIL, so they run on
as many cores), each fetching its span's compressed bytes and inflating
them, so the fetch of one span overlaps the inflating of others. A reader
that misses a span the pump has not reached decompresses it at once itself
(demand first); one the pump is working on waits for that one
decompression. Every span goes through ``DecompressedTar``, so it is
checked against its recorded digest and all its chunks are stored.

``SpanBytes`` is where the compressed bytes come from: straight from the
blob's source, held in memory only until their span is inflated. Only the
tar's chunks are stored: each compressed byte is checked through the span
it inflates to (its recorded sha256) and the tar sealed against the
diff_id, so storing the blob's own chunks as well would only double the
cache's writes.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from blockstore.cache import CHUNK_SIZE
from blockstore.cache.errors import CacheDamaged
from blockstore.cache.layout import chunk_count
from blockstore.cache.turns import PrefetchTurn
from blockstore.errors import BlobReadError, BlockstoreError
from blockstore.export import Buffer
from blockstore.prefetch.feed import Pacer
from blockstore.source import BlobSource
from blockstore.tarlayer.export import DecompressedTar
from blockstore.tarlayer.layerindex import SpanIndex

log = logging.getLogger(__name__)

WORKERS = 2
"""Spans decompressed at once by the pump (readers' own misses come on top)."""
AHEAD = 4
"""Spans whose compressed bytes are asked for ahead of the one being decompressed."""
KEPT_AHEAD = 4 * AHEAD
"""Most ranges fetched ahead and not yet taken (a reader may have taken their spans)."""
AHEAD_AT_MOST = 32 << 20
"""A larger range (a zstd layer of one frame) is not held in memory: its span reads it
as it decompresses, a piece at a time."""
ROUNDS = 3
"""Passes over what is still missing: a chunk shared by two spans needs both."""


class SpanBytes:
    """A compressed blob's ranges for span inflation, fetched ahead, never stored.

    ``ahead(offset, length)`` starts fetching a range on a thread of its own
    (once, and not one a reader fetched itself: asked again, it is left to
    ``read``);
    ``read`` of bytes inside such a range waits for it and takes it (once:
    a span is inflated once, then served from the cache), else reads them
    from the cache if they are there (an earlier indexing pass), else from
    the source.
    """

    def __init__(
        self,
        source: BlobSource,
        cached: Callable[[int, int], Sequence[Buffer] | None],
        fetched: Callable[[int], None],
        *,
        workers: int = AHEAD,
    ):
        """``cached(offset, length)``: those bytes if the cache holds them, else None;
        ``fetched(nbytes)``: counts a request to the source."""
        self._source = source
        self._cached = cached
        self._fetched = fetched
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="span-fetch")
        self._ahead: dict[tuple[int, int], Future[bytes]] = {}
        # Ranges ever fetched ahead: a span is inflated once, even if a chunk it shares
        # with the next span is not in the cache yet.
        self._asked: set[tuple[int, int]] = set()
        # The middles of ranges readers fetched themselves: a set, as a span evicted is
        # read again, and a server reads it again and again over its days.
        self._read_by_readers: set[int] = set()
        self._lock = threading.Lock()
        self._closed = False

    @property
    def size(self) -> int:
        return self._source.size

    def ahead(self, offset: int, length: int) -> None:
        """Start fetching ``offset..offset+length`` unless it is already coming."""
        with self._lock:
            key = (offset, length)
            if (
                self._closed
                or length <= 0
                or key in self._asked
                or len(self._ahead) >= KEPT_AHEAD
                or length > AHEAD_AT_MOST
                or any(offset <= middle < offset + length for middle in self._read_by_readers)
            ):
                return
            self._asked.add(key)
            self._ahead[key] = self._pool.submit(self._fetch, offset, length)

    def read(self, offset: int, length: int) -> bytes:
        end = offset + length
        with self._lock:
            key = next((k for k in self._ahead if k[0] <= offset and end <= sum(k)), None)
            coming = self._ahead.pop(key) if key is not None else None
        if coming is not None:
            try:
                data = coming.result()
            except BlockstoreError:
                pass  # fetched ahead while the source failed: this read asks again
            else:
                return data[offset - key[0] : end - key[0]]  # type: ignore[index]
        got = self._cached(offset, length)
        if got is not None:
            return b"".join(got)
        with self._lock:
            self._read_by_readers.add(offset + length // 2)
        return self._fetch(offset, length)

    def _fetch(self, offset: int, length: int) -> bytes:
        self._fetched(length)
        try:
            return self._source.read_range(offset, length)
        except BlockstoreError:
            raise
        except Exception as exc:  # a span fails with EIO, whatever the backend raised
            raise BlobReadError(f"{self._source.digest}: fetching failed: {exc}") from exc

    def close(self) -> None:
        with self._lock:
            self._closed = True
            pending, self._ahead = list(self._ahead.values()), {}
        for future in pending:
            future.cancel()
        self._pool.shutdown(wait=False)


class SpanPump:
    """Decompresses every span of a layer whose chunks are not all in the cache."""

    def __init__(
        self,
        tar: DecompressedTar,
        missing: Callable[[range], list[int]],
        hint: Callable[[int, int], None],
        flush: Callable[[], None],
        lost: Callable[[], str | None],
        *,
        workers: int = WORKERS,
        rate: int = 0,
        cache_dir: Path | None = None,
    ):
        """``missing(chunks)``: those of ``chunks`` not in the cache;
        ``hint(offset, length)``: fetch ahead the compressed bytes of a span soon
        inflated (``SpanBytes.ahead``); ``flush()``: waits until the spans inflated
        are stored (``SpanWriter.flush``); ``lost()``: why the cache keeps nothing
        any more (``ChunkStore.lost``), or None; ``rate``:
        compressed bytes per second the pump may take (0: no cap); ``cache_dir``: the
        cache whose prefetch turn the pump takes (``PrefetchTurn``), if any."""
        self._tar = tar
        self._missing = missing
        self._hint = hint
        self._flush = flush
        self._lost = lost
        self._workers = workers
        self._pacer = Pacer(rate)
        self._cache_dir = cache_dir
        self._stop = threading.Event()
        self._lock = threading.Lock()

    def stop(self) -> None:
        self._stop.set()

    def wanted(self) -> list[int]:
        """The spans holding a chunk not in the cache, in order."""
        spans = self._tar.spans
        size = spans.uncompressed_size
        out: set[int] = set()
        for chunk in self._missing(range(chunk_count(size))):
            start = chunk * CHUNK_SIZE
            first, last = spans.span_of(start), spans.span_of(min(start + CHUNK_SIZE, size) - 1)
            out.update(range(first, last + 1))
        return sorted(out)

    def _still_kept(self) -> None:
        """Raise ``CacheDamaged`` once the cache is lost: nothing inflated would be kept,
        and each round would fetch and inflate the whole layer again."""
        if (lost := self._lost()) is not None:
            raise CacheDamaged(lost)

    def _cached(self, index: int) -> bool:
        """Every chunk of span ``index`` is in the cache (a reader decompressed it)."""
        start, end = self._tar.spans.bounds(index)
        return not self._missing(range(start // CHUNK_SIZE, -(-end // CHUNK_SIZE)))

    def run(self) -> bool:
        """Decompress what is missing, in order, ``workers`` spans at a time; True once
        every chunk is in the cache, False if stopped first. A span that fails (its
        bytes do not match its digest, a fetch failed) raises ``BlockstoreError``; a
        cache lost meanwhile, ``CacheDamaged`` before the next span.

        It fills the cache as a prefetch does, so it takes its turn as one (shared,
        from its first span): a prefetch filling alone is then not evicted by it. Only
        the pump waits for the turn; readers inflate what they miss meanwhile."""
        with contextlib.ExitStack() as stack:
            turn = None
            if self._cache_dir is not None:
                turn = stack.enter_context(PrefetchTurn(self._cache_dir, self._stop))
            for number in range(ROUNDS):
                self._still_kept()
                todo = self.wanted()
                if not todo:
                    return True
                if turn is not None:
                    turn.join()
                finished = self._round(todo, first=number == 0)
                self._flush()
                if not finished:
                    return False
            return not self.wanted()

    def _round(self, todo: list[int], *, first: bool) -> bool:
        """One pass over ``todo``; the first skips the spans already inflated (by a
        reader), whose chunks shared with a neighbour not inflated yet still miss."""
        queue = iter(todo)
        spans = self._tar.spans

        def done(index: int) -> bool:
            return (first and self._tar.decompressions[index] > 0) or self._cached(index)

        failures: list[BlockstoreError] = []

        def work() -> None:
            try:
                while not self._stop.is_set() and not failures:
                    self._still_kept()
                    with self._lock:
                        index = next(queue, None)
                    if index is None:
                        return
                    if done(index):
                        continue
                    start, end = spans.compressed_bounds(index)
                    if not self._pacer.take(end - start, self._stop):
                        return
                    # The next spans' compressed bytes come while this one inflates.
                    for later in range(index, min(index + AHEAD + 1, len(spans.points))):
                        if later == index or not done(later):
                            self._hint(*_span_range(spans, later))
                    self._tar.span(index)
            except BlockstoreError as exc:
                failures.append(exc)

        threads = [
            threading.Thread(target=work, name=f"span-pump-{i}", daemon=True)
            for i in range(self._workers)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if failures:
            raise failures[0]
        return not self._stop.is_set()


def _span_range(spans: SpanIndex, index: int) -> tuple[int, int]:
    """(offset, length) of the compressed bytes span ``index`` is inflated from."""
    start, end = spans.compressed_bounds(index)
    return start, end - start
