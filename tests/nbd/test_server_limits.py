"""Limits a client meets: deadlines, the connection limit, cache hints, bursts, big reads.

Each one bounds what a client can take from the server (threads, memory, a
slot) without refusing what a well-behaved client does.
"""

from __future__ import annotations

import contextlib
import errno
import filecmp
import logging
import select
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable

import nbd
import nbd_wire as w
import pytest
from nbd_serving import ZeroExport
from rig.threads import no_threads_for
from rig.waiting import wait_for

from blockstore.errors import CacheError
from blockstore.throttledlog import ThrottledLog
from nbdfront.protocol import MAX_PAYLOAD
from nbdfront.server import NBDServer
from nbdfront.server.nbd_server import EVICTABLE_IDLE, MAX_CONNECTIONS
from nbdfront.server.session import READ_PIECE
from nbdfront.server.workers import Workers


class RecordingExport(ZeroExport):
    """Zeros; notes the longest range asked of ``read`` and of ``cache``, and how many
    ``cache`` calls run at once (each takes ``cache_delay`` seconds)."""

    def __init__(self, cache_delay: float = 0.0):
        super().__init__()
        self.cache_delay = cache_delay
        self.longest_read = 0
        self.cache_calls: list[int] = []
        self.caching = 0
        self.most_caching = 0

    def read(self, offset, length):
        self.longest_read = max(self.longest_read, length)
        return super().read(offset, length)

    def read_cached(self, offset, length):
        self.longest_read = max(self.longest_read, length)
        return super().read(offset, length)

    def cache(self, offset, length):
        with self._lock:
            self.cache_calls.append(length)
            self.caching += 1
            self.most_caching = max(self.most_caching, self.caching)
        time.sleep(self.cache_delay)
        with self._lock:
            self.caching -= 1


def serve(tmp_path, export, **options) -> NBDServer:
    server = NBDServer(
        {"zeros": export},
        tcp=("127.0.0.1", 0),
        unix=str(tmp_path / "nbd.sock"),
        default_export="zeros",
        **options,
    )
    server.start()
    return server


def closed_within(sock: socket.socket, seconds: float) -> float:
    """Seconds until the server closes ``sock`` (reading and dropping what it sends)."""
    started = time.monotonic()
    sock.settimeout(seconds)
    while sock.recv(65536):
        pass
    return time.monotonic() - started


def test_the_handshake_has_one_deadline_however_slowly_bytes_trickle(tmp_path):
    """A client that sends its handshake one byte every 0.1 s (each receive is quick) is
    cut when the whole handshake passes the 1 s deadline, not kept for ever; a client
    that finishes in time is served."""
    server = serve(tmp_path, ZeroExport(), handshake_timeout=1.0)
    try:
        slow = socket.create_connection(server.tcp_address)
        started = time.monotonic()
        slow.recv(18)
        script = w.client_flags() + w.option(w.OPT_GO, w.go_data("zeros"))
        with pytest.raises(OSError):
            for byte in script * 10:
                slow.sendall(bytes([byte]))
                time.sleep(0.1)
        assert 1.0 <= time.monotonic() - started < 3.0
        assert closed_within(slow, 5) < 5
        slow.close()
        fast = w.RawClient(server.tcp_address)
        fast.negotiate("zeros")
        fast.send(w.CMD_READ, 1, 0, 512)
        assert fast.wait(1).data == {0: bytes(512)}
        time.sleep(1.5)  # past the handshake deadline: a chosen export is not cut
        fast.send(w.CMD_READ, 2, 0, 512)
        assert fast.wait(2).data == {0: bytes(512)}
        fast.close()
    finally:
        server.shutdown()


