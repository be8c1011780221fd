"""A ``BlobSource`` filter that checks every chunk against the layer's chunk index.

It sits between the cache and the registry the way ``TimedSource`` does, so
neither knows of it: each chunk of a range is checked as it arrives, before
the fetcher can store or serve it. A chunk that does not match is fetched
once more, from the upstream when the first bytes may have come through a
mirror; if it still does not match, the read fails with EIO and the log
names the source, the offset and both digests.

An index can lie too. When a chunk fails twice, the layer itself judges:
it is streamed once from the upstream in the background, hashed whole and
chunk by chunk. If the layer matches its digest but not the table, the
table is dropped and reported (``on_lying_index``), and later reads go
unchecked by it (the layer is then checked at the seal, as without an
index). If the layer does not match its digest, the registry is at fault
and the index stays.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Callable, Iterator

from blockstore.chunkindex import ChunkIndex
from blockstore.errors import BlobReadError, BlockstoreError
from blockstore.fetch.stream import chunks_of, pieces
from blockstore.source import BlobSource

log = logging.getLogger(__name__)

JUDGE_STEP = 4 << 20
"""Bytes read at a time when the layer is streamed whole to judge its index."""
JUDGE_AGAIN_AFTER = 300.0
"""Seconds a verdict against the registry holds: the chunks that fail meanwhile are not
worth streaming the whole layer again for (a client retrying would have it streamed
once per retry)."""


class IndexedSource:
    """``inner`` with every chunk checked against ``index``; ``upstream`` refetches."""

    checks_whole_chunks = True
    """Ranges read through it must be whole chunks: a part of one cannot be checked."""

    def __init__(
        self,
        inner: BlobSource,
        index: ChunkIndex,
        *,
        upstream: BlobSource | None = None,
        on_lying_index: Callable[[str], None] | None = None,
    ):
        self._inner = inner
        self._index: ChunkIndex | None = index
        self._upstream = upstream if upstream is not None else inner
        self._on_lying_index = on_lying_index
        self._judging = threading.Lock()
        self._registry_at_fault_until = 0.0

    @property
    def digest(self) -> str:
        return self._inner.digest

    @property
    def size(self) -> int:
        return self._inner.size

    @property
    def checking(self) -> bool:
        """Whether the index is still in use (it is dropped once found lying)."""
        return self._index is not None

    def read_range(self, offset: int, length: int) -> bytes:
        """Exactly the bytes asked for (the chunks they are checked in may be longer)."""
        data = b"".join(self.stream_range(offset, length))
        return data[: max(0, min(length, self.size - offset))]

    def stream_range(self, offset: int, length: int) -> Iterator[bytes]:
        """The range in checked pieces, each a whole chunk (the fetcher asks aligned ranges)."""
        index = self._index
        if index is None:
            yield from pieces(self._inner, offset, length)
            return
        size = index.chunk_size
        if offset % size:
            # Not from the fetcher: check the chunks around it, hand out the part asked.
            start = offset - offset % size
            data = self.read_range(start, offset - start + length)
            yield data[offset - start :]
            return
        length = max(0, min(length, self.size - offset))
        count = -(-length // size)
        for number, chunk in chunks_of(self._inner, offset // size, count, size):
            yield self._checked(index, number, chunk)

    def _checked(self, index: ChunkIndex, number: int, chunk: memoryview) -> bytes | memoryview:
        if index.matches(number, chunk):
            return chunk
        offset = number * index.chunk_size
        got = hashlib.sha256(chunk).hexdigest()
        log.warning(
            "%r: chunk %d (offset %d) has sha256 %s, the chunk index says %s; fetching it again "
            "from %r",
            self._inner, number, offset, got, index.chunk_hex(number), self._upstream,
        )  # fmt: skip
        again = self._upstream.read_range(offset, index.chunk_size)
        if index.matches(number, again):
            return again
        again_hex = hashlib.sha256(again).hexdigest()
        self._judge_later(index, number)
        raise BlobReadError(
            f"{self.digest}: chunk {number} (offset {offset}) does not match the chunk index "
            f"from {self._inner!r} (sha256 {got}) nor from {self._upstream!r} (sha256 "
            f"{again_hex}); the index says {index.chunk_hex(number)}"
        )

    def _judge_later(self, index: ChunkIndex, number: int) -> None:
        """Let the layer's digest say whether the index or the registry is lying."""
        if time.monotonic() < self._registry_at_fault_until:
            return  # judged lately: the registry's bytes failed the layer digest
        if not self._judging.acquire(blocking=False):
            return  # a judgement is already under way
        threading.Thread(
            target=self._judge, args=(index, number), name="index-judge", daemon=True
        ).start()

    def _judge(self, index: ChunkIndex, failed: int) -> None:
        try:
            whole = hashlib.sha256()
            disagree = []
            for at in range(0, self.size, JUDGE_STEP):
                data = self._upstream.read_range(at, min(JUDGE_STEP, self.size - at))
                whole.update(data)
                first = at // index.chunk_size
                for i in range(0, len(data), index.chunk_size):
                    if not index.matches(
                        first + i // index.chunk_size, data[i : i + index.chunk_size]
                    ):
                        disagree.append(first + i // index.chunk_size)
            if f"sha256:{whole.hexdigest()}" != self.digest:
                self._registry_at_fault_until = time.monotonic() + JUDGE_AGAIN_AFTER
                log.warning(
                    "%s: the registry's bytes do not match the layer digest; the chunk index "
                    "is kept and chunk %d stays unreadable",
                    self.digest, failed,
                )  # fmt: skip
                return
            if disagree:
                self._index = None
                log.warning(
                    "%s: the chunk index disagrees with the layer, which matches its digest "
                    "(chunks %s): the index is dropped",
                    self.digest, ", ".join(map(str, disagree[:8])),
                )  # fmt: skip
                if self._on_lying_index is not None:
                    self._on_lying_index(self.digest)
        except BlockstoreError as exc:
            log.warning("%s: the chunk index could not be judged: %s", self.digest, exc)
        finally:
            self._judging.release()

    def __repr__(self) -> str:
        return repr(self._inner)
