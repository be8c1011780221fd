"""Requests real tools never send: libnbd with strict mode off, and raw bytes.

Each refused request gets the error the spec asks for, and the connection
stays usable: the next good read returns the right bytes.
"""

from __future__ import annotations

import errno
import socket
import time

import nbd
import nbd_wire as w
import pytest
from nbd_serving import ZeroExport, served, start_server
from rig.stored_chunks import flip_stored_byte

from blockstore.cache import CachedBlob
from blockstore.cache.integrity import SUM_SIZE
from blockstore.cache.layout import CHUNK_SIZE
from nbdfront.protocol import MAX_PAYLOAD


def connect(uri: str, structured: bool = True) -> nbd.NBD:
    handle = nbd.NBD()
    handle.set_strict_mode(0)
    handle.set_request_structured_replies(structured)
    handle.add_meta_context("base:allocation")
    handle.connect_uri(uri)
    return handle


def refused(call, *args, **kwargs) -> int:
    with pytest.raises(nbd.Error) as info:
        call(*args, **kwargs)
    return info.value.errnum


@pytest.mark.parametrize("structured", [True, False], ids=["structured", "simple"])
def test_libnbd_out_of_range_oversized_writes_and_bad_flags(registry_image, structured):
    """Out of range and oversized reads, unknown flags and a block status past the end get
    EINVAL; write, trim and write-zeroes get EPERM; flush, cache and block status succeed;
    after all of it a read still returns the image's bytes."""
    image = registry_image.image.path.read_bytes()
    size = len(image)
    h = connect(registry_image.uri, structured)
    try:
        assert h.get_structured_replies_negotiated() == structured
        assert refused(h.pread, 4096, size - 100) == errno.EINVAL
        assert refused(h.pread, 1, size) == errno.EINVAL
        assert refused(h.pread, MAX_PAYLOAD + 1, 0) == errno.EINVAL
        assert refused(h.pread, 16, 0, flags=1 << 9) == errno.EINVAL
        assert refused(h.pwrite, b"x" * 512, 0) == errno.EPERM
        assert refused(h.trim, 512, 0) == errno.EPERM
        assert refused(h.zero, 512, 0) == errno.EPERM
        h.flush()
        h.cache(65536, 0)
        if structured:
            extents = []
            h.block_status(65536, 4096, lambda ctx, off, ents, err: extents.append((ctx, ents)))
            assert extents == [("base:allocation", [65536, 0])]
            assert refused(h.block_status, 4096, size, lambda *a: 0) == errno.EINVAL
            assert h.pread(4096, 8192, flags=nbd.CMD_FLAG_DF) == image[8192:12288]
        assert h.pread(MAX_PAYLOAD if size >= MAX_PAYLOAD else size, 0) == image[:MAX_PAYLOAD]
        assert h.pread(100, size - 100) == image[-100:]
        assert h.pread(0, 0) == b""
    finally:
        h.shutdown()


@pytest.mark.parametrize("structured", [True, False], ids=["structured", "simple"])
def test_reads_over_the_maximum_payload_get_einval(tmp_path, structured):
    """On an export far larger than 4 MiB, a read of the maximum payload succeeds and one
    byte more gets EINVAL, on a connection that stays usable."""
    server = start_server({"zeros": ZeroExport()}, tmp_path, "zeros")
    try:
        h = connect(server.uri("zeros"), structured)
        assert refused(h.pread, MAX_PAYLOAD + 1, 0) == errno.EINVAL
        assert h.pread(MAX_PAYLOAD, 1 << 30) == bytes(MAX_PAYLOAD)
        h.shutdown()
    finally:
        server.shutdown()