def test_the_idle_limit_closes_quiet_connections_not_busy_ones(tmp_path):
    """With an idle limit of 0.5 s, a connection that has read and then gone quiet is
    closed soon after; one whose read is still being served is not."""
    gate = threading.Event()

    class Held(ZeroExport):
        def read(self, offset, length):
            assert gate.wait(10)
            return super().read(offset, length)

        def read_cached(self, offset, length):
            return None if offset else super().read(offset, length)

    server = serve(tmp_path, Held(), idle_timeout=0.5)
    quiet, busy = w.RawClient(server.tcp_address), w.RawClient(server.unix_path)
    try:
        for client in (quiet, busy):
            client.negotiate("zeros")
        quiet.send(w.CMD_READ, 1, 0, 512)
        assert quiet.wait(1).data == {0: bytes(512)}
        busy.send(w.CMD_READ, 1, 4096, 512)
        assert 0.4 < closed_within(quiet.sock, 5) < 3
        gate.set()
        assert busy.wait(1).data == {4096: bytes(512)}
    finally:
        gate.set()
        quiet.close()
        busy.close()
        server.shutdown()


def test_the_idle_limit_closes_a_connection_that_takes_no_reply(tmp_path, caplog):
    """With an idle limit of 1 s, a client that asks for 64 MiB and reads none of it
    (its replies stuck behind full socket buffers, so it is never idle) is closed soon
    after, with a log line saying why, rather than holding its replies' memory and its
    slot for ever."""
    caplog.set_level(logging.INFO, logger="nbdfront.server")
    server = serve(tmp_path, ZeroExport(), idle_timeout=1.0)
    client = w.RawClient(server.tcp_address)
    try:
        client.negotiate("zeros", structured=False)
        for handle in range(64):
            client.send(w.CMD_READ, handle, 0, 1 << 20)
        deadline = time.monotonic() + 10
        while server.connection_count and time.monotonic() < deadline:
            time.sleep(0.05)
        assert server.connection_count == 0
        assert "took no reply byte for 1.0s" in caplog.text
    finally:
        client.close()
        server.shutdown()


def test_the_idle_limit_spares_a_client_that_reads_slowly(tmp_path):
    """With an idle limit of 1 s, a client that asks for 8 MiB and takes its replies at
    about 2 MiB/s (4 s in all, never pausing a second) is slow, not stalled: it gets
    every byte, not cut part way as one that took none."""
    server = serve(tmp_path, ZeroExport(), idle_timeout=1.0)
    # Unix, not loopback TCP: shrunk to about one loopback segment (64 KiB), a TCP
    # receive buffer let the kernel, not the client, pause replies past 1 s under load.
    take_slowly(server, reads=8, size=1 << 20, piece=64 << 10, pause=0.03)


def test_a_client_taking_half_a_mebibyte_a_second_is_not_cut_by_a_one_second_limit(tmp_path):
    """Tried: idle limit 1 s; a client over the Unix socket (a 208 KiB send buffer) asks for
    1.5 MiB and takes 32 KiB of it every 1/16 s, never pausing. Must hold: it gets every
    byte. Before, the server saw the client take bytes only once per MiB it sent, so
    this client, taking a MiB every 2 s, was cut after 1 s for "taking no reply byte";
    now it sees that every 64 KiB (an eighth of a second at this pace)."""
    server = serve(tmp_path, ZeroExport(), idle_timeout=1.0)
    take_slowly(server, reads=3, size=512 << 10, piece=32 << 10, pause=1 / 16)


def take_slowly(
    server: NBDServer,
    *,
    reads: int,
    size: int,
    piece: int,
    pause: float,
    then: Callable[[w.RawClient], None] = lambda client: None,
) -> None:
    """Ask ``server`` (then shut it down) for ``reads`` reads of ``size`` bytes over its
    Unix socket, do ``then`` (say goodbye), and take the replies ``piece`` bytes at a
    time, ``pause`` seconds apart; fails if the server cuts the connection first."""
    client = w.RawClient(server.unix_path)
    try:
        client.negotiate("zeros", structured=False)
        for handle in range(reads):
            client.send(w.CMD_READ, handle, 0, size)
        then(client)
        want = reads * (size + 16)
        got = 0
        while got < want:
            taken = client.sock.recv(min(piece, want - got))
            assert taken, f"cut after {got} of {want} bytes"
            got += len(taken)
            time.sleep(pause)
    finally:
        client.close()
        server.shutdown()


