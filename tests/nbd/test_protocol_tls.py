"""STARTTLS and the TLS policies in the sans-I/O core, driven with byte strings.

The core cannot encrypt: ``StartTLS`` tells the server to make the
handshake and ``tls_started()`` says it did. Here the "TLS" bytes are fed
as they are, which is what the core sees after a real server decrypts them.
"""

from __future__ import annotations

import struct

import nbd_wire as w
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from nbd_serving import Facts

from nbdfront.protocol import (
    NEED_DATA,
    ConnectionClosed,
    ExportSelected,
    ServerConnection,
    StartTLS,
    TLSPolicy,
)

REP_ERR_TLS_REQD = 2**31 + 5
OPT_LIST_META, OPT_SET_META = w.OPT_LIST_META_CONTEXT, w.OPT_SET_META_CONTEXT
CATALOG = {"layer0": Facts(1 << 20, "secret base"), "layer1": Facts(3 << 20, "secret top")}


def connect(policy: TLSPolicy, flags: bytes | None = None) -> ServerConnection:
    conn = ServerConnection(CATALOG, default_export="layer1", tls=policy)
    conn.data_to_send()  # the greeting
    conn.receive_data(w.client_flags() if flags is None else flags)
    return conn


def exchange(conn: ServerConnection, data: bytes) -> tuple[list, list[w.OptionAnswer], bytes]:
    """Feed ``data``; the events, the decoded option replies, and any bytes after them."""
    conn.receive_data(data)
    events = []
    while (event := conn.next_event()) is not NEED_DATA:
        events.append(event)
    raw = b"".join(bytes(b) for b in conn.data_to_send())
    answers, rest = w.ReplyChecker(False).options(raw)
    return events, answers, rest


def upgrade(conn: ServerConnection) -> None:
    events, answers, _ = exchange(conn, w.option(w.OPT_STARTTLS))
    assert events == [StartTLS()]
    assert [(a.option, a.reply) for a in answers] == [(w.OPT_STARTTLS, w.REP_ACK)]
    conn.tls_started()


REFUSED_BEFORE_TLS = [
    w.option(w.OPT_LIST),
    w.option(w.OPT_INFO, w.go_data("layer0", (w.INFO_NAME, w.INFO_DESCRIPTION))),
    w.option(w.OPT_GO, w.go_data("")),
    w.option(w.OPT_STRUCTURED_REPLY),
    w.option(OPT_LIST_META, w.meta_data("layer0", [])),
    w.option(OPT_SET_META, w.meta_data("layer0", ["base:allocation"])),
    w.option(99, b"whatever"),
    w.option(w.OPT_GO, bytes(20_000)),  # oversized: skipped, still TLS_REQD
]


@pytest.mark.parametrize("message", REFUSED_BEFORE_TLS)
def test_require_refuses_every_option_before_tls(message):
    """Under --tls require every option but STARTTLS and ABORT gets ERR_TLS_REQD and no
    export name, size or description leaks; the connection stays open for STARTTLS."""
    conn = connect(TLSPolicy.REQUIRE)
    events, answers, rest = exchange(conn, message)
    assert events == [] and rest == b""
    (option,) = struct.unpack_from(">I", message, 8)
    assert [(a.option, a.reply) for a in answers] == [(option, REP_ERR_TLS_REQD)]
    assert b"layer" not in answers[0].data and b"secret" not in answers[0].data
    upgrade(conn)
    events, _, _ = exchange(conn, w.option(w.OPT_GO, w.go_data("")))
    assert events == [ExportSelected("layer1", False, False)]


def test_require_export_name_before_tls_hangs_up():
    """EXPORT_NAME cannot be refused, so before TLS it ends the connection with no byte
    of reply (no size, no flags)."""
    conn = connect(TLSPolicy.REQUIRE)
    events, answers, rest = exchange(conn, w.option(w.OPT_EXPORT_NAME, b"layer0"))
    assert answers == [] and rest == b""
    assert len(events) == 1 and isinstance(events[0], ConnectionClosed)
    assert not events[0].clean


