"""The directory walk's reads: whole chunks, looked up or fetched once per walk.

The warm-up walks an EROFS image's directories (``erofs_tree``) through many
small reads; this reader is what makes those cheap, apart from a client's
reads with their counting, tracing and readahead.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

from blockstore.errors import BlobReadError
from blockstore.export import Buffer

from .layout import CHUNK_SIZE


class WalkReader:
    """Bytes for the directory walk, each chunk looked up or fetched once per walk.

    A chunk holds many inodes and directory blocks; checking it in the cache
    again for each of them cost more CPU than the walk saved a cold copy.
    Missing chunks are fetched as demand reads, for they are the listing's own
    reads a moment early (and a listing waits for each in turn). Not a
    client's read: not counted as served, not traced, no readahead.
    """

    KEPT = 256  # chunks held (8 MiB): the walk goes through the image roughly in order

    def __init__(
        self,
        load: Callable[[Sequence[int]], dict[int, Buffer]],
        fetch: Callable[[list[int]], dict[int, Buffer]],
        size: int,
        done: Callable[[], bool],
    ):
        self._load = load
        self._fetch = fetch
        self._size = size
        self._done = done
        self._chunks: dict[int, bytes] = {}

    def __call__(self, offset: int, length: int) -> bytes:
        end = min(self._size, offset + length)
        if end <= offset:
            return b""
        indices = range(offset // CHUNK_SIZE, (end - 1) // CHUNK_SIZE + 1)
        held = {i: self._chunks.get(i) for i in indices}
        wanted = [i for i, chunk in held.items() if chunk is None]
        if wanted:
            found = self._load(wanted)
            missing = [i for i in wanted if i not in found]
            if missing:
                if self._done():
                    raise BlobReadError("the directory walk has ended")
                found.update(self._fetch(missing))
            for index in wanted:
                held[index] = self._chunks[index] = bytes(found[index])
            with contextlib.suppress(KeyError, RuntimeError):  # another walker evicted
                while len(self._chunks) > self.KEPT:
                    del self._chunks[next(iter(self._chunks))]
        base = indices[0] * CHUNK_SIZE
        data = b"".join(held.values()) if len(held) > 1 else held[indices[0]]
        return data[offset - base : end - base]  # type: ignore[index]
