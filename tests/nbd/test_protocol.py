"""The sans-I/O protocol core, driven with byte strings (no sockets)."""

from __future__ import annotations

import struct

import nbd_wire as w
import pytest
from nbd_serving import Facts

from nbdfront.protocol import (
    MAX_PAYLOAD,
    NEED_DATA,
    CacheRequest,
    CommandDone,
    ConnectionClosed,
    Disconnect,
    ExportSelected,
    Phase,
    ReadFailed,
    ReadReply,
    ReadRequest,
    ServerConnection,
)
from nbdfront.protocol.constants import MAX_OPTION_LENGTH

CATALOG = {"layer0": Facts(1 << 20, "base layer"), "layer1": Facts(3 << 20, "top layer")}


def drain(conn: ServerConnection) -> tuple[list, bytes]:
    events = []
    while (event := conn.next_event()) is not NEED_DATA:
        events.append(event)
    return events, b"".join(bytes(b) for b in conn.data_to_send())


def negotiated(structured: bool = True, name: str = "") -> ServerConnection:
    conn = ServerConnection(CATALOG, default_export="layer1")
    script = w.client_flags()
    if structured:
        script += w.option(w.OPT_STRUCTURED_REPLY)
        script += w.option(w.OPT_SET_META_CONTEXT, w.meta_data(name, ["base:allocation"]))
    script += w.option(w.OPT_GO, w.go_data(name))
    conn.receive_data(script)
    events, _ = drain(conn)
    assert events == [ExportSelected("layer1", structured, structured)]
    return conn


def test_greeting_is_fixed_newstyle_with_no_zeroes():
    """The first bytes are NBDMAGIC, IHAVEOPT and the FIXED_NEWSTYLE|NO_ZEROES flags."""
    conn = ServerConnection(CATALOG)
    assert b"".join(conn.data_to_send()) == struct.pack(">QQH", w.NBDMAGIC, w.IHAVEOPT, 3)


@pytest.mark.parametrize("no_zeroes", [True, False])
def test_export_name_reply_has_padding_unless_no_zeroes(no_zeroes):
    """EXPORT_NAME answers size and flags, with 124 zero bytes only without NO_ZEROES."""
    conn = ServerConnection(CATALOG)
    conn.data_to_send()
    conn.receive_data(w.client_flags(no_zeroes) + w.option(w.OPT_EXPORT_NAME, b"layer0"))
    events, out = drain(conn)
    assert events == [ExportSelected("layer0", False, False)]
    size, flags = struct.unpack_from(">QH", out)
    assert size == 1 << 20 and flags & 0b11 == 0b11  # HAS_FLAGS | READ_ONLY
    assert flags & (1 << 8) and flags & (1 << 10)  # CAN_MULTI_CONN, SEND_CACHE
    assert len(out) == (10 if no_zeroes else 134)


def test_export_name_unknown_hangs_up():
    """An unknown name in EXPORT_NAME cannot be refused in-band: the connection closes."""
    conn = ServerConnection(CATALOG)
    conn.receive_data(w.client_flags() + w.option(w.OPT_EXPORT_NAME, b"nope"))
    events, _ = drain(conn)
    assert isinstance(events[0], ConnectionClosed) and not events[0].clean


