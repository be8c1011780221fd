"""Option haggling: what the server answers to each option, and when it ends.

The catalog is all it needs to know of the exports (names, sizes,
descriptions), so every option is answered here and only the final choice
of export leaves the protocol package.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

from nbdfront.protocol import replies
from nbdfront.protocol.constants import (
    BASE_ALLOCATION,
    BASE_ALLOCATION_ID,
    Info,
    Option,
    OptionReply,
    TransmissionFlag,
)
from nbdfront.protocol.events import ExportSelected

# Read-only, every connection sees the same bytes (so clients may open
# several), flush and cache are understood (flush trivially).
BASE_TRANSMISSION_FLAGS = (
    TransmissionFlag.HAS_FLAGS
    | TransmissionFlag.READ_ONLY
    | TransmissionFlag.SEND_FLUSH
    # FUA on a read-only export is kept by doing nothing; offered so that a client
    # that sets it on every command (some do) is within the spec.
    | TransmissionFlag.SEND_FUA
    | TransmissionFlag.CAN_MULTI_CONN
    | TransmissionFlag.SEND_CACHE
)


_NO_DATA = "this option carries no data"


class _Data(enum.Enum):
    """What an option's answer makes of its data: whether data too long to read can be
    answered without it."""

    READ = "read"  # parsed: too long is ERR_TOO_BIG
    NONE = "none"  # takes none: any is ERR_INVALID
    IGNORED = "ignored"  # answered the same whatever it carries


class TLSPolicy(enum.Enum):
    """Whether a server offers TLS (nbdkit's ``--tls`` spellings).

    ``ON`` lets each client choose; ``REQUIRE`` answers nothing but
    STARTTLS and ABORT before TLS (the spec's FORCEDTLS mode), so a client
    that skips it learns no export name, size or byte.
    """

    OFF = "off"
    ON = "on"
    REQUIRE = "require"


class ExportFacts(Protocol):
    """What the handshake must know of an export (``Export`` satisfies it)."""

    @property
    def size(self) -> int: ...

    @property
    def description(self) -> str: ...


class Catalog:
    """The exports a server offers, by name, with ``""`` resolving to a default.

    ``default`` names the export the empty name stands for; a catalog may
    instead hold a ``""`` entry of its own.
    """

    def __init__(self, exports: Mapping[str, ExportFacts], default: str | None = None):
        if default is not None and default not in exports:
            raise ValueError(f"default export {default!r} is not in the catalog")
        self._exports = dict(exports)
        self._default = default

    def items(self) -> list[tuple[str, ExportFacts]]:
        return list(self._exports.items())

    def resolve(self, name: str) -> tuple[str, ExportFacts] | None:
        """The canonical name and facts the client's ``name`` stands for."""
        if name in self._exports:
            return name, self._exports[name]
        if name == "" and self._default is not None:
            return self._default, self._exports[self._default]
        return None


@dataclass(frozen=True)
class OptionOutcome:
    """Bytes to send, and whether haggling ended (by choice, or by closing)."""

    reply: bytes
    selected: ExportSelected | None = None
    close_reason: str | None = None
    clean: bool = True
    start_tls: bool = False


class _Malformed(Exception):
    """Option data that does not parse; answered with ERR_INVALID."""


class Negotiation:
    """The option-haggling state of one connection."""

    def __init__(self, catalog: Catalog, no_zeroes: bool, tls: TLSPolicy = TLSPolicy.OFF):
        self._catalog = catalog
        self._no_zeroes = no_zeroes
        self._tls = tls
        self.tls_active = False
        self.structured_replies = False
        # The export name given with the last SET_META_CONTEXT that selected
        # base:allocation; block status works only if GO names the same one.
        self._meta_export: str | None = None

    def tls_started(self) -> None:
        """The TLS handshake succeeded: from now on options are answered.

        What was agreed in plain text is forgotten, so a man in the middle
        cannot leave state behind for the secure session (nbdkit's
        CVE-2021-3716 was structured replies surviving STARTTLS).
        """
        self.tls_active = True
        self.structured_replies = False
        self._meta_export = None

    def transmission_flags(self) -> int:
        flags = BASE_TRANSMISSION_FLAGS
        if self.structured_replies:
            flags |= TransmissionFlag.SEND_DF
        return int(flags)

    def refuse_oversized(self, option: int, length: int) -> OptionOutcome:
        """An option whose data was skipped unread because it was too long."""
        if option == Option.SET_META_CONTEXT:
            self._meta_export = None  # replaced even when this request fails
        handler = _HANDLERS.get(option)
        if handler is not None and handler.data is _Data.IGNORED:
            return self._dispatch(option, b"")
        if option == Option.STARTTLS:
            if self._tls is TLSPolicy.OFF:
                return self._starttls(option, b"")
            # STARTTLS takes no data: INVALID is its own answer, before or after TLS.
            message = f"STARTTLS takes no data, {length} bytes were sent"
            return _invalid(option, message)
        if self._tls_missing(handler):
            return _tls_required(option)
        if option == Option.EXPORT_NAME:
            # EXPORT_NAME has no way to say no: the only answer is to hang up.
            return OptionOutcome(b"", close_reason="oversized export name", clean=False)
        if handler is None:
            return _unsupported(option)
        if handler.data is _Data.NONE:
            return _invalid(option, _NO_DATA)
        message = f"option data of {length} bytes is too long"
        return OptionOutcome(replies.option_error(option, OptionReply.ERR_TOO_BIG, message))

    def refuse_shutting_down(self, option: int) -> OptionOutcome:
        if option == Option.EXPORT_NAME:
            return OptionOutcome(b"", close_reason="server shutting down", clean=False)
        message = "the server is shutting down"
        return OptionOutcome(replies.option_error(option, OptionReply.ERR_SHUTDOWN, message))

    def handle(self, option: int, data: bytes) -> OptionOutcome:
        try:
            return self._dispatch(option, data)
        except _Malformed as exc:
            if option == Option.EXPORT_NAME:
                return OptionOutcome(b"", close_reason=str(exc), clean=False)
            return _invalid(option, str(exc))

    def _dispatch(self, option: int, data: bytes) -> OptionOutcome:
        handler = _HANDLERS.get(option)
        if self._tls_missing(handler):
            return _tls_required(option)
        if handler is None:
            return _unsupported(option)
        return handler.answer(self, option, data)

    def _tls_missing(self, handler: _Handler | None) -> bool:
        """Whether TLS is required and not running yet for an option ``handler`` answers."""
        before_tls = handler is not None and handler.before_tls
        return self._tls is TLSPolicy.REQUIRE and not self.tls_active and not before_tls

    def _abort(self, option: int, data: bytes) -> OptionOutcome:
        # ACKed whatever data it carries (the spec: ignore it).
        reply = replies.option_reply(option, OptionReply.ACK)
        return OptionOutcome(reply, close_reason="client aborted")

    def _list(self, option: int, data: bytes) -> OptionOutcome:
        _no_data(data)
        listing = b"".join(
            replies.server_entry(option, name, facts.description)
            for name, facts in self._catalog.items()
        )
        return OptionOutcome(listing + replies.option_reply(option, OptionReply.ACK))

    def _structured_reply(self, option: int, data: bytes) -> OptionOutcome:
        _no_data(data)
        self.structured_replies = True
        return OptionOutcome(replies.option_reply(option, OptionReply.ACK))

    def _starttls(self, option: int, data: bytes) -> OptionOutcome:
        if self._tls is TLSPolicy.OFF:
            message = "TLS is not offered by this server"
            return OptionOutcome(replies.option_error(option, OptionReply.ERR_POLICY, message))
        _no_data(data)
        if self.tls_active:
            raise _Malformed("TLS is already running")
        return OptionOutcome(replies.option_reply(option, OptionReply.ACK), start_tls=True)

    def _export_name(self, option: int, data: bytes) -> OptionOutcome:
        name = _decode(data)
        found = self._catalog.resolve(name)
        if found is None:
            return OptionOutcome(b"", close_reason=f"unknown export {name!r}", clean=False)
        canonical, facts = found
        reply = replies.export_name_reply(facts.size, self.transmission_flags(), self._no_zeroes)
        return OptionOutcome(reply, selected=self._selected(name, canonical))

    def _info(self, option: int, data: bytes) -> OptionOutcome:
        if len(data) < 6:
            raise _Malformed("INFO/GO data is shorter than 6 bytes")
        (name_length,) = struct.unpack_from(">I", data)
        if name_length > len(data) - 6:
            raise _Malformed("export name runs past the option data")
        name = _decode(data[4 : 4 + name_length])
        rest = data[4 + name_length :]
        (count,) = struct.unpack_from(">H", rest)
        if len(rest) != 2 + 2 * count:
            raise _Malformed("information request list does not match its count")
        requested = set(struct.unpack_from(f">{count}H", rest, 2))
        found = self._catalog.resolve(name)
        if found is None:
            message = f"no export named {name!r}"
            return OptionOutcome(replies.option_error(option, OptionReply.ERR_UNKNOWN, message))
        canonical, facts = found
        parts = [replies.info_export(option, facts.size, self.transmission_flags())]
        if Info.NAME in requested:
            parts.append(replies.info_string(option, Info.NAME, canonical))
        if Info.DESCRIPTION in requested and facts.description:
            parts.append(replies.info_string(option, Info.DESCRIPTION, facts.description))
        # Sent even unasked, as the spec allows: the preferred size (a cache chunk)
        # guides any client that looks at it.
        parts.append(replies.info_block_size(option))
        parts.append(replies.option_reply(option, OptionReply.ACK))
        selected = self._selected(name, canonical) if option == Option.GO else None
        return OptionOutcome(b"".join(parts), selected=selected)

    def _meta_context(self, option: int, data: bytes) -> OptionOutcome:
        if option == Option.SET_META_CONTEXT:
            self._meta_export = None  # replaced even when this request fails
        if not self.structured_replies:
            message = "metadata contexts need structured replies first"
            return _invalid(option, message)
        name, queries = _parse_meta_request(data)
        if self._catalog.resolve(name) is None:
            message = f"no export named {name!r}"
            return OptionOutcome(replies.option_error(option, OptionReply.ERR_UNKNOWN, message))
        if option == Option.LIST_META_CONTEXT:
            wanted = not queries or any(q in ("base:", BASE_ALLOCATION) for q in queries)
            context_id = 0  # reserved in LIST replies
        else:
            wanted = BASE_ALLOCATION in queries
            context_id = BASE_ALLOCATION_ID
            if wanted:
                self._meta_export = name
        listing = replies.meta_context(option, context_id) if wanted else b""
        return OptionOutcome(listing + replies.option_reply(option, OptionReply.ACK))

    def _selected(self, name: str, canonical: str) -> ExportSelected:
        return ExportSelected(
            name=canonical,
            structured_replies=self.structured_replies,
            block_status=self.structured_replies and self._meta_export == name,
        )


@dataclass(frozen=True)
class _Handler:
    """How the server answers an option it knows."""

    answer: Callable[[Negotiation, int, bytes], OptionOutcome]
    data: _Data
    before_tls: bool = False
    """Answered before TLS runs where it is required (``TLSPolicy.REQUIRE``)."""


# The one table of the options this server knows: what answers each, and what it makes
# of its data (``refuse_oversized`` answers by it too). Any other is ERR_UNSUP.
_HANDLERS: Mapping[int, _Handler] = {
    Option.ABORT: _Handler(Negotiation._abort, _Data.IGNORED, before_tls=True),
    Option.STARTTLS: _Handler(Negotiation._starttls, _Data.NONE, before_tls=True),
    Option.EXPORT_NAME: _Handler(Negotiation._export_name, _Data.READ),
    Option.LIST: _Handler(Negotiation._list, _Data.NONE),
    Option.INFO: _Handler(Negotiation._info, _Data.READ),
    Option.GO: _Handler(Negotiation._info, _Data.READ),
    Option.STRUCTURED_REPLY: _Handler(Negotiation._structured_reply, _Data.NONE),
    Option.LIST_META_CONTEXT: _Handler(Negotiation._meta_context, _Data.READ),
    Option.SET_META_CONTEXT: _Handler(Negotiation._meta_context, _Data.READ),
}


def _tls_required(option: int) -> OptionOutcome:
    """FORCEDTLS before the upgrade: refuse, revealing nothing of the exports."""
    if option == Option.EXPORT_NAME:
        # EXPORT_NAME cannot be refused; the spec says to end the session.
        return OptionOutcome(b"", close_reason="EXPORT_NAME before TLS", clean=False)
    message = "this server requires TLS: send NBD_OPT_STARTTLS first"
    return OptionOutcome(replies.option_error(option, OptionReply.ERR_TLS_REQD, message))


def _unsupported(option: int) -> OptionOutcome:
    message = f"option {option} is not supported"
    return OptionOutcome(replies.option_error(option, OptionReply.ERR_UNSUP, message))


def _invalid(option: int, message: str) -> OptionOutcome:
    return OptionOutcome(replies.option_error(option, OptionReply.ERR_INVALID, message))


def _no_data(data: bytes) -> None:
    if data:
        raise _Malformed(_NO_DATA)


def _decode(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise _Malformed("a name that is not UTF-8") from None


def _parse_meta_request(data: bytes) -> tuple[str, list[str]]:
    """Export name and queries of LIST/SET_META_CONTEXT; must use all the data."""
    view = memoryview(data)
    pos = 0

    def take(n: int) -> bytes:
        nonlocal pos
        if n > len(view) - pos:
            raise _Malformed("metadata context request runs past the option data")
        piece = bytes(view[pos : pos + n])
        pos += n
        return piece

    (name_length,) = struct.unpack(">I", take(4))
    name = _decode(take(name_length))
    (count,) = struct.unpack(">I", take(4))
    if count * 4 > len(view) - pos:
        raise _Malformed("more queries announced than the option data holds")
    queries = []
    for _ in range(count):
        (length,) = struct.unpack(">I", take(4))
        queries.append(_decode(take(length)))
    if pos != len(view):
        raise _Malformed("trailing bytes after the metadata context queries")
    return name, queries
