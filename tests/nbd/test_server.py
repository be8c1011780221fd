"""The server around the protocol: concurrency, backpressure, isolation, shutdown."""

from __future__ import annotations

import contextlib
import logging
import select
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import nbd
import nbd_wire as w
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from nbd_serving import SlowMissExport, ZeroExport, start_server
from rig.waiting import wait_for

from nbdfront.server import NBDServer
from nbdfront.server.nbd_server import CUT_GRACE, INFLIGHT_BYTES
from nbdfront.server.session import READ_PIECE


class GatedExport:
    """An export whose reads at ``gated_offset`` wait for ``gate``: a slow registry fetch.

    Reads there are never hits; ``served`` notes which method served each offset.
    """

    def __init__(self, inner, gated_offset: int):
        self.inner = inner
        self.gated_offset = gated_offset
        self.gate = threading.Event()
        self.waiting = threading.Event()
        self.name, self.description, self.size = inner.name, inner.description, inner.size
        self.served: dict[int, str] = {}

    def read(self, offset, length):
        if offset == self.gated_offset:
            self.waiting.set()
            assert self.gate.wait(30)
        self.served[offset] = "read"
        return self.inner.read(offset, length)

    def read_cached(self, offset, length):
        if offset == self.gated_offset:
            return None
        data = self.inner.read_cached(offset, length)
        if data is not None:
            self.served[offset] = "read_cached"
        return data

    def cache(self, offset, length):
        self.inner.cache(offset, length)


@pytest.mark.parametrize("warm", [False, True], ids=["misses", "hits"])
def test_replies_go_out_as_they_finish(local_blob, tmp_path, warm):
    """On one connection, a read stalled in a slow fetch does not hold up later reads:
    they are answered first (misses by other workers; hits at once from the cache by
    read_cached, with no fetch), the stalled one when its fetch completes."""
    if warm:
        local_blob.blob.read(0, len(local_blob.data))
    gated = GatedExport(local_blob.blob, gated_offset=4096)
    server = start_server({"blob": gated}, tmp_path, "blob")
    client = w.RawClient(server.tcp_address)
    try:
        client.negotiate("blob")
        client.send(w.CMD_READ, 1, 4096, 4096)
        assert gated.waiting.wait(10)
        for handle, offset in [(2, 0), (3, 1 << 20)]:
            client.send(w.CMD_READ, handle, offset, 8192)
            assert client.wait(handle).data == {offset: local_blob.data[offset : offset + 8192]}
            assert gated.served[offset] == ("read_cached" if warm else "read")
        assert 1 not in [r.handle for r in client.checker.finished]
        gated.gate.set()
        assert client.wait(1).data == {4096: local_blob.data[4096:8192]}
        assert gated.served[4096] == "read"
    finally:
        gated.gate.set()
        client.close()
        server.shutdown()


def test_a_flood_of_maximum_reads_meets_backpressure(tmp_path):
    """A client that queues a thousand 4 MiB reads of slow misses and never reads a reply
    gets no more of them read at once than the byte budget holds (8, of 16 workers), and
    hardly more read in all: the rest wait in its own socket. The server keeps serving
    others and forgets the flooder when it goes."""
    slow = SlowMissExport(delay=0.05)
    size = INFLIGHT_BYTES // 8
    server = start_server({"zeros": slow}, tmp_path, "zeros")
    flooder = w.RawClient(server.tcp_address)
    try:
        flooder.negotiate("zeros", structured=False)
        flooder.sock.setblocking(False)
        burst = b"".join(w.request(w.CMD_READ, i, i * size, size) for i in range(1000))
        with contextlib.suppress(BlockingIOError):
            flooder.sock.send(burst)
        time.sleep(1.5)
        # Unbounded, 16 workers would have read hundreds by now.
        assert slow.most_in_flight <= 8, slow.most_in_flight
        # The budget, plus what fits in the socket buffers on both sides.
        assert slow.reads <= 16, slow.reads
        other = nbd.NBD()
        other.connect_uri(f"nbd://127.0.0.1:{server.tcp_address[1]}/zeros")
        assert other.pread(4096, 1 << 30) == bytes(4096)
        other.shutdown()
    finally:
        flooder.close()
        deadline = time.monotonic() + 10
        while server.connection_count and time.monotonic() < deadline:
            time.sleep(0.05)
        assert server.connection_count == 0
        server.shutdown()


