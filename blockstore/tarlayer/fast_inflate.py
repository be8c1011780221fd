"""A gzip span inflated by libdeflate, faster than zlib's inflate.

libdeflate decompresses a whole deflate stream in one call, but cannot
resume mid-stream: it takes no preset window and no bit offset. So a span
is handed to it as a stream of its own: a prefix that outputs the
checkpoint's 32 KiB window (the span's back-references reach into it) and
ends on the same bit of a byte as the span's first block starts, then the
span's compressed bytes as they are (so the stored blocks inside keep their
byte alignment), then an empty final stored block where the next
checkpoint's block begins (the last span ends with its own final block).
``_prefix`` says how it lands on that bit. A valid span inflates to exactly
the window and the span's bytes; if libdeflate refuses the stream, the
caller falls back to zlib. The span's sha256 is checked either way.

A span may cross gzip members' ends (an eStargz layer has a member per
file), where libdeflate's stream ends. Each next member is then a stream of
its own, taken from just past its header and inflated into the same buffer
after the one before; the span still ends at the empty final block. The
header and trailer of each member wholly inside the span are checked as zlib
checks them; whatever zlib might answer otherwise (a member cut short,
something other than a member after one) is left to zlib.

Without libdeflate on the system, ``inflate_span`` is None.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import zlib

WINDOW = 32768
_SUCCESS = 0
_EMPTY_FINAL = b"\x00\x00\xff\xff"  # a stored block's LEN=0, NLEN=0xFFFF


class _Bits:
    """A deflate bit stream being written, least significant bit first."""

    def __init__(self) -> None:
        self.value = 0
        self.count = 0

    def put(self, value: int, count: int) -> None:
        self.value |= value << self.count
        self.count += count

    def code(self, code: int, count: int) -> None:
        """A Huffman code: its most significant bit goes first."""
        self.put(int(f"{code:0{count}b}"[::-1], 2), count)

    def fixed_block(self, *, copy_window_start: bool = False) -> None:
        """A fixed-Huffman block: empty (10 bits), or one match of 3 bytes from 32768
        back (35 bits)."""
        self.put(0b010, 3)  # BFINAL=0, BTYPE=01 (fixed Huffman)
        if copy_window_start:
            self.code(1, 7)  # length 3 (symbol 257)
            self.code(29, 5)  # distance 24577-32768 ...
            self.put(32768 - 24577, 13)  # ... 32768
        self.code(0, 7)  # end of block


def _stored(data: bytes) -> bytes:
    n = len(data)
    return b"\x00" + n.to_bytes(2, "little") + (n ^ 0xFFFF).to_bytes(2, "little") + data


def _prefix(window: bytes, start_bit: int) -> tuple[bytes, int, int]:
    """The stream up to the span, ending on bit ``start_bit`` of a byte: its whole
    bytes, the bits of its last byte (the low ``start_bit`` ones, which the span's first
    byte completes), and how many bytes it outputs before the window.

    The window goes in a stored block; empty fixed blocks (10 bits) make an even
    ``start_bit``. An odd one takes a block of 35 bits: the stored block holds the
    window's last 3 bytes and then the rest of it, and that block copies the 3 bytes
    from 32768 back to the window's end."""
    if not start_bit:
        return _stored(window), 0, 0
    bits = _Bits()
    odd = start_bit % 2 == 1
    if odd:
        bits.fixed_block(copy_window_start=True)
    while bits.count % 8 != start_bit:
        bits.fixed_block()
    head = bits.value.to_bytes(-(-bits.count // 8), "little")
    body = window[-3:] + window[:-3] if odd else window
    return _stored(body) + head[:-1], head[-1], 3 if odd else 0


def span_stream(
    data: bytes, start_bit: int, end_bit: int | None, window: bytes
) -> tuple[bytes, int, int] | None:
    """The self-contained deflate stream of a span, how many bytes it outputs before
    the span's own, and where ``data``'s bytes start in it: ``data`` holds its blocks
    from bit ``start_bit`` of its first byte (LSB first) to bit ``end_bit`` (None: it
    ends with a final block); None for a span of no bytes."""
    whole, low, before = _prefix(window, start_bit)
    if not data:
        return None
    first = bytes(((data[0] & ~((1 << start_bit) - 1)) | low,))
    if end_bit is None:
        return b"".join((whole, first, data[1:])), before + WINDOW, len(whole)
    # The final empty block's three header bits go where the next block would start.
    at, part = divmod(end_bit, 8)
    if at == 0:
        return None
    last = data[at] & ((1 << part) - 1) if at < len(data) else 0
    tail = (last | 1 << part).to_bytes(2, "little")[: 1 + (part + 3 > 8)]
    stream = b"".join((whole, first, data[1:at], tail, _EMPTY_FINAL))
    return stream, before + WINDOW, len(whole)


def _member_body(data: bytes, at: int) -> int | None:
    """Where the deflate data of the gzip member whose header starts at ``at`` begins;
    None if no header zlib would take is there whole (RFC 1952: the magic, deflate, no
    reserved flag, then the extra field, name, comment and header CRC it flags)."""
    if data[at : at + 3] != b"\x1f\x8b\x08" or len(data) < at + 10 or data[at + 3] & 0xE0:
        return None
    flags = data[at + 3]
    pos = at + 10
    if flags & 4:  # FEXTRA: its length, then it
        pos += 2 + int.from_bytes(data[pos : pos + 2], "little")
    for flag in (8, 16):  # FNAME, FCOMMENT: zero-terminated
        if flags & flag:
            pos = data.find(b"\0", pos) + 1
            if not pos:
                return None
    if flags & 2:  # FHCRC: the low 16 bits of the header's CRC-32
        if data[pos : pos + 2] != (zlib.crc32(data[at:pos]) & 0xFFFF).to_bytes(2, "little"):
            return None
        pos += 2
    return pos if pos < len(data) else None


def _trailer(address: int, size: int) -> bytes:
    """The 8 bytes that end a gzip member whose ``size`` bytes of output are at
    ``address``: their CRC-32 (libdeflate's, several times zlib's speed) and size."""
    assert _lib is not None
    crc = _lib.libdeflate_crc32(0, address, size)
    return crc.to_bytes(4, "little") + (size & 0xFFFFFFFF).to_bytes(4, "little")


def _load() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("deflate")
    if name is None:
        return None
    try:
        lib = ctypes.CDLL(name)
    except OSError:
        return None
    lib.libdeflate_alloc_decompressor.restype = ctypes.c_void_p
    lib.libdeflate_free_decompressor.argtypes = [ctypes.c_void_p]
    lib.libdeflate_deflate_decompress_ex.argtypes = [
        ctypes.c_void_p,
        ctypes.c_void_p,
        ctypes.c_size_t,
        ctypes.c_void_p,
        ctypes.c_size_t,
        ctypes.POINTER(ctypes.c_size_t),
        ctypes.POINTER(ctypes.c_size_t),
    ]
    lib.libdeflate_crc32.restype = ctypes.c_uint32
    lib.libdeflate_crc32.argtypes = [ctypes.c_uint32, ctypes.c_void_p, ctypes.c_size_t]
    return lib


_lib = _load()


def _inflate_span(
    data: bytes, start_bit: int, end_bit: int | None, window: bytes, length: int
) -> memoryview | None:
    """The ``length`` bytes of the span ``data`` holds (as ``span_stream`` takes it),
    member after member; None if libdeflate refuses a member, a whole member's trailer
    does not match, or the span makes another length."""
    assert _lib is not None
    framed = span_stream(data, start_bit, end_bit, window)
    if framed is None:
        return None
    stream, skip, offset = framed
    source = ctypes.cast(ctypes.c_char_p(stream), ctypes.c_void_p).value
    assert source is not None
    out = bytearray(skip + length)
    target = (ctypes.c_char * len(out)).from_buffer(out)
    address = ctypes.addressof(target)
    took, gave = ctypes.c_size_t(), ctypes.c_size_t()
    at = done = 0
    whole = False  # the first member began before the span: its trailer is not checked
    decompressor = _lib.libdeflate_alloc_decompressor()
    if not decompressor:
        raise MemoryError("libdeflate_alloc_decompressor failed")
    try:
        while True:
            rc = _lib.libdeflate_deflate_decompress_ex(
                decompressor,
                source + at,
                len(stream) - at,
                address + done,
                len(out) - done,
                ctypes.byref(took),
                ctypes.byref(gave),
            )
            if rc != _SUCCESS:
                return None
            at, member = at + took.value, address + done
            done += gave.value
            if at == len(stream):  # the span ends inside this member
                break
            trailer = at - offset  # where the member's 8-byte trailer is in ``data``
            if whole and data[trailer : trailer + 8] != _trailer(member, gave.value):
                return None
            if done == len(out):
                break
            body = _member_body(data, trailer + 8)
            if body is None:
                return None
            at, whole = offset + body, True
    finally:
        _lib.libdeflate_free_decompressor(decompressor)
        del target
    return memoryview(out)[skip:] if done == len(out) else None


inflate_span = _inflate_span if _lib is not None else None