@pytest.mark.parametrize(
    "goodbye",
    [
        lambda client: client.send(w.CMD_DISC, 99),
        lambda client: client.sock.shutdown(socket.SHUT_WR),
    ],
    ids=["disc", "half_close"],
)
def test_a_client_that_says_goodbye_behind_its_reads_gets_them_all_however_slowly(
    tmp_path, goodbye
):
    """Tried: a drain of 1 s; a client asks for 8 MiB, sends NBD_CMD_DISC (or shuts its
    sending side) right behind the reads, as libnbd's nbd_aio_disconnect does with commands in
    flight, and takes the replies at about 2 MiB/s (4 s in all, never pausing a second).
    Must hold: it gets every byte, as the spec says the server must handle all
    outstanding requests; only a client that stops taking them for the drain is cut."""
    server = serve(tmp_path, ZeroExport(), drain_timeout=1.0)
    take_slowly(server, reads=8, size=1 << 20, piece=64 << 10, pause=0.03, then=goodbye)


@pytest.mark.parametrize("reads", [2, 8])
def test_a_client_that_says_goodbye_behind_streamed_reads_and_takes_nothing_is_let_go(
    tmp_path, reads
):
    """Tried: a drain of 1 s; a client asks for two (or eight, most of which wait for
    room in the budget before a worker takes them) structured 32 MiB reads (sent piece
    by piece, within the connection's budget), sends NBD_CMD_DISC, and takes no reply.
    Must hold: the server lets it go within seconds, as it does one whose replies are
    all queued. Before, the connection waited for the reads' pieces to find room in the
    budget, which only the client taking replies makes: it held its slot, its threads
    and 32 MiB of replies until the client read, for ever with no idle limit."""
    server = serve(tmp_path, ZeroExport(), drain_timeout=1.0)
    client = w.RawClient(server.unix_path, receive_buffer=65536)
    try:
        client.negotiate("zeros")
        for handle in range(reads):
            client.send(w.CMD_READ, handle, handle * MAX_PAYLOAD, MAX_PAYLOAD)
        client.send(w.CMD_DISC, 9)
        assert wait_for(lambda: server.connection_count == 0, timeout=6.0)
    finally:
        client.close()
        server.shutdown()


def test_replies_flow_to_a_client_that_never_stops_sending(tmp_path):
    """A client pipelines, in one go, 100 blocks of two 1-byte reads (hits) and 500
    flushes, then one last read, reading replies on another thread: the first replies
    reach it before the server has even parsed that last read, so a flood of tiny
    requests neither starves the client of its answers nor piles them up in the server
    (which used to hold every reply until the flood paused)."""
    last = 1 << 30
    parsed_last: list[float] = []

    class Stamped(ZeroExport):
        def read_cached(self, offset, length):
            if offset == last:
                parsed_last.append(time.monotonic())
            return super().read_cached(offset, length)

    server = serve(tmp_path, Stamped())
    client = w.RawClient(server.tcp_address)
    try:
        client.negotiate("zeros", structured=False)
        block = w.request(w.CMD_READ, 1, 0, 1) * 2 + w.request(w.CMD_FLUSH, 2) * 500
        flood = block * 100 + w.request(w.CMD_READ, 3, last, 1)
        expected = 100 * (2 * 17 + 500 * 16) + 17
        received = [0]
        first_reply: list[float] = []

        def read_replies() -> None:
            with contextlib.suppress(OSError):
                while piece := client.sock.recv(1 << 16):
                    if not first_reply:
                        first_reply.append(time.monotonic())
                    received[0] += len(piece)

        reader = threading.Thread(target=read_replies, daemon=True)
        reader.start()
        client.sock.sendall(flood)
        deadline = time.monotonic() + 20
        while received[0] < expected and time.monotonic() < deadline:
            time.sleep(0.05)
        assert received[0] == expected
        assert first_reply[0] < parsed_last[0]
    finally:
        client.close()
        server.shutdown()


