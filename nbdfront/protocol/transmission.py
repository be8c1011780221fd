"""The transmission phase: which requests are served, refused, or answered here.

Requests are checked against the export's bounds and the negotiated
features before anything reaches an ``Export``; a refused request gets its
error reply at once and the connection carries on.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

from nbdfront.protocol import replies
from nbdfront.protocol.constants import (
    BASE_ALLOCATION_ID,
    MAX_PAYLOAD,
    Command,
    CommandFlag,
    Errno,
)
from nbdfront.protocol.events import (
    Buffer,
    CacheRequest,
    Disconnect,
    ExportSelected,
    ReadFailed,
    ReadPiece,
    ReadReply,
    ReadRequest,
    ServerReply,
)

REQUEST_HEADER = struct.Struct(">IHHQQI")

# Plain ints in module names: on Python 3.11 looking up an enum member costs
# as much as the rest of a request's check.
_READ, _WRITE, _DISC, _FLUSH, _CACHE = map(
    int, (Command.READ, Command.WRITE, Command.DISC, Command.FLUSH, Command.CACHE)
)
_DF = int(CommandFlag.DF)
_WRITES = frozenset(map(int, (Command.WRITE, Command.TRIM, Command.WRITE_ZEROES)))


class Checked(NamedTuple):
    """What one request header leads to: an event for the server, or a reply now."""

    event: ReadRequest | CacheRequest | Disconnect | None = None
    reply: list[Buffer] | None = None
    payload_to_skip: int = 0


class Transmission:
    """Checks requests and encodes replies for one export on one connection."""

    def __init__(self, selected: ExportSelected, size: int):
        self.selected = selected
        self.size = size
        self.structured = selected.structured_replies
        # FUA (offered, see BASE_TRANSMISSION_FLAGS) means nothing on a read-only
        # export: it is accepted on every command and ignored.
        # (Plain ints: ``~`` of an IntFlag stays inside the known bits.)
        read_flags = CommandFlag.FUA | (CommandFlag.DF if self.structured else 0)
        self._read_flags = int(read_flags)
        self._allowed_flags = {
            _READ: int(read_flags),
            _FLUSH: int(CommandFlag.FUA),
            _CACHE: int(CommandFlag.FUA),
            int(Command.BLOCK_STATUS): int(CommandFlag.FUA | CommandFlag.REQ_ONE),
        }

    def check(self, flags: int, command: int, handle: int, offset: int, length: int) -> Checked:
        allowed = self._allowed_flags.get(command)
        if allowed is None:
            if command == _DISC:
                return Checked(event=Disconnect())
            if command in _WRITES:
                skip = length if command == _WRITE else 0
                return Checked(
                    reply=self.error(handle, Errno.EPERM, "the export is read-only"),
                    payload_to_skip=skip,
                )
            return Checked(reply=self.error(handle, Errno.EINVAL, f"unknown command {command}"))
        if flags & ~allowed:
            message = f"flags {flags:#x} are not valid for command {command}"
            return Checked(reply=self.error(handle, Errno.EINVAL, message))
        if command == _FLUSH:
            return Checked(reply=replies.simple_reply(handle))
        if offset + length > self.size:
            message = f"range {offset}+{length} is past the end of the export ({self.size})"
            return Checked(reply=self.error(handle, Errno.EINVAL, message))
        if command == _READ:
            if length > MAX_PAYLOAD:
                message = f"read of {length} bytes is over the maximum of {MAX_PAYLOAD}"
                return Checked(reply=self.error(handle, Errno.EINVAL, message))
            if length == 0:
                return Checked(reply=self.encode(ReadReply(ReadRequest(handle, offset, 0), ())))
            return Checked(event=ReadRequest(handle, offset, length, flags))
        if command == _CACHE:
            return Checked(event=CacheRequest(handle, offset, length))
        return Checked(reply=self._block_status(handle, length))

    def plain_read(self, flags: int, offset: int, length: int) -> bool:
        """Whether a read passes every check with nothing to answer here (``check``'s
        verdict for it is a ``ReadRequest``), tested in the fewest steps."""
        return (
            not flags & ~self._read_flags
            and 0 < length <= MAX_PAYLOAD
            and offset + length <= self.size
        )

    def refuse_shutting_down(self, command: int, handle: int, length: int) -> Checked:
        skip = length if command == _WRITE else 0
        reply = self.error(handle, Errno.ESHUTDOWN, "the server is shutting down")
        return Checked(reply=reply, payload_to_skip=skip)

    def _block_status(self, handle: int, length: int) -> list[Buffer]:
        if not self.selected.block_status:
            message = "block status needs base:allocation selected for this export"
            return self.error(handle, Errno.EINVAL, message)
        if length == 0:
            return self.error(handle, Errno.EINVAL, "block status of an empty range")
        return [replies.block_status_chunk(handle, BASE_ALLOCATION_ID, length)]

    def error(self, handle: int, error: int, message: str) -> list[Buffer]:
        """An error reply to any command, with a message when the client can take one."""
        if self.structured:
            return [replies.error_chunk(handle, error, message)]
        return replies.simple_reply(handle, error)

    def encode(self, reply: ServerReply) -> list[Buffer]:
        if type(reply) is ReadReply:
            request = reply.request
            if self.structured and request.length == 0:
                return [replies.done_chunk(request.handle)]
            return replies.read_reply(
                request.handle, request.offset, reply.data, request.length, self.structured
            )
        if isinstance(reply, ReadPiece):
            return self._piece(reply)
        if isinstance(reply, ReadFailed):
            return self._read_failed(reply)
        if reply.error:
            return self.error(reply.request.handle, reply.error, reply.message)
        return replies.simple_reply(reply.request.handle)

    def _piece(self, piece: ReadPiece) -> list[Buffer]:
        request = piece.request
        if not self.structured or request.flags & _DF:
            raise ValueError("a read is sent in pieces only as structured replies, without DF")
        length = sum(memoryview(b).nbytes for b in piece.data)
        end = request.offset + request.length
        if not request.offset <= piece.offset < piece.offset + length <= end:
            raise ValueError(f"piece {piece.offset}+{length} is outside the read")
        return replies.offset_data(
            request.handle, piece.offset, piece.data, length, done=piece.done
        )

    def _read_failed(self, reply: ReadFailed) -> list[Buffer]:
        request = reply.request
        if not self.structured:
            return replies.simple_reply(request.handle, reply.error)
        offset = request.offset if reply.offset is None else reply.offset
        if not request.offset <= offset < request.offset + request.length:
            raise ValueError(f"failure offset {offset} is outside the read")
        return [replies.error_offset_chunk(request.handle, reply.error, reply.message, offset)]
