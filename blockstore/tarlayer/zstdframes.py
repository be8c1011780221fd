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
import sys
from collections.abc import Callable, Iterator
from typing import IO, NamedTuple, TypeVar

import zstandard

from blockstore.errors import IntegrityError
from blockstore.export import Buffer
from blockstore.tarlayer.stepped import SteppedReader

ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_READ_SIZE = 1 << 20
T = TypeVar("T")


# The largest window zstd decodes unless told it may use more (ZSTD_WINDOWLOG_LIMIT_DEFAULT).
WINDOW_LIMIT = 1 << 27


class _FrameHeader(NamedTuple):
    """What a zstd frame header says (RFC 8878, 3.1.1.1)."""

    size: int  # from the magic to the first block
    checksum: bool
    dictionary: int  # 0: none
    window: int


def _frame_header(data: Buffer, at: int) -> _FrameHeader | None:
    """The header of the frame starting at ``at`` in ``data``; None while ``data`` does
    not hold all of it."""
    view = memoryview(data)
    if len(view) - at < 5:
        return None
    descriptor = view[at + 4]
    single_segment = (descriptor >> 5) & 1
    size_field = descriptor >> 6
    dictionary_end = at + 5 + (1 - single_segment) + (0, 1, 2, 4)[descriptor & 3]
    end = dictionary_end + (single_segment if size_field == 0 else (0, 2, 4, 8)[size_field])
    if len(view) < end:
        return None
    dictionary = int.from_bytes(view[at + 6 - single_segment : dictionary_end], "little")
    content_size = int.from_bytes(view[dictionary_end:end], "little")
    if size_field == 1:
        content_size += 256
    window = content_size if single_segment else _window(view[at + 5])
    return _FrameHeader(end - at, bool((descriptor >> 2) & 1), dictionary, window)


def _window(descriptor: int) -> int:
    """The window size a frame's window descriptor byte gives."""
    base = 1 << (10 + (descriptor >> 3))
    return base + (base >> 3) * (descriptor & 7)


def _refuse_what_cannot_be_given(header: _FrameHeader, offset: int) -> None:
    """Say what a frame asks for that no decoder here can give, rather than let zstd
    call the stream corrupt ("Dictionary mismatch", "Frame requires too much memory")."""
    if header.dictionary:
        raise IntegrityError(
            f"the zstd frame at byte {offset} needs zstd dictionary {header.dictionary}, "
            "which a layer does not carry: it cannot be decompressed on its own"
        )
    if header.window > WINDOW_LIMIT:
        raise IntegrityError(
            f"the zstd frame at byte {offset} needs a window of "
            f"{-(-header.window >> 20)} MiB, more than the {WINDOW_LIMIT >> 20} MiB zstd "
            "decodes unless told it may (as `zstd --long=31` writes)"
        )


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
            if (header := _frame_header(view, at)) is None:
                return None
            pos, checksum = at + header.size, header.checksum
        if len(view) - pos < 3:
            return None
        block = int.from_bytes(view[pos : pos + 3], "little")
        last, kind, size = block & 1, (block >> 1) & 3, block >> 3
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


def is_skippable_frame(head: bytes) -> bool:
    """Whether ``head`` starts with a zstd skippable frame's magic (0x184D2A50 to
    0x184D2A5F, little-endian): zstd:chunked's table of contents, and the start of
    every stream ``pzstd`` writes."""
    return len(head) >= 4 and head[1:4] == b"\x2a\x4d\x18" and head[0] & 0xF0 == 0x50


def _may_start_a_frame(head: bytes) -> bool:
    """Whether ``head`` starts with a zstd or a skippable frame's magic, or with as much
    of one as it holds (a stream cut short inside it)."""
    magic = head[:4]
    skippable = not magic or (magic[0] & 0xF0 == 0x50 and b"\x2a\x4d\x18".startswith(magic[1:]))
    return skippable or ZSTD_MAGIC.startswith(magic)


def _no_frame_at(offset: int, head: bytes) -> IntegrityError:
    """Bytes where a frame must start that start none: at the start, a blob that is no
    zstd stream (image tools have labelled a plain tar tar+zstd); after a frame, bytes
    trailing the stream (which zstd itself refuses), or damage."""
    if offset == 0:
        return IntegrityError(
            "not a zstd stream, as the layer's media type says: it starts with "
            f"{head[:4].hex(' ')}, neither a zstd frame nor a skippable one"
        )
    return IntegrityError(
        f"at byte {offset} the zstd stream goes on with bytes that start no frame "
        f"({head[:4].hex(' ')})"
    )


class _Compressed:
    """Compressed bytes read ahead: ``data[pos:]`` is what the frames have not used yet,
    and ``more()`` gives the bytes that follow (b"" at the end)."""

    def __init__(self, more: Callable[[], bytes], start: int = 0):
        self._more = more
        self.data = b""
        self.pos = 0
        self._base = start  # the blob offset of data[0]

    @property
    def offset(self) -> int:
        """The blob offset of ``data[pos]``."""
        return self._base + self.pos

    def have(self, n: int) -> bool:
        """Make at least ``n`` unused bytes available, if the input has them."""
        while len(self.data) - self.pos < n:
            more = self._more()
            if not more:
                return False
            self._base += self.pos
            self.data = self.data[self.pos :] + more
            self.pos = 0
        return True

    def skip(self, n: int) -> bool:
        """Step over ``n`` bytes, dropping each piece read as it goes past (a skippable
        frame may be hundreds of MiB); False if the input ends first."""
        while len(self.data) - self.pos < n:
            n -= len(self.data) - self.pos
            self._base += len(self.data)
            self.data, self.pos = self._more(), 0
            if not self.data:
                return False
        self.pos += n
        return True


