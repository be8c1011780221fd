"""Blob sources for the fetch tests: real bytes that arrive piece by piece, with faults.

The fetch engine's backend interface is what is under test here, so a
source that is slow to answer, streams slowly, fails or comes up short is a
backend like any other. Every request is recorded, and so is the most
requests ever in flight at once, overall and for any one chunk.
"""

from __future__ import annotations

import hashlib
import random
import threading
import time
from collections.abc import Iterator

from blockstore.errors import BlobReadError

CHUNK = 32768


def make_blob(size: int, seed: int = 0) -> tuple[bytes, str]:
    """Reproducible random bytes and their sha256 digest."""
    data = random.Random(seed).randbytes(size)
    return data, "sha256:" + hashlib.sha256(data).hexdigest()


class PieceSource:
    """A ``BlobSource`` with ``stream_range``: ``first_byte`` seconds before the first
    piece of each request, then ``piece`` bytes every ``piece_delay`` seconds.

    ``fail_next``: that many next requests raise ``BlobReadError`` (after
    ``fail_after`` bytes of their body); ``fault="short"`` sends one byte
    too few. Cleared, ``answering`` holds every request before its first byte
    until it is set again: what a caller does meanwhile cannot be the fetch's doing.
    """

    def __init__(
        self,
        data: bytes,
        digest: str,
        *,
        first_byte: float = 0.0,
        piece: int = CHUNK,
        piece_delay: float = 0.0,
    ):
        self.data = data
        self._digest = digest
        self.first_byte = first_byte
        self.piece = piece
        self.piece_delay = piece_delay
        self.fault: str | None = None
        self.answering = threading.Event()
        self.answering.set()
        self.fail_next = 0
        self.fail_after = 0
        self.failed = 0
        """Injected failures raised so far."""
        self.armed = 0
        """Requests started that will fail (each is counted in ``failed`` when it does)."""
        self.requests: list[tuple[int, int]] = []
        self.max_in_flight = 0
        self.max_same_chunk_in_flight = 0
        self.max_same_block_in_flight = 0
        """The same, for 4 KiB blocks: a replay fetches blocks of one chunk apart."""
        self._active = 0
        self._chunks_active: dict[int, int] = {}
        self._blocks_active: dict[int, int] = {}
        self._lock = threading.Lock()

    @property
    def digest(self) -> str:
        return self._digest

    @property
    def size(self) -> int:
        return len(self.data)

    def read_range(self, offset: int, length: int) -> bytes:
        return b"".join(self.stream_range(offset, length))

    def disarm(self) -> None:
        """No more injected failures; those already armed still happen."""
        with self._lock:
            self.fail_next = 0

    def failing_in_flight(self) -> bool:
        with self._lock:
            return self.armed > self.failed

    def _count_failure(self) -> None:
        with self._lock:
            self.failed += 1

    def stream_range(self, offset: int, length: int) -> Iterator[bytes]:
        length = max(0, min(length, len(self.data) - offset))
        chunks = range(offset // CHUNK, (offset + length - 1) // CHUNK + 1)
        blocks = range(offset // 4096, (offset + length - 1) // 4096 + 1)
        with self._lock:
            self.requests.append((offset, length))
            self._active += 1
            self.max_in_flight = max(self.max_in_flight, self._active)
            for c in chunks:
                self._chunks_active[c] = self._chunks_active.get(c, 0) + 1
                self.max_same_chunk_in_flight = max(
                    self.max_same_chunk_in_flight, self._chunks_active[c]
                )
            for b in blocks:
                self._blocks_active[b] = self._blocks_active.get(b, 0) + 1
                self.max_same_block_in_flight = max(
                    self.max_same_block_in_flight, self._blocks_active[b]
                )
            failing = self.fail_next > 0
            if failing:
                self.fail_next -= 1
                self.armed += 1
        over = False

        def done() -> None:
            nonlocal over
            with self._lock:
                if over:
                    return
                over = True
                self._active -= 1
                for c in chunks:
                    self._chunks_active[c] -= 1
                for b in blocks:
                    self._blocks_active[b] -= 1

        try:
            self.answering.wait()
            if self.first_byte:
                time.sleep(self.first_byte)
            end = offset + length - (1 if self.fault == "short" else 0)
            sent = 0
            for at in range(offset, end, self.piece):
                if failing and sent >= self.fail_after:
                    self._count_failure()
                    raise BlobReadError(f"injected failure at {at}")
                piece = self.data[at : min(end, at + self.piece)]
                if at + self.piece >= end and not failing:
                    done()  # the last byte is sent: the request is over for the server
                yield piece
                sent += len(piece)
                if self.piece_delay:
                    time.sleep(self.piece_delay)
            if failing:
                self._count_failure()
                raise BlobReadError(f"injected failure after {sent} bytes")
        finally:
            done()


class WholeSource(PieceSource):
    """The same, seen through ``read_range`` alone (a backend that cannot stream)."""

    stream_range = property(lambda self: None)  # type: ignore[assignment]

    def read_range(self, offset: int, length: int) -> bytes:
        return b"".join(PieceSource.stream_range(self, offset, length))