def test_list_info_and_unknown_options():
    """LIST names every export; INFO gives size, name, description and block sizes; an
    unknown export gets ERR_UNKNOWN, an unknown option ERR_UNSUP, STARTTLS a policy error."""
    conn = ServerConnection(CATALOG, default_export="layer1")
    conn.receive_data(
        w.client_flags()
        + w.option(w.OPT_LIST)
        + w.option(w.OPT_INFO, w.go_data("", (w.INFO_NAME, w.INFO_DESCRIPTION)))
        + w.option(w.OPT_INFO, w.go_data("missing"))
        + w.option(99, b"whatever")
        + w.option(w.OPT_STARTTLS)
        + w.option(w.OPT_LIST, b"junk")
    )
    events, out = drain(conn)
    assert events == []
    answers, rest = w.ReplyChecker(False).options(out[18:])
    assert rest == b""
    kinds = [(a.option, a.reply) for a in answers]
    assert kinds[:3] == [(w.OPT_LIST, w.REP_SERVER)] * 2 + [(w.OPT_LIST, w.REP_ACK)]
    assert b"layer0" in answers[0].data and b"base layer" in answers[0].data
    info = {struct.unpack_from(">H", a.data)[0]: a.data[2:] for a in answers[3:7]}
    assert struct.unpack(">QH", info[w.INFO_EXPORT])[0] == 3 << 20
    assert info[w.INFO_NAME] == b"layer1" and info[w.INFO_DESCRIPTION] == b"top layer"
    assert struct.unpack(">III", info[w.INFO_BLOCK_SIZE]) == (1, 32768, MAX_PAYLOAD)
    assert kinds[7:] == [
        (w.OPT_INFO, w.REP_ACK),
        (w.OPT_INFO, w.REP_ERR_UNKNOWN),
        (99, w.REP_ERR_UNSUP),
        (w.OPT_STARTTLS, w.REP_ERR_POLICY),
        (w.OPT_LIST, w.REP_ERR_INVALID),
    ]


