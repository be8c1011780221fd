"""Restart points into a zstd stream: its frame boundaries.

Inside a zstd frame there is no random access, but every frame starts afresh.
A stream of many frames (zstd:chunked, the seekable format, pzstd) can be
entered at any frame start; a stream of one frame (what ``zstd`` writes by
default) has a single restart point, so the first read needs the whole frame
decompressed, once. Skippable frames (zstd:chunked's table of contents) carry
no tar bytes and are stepped over.
"""

from __future__ import annotations

import hashlib
from typing import IO

import zstandard

from blockstore.errors import IntegrityError
from blockstore.tarlayer.stepped import SteppedReader

ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_READ_SIZE = 1 << 20
_FEED = 1 << 17  # compressed bytes per decompress call: bounds each call's output


def _skippable(head: bytes) -> bool:
    return len(head) >= 4 and head[1:4] == b"\x2a\x4d\x18" and head[0] & 0xF0 == 0x50


class ZstdIndexer(SteppedReader):
    """The uncompressed bytes of a zstd blob read once, recording frame starts."""

    def __init__(self, source: IO[bytes], span: int):
        super().__init__()
        self._source = source
        self._span = span
        self._data = b""
        self._pos = 0  # into _data
        self._base = 0  # compressed offset of _data[0]
        self._frame: zstandard.ZstdDecompressionObj | None = None
        self._out = 0
        self.points: list[tuple[int, int]] = []  # (compressed, uncompressed) restart points
        self.span_digests: list[bytes] = []
        self._span_sha256 = hashlib.sha256()
        self.blob_sha256 = hashlib.sha256()
        self.tar_sha256 = hashlib.sha256()
        self.frames = 0
        self.compressed_size = 0

    def _have(self, n: int) -> bool:
        """Make at least ``n`` unconsumed bytes available, if the blob has them."""
        while len(self._data) - self._pos < n:
            more = self._source.read(_READ_SIZE)
            if not more:
                return False
            self.blob_sha256.update(more)
            self.compressed_size += len(more)
            self._base += self._pos
            self._data = self._data[self._pos :] + more
            self._pos = 0
        return True

    def _step(self) -> None:
        if self._frame is None:
            if not self._have(1):
                self._eof = True
                return
            if not self._have(8):
                raise IntegrityError("zstd stream ends inside a frame header")
            head = self._data[self._pos : self._pos + 8]
            if _skippable(head):
                size = int.from_bytes(head[4:8], "little")
                if not self._have(8 + size):
                    raise IntegrityError("zstd stream ends inside a skippable frame")
                self._pos += 8 + size
                return
            if head[:4] != ZSTD_MAGIC:
                raise IntegrityError("not a zstd frame where one must start")
            last = self.points[-1][1] if self.points else None
            if last is None or self._out - last >= self._span:
                if self.points:
                    self.span_digests.append(self._span_sha256.digest())
                    self._span_sha256 = hashlib.sha256()
                self.points.append((self._base + self._pos, self._out))
            self._frame = zstandard.ZstdDecompressor().decompressobj()
            self.frames += 1
            return
        if not self._have(1):
            raise IntegrityError("zstd stream ends inside a frame")
        piece = self._data[self._pos : self._pos + _FEED]
        try:
            out = self._frame.decompress(piece)
        except zstandard.ZstdError as exc:
            raise IntegrityError(f"corrupt zstd stream: {exc}") from exc
        used = len(piece) - len(self._frame.unused_data) if self._frame.eof else len(piece)
        self._pos += used
        if self._frame.eof:
            self._frame = None
        if out:
            self._out += len(out)
            self.tar_sha256.update(out)
            self._span_sha256.update(out)
            self._made(out)

    def finish(self) -> int:
        """Read to the end; return the uncompressed size."""
        self._read_to_end()
        if not self.points:
            raise IntegrityError("zstd stream has no frames")
        self.span_digests.append(self._span_sha256.digest())
        return self._out


def decode_frames(data: bytes) -> bytes:
    """Decompress whole frames (skippable ones stepped over) back to back."""
    parts: list[bytes] = []
    pos = 0
    while pos < len(data):
        head = data[pos : pos + 8]
        if _skippable(head):
            pos += 8 + int.from_bytes(head[4:8], "little")
            continue
        frame = zstandard.ZstdDecompressor().decompressobj()
        try:
            parts.append(frame.decompress(data[pos:]))
        except zstandard.ZstdError as exc:
            raise IntegrityError(f"corrupt zstd stream: {exc}") from exc
        if not frame.eof:
            raise IntegrityError("zstd span ends inside a frame")
        pos = len(data) - len(frame.unused_data)
    return b"".join(parts)
