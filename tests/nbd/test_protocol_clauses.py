"""Clauses of the NBD spec (doc/proto.md) a client relies on, each sent as exact bytes
to the protocol core; where a real client sees the clause, also through libnbd."""

from __future__ import annotations

import struct

import nbd
import nbd_wire as w
import pytest
from nbd_serving import ZeroExport, start_server
from test_protocol import CATALOG, drain, negotiated

from nbdfront.protocol import ServerConnection

SEND_DF = 1 << 7
FLAG_FUA = 1


def answers_to(script: bytes) -> tuple[list[w.OptionAnswer], bytes]:
    """Option answers to ``script`` (client flags first) and the bytes after them."""
    conn = ServerConnection(CATALOG, default_export="layer1")
    conn.receive_data(w.client_flags() + script)
    return w.ReplyChecker(False).options(drain(conn)[1][18:])


def infos(answers: list[w.OptionAnswer]) -> dict[int, bytes]:
    return {
        struct.unpack_from(">H", a.data)[0]: a.data[2:] for a in answers if a.reply == w.REP_INFO
    }


def test_info_ignores_unknown_requests_and_always_gives_the_export():
    """INFO: the server MUST ignore information requests it does not understand, and
    MUST send NBD_INFO_EXPORT before a successful ACK."""
    answers, rest = answers_to(w.option(w.OPT_INFO, w.go_data("layer0", (999, 77))))
    assert rest == b"" and answers[-1].reply == w.REP_ACK
    given = infos(answers)
    assert struct.unpack(">QH", given[w.INFO_EXPORT])[0] == 1 << 20
    assert set(given) <= {w.INFO_EXPORT, w.INFO_BLOCK_SIZE}


def test_go_sends_no_padding_even_without_no_zeroes():
    """GO: the server MUST NOT send zero padding after its ACK, whether or not the client
    negotiated NO_ZEROES; transmission starts right behind the ACK."""
    conn = ServerConnection(CATALOG)
    conn.receive_data(
        w.client_flags(no_zeroes=False)
        + w.option(w.OPT_GO, w.go_data("layer0"))
        + w.request(w.CMD_FLUSH, 5)
    )
    answers, rest = w.ReplyChecker(False).options(drain(conn)[1][18:])
    assert answers[-1].reply == w.REP_ACK
    assert rest == struct.pack(">IIQ", w.SIMPLE_MAGIC, 0, 5)


def test_send_df_is_set_only_once_structured_replies_are_negotiated():
    """SEND_DF MUST be clear unless structured replies were negotiated, and set when
    READ takes the DF flag (it does, then)."""
    before, _ = answers_to(
        w.option(w.OPT_INFO, w.go_data("layer0"))
        + w.option(w.OPT_STRUCTURED_REPLY)
        + w.option(w.OPT_INFO, w.go_data("layer0"))
    )
    flags = [struct.unpack(">QH", infos([a])[w.INFO_EXPORT])[1] for a in before[:1] + before[4:5]]
    assert [bool(f & SEND_DF) for f in flags] == [False, True]


def test_a_df_read_is_one_content_chunk_and_df_without_structured_replies_is_einval():
    """With DF the server MUST send at most one content chunk; a client MUST NOT set DF
    without SEND_DF, and a server that gets it anyway answers EINVAL (no payload)."""
    conn = negotiated(structured=True)
    conn.receive_data(w.request(w.CMD_READ, 1, 0, 65536, w.FLAG_DF))
    request = conn.next_event()
    reply = b"".join(bytes(b) for b in conn.send_read(request, [bytes(65536)]))
    checker = w.ReplyChecker(True)
    checker.reads[1] = (0, 65536)
    assert checker.transmission(reply) == b""
    assert checker.take(1).chunks == [w.TYPE_OFFSET_DATA]
    conn = negotiated(structured=False)
    conn.receive_data(w.request(w.CMD_READ, 2, 0, 512, w.FLAG_DF) + w.request(w.CMD_FLUSH, 3))
    _, out = drain(conn)
    assert out == struct.pack(">IIQ", w.SIMPLE_MAGIC, w.EINVAL, 2) + struct.pack(
        ">IIQ", w.SIMPLE_MAGIC, 0, 3
    )


