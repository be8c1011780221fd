"""A layer blob in a registry, read by byte ranges: the cache's source of misses."""

from __future__ import annotations

import logging
from collections.abc import Iterator

from blockstore.errors import BlobReadError, BlockstoreError
from blockstore.registry.client import RegistryClient
from blockstore.registry.manifests import Layer
from blockstore.registry.ranges import clamp_range
from blockstore.registry.retry import RetryClock

log = logging.getLogger(__name__)


class RegistryBlob:
    """``BlobSource`` over HTTP Range requests; thread-safe, one pooled session.

    A body cut short or a Content-Range that does not match is retried with
    backoff (the request-level retries only cover getting a reply); every
    failure in the end is a ``BlobReadError`` (EIO) naming its cause.
    """

    def __init__(self, client: RegistryClient, repository: str, layer: Layer):
        self.client = client
        self.repository = repository
        self.layer = layer

    def __repr__(self) -> str:
        return f"RegistryBlob({self.client.registry}/{self.repository}@{self.layer.digest})"

    @property
    def digest(self) -> str:
        return self.layer.digest

    @property
    def size(self) -> int:
        return self.layer.size

    def read_range(self, offset: int, length: int) -> bytes:
        span = clamp_range(offset, length, self.layer.size)
        if span is None:
            return b""
        first, last = span
        clock = RetryClock(self.client.retry_policy)
        while True:
            clock.start_attempt()
            try:
                return self.client.read_blob_range(
                    self.repository, self.layer.digest, first, last, self.layer.size
                )
            except BlobReadError as exc:
                if clock.wait_before_next():
                    log.info("retrying %s bytes %d-%d: %s", self, first, last, exc)
                    continue
                raise
            except BlockstoreError as exc:
                raise BlobReadError(str(exc)) from exc

    def stream_range(self, offset: int, length: int) -> Iterator[bytes]:
        """``read_range`` as pieces yielded as they arrive; a break resumes where it stopped."""
        span = clamp_range(offset, length, self.layer.size)
        if span is None:
            return
        first, last = span
        clock = RetryClock(self.client.retry_policy)
        while True:
            clock.start_attempt()
            try:
                for piece in self.client.stream_blob_range(
                    self.repository, self.layer.digest, first, last, self.layer.size
                ):
                    first += len(piece)
                    yield piece
                if first <= last:
                    raise BlobReadError(f"{self}: the body ended {last - first + 1} bytes short")
                return
            except BlobReadError as exc:
                if first <= last and clock.wait_before_next():
                    log.info("resuming %s at byte %d: %s", self, first, exc)
                    continue
                raise
            except BlockstoreError as exc:
                raise BlobReadError(str(exc)) from exc
