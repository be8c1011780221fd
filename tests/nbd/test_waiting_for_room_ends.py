"""Connections whose reads wait for room end in every way, and leave nothing behind."""

from __future__ import annotations

import filecmp
import os
import random
import socket
import ssl
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path

import pytest
from nbd_wire import (
    CMD_CACHE,
    CMD_DISC,
    CMD_FLUSH,
    CMD_READ,
    OPT_GO,
    OPT_REPLY_MAGIC,
    OPT_STARTTLS,
    REP_ACK,
    RawClient,
    client_flags,
    go_data,
    option,
    request,
)
from rig.fault_proxy import Fault
from rig.registry_blob import registry_blob
from rig.waiting import wait_for

from nbdfront.protocol import TLSPolicy
from nbdfront.server import NBDServer
from nbdfront.tls import ServerTLS, server_context

MIB = 1 << 20
MISSES = (8 * MIB, 16 * MIB, 24 * MIB)  # 2 MiB each: two fill a 4 MiB budget, one waits
ENDS = ("disc", "reset", "half-close", "close", "half-record")


class Conversation:
    """A client past the handshake, plain or over TLS, that sends requests and reads no
    reply, then ends as told."""

    def __init__(self, address: tuple[str, int], certificates: Path | None):
        self.sock = socket.create_connection(address, timeout=10)
        self._tls: ssl.SSLObject | None = None
        self._incoming, self._outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self._recv_exactly(18)
        self.sock.sendall(client_flags())
        if certificates is not None:
            self.sock.sendall(option(OPT_STARTTLS))
            self._option_answer(self._recv_exactly)
            self._start_tls(certificates)
        self.send(option(OPT_GO, go_data("")))
        self._option_answer(self._read_plain if self._tls else self._recv_exactly)

    def _start_tls(self, certificates: Path) -> None:
        context = ssl.create_default_context(cafile=certificates / "ca-cert.pem")
        context.check_hostname = False
        context.load_cert_chain(certificates / "client-cert.pem", certificates / "client-key.pem")
        self._tls = context.wrap_bio(self._incoming, self._outgoing)
        while True:
            try:
                self._tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                self.sock.sendall(self._outgoing.read())
                self._incoming.write(self.sock.recv(65536))
        self.sock.sendall(self._outgoing.read())

    def _recv_exactly(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            piece = self.sock.recv(n - len(data))
            if not piece:
                raise ConnectionError("the server closed")
            data += piece
        return data

    def _read_plain(self, n: int) -> bytes:
        assert self._tls is not None
        data = b""
        while len(data) < n:
            try:
                data += self._tls.read(n - len(data))
            except ssl.SSLWantReadError:
                self._incoming.write(self.sock.recv(65536))
        return data

    @staticmethod
    def _option_answer(read: Callable[[int], bytes]) -> None:
        while True:
            magic, _option, reply, length = struct.unpack(">QIII", read(20))
            assert magic == OPT_REPLY_MAGIC
            read(length)
            if reply == REP_ACK:
                return
            assert not reply & (1 << 31), reply

    def _sealed(self, data: bytes) -> bytes:
        if self._tls is None:
            return data
        self._tls.write(data)
        return self._outgoing.read()

    def send(self, data: bytes) -> None:
        self.sock.sendall(self._sealed(data))

    def end(self, how: str) -> None:
        """disc: DISC, then close; reset: an RST (SO_LINGER 0); half-close: no more
        requests, the socket left open; close: close with replies unread, as a killed
        client's socket is; half-record: half a request (under TLS half a record), then
        close."""
        if how == "disc":
            self.send(request(CMD_DISC, 99))
        elif how == "reset":
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        elif how == "half-close":
            self.sock.shutdown(socket.SHUT_WR)
            return
        elif how == "half-record":
            sealed = self._sealed(request(CMD_FLUSH, 98))
            self.sock.sendall(sealed[: len(sealed) // 2])
        self.sock.close()


def eventfds() -> int:
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        with suppress(OSError):
            count += "eventfd" in os.readlink(f"/proc/self/fd/{fd}")
    return count


def session_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("nbd-127.0.0.1:")]


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
def test_connections_that_vanish_while_reads_wait_for_room_leave_nothing_open(
    registry, pushed_images, fault_proxy, nbd_certificates, tmp_path, tls
):
    """Tried: two waves of 20 connections (plain, or TLS with a client certificate),
    each filling its 4 MiB budget with two 2 MiB misses that a registry fails after
    0.6 s and sending a third that waits for room on the budget's eventfd; then each
    ends in one of five ways: DISC, an RST, a half-close left open, a close with replies
    unread (as a killed client's), half a request (under TLS, half a record) then a close.
    Must hold: every connection waits on an eventfd of its own; within 5 s of each wave
    none is left: no eventfd, no session, no thread of one (the half-closed ones once
    their clients close)."""
    proxy = fault_proxy(registry)
    tls_config = None
    if tls:
        tls_config = ServerTLS(TLSPolicy.REQUIRE, server_context(nbd_certificates.server))
    with registry_blob(proxy, pushed_images.large, tmp_path, retried=False) as blob:
        proxy.fault = Fault("status", path_contains="/blobs/", status=500, seconds=0.6)
        server = NBDServer(
            {"layer0": blob},
            tcp=("127.0.0.1", 0),
            default_export="layer0",
            inflight_bytes=4 * MIB,
            drain_timeout=1.0,
            tls=tls_config,
        )
        server.start()
        assert server.tcp_address is not None
        certificates = nbd_certificates.client if tls else None
        before = eventfds()
        try:
            for _ in range(2):
                clients = [Conversation(server.tcp_address, certificates) for _ in range(20)]
                for client in clients:
                    for handle, offset in enumerate(MISSES):
                        client.send(request(CMD_READ, handle, offset, 2 * MIB))
                waiting = before + len(clients)
                assert wait_for(lambda n=waiting: eventfds() == n, timeout=5), eventfds() - before
                for i, client in enumerate(clients):
                    client.end(ENDS[i % len(ENDS)])
                time.sleep(0.2)
                for client in clients:
                    client.sock.close()  # the half-closed ones
                assert wait_for(
                    lambda: (
                        eventfds() == before
                        and server.connection_count == 0
                        and not session_threads()
                    ),
                    timeout=5,
                ), (eventfds() - before, server.connection_count, session_threads())
        finally:
            server.shutdown()


def thread_cpu(threads: list[threading.Thread]) -> float:
    """CPU seconds the ``threads`` have used, from /proc."""
    total = 0
    for thread in threads:
        try:
            with open(f"/proc/self/task/{thread.native_id}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
def test_a_client_that_takes_no_reply_while_reads_wait_for_room_costs_no_cpu(
    registry, pushed_images, fault_proxy, nbd_certificates, tmp_path, tls
):
    """Tried: a client (plain, or TLS) with a 64 KiB receive buffer sends twelve 2 MiB
    reads of misses into a 4 MiB budget and takes no reply: once the first misses are
    read, their replies, unsent, hold the budget, and the reads behind wait for room on
    the budget's eventfd.
    Must hold: over 3 s of that, the session's threads use under 0.1 s of CPU (measured:
    under 0.01 s; a reader thread polling without waiting uses 2.7 s): nothing spins on
    the socket or the eventfd."""
    proxy = fault_proxy(registry)
    tls_config = None
    if tls:
        tls_config = ServerTLS(TLSPolicy.REQUIRE, server_context(nbd_certificates.server))
    with registry_blob(proxy, pushed_images.large, tmp_path, retried=False) as blob:
        server = NBDServer(
            {"layer0": blob},
            tcp=("127.0.0.1", 0),
            default_export="layer0",
            inflight_bytes=4 * MIB,
            tls=tls_config,
        )
        server.start()
        assert server.tcp_address is not None
        try:
            client = Conversation(server.tcp_address, nbd_certificates.client if tls else None)
            client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
            for handle in range(12):
                client.send(request(CMD_READ, handle, 2 * MIB * handle, 2 * MIB))
            assert wait_for(lambda: eventfds() > 0 and server.bytes_in_flight >= 4 * MIB)
            time.sleep(0.5)  # the misses read are done
            threads = session_threads()
            used = thread_cpu(threads)
            time.sleep(3)
            used = thread_cpu(threads) - used
            assert used < 0.1, used
            client.sock.close()
        finally:
            server.shutdown()


def churn(address: tuple[str, int], rng: random.Random, until: float) -> int:
    """Connections that make reads and cache hints wait for room, then end at a random
    moment in a random way, one after another until ``until``; how many there were."""
    count = 0
    while time.monotonic() < until:
        count += 1
        try:
            client = RawClient(address, timeout=5)
            client.negotiate()
            for handle in range(rng.randint(3, 40)):
                offset, kind = rng.randrange(0, 60) * MIB, rng.random()
                if kind < 0.6:
                    client.send(CMD_CACHE, handle, offset, 4 * MIB)
                elif kind < 0.9:
                    length = rng.choice([4096, MIB, 4 * MIB, 8 * MIB])
                    client.send(CMD_READ, handle, offset, length)
                else:
                    client.send(CMD_FLUSH, handle)
            time.sleep(rng.random() * 0.03)
            how = rng.random()
            if how < 0.3:
                linger = struct.pack("ii", 1, 0)
                client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
            elif how < 0.6:
                client.send(CMD_DISC, 999)
            elif how < 0.8:
                client.sock.shutdown(socket.SHUT_WR)
                time.sleep(rng.random() * 0.02)
            client.close()
        except OSError:
            pass
    return count


def test_connections_ending_as_their_waits_for_room_end_leave_every_byte_right(
    registry, pushed_images, erofs_images, fault_proxy, tmp_path
):
    """Tried: for 5 s, four threads open connection after connection that send cache
    hints of 4 MiB and reads (4 KiB to 8 MiB) of a cached 64 MiB image into a 4 MiB
    budget, so that releases and eventfd writes race each connection's end at a random
    moment (DISC, RST, half-close, close); meanwhile nbdcopy copies the image over and
    over on a connection of its own.
    Must hold: every copy equals the image (a write to an eventfd closed and reused
    would land 8 stray bytes in a socket or a cache file); nothing is left open; the
    cache then verifies clean."""
    proxy = fault_proxy(registry)
    image = erofs_images.large.path
    with registry_blob(proxy, pushed_images.large, tmp_path, retried=False) as blob:
        server = NBDServer(
            {"layer0": blob},
            tcp=("127.0.0.1", 0),
            unix=tmp_path / "nbd.sock",
            default_export="layer0",
            inflight_bytes=4 * MIB,
            drain_timeout=1.0,
        )
        server.start()
        assert server.tcp_address is not None
        uri = f"nbd+unix:///layer0?socket={server.unix_path}"
        copy = tmp_path / "copy"
        try:
            subprocess.run(["nbdcopy", uri, str(copy)], check=True)  # the cache warm
            until = time.monotonic() + 5
            counts: list[int] = []
            churners = [
                threading.Thread(
                    target=lambda seed=seed: counts.append(
                        churn(server.tcp_address, random.Random(seed), until)
                    )
                )
                for seed in range(4)
            ]
            for thread in churners:
                thread.start()
            copies = 0
            while time.monotonic() < until or copies < 2:  # two at least, however loaded
                copy.unlink()
                subprocess.run(["nbdcopy", "--requests=32", uri, str(copy)], check=True)
                assert filecmp.cmp(image, copy, shallow=False), f"copy {copies} differs"
                copies += 1
            for thread in churners:
                thread.join()
            assert sum(counts) > 60, (counts, copies)
            assert wait_for(
                lambda: server.connection_count == 0 and not session_threads(), timeout=15
            ), (server.connection_count, session_threads())
        finally:
            server.shutdown()
    verify = subprocess.run(
        [sys.executable, "-m", "blockstore", "cache", "verify", "--cache-dir", tmp_path / "cache"],
        capture_output=True,
        text=True,
    )
    assert verify.returncode == 0, verify.stdout + verify.stderr
