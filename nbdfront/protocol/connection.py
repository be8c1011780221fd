"""One NBD connection as a state machine: bytes in, events and bytes out.

No sockets, threads or clocks: a server feeds what it receives to
``receive_data``, asks ``next_event`` for work, writes ``data_to_send``,
and turns its answers into bytes with ``send``. The handshake and every
refused request are answered inside; only reads, cache hints and the end
of the conversation come out as events.
"""

from __future__ import annotations

import enum
import struct
from collections import deque
from collections.abc import Mapping, Sequence

from blockstore.export import Buffer
from nbdfront.protocol import replies
from nbdfront.protocol.constants import (
    IHAVEOPT,
    MAX_OPTION_LENGTH,
    REQUEST_MAGIC,
    ClientFlag,
    Command,
    Option,
)
from nbdfront.protocol.events import (
    NEED_DATA,
    ClientEvent,
    ConnectionClosed,
    Disconnect,
    NeedData,
    ReadRequest,
    ServerReply,
    StartTLS,
)
from nbdfront.protocol.handshake import (
    Catalog,
    ExportFacts,
    Negotiation,
    OptionOutcome,
    TLSPolicy,
)
from nbdfront.protocol.transmission import REQUEST_HEADER, Transmission

_OPTION_HEADER = struct.Struct(">QII")
_KNOWN_CLIENT_FLAGS = int(ClientFlag.FIXED_NEWSTYLE | ClientFlag.NO_ZEROES)


class Phase(enum.Enum):
    CLIENT_FLAGS = "client flags"
    OPTIONS = "option haggling"
    TRANSMISSION = "transmission"
    CLOSED = "closed"


# The phase of (almost) every step, in a module name: enum lookups are slow on 3.11.
_TRANSMISSION = Phase.TRANSMISSION
_READ = int(Command.READ)
_HEADER_SIZE = REQUEST_HEADER.size
_unpack_request = REQUEST_HEADER.unpack_from


