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
from collections.abc import Callable, Iterator
from typing import IO

import zstandard

from blockstore.errors import IntegrityError
from blockstore.export import Buffer
from blockstore.tarlayer.stepped import SteppedReader

ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_READ_SIZE = 1 << 20


class _FrameUnits:
    """Where the next piece of a frame to hand zstd ends: the frame's header with its
    first block, then one block at a time (the last with the frame's checksum).

    zstd's decompress cannot be told to stop, and makes all it can of what it is
    given; a block makes 128 KiB at most, whatever its kind, so one block per call
    bounds each call's output. Pieces of a fixed size did not: a run of RLE blocks
    makes 32,768 bytes of each 4 (a gigabyte of zeros is 33 KB), so 128 KiB of them
    made gigabytes at once.
    """

    def __init__(self) -> None:
        self._in_blocks = False
        self._checksum = False

    def end_of_next(self, data: Buffer, at: int) -> int | None:
        """The end of the next piece, which starts at ``at`` in ``data``; None while
        ``data`` does not hold all of it."""
        view = memoryview(data)
        pos, checksum = at, self._checksum
        if not self._in_blocks:
            if len(view) - pos < 5:
                return None
            descriptor = view[pos + 4]
            single_segment = (descriptor >> 5) & 1
            size_field = descriptor >> 6
            pos += 5 + (1 - single_segment) + (0, 1, 2, 4)[descriptor & 3]
            pos += single_segment if size_field == 0 else (0, 2, 4, 8)[size_field]
            checksum = bool((descriptor >> 2) & 1)
        if len(view) - pos < 3:
            return None
        header = int.from_bytes(view[pos : pos + 3], "little")
        last, kind, size = header & 1, (header >> 1) & 3, header >> 3
        if kind == 3:
            raise IntegrityError("corrupt zstd stream: a block of the reserved type")
        pos += 3 + (1 if kind == 1 else size) + (4 if last and checksum else 0)
        if len(view) < pos:
            return None
        self._in_blocks, self._checksum = True, checksum
        return pos


# Compressed bytes asked for at once when a span is decompressed as a stream: one
# range request each.
STREAM_READ = 8 << 20


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
        self._units = _FrameUnits()
        self._out = 0
        self.points: list[tuple[int, int]] = []  # (compressed, uncompressed) restart points
        self.span_digests: list[bytes] = []
        self._span_sha256 = hashlib.sha256()
        self.blob_sha256 = hashlib.sha256()
        self.tar_sha256 = hashlib.sha256()
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
            self._units = _FrameUnits()
            return
        while (end := self._units.end_of_next(self._data, self._pos)) is None:
            if not self._have(len(self._data) - self._pos + 1):
                raise IntegrityError("zstd stream ends inside a frame")
        piece = self._data[self._pos : end]
        try:
            out = self._frame.decompress(piece)
        except zstandard.ZstdError as exc:
            raise IntegrityError(f"corrupt zstd stream: {exc}") from exc
        self._pos += len(piece) - len(self._frame.unused_data)
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


def decode_frames(data: Buffer) -> bytes:
    """Decompress whole frames (skippable ones stepped over) back to back, held in
    memory: ``stream_frames`` over them, each call bounded as there."""
    view = memoryview(data)
    return b"".join(
        stream_frames(lambda offset, length: view[offset : offset + length], 0, len(view))
    )


def stream_frames(read: Callable[[int, int], Buffer], start: int, end: int) -> Iterator[bytes]:
    """The output of the frames in compressed bytes ``start..end``, piece by piece
    (skippable frames stepped over), reading ``STREAM_READ`` at a time: a span too
    large to hold whole in memory, compressed or not."""
    pos = start  # the next compressed byte to read
    buf = b""
    at = 0  # the first byte of ``buf`` not used yet
    frame: zstandard.ZstdDecompressionObj | None = None
    units = _FrameUnits()

    def more() -> bytes:
        nonlocal pos
        length = min(STREAM_READ, end - pos)
        got = bytes(read(pos, length))
        if len(got) != length:
            raise IntegrityError(f"zstd span: {len(got)} bytes read at {pos}, {length} asked")
        pos += length
        return got

    while True:
        if frame is None:
            while len(buf) - at < 8 and pos < end:
                buf, at = buf[at:] + more(), 0
            if at == len(buf):
                return
            head = buf[at : at + 8]
            if _skippable(head):
                if len(head) < 8:
                    raise IntegrityError("zstd span ends inside a skippable frame")
                skip = 8 + int.from_bytes(head[4:8], "little")
                if at + skip <= len(buf):
                    at += skip
                else:
                    pos += at + skip - len(buf)
                    buf, at = b"", 0
                    if pos > end:
                        raise IntegrityError("zstd span ends inside a skippable frame")
                continue
            frame = zstandard.ZstdDecompressor().decompressobj()
            units = _FrameUnits()
        while (stop := units.end_of_next(buf, at)) is None:
            if pos >= end:
                raise IntegrityError("zstd span ends inside a frame")
            buf, at = buf[at:] + more(), 0
        piece = buf[at:stop]
        try:
            out = frame.decompress(piece)
        except zstandard.ZstdError as exc:
            raise IntegrityError(f"corrupt zstd stream: {exc}") from exc
        at += len(piece) - len(frame.unused_data)
        if out:
            yield out
        if frame.eof:
            frame = None
