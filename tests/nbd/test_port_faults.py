"""Faults on the NBD port: fuzzed conversations, floods, half-open handshakes, slow
readers, a thousand clients coming and going.

None may crash the server or make it log an internal error, each ends with
no connection left behind, and afterwards nbdcopy still gets every byte right.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import nbd
import nbd_wire as w
import pytest
from nbd_fuzz import EXPORTS, copy_is_exact, fuzz, wait_for_no_connections

from nbdfront.server import NBDServer
from nbdfront.server.nbd_server import EVICTABLE_IDLE, MAX_CONNECTIONS


@dataclass
class Port:
    server: NBDServer
    data: bytes
    path: Path
    scratch: Path

    def copy_is_exact(self) -> None:
        copy_is_exact(self.server.uri("layer1"), self.path, self.scratch)


@pytest.fixture
def port(local_blob, tmp_path, caplog) -> Iterator[Port]:
    """The local blob served as two exports over TCP and a Unix socket, with a 3 s
    handshake deadline; at the end, no internal error may have been logged."""
    server = NBDServer(
        dict.fromkeys(EXPORTS, local_blob.blob),
        tcp=("127.0.0.1", 0),
        unix=str(tmp_path / "nbd.sock"),
        default_export="layer1",
        handshake_timeout=3.0,
    )
    server.start()
    path = tmp_path / "blob.bin"
    try:
        with caplog.at_level(logging.INFO, logger="nbdfront"):
            yield Port(server, local_blob.data, path, tmp_path)
        errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
        assert errors == [], [r.getMessage() for r in errors]
    finally:
        server.shutdown()


def test_fuzzed_conversations_leave_the_server_whole(port):
    """Hypothesis conversations (well formed, mutated, or random bytes) sent in random
    pieces over TCP and the Unix socket: a connection open throughout keeps reading
    right bytes, no conversation is left open, and nbdcopy copies every byte right."""
    steady = nbd.NBD()
    steady.connect_uri(port.server.uri("layer0"))
    fuzz(port.server, steady, port.data, examples=60)
    steady.shutdown()
    wait_for_no_connections(port.server)
    port.copy_is_exact()


def test_a_flood_of_half_open_handshakes(port):
    """300 connections that send part of a handshake (or nothing) and then wait: the
    server holds at most its limit of them, a newcomer is still served during the flood
    (one stalled in its handshake makes room), the handshake deadline (3 s) closes the
    rest, and nbdcopy is exact."""
    partial = [b"", w.client_flags()[:2], w.client_flags(), w.client_flags() + w.option(7)[:9]]
    flood = []
    for i in range(300):
        sock = socket.socket(socket.AF_UNIX)
        sock.connect(port.server.unix_path)
        sock.sendall(partial[i % len(partial)])
        flood.append(sock)
    try:
        time.sleep(EVICTABLE_IDLE + 0.2)
        assert port.server.connection_count <= MAX_CONNECTIONS
        newcomer = nbd.NBD()
        newcomer.connect_uri(port.server.uri("layer0"))
        assert newcomer.pread(65536, 4096) == port.data[4096 : 4096 + 65536]
        newcomer.shutdown()
        wait_for_no_connections(port.server)
        for sock in flood:
            sock.settimeout(5)
            # The greeting, then the close (a reset, where our bytes went unread).
            with contextlib.suppress(ConnectionResetError):
                while sock.recv(4096):
                    pass
    finally:
        for sock in flood:
            sock.close()
    port.copy_is_exact()


def connection_threads() -> set[threading.Thread]:
    """The threads serving connections (readers, workers, writers)."""
    listeners = ("nbd-accept", "nbd-deadlines")
    return {
        t for t in threading.enumerate() if t.name.startswith("nbd-") and t.name not in listeners
    }


def test_a_thousand_clients_come_and_go(port):
    """1000 clients in 8 threads, each doing one of: a whole handshake and a read (bytes
    checked), a hang-up mid-handshake, a hang-up with a read in flight. All within
    seconds, no connection or thread left behind, and nbdcopy is exact."""
    threads_before = connection_threads()
    failures: list[BaseException] = []

    def visitor(first: int) -> None:
        try:
            for i in range(first, 1000, 8):
                client = w.RawClient(port.server.unix_path if i % 2 else port.server.tcp_address)
                try:
                    if i % 3 == 0:
                        client.sock.sendall(w.client_flags())
                        continue
                    client.negotiate("layer0", structured=bool(i % 5))
                    offset = (i * 7919) % (len(port.data) - 512)
                    client.send(w.CMD_READ, 1, offset, 512)
                    if i % 3 == 1:
                        assert client.wait(1).data == {offset: port.data[offset : offset + 512]}
                finally:
                    client.close()
        except BaseException as exc:
            failures.append(exc)

    started = time.monotonic()
    visitors = [threading.Thread(target=visitor, args=(n,)) for n in range(8)]
    for t in visitors:
        t.start()
    for t in visitors:
        t.join(60)
    assert failures == []
    assert time.monotonic() - started < 30
    wait_for_no_connections(port.server)
    deadline = time.monotonic() + 10
    while connection_threads() - threads_before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert connection_threads() - threads_before == set()
    port.copy_is_exact()


def test_slow_readers_do_not_slow_others(port):
    """Four clients ask for 64 reads of 64 KiB each and take their replies 4 KiB at a
    time, slowly: meanwhile nbdcopy copies the export, exact and in a few seconds; then
    the slow readers get every byte of theirs right."""
    slow = []
    for n in range(4):
        client = w.RawClient(port.server.unix_path if n % 2 else port.server.tcp_address)
        client.negotiate("layer0", structured=bool(n % 2))
        for handle in range(64):
            client.send(w.CMD_READ, handle, handle * 32768, 65536)
        slow.append(client)
    stop = threading.Event()

    def dawdle(client: w.RawClient) -> None:
        while not stop.is_set() and client.receive_some(4096):
            time.sleep(0.01)

    dawdlers = [threading.Thread(target=dawdle, args=(c,)) for c in slow]
    for t in dawdlers:
        t.start()
    try:
        started = time.monotonic()
        port.copy_is_exact()
        assert time.monotonic() - started < 15
    finally:
        stop.set()
        for t in dawdlers:
            t.join()
    for client in slow:
        for handle in range(64):
            offset = handle * 32768
            assert client.wait(handle).data == {offset: port.data[offset : offset + 65536]}
        client.close()
    wait_for_no_connections(port.server)
