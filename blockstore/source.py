"""Where blob bytes come from: the interface every backend answers.

The chunk cache reads misses through a ``BlobSource``; the registry client
is one, a local file another (tests, benchmarks), and a new backend (an S3
URL, a mirror) slots in by answering the same three members.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Protocol

from blockstore.errors import BlobReadError


class BlobSource(Protocol):
    """Random access to the bytes of one content-addressed blob."""

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


class LocalFileSource:
    """A blob that is a local file: for tests, benchmarks and local images."""

    def __init__(self, path: str | os.PathLike[str], digest: str):
        self._path = os.fspath(path)
        self._digest = digest
        self._fd = os.open(self._path, os.O_RDONLY | os.O_CLOEXEC)
        self._size = os.fstat(self._fd).st_size

    @property
    def digest(self) -> str:
        return self._digest

    @property
    def size(self) -> int:
        return self._size

    def read_range(self, offset: int, length: int) -> bytes:
        length = max(0, min(length, self._size - offset))
        try:
            return os.pread(self._fd, length, offset) if length else b""
        except OSError as exc:
            raise BlobReadError(f"reading {self._path} at {offset}: {exc.strerror}") from exc

    def close(self) -> None:
        os.close(self._fd)