def test_reading_stops_at_the_budget_and_resumes_as_replies_drain(tmp_path):
    """The read gate: with a 4 MiB budget, a client that sends 64 reads of 1 MiB slow
    misses and reads no reply has at most the budget's worth read (plus one reply in the
    Unix socket); once it reads its replies the server takes the rest, and all 64 arrive
    whole and right."""
    slow = SlowMissExport(delay=0.02)
    server = NBDServer({"zeros": slow}, unix=str(tmp_path / "nbd.sock"), inflight_bytes=4 << 20)
    server.start()
    client = w.RawClient(server.unix_path)
    try:
        client.negotiate("zeros", structured=False)
        for handle in range(64):
            client.send(w.CMD_READ, handle, handle << 20, 1 << 20)
        time.sleep(1.0)
        assert slow.reads <= 6, slow.reads
        for handle in range(64):
            assert client.wait(handle).data == {handle << 20: bytes(1 << 20)}
        assert slow.reads == 64
    finally:
        client.close()
        server.shutdown()


def test_a_flush_and_block_status_behind_reads_that_fill_the_budget_are_answered_at_once(
    tmp_path,
):
    """Tried: one burst of twelve 4 MiB reads of misses that take a second each (eight
    fill the connection's 32 MiB budget), a BLOCK_STATUS behind the eighth and a FLUSH
    behind the last, as qemu mixes them with reads on a cold cache.
    Must hold: both are answered at once (well within the second), before any read;
    every read then arrives whole. Before, the reader thread waited for room for the
    ninth read with the block status's reply made and not sent, and the flush not yet
    parsed: both waited a second, for the first reads to end."""
    server = start_server({"zeros": SlowMissExport(delay=1.0)}, tmp_path, "zeros")
    client = w.RawClient(server.unix_path)
    size = INFLIGHT_BYTES // 8
    try:
        client.negotiate("zeros")
        burst = []
        for handle in range(12):
            client.checker.reads[handle] = (handle * size, size)
            burst.append(w.request(w.CMD_READ, handle, handle * size, size))
            if handle == 7:
                burst.append(w.request(w.CMD_BLOCK_STATUS, 100, 0, 65536))
        burst.append(w.request(w.CMD_FLUSH, 101))
        started = time.monotonic()
        client.sock.sendall(b"".join(burst))
        assert client.wait(100).extents == [(65536, 0)]
        assert client.wait(101).error == 0
        took = time.monotonic() - started
        assert [r.handle for r in client.checker.finished] == [], "a read was answered first"
        assert took < 0.5, took
        for handle in range(12):
            assert client.wait(handle).data == {handle * size: bytes(size)}
    finally:
        client.close()
        server.shutdown()


def test_a_flush_and_block_status_sent_while_reads_wait_for_room_are_answered_at_once(
    tmp_path,
):
    """Tried: libnbd sends nine 4 MiB reads of misses that take a second each (eight fill
    the connection's 32 MiB budget, the ninth waits for room), then, once the server has
    read them, a BLOCK_STATUS and a FLUSH.
    Must hold: both are answered at once (well within the second), before any read;
    every read then arrives whole. Before, the reader thread waited for room for the
    ninth read without reading on, so both waited a second, for the first reads to end."""
    slow = SlowMissExport(delay=1.0)
    server = start_server({"zeros": slow}, tmp_path, "zeros")
    handle = nbd.NBD()
    handle.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    handle.connect_unix(server.unix_path)
    size = INFLIGHT_BYTES // 8
    done: dict[str, float] = {}

    def note(name: str):
        def completed(error) -> int:
            done[name] = time.monotonic()
            return 1

        return completed

    try:
        buffers = [nbd.Buffer(size) for _ in range(9)]
        for i, buffer in enumerate(buffers):
            handle.aio_pread(buffer, i * size, completion=note(f"read {i}"))
        assert wait_for(lambda: slow.in_flight == 8)
        time.sleep(0.1)  # the ninth read is parsed and waits for room
        started = time.monotonic()
        handle.aio_block_status(65536, 0, lambda *args: 0, completion=note("block status"))
        handle.aio_flush(completion=note("flush"))
        while handle.aio_in_flight():
            handle.poll(-1)
        reads = min(at for name, at in done.items() if name.startswith("read"))
        for name in ("block status", "flush"):
            assert done[name] < reads, f"{name} came after a read"
            assert done[name] - started < 0.5, (name, done[name] - started)
        assert all(buffer.to_bytearray() == bytes(size) for buffer in buffers)
    finally:
        handle.shutdown()
        server.shutdown()


