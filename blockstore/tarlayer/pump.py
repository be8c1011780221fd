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
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from blockstore.cache import CHUNK_SIZE
from blockstore.cache.layout import chunk_count
from blockstore.errors import BlockstoreError
from blockstore.prefetch.feed import Pacer
from blockstore.tarlayer.export import DecompressedTar

log = logging.getLogger(__name__)

WORKERS = 2
"""Spans decompressed at once by the pump (readers' own misses come on top)."""
AHEAD = 4
"""Spans whose compressed bytes are asked for ahead of the one being decompressed."""
ROUNDS = 3
"""Passes over what is still missing: a chunk shared by two spans needs both."""


class SpanPump:
    """Decompresses every span of a layer whose chunks are not all in the cache."""

    def __init__(
        self,
        tar: DecompressedTar,
        missing: Callable[[range], list[int]],
        hint: Callable[[int, int], None],
        *,
        workers: int = WORKERS,
        rate: int = 0,
    ):
        """``missing(chunks)``: those of ``chunks`` not in the cache;
        ``hint(offset, length)``: prefetch compressed bytes soon needed; ``rate``:
        compressed bytes per second the pump may take (0: no cap)."""
        self._tar = tar
        self._missing = missing
        self._hint = hint
        self._workers = workers
        self._pacer = Pacer(rate)
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

    def _cached(self, index: int) -> bool:
        """Every chunk of span ``index`` is in the cache (a reader decompressed it)."""
        start, end = self._tar.spans.bounds(index)
        return not self._missing(range(start // CHUNK_SIZE, -(-end // CHUNK_SIZE)))

    def run(self) -> bool:
        """Decompress what is missing, in order, ``workers`` spans at a time; True once
        every chunk is in the cache, False if stopped first. A span that fails (its
        bytes do not match its digest, a fetch failed) raises ``BlockstoreError``."""
        for _ in range(ROUNDS):
            todo = self.wanted()
            if not todo:
                return True
            if not self._round(todo):
                return False
        return not self.wanted()

    def _round(self, todo: list[int]) -> bool:
        queue = iter(todo)
        failures: list[BlockstoreError] = []

        def work() -> None:
            while not self._stop.is_set() and not failures:
                with self._lock:
                    index = next(queue, None)
                if index is None:
                    return
                if self._cached(index):
                    continue
                spans = self._tar.spans
                start, end = spans.compressed_bounds(index)
                if not self._pacer.take(end - start, self._stop):
                    return
                # The next spans' compressed bytes come while this one inflates.
                ahead = min(index + AHEAD, len(spans.points) - 1)
                if ahead > index:
                    after = spans.compressed_bounds(ahead)[1]
                    self._hint(end, max(0, after - end))
                try:
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