def test_connections_that_chose_an_export_are_never_cut_at_the_limit(tmp_path, caplog):
    """256 clients that finish the handshake and idle fill the server (each may be a
    mounted disk, idle for hours). A newcomer is refused with a log line that says why,
    and every one of the 256 still reads; once one leaves, a newcomer is served."""
    server = serve(tmp_path, ZeroExport())
    idle = []
    try:
        for _ in range(MAX_CONNECTIONS):
            client = w.RawClient(server.unix_path)
            client.negotiate("zeros", structured=False)
            idle.append(client)
        assert server.connection_count == MAX_CONNECTIONS
        time.sleep(EVICTABLE_IDLE + 0.2)
        with caplog.at_level(logging.WARNING, logger="nbdfront.server"):
            refused = nbd.NBD()
            with pytest.raises(nbd.Error):
                refused.connect_uri(server.uri("zeros"))
        assert "none stalled in its handshake: refusing" in caplog.text
        for handle, client in enumerate(idle):
            client.send(w.CMD_READ, handle, 1 << 20, 512)
            assert client.wait(handle).data == {1 << 20: bytes(512)}
        idle.pop().close()
        newcomer = nbd.NBD()
        deadline = time.monotonic() + 5
        while True:  # the departed client's session ends a moment after its close
            try:
                newcomer.connect_uri(server.uri("zeros"))
                break
            except nbd.Error:
                assert time.monotonic() < deadline
                newcomer = nbd.NBD()
                time.sleep(0.05)
        assert newcomer.pread(4096, 1 << 20) == bytes(4096)
        newcomer.shutdown()
    finally:
        for client in idle:
            client.close()
        server.shutdown()


TCP_REPAIR = 19
"""Linux's socket option (``linux/tcp.h``) under which ``close`` sends nothing to the peer."""


def vanish(sock: socket.socket) -> None:
    """Close ``sock`` without a word to the peer, as a client whose host crashed or was
    cut off: no FIN, no RST; the server learns of it only by sending."""
    sock.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR, 1)
    sock.close()


def test_clients_that_vanish_without_a_word_are_let_go_and_a_live_one_stays(tmp_path):
    """Twenty clients that chose an export and then vanish without closing (their host
    crashed, a VM killed, a network cut: nothing reaches the server) are probed once
    quiet for the keepalive time and let go when their host no longer answers. Before,
    each held its slot and thread for good, with no idle limit set (the default, as a
    disk may idle for hours): 256 such and every newcomer was refused. A live client
    quiet as long answers the probes and is served on."""
    server = serve(tmp_path, ZeroExport(), keepalive=1.0)
    try:
        live = w.RawClient(server.tcp_address)
        live.negotiate("zeros")
        gone = [w.RawClient(server.tcp_address) for _ in range(20)]
        for client in gone:
            client.negotiate("zeros")
        time.sleep(0.3)  # every byte the server sent is acknowledged: it has none to resend
        for client in gone:
            vanish(client.sock)
        time.sleep(0.5)
        assert server.connection_count == 21
        assert wait_for(lambda: server.connection_count == 1, timeout=10)
        live.send(w.CMD_READ, 1, 0, 512)
        assert live.wait(1).data == {0: bytes(512)}
        live.close()
    finally:
        server.shutdown()


