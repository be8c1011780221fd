"""Checkpoints into a gzip stream ("zinfo"), built in one pass, used for random access.

A gzip stream can only be decompressed from its start, unless the decoder's
state at some point is saved: the compressed offset, the number of unused
bits in the byte before it, and the last 32 KiB of output. Saving that at a
deflate block boundary every ``span`` bytes of output lets any byte be had by
decompressing at most one span.

The file format is SOCI's zinfo version 2, which erofs-utils also reads and
writes: a 12-byte header (u32 checkpoint count, u64 span) and per checkpoint
u64 compressed offset, u64 uncompressed offset, u8 bits, 32768-byte window,
all little-endian, with no padding.

``GzipIndexer`` is the one pass: a readable stream of the uncompressed bytes
(the tar walker reads it), which records checkpoints as it goes and hashes
both sides, so the blob digest and the diff_id are checked on the same bytes
the index was built from. It also keeps the sha256 of each span's output:
raw deflate has no checksum of its own, so a span decompressed later from
bytes fetched again is checked against what the verified pass saw.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO

from blockstore.errors import IntegrityError
from blockstore.tarlayer.fast_inflate import inflate_span
from blockstore.tarlayer.stepped import SteppedReader
from blockstore.tarlayer.zlib_inflate import GZIP, RAW, Z_BLOCK, Z_STREAM_END, Inflater

GZIP_MAGIC = b"\x1f\x8b"
WINDOW = 32768
DEFAULT_SPAN = 4 << 20
HEADER = struct.Struct("<IQ")
POINT = struct.Struct("<QQB")
POINT_SIZE = POINT.size + WINDOW
_READ_SIZE = 1 << 20


@dataclass(frozen=True)
class Checkpoint:
    compressed: int  # offset of the first byte not yet consumed
    uncompressed: int
    bits: int  # unused bits of the byte before ``compressed`` (0-7)
    window: bytes  # the 32 KiB of output before ``uncompressed``


@dataclass(frozen=True)
class Zinfo:
    """The checkpoints of one gzip blob, ``span`` bytes of output apart (at least)."""

    span: int
    checkpoints: tuple[Checkpoint, ...]

    def to_bytes(self) -> bytes:
        return b"".join(self.parts())

    def parts(self) -> list[bytes]:
        """The zinfo's bytes in pieces, the windows themselves among them: to be joined
        with others' once, not copied into the zinfo first (tens of MB for a large layer)."""
        parts = [HEADER.pack(len(self.checkpoints), self.span)]
        for c in self.checkpoints:
            parts.append(POINT.pack(c.compressed, c.uncompressed, c.bits))
            parts.append(c.window)
        return parts

    @classmethod
    def from_bytes(cls, data: bytes | memoryview) -> Zinfo:
        """Parse and check a zinfo file; a malformed one is an IntegrityError. Each
        window is copied out of ``data`` once, which may be a view of a larger record."""
        if len(data) < HEADER.size:
            raise IntegrityError("zinfo: shorter than its header")
        count, span = HEADER.unpack_from(data, 0)
        if len(data) != HEADER.size + count * POINT_SIZE or count == 0:
            raise IntegrityError(f"zinfo: {len(data)} bytes do not hold {count} checkpoints")
        points = []
        pos = HEADER.size
        for _ in range(count):
            comp, uncomp, bits = POINT.unpack_from(data, pos)
            window = bytes(data[pos + POINT.size : pos + POINT_SIZE])
            if bits > 7 or (
                points and (comp, uncomp) <= (points[-1].compressed, points[-1].uncompressed)
            ):
                raise IntegrityError("zinfo: checkpoints out of order or malformed")
            points.append(Checkpoint(comp, uncomp, bits, window))
            pos += POINT_SIZE
        return cls(span, tuple(points))

    def span_of(self, offset: int) -> int:
        """Index of the last checkpoint at or before uncompressed ``offset``."""
        lo, hi = 0, len(self.checkpoints) - 1
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self.checkpoints[mid].uncompressed <= offset:
                lo = mid
            else:
                hi = mid - 1
        return lo


