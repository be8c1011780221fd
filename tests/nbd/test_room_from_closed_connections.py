"""Reads waiting for room start once other connections closing make it, whatever holds them."""

from __future__ import annotations

import time

import nbd
from nbd_wire import CMD_READ, RawClient
from rig.fault_proxy import Fault
from rig.registry_blob import registry_blob
from rig.waiting import wait_for

from nbdfront.server import NBDServer
from nbdfront.server.budget import LIMIT_POLL
from nbdfront.server.session import WAITING_REQUESTS

MIB = 1 << 20
SMALL = 32 * 1024
WAITING_AT = 32 * MIB  # the waiting reads, apart from the two that fill the budget


def range_start(request) -> int:
    """Where the byte range a request to the registry asks for begins (-1: no range)."""
    header = {k.lower(): v for k, v in request.headers.items()}.get("range", "")
    return int(header.split("=")[1].split("-")[0]) if header else -1


def test_reads_past_the_waiting_bound_start_once_a_closing_connection_grows_the_limit(
    registry, pushed_images, erofs_images, fault_proxy, tmp_path
):
    """Tried: a server bound of 8 MiB shared by two connections (4 MiB each); one fills
    its 4 MiB with two 2 MiB misses that a slow registry holds for 2.5 s, then sends
    WAITING_REQUESTS + 2 reads of 32 KiB misses, so that its reader thread stops reading
    to wait for room; the other connection then closes, which doubles the first one's
    share.
    Must hold: the first waiting read goes to the registry within the limit's backstop
    (LIMIT_POLL) of the close, and every read then arrives whole and right. Before, the
    reader thread waited for room with nothing to wake it but a release of its own: the
    waiting reads started only as the slow misses ended, about 2 s after the close."""
    proxy = fault_proxy(registry)
    image = erofs_images.large.path.read_bytes()
    with registry_blob(proxy, pushed_images.large, tmp_path) as blob:
        proxy.fault = Fault("delay", path_contains="/blobs/", seconds=2.5)
        server = NBDServer(
            {"layer0": blob},
            unix=tmp_path / "nbd.sock",
            default_export="layer0",
            server_inflight_bytes=8 * MIB,
        )
        server.start()
        first, other = nbd.NBD(), nbd.NBD()
        try:
            other.connect_unix(server.unix_path)
            first.connect_unix(server.unix_path)
            reads = {0: nbd.Buffer(2 * MIB), 2 * MIB: nbd.Buffer(2 * MIB)}
            for i in range(WAITING_REQUESTS + 2):
                reads[WAITING_AT + i * 2 * SMALL] = nbd.Buffer(SMALL)
            for offset, buffer in reads.items():
                first.aio_pread(buffer, offset)
            assert wait_for(lambda: any(range_start(r) >= 0 for r in proxy.requests))
            time.sleep(0.5)  # the reader thread waits for room
            assert not any(range_start(r) >= WAITING_AT for r in proxy.requests)
            closed = time.monotonic()
            other.shutdown()
            assert wait_for(lambda: any(range_start(r) >= WAITING_AT for r in proxy.requests))
            started = min(r.arrived for r in proxy.requests if range_start(r) >= WAITING_AT)
            proxy.fault = None
            assert started - closed < LIMIT_POLL + 0.1, started - closed
            while first.aio_in_flight():
                first.poll(-1)
            for offset, buffer in reads.items():
                assert buffer.to_bytearray() == image[offset : offset + len(buffer)], offset
        finally:
            first.shutdown()
            server.shutdown()


def test_a_reader_held_by_replies_not_taken_reads_on_once_a_closing_connection_grows_the_limit(
    registry, pushed_images, fault_proxy, tmp_path
):
    """Tried: a server bound of 8 MiB shared by two connections (4 MiB each); one sends
    two 3 MiB reads of cached chunks and a 32 KiB miss behind them, and takes no reply,
    so that its reader thread waits for the replies queued to fit its share; the other
    connection then closes, which doubles the first one's share.
    Must hold: the miss goes to the registry within the limit's backstop (LIMIT_POLL)
    of the close. Before, the reader thread waited for the queued replies to fit with
    nothing to wake it but the client taking some: the miss never went out."""
    proxy = fault_proxy(registry)
    with registry_blob(proxy, pushed_images.large, tmp_path) as blob:
        blob.read(0, 6 * MIB)  # the hits
        server = NBDServer(
            {"layer0": blob},
            unix=tmp_path / "nbd.sock",
            default_export="layer0",
            server_inflight_bytes=8 * MIB,
        )
        server.start()
        other = nbd.NBD()
        first = RawClient(server.unix_path, receive_buffer=SMALL)
        try:
            other.connect_unix(server.unix_path)
            first.negotiate()
            first.send(CMD_READ, 1, 0, 3 * MIB)
            first.send(CMD_READ, 2, 3 * MIB, 3 * MIB)
            first.send(CMD_READ, 3, WAITING_AT, SMALL)
            assert wait_for(lambda: server.bytes_in_flight > 4 * MIB)
            time.sleep(0.5)  # the reader thread waits for the replies to fit
            assert not any(range_start(r) >= WAITING_AT for r in proxy.requests)
            closed = time.monotonic()
            other.shutdown()
            assert wait_for(
                lambda: any(range_start(r) >= WAITING_AT for r in proxy.requests), timeout=2.0
            ), "the miss never went out"
            started = min(r.arrived for r in proxy.requests if range_start(r) >= WAITING_AT)
            assert started - closed < LIMIT_POLL + 0.1, started - closed
        finally:
            first.close()
            server.shutdown()