def test_cache_hints_are_asked_in_pieces_within_the_budget(tmp_path):
    """CACHE over 128 MiB reaches the export in steps of at most one piece, a read sent
    after it is answered before it finishes, and 16 such hints at once run no more steps
    at a time than the byte budget holds (8), however many workers there are."""
    export = RecordingExport(cache_delay=0.02)
    server = serve(tmp_path, export)
    client = w.RawClient(server.unix_path)
    try:
        client.negotiate("zeros")
        client.send(w.CMD_CACHE, 1, 0, 128 << 20)
        client.send(w.CMD_READ, 2, 0, 512)
        assert client.wait(2).data == {0: bytes(512)}
        assert client.checker.take(1) is None, "the read waited for the whole hint"
        assert client.wait(1).error == 0
        assert max(export.cache_calls) <= READ_PIECE
        assert sum(export.cache_calls) == 128 << 20
        for handle in range(16):
            client.send(w.CMD_CACHE, 100 + handle, handle << 26, 1 << 26)
        for handle in range(16):
            assert client.wait(100 + handle).error == 0
        assert export.most_caching <= 8, export.most_caching
    finally:
        client.close()
        server.shutdown()


@pytest.mark.parametrize("transport", ["tcp", "unix"])
def test_a_client_that_writes_a_burst_before_reading_does_not_deadlock(tmp_path, transport):
    """A raw client on a non-blocking socket writes a burst of requests larger than the
    socket buffers (it must wait for room at least once) and reads no reply until it has
    written all of them. The server keeps taking requests while its replies wait, so the
    burst goes out and every reply arrives, right, within a few seconds."""
    server = serve(tmp_path, ZeroExport())
    address = server.tcp_address if transport == "tcp" else server.unix_path
    client = w.RawClient(address)
    try:
        client.negotiate("zeros", structured=False)
        client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16384)
        count, size = (32768, 160) if transport == "tcp" else (16384, 512)
        burst = memoryview(b"".join(w.request(w.CMD_READ, h, h * size, size) for h in range(count)))
        client.sock.setblocking(False)
        waits, deadline = 0, time.monotonic() + 10
        while burst:
            try:
                burst = burst[client.sock.send(burst) :]
            except BlockingIOError:
                waits += 1
                left = deadline - time.monotonic()
                writable = select.select([], [client.sock], [], max(0.0, left))[1]
                assert writable, "the server stopped taking requests while replies waited"
        assert waits, "the burst fitted in the socket buffers: nothing was tried"
        client.sock.settimeout(max(0.1, deadline - time.monotonic()))
        replies = client.recv_exactly(count * (16 + size))
        handles = set()
        for at in range(0, len(replies), 16 + size):
            magic, error, handle = struct.unpack_from(">IIQ", replies, at)
            assert (magic, error) == (w.SIMPLE_MAGIC, 0)
            assert replies[at + 16 : at + 16 + size] == bytes(size)
            handles.add(handle)
        assert handles == set(range(count))
    finally:
        client.close()
        server.shutdown()


@pytest.mark.parametrize("structured", [True, False], ids=["structured", "simple"])
def test_reads_of_32_mib_without_negotiated_block_sizes(tmp_path, structured):
    """A client that asked for no block sizes reads 32 MiB in one request (as the spec
    says a server SHOULD allow): the bytes arrive whole, the export is asked for one piece
    at a time, and one byte more is refused with EINVAL on a connection that goes on."""
    export = RecordingExport()
    server = serve(tmp_path, export)
    client = w.RawClient(server.unix_path)
    try:
        client.negotiate("zeros", structured=structured, block_sizes=False)
        client.send(w.CMD_READ, 1, 1 << 30, MAX_PAYLOAD)
        reply = client.wait(1)
        assert reply.error == 0
        assert b"".join(reply.data[k] for k in sorted(reply.data)) == bytes(MAX_PAYLOAD)
        assert min(reply.data) == 1 << 30
        if structured:
            assert len(reply.chunks) == MAX_PAYLOAD // READ_PIECE  # sent as they were read
        assert export.longest_read <= READ_PIECE
        client.send(w.CMD_READ, 2, 0, MAX_PAYLOAD + 1)
        assert client.wait(2).error == w.EINVAL
        client.send(w.CMD_READ, 3, 0, 100)
        assert client.wait(3).data == {0: bytes(100)}
    finally:
        client.close()
        server.shutdown()


