"""Scatter-gather sends: every byte of every buffer, in order, whatever the socket takes."""

from __future__ import annotations

import array
import random
import socket
import threading

from nbdfront.server import send_buffers


def test_short_sends_and_more_buffers_than_one_sendmsg_takes():
    """3000 buffers (IOV_MAX is 1024) of odd sizes and kinds (bytes, bytearray, a view
    of 4-byte items, empty ones), 3 MiB in all, into a socket whose send buffer takes a
    few KiB at a time, so nearly every sendmsg is short: the peer receives every byte,
    in order."""
    rng = random.Random(7)
    buffers: list = []
    for i in range(3000):
        size = rng.choice([0, 1, 7, 1000, 2048])
        kind = i % 3
        if kind == 0:
            buffers.append(rng.randbytes(size))
        elif kind == 1:
            buffers.append(bytearray(rng.randbytes(size)))
        else:
            buffers.append(memoryview(array.array("I", rng.randbytes(size - size % 4))))
    buffers.append(rng.randbytes(3 << 20))
    expected = b"".join(bytes(b) for b in buffers)
    sender, receiver = socket.socketpair()
    sender.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    received = bytearray()

    def drain() -> None:
        while piece := receiver.recv(65536):
            received.extend(piece)

    reader = threading.Thread(target=drain)
    reader.start()
    try:
        send_buffers(sender, buffers)
        sender.shutdown(socket.SHUT_WR)
        reader.join(30)
        assert not reader.is_alive()
        assert bytes(received) == expected
    finally:
        sender.close()
        receiver.close()