class GzipIndexer(SteppedReader):
    """The uncompressed bytes of a gzip blob read once, recording checkpoints."""

    def __init__(self, source: IO[bytes], span: int = DEFAULT_SPAN):
        super().__init__()
        self._source = source
        self._span = span
        self._inflater = Inflater(GZIP)
        self._consumed_before_input = 0  # compressed bytes handed in before the current input
        self._input_len = 0
        self._out = 0
        self._at_member_start = True
        self._points: list[Checkpoint] = []
        self.blob_sha256 = hashlib.sha256()
        self.tar_sha256 = hashlib.sha256()
        self._span_sha256 = hashlib.sha256()
        self.span_digests: list[bytes] = []  # sha256 of each span's output, in order
        self.compressed_size = 0

    def _refill(self) -> bool:
        data = self._source.read(_READ_SIZE)
        if not data:
            return False
        if not self.compressed_size and not data.startswith(GZIP_MAGIC):
            # Said apart from damage: image tools have labelled a plain tar tar+gzip.
            raise IntegrityError(
                "not a gzip stream, as the layer's media type says: it starts with "
                f"{data[:4].hex(' ')}, not gzip's {GZIP_MAGIC.hex(' ')}"
            )
        self.blob_sha256.update(data)
        self.compressed_size += len(data)
        self._consumed_before_input += self._input_len
        self._input_len = len(data)
        self._inflater.feed(data)
        return True

    def _step(self) -> None:
        inf = self._inflater
        if inf.avail_in == 0 and not self._refill():
            if not self._at_member_start or self._out == 0:
                raise IntegrityError("gzip stream ends early")
            self._eof = True
            return
        out, rc = inf.inflate(1 << 16, Z_BLOCK)
        if out:
            self._out += len(out)
            self.tar_sha256.update(out)
            self._span_sha256.update(out)
            self._made(out)
        if rc == Z_STREAM_END:
            # Another gzip member may follow (concatenated streams, as pigz and
            # stargz write); trailing zeros after the last one are tolerated, as gzip does.
            self._at_member_start = True
            while inf.rest_is_zeros():
                if not self._refill():
                    self._eof = True
                    return
            inf.reset(GZIP)  # the next member's header is read from the same input
            return
        dt = inf.data_type
        if dt & 128 and not dt & 64:
            # Checkpoints are a span apart, whatever the members: a stream of one member
            # per file (eStargz) would otherwise carry a 32 KiB window per file, an index
            # larger than the layer. A span may so cross a member's end (``read_span``).
            if not self._points or self._out - self._points[-1].uncompressed > self._span:
                self._checkpoint(dt & 7)
            self._at_member_start = False

    def _checkpoint(self, bits: int) -> None:
        # The output the reader keeps holds more than a window (KEPT_OUTPUT).
        window = self.made_at(max(0, self._out - WINDOW), WINDOW) or b""
        window = b"\0" * (WINDOW - len(window)) + window
        consumed = self._consumed_before_input + self._input_len - self._inflater.avail_in
        if self._points:
            self.span_digests.append(self._span_sha256.digest())
        self._span_sha256 = hashlib.sha256()
        self._points.append(Checkpoint(consumed, self._out, bits, window))

    def finish(self) -> tuple[Zinfo, int]:
        """Read to the end; return the checkpoints and the uncompressed size."""
        self._read_to_end()
        if not self._points:
            raise IntegrityError("gzip stream has no deflate blocks")
        if len(self.span_digests) < len(self._points):
            self.span_digests.append(self._span_sha256.digest())
        return Zinfo(self._span, tuple(self._points)), self._out


def size_hint(read_compressed: Callable[[int, int], bytes], compressed_size: int) -> int:
    """The uncompressed size a gzip blob's trailer gives (ISIZE: modulo 4 GiB, and of
    its last member only): a guess, to be checked against what inflating it makes."""
    if compressed_size < 18:
        return 0
    return int.from_bytes(read_compressed(compressed_size - 4, 4), "little")