class _SpanInput(_Compressed):
    """Compressed bytes ``start..end`` of a blob, ``STREAM_READ`` at a time through
    ``read(offset, length)``; bytes skipped beyond those read are not read at all."""

    def __init__(self, read: Callable[[int, int], Buffer], start: int, end: int):
        super().__init__(self._read_more, start)
        self._read = read
        self._next = start  # the next byte to read
        self._end = end

    def _read_more(self) -> bytes:
        length = min(STREAM_READ, self._end - self._next)
        if length <= 0:
            return b""
        got = bytes(self._read(self._next, length))
        if len(got) != length:
            raise IntegrityError(
                f"zstd span: {len(got)} bytes read at {self._next}, {length} asked"
            )
        self._next += length
        return got

    def skip(self, n: int) -> bool:
        unused = len(self.data) - self.pos
        if n <= unused:
            self.pos += n
            return True
        self._next += n - unused
        self._base, self.data, self.pos = self._next, b"", 0
        return self._next <= self._end


class _Frames:
    """The output of zstd frames back to back, a step at a time: a skippable frame is
    stepped over, a frame is started afresh (``on_frame`` told where), and each step
    inside a frame gives zstd one piece (see ``_FrameUnits``), so makes 128 KiB at most."""

    def __init__(self, compressed: _Compressed, on_frame: Callable[[int], None] | None = None):
        self._in = compressed
        self._on_frame = on_frame
        self._frame: zstandard.ZstdDecompressionObj | None = None
        self._units = _FrameUnits()

    def step(self) -> bytes | None:
        """The next step's output (often b""); None at the end of the input, between
        frames."""
        if self._frame is None:
            return b"" if self._next_frame() else None
        compressed = self._in
        end = self._read_until(self._units.end_of_next, "zstd stream ends inside a frame")
        piece = compressed.data[compressed.pos : end]
        try:
            out = self._frame.decompress(piece)
        except zstandard.ZstdError as exc:
            raise IntegrityError(f"corrupt zstd stream: {exc}") from exc
        compressed.pos += len(piece) - len(self._frame.unused_data)
        if self._frame.eof:
            self._frame = None
        return out

    def _read_until(self, parse: Callable[[Buffer, int], T | None], short: str) -> T:
        """What ``parse`` makes of the unused input once it holds enough; IntegrityError
        saying ``short`` if the input ends first."""
        compressed = self._in
        while (parsed := parse(compressed.data, compressed.pos)) is None:
            if not compressed.have(len(compressed.data) - compressed.pos + 1):
                raise IntegrityError(short)
        return parsed

    def _next_frame(self) -> bool:
        """Step over a skippable frame or start a frame; False at the end of the input."""
        compressed = self._in
        if not compressed.have(1):
            return False
        compressed.have(8)  # as much of a header as the stream has
        head = compressed.data[compressed.pos : compressed.pos + 8]
        if not _may_start_a_frame(head):
            raise _no_frame_at(compressed.offset, head)
        if len(head) < 8:
            raise IntegrityError("zstd stream ends inside a frame header")
        if is_skippable_frame(head):
            if not compressed.skip(8 + int.from_bytes(head[4:8], "little")):
                raise IntegrityError("zstd stream ends inside a skippable frame")
            return True
        header = self._read_until(_frame_header, "zstd stream ends inside a frame header")
        _refuse_what_cannot_be_given(header, compressed.offset)
        if self._on_frame is not None:
            self._on_frame(compressed.offset)
        self._frame = zstandard.ZstdDecompressor().decompressobj()
        self._units = _FrameUnits()
        return True


class ZstdIndexer(SteppedReader):
    """The uncompressed bytes of a zstd blob read once, recording frame starts."""

    def __init__(self, source: IO[bytes], span: int):
        super().__init__()
        self._source = source
        self._span = span
        self._out = 0
        self.points: list[tuple[int, int]] = []  # (compressed, uncompressed) restart points
        self.span_digests: list[bytes] = []
        self._span_sha256 = hashlib.sha256()
        self.blob_sha256 = hashlib.sha256()
        self.tar_sha256 = hashlib.sha256()
        self.compressed_size = 0
        self._frames = _Frames(_Compressed(self._read_blob), self._frame_starts)

    def _read_blob(self) -> bytes:
        more = self._source.read(_READ_SIZE)
        self.blob_sha256.update(more)
        self.compressed_size += len(more)
        return more

    def _frame_starts(self, offset: int) -> None:
        """A restart point at the frame, if the last is a span or more behind."""
        last = self.points[-1][1] if self.points else None
        if last is None or self._out - last >= self._span:
            if self.points:
                self.span_digests.append(self._span_sha256.digest())
                self._span_sha256 = hashlib.sha256()
            self.points.append((offset, self._out))

    def _step(self) -> None:
        out = self._frames.step()
        if out is None:
            self._eof = True
        elif out:
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


def read_frames(source: IO[bytes]) -> ZstdIndexer:
    """The tar in the zstd stream ``source``, read as a layer's indexing pass reads it:
    every frame (skippable ones stepped over), and what cannot be read refused in the
    same words (IntegrityError); one restart point kept."""
    return ZstdIndexer(source, span=sys.maxsize)


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
    frames = _Frames(_SpanInput(read, start, end))
    while (out := frames.step()) is not None:
        if out:
            yield out
