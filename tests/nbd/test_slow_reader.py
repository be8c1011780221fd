"""A client that takes its replies slowly but steadily is slow, not stalled."""

from __future__ import annotations

import time

import nbd_wire as w
from nbd_serving import ZeroExport

from nbdfront.server import NBDServer

PIECE = 32 << 10
PACE = 1 / 16
"""Seconds between two pieces the client takes: 512 KiB/s."""


def test_a_client_taking_half_a_mebibyte_a_second_is_not_cut_by_a_one_second_limit(tmp_path):
    """Tried: idle limit 1 s; a client over the Unix socket (a 208 KiB send buffer) asks for
    1.5 MiB and takes 32 KiB of it every 1/16 s, never pausing. Must hold: it gets every
    byte. Before, the server saw the client take bytes only once per MiB it sent, so
    this client, taking a MiB every 2 s, was cut after 1 s for "taking no reply byte";
    now it sees that every 64 KiB (an eighth of a second at this pace)."""
    server = NBDServer(
        {"zeros": ZeroExport()},
        unix=str(tmp_path / "nbd.sock"),
        default_export="zeros",
        idle_timeout=1.0,
    )
    server.start()
    client = w.RawClient(server.unix_path)
    try:
        client.negotiate("zeros", structured=False)
        for handle in range(3):
            client.send(w.CMD_READ, handle, 0, 512 << 10)
        want = 3 * ((512 << 10) + 16)
        got = 0
        while got < want:
            piece = client.sock.recv(min(PIECE, want - got))
            assert piece, f"cut after {got} of {want} bytes"
            got += len(piece)
            time.sleep(PACE)
    finally:
        client.close()
        server.shutdown()