def test_meta_context_queries_wildcards_unknown_namespaces_and_ids():
    """LIST MUST take ``base:`` as a wildcard and answers with id 0; unknown namespaces
    and unknown ``base:`` leaves MUST be ignored, not refused; SET MUST ignore ``base:``
    and select nothing for zero queries; the id SET gives is the one block status uses."""
    queries = [
        (w.OPT_LIST_META_CONTEXT, ["base:"]),
        (w.OPT_LIST_META_CONTEXT, ["x-other:thing", "base:nope"]),
        (w.OPT_SET_META_CONTEXT, ["base:"]),
        (w.OPT_SET_META_CONTEXT, []),
        (w.OPT_SET_META_CONTEXT, ["x-other:thing", "base:allocation"]),
    ]
    script = w.option(w.OPT_STRUCTURED_REPLY) + b"".join(
        w.option(code, w.meta_data("layer0", names)) for code, names in queries
    )
    answers, _ = answers_to(script)
    said = [(a.reply, a.data) for a in answers[1:]]
    selected_id = struct.unpack_from(">I", said[-2][1])[0]
    assert said == [
        (w.REP_META_CONTEXT, struct.pack(">I", 0) + b"base:allocation"),
        (w.REP_ACK, b""),
        (w.REP_ACK, b""),
        (w.REP_ACK, b""),
        (w.REP_ACK, b""),
        (w.REP_META_CONTEXT, struct.pack(">I", selected_id) + b"base:allocation"),
        (w.REP_ACK, b""),
    ]
    assert selected_id != 0
    conn = ServerConnection(CATALOG)
    conn.receive_data(
        w.client_flags()
        + script
        + w.option(w.OPT_GO, w.go_data("layer0"))
        + w.request(w.CMD_BLOCK_STATUS, 1, 0, 4096)
    )
    _, rest = w.ReplyChecker(False).options(drain(conn)[1][18:])
    _, flags, kind, handle, length = struct.unpack_from(">IHHQI", rest)
    assert (flags, kind, handle, length) == (1, w.TYPE_BLOCK_STATUS, 1, 12)
    assert struct.unpack_from(">III", rest, 20) == (selected_id, 4096, 0)


@pytest.mark.parametrize("names", [["base:"], []], ids=["wildcard", "no_queries"])
def test_block_status_after_selecting_nothing_is_einval(names):
    """A SET_META_CONTEXT that selected nothing leaves block status unusable: the server
    SHOULD answer EINVAL, and the connection goes on."""
    conn = ServerConnection(CATALOG)
    conn.receive_data(
        w.client_flags()
        + w.option(w.OPT_STRUCTURED_REPLY)
        + w.option(w.OPT_SET_META_CONTEXT, w.meta_data("layer0", names))
        + w.option(w.OPT_GO, w.go_data("layer0"))
        + w.request(w.CMD_BLOCK_STATUS, 1, 0, 4096)
        + w.request(w.CMD_FLUSH, 2)
    )
    _, rest = w.ReplyChecker(False).options(drain(conn)[1][18:])
    checker = w.ReplyChecker(True)
    assert checker.transmission(rest) == b""
    assert [(r.handle, r.error) for r in checker.finished] == [(1, w.EINVAL), (2, 0)]


def test_block_status_lengths():
    """REQ_ONE: exactly one extent, no longer than asked; a range past the end SHOULD be
    EINVAL; a zero length is answered without a disconnect."""
    conn = negotiated()
    size = 3 << 20
    conn.receive_data(
        w.request(w.CMD_BLOCK_STATUS, 1, 0, 1000, w.FLAG_REQ_ONE)
        + w.request(w.CMD_BLOCK_STATUS, 2, size - 512, 1024)
        + w.request(w.CMD_BLOCK_STATUS, 3, 0, 0)
        + w.request(w.CMD_BLOCK_STATUS, 4, size - 512, 512, w.FLAG_REQ_ONE | FLAG_FUA)
    )
    checker = w.ReplyChecker(True)
    assert checker.transmission(drain(conn)[1]) == b""
    replies = {r.handle: r for r in checker.finished}
    assert replies[1].extents == [(1000, 0)] and replies[4].extents == [(512, 0)]
    assert replies[2].error == w.EINVAL and replies[3].error == w.EINVAL