def test_an_unaligned_streamed_read_sends_aligned_chunks_between_its_ends(tmp_path):
    """A structured read longer than a piece, starting and ending off any 512-byte
    boundary, read by libnbd: the spec says a server SHOULD send chunks whose offsets and
    lengths are multiples of 512 save the first and last of an unaligned read. Every
    chunk between those is aligned, the bytes are whole, and the export is still asked
    for a piece at most at a time."""
    export = RecordingExport()
    server = serve(tmp_path, export)
    start, length = (1 << 30) + 100, 3 * READ_PIECE - 200
    chunks: list[tuple[int, int]] = []
    try:
        handle = nbd.NBD()
        handle.connect_uri(server.uri("zeros"))
        data = handle.pread_structured(
            length,
            start,
            lambda buf, offset, status, error: chunks.append((offset, len(buf))) or 0,
        )
        handle.shutdown()
    finally:
        server.shutdown()
    assert data == bytes(length)
    chunks.sort()
    assert chunks[0][0] == start and sum(size for _, size in chunks) == length
    assert len(chunks) > 2
    inner = chunks[1:-1]
    assert all(offset % 512 == 0 and size % 512 == 0 for offset, size in inner), chunks
    assert (chunks[0][0] + chunks[0][1]) % 512 == 0 and chunks[-1][0] % 512 == 0
    assert export.longest_read <= READ_PIECE


def test_a_streamed_read_that_fails_part_way_sends_no_wrong_byte(tmp_path):
    """A 32 MiB structured read whose third piece fails: the pieces before it arrive as
    data, the error is reported at the first byte not sent, and nothing else comes."""

    class FailingThird(ZeroExport):
        def read(self, offset, length):
            if offset >= 2 * READ_PIECE:
                raise OSError(5, "the registry went away")
            return super().read(offset, length)

        def read_cached(self, offset, length):
            return None

    server = serve(tmp_path, FailingThird())
    client = w.RawClient(server.unix_path)
    try:
        client.negotiate("zeros", block_sizes=False)
        client.send(w.CMD_READ, 1, 0, MAX_PAYLOAD)
        reply = client.wait(1)
        assert reply.error == w.EIO and reply.chunks[-1] == w.TYPE_ERROR_OFFSET
        assert sorted(reply.data) == [0, READ_PIECE]
        assert all(len(b) == READ_PIECE for b in reply.data.values())
    finally:
        client.close()
        server.shutdown()


def test_nbdcopy_with_32_mib_requests(large_registry_image, tmp_path):
    """nbdcopy --request-size=33554432 (the largest it allows) copies the 64 MiB image
    from a cold cache byte for byte."""
    out = tmp_path / "copy.img"
    subprocess.run(
        ["nbdcopy", "--request-size=33554432", large_registry_image.uri, str(out)],
        check=True,
        timeout=120,
    )
    assert filecmp.cmp(out, large_registry_image.image.path, shallow=False)


@pytest.mark.parametrize(
    "failure",
    [
        OSError(5, "chunk is not cached, and the cache is offline"),
        CacheError("the cache at /c is damaged: MDB_CORRUPTED"),
    ],
)
def test_failed_requests_by_the_thousand_are_logged_a_few_then_counted(tmp_path, caplog, failure):
    """Fifty reads that all fail for one cause (as a tree read offline where nothing is
    cached, or a cache found damaged): the first ``BURST`` are logged one by one with
    their cause, the rest counted in one line at shutdown; each client still gets its
    EIO. Before, every failure was a line (13,634 warnings for one offline `find`), and
    an engine error that is no OSError a whole traceback each."""

    class Uncached(ZeroExport):
        def read(self, offset, length):
            raise failure

        def read_cached(self, offset, length):
            return None

    server = serve(tmp_path, Uncached())
    client = w.RawClient(server.unix_path)
    try:
        client.negotiate("zeros", block_sizes=False)
        for handle in range(50):
            client.send(w.CMD_READ, handle, handle * 4096, 4096)
        assert all(client.wait(handle).error == w.EIO for handle in range(50))
    finally:
        client.close()
        server.shutdown()
    assert not any(r.exc_info for r in caplog.records)
    failed = [r.getMessage() for r in caplog.records if "failed" in r.getMessage()]
    burst = server.failures.BURST
    assert len(failed) == burst + 1
    assert all(failure.args[-1] in line for line in failed[:burst])
    assert failed[-1].startswith(f"{50 - burst} more requests failed")


