"""Where blob bytes come from: the interface every backend answers.

The chunk cache reads misses through a ``BlobSource``; a layer in a registry
(``RegistryBlob``) is one, and a new backend (an S3 URL, a mirror, a local file) slots in by
answering the same three members.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol, runtime_checkable


class BlobSource(Protocol):
    """Random access to the bytes of one content-addressed blob.

    A source that checks what it reads chunk by chunk, and so can read only
    whole chunks, says so with a class attribute ``checks_whole_chunks = True``.
    """

    @property
    def digest(self) -> str:
        """The blob's ``sha256:<hex>`` digest: the cache key."""

    @property
    def size(self) -> int:
        """The blob's length in bytes, known before any read."""

    def read_range(self, offset: int, length: int) -> bytes:
        """Return exactly ``min(length, size - offset)`` bytes from ``offset``.

        Callers keep ``length`` bounded (a few MiB), so an implementation may
        return one ``bytes``. Failures raise ``BlockstoreError`` subclasses.
        """


@runtime_checkable
class StreamingSource(BlobSource, Protocol):
    """A source that can also hand a range over as it arrives (optional).

    The fetcher uses ``stream_range`` when a source has it, so the first
    chunk of a long range is served before the last byte is in; other
    sources are read with ``read_range``.
    """

    def stream_range(self, offset: int, length: int) -> Iterator[bytes]:
        """The bytes ``read_range`` would return, yielded in pieces as they arrive.

        The pieces add up to exactly ``min(length, size - offset)`` bytes,
        or a ``BlobReadError`` is raised.
        """