class PartlyCachedExport(SlowMissExport):
    """Zeros cached up to ``cached`` bytes (hits) and slow misses past it."""

    def __init__(self, delay: float, cached: int):
        super().__init__(delay)
        self.cached = cached

    def read_cached(self, offset, length):
        return ZeroExport.read(self, offset, length) if offset + length <= self.cached else None


def test_a_block_status_ahead_of_a_hit_waiting_for_room_is_not_held_back(tmp_path):
    """Tried: a client fills its 32 MiB budget with eight 4 MiB reads of misses that take
    two seconds; a second client then chooses an export, so each one's share of the
    server's 32 MiB shrinks to 16 MiB; the first sends a BLOCK_STATUS and a 4 MiB read
    of a hit in one burst and takes its replies.
    Must hold: the block status arrives with the hit, at once, before any miss. Before,
    the hit's reply, queued for the client, made the reader thread wait for the bytes
    held to fit the shrunken share, which only the misses ending makes, with the block
    status's reply made and not yet queued: it came two seconds late, behind them."""
    size = READ_PIECE
    export = PartlyCachedExport(delay=2.0, cached=size)
    path = str(tmp_path / "nbd.sock")
    server = NBDServer({"zeros": export}, unix=path, server_inflight_bytes=8 * size)
    server.start()
    client = w.RawClient(path)
    other = w.RawClient(path)
    try:
        client.negotiate("zeros")
        for handle in range(1, 9):
            client.send(w.CMD_READ, handle, handle * size, size)
        assert wait_for(lambda: export.in_flight == 8)
        other.negotiate("zeros")
        assert server.connection_budget() == 4 * size
        client.checker.reads[10] = (0, size)
        burst = w.request(w.CMD_BLOCK_STATUS, 9, 0, 65536) + w.request(w.CMD_READ, 10, 0, size)
        started = time.monotonic()
        client.sock.sendall(burst)
        assert client.wait(9).extents == [(65536, 0)]
        took = time.monotonic() - started
        assert [r.handle for r in client.checker.finished] in ([], [10]), "a miss came first"
        assert took < 1.0, took
        for handle in [*range(1, 9), 10]:
            assert client.wait(handle).data == {handle % 10 * size: bytes(size)}
    finally:
        client.close()
        other.close()
        server.shutdown()


def test_many_connections_read_at_once(local_server):
    """Sixteen libnbd connections with many reads in flight each get the right bytes."""
    served, data = local_server
    errors: list[BaseException] = []

    def reader(seed: int) -> None:
        try:
            h = nbd.NBD()
            h.connect_uri(served.uri)
            buffers = []
            for i in range(32):
                offset = (seed * 7919 + i * 104729) % (len(data) - 70000)
                buf = nbd.Buffer(65536)
                h.aio_pread(buf, offset)
                buffers.append((offset, buf))
            while h.aio_in_flight():
                h.poll(-1)
            for offset, buf in buffers:
                assert buf.to_bytearray() == data[offset : offset + 65536]
            h.shutdown()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=reader, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []


def test_shutdown_lets_in_flight_replies_finish(local_blob, tmp_path):
    """shutdown() waits for a read already in flight, which the client receives whole;
    then the connection is closed, the listeners too, and the Unix socket is gone."""
    gated = GatedExport(local_blob.blob, gated_offset=32768)
    server = start_server({"blob": gated}, tmp_path, "blob")
    client = w.RawClient(server.unix_path)
    stopper = threading.Thread(target=server.shutdown)
    try:
        client.negotiate("blob")
        client.send(w.CMD_READ, 1, 32768, 65536)
        assert gated.waiting.wait(10)
        stopper.start()
        time.sleep(0.3)
        assert stopper.is_alive(), "shutdown did not wait for the read in flight"
        gated.gate.set()
        assert client.wait(1).data == {32768: local_blob.data[32768 : 32768 + 65536]}
        stopper.join(10)
        assert not stopper.is_alive()
        assert client.sock.recv(1) == b""
        assert not (tmp_path / "nbd.sock").exists()
        with socket.socket() as probe:
            assert probe.connect_ex(server.tcp_address) != 0
    finally:
        gated.gate.set()
        client.close()
        server.shutdown()


REP_ERR_SHUTDOWN = 2**31 + 7


