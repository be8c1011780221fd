"""A layer blob in a registry, read by byte ranges: the cache's source of misses."""

from __future__ import annotations

import logging
from collections.abc import Iterator

from blockstore.errors import BlobReadError, BlockstoreError, RegistryUnreachable
from blockstore.registry.client import RegistryClient
from blockstore.registry.manifests import Layer
from blockstore.registry.ranges import clamp_range
from blockstore.registry.retry import Deadline, TryAgain

log = logging.getLogger(__name__)


class RegistryBlob:
    """``BlobSource`` over HTTP Range requests; thread-safe, one pooled session.

    Each read has one deadline (the client's timeout) that all its attempts
    share; every failure in the end is a ``BlobReadError`` (EIO) naming its
    cause.
    """

    def __init__(
        self,
        client: RegistryClient,
        repository: str,
        layer: Layer,
        *,
        upstream_only: bool = False,
    ):
        self.client = client
        self.repository = repository
        self.layer = layer
        self.upstream_only = upstream_only

    def from_upstream(self) -> RegistryBlob:
        """The same blob read from the upstream registry alone, past every mirror.

        For bytes that failed their digest: a mirror may have served them, and
        the upstream is the source of truth to fetch them again from.
        """
        return RegistryBlob(self.client, self.repository, self.layer, upstream_only=True)

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
        return self._read(*span, self.client.deadline())

    def _read(self, first: int, last: int, deadline: Deadline) -> bytes:
        try:
            return self.client.read_blob_range(
                self.repository,
                self.layer.digest,
                first,
                last,
                self.layer.size,
                deadline=deadline,
                upstream_only=self.upstream_only,
            )
        except BlobReadError:
            raise
        except BlockstoreError as exc:
            raise BlobReadError(str(exc)) from exc

    def stream_range(self, offset: int, length: int) -> Iterator[bytes]:
        """``read_range``'s bytes in pieces as they arrive, under the same one deadline.

        One streamed attempt; if it fails or breaks off, what is still
        missing is read with ``read_range``'s retries, from where it stopped.
        """
        span = clamp_range(offset, length, self.layer.size)
        if span is None:
            return
        first, last = span
        deadline = self.client.deadline()
        try:
            for piece in self.client.stream_blob_range(
                self.repository,
                self.layer.digest,
                first,
                last,
                self.layer.size,
                deadline=deadline,
                upstream_only=self.upstream_only,
            ):
                first += len(piece)
                yield piece
        except RegistryUnreachable as exc:
            # The registry is down (its outage said so), or cannot be spoken to (TLS):
            # a retrying read would only try it again.
            raise BlobReadError(str(exc)) from exc
        except Exception as exc:  # the retrying read takes over, and reports what persists
            if deadline.expired:  # no time left to resume in: the read's one deadline holds
                raise _final_error(exc)  # noqa: B904 (its cause is set on it)
            log.info("%s: resuming bytes %d-%d: %s", self, first, last, exc)
        if first <= last:
            yield self._read(first, last, deadline)


def _final_error(exc: Exception) -> Exception:
    """A streamed read's last failure as the ``BlobReadError`` a read ends with, caused
    by what the failure stands for (a ``TryAgain``'s own error: so a registry that could
    not be reached keeps its exit code). A bug, not an error of the engine's, stays as
    it is."""
    cause = exc.error if isinstance(exc, TryAgain) else exc
    if not isinstance(cause, BlockstoreError) or isinstance(cause, BlobReadError):
        return cause
    error = BlobReadError(str(cause))
    error.__cause__ = cause
    return error