class ServerConnection:
    """The server side of one NBD conversation.

    ``exports`` maps names to anything with ``size`` and ``description``;
    ``default_export`` names the one an empty name stands for; ``tls`` says
    whether STARTTLS is offered or required.
    """

    def __init__(
        self,
        exports: Mapping[str, ExportFacts] | Catalog,
        default_export: str | None = None,
        tls: TLSPolicy = TLSPolicy.OFF,
    ):
        if not isinstance(exports, Catalog):
            exports = Catalog(exports, default_export)
        self._catalog = exports
        self._buffer = bytearray()
        self._outgoing: list[Buffer] = [replies.greeting()]
        self._events: deque[ClientEvent] = deque()
        self._skip = 0
        # The answer to a refused WRITE, held until its payload is all in (see _request).
        self._after_skip: list[Buffer] = []
        self._oversized_option: tuple[int, int] | None = None
        self._eof = False
        self._negotiation: Negotiation | None = None
        self.phase = Phase.CLIENT_FLAGS
        self.transmission: Transmission | None = None
        self._structured: bool | None = None  # the transmission's, read on every hit
        self._shutting_down = False
        self._tls = tls
        self._awaiting_tls = False

    def receive_data(self, data: Buffer) -> None:
        """Take bytes from the client (copied: ``data`` may be reused after the call);
        empty means it closed its side."""
        if self.phase is Phase.CLOSED:
            return
        if self._awaiting_tls:
            raise RuntimeError("bytes received before the TLS handshake was reported done")
        if not data:
            self._eof = True
            return
        if self._skip:
            dropped = min(self._skip, len(data))
            self._skip -= dropped
            data = data[dropped:]
            if not self._skip:
                self._answer_skipped()
        self._buffer += data

    def next_event(self) -> ClientEvent | NeedData:
        """The next thing the server must act on, or ``NEED_DATA``."""
        events = self._events
        if not events and self.phase is _TRANSMISSION and not self._skip:
            # The path of nearly every call: a read that needs no answer from
            # here, or a partial request header.
            buffer = self._buffer
            if len(buffer) < _HEADER_SIZE:
                if not self._eof:
                    return NEED_DATA
            elif not self._shutting_down:
                magic, flags, command, handle, offset, length = _unpack_request(buffer)
                if (
                    command == _READ
                    and magic == REQUEST_MAGIC
                    and self.transmission.plain_read(flags, offset, length)  # type: ignore[union-attr]
                ):
                    del buffer[:_HEADER_SIZE]
                    return ReadRequest(handle, offset, length, flags)
        while not events and self._step():
            pass
        return events.popleft() if events else NEED_DATA

    @property
    def buffered(self) -> int:
        """Bytes received and not yet taken as a message: 0 when the client has sent
        nothing more, so a server need not hold a reply back for more requests."""
        return len(self._buffer)

    def data_to_send(self) -> Sequence[Buffer]:
        """Bytes the protocol produced on its own (in order), to be sent before anything else."""
        if not self._outgoing:
            return ()
        out, self._outgoing = self._outgoing, []
        return out

    def send(self, reply: ServerReply) -> list[Buffer]:
        """The bytes of the server's answer to a ``ReadRequest`` or ``CacheRequest``.

        Safe to call from any thread: it only formats.
        """
        if self.transmission is None:
            raise RuntimeError("no export selected yet")
        return self.transmission.encode(reply)

    def send_read(self, request: ReadRequest, data: Sequence[Buffer]) -> list[Buffer]:
        """``send(ReadReply(request, data))`` for a read of one or more bytes, in fewer
        steps: the reply to every hit. ``data`` must hold exactly ``request.length`` bytes."""
        structured = self._structured
        if structured is None:
            raise RuntimeError("no export selected yet")
        return replies.read_reply(request.handle, request.offset, data, request.length, structured)

    def tls_started(self) -> None:
        """The server finished the TLS handshake that ``StartTLS`` asked for."""
        if not self._awaiting_tls or self._negotiation is None:
            raise RuntimeError("no STARTTLS is waiting for a handshake")
        self._awaiting_tls = False
        self._negotiation.tls_started()

    @property
    def shutting_down(self) -> bool:
        """``begin_shutdown`` was called: what comes next is refused."""
        return self._shutting_down

    def begin_shutdown(self) -> None:
        """The server is stopping: refuse what comes next, as the spec asks.

        Options other than ABORT get ERR_SHUTDOWN and requests other than
        DISC get ESHUTDOWN, which tells a client to disconnect; what was
        already handed out as events is still answered normally.
        """
        self._shutting_down = True

    def _step(self) -> bool:
        """Consume one message if it is complete; False when more bytes are needed."""
        phase = self.phase
        if phase is _TRANSMISSION and not self._skip:
            return self._request()
        if phase is Phase.CLOSED or self._awaiting_tls:
            return False
        if self._skip:
            return self._need_more()
        if phase is Phase.CLIENT_FLAGS:
            return self._client_flags()
        if phase is Phase.OPTIONS:
            return self._option()
        return self._request()

    def _client_flags(self) -> bool:
        if len(self._buffer) < 4:
            return self._need_more()
        (flags,) = struct.unpack_from(">I", self._buffer)
        del self._buffer[:4]
        if flags & ~_KNOWN_CLIENT_FLAGS:
            return self._close(f"unknown client flags {flags:#x}", clean=False)
        if self._tls is TLSPolicy.REQUIRE and not flags & ClientFlag.FIXED_NEWSTYLE:
            # TLS needs fixed newstyle; such a client could only be served in plain text.
            return self._close("client without fixed newstyle cannot start TLS", clean=False)
        no_zeroes = bool(flags & ClientFlag.NO_ZEROES)
        # The spec's NOTLS mode for a client without fixed newstyle (require closed above).
        tls = self._tls if flags & ClientFlag.FIXED_NEWSTYLE else TLSPolicy.OFF
        self._negotiation = Negotiation(self._catalog, no_zeroes, tls)
        self.phase = Phase.OPTIONS
        return True

    def _option(self) -> bool:
        assert self._negotiation is not None
        if self._oversized_option is not None:
            option, length = self._oversized_option
            self._oversized_option = None
            if self._shutting_down and option != Option.ABORT:
                return self._apply(self._negotiation.refuse_shutting_down(option))
            return self._apply(self._negotiation.refuse_oversized(option, length))
        if len(self._buffer) < _OPTION_HEADER.size:
            return self._need_more()
        magic, option, length = _OPTION_HEADER.unpack_from(self._buffer)
        if magic != IHAVEOPT:
            return self._close("option without the IHAVEOPT magic", clean=False)
        if length > MAX_OPTION_LENGTH:
            del self._buffer[: _OPTION_HEADER.size]
            self._oversized_option = (option, length)
            self._start_skip(length)
            return True
        end = _OPTION_HEADER.size + length
        if len(self._buffer) < end:
            return self._need_more()
        data = bytes(self._buffer[_OPTION_HEADER.size : end])
        del self._buffer[:end]
        if self._shutting_down and option != Option.ABORT:
            return self._apply(self._negotiation.refuse_shutting_down(option))
        return self._apply(self._negotiation.handle(option, data))

    def _apply(self, outcome: OptionOutcome) -> bool:
        if outcome.start_tls:
            if self._buffer or self._skip:
                # Plain-text bytes sent behind STARTTLS would be taken as if they
                # came over TLS (the STARTTLS command injection of other protocols).
                return self._close("data sent after STARTTLS before its reply", clean=False)
            self._awaiting_tls = True
            self._events.append(StartTLS())
        if outcome.reply:
            self._outgoing.append(outcome.reply)
        if outcome.selected is not None:
            found = self._catalog.resolve(outcome.selected.name)
            assert found is not None
            self.transmission = Transmission(outcome.selected, found[1].size)
            self._structured = self.transmission.structured
            self.phase = Phase.TRANSMISSION
            self._events.append(outcome.selected)
        if outcome.close_reason is not None:
            return self._close(outcome.close_reason, outcome.clean)
        return True

    def _request(self) -> bool:
        assert self.transmission is not None
        if len(self._buffer) < REQUEST_HEADER.size:
            return self._need_more()
        magic, flags, command, handle, offset, length = REQUEST_HEADER.unpack_from(self._buffer)
        del self._buffer[: REQUEST_HEADER.size]
        if magic != REQUEST_MAGIC:
            return self._close(f"request with bad magic {magic:#x}", clean=False)
        if self._shutting_down and command != Command.DISC:
            checked = self.transmission.refuse_shutting_down(command, handle, length)
        else:
            checked = self.transmission.check(flags, command, handle, offset, length)
        if checked.payload_to_skip:
            # A client may count a write as sent only once its payload is (libnbd
            # does): an answer before that names a request it does not know.
            self._after_skip = checked.reply or []
            self._start_skip(checked.payload_to_skip)
        elif checked.reply:
            self._outgoing.extend(checked.reply)
        if checked.event is not None:
            self._events.append(checked.event)
            if isinstance(checked.event, Disconnect):
                self.phase = Phase.CLOSED
                self._buffer.clear()
        return True

    def _start_skip(self, length: int) -> None:
        """Discard ``length`` bytes of client data as they come, never holding them."""
        dropped = min(length, len(self._buffer))
        del self._buffer[:dropped]
        self._skip = length - dropped
        if not self._skip:
            self._answer_skipped()

    def _answer_skipped(self) -> None:
        """The payload being skipped is all in: its request's answer may go."""
        self._outgoing.extend(self._after_skip)
        self._after_skip = []

    def _need_more(self) -> bool:
        if not self._eof:
            return False
        partial = bool(self._buffer) or self._skip > 0 or self._oversized_option is not None
        if partial:
            return self._close(
                f"client hung up in the middle of a message ({self.phase.value})", clean=False
            )
        return self._close(f"client hung up during {self.phase.value}", clean=True)

    def _close(self, reason: str, clean: bool) -> bool:
        self.phase = Phase.CLOSED
        self._buffer.clear()
        self._skip = 0
        self._after_skip = []
        self._events.append(ConnectionClosed(reason, clean))
        return True