def test_shutdown_refuses_what_arrives_while_replies_drain(local_blob, tmp_path, caplog):
    """While a read in flight holds shutdown, a new read on that connection gets
    ESHUTDOWN and an option on a connection still in its handshake gets ERR_SHUTDOWN
    (the spec's way to tell a client to go), not a silent hang-up; the read in flight
    still arrives whole, and the log does not blame the clients for the close."""
    gated = GatedExport(local_blob.blob, gated_offset=32768)
    server = start_server({"blob": gated}, tmp_path, "blob")
    reading = w.RawClient(server.unix_path)
    haggling = w.RawClient(server.unix_path)
    stopper = threading.Thread(target=server.shutdown)
    try:
        reading.negotiate("blob")
        haggling.sock.sendall(w.client_flags())
        reading.send(w.CMD_READ, 1, 32768, 65536)
        assert gated.waiting.wait(10)
        with caplog.at_level(logging.INFO, logger="nbdfront.server"):
            stopper.start()
            deadline = time.monotonic() + 10
            while not all(s.stopping for s in list(server._sessions)):  # refusing by now
                assert time.monotonic() < deadline, "shutdown never began refusing"
                time.sleep(0.01)
            reading.send(w.CMD_READ, 2, 0, 4096)
            assert reading.wait(2).error == w.ESHUTDOWN
            haggling.sock.sendall(w.option(w.OPT_LIST))
            assert [a.reply for a in haggling.option_answers()] == [REP_ERR_SHUTDOWN]
            assert stopper.is_alive()
            gated.gate.set()
            assert reading.wait(1).data == {32768: local_blob.data[32768 : 32768 + 65536]}
            stopper.join(10)
        assert not stopper.is_alive()
        assert reading.sock.recv(1) == b"" and haggling.sock.recv(1) == b""
        assert caplog.text.count("the server is stopping") == 2
        assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text
    finally:
        gated.gate.set()
        reading.close()
        haggling.close()
        server.shutdown()


@contextlib.contextmanager
def _shut_down_with_a_read_stuck(
    local_blob, tmp_path, *, cancel: bool
) -> Iterator[tuple[GatedExport, float, w.RawClient]]:
    """A server with a 0.5 s drain shut down while a read of its client is stuck in a
    fetch that never ends, unless ``cancel`` gives the server ``cancel_reads`` to end it:
    the export, the seconds the shutdown took, and the client."""
    gated = GatedExport(local_blob.blob, gated_offset=32768)
    server = NBDServer({"blob": gated}, unix=str(tmp_path / "nbd.sock"), drain_timeout=0.5)
    if cancel:
        server.cancel_reads = gated.gate.set
    server.start()
    client = w.RawClient(server.unix_path)
    try:
        client.negotiate("blob")
        client.send(w.CMD_READ, 1, 32768, 65536)
        assert gated.waiting.wait(10)
        started = time.monotonic()
        server.shutdown()
        yield gated, time.monotonic() - started, client
    finally:
        gated.gate.set()
        client.close()


def test_shutdown_cuts_what_does_not_drain_in_time(local_blob, tmp_path):
    """A read stuck in a fetch that never ends does not hold shutdown: it waits out its
    drain timeout, then cuts the connection (the client sees it close, with no reply
    for the stuck read) and returns within a second or two of the timeout."""
    with _shut_down_with_a_read_stuck(local_blob, tmp_path, cancel=False) as (_, took, client):
        assert 0.5 <= took < 2.5, took
        assert client.sock.recv(1) == b""


def test_shutdown_ends_the_reads_it_cuts_before_waiting_for_their_threads(local_blob, tmp_path):
    """Tried: shutdown with a read stuck in a fetch that only the server's owner can end
    (``cancel_reads``: a ``serve`` cancels its image's fetches), past a 0.5 s drain.
    Must hold: that is called once the drain ran out, before the wait for the cut
    connection, whose thread then ends at once: shutdown returns well within the cut's
    grace, and the client sees its connection close. Before, shutdown waited the whole
    grace (1 s) for a thread stuck in a fetch that only the image's close, after it,
    would cancel."""
    with _shut_down_with_a_read_stuck(local_blob, tmp_path, cancel=True) as (gated, took, client):
        assert gated.gate.is_set(), "the stuck read was never cancelled"
        assert took < 0.5 + CUT_GRACE / 2, took
        assert client.sock.recv(1) == b""


_reads = st.tuples(st.integers(0, 3 * 1024 * 1024), st.integers(1, 65536))