@pytest.mark.parametrize("transport", ["tcp", "unix"])
def test_libnbd_writing_more_than_the_socket_holds_gets_eperm_and_reads_on(tmp_path, transport):
    """Tried: libnbd, strict mode off, writes 8 MiB to the read-only export, far more than
    the socket holds. Must hold: the write fails with EPERM and the connection reads on.
    Before, the EPERM went out as soon as the header was read; libnbd, still sending the
    payload, had not put the write in flight, met a reply for a request it did not know,
    and dropped the connection ("no matching cookie found for server reply")."""
    server = start_server({"zeros": ZeroExport()}, tmp_path, "zeros")
    try:
        uri = (
            server.uri("zeros")
            if transport == "tcp"
            else served(server, "zeros", None, None).unix_uri
        )
        h = connect(uri)
        try:
            assert refused(h.pwrite, bytes(8 << 20), 0) == errno.EPERM
            assert h.pread(4096, 1 << 20) == bytes(4096)
        finally:
            h.shutdown()
    finally:
        server.shutdown()


def test_unknown_commands_and_write_payloads_over_raw_socket(registry_image):
    """Unknown command numbers get EINVAL; a write's payload is skipped, not parsed as
    requests; the stream stays in sync and DISC closes the connection."""
    image = registry_image.image.path.read_bytes()
    client = w.RawClient(registry_image.server.tcp_address)
    try:
        client.negotiate("layer0")
        for handle, command in enumerate([8, 9, 42, 0xFFFF], start=1):
            client.send(command, handle, 0, 512)
            assert client.wait(handle).error == w.EINVAL
        fake_request = w.request(w.CMD_READ, 99, 0, 16)  # inside the payload: never a request
        client.send(w.CMD_WRITE, 10, 0, len(fake_request), payload=fake_request)
        assert client.wait(10).error == w.EPERM
        client.send(w.CMD_READ, 11, 4096, 100)
        assert client.wait(11).data == {4096: image[4096:4196]}
        assert not client.checker.replies and not client.checker.finished
        client.send(w.CMD_DISC, 12)
        assert client.sock.recv(1) == b""
    finally:
        client.close()


def test_garbage_ends_only_its_own_connection(registry_image):
    """A request with a bad magic makes the server hang up on that client; a client
    connected at the same time carries on reading."""
    image = registry_image.image.path.read_bytes()
    good = connect(registry_image.uri)
    bad = w.RawClient(registry_image.server.tcp_address)
    try:
        bad.negotiate("layer0")
        bad.sock.sendall(b"\xde\xad\xbe\xef" * 7)
        assert bad.sock.recv(1) == b""
        assert good.pread(65536, 0) == image[:65536]
    finally:
        bad.close()
        good.shutdown()


def test_read_failing_part_way_is_an_error_never_data(local_blob, tmp_path):
    """Offline with half the blob cached, a read crossing into the uncached half fails
    with EIO (one ERROR_OFFSET chunk and no data with structured replies, an error
    without payload with simple ones); reads of the cached half succeed; the connection
    stays in sync."""
    blob, data = local_blob.blob, local_blob.data
    half = len(data) // 2 // 32768 * 32768
    blob.read(0, half)  # a cache hint only starts a fetch; a read waits for it
    offline = CachedBlob(local_blob.store, blob.digest, blob.size, None, name="blob")
    (tmp_path / "srv").mkdir()
    server = start_server({"blob": offline}, tmp_path / "srv", "blob")
    try:
        uri = served(server, "blob", None, offline).uri
        for structured in (True, False):
            h = connect(uri, structured)
            assert refused(h.pread, 65536, half - 32768) == errno.EIO
            assert h.pread(65536, half - 65536) == data[half - 65536 : half]
            h.shutdown()
        client = w.RawClient(server.tcp_address)
        client.negotiate("blob")
        client.send(w.CMD_READ, 1, half - 32768, 65536)
        reply = client.wait(1)
        assert reply.error == w.EIO and reply.chunks == [w.TYPE_ERROR_OFFSET]
        assert reply.data == {}, "a failed read carried data"
        client.send(w.CMD_READ, 2, 0, 100)
        assert client.wait(2).data == {0: data[:100]}
        client.close()
    finally:
        server.shutdown()
        offline.close()


