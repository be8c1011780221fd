"""What a client's bytes mean, and what the server answers with.

Client events come out of ``ServerConnection.next_event()``; reply events go
into ``ServerConnection.send()``. Everything the protocol can answer on its
own (option haggling, refused commands, flushes, block status) never
surfaces: only the work that needs an ``Export`` does.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

from blockstore.export import Buffer


class NeedData:
    """Sentinel: no complete event until more bytes arrive."""

    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA = NeedData()


@dataclass(frozen=True)
class ExportSelected:
    """Option haggling is over: transmission on ``name`` (a key of the catalog)."""

    name: str
    structured_replies: bool
    block_status: bool


@dataclass(frozen=True)
class StartTLS:
    """The client asked for TLS and its ACK is queued: send ``data_to_send()``,
    make the TLS handshake on the socket, then call ``tls_started()``.

    Nothing more is parsed until then: every later byte must arrive over TLS.
    """


# The events of every read (the request and its reply) are named tuples, not
# frozen dataclasses: just as immutable, and made several times faster, which
# shows on a request's path through the server.


class ReadRequest(NamedTuple):
    """``NBD_CMD_READ`` already checked against the export's bounds."""

    handle: int
    offset: int
    length: int
    flags: int = 0


@dataclass(frozen=True)
class CacheRequest:
    """``NBD_CMD_CACHE``: bring a checked range into the cache, then answer."""

    handle: int
    offset: int
    length: int


@dataclass(frozen=True)
class Disconnect:
    """``NBD_CMD_DISC``: answer what is in flight, then close."""


@dataclass(frozen=True)
class ConnectionClosed:
    """The conversation is over; send ``data_to_send()`` and close the socket.

    ``clean`` is False when the client broke the protocol or hung up mid
    message; ``reason`` says what happened, for the log.
    """

    reason: str
    clean: bool


class ReadReply(NamedTuple):
    """All the bytes of ``request``, as buffers whose lengths sum to its length."""

    request: ReadRequest
    data: Sequence[Buffer]


class ReadPiece(NamedTuple):
    """Some of a read's bytes, sent before the rest is ready: ``data`` at ``offset``.

    Only with structured replies, and never for a read with the DF flag. The
    piece with ``done`` ends the reply; pieces of one read must not overlap.
    """

    request: ReadRequest
    offset: int
    data: Sequence[Buffer]
    done: bool = False


@dataclass(frozen=True)
class ReadFailed:
    """A read that failed at ``offset`` (its start, unless pieces before it were sent).

    No data goes with it, so a client never takes wrong bytes for good ones.
    """

    request: ReadRequest
    error: int
    message: str = ""
    offset: int | None = None


@dataclass(frozen=True)
class CommandDone:
    """The answer to a ``CacheRequest``: ``error`` 0 for success."""

    request: CacheRequest
    error: int = 0
    message: str = ""


ClientEvent = StartTLS | ExportSelected | ReadRequest | CacheRequest | Disconnect | ConnectionClosed
ServerReply = ReadReply | ReadPiece | ReadFailed | CommandDone
