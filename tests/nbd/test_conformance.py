"""Rules of the NBD protocol that clients written by others rely on, on a live server."""

from __future__ import annotations

import errno
import json
import os
import struct

import nbd
import nbd_wire as w
import pytest
from nbd_serving import SlowLookupExport, SlowMissExport, ZeroExport, start_server
from rig.fault_proxy import Fault


@pytest.fixture
def lookup_server(tmp_path):
    server = start_server({"slow": SlowLookupExport()}, tmp_path, "slow")
    try:
        yield server
    finally:
        server.shutdown()


@pytest.mark.parametrize("option", [w.OPT_GO, w.OPT_EXPORT_NAME], ids=["go", "export_name"])
def test_requests_sent_behind_the_choice_of_export_are_answered_after_it(lookup_server, option):
    """A client may send its first requests right behind GO or EXPORT_NAME, before the
    answer arrives. The answer comes first, whole: a read served by a worker while the
    reader thread still works on the next request is never sent ahead of it."""
    client = w.RawClient(lookup_server.tcp_address)
    try:
        choose = (
            w.option(w.OPT_GO, w.go_data("slow"))
            if option == w.OPT_GO
            else w.option(w.OPT_EXPORT_NAME, b"slow")
        )
        reads = w.request(w.CMD_READ, 1, 0, 4096) + w.request(w.CMD_READ, 2, 4096, 4096)
        client.sock.sendall(w.client_flags() + choose + reads)
        if option == w.OPT_GO:
            assert client.option_answers()[-1].reply == w.REP_ACK
        else:
            size, flags = struct.unpack(">QH", client.recv_exactly(10))
            assert size == SlowLookupExport.size and flags & 1
        client.checker = w.ReplyChecker(structured=False)
        client.checker.reads = {1: (0, 4096), 2: (4096, 4096)}
        assert client.wait(1).data == {0: bytes(4096)}
        assert client.wait(2).data == {4096: bytes(4096)}
    finally:
        client.close()


def test_error_messages_carry_no_nul_whatever_the_registry_said(proxied_registry_image):
    """Strings on the NBD wire must not hold NUL. A read's error message quotes the
    registry's refusal, whose OCI error JSON may say anything: a NUL in it reaches the
    client as U+FFFD, the rest of the message intact."""
    served, proxy = proxied_registry_image
    said = {"errors": [{"code": "DENIED", "message": "not\u0000here"}]}
    proxy.fault = Fault(
        "status", path_contains="/blobs/", status=400, body=json.dumps(said).encode()
    )
    client = w.RawClient(served.server.tcp_address)
    try:
        client.negotiate("layer0")
        client.send(w.CMD_READ, 1, 0, 4096)
        reply = client.wait(1)
        assert reply.error == w.EIO and reply.data == {}
        assert "not\ufffdhere" in reply.message and "\0" not in reply.message
    finally:
        client.close()


@pytest.mark.parametrize("structured", [True, False], ids=["structured", "simple"])
def test_disc_behind_requests_in_flight_sends_their_replies_first(tmp_path, structured):
    """On NBD_CMD_DISC the server must answer every request before it, then close: reads
    and a cache hint still waiting on a slow fetch all get their whole replies first."""
    server = start_server({"slow": SlowMissExport(0.3)}, tmp_path, "slow")
    client = w.RawClient(server.tcp_address)
    try:
        client.negotiate("slow", structured=structured)
        for handle in range(1, 6):
            client.send(w.CMD_READ, handle, handle << 20, 65536)
        client.send(w.CMD_CACHE, 6, 0, 1 << 20)
        client.send(w.CMD_DISC, 7)
        while client.receive_some(1 << 20):
            pass
        replies = {r.handle: r for r in client.checker.finished}
        assert sorted(replies) == [1, 2, 3, 4, 5, 6] and not client.checker.replies
        assert all(r.error == 0 for r in replies.values())
        assert replies[3].data == {3 << 20: bytes(65536)}
    finally:
        client.close()
        server.shutdown()


class FailingExport(ZeroExport):
    """Zeros whose every read fails with one errno, as a backend's own failure would."""

    def __init__(self, error: int):
        super().__init__()
        self.error = error

    def read(self, offset, length):
        raise OSError(self.error, os.strerror(self.error))

    def read_cached(self, offset, length):
        return None


@pytest.mark.parametrize(
    "error", [errno.ESHUTDOWN, errno.ENOTSUP, errno.EOVERFLOW], ids=errno.errorcode.get
)
def test_a_backend_failure_never_speaks_for_the_protocol(tmp_path, error):
    """NBD_ESHUTDOWN tells a client the server is stopping (it must then disconnect);
    the spec keeps NBD_ENOTSUP for fast zeroes and NBD_EOVERFLOW for oversized requests.
    A read whose backend fails with one of those errnos, while the server runs on, is
    an I/O error to libnbd, and the connection keeps serving."""
    server = start_server({"failing": FailingExport(error)}, tmp_path, "failing")
    try:
        handle = nbd.NBD()
        handle.connect_uri(server.uri("failing"))
        for _ in range(2):
            with pytest.raises(nbd.Error) as failed:
                handle.pread(4096, 0)
            assert failed.value.errnum == errno.EIO
        handle.flush()
        handle.shutdown()
    finally:
        server.shutdown()