@pytest.mark.parametrize("structured", [True, False], ids=["structured", "simple"])
def test_fua_is_accepted_on_every_command_and_cache_refuses_other_flags(structured):
    """With SEND_FUA the server MUST accept FUA on every command (here by ignoring it);
    having offered SEND_CACHE, it MUST reject CACHE flags it does not know (EINVAL)."""
    conn = negotiated(structured=structured)
    conn.receive_data(
        w.request(w.CMD_FLUSH, 1, flags=FLAG_FUA)
        + w.request(w.CMD_CACHE, 2, 0, 4096, FLAG_FUA)
        + w.request(w.CMD_CACHE, 3, 0, 4096, w.FLAG_DF)
        + w.request(w.CMD_READ, 4, 0, 0, FLAG_FUA)
    )
    events, out = drain(conn)
    assert [(e.handle, e.length) for e in events] == [(2, 4096)]
    checker = w.ReplyChecker(structured)
    checker.reads[4] = (0, 0)
    assert checker.transmission(out) == b""
    assert {r.handle: r.error for r in checker.finished} == {1: 0, 3: w.EINVAL, 4: 0}


def test_writes_to_the_read_only_export_are_eperm_and_their_payload_skipped():
    """READ_ONLY: the server MUST error writes (EPERM, as the spec advises); a write's
    payload is still taken off the wire, so the next request is read right."""
    conn = negotiated()
    conn.receive_data(
        w.request(w.CMD_WRITE, 1, 0, 8, FLAG_FUA)
        + b"\x25\x60\x95\x13abcd"  # a payload that starts like a request
        + w.request(w.CMD_WRITE_ZEROES, 2, 0, 512, 1 << 4)
        + w.request(w.CMD_TRIM, 3, 0, 512)
        + w.request(w.CMD_FLUSH, 4)
    )
    checker = w.ReplyChecker(True)
    assert checker.transmission(drain(conn)[1]) == b""
    assert {r.handle: r.error for r in checker.finished} == {1: 1, 2: 1, 3: 1, 4: 0}


@pytest.mark.parametrize("shutting_down", [False, True], ids=["read_only", "shutting_down"])
def test_a_refused_write_is_answered_only_once_its_payload_is_in(shutting_down):
    """Tried: a WRITE header (refused: EPERM on the read-only export, or ESHUTDOWN while
    stopping), then its 1000-byte payload in pieces, then the connection's end. Must hold:
    no reply until the payload's last byte is in, then one; a client hanging up inside
    the payload gets none. A client still sending the payload has not put the request in
    flight yet (libnbd counts it sent only then), so an answer before that names a
    request it does not know of, and it drops the connection."""
    for pieces, answered in ([999, 1], True), ([500], False):
        conn = negotiated()
        if shutting_down:
            conn.begin_shutdown()
        conn.receive_data(w.request(w.CMD_WRITE, 1, 0, 1000))
        assert drain(conn) == ([], b"")
        for size in pieces:
            assert drain(conn)[1] == b""
            conn.receive_data(bytes(size))
        events, out = drain(conn)
        checker = w.ReplyChecker(True)
        assert checker.transmission(out) == b""
        expected = w.ESHUTDOWN if shutting_down else w.EPERM
        assert [(r.handle, r.error) for r in checker.finished] == (
            [(1, expected)] if answered else []
        )
        if not answered:
            conn.receive_data(b"")
            events, out = drain(conn)
            assert out == b"" and [type(e).__name__ for e in events] == ["ConnectionClosed"]


def test_libnbd_sees_the_meta_context_df_and_req_one(tmp_path):
    """Through libnbd: base:allocation is listed and selected, a DF read comes as one
    chunk, and a REQ_ONE block status as one extent no longer than asked."""

    class Small(ZeroExport):
        size = 1 << 20

    server = start_server({"small": Small()}, tmp_path, "small")
    try:
        handle = nbd.NBD()
        handle.set_opt_mode(True)
        handle.connect_uri(server.uri("small"))
        listed: list[str] = []
        handle.opt_list_meta_context(listed.append)
        assert listed == ["base:allocation"]
        handle.add_meta_context("base:allocation")
        handle.opt_go()
        assert handle.can_df() and handle.can_meta_context("base:allocation")
        chunks: list[tuple[int, int]] = []
        data = handle.pread_structured(
            65536,
            4096,
            lambda buf, offset, status, error: chunks.append((offset, len(buf))) or 0,
            nbd.CMD_FLAG_DF,
        )
        assert data == bytes(65536) and chunks == [(4096, 65536)]
        extents: list[list[int]] = []
        handle.block_status(
            65536,
            (1 << 20) - 65536,
            lambda context, offset, entries, error: extents.append(entries) or 0,
            nbd.CMD_FLAG_REQ_ONE,
        )
        assert extents == [[65536, 0]]
        handle.shutdown()
    finally:
        server.shutdown()