@pytest.fixture
def steady_reader(local_server):
    """One connection kept open across every example of the fuzz test."""
    handle = nbd.NBD()
    handle.connect_uri(local_server[0].uri)
    yield handle
    handle.shutdown()


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(garbage=st.binary(max_size=200), after_handshake=st.booleans(), read=_reads)
def test_fuzzed_connection_does_not_disturb_another(
    local_server, steady_reader, garbage, after_handshake, read
):
    """While one connection receives random bytes (at the handshake or mid-transmission),
    a second, already open connection keeps reading correct bytes."""
    served, data = local_server
    fuzz = w.RawClient(served.server.tcp_address)
    try:
        if after_handshake:
            fuzz.negotiate("blob")
        fuzz.sock.sendall(garbage)
        offset, length = read
        offset = min(offset, len(data) - length)
        assert steady_reader.pread(length, offset) == data[offset : offset + length]
    finally:
        fuzz.close()


def test_uris_reach_every_export_by_name(tmp_path):
    """The URI printed for each export, over IPv6 TCP or a Unix socket path with a space,
    and for names that need escaping, is one nbdinfo can open."""
    exports = {"layer 0": ZeroExport(), "a/b": ZeroExport()}
    for tcp in (("::1", 0), None):
        server = NBDServer(exports, tcp=tcp, unix=str(tmp_path / "s p.sock"), default_export="a/b")
        server.start()
        try:
            for name, uri in {**server.uris(), "": server.uri("")}.items():
                size = subprocess.run(
                    ["nbdinfo", "--size", uri],
                    capture_output=True,
                    text=True,
                    check=True,
                    timeout=30,
                ).stdout
                assert int(size) == ZeroExport.size, name
        finally:
            server.shutdown()


def test_connections_over_the_limit_are_closed(tmp_path):
    """Past max_connections, while no connection has been idle long enough to make room,
    a new client is hung up on before the greeting; once one of the first clients
    leaves, a newcomer is served again."""
    server = NBDServer({"z": ZeroExport()}, tcp=("127.0.0.1", 0), max_connections=2)
    server.start()
    first, second = w.RawClient(server.tcp_address), w.RawClient(server.tcp_address)
    try:
        with socket.create_connection(server.tcp_address, timeout=10) as third:
            assert third.recv(18) == b""
        first.close()
        deadline = time.monotonic() + 10
        while server.connection_count > 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        w.RawClient(server.tcp_address).close()
    finally:
        first.close()
        second.close()
        server.shutdown()


def test_tcp_connections_have_nodelay(local_server):
    """Accepted TCP sockets have TCP_NODELAY, so small replies are not held back by Nagle."""
    served, _ = local_server
    client = w.RawClient(served.server.tcp_address)
    try:
        (session,) = served.server._sessions
        assert session._sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    finally:
        client.close()


def _flood_then_read(tmp_path, reads: int, size: int, most_held: int) -> None:
    """Twelve clients of simple replies each send ``reads`` reads of ``size`` bytes and
    take no reply, the server's bound at 16 MiB: they hold ``most_held`` bytes at
    most between them; a client reading 1 MiB meanwhile is served within 5 s; then
    every reply arrives whole as they take them."""
    server = NBDServer(
        {"zeros": ZeroExport()},
        unix=str(tmp_path / "nbd.sock"),
        default_export="zeros",
        server_inflight_bytes=16 << 20,
    )
    server.start()
    # Served in turn, 32 MiB at a time: on a loaded machine the last waits well past
    # the wire client's usual 10 s for its first byte.
    greedy = [w.RawClient(server.unix_path, timeout=120) for _ in range(12)]
    try:
        for client in greedy:
            client.negotiate("zeros", structured=False)
            for handle in range(reads):
                client.send(w.CMD_READ, handle, handle * size, size)
        time.sleep(1.0)
        assert server.bytes_in_flight <= most_held, server.bytes_in_flight
        reader = nbd.NBD()
        started = time.monotonic()
        reader.connect_unix(server.unix_path)
        assert reader.pread(1 << 20, 0) == bytes(1 << 20)
        reader.shutdown()
        assert time.monotonic() - started < 5

        def take_replies(client: w.RawClient) -> bool:
            return all(client.wait(h).data == {h * size: bytes(size)} for h in range(reads))

        with ThreadPoolExecutor(len(greedy)) as pool:
            assert all(pool.map(take_replies, greedy))
    finally:
        for client in greedy:
            client.close()
        server.shutdown()