def test_oversized_option_is_skipped_unread():
    """An option longer than the limit is refused with ERR_TOO_BIG; its data is dropped
    as it arrives (the buffer never holds it) and the next option is answered."""
    conn = ServerConnection(CATALOG)
    length = 1 << 30
    conn.receive_data(w.client_flags() + struct.pack(">QII", w.IHAVEOPT, w.OPT_INFO, length))
    out = drain(conn)[1]
    piece = bytes(1 << 20)
    for _ in range(length // len(piece)):
        conn.receive_data(piece)
        events, sent = drain(conn)
        assert events == [] and len(conn._buffer) == 0
        out += sent
    conn.receive_data(w.option(w.OPT_LIST))
    out += drain(conn)[1]
    answers, _ = w.ReplyChecker(False).options(out[18:])
    assert answers[0].reply == w.REP_ERR_TOO_BIG and answers[-1].reply == w.REP_ACK
    assert length > MAX_OPTION_LENGTH


def test_meta_context_needs_structured_replies_and_matching_export():
    """SET_META_CONTEXT before STRUCTURED_REPLY is invalid; base:allocation selected for
    one export does not carry over to GO on another."""
    conn = ServerConnection(CATALOG)
    conn.receive_data(
        w.client_flags()
        + w.option(w.OPT_SET_META_CONTEXT, w.meta_data("layer0", ["base:allocation"]))
        + w.option(w.OPT_STRUCTURED_REPLY)
        + w.option(w.OPT_LIST_META_CONTEXT, w.meta_data("layer0", []))
        + w.option(w.OPT_SET_META_CONTEXT, w.meta_data("layer0", ["base:allocation", "x:y"]))
        + w.option(w.OPT_SET_META_CONTEXT, w.meta_data("layer0", ["base:allocation"])[:-3])
        + w.option(w.OPT_GO, w.go_data("layer0"))
    )
    events, out = drain(conn)
    answers, _ = w.ReplyChecker(False).options(out[18:])
    replies = [a.reply for a in answers]
    assert replies[:6] == [
        w.REP_ERR_INVALID,
        w.REP_ACK,
        w.REP_META_CONTEXT,
        w.REP_ACK,
        w.REP_META_CONTEXT,
        w.REP_ACK,
    ]
    assert answers[4].data[4:] == b"base:allocation"
    assert replies[6] == w.REP_ERR_INVALID  # truncated query: and the selection is gone
    assert events == [ExportSelected("layer0", True, False)]


def test_set_meta_context_refused_as_too_long_still_clears_the_selection():
    """SET_META_CONTEXT replaces the selection even when it fails: one too long to read
    gets ERR_TOO_BIG, and base:allocation selected before it is gone (block status on
    the export chosen next is EINVAL)."""
    conn = ServerConnection(CATALOG)
    queries = ["base:allocation"] + [f"x-many:{i:04}" for i in range(2000)]
    conn.receive_data(
        w.client_flags()
        + w.option(w.OPT_STRUCTURED_REPLY)
        + w.option(w.OPT_SET_META_CONTEXT, w.meta_data("layer0", ["base:allocation"]))
        + w.option(w.OPT_SET_META_CONTEXT, w.meta_data("layer0", queries))
        + w.option(w.OPT_GO, w.go_data("layer0"))
        + w.request(w.CMD_BLOCK_STATUS, 1, 0, 512)
    )
    events, out = drain(conn)
    answers, rest = w.ReplyChecker(False).options(out[18:])
    assert [a.reply for a in answers][:4] == [
        w.REP_ACK,
        w.REP_META_CONTEXT,
        w.REP_ACK,
        w.REP_ERR_TOO_BIG,
    ]
    assert events == [ExportSelected("layer0", True, False)]
    checker = w.ReplyChecker(True)
    assert checker.transmission(rest) == b""
    assert checker.take(1).error == w.EINVAL


def test_structured_read_reply_and_partial_failure():
    """A read becomes one OFFSET_DATA chunk; a failed read is one ERROR_OFFSET chunk at
    its start, with no data."""
    conn = negotiated()
    checker = w.ReplyChecker(True)
    conn.receive_data(w.request(w.CMD_READ, 7, 4096, 8192) + w.request(w.CMD_READ, 8, 0, 100))
    first, second = conn.next_event(), conn.next_event()
    assert first == ReadRequest(7, 4096, 8192) and second == ReadRequest(8, 0, 100)
    checker.reads = {7: (4096, 8192), 8: (0, 100)}
    out = conn.send(ReadReply(first, [b"a" * 4096, memoryview(b"b" * 4096)]))
    out += conn.send(ReadFailed(second, w.EIO, "gone"))
    assert checker.transmission(b"".join(bytes(b) for b in out)) == b""
    ok, bad = checker.take(7), checker.take(8)
    assert ok.data == {4096: b"a" * 4096 + b"b" * 4096} and ok.error == 0
    assert bad.chunks == [w.TYPE_ERROR_OFFSET] and bad.error == w.EIO and bad.data == {}


def test_simple_replies_refusals_and_disconnect():
    """Without structured replies: writes, trims and zeroes get EPERM (the write payload is
    skipped), out of range and oversized reads EINVAL, unknown commands EINVAL, flush
    succeeds, block status is refused, DISC ends the conversation."""
    conn = negotiated(structured=False)
    conn.receive_data(
        w.request(w.CMD_WRITE, 1, 0, 5)
        + b"HELLO"
        + w.request(w.CMD_TRIM, 2, 0, 512)
        + w.request(w.CMD_WRITE_ZEROES, 3, 0, 512)
        + w.request(w.CMD_READ, 4, (3 << 20) - 10, 11)
        + w.request(w.CMD_READ, 5, 0, MAX_PAYLOAD + 1)
        + w.request(42, 6)
        + w.request(w.CMD_FLUSH, 7)
        + w.request(w.CMD_BLOCK_STATUS, 8, 0, 512)
        + w.request(w.CMD_CACHE, 9, 0, 4096)
        + w.request(w.CMD_READ, 10, 0, 0)
        + w.request(w.CMD_DISC, 11)
        + w.request(w.CMD_READ, 12, 0, 1)
    )
    events, out = drain(conn)
    assert events == [CacheRequest(9, 0, 4096), Disconnect()]
    checker = w.ReplyChecker(False)
    assert checker.transmission(out) == b""
    errors = {r.handle: r.error for r in checker.finished}
    assert errors == {1: 1, 2: 1, 3: 1, 4: 22, 5: 22, 6: 22, 7: 0, 8: 22, 10: 0}
    done = b"".join(bytes(b) for b in conn.send(CommandDone(events[0])))
    assert struct.unpack(">IIQ", done) == (w.SIMPLE_MAGIC, 0, 9)


def test_block_status_reports_all_data():
    """With base:allocation, block status answers one data extent (status 0) of the
    requested length; unknown command flags get EINVAL."""
    conn = negotiated()
    conn.receive_data(
        w.request(w.CMD_BLOCK_STATUS, 1, 512, 65536, w.FLAG_REQ_ONE)
        + w.request(w.CMD_READ, 2, 0, 10, 1 << 9)
    )
    _, out = drain(conn)
    checker = w.ReplyChecker(True)
    assert checker.transmission(out) == b""
    status, read = checker.take(1), checker.take(2)
    assert status.extents == [(65536, 0)]
    assert read.error == w.EINVAL and read.chunks == [w.TYPE_ERROR]


@pytest.mark.parametrize(
    "script",
    [
        b"\xff\xff\xff\xff",  # unknown client flags
        w.client_flags() + b"NOTMAGIC" + bytes(8),  # option without IHAVEOPT
        w.client_flags() + w.option(w.OPT_ABORT),  # a clean abort
    ],
)
def test_handshake_endings(script):
    """Bad flags and a bad option magic close the connection; ABORT is acknowledged."""
    conn = ServerConnection(CATALOG)
    conn.receive_data(script)
    events, _ = drain(conn)
    assert len(events) == 1 and isinstance(events[0], ConnectionClosed)
    assert conn.phase is Phase.CLOSED


def test_bad_request_magic_and_hangup_mid_message():
    """A request with a wrong magic ends the connection; so does EOF inside a request."""
    conn = negotiated()
    conn.receive_data(b"\x00" * 28)
    (event,) = drain(conn)[0]
    assert isinstance(event, ConnectionClosed) and not event.clean
    conn = negotiated()
    conn.receive_data(w.request(w.CMD_READ, 1, 0, 1)[:10])
    conn.receive_data(b"")
    (event,) = drain(conn)[0]
    assert isinstance(event, ConnectionClosed) and not event.clean


def test_shutting_down_refuses_new_options_and_requests():
    """Once the server is stopping, options get ERR_SHUTDOWN (ABORT is still honoured)
    and requests ESHUTDOWN, with a write's payload still skipped; DISC still ends it."""
    conn = ServerConnection(CATALOG)
    conn.data_to_send()
    conn.begin_shutdown()
    conn.receive_data(w.client_flags() + w.option(w.OPT_LIST) + w.option(w.OPT_ABORT))
    events, out = drain(conn)
    answers, _ = w.ReplyChecker(False).options(out)
    assert [a.reply for a in answers] == [2**31 + 7, w.REP_ACK]
    assert isinstance(events[0], ConnectionClosed)
    conn = negotiated()
    conn.begin_shutdown()
    conn.receive_data(
        w.request(w.CMD_READ, 1, 0, 512)
        + w.request(w.CMD_WRITE, 2, 0, 4)
        + b"data"
        + w.request(w.CMD_DISC, 3)
    )
    events, out = drain(conn)
    assert events == [Disconnect()]
    checker = w.ReplyChecker(True)
    checker.reads[1] = (0, 512)
    assert checker.transmission(out) == b""
    assert [(r.handle, r.error) for r in checker.finished] == [(1, w.ESHUTDOWN), (2, w.ESHUTDOWN)]


@pytest.mark.parametrize(
    ("code", "expected"),
    [(99, w.REP_ERR_UNSUP), (11, w.REP_ERR_UNSUP), (w.OPT_LIST, w.REP_ERR_INVALID)],
    ids=["unknown", "extended_headers", "list"],
)
def test_an_oversized_option_whose_answer_needs_no_data_gets_that_answer(code, expected):
    """An option the server does not implement is ERR_UNSUP (the spec's baseline: MUST),
    however long its data; one that takes no data (LIST) is ERR_INVALID with any. Only
    an option whose data the server would read is refused as too big to read."""
    conn = ServerConnection(CATALOG)
    conn.receive_data(
        w.client_flags()
        + w.option(code, bytes(MAX_OPTION_LENGTH + 1))
        + w.option(w.OPT_INFO, bytes(MAX_OPTION_LENGTH + 1))
        + w.option(w.OPT_LIST)
    )
    answers, rest = w.ReplyChecker(False).options(drain(conn)[1][18:])
    assert rest == b""
    assert [(a.option, a.reply) for a in answers][:2] == [
        (code, expected),
        (w.OPT_INFO, w.REP_ERR_TOO_BIG),
    ]
    assert answers[-1].reply == w.REP_ACK