def test_hangup_mid_handshake_and_mid_request(registry_image):
    """Clients that vanish in the middle of the greeting, an option or a request leave
    the server serving the next client."""
    address = registry_image.server.tcp_address
    for script in (b"", w.client_flags()[:2], w.client_flags() + w.option(7, b"x" * 10)[:20]):
        sock = socket.create_connection(address)
        sock.recv(18)
        sock.sendall(script)
        sock.close()
    client = w.RawClient(address)
    client.negotiate("layer0")
    client.sock.sendall(w.request(w.CMD_READ, 1, 0, 10)[:13])
    client.close()
    h = connect(registry_image.uri)
    assert len(h.pread(10, 0)) == 10
    h.shutdown()


def test_a_hit_answered_on_the_reader_thread_still_checks_every_block(local_blob, tmp_path):
    """Hits are answered inline, sent before their bookkeeping; yet a flipped bit in a cached
    4 KiB block is caught on that path: offline, the read of that block fails with EIO and
    carries no data, whether asked alone or in a burst with good reads, which are served;
    each failure is counted."""
    blob, data, store = local_blob.blob, local_blob.data, local_blob.store
    blob.read(0, len(data))
    offline = CachedBlob(store, blob.digest, blob.size, None, name="blob")
    (tmp_path / "srv").mkdir()
    server = start_server({"blob": offline}, tmp_path / "srv", "blob")
    client = w.RawClient(server.tcp_address)
    try:
        client.negotiate("blob")
        failures = store.stats()["checksum_failures"]
        for chunk in (3, 5):
            assert flip_stored_byte(store, blob.digest, chunk, SUM_SIZE + 2 * 4096 + 7)
        # Alone (depth 1): an intact block of the damaged chunk, then the damaged block.
        client.send(w.CMD_READ, 1, 3 * CHUNK_SIZE + 4096, 4096)
        assert client.wait(1).data == {3 * CHUNK_SIZE + 4096: data[3 * CHUNK_SIZE + 4096 :][:4096]}
        client.send(w.CMD_READ, 2, 3 * CHUNK_SIZE + 2 * 4096, 4096)
        reply = client.wait(2)
        assert reply.error == w.EIO and reply.data == {}
        # In a burst: good reads around the damaged block, all in one send.
        bad = 5 * CHUNK_SIZE + 2 * 4096
        burst = [(10, 0), (11, bad), (12, 8 * CHUNK_SIZE), (13, bad - 4096)]
        for handle, offset in burst:
            client.checker.reads[handle] = (offset, 4096)
        client.sock.sendall(b"".join(w.request(w.CMD_READ, h, o, 4096, 0) for h, o in burst))
        for handle, offset in burst:
            reply = client.wait(handle)
            if offset == bad:
                assert reply.error == w.EIO and reply.data == {}
            else:
                assert reply.data == {offset: data[offset : offset + 4096]}
        assert store.stats()["checksum_failures"] == failures + 2
    finally:
        client.close()
        server.shutdown()
        offline.close()


def test_replies_sent_from_the_cache_and_queued_are_copies(local_blob, tmp_path):
    """Large hits are sent from the cache's own buffers; what a slow client's socket does
    not take is copied to the queue before the cache lets those buffers go. Rewriting
    every cached chunk while the replies wait (each chunk twice, so its bytes end as they
    were, in pages other chunks' old pages are reused for) changes none of the bytes the
    client then reads."""
    blob, data, store = local_blob.blob, local_blob.data, local_blob.store
    blob.read(0, len(data))
    server = start_server({"blob": blob}, tmp_path, "blob")
    client = w.RawClient(server.tcp_address)
    try:
        client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 10)
        client.negotiate("blob")
        reads = [(handle, handle % 3 << 20) for handle in range(1, 25)]  # 24 MiB of replies
        for handle, offset in reads:
            client.checker.reads[handle] = (offset, 1 << 20)
        client.sock.sendall(b"".join(w.request(w.CMD_READ, h, o, 1 << 20, 0) for h, o in reads))
        time.sleep(0.5)  # the socket is full; the rest of the replies wait in the queue
        for _ in range(2):
            for chunk in range(len(data) // CHUNK_SIZE + 1):
                assert flip_stored_byte(store, blob.digest, chunk, SUM_SIZE + 100)
        for handle, offset in reads:
            assert client.wait(handle).data == {offset: data[offset : offset + (1 << 20)]}
    finally:
        client.close()
        server.shutdown()