def test_require_acknowledges_abort():
    """ABORT is answered with ACK and ends the connection, TLS or not."""
    conn = connect(TLSPolicy.REQUIRE)
    events, answers, _ = exchange(conn, w.option(w.OPT_ABORT))
    assert [(a.option, a.reply) for a in answers] == [(w.OPT_ABORT, w.REP_ACK)]
    assert isinstance(events[0], ConnectionClosed) and events[0].clean


@pytest.mark.parametrize("policy", [TLSPolicy.OFF, TLSPolicy.ON, TLSPolicy.REQUIRE])
def test_abort_with_oversized_data_is_still_acknowledged(policy):
    """ABORT's data is to be ignored, however long: 20,000 bytes of it (past the option
    limit, so skipped unread) still get ACK and a clean close, never ERR_TOO_BIG."""
    conn = connect(policy)
    events, answers, _ = exchange(conn, w.option(w.OPT_ABORT, bytes(20_000)))
    assert [(a.option, a.reply) for a in answers] == [(w.OPT_ABORT, w.REP_ACK)]
    assert len(events) == 1 and isinstance(events[0], ConnectionClosed) and events[0].clean


@pytest.mark.parametrize("upgraded", [False, True])
@pytest.mark.parametrize("policy", [TLSPolicy.ON, TLSPolicy.REQUIRE])
def test_oversized_starttls_is_invalid_not_tls_required(policy, upgraded):
    """STARTTLS with 20,000 bytes of data (it takes none) is answered ERR_INVALID, before
    TLS as after it: never ERR_TLS_REQD, which would tell the client to send the very
    option it sent. The connection goes on, and a proper STARTTLS then works."""
    conn = connect(policy)
    if upgraded:
        upgrade(conn)
    events, answers, _ = exchange(conn, w.option(w.OPT_STARTTLS, bytes(20_000)))
    assert events == []
    assert [(a.option, a.reply) for a in answers] == [(w.OPT_STARTTLS, w.REP_ERR_INVALID)]
    if not upgraded:
        upgrade(conn)


def test_oversized_starttls_without_tls_is_refused_by_policy():
    """With TLS off, STARTTLS is refused by policy whatever its length."""
    conn = connect(TLSPolicy.OFF)
    events, answers, _ = exchange(conn, w.option(w.OPT_STARTTLS, bytes(20_000)))
    assert events == [] and [a.reply for a in answers] == [w.REP_ERR_POLICY]


def test_require_refuses_clients_without_fixed_newstyle():
    """TLS needs fixed newstyle; a client without it could only get plain text, so it is
    dropped at once."""
    conn = connect(TLSPolicy.REQUIRE, flags=struct.pack(">I", 0))
    events, answers, _ = exchange(conn, b"")
    assert answers == [] and isinstance(events[0], ConnectionClosed)


def test_tls_on_offers_no_tls_to_clients_without_fixed_newstyle():
    """TLS needs fixed newstyle: under --tls on such a client's STARTTLS is refused by
    policy (no handshake asked for) and it is still served in plain text."""
    conn = connect(TLSPolicy.ON, flags=struct.pack(">I", 0))
    events, answers, _ = exchange(conn, w.option(w.OPT_STARTTLS))
    assert events == [] and [a.reply for a in answers] == [w.REP_ERR_POLICY]
    events, _, _ = exchange(conn, w.option(w.OPT_EXPORT_NAME, b"layer0"))
    assert events == [ExportSelected("layer0", False, False)]


def test_nothing_is_parsed_until_the_handshake_is_done():
    """After StartTLS the core waits: receiving before ``tls_started`` is a server bug and
    says so; after it, options are answered."""
    conn = connect(TLSPolicy.REQUIRE)
    conn.receive_data(w.option(w.OPT_STARTTLS))
    assert conn.next_event() == StartTLS()
    assert conn.next_event() is NEED_DATA
    with pytest.raises(RuntimeError):
        conn.receive_data(w.option(w.OPT_LIST))
    conn.tls_started()
    conn.data_to_send()
    _, answers, _ = exchange(conn, w.option(w.OPT_LIST))
    assert [a.reply for a in answers] == [w.REP_SERVER, w.REP_SERVER, w.REP_ACK]


