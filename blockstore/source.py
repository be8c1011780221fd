"""Where blob bytes come from: the interface every backend answers.

The chunk cache reads misses through a ``BlobSource``; the registry client
is one, and a new backend (an S3 URL, a mirror, a local file) slots in by
answering the same three members.
"""

from __future__ import annotations

from typing import Protocol


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
