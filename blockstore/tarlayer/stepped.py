"""A raw stream whose bytes are made a step at a time: the compressed-layer indexers.

Each indexer decompresses its blob in steps, recording restart points as it
goes; reading it (tarfile walks the uncompressed tar through it) and
finishing it (reading to the end) are the same for all of them.
"""

from __future__ import annotations

import io
from collections import deque
from collections.abc import Callable

from blockstore.tarlayer.tree import DamagedTar

KEPT_OUTPUT = 1 << 16
"""Output kept before the newest piece, at least: tarfile's stream reads 10 KiB ahead,
so the header where it stopped is still here to be looked at (``made_at``), however
large the piece that the read ahead reached into; and a gzip checkpoint's 32 KiB
window is always here."""


READS_AT_END = 64
"""Reads past the end of the output taken before the stream is called damaged:
``tarfile``'s stream skips an entry's data by reading it, block after block, however
many the entry claims; at the end each read returns nothing, and one claiming 2^62
bytes would spin for ever. Its own end of the archive takes a read or two there."""


class SteppedReader(io.RawIOBase):
    """Serves what ``_step`` makes; a subclass sets ``_pending`` and ``_eof`` in it."""

    def __init__(self) -> None:
        super().__init__()
        self._pending = memoryview(b"")
        self._eof = False
        self.sink: Callable[[bytes], None] | None = None
        """Given every piece of the output in order, whether anyone reads it or not."""
        self._kept: deque[tuple[int, bytes]] = deque()  # (offset, piece): the last output
        self._kept_len = 0
        self._made_len = 0
        self._reads_at_end = 0

    def _made(self, out: bytes) -> None:
        """A step's output: to be read, and to the sink."""
        self._pending = memoryview(out)
        kept = self._kept
        kept.append((self._made_len, out))
        self._made_len += len(out)
        self._kept_len += len(out)
        # What comes before the newest piece must stay KEPT_OUTPUT long: counted with
        # it, one large piece would push out the one where tarfile stopped.
        while len(kept) > 1 and self._kept_len - len(kept[0][1]) - len(out) >= KEPT_OUTPUT:
            self._kept_len -= len(kept.popleft()[1])
        if self.sink is not None:
            self.sink(out)

    def made_nothing(self) -> bool:
        """The whole stream decompresses to no bytes at all (an empty layer)."""
        return self._made_len == 0 and not self.read(1)

    def _step(self) -> None:
        raise NotImplementedError

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:  # type: ignore[no-untyped-def]
        while not self._pending and not self._eof:
            self._step()
        if not self._pending and len(buffer):
            self._reads_at_end += 1
            if self._reads_at_end > READS_AT_END:
                raise DamagedTar(
                    f"an entry of the tar claims more bytes than the stream holds (it ends "
                    f"at byte {self._made_len})"
                )
        n = min(len(buffer), len(self._pending))
        buffer[:n] = self._pending[:n]
        self._pending = self._pending[n:]
        return n

    def make_to(self, end: int) -> None:
        """Make the output up to byte ``end`` (or to the end of the stream), once nothing
        reads it any more: to look past where ``tarfile`` stopped (``made_at``)."""
        while self._made_len < end and not self._eof:
            self._step()

    def made_at(self, offset: int, length: int) -> bytes | None:
        """Up to ``length`` bytes of output from ``offset``, if still kept (the last
        ``KEPT_OUTPUT`` bytes made are)."""
        if not self._kept or offset < self._kept[0][0]:
            return None
        start = offset - self._kept[0][0]
        return b"".join(piece for _, piece in self._kept)[start : start + length]

    def _read_to_end(self) -> None:
        """Step to the end of the stream, dropping what nobody read."""
        while not self._eof:
            self._step()
        self._pending = memoryview(b"")