def test_clients_that_hang_up_mid_message_by_the_hundred_are_logged_a_few_then_counted(
    tmp_path, caplog
):
    """Sixty clients each negotiate, send half a request header and hang up (a fleet
    churning through restarts). The first ``BURST`` are logged with their cause, the
    rest counted in one line at shutdown; the server still serves the next client.
    Before, every one was a warning of its own, the log growing with the churn."""
    server = serve(tmp_path, ZeroExport())
    try:
        for _ in range(60):
            client = w.RawClient(server.unix_path)
            client.negotiate("zeros", block_sizes=False)
            client.sock.sendall(w.request(w.CMD_READ, 1, 0, 4096)[:14])
            client.close()
        client = w.RawClient(server.unix_path)
        client.negotiate("zeros", block_sizes=False)
        client.send(w.CMD_READ, 7, 0, 4096)
        assert client.wait(7).error == 0
        client.close()
        assert wait_for(lambda: server.connection_count == 0)
    finally:
        server.shutdown()
    hung = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(hung) < 30, f"{len(hung)} warnings for 60 hang-ups"
    burst = server.hangups.BURST
    assert len(hung) == burst + 1, hung
    assert all("in the middle of a message" in line for line in hung[:burst])
    assert hung[-1].startswith(f"{60 - burst} more connections ended uncleanly")


def test_a_flood_at_the_connection_limit_is_logged_a_few_then_counted(tmp_path, caplog):
    """Twelve clients connect and stay silent, at a limit of twelve; once they may be
    closed for a newcomer, forty more flood in. Twelve of those make room, the rest are
    refused. The first ``BURST`` of these are logged with their cause, the rest counted
    in one line at shutdown, and a client is served once the flood is gone. Before,
    each was a warning of its own: a flood, what the limit is for, grew the log with it."""
    server = serve(tmp_path, ZeroExport(), max_connections=12)
    flood: list[socket.socket] = []
    try:
        for i in range(52):
            if i == 12:
                time.sleep(EVICTABLE_IDLE + 0.2)  # the first twelve may now be closed
            sock = socket.socket(socket.AF_UNIX)
            sock.settimeout(10)
            sock.connect(server.unix_path)
            flood.append(sock)
            sock.recv(1)  # the greeting's first byte once admitted, b"" once refused
        assert server.connection_count == 12
        for sock in flood:
            sock.close()
        assert wait_for(lambda: server.connection_count == 0)
        client = nbd.NBD()
        client.connect_uri(server.uri("zeros"))
        assert client.pread(4096, 0) == bytes(4096)
        client.shutdown()
    finally:
        for sock in flood:
            sock.close()
        server.shutdown()
    warned = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    burst = ThrottledLog.BURST
    assert len(warned) == burst + 1, warned
    assert all("connection limit of 12 reached" in line for line in warned[:burst])
    assert warned[-1].startswith(f"{40 - burst} more connections were refused")


def test_a_connection_whose_thread_cannot_start_is_refused_and_accepting_goes_on(tmp_path, caplog):
    """Tried: a client connects while the process cannot start a thread (at its thread
    limit), then another once it can. Must hold: the first is closed with one warning
    naming why; the second is served; shutdown is clean. Before, the accept loop died
    (no client was ever accepted again) and shutdown failed on the unstarted thread."""
    server = serve(tmp_path, ZeroExport())
    try:
        with no_threads_for("run"):
            refused = socket.socket(socket.AF_UNIX)
            refused.connect(server.unix_path)
            assert closed_within(refused, 5) < 5
            refused.close()
        client = w.RawClient(server.unix_path)
        client.negotiate("zeros", block_sizes=False)
        client.send(w.CMD_READ, 1, 0, 4096)
        assert client.wait(1).error == 0
        client.close()
    finally:
        server.shutdown()
    said = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert any("refusing unix: can't start new thread" in line for line in said), said


