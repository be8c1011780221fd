"""zlib's inflate, called directly, for what the stdlib's ``zlib`` module cannot do.

Random access into a gzip stream needs three calls the stdlib does not expose:
``inflate(Z_BLOCK)`` stops at each deflate block boundary and reports how
many bits of the last byte are unused (``data_type``), which is where a
checkpoint can be taken; ``inflatePrime`` feeds those leftover bits back when
resuming there; ``inflateSetDictionary`` restores the 32 KiB window. This
binds the system's libz for exactly those.
"""

from __future__ import annotations

import ctypes
import ctypes.util

from blockstore.errors import IntegrityError

Z_NO_FLUSH, Z_BLOCK = 0, 5
Z_OK, Z_STREAM_END, Z_NEED_DICT, Z_BUF_ERROR = 0, 1, 2, -5
RAW, GZIP = -15, 31  # windowBits: raw deflate, or a gzip wrapper


class _ZStream(ctypes.Structure):
    _fields_ = [
        ("next_in", ctypes.c_void_p),
        ("avail_in", ctypes.c_uint),
        ("total_in", ctypes.c_ulong),
        ("next_out", ctypes.c_void_p),
        ("avail_out", ctypes.c_uint),
        ("total_out", ctypes.c_ulong),
        ("msg", ctypes.c_char_p),
        ("state", ctypes.c_void_p),
        ("zalloc", ctypes.c_void_p),
        ("zfree", ctypes.c_void_p),
        ("opaque", ctypes.c_void_p),
        ("data_type", ctypes.c_int),
        ("adler", ctypes.c_ulong),
        ("reserved", ctypes.c_ulong),
    ]


def _load() -> ctypes.CDLL:
    name = ctypes.util.find_library("z") or "libz.so.1"
    lib = ctypes.CDLL(name)
    lib.zlibVersion.restype = ctypes.c_char_p
    lib.inflateInit2_.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
    lib.inflate.argtypes = [ctypes.c_void_p, ctypes.c_int]
    lib.inflateEnd.argtypes = [ctypes.c_void_p]
    lib.inflateReset2.argtypes = [ctypes.c_void_p, ctypes.c_int]
    lib.inflatePrime.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int]
    lib.inflateSetDictionary.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_uint]
    return lib


_lib = _load()
_VERSION = _lib.zlibVersion()


class Inflater:
    """One inflate stream over input handed in piece by piece."""

    def __init__(self, wbits: int):
        self.raw = wbits == RAW  # no header or trailer: a raw deflate stream
        self._strm = _ZStream()
        self._input = b""  # keeps the buffer next_in points into alive
        self._out = ctypes.create_string_buffer(1)
        rc = _lib.inflateInit2_(ctypes.byref(self._strm), wbits, _VERSION, ctypes.sizeof(_ZStream))
        if rc != Z_OK:
            raise MemoryError("inflateInit2 failed")

    def __del__(self) -> None:
        _lib.inflateEnd(ctypes.byref(self._strm))

    @property
    def avail_in(self) -> int:
        return self._strm.avail_in

    @property
    def data_type(self) -> int:
        """After Z_BLOCK: bit 7 at a block boundary, bit 6 after the last block,
        bits 0-2 the unused bits of the last input byte consumed."""
        return self._strm.data_type

    def feed(self, data: bytes) -> None:
        """Replace the pending input (call only when ``avail_in`` is 0, or to restart)."""
        self._input = data
        self._strm.next_in = ctypes.cast(ctypes.c_char_p(data), ctypes.c_void_p).value
        self._strm.avail_in = len(data)

    def skip(self, count: int) -> None:
        """Pass over the next ``count`` bytes of the fed input (``count`` <= ``avail_in``)."""
        self._strm.next_in += count
        self._strm.avail_in -= count

    def rest_is_zeros(self) -> bool:
        """Whether the fed input not consumed yet is only zero bytes, or none. Looked at in
        place: a stream of many gzip members asks at every member's end, and a copy of
        the rest each time would cost the square of the members in a buffer."""
        start = len(self._input) - self._strm.avail_in
        if self._strm.avail_in and self._input[start]:
            return False
        return self._input.count(0, start) == self._strm.avail_in

    def inflate(self, capacity: int, flush: int = Z_NO_FLUSH) -> tuple[bytes, int]:
        """Up to ``capacity`` bytes of output and zlib's return code."""
        if len(self._out) < capacity:
            self._out = ctypes.create_string_buffer(capacity)
        rc = self._inflate(ctypes.addressof(self._out), capacity, flush)
        produced = capacity - self._strm.avail_out
        return ctypes.string_at(self._out, produced), rc

    def inflate_into(self, out: bytearray, start: int) -> tuple[int, int]:
        """Inflate into ``out`` from ``start`` to its end, with no copy of its own:
        the bytes made and zlib's return code."""
        room = len(out) - start
        if room <= 0:
            return 0, Z_OK
        target = (ctypes.c_char * room).from_buffer(out, start)
        try:
            rc = self._inflate(ctypes.addressof(target), room, Z_NO_FLUSH)
        finally:
            del target  # lets ``out`` be resized again
        return room - self._strm.avail_out, rc

    def _inflate(self, address: int, room: int, flush: int) -> int:
        """One inflate call into ``room`` bytes at ``address``: zlib's return code,
        or ``IntegrityError`` for a stream zlib cannot inflate."""
        self._strm.next_out = address
        self._strm.avail_out = room
        rc = _lib.inflate(ctypes.byref(self._strm), flush)
        if rc not in (Z_OK, Z_STREAM_END, Z_BUF_ERROR):
            reason = self._strm.msg.decode(errors="replace") if self._strm.msg else f"code {rc}"
            raise IntegrityError(f"corrupt deflate stream: {reason}")
        return rc

    def reset(self, wbits: int) -> None:
        self.raw = wbits == RAW
        _lib.inflateReset2(ctypes.byref(self._strm), wbits)

    def prime(self, bits: int, value: int) -> None:
        _lib.inflatePrime(ctypes.byref(self._strm), bits, value)

    def set_dictionary(self, window: bytes) -> None:
        if _lib.inflateSetDictionary(ctypes.byref(self._strm), window, len(window)) != Z_OK:
            raise IntegrityError("could not restore a gzip checkpoint's window")
