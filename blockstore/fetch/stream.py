"""A range read as a stream of whole chunks, whatever sizes the backend hands out.

Sources that can stream (``StreamingSource``) hand pieces as they arrive; the
others answer ``read_range`` with the whole range at once. Either way the
caller gets ``(index, chunk)`` pairs, each chunk a full chunk (the last one
of the blob may be short), so it can check, serve and store each one while
the rest of the range is still on the wire.
"""

from __future__ import annotations

from collections.abc import Iterator

from blockstore.errors import BlobReadError
from blockstore.source import BlobSource, StreamingSource


def pieces(source: BlobSource, offset: int, length: int) -> Iterator[bytes]:
    """The bytes of a range in arrival order: streamed when the source can."""
    if isinstance(source, StreamingSource):
        yield from source.stream_range(offset, length)
    else:
        yield source.read_range(offset, length)


def chunks_of(
    source: BlobSource, first: int, count: int, chunk_size: int
) -> Iterator[tuple[int, memoryview]]:
    """Chunks ``first .. first+count-1`` of ``source`` as they complete.

    Raises ``BlobReadError`` when the source sends more or fewer bytes than
    the range holds: a short chunk is never handed out.
    """
    offset = first * chunk_size
    want = max(0, min(count * chunk_size, source.size - offset))
    index = first
    got = 0
    partial = bytearray()
    for piece in pieces(source, offset, want):
        got += len(piece)
        if got > want:
            raise BlobReadError(f"{source.digest}: more than {want} bytes sent for {offset}")
        view = memoryview(piece)
        if partial:
            take = chunk_size - len(partial)
            partial += view[:take]
            view = view[take:]
            if len(partial) == chunk_size:
                yield index, memoryview(bytes(partial))
                index += 1
                partial = bytearray()
        while len(view) >= chunk_size:
            yield index, view[:chunk_size]
            view = view[chunk_size:]
            index += 1
        partial += view
    if got != want:
        raise BlobReadError(f"{source.digest}: asked for {want} bytes at {offset}, got {got}")
    if partial:
        yield index, memoryview(bytes(partial))