def test_a_read_no_worker_can_start_for_fails_alone_and_the_connection_serves_on(tmp_path):
    """Tried: a read that must wait (a miss) while no worker thread can be started for
    it, then the same read once one can. Must hold: the first gets an error reply
    (ENOMEM), the connection stays open and serves the second; shutdown does not wait
    on a job that never ran. Before, the reader thread died (the client saw the
    connection cut) and stopping waited for ever on the job it had counted."""

    class Missing(ZeroExport):
        def read_cached(self, offset, length):
            return None

    server = serve(tmp_path, Missing())
    client = w.RawClient(server.unix_path)
    try:
        client.negotiate("zeros", block_sizes=False)
        with no_threads_for("_run"):
            client.send(w.CMD_READ, 1, 0, 4096)
            assert client.wait(1).error == errno.ENOMEM
        client.send(w.CMD_READ, 2, 0, 4096)
        assert client.wait(2).error == 0
    finally:
        client.close()
        started = time.monotonic()
        server.shutdown()
    assert time.monotonic() - started < 3


def test_a_worker_that_could_not_start_leaves_no_idle_thread_counted(tmp_path):
    """Tried: a connection's workers when one could not start (its job queued behind a
    busy worker instead), then a slow job and a quick one once threads start again.
    Must hold: the quick job gets a thread of its own and is done at once. Before, the
    queued job left a thread counted idle while it worked, so the quick job waited
    behind the slow one."""
    workers = Workers("test", 4)
    done: list[str] = []
    release = threading.Event()
    assert workers.submit(lambda: release.wait(5))
    with no_threads_for("_run"):
        assert workers.submit(lambda: done.append("queued"))
    release.set()
    assert wait_for(lambda: done == ["queued"])
    slow = threading.Event()
    assert workers.submit(lambda: slow.wait(5))
    started = time.monotonic()
    assert workers.submit(lambda: done.append("quick"))
    assert wait_for(lambda: "quick" in done, 3)
    assert time.monotonic() - started < 1
    slow.set()
    workers.stop()


def test_options_sent_without_reading_the_answers_hold_little_memory(tmp_path):
    """An option may be answered with far more than it takes: LIST names every export.
    A client that sends 2000 LISTs of 64 exports (32 KB) and reads nothing would make
    the server hold 16 MB of answers; it gets a few answered, and is read no further
    until it takes them. Read in the end, every answer is there, and GO then serves."""
    exports = {f"layer{i}": ZeroExport() for i in range(64)}
    for i, export in enumerate(exports.values()):
        export.description = f"registry.example.com/team/app@sha256:{'ab' * 32} layer {i}"
    server = NBDServer(exports, tcp=("127.0.0.1", 0), default_export="layer0")
    server.start()
    client = w.RawClient(server.tcp_address, receive_buffer=4096)
    try:
        client.sock.sendall(w.client_flags() + w.option(w.OPT_LIST) * 2000)
        most = 0
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            most = max(most, server.bytes_in_flight)
            time.sleep(0.01)
        assert most < 1 << 20, f"{most} bytes of answers held for a client reading none"
        listing = sum(24 + len(name) + len(e.description) for name, e in exports.items())
        client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        answers, rest = w.ReplyChecker(False).options(client.recv_exactly(2000 * (listing + 20)))
        assert rest == b"" and len(answers) == 2000 * 65
        assert [a.reply for a in answers[64::65]] == [w.REP_ACK] * 2000
        client.sock.sendall(w.option(w.OPT_GO, w.go_data("layer3")))
        assert client.option_answers()[-1].reply == w.REP_ACK
    finally:
        client.close()
        server.shutdown()
