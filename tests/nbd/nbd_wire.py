"""A client's view of the NBD wire, for tests: build requests, check replies.

Written from the spec independently of ``nbdfront.protocol`` so the tests
do not grade the server with its own encoder. ``ReplyChecker`` asserts every
rule a well-behaved client relies on and returns the decoded messages.
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass, field

NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
OPT_REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_MAGIC = 0x67446698
STRUCTURED_MAGIC = 0x668E33EF

OPT_EXPORT_NAME, OPT_ABORT, OPT_LIST, OPT_STARTTLS = 1, 2, 3, 5
OPT_INFO, OPT_GO, OPT_STRUCTURED_REPLY = 6, 7, 8
OPT_LIST_META_CONTEXT, OPT_SET_META_CONTEXT = 9, 10
REP_ACK, REP_SERVER, REP_INFO, REP_META_CONTEXT = 1, 2, 3, 4
REP_ERR_UNSUP, REP_ERR_POLICY, REP_ERR_INVALID = 2**31 + 1, 2**31 + 2, 2**31 + 3
REP_ERR_UNKNOWN, REP_ERR_TOO_BIG = 2**31 + 6, 2**31 + 9
INFO_EXPORT, INFO_NAME, INFO_DESCRIPTION, INFO_BLOCK_SIZE = 0, 1, 2, 3

CMD_READ, CMD_WRITE, CMD_DISC, CMD_FLUSH, CMD_TRIM, CMD_CACHE = 0, 1, 2, 3, 4, 5
CMD_WRITE_ZEROES, CMD_BLOCK_STATUS = 6, 7
FLAG_DF, FLAG_REQ_ONE = 1 << 2, 1 << 3

TYPE_NONE, TYPE_OFFSET_DATA, TYPE_OFFSET_HOLE, TYPE_BLOCK_STATUS = 0, 1, 2, 5
TYPE_ERROR, TYPE_ERROR_OFFSET = 2**15 + 1, 2**15 + 2

EPERM, EIO, EINVAL, EOVERFLOW, ESHUTDOWN = 1, 5, 22, 75, 108
NBD_ERRORS = {1, 5, 12, 22, 28, 75, 95, 108}


def client_flags(no_zeroes: bool = True) -> bytes:
    return struct.pack(">I", 1 | (2 if no_zeroes else 0))


def option(code: int, data: bytes = b"") -> bytes:
    return struct.pack(">QII", IHAVEOPT, code, len(data)) + data


def go_data(name: str, infos: tuple[int, ...] = ()) -> bytes:
    raw = name.encode()
    return struct.pack(">I", len(raw)) + raw + struct.pack(f">H{len(infos)}H", len(infos), *infos)


def meta_data(name: str, queries: list[str]) -> bytes:
    raw = name.encode()
    out = struct.pack(">I", len(raw)) + raw + struct.pack(">I", len(queries))
    for q in queries:
        out += struct.pack(">I", len(q.encode())) + q.encode()
    return out


def request(command: int, handle: int, offset: int = 0, length: int = 0, flags: int = 0) -> bytes:
    return struct.pack(">IHHQQI", REQUEST_MAGIC, flags, command, handle, offset, length)


@dataclass
class OptionAnswer:
    option: int
    reply: int
    data: bytes


@dataclass
class Reply:
    """Everything the server said about one handle (possibly several chunks)."""

    handle: int
    error: int = 0
    data: dict[int, bytes] = field(default_factory=dict)  # offset -> bytes
    chunks: list[int] = field(default_factory=list)
    extents: list[tuple[int, int]] = field(default_factory=list)
    done: bool = False
    message: str = ""


class ReplyChecker:
    """Decodes server bytes and asserts they are well formed.

    ``reads`` tells it the offset and length of each read handle, which is
    what a client knows; for simple replies that is the only way to frame.
    """

    def __init__(self, structured: bool):
        self.structured = structured
        self.reads: dict[int, tuple[int, int]] = {}
        self.replies: dict[int, Reply] = {}  # in progress
        self.finished: list[Reply] = []

    def options(self, data: bytes) -> tuple[list[OptionAnswer], bytes]:
        """Split option replies off the front; returns them and what follows."""
        out, pos = [], 0
        while len(data) - pos >= 20 and struct.unpack_from(">Q", data, pos)[0] == OPT_REPLY_MAGIC:
            _, opt, reply, length = struct.unpack_from(">QIII", data, pos)
            assert len(data) - pos >= 20 + length, "truncated option reply"
            payload = bytes(data[pos + 20 : pos + 20 + length])
            _check_option_reply(opt, reply, payload)
            out.append(OptionAnswer(opt, reply, payload))
            pos += 20 + length
        return out, bytes(data[pos:])

    def transmission(self, data: bytes | bytearray) -> bytes:
        """Decode every complete reply; returns an incomplete tail, if any."""
        pos, end = 0, len(data)
        while end - pos >= 4:
            (magic,) = struct.unpack_from(">I", data, pos)
            if magic == SIMPLE_MAGIC:
                if end - pos < 16:
                    break
                _, error, handle = struct.unpack_from(">IIQ", data, pos)
                assert error == 0 or error in NBD_ERRORS, f"error {error} is not an NBD error"
                size = 0
                if handle in self.reads and error == 0:
                    size = self.reads[handle][1]
                if end - pos < 16 + size:
                    break
                reply = self._start(handle)
                assert not reply.chunks, f"simple reply inside a structured one for {handle}"
                reply.error = error
                if size:
                    reply.data[self.reads[handle][0]] = bytes(data[pos + 16 : pos + 16 + size])
                self._finish(reply)
                pos += 16 + size
            elif magic == STRUCTURED_MAGIC:
                assert self.structured, "structured reply that was never negotiated"
                if end - pos < 20:
                    break
                _, flags, kind, handle, length = struct.unpack_from(">IHHQI", data, pos)
                if end - pos < 20 + length:
                    break
                self._chunk(flags, kind, handle, bytes(data[pos + 20 : pos + 20 + length]))
                pos += 20 + length
            else:
                raise AssertionError(f"reply with unknown magic {magic:#x}")
        return bytes(data[pos:])

    def _start(self, handle: int) -> Reply:
        return self.replies.setdefault(handle, Reply(handle))

    def _finish(self, reply: Reply) -> None:
        reply.done = True
        del self.replies[reply.handle]
        self.finished.append(reply)
        self.reads.pop(reply.handle, None)

    def take(self, handle: int) -> Reply | None:
        """The finished reply for ``handle``, if it has arrived."""
        for i, reply in enumerate(self.finished):
            if reply.handle == handle:
                return self.finished.pop(i)
        return None

    def _chunk(self, flags: int, kind: int, handle: int, payload: bytes) -> None:
        reply = self._start(handle)
        assert flags & ~1 == 0, f"unknown reply flags {flags:#x}"
        reply.chunks.append(kind)
        if kind == TYPE_NONE:
            assert payload == b"" and flags & 1, "NONE chunk must be empty and final"
        elif kind == TYPE_OFFSET_DATA:
            assert len(payload) >= 9, "OFFSET_DATA shorter than 9 bytes"
            (offset,) = struct.unpack_from(">Q", payload)
            self._within_read(handle, offset, len(payload) - 8)
            reply.data[offset] = payload[8:]
        elif kind == TYPE_BLOCK_STATUS:
            assert len(payload) >= 12 and (len(payload) - 4) % 8 == 0, "bad block status length"
            for i in range(4, len(payload), 8):
                length, status = struct.unpack_from(">II", payload, i)
                assert length > 0, "block status extent of length 0"
                reply.extents.append((length, status))
        elif kind in (TYPE_ERROR, TYPE_ERROR_OFFSET):
            error, msg_len = struct.unpack_from(">IH", payload)
            assert error in NBD_ERRORS, f"error {error} is not an NBD error"
            extra = 8 if kind == TYPE_ERROR_OFFSET else 0
            assert len(payload) == 6 + msg_len + extra, "error chunk length mismatch"
            reply.message = payload[6 : 6 + msg_len].decode("utf-8")
            if extra:
                (offset,) = struct.unpack_from(">Q", payload, 6 + msg_len)
                self._within_read(handle, offset, 1)
            reply.error = error
        else:
            raise AssertionError(f"unexpected chunk type {kind}")
        if flags & 1:
            if handle in self.reads and not reply.error:
                covered = sum(len(d) for d in reply.data.values())
                assert covered == self.reads[handle][1], "successful read did not cover its range"
            self._finish(reply)

    def _within_read(self, handle: int, offset: int, length: int) -> None:
        assert handle in self.reads, f"read data for a handle {handle} that is not a read"
        start, size = self.reads[handle]
        assert start <= offset and offset + length <= start + size, "chunk outside the read"


def _check_option_reply(opt: int, reply: int, payload: bytes) -> None:
    if reply == REP_ACK:
        assert payload == b""
    elif reply == REP_SERVER:
        (n,) = struct.unpack_from(">I", payload)
        assert n <= len(payload) - 4
    elif reply == REP_INFO:
        (info,) = struct.unpack_from(">H", payload)
        expected = {INFO_EXPORT: 12, INFO_BLOCK_SIZE: 14}.get(info)
        assert expected is None or len(payload) == expected, f"info {info} of wrong length"
    elif reply == REP_META_CONTEXT:
        assert len(payload) > 4
        payload[4:].decode("utf-8")
    else:
        assert reply & (1 << 31), f"unknown option reply {reply}"
        payload.decode("utf-8")


class RawClient:
    """A hand-driven NBD client over a socket, for what real clients never send."""

    def __init__(
        self,
        address: tuple[str, int] | str,
        timeout: float = 10.0,
        receive_buffer: int | None = None,
    ):
        family = socket.AF_UNIX if isinstance(address, str) else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        if receive_buffer is not None:  # before connecting: it sets the window offered
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
        self.sock.connect(address)
        greeting = self.recv_exactly(18)
        magic, opt_magic, _flags = struct.unpack(">QQH", greeting)
        assert (magic, opt_magic) == (NBDMAGIC, IHAVEOPT)
        self.checker: ReplyChecker | None = None
        self.size = 0
        self._tail = bytearray()
        self._wanted = 0  # bytes the next reply needs before decoding is worth trying

    def recv_exactly(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            piece = self.sock.recv(min(n - len(buf), 1 << 20))
            if not piece:
                raise ConnectionError(f"server closed after {len(buf)} of {n} bytes")
            buf += piece
        return bytes(buf)

    def option_answers(self) -> list[OptionAnswer]:
        """Read option replies until a final one (ACK or error)."""
        answers = []
        while True:
            head = self.recv_exactly(20)
            magic, opt, reply, length = struct.unpack(">QIII", head)
            assert magic == OPT_REPLY_MAGIC, f"option reply with magic {magic:#x}"
            payload = self.recv_exactly(length)
            _check_option_reply(opt, reply, payload)
            answers.append(OptionAnswer(opt, reply, payload))
            if reply == REP_ACK or reply & (1 << 31):
                return answers

    def negotiate(
        self, name: str = "", structured: bool = True, meta: bool = True, block_sizes: bool = True
    ) -> None:
        self.sock.sendall(client_flags())
        if structured:
            self.sock.sendall(option(OPT_STRUCTURED_REPLY))
            assert self.option_answers()[-1].reply == REP_ACK
            if meta:
                query = meta_data(name, ["base:allocation"])
                self.sock.sendall(option(OPT_SET_META_CONTEXT, query))
                assert self.option_answers()[-1].reply == REP_ACK
        infos = (INFO_BLOCK_SIZE,) if block_sizes else ()
        self.sock.sendall(option(OPT_GO, go_data(name, infos)))
        answers = self.option_answers()
        assert answers[-1].reply == REP_ACK, answers
        for a in answers:
            if a.reply == REP_INFO and struct.unpack_from(">H", a.data)[0] == INFO_EXPORT:
                self.size = struct.unpack_from(">Q", a.data, 2)[0]
        self.checker = ReplyChecker(structured)

    def send(
        self,
        command: int,
        handle: int,
        offset: int = 0,
        length: int = 0,
        flags: int = 0,
        payload: bytes = b"",
    ) -> None:
        assert self.checker is not None
        if command == CMD_READ:
            self.checker.reads[handle] = (offset, length)
        self.sock.sendall(request(command, handle, offset, length, flags) + payload)

    def wait(self, handle: int) -> Reply:
        """Read replies until ``handle``'s is complete."""
        assert self.checker is not None
        while (reply := self.checker.take(handle)) is None:
            if not self.receive_some(1 << 20):
                raise ConnectionError("server closed the connection")
        return reply

    def receive_some(self, size: int) -> int:
        """Receive up to ``size`` bytes and decode the replies they complete; 0 at EOF."""
        assert self.checker is not None
        piece = self.sock.recv(size)
        self._tail += piece
        if len(self._tail) >= self._wanted:
            self._tail = bytearray(self.checker.transmission(self._tail))
            self._wanted = _next_message_size(self._tail, self.checker)
        return len(piece)

    def close(self) -> None:
        self.sock.close()


def _next_message_size(tail: bytearray, checker: ReplyChecker) -> int:
    """How long ``tail`` must grow before it holds the reply it begins (0 if unknown)."""
    if len(tail) < 20:
        return 0
    magic, error, handle = struct.unpack_from(">IIQ", tail)
    if magic == SIMPLE_MAGIC:
        return 16 + (0 if error else checker.reads.get(handle, (0, 0))[1])
    if magic == STRUCTURED_MAGIC:
        return 20 + struct.unpack_from(">I", tail, 16)[0]
    return 0
