"""Hypothesis against the protocol core: random and mutated client bytes.

Whatever a client sends, no exception escapes the core, every byte it
produces parses as well-formed NBD (checked by an independent decoder),
and every read it lets through is inside the export and under the maximum.
"""

from __future__ import annotations

import struct

import nbd_wire as w
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from nbd_serving import Facts
from nbd_strategies import conversations, mutated, pieces

from nbdfront.protocol import (
    MAX_PAYLOAD,
    NEED_DATA,
    CacheRequest,
    CommandDone,
    ConnectionClosed,
    Disconnect,
    ExportSelected,
    ReadFailed,
    ReadReply,
    ReadRequest,
    ServerConnection,
)

SIZES = {"layer0": 65536 + 7, "layer1": 1 << 20, "": 512}
CATALOG = {name: Facts(size, f"export {name}") for name, size in SIZES.items()}


def converse(script: bytes, cuts: list[int], fail_reads: bool, stop_at: int | None = None) -> None:
    """Feed ``script`` in pieces, answer every event, check every byte sent back.

    ``stop_at``: before that piece, the server begins shutting down.
    """
    conn = ServerConnection(CATALOG, default_export="layer1")
    handshake = b"".join(conn.data_to_send())
    assert handshake[:16] == struct.pack(">QQ", w.NBDMAGIC, w.IHAVEOPT)
    handshake = handshake[18:]
    checker: w.ReplyChecker | None = None
    tail = b""
    selected: ExportSelected | None = None
    ended = False

    def take(buffers) -> None:
        nonlocal tail
        assert checker is not None
        tail = checker.transmission(tail + b"".join(bytes(b) for b in buffers))
        checker.finished.clear()

    for number, piece in enumerate([*pieces(script, cuts), b""]):
        if number == stop_at:
            conn.begin_shutdown()
        conn.receive_data(piece)
        while True:
            transmitting = conn.transmission is not None
            event = conn.next_event()
            out = conn.data_to_send()
            if transmitting:
                take(out)
            else:
                handshake += b"".join(bytes(b) for b in out)
            if event is NEED_DATA:
                break
            assert not ended, "an event after the conversation ended"
            if isinstance(event, ExportSelected):
                selected = event
                checker = w.ReplyChecker(event.structured_replies)
                answers, rest = checker.options(handshake)
                assert all(a.reply & (1 << 31) or a.reply <= 4 for a in answers)
                assert len(rest) in (0, 10, 134), "stray bytes in the handshake"
                if rest:
                    assert struct.unpack_from(">Q", rest)[0] == SIZES[event.name]
            elif isinstance(event, ReadRequest):
                assert selected is not None and checker is not None
                assert 0 < event.length <= MAX_PAYLOAD
                assert event.offset + event.length <= SIZES[selected.name]
                checker.reads[event.handle] = (event.offset, event.length)
                if fail_reads:
                    take(conn.send(ReadFailed(event, w.EIO, "injected")))
                else:
                    take(conn.send(ReadReply(event, [bytes(event.length)])))
            elif isinstance(event, CacheRequest):
                assert event.offset + event.length <= SIZES[selected.name]
                take(conn.send(CommandDone(event, w.EIO if fail_reads else 0)))
            else:
                assert isinstance(event, Disconnect | ConnectionClosed)
                ended = True
    if checker is None:
        checker = w.ReplyChecker(False)
        answers, rest = checker.options(handshake)
        assert rest == b"", "handshake bytes that are not option replies"
    else:
        assert tail == b"", "a reply was cut short"
    assert ended, "the conversation never ended although the client hung up"


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300), st.lists(st.integers(0, 400), max_size=5), st.booleans())
def test_random_bytes(data, cuts, fail_reads):
    """Bytes with no structure at all, after valid client flags or not."""
    converse(data, cuts, fail_reads)
    converse(w.client_flags() + data, cuts, fail_reads)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    conversations(),
    st.lists(st.integers(0, 2000), max_size=6),
    st.booleans(),
    st.none() | st.integers(0, 6),
)
def test_well_formed_conversations(script, cuts, fail_reads, stop_at):
    """Valid framing with random options, names, commands, flags, offsets and lengths,
    sometimes with the server starting to shut down part way."""
    converse(script, cuts, fail_reads, stop_at)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated(), st.lists(st.integers(0, 2000), max_size=6), st.booleans())
def test_mutated_conversations(script, cuts, fail_reads):
    """Valid conversations with bytes flipped, cut short or inserted."""
    converse(script, cuts, fail_reads)