def span_range(zinfo: Zinfo, index: int, compressed_size: int) -> tuple[int, int]:
    """The compressed bytes span ``index`` is inflated from: from the byte that holds its
    first bit to the byte that holds the next checkpoint's first bit (or the end)."""
    point = zinfo.checkpoints[index]
    start = point.compressed - (1 if point.bits else 0)
    if index + 1 == len(zinfo.checkpoints):
        return start, compressed_size
    return start, min(zinfo.checkpoints[index + 1].compressed + 1, compressed_size)


def inflated_size(
    read_compressed: Callable[[int, int], bytes], compressed_size: int, zinfo: Zinfo
) -> int:
    """The stream's whole uncompressed size, found by inflating its last span to the end:
    a zinfo names no size of its own, and the trailer's (``size_hint``) is modulo 4 GiB
    and of the last member only. ``IntegrityError`` if the span does not inflate."""
    if not zinfo.checkpoints:
        raise IntegrityError("the zinfo has no checkpoints")
    point = zinfo.checkpoints[-1]
    start, end = span_range(zinfo, len(zinfo.checkpoints) - 1, compressed_size)
    data = read_compressed(start, end - start)
    if point.bits and not data:
        raise IntegrityError("the zinfo's last checkpoint is past the end of the blob")
    inf = _resumed(point, data)
    out = bytearray(_READ_SIZE)
    made = 0
    while True:
        got, rc = inf.inflate_into(out, 0)
        made += got
        if rc == Z_STREAM_END and not _next_member(inf):
            return point.uncompressed + made
        if not got and rc != Z_STREAM_END and inf.avail_in == 0:
            raise IntegrityError("the gzip stream ends inside its last span")


def _resumed(point: Checkpoint, data: bytes) -> Inflater:
    """A raw inflater resuming at ``point``, fed ``data`` (from the byte holding the
    checkpoint's first bit)."""
    inf = Inflater(RAW)
    if point.bits:
        inf.prime(point.bits, data[0] >> (8 - point.bits))
        data = data[1:]
    inf.set_dictionary(point.window)
    inf.feed(data)
    return inf


def _next_member(inf: Inflater) -> bool:
    """At a member's end: set ``inf`` to the next member, its gzip header to be read, and
    True; False if only zeros or nothing follow (the stream's end, as gzip takes it).
    A raw inflater (the one a span resumes with) leaves the member's 8-byte trailer
    unread; a gzip one has read and checked it."""
    if inf.raw:
        if inf.avail_in < 8:
            raise IntegrityError("a gzip member's trailer is cut short")
        inf.skip(8)
    if inf.rest_is_zeros():
        return False
    inf.reset(GZIP)
    return True


def read_span(
    read_compressed: Callable[[int, int], bytes],
    compressed_size: int,
    zinfo: Zinfo,
    index: int,
    length: int,
) -> bytearray | memoryview:
    """``length`` uncompressed bytes from checkpoint ``index``, decompressing once
    (by libdeflate when the system has it, else by zlib).

    Reads the compressed bytes from the checkpoint to the next one (or to the
    end). A span that crosses gzip members' ends is inflated member after member
    either way; what libdeflate refuses goes to zlib, which inflates it or says why not.
    """
    point = zinfo.checkpoints[index]
    start, end = span_range(zinfo, index, compressed_size)
    data = read_compressed(start, end - start)
    if inflate_span is not None:
        start_bit = 8 - point.bits if point.bits else 0
        end_bit = None
        if index + 1 < len(zinfo.checkpoints):
            after = zinfo.checkpoints[index + 1]
            end_bit = after.compressed * 8 - after.bits - start * 8
        made = inflate_span(data, start_bit, end_bit, point.window, length)
        if made is not None:
            return made
    inf = _resumed(point, data)
    out = bytearray(length)  # inflated in place: a span is megabytes, copied once at most
    got = 0
    while got < length:
        made, rc = inf.inflate_into(out, got)
        got += made
        if got == length:
            break
        if rc == Z_STREAM_END:
            if not _next_member(inf):
                raise IntegrityError("gzip span ends before its checkpointed length")
        elif not made and inf.avail_in == 0:
            raise IntegrityError("gzip span ends before its checkpointed length")
    return out