def test_reads_sent_whole_that_take_no_replies_wait_for_room_server_wide(tmp_path):
    """Twelve clients of simple replies (a read is sent whole, not streamed) each send
    two 32 MiB reads and take no reply, the server's bound at 16 MiB. A read larger
    than a connection's share waits for room server-wide: only the first is granted
    (nothing else was held), not one per connection (384 MiB). A client reading small
    pieces is served at once; the others are served in turn as replies are taken."""
    _flood_then_read(tmp_path, reads=2, size=32 << 20, most_held=2 * (32 << 20))


def test_clients_that_take_no_replies_share_a_bound_not_hold_one_each(tmp_path):
    """Twelve clients each send sixteen 4 MiB reads and take no reply. With the server's
    bound at 16 MiB, each connection's budget shrinks to a read piece (4 MiB): what
    they hold between them stays near twelve pieces and a reply each, where it was
    their full 32 MiB each (sixty such clients held 1.8 GB). A client that reads
    meanwhile is served at once; the others get every reply, whole, once they read."""
    # A piece and a reply each (and the batch headers): not the 32 MiB each of before.
    _flood_then_read(tmp_path, reads=16, size=4 << 20, most_held=12 * 5 * (4 << 20) // 2)


class SlowHintExport(ZeroExport):
    """Zeros whose cache hint takes ``delay`` seconds a piece, counting the pieces."""

    def __init__(self, delay: float):
        super().__init__()
        self.delay = delay
        self.hinted = 0

    def cache(self, offset, length):
        time.sleep(self.delay)
        self.hinted += 1


@pytest.mark.parametrize("goes", ["hangs up", "disconnects"])
def test_a_cache_hint_stops_when_its_client_goes(tmp_path, goes):
    """A client asks to cache 4 GiB (a thousand pieces, a minute of fetching here), then
    hangs up, or sends NBD_CMD_DISC, a second later: the hint stops within a piece or
    two, and the server forgets the connection. A hint is advice (the spec lets a server
    ignore it): once its client has gone, nothing will read what it fetches. Before,
    the hint ran to its end, fetching for a client that was gone."""
    export = SlowHintExport(delay=0.05)
    server = start_server({"zeros": export}, tmp_path, "zeros")
    client = w.RawClient(server.tcp_address)
    try:
        client.negotiate("zeros")
        client.send(w.CMD_CACHE, 1, 0, (4 << 30) - 4096)
        time.sleep(1.0)
        if goes == "disconnects":
            client.send(w.CMD_DISC, 2, 0, 0)
        client.close()
        deadline = time.monotonic() + 5
        while server.connection_count and time.monotonic() < deadline:
            time.sleep(0.05)
        assert server.connection_count == 0
        hinted = export.hinted
        time.sleep(0.5)
        assert export.hinted == hinted < 200
    finally:
        server.shutdown()


@pytest.mark.parametrize("command", ["read", "cache"])
def test_a_failed_request_is_logged_before_its_error_is_sent(tmp_path, command):
    """Tried: a read (and a cache hint) whose export fails, with the server's log
    handler held at the failure's warning. Must hold: no error reply reaches the client
    until the warning is written. A mount that fails on the kernel's EIO reads the log
    right away for the cause (the offline mount's "not cached" with what to do); an
    error sent first let it read a log without it."""

    class Failing(ZeroExport):
        def read(self, offset, length):
            raise OSError(5, "the registry went away")

        def read_cached(self, offset, length):
            return None

        def cache(self, offset, length):
            self.read(offset, length)

    class HeldHandler(logging.Handler):
        def __init__(self):
            super().__init__(logging.WARNING)
            self.reached, self.let_go = threading.Event(), threading.Event()

        def emit(self, record):
            self.reached.set()
            assert self.let_go.wait(10)

    held = HeldHandler()
    logger = logging.getLogger("nbdfront.server")
    logger.addHandler(held)
    server = start_server({"zeros": Failing()}, tmp_path, "zeros")
    client = w.RawClient(server.tcp_address)
    try:
        client.negotiate("zeros")
        client.send(w.CMD_READ if command == "read" else w.CMD_CACHE, 1, 0, 4096)
        assert held.reached.wait(10)
        readable, _, _ = select.select([client.sock], [], [], 0.5)
        assert not readable, "the error reply went out before its warning was logged"
        held.let_go.set()
        assert client.wait(1).error == 5
    finally:
        held.let_go.set()
        logger.removeHandler(held)
        client.sock.close()
        server.shutdown()