def test_bytes_behind_starttls_end_the_connection():
    """Plain-text options sent behind STARTTLS, before its reply, would be taken as if
    they came over TLS: the connection is closed instead, without the ACK."""
    conn = connect(TLSPolicy.REQUIRE)
    script = w.option(w.OPT_STARTTLS) + w.option(w.OPT_GO, w.go_data(""))
    events, answers, rest = exchange(conn, script)
    assert answers == [] and rest == b""
    assert len(events) == 1 and isinstance(events[0], ConnectionClosed) and not events[0].clean


@pytest.mark.parametrize("policy", [TLSPolicy.ON, TLSPolicy.REQUIRE])
def test_starttls_twice_or_with_data_is_invalid(policy):
    """STARTTLS with data, or once TLS runs, gets ERR_INVALID and no second handshake."""
    conn = connect(policy)
    events, answers, _ = exchange(conn, w.option(w.OPT_STARTTLS, b"x"))
    assert events == [] and [a.reply for a in answers] == [w.REP_ERR_INVALID]
    upgrade(conn)
    events, answers, _ = exchange(conn, w.option(w.OPT_STARTTLS))
    assert events == [] and [a.reply for a in answers] == [w.REP_ERR_INVALID]


def test_tls_off_refuses_starttls_by_policy():
    """A server without TLS answers STARTTLS with ERR_POLICY and goes on in plain text."""
    conn = connect(TLSPolicy.OFF)
    events, answers, _ = exchange(conn, w.option(w.OPT_STARTTLS))
    assert events == [] and [a.reply for a in answers] == [w.REP_ERR_POLICY]
    events, _, _ = exchange(conn, w.option(w.OPT_GO, w.go_data("layer0")))
    assert events == [ExportSelected("layer0", False, False)]


def test_tls_on_still_serves_plain_clients():
    """With --tls on a client that never asks for TLS gets its export, as nbdkit does."""
    conn = connect(TLSPolicy.ON)
    events, _, _ = exchange(conn, w.option(w.OPT_GO, w.go_data("layer0")))
    assert events == [ExportSelected("layer0", False, False)]


def test_what_was_agreed_before_tls_is_forgotten():
    """Structured replies and a metadata context agreed in plain text do not carry over
    into the TLS session (nbdkit's CVE-2021-3716): the client must ask again."""
    conn = connect(TLSPolicy.ON)
    plain = w.option(w.OPT_STRUCTURED_REPLY)
    plain += w.option(OPT_SET_META, w.meta_data("", ["base:allocation"]))
    exchange(conn, plain)
    upgrade(conn)
    events, _, _ = exchange(conn, w.option(w.OPT_GO, w.go_data("")))
    assert events == [ExportSelected("layer1", False, False)]


option_code = st.one_of(st.integers(1, 12), st.integers(0, 2**32 - 1))
option_data = st.one_of(
    st.builds(w.go_data, st.sampled_from(["", "layer0", "layer1"]), st.just(())),
    st.sampled_from([b"", b"layer0"]),
    st.binary(max_size=40),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.builds(w.option, option_code, option_data), max_size=8), st.binary(max_size=60))
def test_require_reveals_nothing_before_tls(options, junk):
    """Whatever options a plain client sends under --tls require, and whatever junk follows,
    it gets only refusals (or ACKs to ABORT and STARTTLS), never an export, until the
    core asks for the TLS handshake."""
    conn = connect(TLSPolicy.REQUIRE)
    conn.receive_data(b"".join(options) + junk)
    conn.receive_data(b"")
    raw = b""
    while (event := conn.next_event()) is not NEED_DATA:
        raw += b"".join(bytes(b) for b in conn.data_to_send())
        assert not isinstance(event, ExportSelected)
        if isinstance(event, StartTLS | ConnectionClosed):
            break
    raw += b"".join(bytes(b) for b in conn.data_to_send())
    answers, rest = w.ReplyChecker(False).options(raw)
    assert rest == b""
    for answer in answers:
        if answer.reply == w.REP_ACK:
            assert answer.option in (w.OPT_ABORT, w.OPT_STARTTLS)
        else:
            assert answer.reply & (1 << 31), "only errors before TLS"
            assert answer.reply == REP_ERR_TLS_REQD or answer.option in (
                w.OPT_ABORT,
                w.OPT_STARTTLS,
            )
    assert b"layer" not in raw and b"secret" not in raw
