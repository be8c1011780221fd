"""Blob sources for the cache tests: real bytes, with faults a test can switch on.

The backend interface is what is under test here, so a source that fails,
stalls, comes up short or sends other bytes is a backend like any other.
"""

from __future__ import annotations

import hashlib
import random
import threading
import time

from blockstore.errors import BlobReadError, RegistryUnreachable


def make_blob(size: int, seed: int = 0) -> tuple[bytes, str]:
    """Reproducible random bytes and their sha256 digest."""
    data = random.Random(seed).randbytes(size)
    return data, "sha256:" + hashlib.sha256(data).hexdigest()


class ScriptedSource:
    """A ``BlobSource`` over bytes in memory, with switchable faults.

    ``fault``: None (healthy), "fail" (raise an EIO error), "unreachable"
    (raise an error that is no OSError), "short" (one byte too few),
    "corrupt" (one byte flipped). Records every request and the most
    requests that were ever in flight at once for any one chunk. Cleared,
    ``answering`` holds every request unanswered until it is set again.
    """

    def __init__(self, data: bytes, digest: str, *, delay: float = 0.0, chunk_size: int = 32768):
        self.data = data
        self._digest = digest
        self.delay = delay
        self.fault: str | None = None
        self.answering = threading.Event()
        self.answering.set()
        self.requests: list[tuple[int, int]] = []
        self._chunk_size = chunk_size
        self._lock = threading.Lock()
        self._in_flight: dict[int, int] = {}
        self.max_same_chunk_in_flight = 0
        self.max_in_flight = 0
        self._active = 0

    @property
    def digest(self) -> str:
        return self._digest

    @property
    def size(self) -> int:
        return len(self.data)

    def read_range(self, offset: int, length: int) -> bytes:
        chunks = range(offset // self._chunk_size, (offset + length - 1) // self._chunk_size + 1)
        with self._lock:
            self.requests.append((offset, length))
            self._active += 1
            self.max_in_flight = max(self.max_in_flight, self._active)
            for c in chunks:
                self._in_flight[c] = self._in_flight.get(c, 0) + 1
                self.max_same_chunk_in_flight = max(
                    self.max_same_chunk_in_flight, self._in_flight[c]
                )
        try:
            self.answering.wait()
            if self.delay:
                time.sleep(self.delay)
            fault = self.fault
            if fault == "fail":
                raise BlobReadError(f"source refused {offset}+{length}")
            if fault == "unreachable":
                raise RegistryUnreachable("no route to the source")
            data = self.data[offset : offset + length]
            if fault == "short":
                return data[:-1]
            if fault == "corrupt" and data:
                flipped = bytearray(data)
                flipped[len(flipped) // 2] ^= 0x5A
                return bytes(flipped)
            return data
        finally:
            with self._lock:
                self._active -= 1
                for c in chunks:
                    self._in_flight[c] -= 1
