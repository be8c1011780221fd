"""A raw stream whose bytes are made a step at a time: the compressed-layer indexers.

Each indexer decompresses its blob in steps, recording restart points as it
goes; reading it (tarfile walks the uncompressed tar through it) and
finishing it (reading to the end) are the same for all of them.
"""

from __future__ import annotations

import io
from collections.abc import Callable


class SteppedReader(io.RawIOBase):
    """Serves what ``_step`` makes; a subclass sets ``_pending`` and ``_eof`` in it."""

    def __init__(self) -> None:
        super().__init__()
        self._pending = memoryview(b"")
        self._eof = False
        self.sink: Callable[[bytes], None] | None = None
        """Given every piece of the output in order, whether anyone reads it or not."""

    def _made(self, out: bytes) -> None:
        """A step's output: to be read, and to the sink."""
        self._pending = memoryview(out)
        if self.sink is not None:
            self.sink(out)

    def _step(self) -> None:
        raise NotImplementedError

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:  # type: ignore[no-untyped-def]
        while not self._pending and not self._eof:
            self._step()
        n = min(len(buffer), len(self._pending))
        buffer[:n] = self._pending[:n]
        self._pending = self._pending[n:]
        return n

    def _read_to_end(self) -> None:
        """Step to the end of the stream, dropping what nobody read."""
        while not self._eof:
            self._step()
        self._pending = memoryview(b"")
